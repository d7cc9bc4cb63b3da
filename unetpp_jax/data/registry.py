"""Datasets: one entry per dataset in :data:`DATASETS`, so a new dataset is one file and a line.

A dataset is a :class:`Dataset`: ``load(source, split, size, progress=...)`` returns a
``pipeline.Split`` (uint8 images in BGR order, uint8 masks, ids), and ``recognizes(path)`` says
whether a source on disk looks like it, so ``--data PATH`` works without naming the dataset.
Evaluation and calibration read data through :func:`load_dataset`. Training reads through
:func:`open_dataset`: a reader that reads only the rows asked for (``data.sharding``), so each
process of a multi-host run reads only its own part; a dataset without ``open`` is loaded whole
and sliced.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

from unetpp_jax.data import pipeline


@dataclasses.dataclass(frozen=True)
class Dataset:
    name: str
    summary: str
    load: Callable[..., "pipeline.Split"]
    recognizes: Callable[[Path], bool]
    open: Callable[..., object] | None = None  # same arguments as load -> a SplitReader


def _is_dsb2018(path: Path) -> bool:
    if path.is_file():
        return path.suffix == ".zip"
    return path.is_dir()  # raw stage1_train, preprocessed images/+masks/, or a TFDS data_dir


def _load_folder(source, split="validation", size=96, *, progress=True, **options):
    from unetpp_jax.data.folder import load_folder

    return load_folder(source, split, size, progress=progress, **options)


def _open_folder(source, split="validation", size=96, *, progress=True, **options):
    from unetpp_jax.data.folder import open_folder

    return open_folder(source, split, size, progress=progress, **options)


def _is_folder(path: Path) -> bool:
    from unetpp_jax.data.folder import recognizes

    return recognizes(path)


def _load_dsb2018_classes(source, split="validation", size=96, *, progress=True, **options):
    from unetpp_jax.data.dsb2018_classes import load_dsb2018_classes

    return load_dsb2018_classes(source, split, size, progress=progress, **options)


# Auto-detection (``load_dataset(source)``) asks the entries in this order. "folder" comes
# first but does not claim a folder whose ids are exactly DSB2018's 670 (or the bundled 134
# validation ids): that stays DSB2018's preprocessed-folder case (folder.is_dsb2018_folder).
DATASETS: dict[str, Dataset] = {
    "folder": Dataset(
        "folder", "your own images/<id>.* + masks/<id>.* (binary 0/255 or 0/1, or class "
        "indices) or masks/<class>/<id>.png; any sizes; split all/train/validation by a seeded "
        "val_fraction or an id list (data/folder.py)",
        _load_folder, _is_folder, _open_folder),
    "dsb2018-3class": Dataset(
        "dsb2018-3class", "DSB2018 stage1_train (raw folder or zip) as background / nucleus "
        "interior / nucleus boundary (data/dsb2018_classes.py); by name only",
        _load_dsb2018_classes, lambda path: False),
    "dsb2018": Dataset(
        "dsb2018", "DSB2018 stage1_train (raw folder or zip, preprocessed folder, TFDS build; "
        "bundled 96x96 validation split by default), UNET-ZOO's split",
        pipeline.load_split, _is_dsb2018, pipeline.open_split),
}
DEFAULT_DATASET = "dsb2018"


def get_dataset(name: str) -> Dataset:
    try:
        return DATASETS[name]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; registered: {sorted(DATASETS)}") from None


def resolve_dataset(source=None, dataset: str | None = None) -> str:
    """The dataset name: ``dataset`` if given, else the first registered dataset that recognizes
    ``source`` (the default dataset when ``source`` is None or nothing claims it)."""
    if dataset is not None:
        get_dataset(dataset)
        return dataset
    if source is not None:
        path = Path(source).expanduser()
        found = [d for d in DATASETS.values() if path.exists() and d.recognizes(path)]
        if found:
            return found[0].name
    return DEFAULT_DATASET


def load_dataset(source=None, split: str = "validation", size: int = 96, *,
                 dataset: str | None = None, progress: bool = True, **options) -> "pipeline.Split":
    """One split of ``dataset`` (by name), or of the first registered dataset that recognizes
    ``source`` (the default dataset's bundled data when ``source`` is None). ``options`` go to
    the dataset's loader (folder: ``val_fraction``, ``seed``, ``ids``, ``num_classes``,
    ``cache``; dsb2018-3class: ``band``, ``cache``)."""
    entry = get_dataset(resolve_dataset(source, dataset))
    return entry.load(source, split, size, progress=progress, **options)


def open_dataset(source=None, split: str = "validation", size: int = 96, *,
                 dataset: str | None = None, progress: bool = True, **options):
    """:func:`load_dataset`'s split as a ``data.sharding.SplitReader``: ``len`` without
    decoding, ``read(start, stop)`` reading only those examples (a dataset without a reader is
    loaded whole here and sliced)."""
    from unetpp_jax.data.sharding import InMemoryReader

    entry = get_dataset(resolve_dataset(source, dataset))
    if entry.open is None:
        return InMemoryReader(entry.load(source, split, size, progress=progress, **options))
    return entry.open(source, split, size, progress=progress, **options)
