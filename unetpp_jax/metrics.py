"""The reference table's segmentation metric, and a confusion-matrix mIoU kept apart from it.

"MIoU" in the card's table is **per-image foreground IoU, averaged over the
134 validation images** (then x100 by the caller): prediction = sigmoid probability >= 0.5,
ground truth = the 96x96 uint8 soft mask >= 125, background never averaged in.

Empty-union policy (copied on purpose from pytorch-nested-unet's ``iou_score``, which UNET-ZOO's
evaluation uses): ``IoU = (|P & G| + 1e-5) / (|P | G| + 1e-5)`` and
``Dice = (2|P & G| + 1e-5) / (|P| + |G| + 1e-5)``. An image with an empty prediction *and* an
empty ground truth therefore scores 1.0; one where either is empty and the other is not scores
about 0 (1e-5 / (union + 1e-5)). The 1e-5 also moves every other score by less than 1e-5 / union,
which is far below the table's precision. (No validation mask of DSB2018 is empty, so the policy
only matters for other data and for tests.)

:func:`confusion_miou` is a different metric -- the class-mean IoU over background and
foreground from one confusion matrix of all pixels -- and gives larger numbers; report it, if at
all, under its own name.

Multi-class models (softmax over C channels) are scored by :func:`class_metrics`: one C x C
confusion matrix pooled over every pixel of every image, per-class IoU from it
(``class_iou``), their mean (``miou_classes``) and the pixel accuracy -- fractions here, x100 in
reports. For binary models these are extra numbers; the headline stays :func:`miou_foreground`.

Inputs may be numpy or jax arrays; everything is computed in numpy (float64 sums).
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "GT_THRESHOLD",
    "class_confusion_matrix",
    "class_iou",
    "class_metrics",
    "miou_classes",
    "pixel_accuracy",
    "PRED_THRESHOLD",
    "SMOOTH",
    "confusion_matrix",
    "confusion_miou",
    "dice_foreground",
    "miou_foreground",
    "per_image_dice",
    "per_image_iou",
]

PRED_THRESHOLD = 0.5
GT_THRESHOLD = 125
#: pytorch-nested-unet's smoothing term in iou_score / dice: decides the empty-union policy.
SMOOTH = 1e-5


def _binarize(probs, gt_masks, threshold: float, gt_threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """``(pred, gt)`` as (N, H*W) bool; probs (N,H,W) or (N,H,W,1), gt (N,H,W) or (N,H,W,1)."""
    p = np.asarray(probs)
    g = np.asarray(gt_masks)
    if p.ndim == 4 and p.shape[-1] == 1:
        p = p[..., 0]
    if g.ndim == 4 and g.shape[-1] == 1:
        g = g[..., 0]
    if p.ndim == 2:
        p = p[None]
    if g.ndim == 2:
        g = g[None]
    if p.ndim != 3 or p.shape != g.shape:
        raise ValueError(f"probs {np.shape(probs)} and gt masks {np.shape(gt_masks)} must both be "
                         "(N, H, W) or (N, H, W, 1) with the same N, H, W")
    pred = p >= threshold
    gt = g >= gt_threshold
    return pred.reshape(len(pred), -1), gt.reshape(len(gt), -1)


def per_image_iou(probs, gt_masks_uint8, threshold: float = PRED_THRESHOLD,
                  gt_threshold: float = GT_THRESHOLD) -> np.ndarray:
    """Foreground IoU of each image, ``(N,)`` float64 in [0, 1] (empty-union policy: module doc).

    Args:
      probs: sigmoid probabilities, (N, H, W) or (N, H, W, 1).
      gt_masks_uint8: ground-truth soft masks 0..255 (the preprocessed uint8 masks), same layout.
      threshold: prediction is foreground where ``probs >= threshold``.
      gt_threshold: ground truth is foreground where ``mask >= gt_threshold``.
    """
    pred, gt = _binarize(probs, gt_masks_uint8, threshold, gt_threshold)
    inter = np.count_nonzero(pred & gt, axis=1).astype(np.float64)
    union = np.count_nonzero(pred | gt, axis=1).astype(np.float64)
    return (inter + SMOOTH) / (union + SMOOTH)


def per_image_dice(probs, gt_masks_uint8, threshold: float = PRED_THRESHOLD,
                   gt_threshold: float = GT_THRESHOLD) -> np.ndarray:
    """Foreground Dice ``2|P&G| / (|P|+|G|)`` of each image, ``(N,)``, same policy as IoU."""
    pred, gt = _binarize(probs, gt_masks_uint8, threshold, gt_threshold)
    inter = np.count_nonzero(pred & gt, axis=1).astype(np.float64)
    total = (np.count_nonzero(pred, axis=1) + np.count_nonzero(gt, axis=1)).astype(np.float64)
    return (2 * inter + SMOOTH) / (total + SMOOTH)


def miou_foreground(probs, gt_masks_uint8, threshold: float = PRED_THRESHOLD,
                    gt_threshold: float = GT_THRESHOLD, reduce: bool = True):
    """The table's "MIoU": mean over images of the per-image foreground IoU, a fraction in [0, 1].

    Multiply by 100 for the table (84.164 there is 0.84164 here). With ``reduce=False`` returns
    the per-image vector (= :func:`per_image_iou`).
    """
    ious = per_image_iou(probs, gt_masks_uint8, threshold, gt_threshold)
    return float(ious.mean()) if reduce else ious


def dice_foreground(probs, gt_masks_uint8, threshold: float = PRED_THRESHOLD,
                    gt_threshold: float = GT_THRESHOLD, reduce: bool = True):
    """Mean over images of the per-image foreground Dice, a fraction in [0, 1]."""
    dice = per_image_dice(probs, gt_masks_uint8, threshold, gt_threshold)
    return float(dice.mean()) if reduce else dice


def confusion_matrix(probs, gt_masks_uint8, threshold: float = PRED_THRESHOLD,
                     gt_threshold: float = GT_THRESHOLD) -> np.ndarray:
    """2x2 pixel confusion matrix over all images, ``[gt class, predicted class]`` (0 = background)."""
    pred, gt = _binarize(probs, gt_masks_uint8, threshold, gt_threshold)
    cm = np.bincount(gt.ravel().astype(np.int64) * 2 + pred.ravel(), minlength=4)
    return cm.reshape(2, 2)


def confusion_miou(probs, gt_masks_uint8, threshold: float = PRED_THRESHOLD,
                   gt_threshold: float = GT_THRESHOLD) -> float:
    """Class-mean IoU over {background, foreground} from one confusion matrix of all pixels.

    **Not the table's metric**: pixels of all images are pooled and background IoU is averaged
    in, which typically gives a much larger number than :func:`miou_foreground`. A class absent
    from both prediction and ground truth (union 0) is left out of the mean.
    """
    cm = confusion_matrix(probs, gt_masks_uint8, threshold, gt_threshold).astype(np.float64)
    inter = np.diag(cm)
    union = cm.sum(0) + cm.sum(1) - inter
    present = union > 0
    return float((inter[present] / union[present]).mean())


# ---------------------------------------------------------------------------------------------
# Multi-class: one confusion matrix pooled over all pixels of all images


def class_confusion_matrix(pred_labels, gt_labels, num_classes: int) -> np.ndarray:
    """``(C, C)`` int64 pixel counts ``[gt class, predicted class]`` over all pixels of all images.

    Args:
      pred_labels: predicted class index per pixel (e.g. ``argmax`` of the softmax), any shape.
      gt_labels: ground-truth class index per pixel, the same shape.
      num_classes: C; a label outside ``0..C-1`` raises ``ValueError``.
    """
    p = np.asarray(pred_labels).astype(np.int64, copy=False).ravel()
    g = np.asarray(gt_labels).astype(np.int64, copy=False).ravel()
    if np.shape(pred_labels) != np.shape(gt_labels):
        raise ValueError(f"predicted labels {np.shape(pred_labels)} and ground truth "
                         f"{np.shape(gt_labels)} must have the same shape")
    if num_classes < 1:
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    for name, a in (("predicted", p), ("ground-truth", g)):
        if a.size and (a.min() < 0 or a.max() >= num_classes):
            raise ValueError(f"{name} labels must be in 0..{num_classes - 1}, found "
                             f"{a.min()}..{a.max()}")
    return np.bincount(g * num_classes + p, minlength=num_classes ** 2).reshape(
        num_classes, num_classes)


def class_iou(cm) -> np.ndarray:
    """Per-class IoU ``TP / (TP + FP + FN)`` from a confusion matrix, ``(C,)`` float64 fractions;
    ``nan`` for a class absent from both prediction and ground truth (union 0)."""
    cm = np.asarray(cm, np.float64)
    inter = np.diag(cm)
    union = cm.sum(0) + cm.sum(1) - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, inter / np.where(union > 0, union, 1), np.nan)


def miou_classes(cm) -> float:
    """Mean of :func:`class_iou` over the classes present (union > 0); background included."""
    iou = class_iou(cm)
    present = ~np.isnan(iou)
    return float(iou[present].mean()) if present.any() else float("nan")


def pixel_accuracy(cm) -> float:
    """Fraction of all pixels whose predicted class is the ground-truth class."""
    cm = np.asarray(cm, np.float64)
    total = cm.sum()
    return float(np.trace(cm) / total) if total else float("nan")


def class_metrics(pred_labels, gt_labels, num_classes: int) -> dict:
    """``{"class_iou": [...], "miou_classes": m, "pixel_accuracy": a, "confusion": [[...]]}``,
    fractions in [0, 1] (x100 in reports). ``class_iou`` holds ``None`` for a class absent from
    both prediction and ground truth (JSON has no NaN), and the mean leaves it out."""
    cm = class_confusion_matrix(pred_labels, gt_labels, num_classes)
    return {"class_iou": [None if np.isnan(v) else float(v) for v in class_iou(cm)],
            "miou_classes": miou_classes(cm), "pixel_accuracy": pixel_accuracy(cm),
            "confusion": cm.tolist()}
