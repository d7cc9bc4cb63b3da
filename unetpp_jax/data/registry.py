"""Datasets: one entry per dataset in :data:`DATASETS`, so a new dataset is one file and a line.

A dataset is a :class:`Dataset`: ``load(source, split, size, progress=...)`` returns a
``pipeline.Split`` (uint8 images in BGR order, uint8 masks, ids), and ``recognizes(path)`` says
whether a source on disk looks like it, so ``--data PATH`` works without naming the dataset.
Evaluation, training and calibration all read data through :func:`load_dataset`.
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


def _is_dsb2018(path: Path) -> bool:
    if path.is_file():
        return path.suffix == ".zip"
    return path.is_dir()  # raw stage1_train, preprocessed images/+masks/, or a TFDS data_dir


def _load_folder(source, split="validation", size=96, *, progress=True, **options):
    from unetpp_jax.data.folder import load_folder

    return load_folder(source, split, size, progress=progress, **options)


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
        _load_folder, _is_folder),
    "dsb2018-3class": Dataset(
        "dsb2018-3class", "DSB2018 stage1_train (raw folder or zip) as background / nucleus "
        "interior / nucleus boundary (data/dsb2018_classes.py); by name only",
        _load_dsb2018_classes, lambda path: False),
    "dsb2018": Dataset(
        "dsb2018", "DSB2018 stage1_train (raw folder or zip, preprocessed folder, TFDS build; "
        "bundled 96x96 validation split by default), UNET-ZOO's split",
        pipeline.load_split, _is_dsb2018),
}
DEFAULT_DATASET = "dsb2018"


def get_dataset(name: str) -> Dataset:
    try:
        return DATASETS[name]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; registered: {sorted(DATASETS)}") from None


def load_dataset(source=None, split: str = "validation", size: int = 96, *,
                 dataset: str | None = None, progress: bool = True, **options) -> "pipeline.Split":
    """One split of ``dataset`` (by name), or of the first registered dataset that recognizes
    ``source`` (the default dataset's bundled data when ``source`` is None). ``options`` go to
    the dataset's loader (folder: ``val_fraction``, ``seed``, ``ids``, ``num_classes``,
    ``cache``; dsb2018-3class: ``band``, ``cache``)."""
    if dataset is None:
        dataset = DEFAULT_DATASET
        if source is not None:
            path = Path(source).expanduser()
            found = [d for d in DATASETS.values() if path.exists() and d.recognizes(path)]
            dataset = found[0].name if found else DEFAULT_DATASET
    return get_dataset(dataset).load(source, split, size, progress=progress, **options)
