"""torchvision's ResNet as an encoder (what segmentation_models_pytorch's ``resnet*`` encoders
are: ``torchvision.models.resnet.ResNet`` without ``avgpool``/``fc``).

Layout, with torchvision's names (``encoder.`` prefix in smp's state_dict)::

    conv1 7x7/2 (no bias) -> bn1 -> ReLU                      feature 1, stride 2, 64 ch
    maxpool 3x3/2 pad 1 -> layer1                             feature 2, stride 4
    layer2, layer3, layer4 (first block stride 2)             features 3..5, stride 8..32

A block is ``BasicBlock`` (resnet18/34: conv1 3x3/s -> bn1 -> ReLU -> conv2 3x3 -> bn2) or
``Bottleneck`` (resnet50/101/152, torchvision's v1.5: conv1 1x1 -> conv2 3x3/s -> conv3 1x1,
expansion 4), plus ``downsample`` (1x1/s conv without bias -> BatchNorm) on the identity path
when the stride or the width changes; ``out = ReLU(block(x) + identity)``. Convs pad ``k // 2``.

Flax names: ``encoder/conv1``, ``encoder/bn1``, ``encoder/layer{k}_{b}/conv{n}``, ``bn{n}``,
``downsample_conv``, ``downsample_bn`` (``torch_key.replace('.', '_')`` for the block index, and
``downsample.0/.1`` -> ``downsample_conv/_bn`` so that BatchNorm pairs with its conv by name).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import flax.linen as nn
import jax

from unetpp_jax.layers import ROLE_HIDDEN, ROLE_INPUT, conv_bn, max_pool3x3_stride2
from unetpp_jax.numerics import Float32

STEM_WIDTH = 64
PLANES = (64, 128, 256, 512)  # layer1..layer4


class ResNetSpec(NamedTuple):
    block: str  # "basic" or "bottleneck"
    layers: tuple[int, int, int, int]  # blocks in layer1..layer4

    @property
    def expansion(self) -> int:
        return 4 if self.block == "bottleneck" else 1


RESNETS: dict[str, ResNetSpec] = {
    "resnet18": ResNetSpec("basic", (2, 2, 2, 2)),
    "resnet34": ResNetSpec("basic", (3, 4, 6, 3)),
    "resnet50": ResNetSpec("bottleneck", (3, 4, 6, 3)),
    "resnet101": ResNetSpec("bottleneck", (3, 4, 23, 3)),
    "resnet152": ResNetSpec("bottleneck", (3, 8, 36, 3)),
}


def resnet_widths(name: str, in_channels: int = 3, depth: int = 5) -> tuple[int, ...]:
    """Channels of the pyramid ``[input, stride 2, ..., stride 2**depth]`` (smp's
    ``encoder.out_channels``): resnet34 -> (3, 64, 64, 128, 256, 512)."""
    spec = RESNETS[name]
    widths = (in_channels, STEM_WIDTH) + tuple(p * spec.expansion for p in PLANES)
    if not 1 <= depth <= 5:
        raise ValueError(f"a ResNet encoder's depth is 1..5, got {depth}")
    return widths[:depth + 1]


class Block(nn.Module):
    """One residual block (``layer{k}.{b}``): BasicBlock or Bottleneck, with ``downsample``."""

    planes: int
    stride: int = 1
    bottleneck: bool = False
    numerics: Any = Float32()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        expansion = 4 if self.bottleneck else 1
        conv = functools.partial(conv_bn, self, numerics=self.numerics, role=ROLE_HIDDEN,
                                 train=train, use_bias=False)
        if self.bottleneck:  # torchvision v1.5: the stride sits on the 3x3 conv
            out = nn.relu(conv(x, self.planes, name="conv1", kernel_size=1))
            out = nn.relu(conv(out, self.planes, name="conv2", kernel_size=3, stride=self.stride))
            out = conv(out, self.planes * expansion, name="conv3", kernel_size=1)
        else:
            out = nn.relu(conv(x, self.planes, name="conv1", kernel_size=3, stride=self.stride))
            out = conv(out, self.planes, name="conv2", kernel_size=3)
        identity = x
        if self.stride != 1 or x.shape[-1] != self.planes * expansion:
            identity = conv(x, self.planes * expansion, name="downsample_conv", kernel_size=1,
                            stride=self.stride)
        return nn.relu(out + identity)


class ResNetEncoder(nn.Module):
    """torchvision's ResNet trunk up to ``layer{depth-1}``; returns smp's feature list
    ``[x, stride 2, stride 4, ..., stride 2**depth]`` (the input itself first)."""

    arch: str = "resnet34"
    depth: int = 5
    numerics: Any = Float32()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> list[jax.Array]:
        spec = RESNETS[self.arch]
        features = [x]
        x = nn.relu(conv_bn(self, x, STEM_WIDTH, name="conv1", numerics=self.numerics,
                            role=ROLE_INPUT, train=train, kernel_size=7, stride=2,
                            use_bias=False))
        features.append(x)
        for k in range(1, self.depth):  # layer k gives the feature of stride 2**(k+1)
            if k == 1:
                x = max_pool3x3_stride2(x)
            for b in range(spec.layers[k - 1]):
                stride = 2 if (k > 1 and b == 0) else 1
                x = Block(PLANES[k - 1], stride, spec.block == "bottleneck",
                          numerics=self.numerics, name=f"layer{k}_{b}")(x, train)
            features.append(x)
        return features


def resnet_encoder(module: nn.Module, x, *, widths, numerics, train: bool,
                   arch: str) -> list[jax.Array]:
    """The ``encoders.ENCODERS`` entry: a ResNet named ``encoder`` inside ``module``.

    ``widths`` are the pyramid's channels the caller expects (``resnet_widths``); its length
    sets the depth, and widths that are not this ResNet's raise ``ValueError``."""
    del module  # the encoder becomes a submodule of the calling model through Flax's scope
    depth = len(widths) - 1
    expected = resnet_widths(arch, x.shape[-1], depth)
    if tuple(widths) != expected:
        raise ValueError(f"{arch} gives a pyramid of widths {expected}, not {tuple(widths)}")
    return ResNetEncoder(arch, depth, numerics=numerics, name="encoder")(x, train)
