"""UNet++ (Zhou et al., TMI 2019, arXiv 1912.05074) in Flax Linen, as UNET-ZOO's and
pytorch-nested-unet's ``NestedUNet``.

The nodes form the paper's grid X(i, j): i is the depth (0 = full resolution), j the column.
With the default widths (depth D = 4)::

    X(0,0)  X(0,1)  X(0,2)  X(0,3)  X(0,4)      heads final1..final4 read X(0,1)..X(0,4)
    X(1,0)  X(1,1)  X(1,2)  X(1,3)
    X(2,0)  X(2,1)  X(2,2)
    X(3,0)  X(3,1)
    X(4,0)

    X(i,0) = the encoder's feature at stride 2**i           (encoders.vgg: VGG block after 2x2 max-pool)
    X(i,j) = block(concat[X(i,0), ..., X(i,j-1), up(X(i+1,j-1))])     (nested dense skips)

Every node is a VGG block named ``conv{i}_{j}`` and every head a 1x1 conv named ``final{k}``
(``final`` without deep supervision), so the parameter tree mirrors the PyTorch ``state_dict``.
``skips='unet'`` keeps only the plain U-Net path (X(i,D-i) from [X(i,0), up(X(i+1,D-i-1))]:
pytorch-nested-unet's ``UNet``). The model returns *logits*;
:func:`unetpp_jax.inference.probabilities` applies the sigmoid (one class) or softmax.

Pruned inference (paper §III-C): at level L only the nodes with i + j <= L run and head L is the
output, so each level is its own, smaller, compiled program.

Input: NHWC float32, normalised as the checkpoint's metadata records (``'input'``: channel order,
mean and std on pixel/255; UNET-ZOO's models take BGR (x/255 - 0.5)/0.5). Height and width must
be multiples of 2**D.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from unetpp_jax.encoders import get_encoder
from unetpp_jax.encoders.vgg import ConvBlock
from unetpp_jax.layers import conv_head, upsample2x_align_corners
from unetpp_jax.numerics import Float32

Array = jax.Array

WIDTHS = (32, 64, 128, 256, 512)  # UNET-ZOO nb_filter, levels 0..4
DEPTH = len(WIDTHS) - 1  # of the default widths; a model's depth is len(widths) - 1
SKIPS = ("nested", "unet")


def grid_nodes(prune_level: int = DEPTH, skips: str = "nested",
               depth: int | None = None) -> list[tuple[int, int]]:
    """The nodes (i, j) computed at ``prune_level``, column by column so that every input comes
    first: X(i, j) needs X(i, 0..j-1) and X(i+1, j-1).

    ``nested``: every node with i + j <= prune_level. ``unet``: the encoder column and the
    diagonal X(D-j, j) (no pruning: ``prune_level`` must be the depth)."""
    depth = prune_level if depth is None else depth
    if skips == "unet":
        return [(i, 0) for i in range(depth + 1)] + [(depth - j, j) for j in range(1, depth + 1)]
    return [(i, j) for j in range(prune_level + 1) for i in range(prune_level + 1 - j)]


def skip_columns(j: int, skips: str = "nested") -> list[int]:
    """The same-row columns X(i, k) concatenated into node X(i, j) (before up(X(i+1, j-1)))."""
    return list(range(j)) if skips == "nested" else [0]


class UNetPlusPlus(nn.Module):
    """UNet++ over an encoder from ``unetpp_jax.encoders``; logits out.

    Attributes:
      num_classes: output channels of each head.
      widths: channels of levels 0..D; the depth D is ``len(widths) - 1``.
      deep_supervision: heads ``final1..finalD`` on X(0,1..D); otherwise one head ``final``
        on X(0,D).
      encoder: name in ``encoders.ENCODERS`` (``'vgg'``: UNET-ZOO's encoder column).
      skips: ``'nested'`` (UNet++) or ``'unet'`` (plain U-Net skips, pytorch-nested-unet's UNet).
      numerics: how inference convolutions are computed (``unetpp_jax.numerics``); static.

    ``__call__(x, train=False, prune_level=None)`` returns, with deep supervision, a tuple of the
    logits of heads 1..prune_level (default: all D); without, the single head's logits.
    """

    num_classes: int = 1
    widths: Sequence[int] = WIDTHS
    deep_supervision: bool = True
    encoder: str = "vgg"
    skips: str = "nested"
    numerics: Any = Float32()

    def __post_init__(self):
        get_encoder(self.encoder)  # an unknown name fails when the model is built, not called
        if self.skips not in SKIPS:
            raise ValueError(f"skips must be one of {SKIPS}, got {self.skips!r}")
        if self.skips == "unet" and self.deep_supervision:
            raise ValueError("skips='unet' computes only X(0,D) on the top row, so it has one "
                             "head: use deep_supervision=False")
        super().__post_init__()

    @property
    def depth(self) -> int:
        return len(self.widths) - 1

    @property
    def num_heads(self) -> int:
        return self.depth if self.deep_supervision else 1

    @nn.compact
    def __call__(self, x: Array, train: bool = False, prune_level: int | None = None):
        depth = self.depth
        prune_level = depth if prune_level is None else prune_level
        self._check(x, prune_level)
        if self.is_initializing():
            prune_level = depth  # always create every variable

        features = get_encoder(self.encoder)(self, x, widths=self.widths, numerics=self.numerics,
                                             train=train)
        X: dict[tuple[int, int], Array] = {}
        for i, j in grid_nodes(prune_level, self.skips, depth):
            if j == 0:
                X[i, j] = features[i]
                continue
            # The concatenation, as its parts (layers.conv2d reads them in place).
            inp = [X[i, k] for k in skip_columns(j, self.skips)]
            inp.append(upsample2x_align_corners(X[i + 1, j - 1]))
            X[i, j] = ConvBlock(self.widths[i], numerics=self.numerics, name=f"conv{i}_{j}")(
                inp, train)

        if self.deep_supervision:
            heads = [(f"final{k}", X[0, k]) for k in range(1, prune_level + 1)]
        else:
            heads = [("final", X[0, depth])]
        outs = [conv_head(self, feat, self.num_classes, name=name, numerics=self.numerics,
                          train=train) for name, feat in heads]
        return tuple(outs) if self.deep_supervision else outs[0]

    def _check(self, x, prune_level):
        depth, m = self.depth, 2 ** self.depth
        if depth < 1:
            raise ValueError(f"widths must give at least two levels, got {tuple(self.widths)}")
        if x.ndim != 4:
            raise ValueError(f"expected NHWC input, got shape {x.shape}")
        if x.shape[1] % m or x.shape[2] % m:
            raise ValueError(f"height and width must be multiples of {m} (2**depth), got "
                             f"{x.shape[1:3]}")
        if not 1 <= prune_level <= depth:
            raise ValueError(f"prune_level must be in 1..{depth}, got {prune_level}")
        if prune_level != depth and not (self.deep_supervision and self.skips == "nested"):
            raise ValueError("pruned inference needs the deep-supervision heads of the nested "
                             "grid; this model has only X(0,D)'s head")


def init_variables(model: nn.Module, rng: Array | int = 0, shape=(1, 16, 16, 3)) -> dict:
    """``{'params', 'batch_stats'}`` for ``model`` (BatchNorm: scale 1, bias 0, mean 0, var 1).

    Parameter shapes do not depend on the image size; the default input is small (its side is
    raised to the model's multiple of 2**depth). An integer seed becomes an ``rbg`` key, which
    XLA:CPU compiles in seconds rather than tens of seconds for the ~70 draws of this init.
    """
    if isinstance(rng, int):
        rng = jax.random.key(rng, impl="rbg")
    shape = min_input_shape(model, shape)
    init = jax.jit(model.init, static_argnames=("train",))
    return dict(init(rng, jnp.zeros(shape, jnp.float32)))


def min_input_shape(model: nn.Module, shape=(1, 16, 16, 3)) -> tuple:
    """``shape`` with height and width raised to a multiple of 2**depth (the model's smallest
    input)."""
    m = 2 ** model.depth
    n, h, w, c = shape
    return (n, max(h, m) // m * m, max(w, m) // m * m, c)


def load_pretrained(path=None, numerics: Any = None):
    """``(model, variables)``: the bundled model (``path=None``), a checkpoint directory or a
    training workdir. See :func:`unetpp_jax.pretrained.load_pretrained`."""
    from unetpp_jax.pretrained import load_pretrained as _load

    return _load(path, numerics=numerics)
