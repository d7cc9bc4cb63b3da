"""DSB2018 preprocessing exactly as pytorch-nested-unet / UNET-ZOO do it, without OpenCV.

The reference (pytorch-nested-unet's preprocess_dsb2018.py) reads each ``stage1_train/<id>/images/<id>.png`` with
``cv2.imread`` (BGR, alpha dropped), takes the union of the instance masks (pixel > 127) as a
float64 mask, resizes both with ``cv2.resize(..., INTER_LINEAR)`` and stores the mask as
``(mask * 255).astype(uint8)``: a *soft* mask whose edges hold intermediate grey levels.

The resize is the part that matters. OpenCV's INTER_LINEAR samples at half-pixel centres, clamps
at the edges and does **not** antialias when shrinking; Pillow's BILINEAR antialiases and costs
about four MIoU points on a UNET-ZOO checkpoint. This module restates OpenCV's
arithmetic in numpy: :func:`resize_linear` (float64, used for the mask) restates OpenCV's float64
path and :func:`resize_linear_uint8` (used for the image) its 8-bit fixed-point path. On all 670
stage1_train images, at 96 and at 256 pixels, both give exactly the masks and images that
OpenCV 4.10 and 5.0 give. OpenCV itself is used only in the tests.

:class:`Stage1Train` reads the raw Kaggle / BBBC038 ``stage1_train`` either as an extracted
folder or straight from ``stage1_train.zip``.
"""

from __future__ import annotations

import functools
import io
import re
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = [
    "MASK_THRESHOLD",
    "PreprocessError",
    "Stage1Train",
    "decode_png",
    "encode_png",
    "image_bgr_from_png",
    "mask_from_png",
    "preprocess_arrays",
    "preprocess_example",
    "read_image_bgr",
    "read_mask_union",
    "resize_linear",
    "resize_linear_uint8",
]

#: Instance-mask pixels strictly above this grey level are foreground (pytorch-nested-unet).
MASK_THRESHOLD = 127
_COEF_BITS = 11  # OpenCV's INTER_RESIZE_COEF_BITS
_HOW_TO_GET = ("get stage1_train.zip from Kaggle (data-science-bowl-2018) or BBBC038v1, "
               "see the README, section Data")


class PreprocessError(ValueError):
    """A raw or preprocessed DSB2018 file cannot be used; the message names the file and the fix."""


# ---------------------------------------------------------------------------------------------
# Resize


def _split(a: np.ndarray):
    """Veltkamp split: a = hi + lo exactly, each with at most 26 significant bits."""
    c = 134217729.0 * a  # 2**27 + 1
    hi = c - (c - a)
    return hi, a - hi


def _fma(a, b, c) -> np.ndarray:
    """``a * b + c`` rounded once (a fused multiply-add), in plain float64 numpy.

    ``a * b = p + e`` exactly (Dekker's product), ``p + c = s + t`` exactly (Knuth's sum), result
    ``s + (t + e)``. This is the correctly rounded value except when ``t + e`` itself rounds onto
    a tie of the last addition, which needs values far more finely balanced than a resize makes.
    numpy evaluates each operation on its own, so no compiler contraction changes this.
    """
    a, b, c = (np.asarray(x, np.float64) for x in (a, b, c))
    p = a * b
    (ah, al), (bh, bl) = _split(a), _split(b)
    e = ((ah * bh - p) + ah * bl + al * bh) + al * bl
    s = p + c
    bb = s - p
    t = (p - (s - bb)) + (c - bb)
    return s + (t + e)


def _linear_taps(src: int, dst: int, *, zero_weight_at_edges: bool):
    """Source indices and weights ``(i0, i1, w1)`` of OpenCV's INTER_LINEAR along one axis.

    Restated from measurements of the opencv-python 4.10 and 5.0 wheels on x86-64 (one-hot
    images, random float64 images): the source position is ``f = fma(d + 0.5, src / dst, -0.5)``,
    ``s = floor(f)``, ``w1 = f - s``. Horizontally both taps move onto the edge pixel with weight
    ``w1 = 0`` when ``s < 0`` or ``s >= src - 1``; vertically the weight is kept and the row
    indices are clamped. These details matter because the soft mask is truncated to uint8: a
    last-bit difference can move a value by one grey level.
    """
    f = _fma(np.arange(dst, dtype=np.float64) + 0.5, src / dst, -0.5)
    s = np.floor(f).astype(np.int64)
    f = f - s  # exact
    if zero_weight_at_edges:
        low = s < 0
        f[low], s[low] = 0.0, 0
        high = s >= src - 1
        f[high], s[high] = 0.0, src - 1
    i0 = np.clip(s, 0, src - 1)
    i1 = np.clip(s + 1, 0, src - 1)
    return i0, i1, f


@functools.lru_cache(maxsize=256)
def _taps(src_h: int, src_w: int, dst_h: int, dst_w: int):
    return (
        _linear_taps(src_h, dst_h, zero_weight_at_edges=False),
        _linear_taps(src_w, dst_w, zero_weight_at_edges=True),
    )


def _size_hw(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, (int, np.integer)):
        h = w = int(size)
    else:
        h, w = (int(v) for v in size)
    if h <= 0 or w <= 0:
        raise ValueError(f"output size must be positive, got {size!r}")
    return h, w


def _check_image_array(arr: np.ndarray, fn: str) -> None:
    if arr.ndim not in (2, 3) or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{fn} expects a non-empty (H, W) or (H, W, C) array, got shape {arr.shape}")


def _gather(arr, size):
    """Taps of both axes, and the source rows the vertical pass reads (only those need the
    horizontal pass)."""
    h, w = arr.shape[:2]
    (r0, r1, b1), (c0, c1, a1) = _taps(h, w, *_size_hw(size))
    rows, inverse = np.unique(np.concatenate([r0, r1]), return_inverse=True)
    if arr.ndim == 3:
        a1, b1 = a1[:, None], b1[:, None, None]
    else:
        b1 = b1[:, None]
    return arr[rows], (c0, c1, a1), (inverse[: len(r0)], inverse[len(r0):], b1)


def resize_linear(arr: np.ndarray, size: int | Sequence[int]) -> np.ndarray:
    """Resize like ``cv2.resize(arr, (w, h), interpolation=cv2.INTER_LINEAR)``, in float64.

    Args:
      arr: ``(H, W)`` or ``(H, W, C)`` array of any real dtype.
      size: output side ``S`` (square) or ``(height, width)``. Note the order: OpenCV's ``dsize``
        is ``(width, height)``, this function takes ``(height, width)`` like numpy shapes.

    Returns:
      float64 array of shape ``(h, w)`` or ``(h, w, C)``, not rounded: horizontal pass, then
      vertical pass, each output ``fma(w1, x1 - x0, x0)``, as the opencv-python wheels compute
      it on x86-64. Measured: the soft masks of all 670 stage1_train images at 96 and 256 are
      identical to OpenCV 4.10's and 5.0's; on random float64 arrays of random shapes it equals
      OpenCV 5.0 bit for bit (299 of 300 shape pairs) while OpenCV 4.10 differs from both in the
      last bit on about half of them. OpenCV resizes uint8 in fixed point instead: see
      :func:`resize_linear_uint8`.

    Semantics: half-pixel centres, edge clamp, no antialiasing (each output pixel reads at most
    2x2 source pixels, however much the image shrinks). A same-size resize is an exact copy, as in
    OpenCV.
    """
    arr = np.asarray(arr)
    _check_image_array(arr, "resize_linear")
    src = arr.astype(np.float64, copy=False)
    if _size_hw(size) == arr.shape[:2]:
        return src.copy()
    rows, (c0, c1, a1), (j0, j1, b1) = _gather(src, size)
    x0 = rows[:, c0]
    horiz = _fma(a1, rows[:, c1] - x0, x0)
    y0 = horiz[j0]
    return _fma(b1, horiz[j1] - y0, y0)


def resize_linear_uint8(arr: np.ndarray, size: int | Sequence[int]) -> np.ndarray:
    """``cv2.resize(arr, (w, h), interpolation=cv2.INTER_LINEAR)`` for a uint8 image, in integers.

    OpenCV resizes 8-bit images in fixed point: weights ``round(w * 2048)``, an exact integer
    horizontal pass, then a vertical pass that its SIMD code (what x86 and ARM builds run) rounds
    as ``(((D0 >> 4) * b0 >> 16) + ((D1 >> 4) * b1 >> 16) + 2) >> 2``. This restates that
    arithmetic with numpy integers and the taps of :func:`resize_linear`, weights
    ``round((1 - w1) * 2048)`` and ``round(w1 * 2048)``. Measured: identical to OpenCV 4.10 and
    5.0 on all 670 stage1_train images at 96x96 and at 256x256 (rounding :func:`resize_linear`
    instead agrees on ~91% of the values). On arbitrary shapes it stays within one grey level,
    with a few values off by one for about a quarter of random shape pairs (OpenCV's weight
    rounding there is not restated).
    """
    arr = np.asarray(arr)
    _check_image_array(arr, "resize_linear_uint8")
    if arr.dtype != np.uint8:
        raise ValueError(f"resize_linear_uint8 expects uint8, got {arr.dtype}")
    if _size_hw(size) == arr.shape[:2]:
        return arr.copy()
    one = 1 << _COEF_BITS
    rows, (c0, c1, a1), (j0, j1, b1) = _gather(arr, size)
    a0, a1 = np.rint((1.0 - a1) * one).astype(np.int64), np.rint(a1 * one).astype(np.int64)
    b0, b1 = np.rint((1.0 - b1) * one).astype(np.int64), np.rint(b1 * one).astype(np.int64)
    rows = rows.astype(np.int64)
    horiz = rows[:, c0] * a0 + rows[:, c1] * a1  # exact
    out = ((((horiz[j0] >> 4) * b0) >> 16) + (((horiz[j1] >> 4) * b1) >> 16) + 2) >> 2
    return np.clip(out, 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# PNG input / output


def decode_png(data: bytes, *, name: str = "<bytes>") -> Image.Image:
    """Open and fully decode image bytes with Pillow; :class:`PreprocessError` names ``name``."""
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError, ... on bad data
        raise PreprocessError(
            f"{name}: not a readable PNG image ({type(e).__name__}: {e}); the file is corrupt or "
            "truncated: extract it again from stage1_train.zip") from e
    return img


def _uint8_pixels(img: Image.Image, mode: str) -> np.ndarray:
    """Pixels of ``img`` converted to ``mode`` ("RGB" or "L"), 16-bit PNGs reduced as OpenCV does."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        grey = (np.asarray(img, dtype=np.uint32) >> 8).astype(np.uint8)  # imread keeps the high byte
        return np.repeat(grey[..., None], 3, axis=-1) if mode == "RGB" else grey
    return np.asarray(img if img.mode == mode else img.convert(mode))


def image_bgr_from_png(data: bytes, *, name: str = "<bytes>") -> np.ndarray:
    """``cv2.imread(path, IMREAD_COLOR)`` semantics on PNG bytes: HxWx3 uint8 **BGR**.

    Alpha is dropped, not composited (OpenCV does the same for RGBA PNGs); grey images are
    replicated over the three channels. The PNG on disk is in the usual RGB order, so a file
    written from a BGR array with :func:`encode_png` ``(..., bgr=True)`` reads back identically,
    with this function and with ``cv2.imread``.
    """
    rgb = _uint8_pixels(decode_png(data, name=name), "RGB")
    return np.ascontiguousarray(rgb[..., ::-1])


def mask_from_png(data: bytes, *, name: str = "<bytes>") -> np.ndarray:
    """``cv2.imread(path, IMREAD_GRAYSCALE)`` semantics on PNG bytes: HxW uint8."""
    return _uint8_pixels(decode_png(data, name=name), "L")


def _read_bytes(path) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError as e:
        raise PreprocessError(f"{path}: file not found") from e


def read_image_bgr(path) -> np.ndarray:
    """Read an image file as ``cv2.imread`` would: HxWx3 uint8 BGR, alpha dropped."""
    return image_bgr_from_png(_read_bytes(path), name=str(path))


def _union(named_masks, shape: tuple[int, int]) -> np.ndarray:
    union = np.zeros(shape, bool)
    n = 0
    for name, data in named_masks:
        m = mask_from_png(data, name=name)
        if m.shape != tuple(shape):
            raise PreprocessError(f"{name}: mask is {m.shape[1]}x{m.shape[0]} (WxH) but its image is "
                                  f"{shape[1]}x{shape[0]}; the example is inconsistent")
        union |= m > MASK_THRESHOLD
        n += 1
    if n == 0:
        raise PreprocessError("no instance masks given")
    return union


def read_mask_union(mask_paths: Sequence, shape: tuple[int, int]) -> np.ndarray:
    """Union of instance mask files: ``(H, W)`` bool, True where any mask has a pixel > 127."""
    return _union(((str(p), _read_bytes(p)) for p in mask_paths), shape)


def encode_png(arr: np.ndarray, *, bgr: bool = False, compress_level: int = 1) -> bytes:
    """PNG bytes of an HxW, HxWx1 or HxWx3 uint8 array.

    With ``bgr=True`` the channels are swapped to RGB before writing, as ``cv2.imwrite`` does, so
    the file shows true colours and :func:`image_bgr_from_png` returns the same BGR array.
    """
    arr = np.asarray(arr)
    if arr.dtype != np.uint8:
        raise ValueError(f"encode_png expects uint8, got {arr.dtype}")
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if bgr:
        arr = arr[..., ::-1]
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr)).save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# One example


def preprocess_arrays(image_bgr: np.ndarray, mask_union: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Resize a BGR uint8 image and a boolean mask union to ``size`` x ``size``.

    Image: OpenCV's 8-bit fixed-point arithmetic (:func:`resize_linear_uint8`). Mask: resized as
    float64 (the reference's mask is ``np.zeros`` float64 maxed with booleans), then
    ``(mask * 255).astype(uint8)``: truncation, not rounding, exactly as pytorch-nested-unet
    writes it.
    """
    image = resize_linear_uint8(image_bgr, size)
    mask = (resize_linear(mask_union.astype(np.float64), size) * 255).astype(np.uint8)
    return image, mask


def preprocess_example(image_png_path, mask_paths: Sequence, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Preprocess one raw DSB2018 example as pytorch-nested-unet's ``preprocess_dsb2018.py``.

    Args:
      image_png_path: ``stage1_train/<id>/images/<id>.png``.
      mask_paths: the instance mask PNGs ``stage1_train/<id>/masks/*.png`` (at least one).
      size: output side, 96 for the reference table, 256 for UNET-ZOO's default.

    Returns:
      ``(image_bgr, mask)``: ``(size, size, 3)`` uint8 in **BGR** order and ``(size, size)``
      uint8 soft mask (``255 *`` the resized union of the masks, truncated).
    """
    image = read_image_bgr(image_png_path)
    if not list(mask_paths):
        raise PreprocessError(f"{image_png_path}: no instance masks given")
    return preprocess_arrays(image, read_mask_union(mask_paths, image.shape[:2]), size)


# ---------------------------------------------------------------------------------------------
# The raw dataset


class Stage1Train:
    """The Kaggle DSB2018 / BBBC038v1 ``stage1_train``, as an extracted folder or as a zip.

    Layout: ``<id>/images/<id>.png`` and ``<id>/masks/*.png``; in a zip the id folders may sit
    under a common prefix (e.g. ``stage1_train/``). ``path`` may also be a folder that *contains*
    ``stage1_train/`` or ``stage1_train.zip`` (TFDS's manual-download folder).

    The layout is checked when the object is created (every id needs its image and at least one
    mask), so a wrong folder fails before any work is done; pixel data is checked when read.
    """

    def __init__(self, path):
        path = Path(path).expanduser()
        if not path.exists():
            raise PreprocessError(f"{path}: no such file or folder; {_HOW_TO_GET}")
        if path.is_dir() and not _looks_like_id_folder_parent(path):
            for candidate in (path / "stage1_train", path / "stage1_train.zip"):
                if candidate.exists():
                    path = candidate
                    break
        self.path = path
        self._zip = None
        if path.is_dir():
            self._images, self._masks = self._scan_folder(path)
        else:
            self._images, self._masks = self._scan_zip(path)
        self.ids = sorted(self._images)

    def __repr__(self):
        return f"Stage1Train({str(self.path)!r}, {len(self.ids)} images)"

    def __len__(self):
        return len(self.ids)

    # -- scanning

    @staticmethod
    def _scan_folder(root: Path):
        images, masks = {}, {}
        for d in sorted(root.iterdir()):
            if not d.is_dir() or d.name.startswith("."):
                continue
            image = d / "images" / f"{d.name}.png"
            if not image.is_file():
                raise PreprocessError(f"{image}: missing; {root} is not a stage1_train folder "
                                      f"(expected <id>/images/<id>.png); {_HOW_TO_GET}")
            mask_dir = d / "masks"
            if not mask_dir.is_dir():
                raise PreprocessError(f"{mask_dir}: missing, the image {d.name} has no masks folder "
                                      "(stage1_test has no masks: use stage1_train)")
            mask_files = sorted(p for p in mask_dir.iterdir() if p.suffix.lower() == ".png")
            if not mask_files:
                raise PreprocessError(f"{mask_dir}: holds no mask PNG; the download is incomplete")
            images[d.name], masks[d.name] = image, mask_files
        if not images:
            raise PreprocessError(f"{root}: holds no <id>/images/<id>.png folders; expected the "
                                  f"extracted stage1_train; {_HOW_TO_GET}")
        return images, masks

    def _scan_zip(self, path: Path):
        try:
            self._zip = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError) as e:
            raise PreprocessError(f"{path}: not a readable zip file ({e}); {_HOW_TO_GET}") from e
        images, masks, prefixes = {}, {}, set()
        pattern = re.compile(r"^(?P<prefix>(?:[^/]+/)*?)(?P<id>[^/]+)/(?P<kind>images|masks)/(?P<file>[^/]+\.png)$",
                             re.IGNORECASE)
        for name in self._zip.namelist():
            m = pattern.match(name)
            if not m or "__MACOSX" in name:
                continue
            image_id, kind = m["id"], m["kind"].lower()
            if kind == "images" and m["file"] == f"{image_id}.png":
                images[image_id] = name
                prefixes.add(m["prefix"])
            elif kind == "masks":
                masks.setdefault(image_id, []).append(name)
        if not images:
            raise PreprocessError(f"{path}: this zip is not stage1_train: it has no <id>/images/<id>.png "
                                  f"entries; {_HOW_TO_GET}")
        if len(prefixes) > 1:
            raise PreprocessError(f"{path}: image folders under several prefixes {sorted(prefixes)}; "
                                  "expected one stage1_train")
        for image_id, name in images.items():
            if image_id not in masks:
                folder = name.rsplit("/images/", 1)[0]
                raise PreprocessError(f"{path}: {folder}/masks/ is missing or empty, the image {image_id} "
                                      "has no masks (stage1_test has no masks: use stage1_train)")
            masks[image_id].sort()
        return images, masks

    # -- reading

    def _bytes(self, ref) -> bytes:
        if self._zip is not None:
            return self._zip.read(ref)
        return _read_bytes(ref)

    def _name(self, ref) -> str:
        return f"{self.path}:{ref}" if self._zip is not None else str(ref)

    def read(self, image_id: str) -> tuple[np.ndarray, np.ndarray]:
        """``(image_bgr, mask_union)`` at full resolution: HxWx3 uint8 and HxW bool."""
        try:
            ref = self._images[image_id]
        except KeyError:
            raise KeyError(f"{image_id!r} is not an image id of {self.path}") from None
        image = image_bgr_from_png(self._bytes(ref), name=self._name(ref))
        union = _union(((self._name(r), self._bytes(r)) for r in self._masks[image_id]), image.shape[:2])
        return image, union

    def preprocess(self, image_id: str, size: int) -> tuple[np.ndarray, np.ndarray]:
        """``(image_bgr, soft_mask)`` at ``size`` x ``size``, as :func:`preprocess_example`."""
        return preprocess_arrays(*self.read(image_id), size)

    def close(self):
        if self._zip is not None:
            self._zip.close()
            self._zip = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _looks_like_id_folder_parent(path: Path) -> bool:
    """True if some child folder of ``path`` holds ``images/<child>.png`` (the stage1_train level)."""
    for d in path.iterdir():
        if d.is_dir() and (d / "images" / f"{d.name}.png").is_file():
            return True
    return False
