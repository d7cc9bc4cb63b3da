"""Your own data: a folder of ``images/`` and ``masks/`` with matching stems.

Layouts (``masks`` decides):

* **flat**: ``images/<id>.<ext>`` and ``masks/<id>.<ext>`` -- any format Pillow reads, any
  size (an image and its mask must have the same size). A mask is either binary (0/255 or 0/1,
  any mix across files: foreground = value >= 128, or >= 1 in a file holding only 0 and 1) or a
  class-index map (values 0..C-1, 0 = background; palette PNGs give their palette indices).
  The whole dataset is binary if every mask holds only {0, 1} or only {0, 255}; otherwise it is a
  C-class dataset, C = the largest value + 1 (or ``num_classes=``).
* **per-class** (pytorch-nested-unet): ``masks/<class>/<id>.png``, one binary mask per class
  folder. One class folder: a binary dataset; K folders: K+1 classes, class k+1 = folder k (folders
  sorted, numerically when their names are numbers), background 0 where no class is set; where
  several class masks overlap, the later folder wins.

Binary datasets load as ``pipeline.Split`` with soft masks exactly like DSB2018's preprocessing
(``(resize_linear(foreground) * 255)`` truncated), so eval/train/calibration work unchanged;
multi-class ones as :class:`classes.ClassSplit` (labels resized per class plane, then argmax).
Images are read as ``cv2.imread`` does (``images.read_image_bgr_any``) and resized to
``size x size`` with the OpenCV-exact ``resize_linear_uint8``.

Precedence against DSB2018: a folder whose image ids are exactly the 670 stage1_train ids or
exactly the 134 bundled validation ids is DSB2018's (``pipeline.load_split``: UNET-ZOO's split,
same-size preprocessed PNGs); every other ``images/`` + ``masks/`` folder is this dataset.

Splits: ``split="all"`` (every id, sorted), ``"train"`` / ``"validation"`` by a seeded
permutation of the sorted ids -- validation = the first ``ceil(val_fraction * n)`` of
``RandomState(seed).permutation(n)``, the rest train (the defaults ``seed=41``,
``val_fraction=0.2`` are UNET-ZOO's rule) -- or ``ids=`` an explicit list (or a text file, one
id per line), returned in that order.

The whole folder is preprocessed once per size and cached (:mod:`unetpp_jax.data.cache`); the
split is taken from the cached arrays, so train and validation share one entry.
"""

from __future__ import annotations

import hashlib
import math
import re
from pathlib import Path

import numpy as np
from PIL import Image

from unetpp_jax.data import cache as _cache
from unetpp_jax.data.classes import ClassSplit, resize_labels
from unetpp_jax.data.images import is_image_name, read_image_bgr_any
from unetpp_jax.data.pipeline import Split
from unetpp_jax.data.preprocess import PreprocessError, resize_linear, resize_linear_uint8

__all__ = ["FolderError", "FolderReader", "is_dsb2018_folder", "load_folder", "open_folder",
           "recognizes", "scan_folder", "select_ids"]

#: sha256 of the 670 stage1_train ids, sorted and joined with "\n".
_DSB2018_IDS_SHA256 = "05631ef93477073a4f4adeb954e49671874eb8cef17978948f0647d3660f0857"
_MAX_CLASSES = 64
SPLITS = ("all", "train", "validation")


class FolderError(PreprocessError):
    """A folder dataset cannot be used; the message names the file or folder and the problem."""


# ---------------------------------------------------------------------------------------------
# Layout


def _image_files(folder: Path) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and not p.name.startswith(".") and is_image_name(p):
            if p.stem in out:
                raise FolderError(f"{folder}: two files with the stem {p.stem!r} ({out[p.stem].name}, "
                                  f"{p.name}); ids must be unique")
            out[p.stem] = p
    return out


def _class_dirs(mask_dir: Path) -> list[Path]:
    dirs = [d for d in mask_dir.iterdir() if d.is_dir() and not d.name.startswith(".")]
    numeric = all(re.fullmatch(r"\d+", d.name) for d in dirs)
    return sorted(dirs, key=(lambda d: int(d.name)) if numeric else (lambda d: d.name))


def scan_folder(folder) -> dict:
    """``{"images": {id: path}, "masks": {id: path} or [{id: path} per class], "layout":
    "flat"|"per-class", "classes": [class folder names]}``; raises :class:`FolderError`."""
    folder = Path(folder).expanduser()
    image_dir, mask_dir = folder / "images", folder / "masks"
    for d in (image_dir, mask_dir):
        if not d.is_dir():
            raise FolderError(f"{d}: missing; a folder dataset holds images/<id>.<ext> and "
                              "masks/<id>.<ext> (or masks/<class>/<id>.png)")
    images = _image_files(image_dir)
    if not images:
        raise FolderError(f"{image_dir}: holds no image files")
    flat = _image_files(mask_dir)
    dirs = _class_dirs(mask_dir)
    if dirs and not flat:
        per_class = [_image_files(d) for d in dirs]
        for d, masks in zip(dirs, per_class):
            missing = sorted(set(images) - set(masks))
            if missing:
                raise FolderError(f"{d / missing[0]}.png: missing; the image "
                                  f"{images[missing[0]]} has no mask in class folder {d.name} "
                                  f"({len(missing)} images lack one)")
        return {"images": images, "masks": per_class, "layout": "per-class",
                "classes": [d.name for d in dirs]}
    missing = sorted(set(images) - set(flat))
    if missing:
        raise FolderError(f"{mask_dir / missing[0]}.png: missing; the image {images[missing[0]]} "
                          f"has no mask with the same stem ({len(missing)} images lack one)")
    extra = sorted(set(flat) - set(images))
    if extra:
        raise FolderError(f"{flat[extra[0]]}: a mask without an image (no images/{extra[0]}.*; "
                          f"{len(extra)} masks lack one)")
    return {"images": images, "masks": flat, "layout": "flat", "classes": []}


def _ids_sha(ids) -> str:
    return hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()


def is_dsb2018_folder(path: Path) -> bool:
    """A preprocessed DSB2018 folder: its ``images/*.png`` ids are exactly the 670 stage1_train
    ids or exactly the 134 bundled validation ids."""
    image_dir = Path(path) / "images"
    if not image_dir.is_dir():
        return False
    ids = [p.stem for p in image_dir.glob("*.png")]
    if len(ids) == 670:
        return _ids_sha(ids) == _DSB2018_IDS_SHA256
    if len(ids) == 134:
        from unetpp_jax.data.pipeline import _bundled_val_ids

        try:
            return set(ids) == set(_bundled_val_ids())
        except FileNotFoundError:
            return False
    return False


def recognizes(path) -> bool:
    """A folder with ``images/`` and ``masks/`` that is not a preprocessed DSB2018 folder."""
    path = Path(path)
    return (path.is_dir() and (path / "images").is_dir() and (path / "masks").is_dir()
            and not is_dsb2018_folder(path))


# ---------------------------------------------------------------------------------------------
# Masks


def read_mask_values(path) -> np.ndarray:
    """A mask file's raw values, ``(H, W)`` int64: palette indices for palette images, the value
    for grey (8 or 16 bit), the common value of R, G, B for colour images whose channels agree."""
    path = Path(path)
    try:
        img = Image.open(path)
        img.load()
    except FileNotFoundError:
        raise FolderError(f"{path}: file not found") from None
    except Exception as e:
        raise FolderError(f"{path}: not a readable mask image ({type(e).__name__}: {e})") from e
    if img.mode == "F":
        raise FolderError(f"{path}: a floating-point mask; save masks as integer images")
    a = np.asarray(img)
    if img.mode in ("RGBA", "LA", "PA"):
        a = a[..., :-1]  # alpha dropped
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim == 3:
        if not ((a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all()):
            raise FolderError(f"{path}: a colour mask (R, G, B differ); save class masks as grey "
                              "or palette PNGs holding the class index")
        a = a[..., 0]
    return a.astype(np.int64)


def _binary_foreground(values: np.ndarray) -> np.ndarray:
    """Foreground of a binary mask file: >= 1 if it holds only 0/1, else >= 128 (8-bit)."""
    top = int(values.max()) if values.size else 0
    if top <= 1:
        return values >= 1
    return values >= (32768 if top > 255 else 128)


# ---------------------------------------------------------------------------------------------
# Loading


def select_ids(all_ids: list[str], split: str = "validation", *, val_fraction: float = 0.2,
               seed: int = 41, ids=None, where: str = "folder") -> list[str]:
    """The ids of one split (module doc); ``all_ids`` in any order."""
    all_sorted = sorted(all_ids)
    if ids is not None:
        if isinstance(ids, (str, Path)):
            p = Path(ids).expanduser()
            try:
                ids = [line.strip() for line in p.read_text().splitlines() if line.strip()
                       and not line.startswith("#")]
            except OSError as e:
                raise FolderError(f"{p}: cannot read the id list ({e.strerror or e})") from None
        ids = [str(i) for i in ids]
        known = set(all_sorted)
        unknown = [i for i in ids if i not in known]
        if unknown:
            raise FolderError(f"{where}: id {unknown[0]!r} is not in the dataset "
                              f"({len(unknown)} unknown ids)")
        if len(set(ids)) != len(ids):
            raise FolderError(f"{where}: the id list repeats ids")
        if not ids:
            raise FolderError(f"{where}: the id list is empty")
        return ids
    if split == "val":
        split = "validation"
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if split == "all":
        return all_sorted
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    n = len(all_sorted)
    n_val = math.ceil(val_fraction * n)
    perm = np.random.RandomState(seed).permutation(n)
    chosen = perm[:n_val] if split == "validation" else perm[n_val:]
    if len(chosen) == 0:
        raise FolderError(f"{where}: the {split} split is empty ({n} images, val_fraction "
                          f"{val_fraction}); use split='all' or another fraction")
    return [all_sorted[i] for i in chosen]


def _labels_of(layout: dict, image_id: str, shape, num_classes) -> np.ndarray:
    """The mask values of one example at full resolution (per-class layout: its label map)."""
    if layout["layout"] == "per-class":
        labels = np.zeros(shape, np.uint8)
        for k, masks in enumerate(layout["masks"]):
            values = read_mask_values(masks[image_id])
            _check_shape(values, shape, masks[image_id], layout["images"][image_id])
            labels[_binary_foreground(values)] = k + 1
        return labels
    path = layout["masks"][image_id]
    values = read_mask_values(path)
    _check_shape(values, shape, path, layout["images"][image_id])
    return values


def _check_shape(values, shape, mask_path, image_path):
    if values.shape != tuple(shape):
        raise FolderError(f"{mask_path}: mask is {values.shape[1]}x{values.shape[0]} (WxH) but "
                          f"its image {image_path} is {shape[1]}x{shape[0]}")


def _decide_classes(layout: dict, sets: list[set], ids: list[str], num_classes) -> int:
    """2 for a binary dataset (every flat mask holds only {0, 1} or only {0, 255}), else the class
    count: largest index + 1, or ``num_classes`` when given."""
    if layout["layout"] == "per-class":
        return len(layout["classes"]) + 1
    where = layout["masks"][ids[0]].parent
    binary = all(s <= {0, 1} or s <= {0, 255} for s in sets)
    if num_classes is not None and num_classes <= 2:
        if not binary:
            raise FolderError(f"{where}: num_classes={num_classes} but some masks are not binary "
                              "(only 0/1 or 0/255)")
        return 2
    if binary and num_classes is None:
        return 2
    seen = set().union(*sets)
    top = max(seen)
    if num_classes is not None:
        if top >= num_classes:
            bad = next(ids[i] for i, s in enumerate(sets) if max(s) >= num_classes)
            raise FolderError(f"{layout['masks'][bad]}: label {top} but num_classes={num_classes}")
        return int(num_classes)
    if 255 in seen and max(seen - {255}) < 254:
        raise FolderError(f"{where}: masks hold class indices {sorted(seen - {255})} and 255 (an "
                          "'ignore' label?); ignore labels are not supported")
    if top + 1 > _MAX_CLASSES:
        raise FolderError(f"{where}: mask values up to {top} look like grey levels, not class "
                          "indices; save binary masks as 0/255 or 0/1, class maps as 0..C-1")
    return top + 1


def _preprocess(layout: dict, size: int, num_classes, progress: bool, ids=None):
    """Every example (or those of ``ids``) at ``size``. Full-resolution masks are not kept: each
    file gives its value set, its soft mask (if it is binary) and its resized label map (if its
    values can be labels); the decision over these examples (binary or C classes) then picks one.
    Resizing a label map with its own max+1 planes gives the argmax of the dataset's C planes
    (absent planes stay 0)."""
    ids = sorted(layout["images"]) if ids is None else list(ids)
    it = ids
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(ids, desc=f"preprocessing {len(ids)} images at {size}px", unit="img")
    images, sets, soft, labels = [], [], [], []
    for image_id in it:
        image = read_image_bgr_any(layout["images"][image_id])
        values = _labels_of(layout, image_id, image.shape[:2], num_classes)
        images.append(resize_linear_uint8(image, size))
        vs = set(np.unique(values).tolist())
        sets.append(vs)
        is_binary = vs <= {0, 1} or vs <= {0, 255}
        soft.append((resize_linear(_binary_foreground(values).astype(np.float64), size) * 255
                     ).astype(np.uint8) if is_binary else None)
        top = max(vs)
        labels.append(resize_labels(values, size, top + 1) if top < _MAX_CLASSES else None)
    n_classes = _decide_classes(layout, sets, ids, num_classes)
    masks = soft if n_classes == 2 else labels
    return np.stack(images), np.stack(masks), ids, n_classes


def _check_source(source, size) -> Path:
    folder = Path(source).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder")
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise ValueError(f"size must be a positive int, got {size!r}")
    return folder


def _mask_files(layout: dict, ids) -> list[Path]:
    masks = layout["masks"]
    return [m[i] for m in (masks if isinstance(masks, list) else [masks]) for i in ids]


def _make_split(images, masks, ids, n_classes) -> Split:
    if n_classes == 2:
        return Split(images, masks, list(ids))
    return ClassSplit(images, masks, list(ids), n_classes)


def load_folder(source, split: str = "validation", size: int = 96, *, progress: bool = True,
                val_fraction: float = 0.2, seed: int = 41, ids=None, num_classes: int | None = None,
                cache: bool = True):
    """One split of a folder dataset (module doc): a ``pipeline.Split`` (binary: soft masks) or a
    :class:`ClassSplit` (class indices), images ``size x size`` uint8 BGR.

    Args:
      source: the folder (``images/`` + ``masks/``).
      split: ``"all"``, ``"train"`` or ``"validation"`` (``"val"``); ignored when ``ids`` is given.
      size: image side after the resize.
      val_fraction, seed: the seeded split (defaults: UNET-ZOO's rule).
      ids: an explicit id list, or a text file with one id per line.
      num_classes: force the class count of an indexed dataset (e.g. when the largest class
        never occurs); None infers it.
      cache: read/write the preprocessed arrays in the cache (``$UNETPP_JAX_CACHE``).
    """
    folder = _check_source(source, size)
    layout = scan_folder(folder)
    files = list(layout["images"].values()) + _mask_files(layout, sorted(layout["images"]))
    settings = {"size": int(size), "layout": layout["layout"], "classes": layout["classes"],
                "num_classes": num_classes, "root": str(folder.absolute())}
    key = _cache.cache_key("folder", settings, _cache.file_signature(sorted(files)))
    entry = _cache.load("folder", key) if cache else None
    if entry is not None:
        images, masks_arr = entry["images"], entry["masks"]
        all_ids, n_classes = [str(i) for i in entry["ids"]], int(entry["num_classes"])
    else:
        images, masks_arr, all_ids, n_classes = _preprocess(layout, int(size), num_classes, progress)
        if cache:
            _cache.save("folder", key, {"images": images, "masks": masks_arr,
                                        "ids": np.array(all_ids), "num_classes": np.int64(n_classes)})
    chosen = select_ids(all_ids, split, val_fraction=val_fraction, seed=seed, ids=ids,
                        where=str(folder))
    index = {image_id: i for i, image_id in enumerate(all_ids)}
    idx = np.array([index[i] for i in chosen], np.int64)
    return _make_split(images[idx], masks_arr[idx], chosen, n_classes)


class FolderReader:
    """A folder dataset's split read in parts (``data.sharding.SplitReader``).

    The ids come from the file listing (nothing decoded). ``read(start, stop)`` of the whole
    split is :func:`load_folder` (the whole folder preprocessed once and cached, the binary/class
    decision taken over every mask). A part reads and preprocesses only its own files (cached per
    part) and decides binary or C classes from its own masks -- or from ``num_classes``, which
    multi-process training passes (the model's class count), so every process decides alike.
    """

    def __init__(self, source, split: str = "validation", size: int = 96, *, progress: bool = True,
                 val_fraction: float = 0.2, seed: int = 41, ids=None,
                 num_classes: int | None = None, cache: bool = True):
        self.folder = _check_source(source, size)
        self.layout = scan_folder(self.folder)
        self.ids = select_ids(sorted(self.layout["images"]), split, val_fraction=val_fraction,
                              seed=seed, ids=ids, where=str(self.folder))
        self._whole = dict(source=source, split=split, size=size, progress=progress,
                           val_fraction=val_fraction, seed=seed, ids=ids,
                           num_classes=num_classes, cache=cache)
        self.size, self.num_classes, self.cache, self.progress = (int(size), num_classes, cache,
                                                                  progress)

    def __len__(self) -> int:
        return len(self.ids)

    def read(self, start: int, stop: int):
        from unetpp_jax.data.sharding import check_range

        check_range(len(self.ids), start, stop)
        if (start, stop) == (0, len(self.ids)):
            return load_folder(**self._whole)
        if start == stop:
            raise ValueError(f"{self.folder}: an empty part [{start}, {stop}) has no masks to "
                             "decide binary or classes from")
        part = self.ids[start:stop]
        files = ([self.layout["images"][i] for i in part] + _mask_files(self.layout, part))
        settings = {"size": self.size, "layout": self.layout["layout"],
                    "classes": self.layout["classes"], "num_classes": self.num_classes,
                    "root": str(self.folder.absolute()), "ids": part}
        key = _cache.cache_key("folder-part", settings, _cache.file_signature(files))
        entry = _cache.load("folder-part", key) if self.cache else None
        if entry is not None:
            return _make_split(entry["images"], entry["masks"], part, int(entry["num_classes"]))
        images, masks, _, n_classes = _preprocess(self.layout, self.size, self.num_classes,
                                                  self.progress, ids=part)
        if self.cache:
            _cache.save("folder-part", key, {"images": images, "masks": masks,
                                             "ids": np.array(part),
                                             "num_classes": np.int64(n_classes)})
        return _make_split(images, masks, part, n_classes)


def open_folder(source, split: str = "validation", size: int = 96, **options) -> FolderReader:
    """:func:`load_folder`'s split as a :class:`FolderReader` (same options)."""
    return FolderReader(source, split, size, **options)
