"""Parameter and FLOP counts: XLA's cost analysis, and convolution MACs counted by hand."""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from unetpp_jax.model import WIDTHS, grid_nodes, skip_columns


def count_params(params) -> int:
    """Number of trainable parameters (BatchNorm running statistics are not parameters)."""
    return int(sum(np.prod(np.shape(p)) for p in jax.tree_util.tree_leaves(params)))


def xla_flops(model, variables, shape=(1, 96, 96, 3), prune_level: int | None = None) -> float:
    """FLOPs of one inference forward as counted by XLA's cost analysis (multiply-add = 2;
    zero-padding taps skipped; elementwise ops included), with every conv a direct convolution:
    float32 models are counted at ``conv_impl='xla'`` (Winograd's fewer multiplies, see
    ``unetpp_jax.fastconv``, are how a conv is computed, not the model's FLOPs)."""
    from unetpp_jax.numerics import Float32

    numerics = getattr(model, "numerics", None)
    if isinstance(numerics, Float32) and numerics.conv_impl != "xla":
        model = model.clone(numerics=Float32(conv_impl="xla"))
    f = jax.jit(lambda v, x: model.apply(v, x, train=False, prune_level=prune_level))
    compiled = f.lower(variables, jax.ShapeDtypeStruct(shape, jnp.float32)).compile()
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax returns one dict per device
        cost = cost[0]
    return float(cost["flops"])


def conv_macs(widths: Sequence[int] = WIDTHS, height: int = 96, width: int = 96,
              in_channels: int = 3, num_classes: int = 1, deep_supervision: bool = True,
              prune_level: int | None = None, skips: str = "nested") -> int:
    """Multiply-accumulates of the convolutions of a UNetPlusPlus with the VGG encoder, counted
    by hand from the grid (every 3x3 tap; BatchNorm, ReLU, pooling and upsampling ignored)."""
    depth = len(widths) - 1
    prune_level = depth if prune_level is None else prune_level
    total = 0
    for i, j in grid_nodes(prune_level, skips, depth):
        hw = (height >> i) * (width >> i)
        if j == 0:
            cin = in_channels if i == 0 else widths[i - 1]
        else:
            cin = len(skip_columns(j, skips)) * widths[i] + widths[i + 1]
        cout = widths[i]
        total += hw * 9 * (cin * cout + cout * cout)
    heads = prune_level if deep_supervision else 1
    total += heads * height * width * widths[0] * num_classes
    return total
