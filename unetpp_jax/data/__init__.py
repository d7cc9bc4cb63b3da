"""DSB2018 data: raw stage1_train -> UNET-ZOO preprocessing and split -> in-memory splits -> batches.

Importing this package does not import tensorflow_datasets; the TFDS builder lives in
:mod:`unetpp_jax.data.dsb2018` (imported on use).
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
from unetpp_jax.data.split import FIRST_VAL_ID_PREFIX, split_ids

__all__ = [
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
