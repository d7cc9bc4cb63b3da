"""TFDS builder ``dsb2018``: DSB2018 stage1_train, UNET-ZOO preprocessing and split.

Configs ``dsb2018/96`` (the reference table's size) and ``dsb2018/256`` (UNET-ZOO's default).
It builds and reads **without TensorFlow**: records are written as ``array_record`` files and
read through ``tfds.data_source`` / ``builder.as_data_source()``; the ``Image`` features are fed
PNG bytes made with Pillow, never numpy arrays (encoding arrays would need TensorFlow).

Each example::

    {"image": (S, S, 3) uint8, true-colour RGB PNG (the pipeline flips it to BGR),
     "mask":  (S, S, 1) uint8 soft mask, 255 * resized union of the instance masks (truncated),
     "id":    the 64-hex stage1_train image id}

Splits ``train`` (536) and ``validation`` (134) follow :func:`unetpp_jax.data.split.split_ids`,
and records are stored in that order (shuffling is disabled), so index 0 of ``validation`` is
``337b6eed0726...`` and ``train`` is UNET-ZOO's fixed training order.

Build it with ``python -m experiments.build_data --source path/to/stage1_train.zip`` or
:func:`build`.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

import tensorflow_datasets as tfds

from unetpp_jax.data.preprocess import Stage1Train, encode_png
from unetpp_jax.data.split import split_ids

__all__ = ["SIZES", "Dsb2018", "Dsb2018Config", "build"]

SIZES = (96, 256)

_CITATION = """\
@article{caicedo2019nucleus,
  title   = {Nucleus segmentation across imaging experiments: the 2018 Data Science Bowl},
  author  = {Caicedo, Juan C. and Goodman, Allen and Karhohs, Kyle W. and Cimini, Beth A. and
             Ackerman, Jeanelle and Haghighi, Marzieh and Heng, CherKeng and Becker, Tim and
             Doan, Minh and McQuin, Claire and Rohban, Mohammad and Singh, Shantanu and
             Carpenter, Anne E.},
  journal = {Nature Methods},
  volume  = {16},
  pages   = {1247--1253},
  year    = {2019},
}
"""

_MANUAL = """\
Put the Kaggle DSB2018 `stage1_train.zip` (competition data-science-bowl-2018, or BBBC038v1
`stage1_train.zip` from https://bbbc.broadinstitute.org/BBBC038) in the manual folder, either as
the zip itself or extracted as `stage1_train/<id>/images/<id>.png` + `<id>/masks/*.png`.
"""


@dataclasses.dataclass(eq=False)
class Dsb2018Config(tfds.core.BuilderConfig):
    """One output resolution; ``name`` is the side as text ("96", "256")."""

    size: int = 96


class Dsb2018(tfds.core.GeneratorBasedBuilder):
    """DSB2018 stage1_train (BBBC038v1) preprocessed and split as UNET-ZOO does."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "OpenCV-exact INTER_LINEAR preprocessing, UNET-ZOO split."}
    BUILDER_CONFIGS = [
        Dsb2018Config(name=str(s), size=s, description=f"{s}x{s} images and soft masks") for s in SIZES
    ]
    DEFAULT_CONFIG_NAME = "96"
    MANUAL_DOWNLOAD_INSTRUCTIONS = _MANUAL

    def __init__(self, *, source=None, file_format: str | None = "array_record", **kwargs):
        """``source``: a raw stage1_train folder or zip; if None, TFDS's manual folder is used."""
        super().__init__(file_format=file_format, **kwargs)
        self._source = source

    def _info(self) -> tfds.core.DatasetInfo:
        s = self.builder_config.size
        return tfds.core.DatasetInfo(
            builder=self,
            description=("Kaggle 2018 Data Science Bowl stage1_train (= BBBC038v1, CC0): 670 nucleus "
                         "images, instance masks merged into one soft mask, resized with OpenCV "
                         "INTER_LINEAR semantics, split 536/134 as UNET-ZOO does."),
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(s, s, 3), encoding_format="png",
                                             doc="RGB; the reference feeds it to the model as BGR"),
                "mask": tfds.features.Image(shape=(s, s, 1), encoding_format="png",
                                            doc="soft mask: 255 * resized union of instance masks"),
                "id": tfds.features.Text(doc="stage1_train image id"),
            }),
            supervised_keys=("image", "mask"),
            homepage="https://bbbc.broadinstitute.org/BBBC038",
            citation=_CITATION,
            disable_shuffling=True,  # keep the split order: UNET-ZOO trains in it, unshuffled
            license="CC0 1.0 (data); see https://bbbc.broadinstitute.org/BBBC038",
        )

    def _split_generators(self, dl_manager):
        source = Stage1Train(self._source if self._source is not None else dl_manager.manual_dir)
        train, val = split_ids(source.ids)
        return {
            "train": self._generate_examples(source, train),
            "validation": self._generate_examples(source, val),
        }

    def _generate_examples(self, source: Stage1Train, ids):
        size = self.builder_config.size
        for index, image_id in enumerate(ids):
            image, mask = source.preprocess(image_id, size)
            # Integer keys + disable_shuffling: records are written sorted by key = split order.
            yield index, {"image": encode_png(image, bgr=True), "mask": encode_png(mask), "id": image_id}


def build(source, data_dir, size: int = 96, *, overwrite: bool = False) -> Dsb2018:
    """Build ``dsb2018/<size>`` into ``data_dir`` from a raw ``stage1_train`` (folder or zip).

    The raw layout is checked before anything is written; on any error (bad layout, corrupt PNG)
    nothing of the dataset is left behind in ``data_dir``. Returns the prepared builder; read it
    with ``builder.as_data_source()`` or :func:`unetpp_jax.data.pipeline.load_tfds_split`.
    """
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size}")
    Stage1Train(source).close()  # fail fast, with a clear message, before TFDS creates folders
    data_dir = Path(data_dir)
    # TFDS makes data_dir/dsb2018/... (with a .config/ beside the versions) and an unused
    # data_dir/downloads/. After a failure, whatever of these this call created is removed, so
    # nothing half-built remains; after a success only the empty downloads/ goes.
    created = [p for p in (data_dir / "dsb2018", data_dir / "downloads") if not p.exists()]
    builder = Dsb2018(config=str(size), data_dir=os.fspath(data_dir), source=source)
    if overwrite and builder.is_prepared():
        shutil.rmtree(builder.data_dir)
        builder = Dsb2018(config=str(size), data_dir=os.fspath(data_dir), source=source)
    try:
        builder.download_and_prepare()
    except BaseException:
        for path in created:
            shutil.rmtree(path, ignore_errors=True)
        _remove_empty_tree(data_dir / "dsb2018" / str(size))  # if dsb2018/ held other configs
        raise
    if data_dir / "downloads" in created:
        _remove_empty_tree(data_dir / "downloads")
    return builder


def _remove_empty_tree(path: Path) -> None:
    if not path.is_dir():
        return
    for child in path.iterdir():
        _remove_empty_tree(child)
    try:
        path.rmdir()
    except OSError:
        pass  # not empty: something else lives there, leave it
