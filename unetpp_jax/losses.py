"""Multi-class segmentation losses, as pure functions of logits and integer labels.

* :func:`softmax_cross_entropy`: mean over pixels of ``-log softmax(logits)[label]``
  (optionally per-class weighted);
* :func:`soft_dice_loss`: ``1 -`` the soft Dice of ``softmax(logits)`` against the one-hot
  labels, per image and class, averaged over the classes (and images);
* :func:`multiclass_loss`: ``ce_weight * CE + dice_weight * Dice``, averaged over the heads of a
  deep-supervision model (a tuple of logits), as ``train.deep_supervision_loss`` does for one
  class.

Shapes: ``logits`` ``(B, H, W, C)`` float, ``labels`` ``(B, H, W)`` (or ``(B, H, W, 1)``) ints in
``0..C-1``. Everything is computed in float32 (logits are upcast), differentiable in ``logits``.
The binary (one-class, sigmoid) losses stay in ``unetpp_jax.train``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["multiclass_loss", "soft_dice_loss", "softmax_cross_entropy"]


def _labels(labels, logits):
    labels = jnp.asarray(labels)
    if labels.ndim == logits.ndim and labels.shape[-1] == 1:
        labels = labels[..., 0]
    if labels.shape != logits.shape[:-1]:
        raise ValueError(f"labels {labels.shape} must be logits {logits.shape} without the class "
                         "axis")
    return labels.astype(jnp.int32)


def softmax_cross_entropy(logits, labels, class_weights=None) -> jax.Array:
    """Mean over all pixels of ``-w[label] * log softmax(logits)[label]``.

    ``class_weights`` (``(C,)``, optional): the weighted mean ``sum(w[y] * nll) / sum(w[y])``
    (as ``torch.nn.CrossEntropyLoss(weight=...)``), e.g. to up-weight a thin boundary class.
    """
    logits = jnp.asarray(logits, jnp.float32)
    labels = _labels(labels, logits)
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]
    if class_weights is None:
        return nll.mean()
    w = jnp.asarray(class_weights, jnp.float32)[labels]
    return (w * nll).sum() / w.sum()


def soft_dice_loss(logits, labels, *, smooth: float = 1e-5, include_background: bool = True
                   ) -> jax.Array:
    """``1 - mean`` soft Dice of ``softmax(logits)`` against one-hot ``labels``.

    Per image and class: ``(2 sum(p t) + smooth) / (sum(p) + sum(t) + smooth)`` (the smoothing of
    ``train.soft_dice_loss``), then averaged over classes (class 0 left out when
    ``include_background=False``) and images. A class absent from an image and not predicted
    there scores 1 (no loss); absent but predicted scores about 0.
    """
    logits = jnp.asarray(logits, jnp.float32)
    labels = _labels(labels, logits)
    c = logits.shape[-1]
    p = jax.nn.softmax(logits, axis=-1).reshape(logits.shape[0], -1, c)
    t = jax.nn.one_hot(labels, c, dtype=jnp.float32).reshape(logits.shape[0], -1, c)
    dice = (2.0 * (p * t).sum(1) + smooth) / (p.sum(1) + t.sum(1) + smooth)  # (B, C)
    if not include_background:
        dice = dice[:, 1:]
    return 1.0 - dice.mean()


def multiclass_loss(logits, labels, *, ce_weight: float = 1.0, dice_weight: float = 0.0,
                    class_weights=None, include_background: bool = True) -> jax.Array:
    """``ce_weight * softmax_cross_entropy + dice_weight * soft_dice_loss``, averaged over the
    heads when ``logits`` is a tuple/list (deep supervision), for one array otherwise."""
    heads = logits if isinstance(logits, (tuple, list)) else (logits,)
    total = 0.0
    for z in heads:
        loss = 0.0
        if ce_weight:
            loss = loss + ce_weight * softmax_cross_entropy(z, labels, class_weights)
        if dice_weight:
            loss = loss + dice_weight * soft_dice_loss(z, labels,
                                                       include_background=include_background)
        total = total + loss
    return total / len(heads)
