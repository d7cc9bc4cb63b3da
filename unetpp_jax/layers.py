"""Building blocks shared by every architecture: a PyTorch-initialised convolution, a conv
followed by BatchNorm that folds itself for inference, align-corners upsampling, max-pooling.

Everything is NHWC with HWIO kernels (Flax's layout); the converter in ``weights_port``
transposes PyTorch's OIHW once, at load time.

Two conventions every model follows, so that precision code and BatchNorm folding never match
layer names:

* Every inference convolution runs through a *numerics* object (``unetpp_jax.numerics``) as
  ``numerics.conv(module, name, x, kernel, bias, role)``, where ``role`` says what the conv does
  (:data:`ROLES`).
* A BatchNorm that follows a conv is named after it: the conv's name with ``conv`` replaced by
  ``bn`` (``conv1`` -> ``bn1``, ``downsample_conv`` -> ``downsample_bn``), see :func:`bn_name`.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

BN_EPSILON = 1e-5  # PyTorch nn.BatchNorm2d default.
BN_MOMENTUM = 0.9  # Flax convention; equals PyTorch momentum 0.1.

# What a convolution does in the network; numerics objects decide by role, never by name.
ROLE_INPUT = "input"    # reads the model's input image (TVM's skip_conv_layers=[0] keeps it float)
ROLE_HIDDEN = "hidden"  # any other conv inside a block
ROLE_NODE = "node"      # produces a grid node's output X(i,j), which feeds concatenations
ROLE_HEAD = "head"      # a 1x1 output head (logits)
ROLES = (ROLE_INPUT, ROLE_HIDDEN, ROLE_NODE, ROLE_HEAD)


def torch_default_init(fan_in: int):
    """PyTorch's default Conv2d init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias
    (kaiming_uniform with a=sqrt(5) reduces to this bound)."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


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


def conv2d(x: ConvInput, kernel: Array, bias: Array | None = None, *, stride: int = 1,
           padding: int | None = None, preferred_element_type=jnp.float32) -> Array:
    """Convolution NHWC x HWIO -> NHWC with zero padding ``padding`` (default ``k // 2``: 'same'
    at stride 1), accumulating in ``preferred_element_type`` (float32).

    ``x`` may be the parts of a channel concatenation: the result is the sum of each part's
    convolution with its slice of the kernel's input channels -- the convolution of the
    concatenation, without writing the concatenated array. The output dtype is the input's
    (``int32`` accumulators are returned as they are).
    """
    parts = input_parts(x)
    kh, kw = kernel.shape[:2]
    if kernel.shape[2] != sum(p.shape[-1] for p in parts):
        raise ValueError(f"kernel has {kernel.shape[2]} input channels, the input "
                         f"{[p.shape[-1] for p in parts]}")
    ph, pw = (kh // 2, kw // 2) if padding is None else (padding, padding)
    y, start = None, 0
    for p in parts:
        c = p.shape[-1]
        part = jax.lax.conv_general_dilated(
            p, kernel[:, :, start:start + c], window_strides=(stride, stride),
            padding=((ph, ph), (pw, pw)), dimension_numbers=("NHWC", "HWIO", "NHWC"),
            preferred_element_type=preferred_element_type)
        y = part if y is None else y + part
        start += c
    if bias is not None:
        y = y + bias.astype(y.dtype)
    if jnp.issubdtype(y.dtype, jnp.integer):
        return y
    return y.astype(parts[0].dtype)


@functools.lru_cache(maxsize=None)
def align_corners_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Linear-interpolation taps with PyTorch ``align_corners=True`` geometry.

    Output pixel o samples input coordinate o * (n_in - 1) / (n_out - 1): the corner pixels of
    input and output coincide. Returns ``(i0, i1, frac)``: out[o] = (1 - frac) * in[i0] +
    frac * in[i1]. (``jax.image.resize`` uses half-pixel centres and would not match.)
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
    """Bilinear x2 upsampling of NHWC ``x``, ``align_corners=True`` (``nn.Upsample`` in UNET-ZOO
    and pytorch-nested-unet): a two-tap gather and blend along H, then W, in ``x``'s dtype."""
    return _lerp_axis(_lerp_axis(x, 1), 2)


def upsample2x_nearest(x: Array) -> Array:
    """Nearest-neighbour x2 upsampling (``F.interpolate(scale_factor=2, mode='nearest')``)."""
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def max_pool2x2(x: Array) -> Array:
    """2x2 max-pool, stride 2 (``nn.MaxPool2d(2, 2)``: odd trailing rows/cols are dropped)."""
    return nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")


def fold_batchnorm(kernel: Array, bias: Array | None, bn_params: dict, bn_stats: dict,
                   epsilon: float = BN_EPSILON) -> tuple[Array, Array]:
    """Fold an inference-mode BatchNorm that follows a conv into the conv's kernel and bias.

    BN(conv(x)) = gamma * (conv(x) + b - mean) / sqrt(var + eps) + beta
                = conv_{W * s}(x) + (b - mean) * s + beta,   s = gamma / sqrt(var + eps).
    Exact in real arithmetic; in float32 it differs from the unfolded form by rounding only.
    A conv without bias (``bias=None``) is folded as if its bias were 0.
    """
    s = bn_params["scale"] * jax.lax.rsqrt(bn_stats["var"] + epsilon)
    b = -bn_stats["mean"] if bias is None else bias - bn_stats["mean"]
    return kernel * s, b * s + bn_params["bias"]


def bn_name(conv_name: str) -> str:
    """The name of the BatchNorm that follows the conv ``conv_name`` (``conv1`` -> ``bn1``)."""
    if "conv" not in conv_name:
        raise ValueError(f"a conv followed by BatchNorm must have 'conv' in its name: {conv_name!r}")
    return conv_name.replace("conv", "bn", 1)


class Conv(nn.Module):
    """The parameters of a conv: HWIO kernel and (optional) bias, PyTorch's default init
    (``nn.Conv2d(..., bias=use_bias)``)."""

    features: int
    kernel_size: int = 3
    use_bias: bool = True
    kernel_init: Any = None  # default: torch_default_init(fan_in)

    @nn.compact
    def weights(self, in_features: int) -> tuple[Array, Array | None]:
        k = self.kernel_size
        init = torch_default_init(in_features * k * k)
        kernel = self.param("kernel", self.kernel_init or init, (k, k, in_features, self.features))
        bias = self.param("bias", init, (self.features,)) if self.use_bias else None
        return kernel, bias


def conv_bn(module: nn.Module, x: ConvInput, features: int, *, name: str, numerics, role: str,
            train: bool, kernel_size: int = 3, stride: int = 1, padding: int | None = None,
            use_bias: bool = True, kernel_init=None) -> Array:
    """``BatchNorm(conv(x))`` with the conv named ``name`` and the BatchNorm :func:`bn_name`,
    both created in ``module``'s scope (call it from a compact method). No activation.

    Training: batch statistics, ``batch_stats`` updated, plain float32 conv. Inference: the
    BatchNorm is folded into the conv (:func:`fold_batchnorm`) -- unless the variables were
    folded beforehand (``inference.fold_batchnorm_variables``: the BatchNorm's parameters are
    then absent) -- and the conv runs through ``numerics`` with its ``role``.
    """
    in_features = sum(p.shape[-1] for p in input_parts(x))
    kernel, bias = Conv(features, kernel_size, use_bias, kernel_init, name=name).weights(in_features)
    bname = bn_name(name)
    bn = nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM, epsilon=BN_EPSILON,
                      name=bname)
    initializing = module.is_initializing()
    prefolded = not initializing and bname not in module.variables.get("params", {})
    if train:
        if prefolded:
            raise ValueError(
                f"{module.name}/{name}: these variables have BatchNorm folded into the convs "
                "(fold_batchnorm_variables) and can only run inference; train from the unfolded "
                "variables (the checkpoint as saved)")
        return bn(conv2d(x, kernel, bias, stride=stride, padding=padding))
    if initializing:  # create the BatchNorm's variables
        bn(jnp.zeros((1, 1, 1, features), jnp.float32))
    if not prefolded:
        kernel, bias = fold_batchnorm(kernel, bias, bn.variables["params"],
                                      bn.variables["batch_stats"])
    elif bias is None:  # folded trees always carry a bias
        bias = module.variables["params"][name]["bias"]
    return numerics.conv(module, name, x, kernel, bias, role, stride=stride, padding=padding)


def conv_head(module: nn.Module, x: Array, features: int, *, name: str, numerics,
              train: bool) -> Array:
    """A 1x1 conv with bias producing logits (role :data:`ROLE_HEAD`), float32 out."""
    kernel, bias = Conv(features, 1, name=name).weights(x.shape[-1])
    out = conv2d(x, kernel, bias) if train else numerics.conv(module, name, x, kernel, bias,
                                                              ROLE_HEAD)
    return out.astype(jnp.float32)


def max_pool3x3_stride2(x: Array) -> Array:
    """3x3 max-pool, stride 2, padding 1 (``nn.MaxPool2d(3, 2, 1)``: torchvision ResNet's stem).
    The padding is -inf, as PyTorch's: a padded position never wins."""
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


def conv_plain(module: nn.Module, x: ConvInput, features: int, *, name: str, numerics,
               role: str, train: bool, kernel_size: int = 1, stride: int = 1,
               padding: int | None = None, use_bias: bool = True) -> Array:
    """A conv *not* followed by BatchNorm (``nn.Conv2d(..., bias=use_bias)``), named ``name`` in
    ``module``'s scope, PyTorch's default init. Training: plain float32 conv; inference: through
    ``numerics`` with ``role`` (a conv without bias gets a zero bias there). No activation; the
    output dtype is whatever ``numerics`` returns (cast heads to float32 yourself)."""
    in_features = sum(p.shape[-1] for p in input_parts(x))
    kernel, bias = Conv(features, kernel_size, use_bias, name=name).weights(in_features)
    if train:
        return conv2d(x, kernel, bias, stride=stride, padding=padding)
    if bias is None:
        bias = jnp.zeros((features,), kernel.dtype)
    return numerics.conv(module, name, x, kernel, bias, role, stride=stride, padding=padding)
