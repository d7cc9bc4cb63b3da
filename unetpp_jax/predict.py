"""Segment images of any size with a checkpoint (the bundled model by default).

    import unetpp_jax
    out = unetpp_jax.predict(image)            # HxW(xC) uint8/uint16 numpy image, BGR by default
    out.masks, out.probabilities               # HxW uint8 class index (0/1), HxW float32

Each image is preprocessed as the checkpoint was trained: resized to its input size (metadata
``input.size``, else 96 for the bundled / UNET-ZOO models) with the same OpenCV-exact
INTER_LINEAR as training and evaluation (``preprocess.resize_linear_uint8``), normalised by the
checkpoint's ``InputSpec``; the probabilities are resized back to the image's own size
(``preprocess.resize_linear``, bilinear on probabilities, float64) and only then thresholded
(0.5, one class) or arg-maxed (several classes). ``native=True`` runs the model at the image's
own resolution instead: the image is padded at the bottom and right to a multiple of
``2**depth`` with numpy's ``'reflect'`` mode (mirrored without repeating the edge pixel) and the
output cropped back.

Rule for small images (both modes): each side must be at least ``2**depth`` pixels (16 for the
bundled model), the smallest input the network takes.

``unetpp_jax.predict`` is this module, made callable: ``unetpp_jax.predict(images, ...)`` is
:func:`predict`. The command line is ``experiments/predict.py`` (``unetpp-predict``).
"""

from __future__ import annotations

import functools
import sys
import types
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from unetpp_jax.data.images import as_bgr_uint8
from unetpp_jax.data.normalization import UNETZOO_INPUT, InputSpec
from unetpp_jax.data.preprocess import resize_linear, resize_linear_uint8

__all__ = ["DEFAULT_SIZE", "PAD_MODE", "Prediction", "Predictor", "predict", "size_problem"]

#: Input side of checkpoints whose metadata records none (the bundled and UNET-ZOO models).
DEFAULT_SIZE = 96
PAD_MODE = "reflect"
THRESHOLD = 0.5


def size_problem(h: int, w: int, multiple: int) -> str | None:
    """Why an ``h x w`` image cannot be predicted by a model of ``2**depth == multiple``, or
    None: each side must be at least ``multiple`` pixels."""
    if min(h, w) < multiple:
        return (f"image too small ({w}x{h}); each side must be at least {multiple} pixels "
                "(2**depth of the model)")
    return None


class Prediction(NamedTuple):
    """``masks``: uint8 class index per pixel (0/1 for a one-class model); ``probabilities``:
    float32, ``(H, W)`` foreground probability for one class, ``(H, W, C)`` softmax for C.
    Both at each image's own size; a list, a stacked array or one array, as the input was."""

    masks: Any
    probabilities: Any


class Predictor:
    """A checkpoint ready to predict: model at a precision, folded variables, input spec, head.

    Args:
      model, variables: a ``UNetPlusPlus`` and its variables (``None``: the bundled model).
      input_spec: normalisation (default: the checkpoint's when the bundled model is loaded,
        else UNET-ZOO's).
      size: model input side for the resize mode (default ``input_spec.size`` or 96).
      head: 1-based deep-supervision head (default: the last, as UNET-ZOO scores); head K runs
        only the grid up to K (``prune_level=K``).
      precision: ``fp32``, ``fp16``, ``bf16`` or ``int8`` (int8 needs ``calibration``, a
        ``quant.Calibration``).
      batch_size: images per call in the resize mode.
    """

    def __init__(self, model=None, variables=None, *, input_spec: InputSpec | None = None,
                 size: int | Sequence[int] | None = None, head: int | None = None,
                 precision: str = "fp32", calibration=None, batch_size: int = 16):
        from unetpp_jax.inference import predict_fn
        from unetpp_jax.numerics import get_numerics, prepare_variables, with_numerics

        if model is None:
            if variables is not None:
                raise ValueError("variables given without their model")
            loaded = _bundled()
            model, variables = loaded.model, loaded.variables
            input_spec = input_spec or loaded.input_spec
        elif variables is None:
            raise ValueError("a model needs its variables")
        self.input_spec = input_spec or UNETZOO_INPUT
        if size is None:
            size = self.input_spec.size or DEFAULT_SIZE
        self.size = (int(size), int(size)) if np.ndim(size) == 0 else tuple(int(v) for v in size)
        self.multiple = 2 ** model.depth
        if self.size[0] % self.multiple or self.size[1] % self.multiple:
            raise ValueError(f"input size {self.size} is not a multiple of {self.multiple} "
                             "(2**depth)")
        n_heads = model.num_heads
        self.head = n_heads if head is None else int(head)
        if not 1 <= self.head <= n_heads:
            raise ValueError(f"head {head} does not exist: the model has heads 1..{n_heads}")
        numerics = get_numerics(precision)
        self.precision = numerics.name
        if numerics.needs_calibration:
            if calibration is None:
                raise ValueError(f"{self.precision} needs a calibration (unetpp_jax.quant.calibrate)")
            variables = calibration.attach(variables)
        self.model = with_numerics(model, precision)
        self.num_classes = model.num_classes
        # BatchNorm folded (and Winograd kernels / int8 weights computed) once, not per call.
        self.variables = prepare_variables(self.model.numerics, variables)
        prune = self.head if model.deep_supervision else None
        self._f = predict_fn(self.model, prune)
        self.batch_size = int(batch_size)
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")

    # -- checks and steps shared by the library and the command line

    def size_problem(self, h: int, w: int) -> str | None:
        """Why an ``h x w`` image cannot be predicted, or None (rule: module doc)."""
        return size_problem(h, w, self.multiple)

    def preprocess(self, image_bgr: np.ndarray) -> np.ndarray:
        """The model-size uint8 image (OpenCV-exact INTER_LINEAR; a same-size image is copied)."""
        return resize_linear_uint8(image_bgr, self.size)

    def run(self, images_uint8: np.ndarray, batch: int | None = None) -> np.ndarray:
        """Probabilities of the chosen head for a stack of same-size uint8 BGR images:
        ``(N, H, W, C)`` float32 (C = 1 for a one-class model). Batches of ``batch`` images
        (default ``min(batch_size, N)``), the last one padded, so one compiled program per
        image shape; callers feeding chunks pass the same ``batch`` every time."""
        n = len(images_uint8)
        bs = batch or min(self.batch_size, n)
        out = []
        for start in range(0, n, bs):
            chunk = images_uint8[start:start + bs]
            pad = bs - len(chunk)
            if pad:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
            probs = self._f(self.variables, self.input_spec.normalize(chunk))
            if isinstance(probs, tuple):
                probs = probs[-1]  # prune_level = head: its last output is the head asked for
            out.append(np.asarray(probs, np.float32)[: bs - pad])
        return np.concatenate(out) if out else np.zeros((0, *self.size, self.num_classes),
                                                        np.float32)

    def restore(self, probs: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
        """Model-size probabilities ``(S, S, C)`` -> the image's ``hw``, bilinear
        (``resize_linear``), as float32 ``(H, W)`` (one class) or ``(H, W, C)``."""
        p = probs if tuple(probs.shape[:2]) == tuple(hw) else resize_linear(probs, hw)
        p = np.asarray(p, np.float32)
        return p[..., 0] if self.num_classes == 1 else p

    def native(self, images_bgr: np.ndarray) -> np.ndarray:
        """Probabilities at the images' own size ``(N, H, W, C)`` (same-size stack): padded to
        a multiple of ``2**depth`` (``PAD_MODE``, bottom/right), predicted, cropped back."""
        n, h, w = images_bgr.shape[:3]
        ph, pw = -h % self.multiple, -w % self.multiple
        x = np.pad(images_bgr, ((0, 0), (0, ph), (0, pw), (0, 0)), mode=PAD_MODE)
        return self.run(x)[:, :h, :w]

    def to_mask(self, probs: np.ndarray, threshold: float = THRESHOLD) -> np.ndarray:
        """uint8 class index: ``probs >= threshold`` (one class) or ``argmax`` (several)."""
        if self.num_classes == 1:
            p = probs[..., 0] if probs.ndim == 3 and probs.shape[-1] == 1 else probs
            return (p >= threshold).astype(np.uint8)
        return np.argmax(probs, axis=-1).astype(np.uint8)


@functools.lru_cache(maxsize=1)
def _bundled():
    from unetpp_jax.pretrained import load_checkpoint

    return load_checkpoint()


def _as_list(images):
    """(list of images, how to return: 'one' | 'stack' | 'list')."""
    if isinstance(images, np.ndarray) or hasattr(images, "__array__") and not isinstance(
            images, (list, tuple)):
        a = np.asarray(images)
        if a.ndim == 4:
            return list(a), "stack"
        return [a], "one"
    images = list(images)
    if not images:
        raise ValueError("no images given")
    return images, "list"


def predict(images, model=None, variables=None, *, input_spec: InputSpec | None = None,
            size=None, native: bool = False, head: int | None = None, precision: str = "fp32",
            calibration=None, batch_size: int = 16, channel_order: str = "BGR",
            threshold: float = THRESHOLD, progress: bool = False) -> Prediction:
    """Segment numpy images (module doc); the bundled model when ``model`` is None.

    Args:
      images: one image ``(H, W)``, ``(H, W, 1|3|4)``; a stack ``(N, H, W, C)``; or a list of
        images of any sizes. uint8 or uint16 (high byte kept, as ``cv2.imread``); grey
        replicated, alpha dropped.
      channel_order: of the colour images given: ``"BGR"`` (``cv2.imread``, every loader of this
        package; the default) or ``"RGB"`` (Pillow, ``imageio``).
      native: predict at each image's own resolution (padded to a multiple of ``2**depth``)
        instead of resizing to the model's size.
      threshold: one-class masks are ``probability >= threshold``.
      Others: see :class:`Predictor`.

    Returns:
      :class:`Prediction` ``(masks, probabilities)`` at each image's own size.
    """
    items, kind = _as_list(images)
    pred = Predictor(model, variables, input_spec=input_spec, size=size, head=head,
                     precision=precision, calibration=calibration, batch_size=batch_size)
    bgr = [as_bgr_uint8(im, channel_order, name=f"image {i}") for i, im in enumerate(items)]
    for i, im in enumerate(bgr):
        problem = pred.size_problem(*im.shape[:2])
        if problem:
            raise ValueError(f"image {i}: {problem}")
    probs = []
    if native:
        it = bgr
        if progress:
            from tqdm.auto import tqdm

            it = tqdm(bgr, desc="predict", unit="img")
        for im in it:
            probs.append(pred.restore(pred.native(im[None])[0], im.shape[:2]))
    else:
        small = pred.run(np.stack([pred.preprocess(im) for im in bgr]))
        probs = [pred.restore(p, im.shape[:2]) for p, im in zip(small, bgr)]
    masks = [pred.to_mask(p, threshold) for p in probs]
    if kind == "one":
        return Prediction(masks[0], probs[0])
    if kind == "stack":
        return Prediction(np.stack(masks), np.stack(probs))
    return Prediction(masks, probs)


class _CallableModule(types.ModuleType):
    """``unetpp_jax.predict(...)`` calls :func:`predict` although ``unetpp_jax.predict`` is
    this module (a submodule import binds the module onto the package, whatever
    ``unetpp_jax.__getattr__`` says)."""

    def __call__(self, *args, **kwargs):
        return predict(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
