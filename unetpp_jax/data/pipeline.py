"""DSB2018 splits in memory and the batches that training and evaluation consume.

``load_split`` gives a :class:`Split` (uint8 BGR images, uint8 soft masks, ids, in the UNET-ZOO
split order) from any of: the bundled 96x96 validation split (the default), a raw
``stage1_train`` folder or zip, a preprocessed folder in the pytorch-nested-unet / UNET-ZOO
layout, or a built TFDS ``dsb2018`` dataset. The whole dataset is 670 images; at 96x96 that is
25 MB of uint8 (175 MB at 256), so a split is held in memory and batched with numpy.

``batches`` turns a split into float32 NHWC batches, ``(x/255 - 0.5)/0.5`` in BGR order as
UNET-ZOO feeds its model, with a per-epoch shuffle and augmentation that are pure
functions of ``(seed, epoch)``, so a resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.resources
import os
import shutil
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from unetpp_jax.data.preprocess import (
    PreprocessError,
    Stage1Train,
    encode_png,
    image_bgr_from_png,
    mask_from_png,
)
from unetpp_jax.data.split import split_ids

__all__ = [
    "BUNDLED_SIZE",
    "SPLITS",
    "Split",
    "augment_examples",
    "batches",
    "bundled_path",
    "epoch_order",
    "load_folder_split",
    "load_split",
    "load_tfds_split",
    "open_folder_split",
    "open_split",
    "open_tfds_split",
    "normalize",
    "num_batches",
    "write_bundle",
    "write_folder",
]

SPLITS = ("train", "validation")
BUNDLED_SIZE = 96
_BUNDLE_DIR = "dsb2018_96_val"
_MANIFEST = "manifest.tsv"


@dataclasses.dataclass(frozen=True, eq=False)
class Split:
    """One split in memory, in split order.

    Attributes:
      images: ``(N, S, S, 3)`` uint8, **BGR** (what ``cv2.imread`` gives, what UNET-ZOO feeds).
      masks: ``(N, S, S)`` uint8 soft masks (``255 *`` resized mask union, truncated).
      ids: the N stage1_train image ids.
    """

    images: np.ndarray
    masks: np.ndarray
    ids: list[str]

    def __post_init__(self):
        n = len(self.ids)
        if self.images.dtype != np.uint8 or self.images.ndim != 4 or self.images.shape[-1] != 3:
            raise ValueError(f"images must be uint8 (N, S, S, 3), got {self.images.dtype} {self.images.shape}")
        if self.masks.dtype != np.uint8 or self.masks.shape != self.images.shape[:3]:
            raise ValueError(f"masks must be uint8 {self.images.shape[:3]}, got {self.masks.dtype} {self.masks.shape}")
        if self.images.shape[0] != n:
            raise ValueError(f"{self.images.shape[0]} images but {n} ids")

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def size(self) -> int:
        """Image side S."""
        return self.images.shape[1]

    def take(self, indices) -> Split:
        """The examples at ``indices``, in that order."""
        indices = np.asarray(indices, dtype=np.int64)
        return Split(self.images[indices], self.masks[indices], [self.ids[i] for i in indices])


def _stack(examples, ids) -> Split:
    images = np.stack([e[0] for e in examples]) if examples else np.zeros((0, 0, 0, 3), np.uint8)
    masks = np.stack([e[1] for e in examples]) if examples else np.zeros((0, 0, 0), np.uint8)
    return Split(images, masks, list(ids))


def _check_split_name(split: str) -> str:
    if split == "val":
        split = "validation"
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return split


# ---------------------------------------------------------------------------------------------
# Sources


def bundled_path() -> Path:
    """Folder of the bundled 96x96 validation split (pytorch-nested-unet layout)."""
    return Path(str(importlib.resources.files("unetpp_jax") / "assets" / _BUNDLE_DIR))


def _bundled_val_ids() -> list[str]:
    """The 134 reference validation ids, in split order, from the bundle's manifest."""
    manifest = bundled_path() / _MANIFEST
    if not manifest.is_file():
        raise FileNotFoundError(f"{manifest}: missing; the bundled split was not generated "
                                "(python -m experiments.build_data --bundle --source .../stage1_train)")
    return [line.split("\t")[0] for line in manifest.read_text().splitlines()[1:] if line.strip()]


def load_split(source=None, split: str = "validation", size: int = 96, *, progress: bool = True) -> Split:
    """Load one split of DSB2018 as a :class:`Split`, in UNET-ZOO's split order.

    Args:
      source: where the data is:

        * ``None``: the bundled 96x96 validation split (134 images) shipped in the package;
        * a raw ``stage1_train`` folder or ``stage1_train.zip`` (or a folder holding either):
          preprocessed on the fly (a few seconds for the validation split at 96);
        * a preprocessed folder in the pytorch-nested-unet / UNET-ZOO layout (``images/<id>.png``
          with ``masks/<id>.png`` or ``masks/0/<id>.png``): the split rule is applied to its ids;
          a folder holding exactly the 134 validation ids is the validation split;
        * a TFDS data_dir in which ``dsb2018/<size>`` is built (see :func:`load_tfds_split`).
      split: ``"train"`` or ``"validation"`` (``"val"`` is accepted).
      size: image side; must match what a preprocessed source holds.
      progress: show a tqdm bar while preprocessing raw data.
    """
    reader = open_split(source, split, size, progress=progress)
    return reader.read(0, len(reader))


def open_split(source=None, split: str = "validation", size: int = 96, *, progress: bool = True):
    """The split of :func:`load_split` as a reader (``data.sharding.SplitReader``): its length
    and ids come from file names or the TFDS metadata; ``read(start, stop)`` reads, decodes and
    preprocesses only those examples (what each process of a multi-host training does)."""
    split = _check_split_name(split)
    if source is None:
        if size != BUNDLED_SIZE:
            raise ValueError(f"the bundled split is {BUNDLED_SIZE}x{BUNDLED_SIZE}; for size={size} pass "
                             "source= a raw stage1_train folder/zip or a built TFDS data_dir")
        if split != "validation":
            raise ValueError("the bundled data is the validation split only; for 'train' pass source= "
                             "the raw stage1_train folder/zip or a built TFDS data_dir")
        return open_folder_split(bundled_path(), split, size)
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder; pass a stage1_train folder or zip, a "
                                "preprocessed images/+masks/ folder, or a TFDS data_dir (see the README, section Data)")
    if path.is_dir() and (path / "images").is_dir():
        return open_folder_split(path, split, size)
    if path.is_dir() and (path / "dsb2018" / str(size)).is_dir():
        return open_tfds_split(path, split, size)
    with Stage1Train(path) as raw:
        train, val = split_ids(raw.ids)
    return _IdReader(val if split == "validation" else train,
                     functools.partial(_preprocess_ids, path, size, split, progress))


@dataclasses.dataclass(frozen=True)
class _IdReader:
    """A split known by its ids; ``read`` hands the ids of ``[start, stop)`` to ``fetch``, which
    returns their ``(image, mask)`` examples."""

    ids: list[str]
    fetch: Callable[[list[str]], list]

    def __len__(self) -> int:
        return len(self.ids)

    def read(self, start: int, stop: int) -> Split:
        from unetpp_jax.data.sharding import check_range

        check_range(len(self.ids), start, stop)
        ids = self.ids[start:stop]
        return _stack(self.fetch(ids), ids)


def _preprocess_ids(path, size: int, split: str, progress: bool, ids: list[str]) -> list:
    with Stage1Train(path) as raw:
        it = ids
        if progress:
            from tqdm.auto import tqdm

            it = tqdm(ids, desc=f"preprocessing {split} at {size}px", unit="img")
        return [raw.preprocess(i, size) for i in it]


def load_folder_split(folder, split: str = "validation", size: int = 96) -> Split:
    """Read a preprocessed pytorch-nested-unet / UNET-ZOO folder.

    Layout: ``images/<id>.png`` (true-colour PNG, as ``cv2.imwrite`` writes it; returned as BGR)
    and ``masks/<id>.png`` (older layout) or ``masks/0/<id>.png`` (newer). If the ids are exactly
    the 134 reference validation ids, the folder *is* the validation split (in reference order);
    otherwise the split rule is applied to its ids (with a warning unless there are 670 of them).
    """
    reader = open_folder_split(folder, split, size)
    return reader.read(0, len(reader))


def open_folder_split(folder, split: str = "validation", size: int = 96):
    """:func:`load_folder_split` as a reader: ids from the file names, PNGs decoded on ``read``."""
    split = _check_split_name(split)
    folder = Path(folder)
    image_dir = folder / "images"
    if not image_dir.is_dir():
        raise PreprocessError(f"{image_dir}: missing; expected a preprocessed folder with images/<id>.png "
                              "and masks/0/<id>.png")
    mask_dir = folder / "masks" / "0"
    if not mask_dir.is_dir():
        mask_dir = folder / "masks"
    if not mask_dir.is_dir():
        raise PreprocessError(f"{folder / 'masks'}: missing; every images/<id>.png needs masks/0/<id>.png "
                              "(or masks/<id>.png)")
    all_ids = sorted(p.stem for p in image_dir.glob("*.png"))
    if not all_ids:
        raise PreprocessError(f"{image_dir}: holds no .png images; the folder is empty or not preprocessed")
    ids = _folder_split_ids(folder, all_ids, split)
    return _IdReader(ids, functools.partial(_read_folder_examples, image_dir, mask_dir, size))


def _read_folder_examples(image_dir: Path, mask_dir: Path, size: int, ids: list[str]) -> list:
    examples = []
    for image_id in ids:
        image_path, mask_path = image_dir / f"{image_id}.png", mask_dir / f"{image_id}.png"
        if not mask_path.is_file():
            raise PreprocessError(f"{mask_path}: missing; the image {image_path} has no mask")
        image = image_bgr_from_png(image_path.read_bytes(), name=str(image_path))
        mask = mask_from_png(mask_path.read_bytes(), name=str(mask_path))
        if image.shape[:2] != (size, size) or mask.shape != (size, size):
            raise PreprocessError(f"{image_path}: image {image.shape[1]}x{image.shape[0]}, mask "
                                  f"{mask.shape[1]}x{mask.shape[0]}, but size={size} was asked; pass the "
                                  "folder's own size or preprocess the raw data at this size")
        examples.append((image, mask))
    return examples


def _folder_split_ids(folder: Path, all_ids: list[str], split: str) -> list[str]:
    try:
        reference_val = _bundled_val_ids()
    except FileNotFoundError:
        reference_val = None
    if reference_val is not None and set(all_ids) == set(reference_val):
        if split != "validation":
            raise ValueError(f"{folder}: holds only the {len(all_ids)} validation images; there is no "
                             "'train' split in it (pass the full stage1_train or a 670-image folder)")
        return reference_val
    if len(all_ids) != 670:
        warnings.warn(f"{folder}: holds {len(all_ids)} images, not the 670 of stage1_train; the split rule "
                      "on these ids does not give the reference split", stacklevel=4)
    train, val = split_ids(all_ids)
    return val if split == "validation" else train


def load_tfds_split(data_dir, split: str = "validation", size: int = 96) -> Split:
    """Read a split of the built TFDS dataset ``dsb2018/<size>`` from ``data_dir``, no TensorFlow.

    The records hold RGB PNGs; they are returned as BGR, like every other source.
    """
    reader = open_tfds_split(data_dir, split, size)
    return reader.read(0, len(reader))


@dataclasses.dataclass(frozen=True)
class _TfdsReader:
    """A built ``dsb2018/<size>`` split through ``tfds.data_source`` (array_record, random
    access): ``read`` fetches only the records asked for."""

    source: object
    size: int

    def __len__(self) -> int:
        return len(self.source)

    def read(self, start: int, stop: int) -> Split:
        from unetpp_jax.data.sharding import check_range

        check_range(len(self), start, stop)
        s = self.size
        records = self.source.__getitems__(list(range(start, stop))) if stop > start else []
        if not records:
            return Split(np.zeros((0, s, s, 3), np.uint8), np.zeros((0, s, s), np.uint8), [])
        images = np.stack([r["image"][..., ::-1] for r in records])
        masks = np.stack([r["mask"][..., 0] for r in records])
        ids = [r["id"].decode() if isinstance(r["id"], bytes) else str(r["id"]) for r in records]
        return Split(np.ascontiguousarray(images), masks, ids)


def open_tfds_split(data_dir, split: str = "validation", size: int = 96) -> _TfdsReader:
    """:func:`load_tfds_split` as a reader (records fetched by index on ``read``)."""
    split = _check_split_name(split)
    from unetpp_jax.data.dsb2018 import Dsb2018

    builder = Dsb2018(config=str(size), data_dir=os.fspath(data_dir))
    if not builder.is_prepared():
        raise FileNotFoundError(
            f"{data_dir}: dsb2018/{size} is not built there; build it with "
            f"python -m experiments.build_data --source path/to/stage1_train.zip --data-dir {data_dir} "
            f"--size {size}")
    return _TfdsReader(builder.as_data_source(split=split), size)


# ---------------------------------------------------------------------------------------------
# Writing preprocessed folders


def write_folder(split: Split, folder, *, compress_level: int = 9) -> list[tuple[str, str, str]]:
    """Write ``split`` in the pytorch-nested-unet layout: ``images/<id>.png``, ``masks/0/<id>.png``.

    Images are written as true-colour PNGs (BGR swapped to RGB, as ``cv2.imwrite`` does), so both
    ``cv2.imread`` and :func:`load_folder_split` give back the same BGR array. Also writes
    ``manifest.tsv`` (id, sha256 of the image PNG, sha256 of the mask PNG, in split order).
    The folder is written next to its destination and renamed into place at the end.
    Returns the manifest rows.
    """
    folder = Path(folder)
    if folder.exists():
        raise FileExistsError(f"{folder}: already exists; remove it first")
    tmp = folder.with_name(f".incomplete.{folder.name}")
    if tmp.exists():
        shutil.rmtree(tmp)
    (tmp / "images").mkdir(parents=True)
    (tmp / "masks" / "0").mkdir(parents=True)
    rows = []
    try:
        for image, mask, image_id in zip(split.images, split.masks, split.ids):
            image_png = encode_png(image, bgr=True, compress_level=compress_level)
            mask_png = encode_png(mask, compress_level=compress_level)
            (tmp / "images" / f"{image_id}.png").write_bytes(image_png)
            (tmp / "masks" / "0" / f"{image_id}.png").write_bytes(mask_png)
            rows.append((image_id, hashlib.sha256(image_png).hexdigest(), hashlib.sha256(mask_png).hexdigest()))
        lines = ["id\timage_png_sha256\tmask_png_sha256"] + ["\t".join(r) for r in rows]
        (tmp / _MANIFEST).write_text("\n".join(lines) + "\n")
        tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return rows


_PROVENANCE = """\
# Bundled DSB2018 validation split, 96x96

The 134 validation images of the UNET-ZOO split of DSB2018 stage1_train, preprocessed at 96x96
exactly as pytorch-nested-unet / UNET-ZOO do (docs/data.md), so that evaluation works without
downloading anything. Read it with `unetpp_jax.data.pipeline.load_split()`.

- Source: 2018 Data Science Bowl `stage1_train` (Kaggle `data-science-bowl-2018`) = BBBC038v1,
  https://bbbc.broadinstitute.org/BBBC038. License: CC0 (public domain). Please cite
  Caicedo et al., "Nucleus segmentation across imaging experiments: the 2018 Data Science Bowl",
  Nature Methods 16, 1247-1253 (2019).
- Made by: `{command}`
  (`unetpp_jax.data.pipeline.write_bundle`), from the {n_raw} raw images of stage1_train.
- Layout (pytorch-nested-unet): `images/<id>.png` and `masks/0/<id>.png`. Images are ordinary
  true-colour PNGs (written as `cv2.imwrite` writes a BGR array): `cv2.imread` and the project's
  reader both return the BGR array the model is fed. Masks are soft masks, uint8
  `(resized mask union * 255)` truncated.
- Order: `manifest.tsv` lists the ids in split order (the first is `{first_short}...`) with the
  sha256 of each PNG file (the bytes depend on the Pillow/zlib version, the pixels do not).
  sha256 of `manifest.tsv`: `{manifest_sha256}`.
"""


def write_bundle(source, folder=None, *, command: str = "python -m experiments.build_data --bundle") -> Path:
    """Preprocess the validation split at 96x96 from a raw stage1_train and write the bundle folder.

    Writes ``images/``, ``masks/0/``, ``manifest.tsv`` and ``PROVENANCE.md`` into ``folder``
    (default: the package's ``assets/dsb2018_96_val``, replaced if present). Returns the folder.
    """
    folder = Path(folder) if folder is not None else bundled_path()
    with Stage1Train(source) as raw:
        n_raw = len(raw)
    split = load_split(source, "validation", BUNDLED_SIZE, progress=True)
    staging = folder.with_name(folder.name + ".new")
    if staging.exists():
        shutil.rmtree(staging)
    write_folder(split, staging)
    manifest_sha = hashlib.sha256((staging / _MANIFEST).read_bytes()).hexdigest()
    (staging / "PROVENANCE.md").write_text(_PROVENANCE.format(
        command=command, n_raw=n_raw, first_short=split.ids[0][:12], manifest_sha256=manifest_sha))
    if folder.exists():
        shutil.rmtree(folder)
    staging.rename(folder)
    return folder


# ---------------------------------------------------------------------------------------------
# Batches


def normalize(images_uint8_bgr) -> np.ndarray:
    """uint8 BGR images -> float32 in [-1, 1]: ``(x / 255 - 0.5) / 0.5``, UNET-ZOO's input
    (``normalization.UNETZOO_INPUT``; other models: their checkpoint's ``InputSpec``)."""
    from unetpp_jax.data.normalization import UNETZOO_INPUT

    return UNETZOO_INPUT.normalize(images_uint8_bgr)


def _epoch_rng(seed: int, epoch: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(epoch), stream])


def epoch_order(n: int, *, seed: int = 0, epoch: int = 0, shuffle: bool = True) -> np.ndarray:
    """Example order of one epoch: a permutation fixed by ``(seed, epoch)``, or ``arange(n)``."""
    if not shuffle:
        return np.arange(n)
    return _epoch_rng(seed, epoch, 0).permutation(n)


def augment_examples(images: np.ndarray, masks: np.ndarray, transforms: np.ndarray):
    """Apply one of the 8 square symmetries per example, the same to image and mask.

    ``transforms[i]`` in 0..7: ``k = t % 4`` quarter turns (``np.rot90`` over H, W), then a
    left-right flip if ``t >= 4``. The 8 values are the dihedral group: all flips and rot90s.
    """
    images, masks = images.copy(), masks.copy()
    for i, t in enumerate(transforms):
        img, msk = np.rot90(images[i], t % 4, axes=(0, 1)), np.rot90(masks[i], t % 4, axes=(0, 1))
        if t >= 4:
            img, msk = img[:, ::-1], msk[:, ::-1]
        images[i], masks[i] = img, msk
    return images, masks


def batches(split: Split, batch_size: int, *, seed: int = 0, epoch: int = 0, shuffle: bool = True,
            augment: bool = False, drop_remainder: bool = True) -> Iterator[dict[str, np.ndarray]]:
    """Batches of one epoch: ``{"image": (B, S, S, 3) float32, "mask": (B, S, S, 1) float32}``.

    ``image`` is :func:`normalize`-d BGR; ``mask`` is the soft mask ``/ 255`` in [0, 1] (the BCE
    target UNET-ZOO uses). ``shuffle=True`` draws the order from ``(seed, epoch)``; ``shuffle=False``
    keeps the split order (UNET-ZOO's unshuffled training). ``augment=True`` applies a random flip /
    rot90 per example (:func:`augment_examples`), also fixed by ``(seed, epoch)`` and independent of
    the shuffle. ``drop_remainder=False`` yields a last, smaller batch.
    """
    for images, masks in epoch_examples(split, batch_size, seed=seed, epoch=epoch,
                                        shuffle=shuffle, augment=augment,
                                        drop_remainder=drop_remainder):
        yield {
            "image": normalize(images),
            "mask": (masks.astype(np.float32) / np.float32(255))[..., None],
        }


def epoch_examples(split: Split, batch_size: int, *, seed: int = 0, epoch: int = 0,
                   shuffle: bool = True, augment: bool = False, drop_remainder: bool = True
                   ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The uint8 ``(images, masks)`` of each batch of one epoch, in the order and with the
    flips/rot90 that ``(seed, epoch)`` fix (what :func:`batches` normalises)."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    n = len(split)
    order = epoch_order(n, seed=seed, epoch=epoch, shuffle=shuffle)
    transforms = _epoch_rng(seed, epoch, 1).integers(0, 8, size=n) if augment else None
    stop = n - n % batch_size if drop_remainder else n
    for start in range(0, stop, batch_size):
        idx = order[start:start + batch_size]
        images, masks = split.images[idx], split.masks[idx]
        if transforms is not None:
            images, masks = augment_examples(images, masks, transforms[start:start + batch_size])
        yield images, masks


def num_batches(n: int, batch_size: int, *, drop_remainder: bool = True) -> int:
    """How many batches :func:`batches` yields for ``n`` examples."""
    return n // batch_size if drop_remainder else -(-n // batch_size)
