"""Data: raw images -> preprocessing and split -> in-memory splits -> normalised batches.

Datasets are registered in :mod:`unetpp_jax.data.registry` (``load_dataset``); DSB2018 is
the default. Importing this package does not import tensorflow_datasets; the TFDS builder lives
in :mod:`unetpp_jax.data.dsb2018` (imported on use).
"""

from unetpp_jax.data.pipeline import (
    Split,
    augment_examples,
    batches,
    bundled_path,
    epoch_order,
    load_folder_split,
    load_split,
    load_tfds_split,
    normalize,
    num_batches,
    write_bundle,
    write_folder,
)
from unetpp_jax.data.preprocess import (
    PreprocessError,
    Stage1Train,
    preprocess_example,
    resize_linear,
    resize_linear_uint8,
)
from unetpp_jax.data.normalization import IMAGENET_RGB_INPUT, UNETZOO_INPUT, InputSpec
from unetpp_jax.data.registry import DATASETS, get_dataset, load_dataset, open_dataset
from unetpp_jax.data.split import FIRST_VAL_ID_PREFIX, split_ids

__all__ = [
    "DATASETS",
    "IMAGENET_RGB_INPUT",
    "InputSpec",
    "UNETZOO_INPUT",
    "get_dataset",
    "load_dataset",
    "open_dataset",
    "FIRST_VAL_ID_PREFIX",
    "PreprocessError",
    "Split",
    "Stage1Train",
    "augment_examples",
    "batches",
    "build_tfds",
    "bundled_path",
    "epoch_order",
    "load_folder_split",
    "load_split",
    "load_tfds_split",
    "normalize",
    "num_batches",
    "preprocess_example",
    "resize_linear",
    "resize_linear_uint8",
    "split_ids",
    "write_bundle",
    "write_folder",
]


def build_tfds(source, data_dir, size: int = 96, *, overwrite: bool = False):
    """Build the TFDS dataset ``dsb2018/<size>`` (see :func:`unetpp_jax.data.dsb2018.build`)."""
    from unetpp_jax.data.dsb2018 import build

    return build(source, data_dir, size, overwrite=overwrite)
