"""The UNET-ZOO / pytorch-nested-unet encoder: X(i,0) = VGGBlock(maxpool(X(i-1,0)))."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax

from unetpp_jax.layers import ROLE_HIDDEN, ROLE_INPUT, ROLE_NODE, ConvInput, conv_bn, max_pool2x2
from unetpp_jax.numerics import Float32


class ConvBlock(nn.Module):
    """A node: ``[conv3x3 (bias) -> BatchNorm -> ReLU] x 2`` (UNET-ZOO's ``VGGBlock``).

    Parameter names ``conv1``/``bn1``/``conv2``/``bn2`` stand for UNET-ZOO's ``conv.0/1/3/4``
    and pytorch-nested-unet's ``conv1/bn1/conv2/bn2``. ``reads_input`` marks the block whose
    first conv reads the image (role ``input``); its second conv produces the node (``node``).
    """

    features: int
    numerics: Any = Float32()
    reads_input: bool = False

    @nn.compact
    def __call__(self, x: ConvInput, train: bool = False) -> jax.Array:
        roles = (ROLE_INPUT if self.reads_input else ROLE_HIDDEN, ROLE_NODE)
        for k, role in zip((1, 2), roles):
            x = nn.relu(conv_bn(self, x, self.features, name=f"conv{k}", numerics=self.numerics,
                                role=role, train=train))
        return x


def vgg_encoder(module: nn.Module, x, *, widths, numerics, train: bool) -> list[jax.Array]:
    """``[X(0,0), ..., X(D,0)]``: nodes ``conv{i}_0`` of ``widths[i]`` channels, 2x2 max-pool
    between them (stride ``2**i``)."""
    del module  # the blocks become submodules of the calling model through Flax's scope
    features = []
    for i, width in enumerate(widths):
        inp = x if i == 0 else max_pool2x2(features[-1])
        features.append(ConvBlock(width, numerics=numerics, reads_input=i == 0,
                                  name=f"conv{i}_0")(inp, train))
    return features
