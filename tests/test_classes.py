"""Multi-class pieces: class metrics (hand-computed confusion matrix), losses, the 3-class
DSB2018 builder (two touching squares), class batches, and the evaluation hook."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from unetpp_jax import losses, metrics
from unetpp_jax.data.classes import ClassSplit, class_batches, resize_labels
from unetpp_jax.data.dsb2018_classes import BOUNDARY, INTERIOR, instance_classes

# 2 images of 2x3 pixels, 3 classes.
GT = np.array([[[0, 1, 2], [0, 0, 1]],
               [[2, 2, 0], [1, 0, 0]]])
PRED = np.array([[[0, 1, 1], [0, 2, 1]],
                 [[2, 0, 0], [1, 0, 1]]])


def test_class_metrics_against_hand_computed_confusion_matrix():
    # [gt, pred] counts, pooled over both images (12 pixels):
    # gt 0 (6 px): pred 0,0,2 | 0,0,1 -> 4 x 0, 1 x 1, 1 x 2
    # gt 1 (3 px): pred 1,1 | 1      -> 3 x 1
    # gt 2 (3 px): pred 1 | 2,0      -> 1 x 0, 1 x 1, 1 x 2
    cm = metrics.class_confusion_matrix(PRED, GT, 3)
    np.testing.assert_array_equal(cm, [[4, 1, 1], [0, 3, 0], [1, 1, 1]])
    # IoU_c = cm[c,c] / (row_c + col_c - cm[c,c]): 4/(6+5-4), 3/(3+5-3), 1/(3+2-1)
    expected = [4 / 7, 3 / 5, 1 / 4]
    np.testing.assert_allclose(metrics.class_iou(cm), expected)
    assert metrics.miou_classes(cm) == pytest.approx(np.mean(expected))
    assert metrics.pixel_accuracy(cm) == pytest.approx(8 / 12)
    out = metrics.class_metrics(PRED, GT, 3)
    assert set(out) >= {"class_iou", "miou_classes", "pixel_accuracy"}
    np.testing.assert_allclose(out["class_iou"], expected)


def test_absent_class_is_left_out_and_bad_labels_raise():
    cm = metrics.class_confusion_matrix(np.array([0, 1, 1]), np.array([0, 1, 0]), 4)
    iou = metrics.class_iou(cm)
    assert np.isnan(iou[2]) and np.isnan(iou[3])
    assert metrics.miou_classes(cm) == pytest.approx((1 / 2 + 1 / 2) / 2)
    assert metrics.class_metrics(np.array([0, 1, 1]), np.array([0, 1, 0]), 4)["class_iou"][2] is None
    with pytest.raises(ValueError, match="0..2"):
        metrics.class_confusion_matrix(np.array([3]), np.array([0]), 3)
    with pytest.raises(ValueError, match="same shape"):
        metrics.class_confusion_matrix(np.zeros((2, 2)), np.zeros((2, 3)), 3)


def test_softmax_cross_entropy_matches_optax_and_weights():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 4, 5, 3)).astype(np.float32)
    labels = rng.integers(0, 3, size=(2, 4, 5))
    ref = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    np.testing.assert_allclose(losses.softmax_cross_entropy(logits, labels), ref, rtol=1e-6)
    np.testing.assert_allclose(losses.softmax_cross_entropy(logits, labels[..., None]), ref,
                               rtol=1e-6)
    w = np.array([1.0, 2.0, 5.0], np.float32)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    np.testing.assert_allclose(losses.softmax_cross_entropy(logits, labels, w),
                               (w[labels] * nll).sum() / w[labels].sum(), rtol=1e-6)
    with pytest.raises(ValueError, match="class"):
        losses.softmax_cross_entropy(logits, labels[:, :3])


def test_soft_dice_loss_values_and_gradient():
    labels = np.array([[[0, 1], [2, 2]]])
    perfect = 50.0 * jax.nn.one_hot(labels, 3)  # softmax ~ one-hot
    assert float(losses.soft_dice_loss(perfect, labels)) == pytest.approx(0.0, abs=1e-6)
    # Uniform prediction: per class Dice = 2 * sum(p t) / (sum p + sum t), p = 1/3 everywhere.
    uniform = jnp.zeros((1, 2, 2, 3))
    counts = np.array([1, 1, 2])
    dice = (2 * counts / 3 + 1e-5) / (4 / 3 + counts + 1e-5)
    assert float(losses.soft_dice_loss(uniform, labels)) == pytest.approx(1 - dice.mean(), rel=1e-5)
    assert float(losses.soft_dice_loss(uniform, labels, include_background=False)) == \
        pytest.approx(1 - dice[1:].mean(), rel=1e-5)
    g = jax.grad(lambda z: losses.multiclass_loss((z, z), labels, ce_weight=1.0, dice_weight=1.0))(
        uniform)
    assert np.isfinite(np.asarray(g)).all() and np.abs(np.asarray(g)).sum() > 0
    # The deep-supervision mean over heads.
    one = losses.multiclass_loss(uniform, labels, dice_weight=0.5)
    two = losses.multiclass_loss((uniform, perfect), labels, dice_weight=0.5)
    assert float(two) == pytest.approx((float(one) + float(
        losses.multiclass_loss(perfect, labels, dice_weight=0.5))) / 2, rel=1e-6)


def test_three_classes_of_two_touching_squares():
    # Two 4x4 squares side by side (columns 1-4 and 5-8), rows 1-4, in a 6x10 image; band 1.
    a = np.zeros((6, 10), bool)
    b = np.zeros((6, 10), bool)
    a[1:5, 1:5] = True
    b[1:5, 5:9] = True
    got = instance_classes([a, b], band=1)
    expected = np.zeros((6, 10), np.uint8)
    expected[1:5, 1:9] = BOUNDARY
    expected[2:4, 2:4] = INTERIOR  # inside a, away from background and from b
    expected[2:4, 6:8] = INTERIOR  # inside b
    np.testing.assert_array_equal(got, expected)
    # The contact line is boundary on both sides (columns 4 and 5): the interiors are apart.
    assert (got[1:5, 4] == BOUNDARY).all() and (got[1:5, 5] == BOUNDARY).all()
    # Interior + boundary = the union.
    np.testing.assert_array_equal(got > 0, a | b)
    # A square cut by the image border has no band along the border.
    c = np.zeros((6, 10), bool)
    c[0:4, 0:4] = True
    got = instance_classes([c], band=1)
    assert (got[0:3, 0:3] == INTERIOR).all() and (got[3, 0:4] == BOUNDARY).all()
    assert (got[0:4, 3] == BOUNDARY).all()
    # band 2: two pixels; an overlap pixel is boundary.
    big = np.zeros((10, 10), bool)
    big[1:9, 1:9] = True
    got = instance_classes([big], band=2)
    assert (got[3:7, 3:7] == INTERIOR).all() and (got[1:3, 1:9] == BOUNDARY).all()
    assert (got[1:9, 1:9] > 0).all() and int((got == INTERIOR).sum()) == 16
    d = np.zeros((10, 10), bool)
    d[4:6, 4:6] = True
    got = instance_classes([big, d], band=1)
    assert (got[4:6, 4:6] == BOUNDARY).all()
    with pytest.raises(ValueError):
        instance_classes([a], band=0)


def test_resize_labels_and_class_batches():
    labels = np.zeros((8, 8), np.uint8)
    labels[:, 4:] = 2
    np.testing.assert_array_equal(resize_labels(labels, 8, 3), labels)
    small = resize_labels(labels, 4, 3)
    np.testing.assert_array_equal(small, np.repeat([[0, 0, 2, 2]], 4, axis=0))
    images = np.random.default_rng(0).integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    split = ClassSplit(images, np.stack([labels] * 5), [f"i{k}" for k in range(5)], 3)
    assert isinstance(split.take([1, 0]), ClassSplit) and split.take([1]).num_classes == 3
    got = list(class_batches(split, 2, seed=1, augment=True, drop_remainder=False))
    assert [b["label"].shape for b in got] == [(2, 8, 8), (2, 8, 8), (1, 8, 8)]
    assert got[0]["label"].dtype == np.int32 and got[0]["image"].dtype == np.float32
    assert set(np.unique(np.concatenate([b["label"].ravel() for b in got]))) == {0, 2}
    with pytest.raises(ValueError, match="num_classes"):
        ClassSplit(images, np.full((5, 8, 8), 3, np.uint8), list("abcde"), 3)


def test_evaluate_classes_hook_on_a_tiny_model():
    from unetpp_jax.evaluate_classes import evaluate_classes, format_classes
    from unetpp_jax.model import UNetPlusPlus, init_variables

    model = UNetPlusPlus(num_classes=3, widths=(4, 8))
    variables = init_variables(model, 0)
    rng = np.random.default_rng(0)
    split = ClassSplit(rng.integers(0, 256, (3, 8, 8, 3), dtype=np.uint8),
                       rng.integers(0, 3, (3, 8, 8), dtype=np.uint8), ["a", "b", "c"], 3)
    out = evaluate_classes(model, variables, split, batch_size=2)
    assert len(out["class_iou"]) == 3 and 0 <= out["pixel_accuracy"] <= 1
    assert np.asarray(out["confusion"]).sum() == 3 * 64
    assert "mIoU(classes)" in format_classes(out)
    # Precomputed probabilities give the same numbers.
    from unetpp_jax.predict import Predictor

    probs = Predictor(model, variables, size=8, batch_size=3).run(split.images)
    assert evaluate_classes(model, variables, split, probs=probs) == out
