"""How inference convolutions are computed: one table of precisions.

Every model runs each inference-mode convolution (BatchNorm already folded in) as
``numerics.conv(module, name, x, kernel, bias, role, stride=1, padding=None)``; swapping the
numerics object is all a precision does, so the topology is written once. ``role`` is one of
``layers.ROLES``; precision code decides by role, never by layer name.

:data:`PRECISIONS` is the table that evaluation, the benchmark and the command-line tools read.
A precision's options are fields of its (frozen, hashable) dataclass, so they travel inside the
object and each distinct choice compiles to its own program::

    numerics = get_numerics("int8", skip_first_conv=True)
    model = model.clone(numerics=numerics)

Adding a precision: one dataclass here with ``name``/``summary`` and a ``conv`` method, and one
entry in :data:`PRECISIONS`.

The emulations (what the vendor's engines do, computed in float32):

* ``fp16`` / ``bf16``: folded weights, bias and conv input cast to float16 (bfloat16),
  accumulation in float32, output rounded back. ReLU, max-pool, upsampling and concatenation
  then run on the 16-bit values; heads' logits are cast to float32 and the sigmoid runs in
  float32.
* ``int8``: weights symmetric per output channel (max |w| / 127, round to nearest, clip to
  [-127, 127]); each conv input quantized symmetrically per tensor with a calibrated scale ``s``:
  ``clip(round(x / s), -127, 127)``. The convolution runs on the integer grid (integer-valued
  float32 operands, exactly what an int8 kernel multiplies) and is rescaled by ``s * s_w`` per
  output channel; the bias stays float. Max-pool, upsampling, concatenation and the sigmoid run
  in float. The scales are data: the ``'quant'`` collection, a tree mirroring ``params`` with a
  site per conv input (``'<conv>_in'``) and, for ``requantize_concat_inputs``, per node output
  (``'<conv>_out'``); see ``docs/quantization.md``.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Protocol

import jax
import jax.numpy as jnp

from unetpp_jax.layers import ROLE_INPUT, ROLE_NODE, ConvInput, concat_parts, conv2d, map_parts

Array = jax.Array

QUANT_COLLECTION = "quant"  # calibrated activation scales, a pytree mirroring 'params'
RECORD_COLLECTION = "calibration_record"  # where Record sows the activations
INT8_MAX = 127  # symmetric int8 grid [-127, 127] (TVM's clip, TensorRT's narrow range)


class Numerics(Protocol):
    """How an inference-mode convolution is computed.

    ``module`` is the calling Flax module (so an implementation can read or ``sow`` per-site
    variables under the conv's name); ``x`` is a ``layers.ConvInput`` (an array or the parts of
    a concatenation).
    """

    name: ClassVar[str]

    def conv(self, module, name: str, x: ConvInput, kernel: Array, bias: Array, role: str, *,
             stride: int = 1, padding: int | None = None) -> Array:
        ...


def site_name(conv_name: str, where: str = "in") -> str:
    """A calibration site: the input (``'conv1_in'``) or output (``'conv2_out'``) of a conv.

    Suffixed so that a ``'quant'`` variable never shares a name with the conv's submodule."""
    return f"{conv_name}_{where}"


def quantize_to_grid(x: Array, scale: Array) -> Array:
    """``clip(round(x / scale), -127, 127)``: the int8 values, kept as float32."""
    return jnp.clip(jnp.round(x / scale), -INT8_MAX, INT8_MAX)


def fake_quantize(x: Array, scale: Array) -> Array:
    """Symmetric per-tensor int8 fake quantization: the int8 grid value times the scale."""
    return quantize_to_grid(x, scale) * scale


def quantize_weights(kernel: Array) -> tuple[Array, Array]:
    """Symmetric per-output-channel int8 weights of an HWIO kernel: the integer-valued kernel
    and the per-channel scales ``max |w| / 127`` (an all-zero channel gets scale 1)."""
    amax = jnp.max(jnp.abs(kernel), axis=tuple(range(kernel.ndim - 1)))
    scale = jnp.where(amax > 0, amax / INT8_MAX, 1.0).astype(kernel.dtype)
    return quantize_to_grid(kernel, scale), scale


def read_scale(module, site: str) -> Array:
    """The calibrated scale of ``site`` in ``module``'s scope, or a ValueError saying how to
    provide one."""
    scale = module.get_variable(QUANT_COLLECTION, site)
    if scale is None:
        path = "/".join((*module.scope.path, site))
        raise ValueError(
            f"int8 numerics found no calibrated scale at '{QUANT_COLLECTION}/{path}': apply the "
            "int8 model to calibration.attach(variables) (variables | {'quant': scales}), with "
            "scales from quant.calibrate() on a model of the same architecture")
    return scale


@dataclasses.dataclass(frozen=True)
class Float32:
    """Plain float32 inference: the default."""

    name: ClassVar[str] = "fp32"
    summary: ClassVar[str] = "float32"
    needs_calibration: ClassVar[bool] = False

    def conv(self, module, name, x, kernel, bias, role, *, stride=1, padding=None):
        del module, name, role
        return conv2d(x, kernel, bias, stride=stride, padding=padding)


@dataclasses.dataclass(frozen=True)
class Float16:
    """fp16 emulation: float16 operands, float32 accumulation, float16 result."""

    name: ClassVar[str] = "fp16"
    summary: ClassVar[str] = "float16 operands and results, float32 accumulation (emulated)"
    needs_calibration: ClassVar[bool] = False
    dtype: ClassVar = jnp.float16

    def conv(self, module, name, x, kernel, bias, role, *, stride=1, padding=None):
        del module, name, role
        d = self.dtype
        return conv2d(map_parts(lambda p: p.astype(d), x), kernel.astype(d), bias.astype(d),
                      stride=stride, padding=padding)


@dataclasses.dataclass(frozen=True)
class BFloat16(Float16):
    """bf16 emulation: bfloat16 operands, float32 accumulation, bfloat16 result."""

    name: ClassVar[str] = "bf16"
    summary: ClassVar[str] = "bfloat16 operands and results, float32 accumulation (emulated)"
    dtype: ClassVar = jnp.bfloat16


@dataclasses.dataclass(frozen=True)
class Int8:
    """int8 emulation with calibrated per-tensor activation scales.

    Attributes:
      skip_first_conv: keep the conv that reads the image (role ``input``) in float, as TVM's
        ``skip_conv_layers=[0]`` does. Off by default (the vendor's config keeps none).
      requantize_concat_inputs: also round every node output (role ``node``) at its own scale
        before it reaches a concatenation (two int8 roundings, as in an int8-everywhere runtime);
        off, each conv input is rounded once at its shared per-tensor scale, as in TVM.
    """

    name: ClassVar[str] = "int8"
    summary: ClassVar[str] = ("int8 weights per channel, int8 activations per tensor with "
                              "calibrated scales (emulated)")
    needs_calibration: ClassVar[bool] = True
    skip_first_conv: bool = False
    requantize_concat_inputs: bool = False

    def conv(self, module, name, x, kernel, bias, role, *, stride=1, padding=None):
        if self.skip_first_conv and role == ROLE_INPUT:
            return conv2d(x, kernel, bias, stride=stride, padding=padding)
        s = read_scale(module, site_name(name, "in"))
        wq, ws = quantize_weights(kernel)
        # One per-tensor scale for the whole (concatenated) input, applied part by part.
        xq = map_parts(lambda p: quantize_to_grid(p.astype(jnp.float32), s), x)
        y = conv2d(xq, wq, stride=stride, padding=padding) * (s * ws) + bias
        if self.requantize_concat_inputs and role == ROLE_NODE:
            y = fake_quantize(y, read_scale(module, site_name(name, "out")))
        return y


@dataclasses.dataclass(frozen=True)
class Record:
    """float32 numerics that also sow every conv input (and every node output after its ReLU)
    into the ``calibration_record`` collection, for ``quant.calibrate``."""

    name: ClassVar[str] = "calibration-record"
    summary: ClassVar[str] = "float32, recording conv inputs for int8 calibration"
    needs_calibration: ClassVar[bool] = False

    def conv(self, module, name, x, kernel, bias, role, *, stride=1, padding=None):
        module.sow(RECORD_COLLECTION, site_name(name, "in"), concat_parts(x))
        y = conv2d(x, kernel, bias, stride=stride, padding=padding)
        if role == ROLE_NODE:
            module.sow(RECORD_COLLECTION, site_name(name, "out"), jnp.maximum(y, 0))
        return y


# The table: name -> numerics class. Evaluation, the benchmark and every CLI read it.
PRECISIONS: dict[str, type] = {cls.name: cls for cls in (Float32, Float16, BFloat16, Int8, Record)}
EVAL_PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "bf16", "int8")  # what --precision offers


def get_numerics(precision, **options):
    """The numerics object of a precision name, with its options (unknown options raise).
    A numerics object passes through (options must then be empty)."""
    if not isinstance(precision, str):
        if options:
            raise ValueError("options are given with a precision name, not a numerics object")
        return precision
    cls = PRECISIONS.get(precision)
    if cls is None:
        raise ValueError(f"unknown precision {precision!r}; expected one of {tuple(PRECISIONS)}")
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = set(options) - fields
    if unknown:
        raise ValueError(f"precision {precision!r} has no option(s) {sorted(unknown)}; "
                         f"it takes {sorted(fields) or 'none'}")
    return cls(**options)


def options_of(numerics) -> dict:
    """The options a numerics object was built with (its dataclass fields)."""
    return dataclasses.asdict(numerics)


def with_numerics(model, precision, **options):
    """``model`` with its inference convolutions computed at ``precision`` (a static choice:
    each compiles to its own program; int8 needs ``calibration.attach(variables)``)."""
    return model.clone(numerics=get_numerics(precision, **options))
