"""The table's metric: per-image foreground IoU / Dice, and the confusion mIoU."""

from __future__ import annotations

import numpy as np
import pytest

from unetpp_jax.metrics import (
    SMOOTH,
    confusion_matrix,
    confusion_miou,
    dice_foreground,
    miou_foreground,
    per_image_dice,
    per_image_iou,
)

# Two 2x3 images. Image 0: P = {(0,0), (1,0), (0,1)}, G = {(0,0), (1,1)} -> |P&G| = 1, |P|G| = 4.
# Image 1: P = G = {(0,2), (1,2)} -> IoU 1.
PROBS = np.array([
    [[0.9, 0.7, 0.1],
     [0.5, 0.49, 0.0]],
    [[0.0, 0.2, 0.99],
     [0.3, 0.1, 0.51]],
], np.float32)
GT = np.array([
    [[255, 124, 0],
     [0, 125, 0]],
    [[0, 0, 200],
     [0, 0, 130]],
], np.uint8)


def test_hand_computed_iou_and_dice():
    # Thresholds: prob 0.5 is foreground, 0.49 is not; GT 125 is foreground, 124 is not.
    np.testing.assert_allclose(per_image_iou(PROBS, GT), [(1 + SMOOTH) / (4 + SMOOTH), 1.0], rtol=1e-12)
    np.testing.assert_allclose(per_image_dice(PROBS, GT), [(2 + SMOOTH) / (5 + SMOOTH), 1.0], rtol=1e-12)
    # The mean is over images (0.625), not pooled over pixels (3 / 6 = 0.5).
    assert miou_foreground(PROBS, GT) == pytest.approx((0.25 + 1.0) / 2, abs=1e-5)
    assert dice_foreground(PROBS, GT) == pytest.approx((0.4 + 1.0) / 2, abs=1e-5)
    np.testing.assert_array_equal(miou_foreground(PROBS, GT, reduce=False), per_image_iou(PROBS, GT))
    np.testing.assert_array_equal(dice_foreground(PROBS, GT, reduce=False), per_image_dice(PROBS, GT))


def test_thresholds_are_parameters():
    # Raising the prediction threshold to 0.6 drops (1,0): image 0 becomes P = {(0,0), (0,1)}, 1/3.
    assert per_image_iou(PROBS, GT, threshold=0.6)[0] == pytest.approx(1 / 3, abs=1e-5)
    # GT threshold 124 adds (0,1) to G: |P&G| = 2, |P|G| = 4.
    assert per_image_iou(PROBS, GT, gt_threshold=124)[0] == pytest.approx(0.5, abs=1e-5)


def test_empty_union_policy():
    empty_p = np.zeros((1, 4, 4), np.float32)
    empty_g = np.zeros((1, 4, 4), np.uint8)
    full_g = np.full((1, 4, 4), 255, np.uint8)
    # Nothing predicted, nothing there: a perfect score, exactly 1.0 (pytorch-nested-unet's smoothing).
    assert per_image_iou(empty_p, empty_g)[0] == 1.0
    assert per_image_dice(empty_p, empty_g)[0] == 1.0
    # Missed everything / predicted on an empty image: ~0 (1e-5 / (16 + 1e-5)).
    assert per_image_iou(empty_p, full_g)[0] == pytest.approx(SMOOTH / 16, rel=1e-4)
    assert per_image_iou(np.ones((1, 4, 4)), empty_g)[0] < 1e-6
    assert per_image_dice(empty_p, full_g)[0] < 1e-6


def test_layouts_and_jax_arrays_are_accepted():
    jnp = pytest.importorskip("jax.numpy")
    expected = per_image_iou(PROBS, GT)
    np.testing.assert_array_equal(per_image_iou(PROBS[..., None], GT[..., None]), expected)
    np.testing.assert_array_equal(per_image_iou(jnp.asarray(PROBS)[..., None], jnp.asarray(GT)), expected)
    assert isinstance(miou_foreground(jnp.asarray(PROBS), GT), float)
    with pytest.raises(ValueError, match="same N, H, W"):
        per_image_iou(PROBS, GT[:1])


def test_agrees_with_an_independent_restatement_on_random_masks():
    rng = np.random.default_rng(0)
    n, h, w = 20, 16, 16
    probs = rng.random((n, h, w)) ** rng.uniform(0.2, 5, (n, 1, 1))  # varied foreground fraction
    gt = rng.integers(0, 256, (n, h, w), dtype=np.uint8)
    gt[3] = 0  # one empty ground truth
    probs[3] = 0.1  # ... with an empty prediction: IoU 1
    ious, dices = [], []
    for k in range(n):
        pred_px = {(i, j) for i in range(h) for j in range(w) if probs[k, i, j] >= 0.5}
        gt_px = {(i, j) for i in range(h) for j in range(w) if gt[k, i, j] >= 125}
        union, inter = pred_px | gt_px, pred_px & gt_px
        ious.append(1.0 if not union else len(inter) / len(union))
        denom = len(pred_px) + len(gt_px)
        dices.append(1.0 if not denom else 2 * len(inter) / denom)
    np.testing.assert_allclose(per_image_iou(probs, gt), ious, atol=1e-6)
    np.testing.assert_allclose(per_image_dice(probs, gt), dices, atol=1e-6)
    assert miou_foreground(probs, gt) == pytest.approx(np.mean(ious), abs=1e-6)
    assert per_image_iou(probs, gt)[3] == 1.0


def test_confusion_miou_is_a_different_metric():
    cm = confusion_matrix(PROBS, GT)
    # Rows = GT (bg, fg), columns = prediction. 12 pixels: GT fg = 4, predicted fg = 5, both = 3.
    np.testing.assert_array_equal(cm, [[6, 2], [1, 3]])
    bg_iou, fg_iou = 6 / (6 + 2 + 1), 3 / (3 + 2 + 1)
    assert confusion_miou(PROBS, GT) == pytest.approx((bg_iou + fg_iou) / 2)
    assert confusion_miou(PROBS, GT) != pytest.approx(miou_foreground(PROBS, GT), abs=1e-3)
    # A class absent from both is left out: all-background prediction on all-background GT = 1.
    assert confusion_miou(np.zeros((1, 2, 2)), np.zeros((1, 2, 2), np.uint8)) == 1.0
