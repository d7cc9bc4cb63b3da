"""How inference convolutions are computed: one table of precisions.

Every model runs each inference-mode convolution (BatchNorm already folded in) as
``numerics.conv(module, name, x, kernel, bias, role, stride=1, padding=None)``; swapping the
numerics object is all a precision does, so the topology is written once. ``role`` is one of
``layers.ROLES``; precision code decides by role, never by layer name.

:data:`PRECISIONS` is the table that evaluation, the benchmark and the command-line tools read.
A precision's options are fields of its (frozen, hashable) dataclass, so they travel inside the
object and each distinct choice compiles to its own program::

    numerics = get_numerics("int8", skip_first_conv=True, execution="native")
    model = model.clone(numerics=numerics)

How a precision is *executed* is one of those options, not another table entry: ``fp16``,
``bf16`` and ``int8`` take ``execution="emulated"`` (the default: the vendor engines' arithmetic,
computed in float32 where it must be exact) or ``"native"`` (the narrow dtypes handed to XLA:
int8 x int8 -> int32 convolutions, bfloat16 convolutions). Both executions of a precision read
the same calibration, round at the same sites on the same grids, and agree to float rounding;
every other option (which convs stay float, the sensitivity switches) applies to both.

Adding a precision: one dataclass here with ``name``/``summary`` and a ``conv`` method, and one
entry in :data:`PRECISIONS`. What each precision computes, and how int8 relates to TVM and to
QDQ runtimes, is in ``docs/quantization.md``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar, Protocol

import jax
import jax.numpy as jnp

from unetpp_jax import fastconv
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


FASTCONV_COLLECTION = "fastconv"  # Winograd-transformed kernels, a pytree mirroring 'params'


@dataclasses.dataclass(frozen=True)
class Float32:
    """Plain float32 inference: the default.

    ``conv_impl`` says how its convolutions run (``unetpp_jax.fastconv``): ``'xla'`` (default:
    always XLA's convolution, the reference), ``'auto'`` (opt-in: Winograd F(4x4,3x3) for the
    3x3 convs where it is faster on the CPU backend, XLA's convolution elsewhere and on
    GPU/TPU), ``'winograd4'`` or ``'winograd2'`` (every 3x3 stride-1 conv). ``'auto'`` is not
    the default because F(4x4) trades accuracy: 4.0e-6 from the float64 twin on the bundled
    model (XLA's conv: 3.8e-6) but up to 2.0e-5 from PyTorch on the converter tests'
    random-weight twins, above their 1e-5 parity bar (docs/performance.md). Winograd kernels prepared once
    (:func:`prepare_variables`, collection ``'fastconv'``) are used when present.
    """

    name: ClassVar[str] = "fp32"
    summary: ClassVar[str] = "float32"
    needs_calibration: ClassVar[bool] = False
    conv_impl: str = "xla"

    def __post_init__(self):
        if self.conv_impl not in fastconv.IMPLS:
            raise ValueError(f"conv_impl must be one of {fastconv.IMPLS}, got {self.conv_impl!r}")

    def conv(self, module, name, x, kernel, bias, role, *, stride=1, padding=None):
        del role
        if self.conv_impl == "xla":
            return conv2d(x, kernel, bias, stride=stride, padding=padding)
        return fastconv.conv2d(x, kernel, bias, impl=self.conv_impl, stride=stride,
                               padding=padding,
                               transformed=module.get_variable(FASTCONV_COLLECTION, name))

    def winograd_tile(self) -> int | None:
        """The tile size m whose transformed kernels :func:`prepare_variables` computes once
        (None: this numerics runs no Winograd conv on this backend)."""
        if self.conv_impl == "auto":
            return 4 if jax.default_backend() == "cpu" else None
        return fastconv.TILE.get(self.conv_impl)


EXECUTIONS = ("emulated", "native")  # how fp16 / bf16 / int8 convolutions are executed
SWITCH_SUFFIX = "quantized"  # '<conv>_quantized': the per-conv switch of Int8(switchable=True)
WEIGHT_SUFFIXES = ("wq", "ws")  # '<conv>_wq' int8 kernel, '<conv>_ws' its per-channel scales


def _check_execution(numerics) -> None:
    if numerics.execution not in EXECUTIONS:
        raise ValueError(f"{numerics.name}: execution must be one of {EXECUTIONS}, "
                         f"got {numerics.execution!r}")


def conv_path(module, name: str) -> str:
    """The conv's path in the parameter tree, ``'conv0_1/conv1'`` or ``'final4'`` (how
    ``Int8.keep_float`` and the sensitivity ranking name convs)."""
    return "/".join((*module.scope.path, name))


@dataclasses.dataclass(frozen=True)
class Float16:
    """fp16: float16 operands and results.

    ``execution='emulated'`` (default): the conv accumulates in float32
    (``preferred_element_type=float32``) and its result, plus the bias, is rounded to float16:
    what the vendor's engine guarantees. ``'native'``: the conv is asked for a float16 result
    (``preferred_element_type=float16``), so the backend's own conv kernel decides how it
    accumulates, and the bias is added in float16.
    """

    name: ClassVar[str] = "fp16"
    summary: ClassVar[str] = "float16 operands and results, float32 accumulation"
    needs_calibration: ClassVar[bool] = False
    dtype: ClassVar = jnp.float16
    execution: str = "emulated"

    def __post_init__(self):
        _check_execution(self)

    def conv(self, module, name, x, kernel, bias, role, *, stride=1, padding=None):
        del module, name, role
        d = self.dtype
        accumulate = jnp.float32 if self.execution == "emulated" else d
        return conv2d(map_parts(lambda p: p.astype(d), x), kernel.astype(d), bias.astype(d),
                      stride=stride, padding=padding, preferred_element_type=accumulate)

    def compiler_options(self) -> dict | None:
        return None


@dataclasses.dataclass(frozen=True)
class BFloat16(Float16):
    """bf16: bfloat16 operands and results (executions as :class:`Float16`)."""

    name: ClassVar[str] = "bf16"
    summary: ClassVar[str] = "bfloat16 operands and results, float32 accumulation"
    dtype: ClassVar = jnp.bfloat16


# XLA:CPU runs s8 x s8 -> s32 convolutions in YNNPACK; with YNNPACK off (the package's default
# for float programs, inference.compiler_options) it converts both operands to s32 and runs a
# generic loop, ~10x slower than the float conv. Native int8 programs therefore turn YNNPACK's
# convolutions on (and only those).
_YNN_CONVOLUTIONS = {"xla_cpu_experimental_ynn_fusion_type":
                     "LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION"}


@functools.lru_cache(maxsize=None)
def native_int8_compiler_options() -> dict:
    """Compiler options of native int8 programs: YNNPACK convolutions on CPU where the running
    jaxlib knows that option, nothing elsewhere (GPU: XLA picks its own int8 conv kernels)."""
    if jax.default_backend() != "cpu":
        return {}
    try:
        jax.jit(lambda x: x + 1, compiler_options=_YNN_CONVOLUTIONS).lower(
            jnp.zeros((), jnp.float32)).compile()
    except Exception:  # an older or newer jaxlib without this option or value
        return {}
    return dict(_YNN_CONVOLUTIONS)


@dataclasses.dataclass(frozen=True)
class Int8:
    """int8 with calibrated per-tensor activation scales and per-channel weights.

    Attributes:
      skip_first_conv: keep the conv that reads the image (role ``input``) in float, as TVM's
        ``skip_conv_layers=[0]`` does. Off by default (the vendor's config keeps none).
      requantize_concat_inputs: also round every node output (role ``node``) at its own scale
        before it reaches a concatenation (two int8 roundings, as in an int8-everywhere runtime);
        off, each conv input is rounded once at its shared per-tensor scale, as in TVM.
      execution: ``'emulated'`` (default): the integer grid values held in float32, a float32
        conv, rescaled by ``s * s_w``. ``'native'``: the conv input cast to an ``int8`` array,
        the kernel ``int8``, ``conv(int8, int8) -> int32`` (``preferred_element_type=int32``:
        exact), then one float rescale ``acc * (s * s_w) + bias``. The same values up to the
        float32 rounding of sums beyond 2**24 in the emulation. Precomputed int8 kernels
        (:func:`prepare_variables`) are used when present.
      keep_float: paths of convs (``'conv0_1/conv1'``, ``'final4'``; :func:`conv_path`) that stay
        float32: mixed precision. A tuple, so the object stays hashable.
      switchable: every conv reads a switch ``'<conv>_quantized'`` (a float32 scalar, 1 =
        quantized, 0 = float32) from the ``'quant'`` collection and runs one branch of a
        ``lax.cond``: which convs are quantized is then data, so one compiled program serves the
        whole sensitivity pass (:func:`switches`). A missing switch means quantized.
    """

    name: ClassVar[str] = "int8"
    summary: ClassVar[str] = ("int8 weights per channel, int8 activations per tensor with "
                              "calibrated scales")
    needs_calibration: ClassVar[bool] = True
    skip_first_conv: bool = False
    requantize_concat_inputs: bool = False
    execution: str = "emulated"
    keep_float: tuple[str, ...] = ()
    switchable: bool = False

    def __post_init__(self):
        _check_execution(self)
        if isinstance(self.keep_float, str):
            raise ValueError("keep_float is a tuple of conv paths, not one string")
        object.__setattr__(self, "keep_float", tuple(self.keep_float))

    def compiler_options(self) -> dict | None:
        return native_int8_compiler_options() if self.execution == "native" else None

    def conv(self, module, name, x, kernel, bias, role, *, stride=1, padding=None):
        if ((self.skip_first_conv and role == ROLE_INPUT)
                or (self.keep_float and conv_path(module, name) in self.keep_float)):
            return conv2d(x, kernel, bias, stride=stride, padding=padding)
        s = read_scale(module, site_name(name, "in"))
        out_scale = (read_scale(module, site_name(name, "out"))
                     if self.requantize_concat_inputs and role == ROLE_NODE else None)
        wq, ws = self._weights(module, name, kernel)

        def quantized(x):
            if self.execution == "native":
                xq = map_parts(lambda p: quantize_to_grid(p.astype(jnp.float32), s)
                               .astype(jnp.int8), x)
                acc = conv2d(xq, wq.astype(jnp.int8), stride=stride, padding=padding,
                             preferred_element_type=jnp.int32)
                y = acc.astype(jnp.float32) * (s * ws) + bias
            else:
                # One per-tensor scale for the whole (concatenated) input, applied part by part.
                xq = map_parts(lambda p: quantize_to_grid(p.astype(jnp.float32), s), x)
                y = conv2d(xq, wq.astype(jnp.float32), stride=stride, padding=padding) * (
                    s * ws) + bias
            return y if out_scale is None else fake_quantize(y, out_scale)

        if not self.switchable:
            return quantized(x)
        switch = module.get_variable(QUANT_COLLECTION, site_name(name, SWITCH_SUFFIX))
        if switch is None:
            return quantized(x)
        x = map_parts(lambda p: p.astype(jnp.float32), x)
        return jax.lax.cond(switch > 0, quantized,
                            lambda x: conv2d(x, kernel, bias, stride=stride, padding=padding), x)

    @staticmethod
    def _weights(module, name, kernel):
        """The int8 kernel and its per-channel scales: precomputed (:func:`prepare_variables`)
        when the ``'quant'`` collection holds them, else quantized here."""
        wq = module.get_variable(QUANT_COLLECTION, site_name(name, WEIGHT_SUFFIXES[0]))
        if wq is not None:
            return wq, module.get_variable(QUANT_COLLECTION, site_name(name, WEIGHT_SUFFIXES[1]))
        return quantize_weights(kernel)


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


# ------------------------------------------------------------------ per-checkpoint preparation


def _kernels(params, path=()):
    """``(scope path, conv name, kernel)`` of every 4-d conv kernel in a params tree."""
    for key, value in params.items():
        if isinstance(value, dict) or hasattr(value, "items"):
            if "kernel" in value and getattr(value["kernel"], "ndim", 0) == 4:
                yield path, key, value["kernel"]
            else:
                yield from _kernels(value, (*path, key))


@jax.jit
def _quantized_kernels(kernels):
    return [quantize_weights(k) for k in kernels]


def quantized_weight_tree(params) -> dict:
    """A ``'quant'``-collection tree with every conv's int8 kernel (``'<conv>_wq'``, int8 HWIO)
    and its per-channel scales (``'<conv>_ws'``, float32), mirroring ``params`` as the scale
    sites do. ``params`` must be BatchNorm-folded (the kernels the convs really use)."""
    found = list(_kernels(params))
    quantized = _quantized_kernels([k for _, _, k in found])
    tree: dict = {}
    for (path, name, _), (wq, ws) in zip(found, quantized):
        node = tree
        for key in path:
            node = node.setdefault(key, {})
        node[site_name(name, WEIGHT_SUFFIXES[0])] = wq.astype(jnp.int8)
        node[site_name(name, WEIGHT_SUFFIXES[1])] = ws
    return tree


def winograd_kernel_tree(params, m: int = 4) -> dict:
    """A ``'fastconv'``-collection tree with the Winograd-transformed kernel
    (``fastconv.transform_kernel``, float64 on the host, rounded once) of every 3x3 conv of
    ``params``, under the conv's name, mirroring ``params``. ``params`` must be BatchNorm-folded
    (the kernels the convs really use)."""
    tree: dict = {}
    for path, name, kernel in _kernels(params):
        if tuple(kernel.shape[:2]) != (3, 3):
            continue
        node = tree
        for key in path:
            node = node.setdefault(key, {})
        node[name] = fastconv.transform_kernel(kernel, m)
    return tree


def merge_trees(a, b) -> dict:
    """Nested dicts ``a`` and ``b`` merged (``b`` wins on a leaf both hold)."""
    out = dict(a)
    for k, v in b.items():
        out[k] = merge_trees(out[k], v) if isinstance(v, dict) and isinstance(
            out.get(k), dict) else v
    return out


def prepare_variables(numerics, variables):
    """Variables as ``numerics`` runs them, computed once per checkpoint rather than in every
    call (as ``inference.fold_batchnorm_variables`` folds BatchNorm once): BatchNorm folded; for
    float32 running Winograd convs (:meth:`Float32.winograd_tile`), every 3x3 kernel's transform
    in the ``'fastconv'`` collection (:func:`winograd_kernel_tree`); for native int8, every
    conv's int8 kernel and per-channel scales added to the ``'quant'`` collection
    (:func:`quantized_weight_tree`; the float kernels stay, for ``keep_float``)."""
    from unetpp_jax.inference import fold_batchnorm_variables

    variables = fold_batchnorm_variables(variables)
    tile = numerics.winograd_tile() if isinstance(numerics, Float32) else None
    if tile is not None:
        variables = {**variables, FASTCONV_COLLECTION: winograd_kernel_tree(variables["params"],
                                                                            tile)}
    if isinstance(numerics, Int8) and numerics.execution == "native":
        weights = quantized_weight_tree(variables["params"])
        variables = {**variables, QUANT_COLLECTION: merge_trees(
            dict(variables.get(QUANT_COLLECTION, {})), weights)}
    return variables


def program_compiler_options(numerics) -> dict:
    """Compiler options of an inference program at ``numerics``: the package's
    (``inference.compiler_options``) unless the numerics need their own (native int8)."""
    from unetpp_jax.inference import compiler_options

    own = getattr(numerics, "compiler_options", lambda: None)()
    return compiler_options() if own is None else own


def switches(conv_paths, quantized) -> dict:
    """A ``'quant'``-collection tree of :class:`Int8` ``switchable`` switches: 1.0 for the convs
    in ``quantized``, 0.0 for the other ``conv_paths``."""
    quantized = set(quantized)
    tree: dict = {}
    for path in conv_paths:
        *scope, name = path.split("/")
        node = tree
        for key in scope:
            node = node.setdefault(key, {})
        node[site_name(name, SWITCH_SUFFIX)] = jnp.float32(path in quantized)
    return tree
