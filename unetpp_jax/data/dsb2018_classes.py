"""DSB2018 as three classes -- 0 background, 1 nucleus interior, 2 nucleus boundary -- built from
the instance masks of the raw ``stage1_train`` (one PNG per nucleus).

The boundary class is a band of ``band`` pixels (default 2), measured at the image's original
resolution, on the inside of each nucleus' edge:

* a pixel of nucleus k is *boundary* when some pixel within Chebyshev distance ``band`` (the
  ``(2 band + 1)``-square around it, clipped to the image) is not nucleus k -- background or
  another nucleus. The image border is not an edge: a nucleus cut by the border has no band along
  it;
* **touching nuclei**: where two nuclei touch, each gets its own band along the contact line, so
  the two interiors are separated by ``2 * band`` boundary pixels -- the point of the class;
* pixels claimed by two or more instance masks (overlaps, rare in stage1_train) are boundary;
* interior = nucleus pixels that are not boundary. Interior + boundary = the binary dataset's
  mask union (instance pixel > 127).

The label map is then resized to ``size x size`` per class plane with the OpenCV-exact
INTER_LINEAR and argmax (``classes.resize_labels``); the image exactly as the binary dataset
(``resize_linear_uint8``); the split is UNET-ZOO's (``split.split_ids``), so the 134 validation
images are the binary table's. At small sizes a thin band partly disappears in the resize (see
``docs/data.md`` for the class fractions). Built once per (size, band) and cached.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from unetpp_jax.data import cache as _cache
from unetpp_jax.data.classes import ClassSplit, resize_labels
from unetpp_jax.data.pipeline import _check_split_name
from unetpp_jax.data.preprocess import (
    MASK_THRESHOLD,
    PreprocessError,
    Stage1Train,
    mask_from_png,
    resize_linear_uint8,
)
from unetpp_jax.data.split import split_ids

__all__ = ["BACKGROUND", "BOUNDARY", "CLASS_NAMES", "DEFAULT_BAND", "INTERIOR", "instance_classes",
           "load_dsb2018_classes"]

BACKGROUND, INTERIOR, BOUNDARY = 0, 1, 2
CLASS_NAMES = ("background", "interior", "boundary")
DEFAULT_BAND = 2


def _window_extreme(a: np.ndarray, r: int, fn) -> np.ndarray:
    """``fn`` (np.maximum / np.minimum) over the (2r+1)^2 square around each pixel, clipped to
    the image (edge-replicated padding adds no new values)."""
    out = a
    for axis in (0, 1):
        pad = [(0, 0), (0, 0)]
        pad[axis] = (r, r)
        p = np.pad(out, pad, mode="edge")
        n = out.shape[axis]
        acc = np.take(p, np.arange(0, n), axis=axis)
        for k in range(1, 2 * r + 1):
            acc = fn(acc, np.take(p, np.arange(k, k + n), axis=axis))
        out = acc
    return out


def instance_classes(instances, band: int = DEFAULT_BAND) -> np.ndarray:
    """``(H, W)`` uint8 labels (0 background, 1 interior, 2 boundary) from instance masks.

    Args:
      instances: a sequence of ``(H, W)`` boolean masks, one per nucleus (or a ``(K, H, W)``
        array).
      band: boundary width in pixels (module doc); at least 1.
    """
    if band < 1:
        raise ValueError(f"band must be at least 1 pixel, got {band}")
    instances = [np.asarray(m, bool) for m in instances]
    if not instances:
        raise ValueError("no instance masks given")
    shape = instances[0].shape
    label = np.zeros(shape, np.int32)
    count = np.zeros(shape, np.int32)
    for k, m in enumerate(instances, start=1):
        if m.shape != shape:
            raise ValueError(f"instance {k - 1} is {m.shape}, the first is {shape}")
        label[m] = k
        count += m
    overlap = count > 1
    label[overlap] = len(instances) + 1  # its own label: differs from every neighbour
    fg = count > 0
    differs = (_window_extreme(label, band, np.maximum) != label) | (
        _window_extreme(label, band, np.minimum) != label)
    out = np.zeros(shape, np.uint8)
    out[fg] = INTERIOR
    out[fg & (differs | overlap)] = BOUNDARY
    return out


def _instances(raw: Stage1Train, image_id: str, shape) -> list[np.ndarray]:
    out = []
    for ref in raw._masks[image_id]:
        m = mask_from_png(raw._bytes(ref), name=raw._name(ref))
        if m.shape != tuple(shape):
            raise PreprocessError(f"{raw._name(ref)}: mask is {m.shape[1]}x{m.shape[0]} but its "
                                  f"image is {shape[1]}x{shape[0]}")
        out.append(m > MASK_THRESHOLD)
    return out


def _signature(raw: Stage1Train):
    if raw._zip is not None:
        return _cache.file_signature([raw.path])
    files = []
    for image_id in raw.ids:
        files.append(raw._images[image_id])
        files.extend(raw._masks[image_id])
    return _cache.file_signature(files)


def load_dsb2018_classes(source, split: str = "validation", size: int = 96, *,
                         progress: bool = True, band: int = DEFAULT_BAND,
                         cache: bool = True) -> ClassSplit:
    """One split of DSB2018 as three classes (module doc), as a :class:`ClassSplit`.

    ``source``: the raw ``stage1_train`` folder or zip (the instance masks are needed; a
    preprocessed folder has only their union). ``split``: ``"train"``, ``"validation"`` (UNET-ZOO's)
    or ``"all"`` (sorted ids).
    """
    if source is None:
        raise ValueError("dsb2018-3class is built from the raw stage1_train (instance masks): pass "
                         "source= the stage1_train folder or zip")
    if split != "all":
        split = _check_split_name(split)
    with Stage1Train(Path(source).expanduser()) as raw:
        key = _cache.cache_key("dsb2018-3class", {"size": int(size), "band": int(band),
                                                  "root": str(Path(raw.path).absolute())},
                               _signature(raw))
        entry = _cache.load("dsb2018-3class", key) if cache else None
        if entry is not None:
            images, labels, ids = entry["images"], entry["masks"], [str(i) for i in entry["ids"]]
        else:
            ids = list(raw.ids)
            it = ids
            if progress:
                from tqdm.auto import tqdm

                it = tqdm(ids, desc=f"building 3-class DSB2018 at {size}px", unit="img")
            images, labels = [], []
            for image_id in it:
                image, _ = raw.read(image_id)
                classes = instance_classes(_instances(raw, image_id, image.shape[:2]), band)
                images.append(resize_linear_uint8(image, size))
                labels.append(resize_labels(classes, size, 3))
            images, labels = np.stack(images), np.stack(labels)
            if cache:
                _cache.save("dsb2018-3class", key, {"images": images, "masks": labels,
                                                    "ids": np.array(ids)})
    if split == "all":
        chosen = sorted(ids)
    else:
        train, val = split_ids(ids)
        chosen = val if split == "validation" else train
    index = {image_id: i for i, image_id in enumerate(ids)}
    idx = np.array([index[i] for i in chosen], np.int64)
    return ClassSplit(images[idx], labels[idx], chosen, 3)
