"""Small building blocks of UNet++: a PyTorch-initialised convolution, align-corners upsampling,
BatchNorm folding, and the "numerics" hook through which every inference convolution runs.

Everything here is NHWC with HWIO kernels (Flax's layout); the converter in ``weights_port``
transposes PyTorch's OIHW once at load time.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Protocol

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

BN_EPSILON = 1e-5  # PyTorch nn.BatchNorm2d default, used by UNET-ZOO.
BN_MOMENTUM = 0.9  # Flax convention; equals PyTorch momentum 0.1.


def torch_default_init(fan_in: int):
    """PyTorch's default Conv2d init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias.

    (kaiming_uniform with a=sqrt(5) reduces to this bound.) Used so that training from scratch
    here starts from the same distribution as UNET-ZOO's models.
    """
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


# Compiler options of the inference programs this package jits
# (``jax.jit(..., compiler_options=...)``); the training step keeps XLA's defaults (see
# ``train.make_train_step``).
#
# XLA:CPU in jaxlib 0.10 hands convolutions to YNNPACK by default. On the AVX-512 CPU of the
# README's Performance section, its other convolution path (Eigen's spatial convolution) runs
# UNet++'s convolutions 1.35-2.2x faster at 96x96 and 48x48 (experiments.conv_layouts), and the
# whole fp32 forward x1.27-1.36 faster (batch 1 and 16), so YNNPACK is switched off
# (an empty list of YNNPACK fusion types). Other backends ignore ``xla_cpu_*`` options. Set per
# program rather than through the process-wide ``XLA_FLAGS``: importing this package changes
# nothing for other JAX code; a program jitted outside the package (``jax.jit(model.apply)``)
# gets XLA's default unless it passes these options too.
XLA_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}


# A conv input: an array, or the parts of a channel concatenation in order (UNet++'s dense skip
# inputs [X(i,0), ..., X(i,j-1), up(X(i+1,j-1))]), which conv2d reads without concatenating.
ConvInput = Any  # Array | Sequence[Array]


def input_parts(x: ConvInput) -> list[Array]:
    """The parts of a conv input (one part for a plain array)."""
    return list(x) if isinstance(x, (list, tuple)) else [x]


def map_parts(fn, x: ConvInput) -> ConvInput:
    """``fn`` applied to every part of a conv input, keeping its form (array or list)."""
    return [fn(p) for p in x] if isinstance(x, (list, tuple)) else fn(x)


def concat_parts(x: ConvInput) -> Array:
    """The conv input as one array (the channel concatenation of its parts)."""
    parts = input_parts(x)
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=-1)


def conv2d(x: ConvInput, kernel: Array, bias: Array | None = None) -> Array:
    """Stride-1 'same' convolution (kernel 1x1 or 3x3), NHWC x HWIO -> NHWC, float32 accumulate.

    ``x`` may be the parts of a channel concatenation: the result is then the sum of each
    part's convolution with its slice of the kernel's input channels, which equals the
    convolution of the concatenation (up to float32 summation order) without writing the
    concatenated array. On XLA:CPU that made the UNet++ forward x1.04-1.08 faster (the
    concatenations were ~7% of its time at batch 16).

    The output dtype is the input's; accumulation happens in float32 whatever the input dtype,
    which is what fp16 emulation relies on.
    """
    parts = input_parts(x)
    kh, kw = kernel.shape[:2]
    if kernel.shape[2] != sum(p.shape[-1] for p in parts):
        raise ValueError(f"kernel has {kernel.shape[2]} input channels, the input "
                         f"{[p.shape[-1] for p in parts]}")
    y, start = None, 0
    for p in parts:
        c = p.shape[-1]
        part = jax.lax.conv_general_dilated(
            p,
            kernel[:, :, start:start + c],
            window_strides=(1, 1),
            padding=((kh // 2, kh // 2), (kw // 2, kw // 2)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            preferred_element_type=jnp.float32,
        )
        y = part if y is None else y + part
        start += c
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return y.astype(parts[0].dtype)


@functools.lru_cache(maxsize=None)
def align_corners_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Linear-interpolation taps with PyTorch ``align_corners=True`` geometry.

    Output pixel o samples input coordinate o * (n_in - 1) / (n_out - 1): the corner pixels of
    input and output coincide. Returns ``(i0, i1, frac)``: output o = (1 - frac) * in[i0] +
    frac * in[i1]. ``jax.image.resize`` uses half-pixel centres instead, which UNET-ZOO's
    ``nn.Upsample(scale_factor=2, mode='bilinear', align_corners=True)`` does not.
    """
    if n_in == 1 or n_out == 1:
        zeros = np.zeros(n_out, np.int32)
        return zeros, zeros, np.zeros(n_out, np.float32)
    src = np.arange(n_out, dtype=np.float64) * (n_in - 1) / (n_out - 1)
    i0 = np.clip(np.floor(src).astype(np.int32), 0, n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    return i0, i1, (src - i0).astype(np.float32)


def _lerp_axis(x: Array, axis: int) -> Array:
    n_in = x.shape[axis]
    i0, i1, frac = align_corners_taps(n_in, 2 * n_in)
    shape = [1] * x.ndim
    shape[axis] = 2 * n_in
    f = jnp.asarray(frac, x.dtype).reshape(shape)
    return (1 - f) * jnp.take(x, i0, axis=axis) + f * jnp.take(x, i1, axis=axis)


def upsample2x_align_corners(x: Array) -> Array:
    """Bilinear x2 upsampling of NHWC ``x`` with align_corners=True (UNET-ZOO's ``self.up``).

    Separable: a two-tap gather and blend along H, then along W (the order PyTorch's kernel
    uses). On XLA:CPU this is ~25% faster for the whole UNet++ forward than the same
    interpolation as two small matrix products, which force layout copies. Runs in ``x``'s
    dtype (float16 under fp16 emulation).
    """
    return _lerp_axis(_lerp_axis(x, 1), 2)


def max_pool2x2(x: Array) -> Array:
    """2x2 max-pool, stride 2 (``nn.MaxPool2d(2, 2)``: odd trailing rows/cols are dropped)."""
    return nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")


def fold_batchnorm(kernel: Array, bias: Array, bn_params: dict, bn_stats: dict,
                   epsilon: float = BN_EPSILON) -> tuple[Array, Array]:
    """Fold an inference-mode BatchNorm that follows a conv into the conv's kernel and bias.

    BN(conv(x)) = gamma * (conv(x) + b - mean) / sqrt(var + eps) + beta
                = conv_{W * s}(x) + (b - mean) * s + beta,   s = gamma / sqrt(var + eps).
    Exact in real arithmetic; in float32 it differs from the unfolded form by rounding only.
    """
    s = bn_params["scale"] * jax.lax.rsqrt(bn_stats["var"] + epsilon)
    return kernel * s, (bias - bn_stats["mean"]) * s + bn_params["bias"]


class Numerics(Protocol):
    """How an inference-mode (BatchNorm-folded) convolution is computed.

    The model's topology is written once (``model.py``); precision emulation and calibration
    (``quant.py``) only swap this object. ``module`` is the calling Flax module, so an
    implementation can read or ``sow`` per-site variables under the conv's own name. ``x`` is a
    :data:`ConvInput`: an array, or the parts of a skip node's concatenated input (handle them
    with :func:`map_parts` / :func:`conv2d`, or :func:`concat_parts` where the whole is needed).
    """

    def conv(self, module: nn.Module, name: str, x: ConvInput, kernel: Array,
             bias: Array) -> Array:
        ...


class Float32:
    """Plain float32 inference: the default numerics."""

    def conv(self, module, name, x, kernel, bias):
        del module, name
        return conv2d(x, kernel, bias)

    def __hash__(self):
        return hash(type(self))

    def __eq__(self, other):
        return type(self) is type(other)


class Conv(nn.Module):
    """A conv with bias, HWIO kernel, PyTorch default init (``nn.Conv2d(..., padding=k//2)``)."""

    features: int
    kernel_size: int = 3

    @nn.compact
    def weights(self, in_features: int) -> tuple[Array, Array]:
        k = self.kernel_size
        init = torch_default_init(in_features * k * k)
        kernel = self.param("kernel", init, (k, k, in_features, self.features))
        bias = self.param("bias", init, (self.features,))
        return kernel, bias
