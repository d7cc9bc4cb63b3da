"""segmentation_models_pytorch's ``UnetPlusPlus`` (ResNet encoders) in Flax Linen, so that its
checkpoints convert (``weights_port/convert.py``) and run with every precision of this package.

smp's UNet++ is the same nested grid as :mod:`unetpp_jax.model`, over a ResNet pyramid and with
a different decoder. With encoder depth D (default 5) the encoder column X(i,0), i = 0..D-1, is
the ResNet's feature of stride 2**(i+1) (the stem's ReLU output, then layer1..layer{D-1}); the
full-resolution input is not a skip. For D = 5::

    X(0,0)  X(0,1)  X(0,2)  X(0,3)  X(0,4)  -> up -> x_0_4 (stride 1) -> segmentation_head
    X(1,0)  X(1,1)  X(1,2)  X(1,3)
    X(2,0)  X(2,1)  X(2,2)
    X(3,0)  X(3,1)
    X(4,0)                                          (stride 32)

    X(i,j) = block(concat[up(X(i+1,j-1)), X(i,j-1), X(i,j-2), ..., X(i,0)])   for i + j <= D-1

``up`` is nearest-neighbour x2 (smp's default ``decoder_interpolation``) and comes *first* in the
concatenation, the same-row nodes follow from the newest to X(i,0). A block is smp's
``DecoderBlock``: [optional scSE attention on the concatenation] -> conv3x3 -> BN -> ReLU ->
conv3x3 -> BN -> ReLU -> [optional scSE]. X(i,j) has the encoder's width of row i, except the
last node of each row (i + j = D-1), which has ``decoder_channels[D-2-i]``. After the grid one
more block (no skip) upsamples X(0,D-1) to full resolution with ``decoder_channels[-1]``
channels, and ``segmentation_head`` (a 3x3 conv with bias) gives the logits. One head, no deep
supervision, no pruning.

smp names the blocks ``x_{d}_{l}`` by decoder layer l = D-2-i and position d = D-1-i-j
(:func:`block_name`); the Flax tree uses smp's names, so the converter's key rules stay simple:
``encoder/...`` (torchvision's names, see :mod:`unetpp_jax.encoders.resnet`),
``decoder/x_{d}_{l}/conv1|bn1|conv2|bn2|attention1|attention2``, ``segmentation_head``.

Input: NHWC, height and width multiples of 2**D, normalised as smp's ResNet encoders were
pretrained (RGB, ImageNet mean/std on x/255: ``data.normalization.IMAGENET_RGB_INPUT``).
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from unetpp_jax.encoders import get_encoder
from unetpp_jax.encoders.resnet import RESNETS, resnet_widths
from unetpp_jax.layers import (ROLE_HEAD, ROLE_HIDDEN, ROLE_NODE, ConvInput, conv_bn, conv_plain,
                               input_parts, upsample2x_nearest)
from unetpp_jax.numerics import Float32

Array = jax.Array

DECODER_CHANNELS = (256, 128, 64, 32, 16)
ATTENTION_TYPES = (None, "scse")
SCSE_REDUCTION = 16


def block_name(i: int, j: int, depth: int) -> str:
    """smp's name of node X(i, j) of a depth-``depth`` decoder (``x_{d}_{l}``); the final
    full-resolution block is ``x_0_{depth-1}``, i.e. ``block_name(-1, depth, depth)``."""
    return f"x_{depth - 1 - i - j}_{depth - 2 - i}"


def grid_nodes(depth: int) -> list[tuple[int, int]]:
    """The decoder nodes X(i, j), j >= 1, i + j <= depth - 1, column by column (the order smp
    computes them in, and every input comes first)."""
    return [(i, j) for j in range(1, depth) for i in range(depth - j)]


class SCSE(nn.Module):
    """smp's ``SCSEModule``: ``x * cSE(x) + x * sSE(x)`` with cSE = sigmoid(conv1x1(ReLU(
    conv1x1(mean_hw(x))))) (C -> C/16 -> C) and sSE = sigmoid(conv1x1(x)) (C -> 1).

    ``x`` may be the parts of a concatenation: it is read part by part, never concatenated.
    Its three 1x1 convs (with bias, no BatchNorm) run through ``numerics`` with role hidden."""

    numerics: Any = Float32()
    reduction: int = SCSE_REDUCTION

    @nn.compact
    def __call__(self, x: ConvInput, train: bool = False) -> ConvInput:
        parts = input_parts(x)
        channels = sum(p.shape[-1] for p in parts)

        def conv(inp, features, name):
            return conv_plain(self, inp, features, name=name, numerics=self.numerics,
                              role=ROLE_HIDDEN, train=train, kernel_size=1)

        pooled = [jnp.mean(p, axis=(1, 2), keepdims=True) for p in parts]  # AdaptiveAvgPool2d(1)
        cse = nn.sigmoid(conv(nn.relu(conv(pooled, channels // self.reduction, "cse_conv1")),
                              channels, "cse_conv2"))
        sse = nn.sigmoid(conv(parts, 1, "sse_conv"))
        out, start = [], 0
        for p in parts:
            c = p.shape[-1]
            out.append(p * cse[..., start:start + c].astype(p.dtype) + p * sse.astype(p.dtype))
            start += c
        return out if isinstance(x, (list, tuple)) else out[0]


class DecoderBlock(nn.Module):
    """smp's ``DecoderBlock`` after its upsampling (done by the caller, so the grid shows it):
    ``[attention1] -> conv1 -> bn1 -> ReLU -> conv2 -> bn2 -> ReLU -> [attention2]``.

    ``x`` is the concatenation as its parts ``[up(X(i+1,j-1)), skips...]``; smp applies
    ``attention1`` only when there is a skip (``len(parts) > 1``). Without BatchNorm
    (``decoder_use_norm=False``) the convs carry a bias instead."""

    features: int
    attention: str | None = None
    use_batchnorm: bool = True
    numerics: Any = Float32()

    @nn.compact
    def __call__(self, x: ConvInput, train: bool = False) -> Array:
        if self.attention == "scse" and len(input_parts(x)) > 1:
            x = SCSE(self.numerics, name="attention1")(x, train)
        for k, role in ((1, ROLE_HIDDEN), (2, ROLE_NODE)):
            if self.use_batchnorm:
                x = conv_bn(self, x, self.features, name=f"conv{k}", numerics=self.numerics,
                            role=role, train=train, use_bias=False)
            else:
                x = conv_plain(self, x, self.features, name=f"conv{k}", numerics=self.numerics,
                               role=role, train=train, kernel_size=3)
            x = nn.relu(x)
        if self.attention == "scse":
            x = SCSE(self.numerics, name="attention2")(x, train)
        return x


class UnetPlusPlusDecoder(nn.Module):
    """smp's ``UnetPlusPlusDecoder``: the grid X(i,j) over the encoder column, then the final
    full-resolution block. ``features`` is smp's encoder output ``[x, stride 2, ..., 2**D]``."""

    decoder_channels: Sequence[int] = DECODER_CHANNELS
    attention: str | None = None
    use_batchnorm: bool = True
    numerics: Any = Float32()

    @nn.compact
    def __call__(self, features: Sequence[Array], train: bool = False) -> Array:
        depth = len(features) - 1
        widths = [f.shape[-1] for f in features[1:]]  # row i: the encoder width at stride 2**(i+1)
        block = lambda width, name: DecoderBlock(  # noqa: E731
            width, self.attention, self.use_batchnorm, numerics=self.numerics, name=name)
        X: dict[tuple[int, int], Array] = {(i, 0): features[i + 1] for i in range(depth)}
        for i, j in grid_nodes(depth):
            # The concatenation, as its parts in smp's order (layers.conv2d reads them in place).
            inp = [upsample2x_nearest(X[i + 1, j - 1])] + [X[i, k] for k in range(j - 1, -1, -1)]
            last_of_row = i + j == depth - 1
            width = self.decoder_channels[depth - 2 - i] if last_of_row else widths[i]
            X[i, j] = block(width, block_name(i, j, depth))(inp, train)
        return block(self.decoder_channels[-1], block_name(-1, depth, depth))(
            upsample2x_nearest(X[0, depth - 1]), train)


class SMPUnetPlusPlus(nn.Module):
    """segmentation_models_pytorch ``UnetPlusPlus(encoder_name=encoder, ...)``; logits out.

    Attributes (smp's arguments of the same name, ``classes`` -> ``num_classes``):
      encoder: a ResNet in ``encoders.resnet.RESNETS`` (``'resnet18'``, ``'resnet34'``, ...).
      encoder_depth: D, 2..5 (smp documents 3..5); the input must be a multiple of 2**D.
      decoder_channels: D widths, of the last node of each decoder row and of the final block.
      decoder_attention_type: None or ``'scse'``.
      decoder_use_batchnorm: BatchNorm after each decoder conv (smp's default ``'batchnorm'``);
        False: convs with bias, no normalisation.
      num_classes: channels of the logits.
      numerics: how inference convolutions are computed (``unetpp_jax.numerics``); static.

    ``__call__(x, train=False, prune_level=None)`` returns the logits (N, H, W, num_classes).
    There is one head and no pruning: ``prune_level`` may only be None or ``depth``
    (``inference.predict_fn`` passes ``model.depth``).
    """

    encoder: str = "resnet34"
    encoder_depth: int = 5
    decoder_channels: Sequence[int] = DECODER_CHANNELS
    decoder_attention_type: str | None = None
    decoder_use_batchnorm: bool = True
    num_classes: int = 1
    numerics: Any = Float32()

    def __post_init__(self):
        if self.encoder not in RESNETS:
            raise ValueError(f"encoder must be one of {sorted(RESNETS)}, got {self.encoder!r}")
        get_encoder(self.encoder)
        if not 2 <= self.encoder_depth <= 5:
            raise ValueError(f"encoder_depth must be in 2..5, got {self.encoder_depth}")
        if len(self.decoder_channels) != self.encoder_depth:
            raise ValueError(f"decoder_channels must have encoder_depth={self.encoder_depth} "
                             f"entries, got {tuple(self.decoder_channels)}")
        if self.decoder_attention_type not in ATTENTION_TYPES:
            raise ValueError(f"decoder_attention_type must be one of {ATTENTION_TYPES}, got "
                             f"{self.decoder_attention_type!r}")
        super().__post_init__()

    @property
    def depth(self) -> int:
        """The encoder depth D: inputs are multiples of 2**D (``model.min_input_shape``)."""
        return self.encoder_depth

    @property
    def num_heads(self) -> int:
        return 1

    @property
    def deep_supervision(self) -> bool:
        return False

    @nn.compact
    def __call__(self, x: Array, train: bool = False, prune_level: int | None = None) -> Array:
        self._check(x, prune_level)
        widths = resnet_widths(self.encoder, x.shape[-1], self.encoder_depth)
        features = get_encoder(self.encoder)(self, x, widths=widths, numerics=self.numerics,
                                             train=train)
        y = UnetPlusPlusDecoder(tuple(self.decoder_channels), self.decoder_attention_type,
                                self.decoder_use_batchnorm, numerics=self.numerics,
                                name="decoder")(features, train)
        logits = conv_plain(self, y, self.num_classes, name="segmentation_head",
                            numerics=self.numerics, role=ROLE_HEAD, train=train, kernel_size=3)
        return logits.astype(jnp.float32)

    def _check(self, x, prune_level):
        m = 2 ** self.depth
        if x.ndim != 4:
            raise ValueError(f"expected NHWC input, got shape {x.shape}")
        if x.shape[1] % m or x.shape[2] % m:
            raise ValueError(f"height and width must be multiples of {m} (2**encoder_depth), "
                             f"got {x.shape[1:3]}")
        if prune_level is not None and prune_level != self.depth:
            raise ValueError(f"{type(self).__name__} has one head and no pruned levels: "
                             f"prune_level must be None or {self.depth}, got {prune_level}")
