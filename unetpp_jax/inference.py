"""Inference: the jitted predict function, micro-batching, BatchNorm folding of a variable tree,
and the compiler options of the programs the package compiles.

    from unetpp_jax.model import load_pretrained
    from unetpp_jax.inference import fold_batchnorm_variables, predict_fn

    model, variables = load_pretrained()                   # the bundled model
    probs = predict_fn(model)(fold_batchnorm_variables(variables), x)   # tuple of heads
"""

from __future__ import annotations

import functools
import numbers
from collections.abc import Mapping

import jax
import jax.numpy as jnp

from unetpp_jax.layers import fold_batchnorm

Array = jax.Array

# XLA:CPU in jaxlib >= 0.9 hands convolutions to YNNPACK by default; its other path (Eigen's
# spatial convolution) runs UNet++'s convolutions faster on the CPUs measured in
# docs/performance.md, so inference programs turn YNNPACK's fusions off. Set per program, not
# through XLA_FLAGS: importing the package changes nothing for other JAX code.
_YNNPACK_OFF = {"xla_cpu_experimental_ynn_fusion_type": ""}


@functools.lru_cache(maxsize=None)
def compiler_options() -> dict:
    """The compiler options of the package's inference programs: YNNPACK off where the running
    jax/jaxlib knows that option (CPU), nothing elsewhere (older jaxlib rejects unknown options,
    and other backends have no YNNPACK)."""
    if jax.default_backend() != "cpu":
        return {}
    try:
        jax.jit(lambda x: x + 1, compiler_options=_YNNPACK_OFF).lower(
            jnp.zeros((), jnp.float32)).compile()
    except Exception:  # TypeError (no compiler_options) or XLA's unknown-option error
        return {}
    return dict(_YNNPACK_OFF)


def inference_jit(fun, **jit_kwargs):
    """``jax.jit(fun, **jit_kwargs)`` with the package's :func:`compiler_options`."""
    opts = compiler_options()
    if opts:
        jit_kwargs["compiler_options"] = opts
    return jax.jit(fun, **jit_kwargs)


def probabilities(logits, num_classes: int = 1):
    """Probabilities from the logits of one head or a tuple of heads: sigmoid for one class
    (UNET-ZOO's in-model sigmoid), softmax over the channels for several."""
    fn = jax.nn.sigmoid if num_classes == 1 else functools.partial(jax.nn.softmax, axis=-1)
    return jax.tree_util.tree_map(fn, logits)


# ------------------------------------------------------------------------ BatchNorm folding


def _bn_of(name: str) -> str | None:
    return name.replace("conv", "bn", 1) if "conv" in name else None


def _pairs(params: Mapping) -> dict[str, str]:
    """conv name -> BatchNorm name, for the convs of this scope followed by a BatchNorm."""
    out = {}
    for name, p in params.items():
        bn = _bn_of(name)
        if (bn and bn != name and isinstance(p, Mapping) and "kernel" in p
                and isinstance(params.get(bn), Mapping) and "scale" in params[bn]):
            out[name] = bn
    return out


def _has_batchnorm(params: Mapping) -> bool:
    return bool(_pairs(params)) or any(_has_batchnorm(p) for p in params.values()
                                       if isinstance(p, Mapping))


def _fold_tree(params: Mapping, stats: Mapping) -> dict:
    pairs = _pairs(params)
    bns = set(pairs.values())
    out = {}
    for name, p in params.items():
        if name in bns:
            continue
        if name in pairs:
            bn = pairs[name]
            kernel, bias = fold_batchnorm(p["kernel"], p.get("bias"), params[bn], stats[bn])
            out[name] = {"kernel": kernel, "bias": bias}
        elif isinstance(p, Mapping):
            out[name] = _fold_tree(p, stats.get(name, {}))
        else:
            out[name] = p
    return out


@jax.jit
def _fold_batchnorm_variables(variables: dict) -> dict:
    folded = _fold_tree(variables["params"], variables["batch_stats"])
    rest = {c: v for c, v in variables.items() if c not in ("params", "batch_stats")}
    return {"params": folded, **rest}


def fold_batchnorm_variables(variables: Mapping) -> dict:
    """Inference variables with every BatchNorm folded into the conv before it, once.

    Returns ``{'params': ...}`` (plus any collection other than ``batch_stats``, e.g.
    ``'quant'``) in which each conv followed by a BatchNorm (``layers.bn_name``) holds the folded
    kernel and bias and the BatchNorm entries are gone. The model notices the missing BatchNorm
    parameters and uses the kernels as they are: the same outputs in inference mode, up to
    float32 rounding of where the fold happens. Folded variables cannot train; folding folded
    variables returns them unchanged.
    """
    if not _has_batchnorm(variables["params"]):  # already folded
        return variables
    if "batch_stats" not in variables:
        raise ValueError("fold_batchnorm_variables: the params hold BatchNorm layers but there "
                         "is no 'batch_stats' collection (pass the checkpoint's whole variables)")
    return _fold_batchnorm_variables(dict(variables))


# ------------------------------------------------------------------------------ predicting


def map_in_micro_batches(fn, images: Array, micro_batch: int | None):
    """``fn(images)`` computed ``micro_batch`` images at a time (``lax.map``), results
    concatenated along the batch axis; ``None`` or a batch no larger than ``micro_batch``: one
    call. A trailing partial micro-batch is zero-padded and the padding dropped. Valid for any
    ``fn`` that treats images independently (inference: BatchNorm uses running statistics)."""
    n = images.shape[0]
    if micro_batch is None or n <= micro_batch:
        return fn(images)
    pad = -n % micro_batch
    if pad:
        images = jnp.concatenate([images, jnp.zeros((pad,) + images.shape[1:], images.dtype)])
    out = jax.lax.map(fn, images.reshape((-1, micro_batch) + images.shape[1:]))
    return jax.tree_util.tree_map(lambda y: y.reshape((-1,) + y.shape[2:])[:n], out)


def _predict(model, prune_level, micro_batch, variables, images):
    def forward(x):
        logits = model.apply(variables, x, train=False, prune_level=prune_level)
        return probabilities(logits, model.num_classes)

    return map_in_micro_batches(forward, images, micro_batch)


@functools.lru_cache(maxsize=None)
def _predict_program(options: tuple | None = None):
    """The jitted predict program for a set of compiler options (default: the package's)."""
    if options is None:
        return inference_jit(_predict, static_argnums=(0, 1, 2))
    opts = dict(options)
    return jax.jit(_predict, static_argnums=(0, 1, 2), **({"compiler_options": opts} if opts else {}))


def default_micro_batch() -> int | None:
    """Images per step of :func:`predict_fn`: 1 on CPU (a node's activations stay in cache),
    the whole batch elsewhere (accelerators want it at once)."""
    return 1 if jax.default_backend() == "cpu" else None


def predict_fn(model, prune_level: int | None = None, *, micro_batch: int | None | str = "auto",
               compiler_options: dict | None = None):
    """A jitted ``f(variables, images) -> probabilities`` in inference mode at one prune level
    (default: the model's depth).

    With deep supervision it returns a tuple of heads 1..prune_level (``[-1]`` is the head
    UNET-ZOO scores); without, one array. Probabilities: sigmoid for one class, softmax over the
    channel axis for several. The compiled program is cached per (model, prune level,
    micro-batch, input shape). ``variables``: the checkpoint's (BatchNorm folded inside every
    call) or :func:`fold_batchnorm_variables`' (folded once: faster). ``micro_batch``: images
    per step inside the program; ``"auto"`` is :func:`default_micro_batch`, ``None`` the whole
    batch at once. ``compiler_options``: XLA options of the program instead of the package's
    :func:`compiler_options` (native int8 asks for its own).
    """
    if isinstance(micro_batch, str) and micro_batch == "auto":
        micro_batch = default_micro_batch()
    if micro_batch is not None:
        if (isinstance(micro_batch, bool) or not isinstance(micro_batch, numbers.Integral)
                or micro_batch < 1):
            raise ValueError(
                f"micro_batch must be a positive int, None or 'auto', got {micro_batch!r}")
        micro_batch = int(micro_batch)  # numpy integers too; a plain int keys the jit cache
    if prune_level is None:
        prune_level = model.depth
    options = None if compiler_options is None else tuple(sorted(compiler_options.items()))
    return functools.partial(_predict_program(options), model, int(prune_level), micro_batch)
