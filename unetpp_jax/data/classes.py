"""Multi-class splits: class-index masks, their resize, and training batches of labels.

A :class:`ClassSplit` is a ``pipeline.Split`` whose ``masks`` hold a class index per pixel
(``0..num_classes-1``, 0 = background) instead of a soft foreground mask, plus ``num_classes``.
Binary datasets keep using ``pipeline.Split`` (soft masks 0..255), so evaluation and training
of one-class models are unchanged.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence

import numpy as np

from unetpp_jax.data.pipeline import Split, epoch_examples
from unetpp_jax.data.preprocess import resize_linear

__all__ = ["ClassSplit", "class_batches", "resize_labels"]


@dataclasses.dataclass(frozen=True, eq=False)
class ClassSplit(Split):
    """A split with class-index masks: ``masks[n, y, x]`` in ``0..num_classes-1``."""

    num_classes: int = 2

    def __post_init__(self):
        super().__post_init__()
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {self.num_classes}")
        if self.masks.size and int(self.masks.max()) >= self.num_classes:
            raise ValueError(f"mask labels reach {int(self.masks.max())} but num_classes is "
                             f"{self.num_classes}")

    def take(self, indices) -> ClassSplit:
        indices = np.asarray(indices, dtype=np.int64)
        return ClassSplit(self.images[indices], self.masks[indices],
                          [self.ids[i] for i in indices], self.num_classes)


def resize_labels(labels: np.ndarray, size: int | Sequence[int], num_classes: int) -> np.ndarray:
    """Resize a class-index map: each class's one-hot plane by the OpenCV-exact INTER_LINEAR
    (:func:`preprocess.resize_linear`, as the soft masks), then ``argmax`` (ties: the lower
    class). A same-size resize is an exact copy. Returns uint8."""
    labels = np.asarray(labels)
    hw = (size, size) if isinstance(size, (int, np.integer)) else tuple(int(v) for v in size)
    if labels.shape == hw:
        return labels.astype(np.uint8)
    onehot = (labels[..., None] == np.arange(num_classes)).astype(np.float64)
    return np.argmax(resize_linear(onehot, hw), axis=-1).astype(np.uint8)


def class_batches(split: ClassSplit, batch_size: int, *, seed: int = 0, epoch: int = 0,
                  shuffle: bool = True, augment: bool = False, drop_remainder: bool = True,
                  input_spec=None) -> Iterator[dict[str, np.ndarray]]:
    """``pipeline.batches`` for class masks: ``{"image": (B, S, S, 3) float32 normalised,
    "label": (B, S, S) int32}``, the same order and augmentation for the same ``(seed, epoch)``.
    ``input_spec``: the model's normalisation (default UNET-ZOO's ``(x/255 - 0.5)/0.5``, BGR)."""
    from unetpp_jax.data.normalization import UNETZOO_INPUT

    spec = input_spec or UNETZOO_INPUT
    for images, labels in epoch_examples(split, batch_size, seed=seed, epoch=epoch,
                                         shuffle=shuffle, augment=augment,
                                         drop_remainder=drop_remainder):
        yield {"image": spec.normalize(images), "label": labels.astype(np.int32)}
