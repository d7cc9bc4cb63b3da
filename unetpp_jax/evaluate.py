"""Run a model over a split and score every head with the table's metric.

Shared by training (validation each epoch) and ``experiments.eval`` (the table), so the number a
training log reports and the number the evaluation prints are computed by the same code.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tqdm.auto import tqdm

from unetpp_jax import metrics
from unetpp_jax.data.pipeline import Split, normalize
from unetpp_jax.model import DEPTH, predict_fn


def predict_split(model, variables, images_uint8: np.ndarray, *, batch_size: int = 16,
                  prune_level: int = DEPTH, progress: bool = False, desc: str = "predict") -> np.ndarray:
    """Probabilities of every head for uint8 BGR images: ``(heads, N, H, W)`` float32.

    The last batch is padded to ``batch_size`` (and the padding dropped), so the whole split
    runs through one compiled program.
    """
    f = predict_fn(model, prune_level)
    n = len(images_uint8)
    out = []
    for start in tqdm(range(0, n, batch_size), desc=desc, disable=not progress, leave=False):
        chunk = images_uint8[start:start + batch_size]
        pad = batch_size - len(chunk)
        if pad:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
        probs = f(variables, normalize(chunk))
        heads = probs if isinstance(probs, tuple) else (probs,)
        out.append(np.stack([np.asarray(h)[: batch_size - pad, ..., 0] for h in heads]))
    return np.concatenate(out, axis=1)


@dataclass
class HeadScores:
    """Per-head scores in percent (like the table); ``miou`` is the last (deepest) head's."""

    miou_per_head: list[float]
    dice_per_head: list[float]

    @property
    def miou(self) -> float:
        return self.miou_per_head[-1]

    @property
    def dice(self) -> float:
        return self.dice_per_head[-1]


def score_heads(probs: np.ndarray, masks_uint8: np.ndarray) -> HeadScores:
    """Table MIoU and Dice (x100) of each head of ``probs`` ``(heads, N, H, W)``."""
    return HeadScores(
        [100.0 * float(metrics.miou_foreground(p, masks_uint8)) for p in probs],
        [100.0 * float(metrics.dice_foreground(p, masks_uint8)) for p in probs],
    )


def evaluate_split(model, variables, split: Split, *, batch_size: int = 16,
                   prune_level: int = DEPTH, progress: bool = False) -> HeadScores:
    """Predict ``split`` and score every head."""
    probs = predict_split(model, variables, split.images, batch_size=batch_size,
                          prune_level=prune_level, progress=progress)
    return score_heads(probs, split.masks)

