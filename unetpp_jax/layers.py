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


def conv2d(x: Array, kernel: Array, bias: Array | None = None) -> Array:
    """Stride-1 'same' convolution (kernel 1x1 or 3x3), NHWC x HWIO -> NHWC, float32 accumulate.

    The output dtype is the input's; accumulation happens in float32 whatever the input dtype,
    which is what fp16 emulation relies on.
    """
    kh, kw = kernel.shape[:2]
    y = jax.lax.conv_general_dilated(
        x,
        kernel,
        window_strides=(1, 1),
        padding=((kh // 2, kh // 2), (kw // 2, kw // 2)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        preferred_element_type=jnp.float32,
    )
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return y.astype(x.dtype)


@functools.lru_cache(maxsize=None)
def align_corners_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) linear-interpolation matrix with PyTorch ``align_corners=True`` geometry.

    Output pixel o samples input coordinate o * (n_in - 1) / (n_out - 1): the corner pixels of
    input and output coincide. ``jax.image.resize`` uses half-pixel centres instead, which
    UNET-ZOO's ``nn.Upsample(scale_factor=2, mode='bilinear', align_corners=True)`` does not.
    """
    m = np.zeros((n_out, n_in), np.float32)
    if n_in == 1 or n_out == 1:
        m[:, 0] = 1.0
        return m
    src = np.arange(n_out, dtype=np.float64) * (n_in - 1) / (n_out - 1)
    i0 = np.clip(np.floor(src).astype(np.int64), 0, n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    frac = (src - i0).astype(np.float32)
    np.add.at(m, (np.arange(n_out), i0), 1.0 - frac)
    np.add.at(m, (np.arange(n_out), i1), frac)
    return m


def upsample2x_align_corners(x: Array) -> Array:
    """Bilinear x2 upsampling of NHWC ``x`` with align_corners=True (UNET-ZOO's ``self.up``).

    Bilinear interpolation is separable, so it is two small matrix products, one per spatial
    axis; the matrices are compile-time constants. HIGHEST precision keeps GPUs from using
    TF32 here, so the result matches PyTorch to float32 rounding on every backend.
    """
    n, h, w, c = x.shape
    mh = jnp.asarray(align_corners_matrix(h, 2 * h), x.dtype)
    mw = jnp.asarray(align_corners_matrix(w, 2 * w), x.dtype)
    hi = jax.lax.Precision.HIGHEST
    y = jnp.einsum("ph,nhwc->npwc", mh, x, precision=hi, preferred_element_type=jnp.float32)
    y = jnp.einsum("qw,npwc->npqc", mw, y.astype(x.dtype), precision=hi,
                   preferred_element_type=jnp.float32)
    return y.astype(x.dtype)


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
    implementation can read or ``sow`` per-site variables under the conv's own name.
    """

    def conv(self, module: nn.Module, name: str, x: Array, kernel: Array, bias: Array) -> Array:
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
