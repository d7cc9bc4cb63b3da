"""Class metrics of a model on a split: the hook evaluation (``experiments/eval.py``) calls.

    from unetpp_jax.evaluate_classes import evaluate_classes
    extra = evaluate_classes(model, variables, split, head=head, input_spec=spec,
                             precision="fp32", calibration=None)
    payload.update(extra)      # "class_iou", "miou_classes", "pixel_accuracy" (fractions)

For a multi-class model (``num_classes`` C > 1, softmax) on a ``data.classes.ClassSplit``: argmax
per pixel against the class-index masks. For a one-class model on a binary split: two classes,
prediction ``p >= 0.5``, ground truth ``mask >= 125`` (the table's thresholds) -- extra numbers
beside the card's per-image foreground MIoU, which stays the headline. The metrics are
``metrics.class_metrics``: one confusion matrix pooled over all pixels of all images, fractions
(x100 in printed reports).
"""

from __future__ import annotations

import numpy as np

from unetpp_jax import metrics
from unetpp_jax.data.normalization import InputSpec

__all__ = ["evaluate_classes", "format_classes", "split_labels"]


def split_labels(split, model_classes: int) -> tuple[np.ndarray, int]:
    """``(labels (N, H, W), C)``: the split's class indices, or for a binary split its masks
    thresholded at ``metrics.GT_THRESHOLD`` (C = 2)."""
    n = getattr(split, "num_classes", None)
    if n is not None:
        if model_classes != n:
            raise ValueError(f"the model predicts {model_classes} classes, the data has {n}")
        return split.masks, n
    if model_classes != 1:
        raise ValueError(f"the model predicts {model_classes} classes but the data is binary")
    return (split.masks >= metrics.GT_THRESHOLD).astype(np.uint8), 2


def evaluate_classes(model, variables, split, *, head: int | None = None,
                     input_spec: InputSpec | None = None, precision: str = "fp32",
                     calibration=None, batch_size: int = 16, probs=None) -> dict:
    """``{"class_iou": [...], "miou_classes": m, "pixel_accuracy": a, "confusion": [[...]],
    "num_classes": C}`` (fractions). ``probs``: already computed probabilities of the scored head
    at the split's size, ``(N, H, W)`` (one class) or ``(N, H, W, C)``, to skip the prediction."""
    labels, n_classes = split_labels(split, model.num_classes)
    if probs is None:
        from unetpp_jax.predict import Predictor

        pred = Predictor(model, variables, input_spec=input_spec, size=split.images.shape[1:3],
                         head=head, precision=precision, calibration=calibration,
                         batch_size=batch_size)
        probs = pred.run(split.images)
    probs = np.asarray(probs)
    if model.num_classes == 1:
        p = probs[..., 0] if probs.ndim == 4 else probs
        predicted = (p >= metrics.PRED_THRESHOLD).astype(np.uint8)
    else:
        predicted = np.argmax(probs, axis=-1)
    out = metrics.class_metrics(predicted, labels, n_classes)
    out["num_classes"] = n_classes
    return out


def format_classes(result: dict, names=None) -> str:
    """One line for a report, x100: ``mIoU(classes) 71.234, pixel acc 95.100, IoU bg 97.1 ...``."""
    names = names or [f"class {k}" for k in range(len(result["class_iou"]))]
    parts = [f"{n} {'-' if v is None else f'{100 * v:.2f}'}"
             for n, v in zip(names, result["class_iou"])]
    return (f"mIoU(classes) {100 * result['miou_classes']:.3f}, pixel accuracy "
            f"{100 * result['pixel_accuracy']:.3f}; IoU: " + ", ".join(parts))
