"""Map a UNET-ZOO ``NestedUNet`` state_dict onto :class:`UNetPlusPlus` variables, strictly.

The target is the model's own variable tree, from ``jax.eval_shape`` of ``model.init`` (no
arrays are allocated). Each Flax leaf is named by one rule of :data:`RULES` -- a pattern over
its path, the PyTorch key it comes from, and the transform between the two layouts -- so the
set of expected PyTorch keys, and their shapes, follow from the model rather than from a list
kept by hand. Every missing key, unexpected key, shape mismatch and non-float tensor is
collected and raised together in one :class:`KeyMapError`.

Layouts (REFERENCE §2): PyTorch convs are OIHW, Flax kernels HWIO; ``conv{i}_{j}.conv.0/.3`` are
the block's two convs (``conv1``/``conv2``), ``.conv.1/.4`` its BatchNorms (``bn1``/``bn2``).

BatchNorm variance: ``running_var`` is loaded as-is into ``batch_stats[...]['var']``. That is
exactly what PyTorch's eval mode divides by, so inference reproduces PyTorch. PyTorch's running
estimate is built from the *unbiased* batch variance while Flax's training updates use the
*biased* one (a factor n/(n-1), n = batch x height x width, negligible at these sizes); this
only matters if training continues from the converted variables.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Mapping
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from unetpp_jax.model import WIDTHS, UNetPlusPlus

WRAPPER_KEYS = ("state_dict", "model", "net")  # torch.save({'state_dict': ...}) and friends
DATAPARALLEL_PREFIX = "module."
DROPPED_SUFFIX = ".num_batches_tracked"  # PyTorch's BN step counter; Flax keeps none
FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")


@dataclasses.dataclass(frozen=True)
class Transform:
    """A layout change PyTorch -> Flax, and the PyTorch shape a Flax shape corresponds to."""

    name: str
    to_flax: Callable[[np.ndarray], np.ndarray]
    torch_shape: Callable[[tuple], tuple]


IDENTITY = Transform("identity", lambda a: a, lambda s: tuple(s))
OIHW_TO_HWIO = Transform("OIHW->HWIO", lambda a: np.transpose(a, (2, 3, 1, 0)),
                         lambda s: (s[3], s[2], s[0], s[1]))

_SUBLAYER = {"conv1": "0", "bn1": "1", "conv2": "3", "bn2": "4"}  # nn.Sequential indices


@dataclasses.dataclass(frozen=True)
class Rule:
    flax_path: str  # regex over "collection/module/.../leaf"
    torch_key: str  # str.format template over the regex groups (sublayer names -> indices)
    transform: Transform


RULES: tuple[Rule, ...] = (
    Rule(r"params/(conv\d+_\d+)/(conv[12])/kernel", "{0}.conv.{1}.weight", OIHW_TO_HWIO),
    Rule(r"params/(conv\d+_\d+)/(conv[12])/bias", "{0}.conv.{1}.bias", IDENTITY),
    Rule(r"params/(conv\d+_\d+)/(bn[12])/scale", "{0}.conv.{1}.weight", IDENTITY),
    Rule(r"params/(conv\d+_\d+)/(bn[12])/bias", "{0}.conv.{1}.bias", IDENTITY),
    Rule(r"batch_stats/(conv\d+_\d+)/(bn[12])/mean", "{0}.conv.{1}.running_mean", IDENTITY),
    Rule(r"batch_stats/(conv\d+_\d+)/(bn[12])/var", "{0}.conv.{1}.running_var", IDENTITY),
    Rule(r"params/(final\d*)/kernel", "{0}.weight", OIHW_TO_HWIO),
    Rule(r"params/(final\d*)/bias", "{0}.bias", IDENTITY),
)


@dataclasses.dataclass(frozen=True)
class Target:
    """Where one PyTorch key goes: the Flax path, its transform, and the Flax shape."""

    path: tuple[str, ...]
    transform: Transform
    shape: tuple

    @property
    def torch_shape(self) -> tuple:
        return self.transform.torch_shape(self.shape)


class KeyMapError(ValueError):
    """The checkpoint and the model disagree; ``problems`` lists every disagreement."""

    def __init__(self, header: str, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join([header] + [f"  {p}" for p in problems]))


def abstract_variables(model: UNetPlusPlus, in_channels: int = 3) -> dict:
    """The model's variable tree as ``ShapeDtypeStruct`` leaves (``jax.eval_shape``, no compute).

    Parameter shapes do not depend on the spatial size, so a small 16x16 input is traced.
    """
    rng = jax.ShapeDtypeStruct((2,), jnp.uint32)
    x = jax.ShapeDtypeStruct((1, 16, 16, in_channels), jnp.float32)
    return jax.eval_shape(model.init, rng, x)


@functools.lru_cache(maxsize=8)
def _expected_keys_for(model: UNetPlusPlus, in_channels: int) -> dict[str, Target]:
    return expected_keys(abstract_variables(model, in_channels))


def expected_keys(abstract: Mapping) -> dict[str, Target]:
    """PyTorch key -> :class:`Target` for every leaf of an abstract variable tree."""
    targets: dict[str, Target] = {}
    for keypath, leaf in jax.tree_util.tree_flatten_with_path(dict(abstract))[0]:
        path = tuple(str(k.key) for k in keypath)
        joined = "/".join(path)
        for rule in RULES:
            m = re.fullmatch(rule.flax_path, joined)
            if m:
                key = rule.torch_key.format(*(_SUBLAYER.get(g, g) for g in m.groups()))
                targets[key] = Target(path, rule.transform, tuple(leaf.shape))
                break
        else:
            raise AssertionError(f"no rule in weights_port.keymap.RULES for model variable {joined}")
    return targets


def _is_tensor(x) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype") and not isinstance(x, Mapping)


def extract_state_dict(obj: Any) -> tuple[dict[str, Any], list[str]]:
    """The state_dict inside a loaded checkpoint, and notes on what was unwrapped.

    Accepts a bare state_dict, one wrapped under ``state_dict``/``model``/``net`` (training
    checkpoints that also hold an epoch or optimizer state), and DataParallel's ``module.``
    prefix on every key.
    """
    notes: list[str] = []
    if not isinstance(obj, Mapping):
        raise KeyMapError("no state_dict found", [f"the file holds a {type(obj).__name__}, "
                                                  "not a dict of tensors"])
    sd = obj
    if not (sd and all(_is_tensor(v) for v in sd.values())):
        for key in WRAPPER_KEYS:
            inner = sd.get(key)
            if isinstance(inner, Mapping) and inner and all(_is_tensor(v) for v in inner.values()):
                notes.append(f"state_dict taken from the checkpoint's {key!r} entry "
                             f"(ignored: {', '.join(sorted(map(str, set(sd) - {key}))) or 'nothing'})")
                sd = inner
                break
        else:
            top = ", ".join(repr(k) for k in list(sd)[:12]) or "nothing"
            raise KeyMapError("no state_dict found", [
                f"expected a dict of tensors, or one under {'/'.join(WRAPPER_KEYS)}; "
                f"the file's top-level keys are {top}"])
    if not all(isinstance(k, str) for k in sd):
        raise KeyMapError("no state_dict found", ["state_dict keys are not all strings"])
    if all(k.startswith(DATAPARALLEL_PREFIX) for k in sd):
        sd = {k[len(DATAPARALLEL_PREFIX):]: v for k, v in sd.items()}
        notes.append("'module.' prefix (DataParallel) stripped from every key")
    return dict(sd), notes


def detect_deep_supervision(keys) -> bool:
    """Four heads ``final1..final4`` (UNET-ZOO's default for UNet++) or one head ``final``."""
    keys = list(keys)
    if any(re.match(r"final\d+\.", k) for k in keys):
        return True
    return not any(k.startswith("final.") for k in keys)


@dataclasses.dataclass
class Conversion:
    variables: dict  # {'params': ..., 'batch_stats': ...} of float32 numpy arrays
    model: UNetPlusPlus
    mapped: int  # PyTorch entries loaded
    dropped: list[str]  # entries deliberately ignored (num_batches_tracked)
    notes: list[str]  # wrapper / prefix handling
    dtype_casts: dict[str, int]  # source dtype -> number of tensors cast to float32


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def convert_state_dict(obj: Any, *, widths=WIDTHS, num_classes: int = 1,
                       in_channels: int = 3) -> Conversion:
    """Convert a loaded UNET-ZOO checkpoint object into ``UNetPlusPlus`` variables.

    ``obj`` is what was unpickled (tensors anything with ``shape``/``dtype`` that ``np.asarray``
    accepts). The head layout decides ``deep_supervision``. Raises :class:`KeyMapError` listing
    every missing, unexpected, mis-shaped or non-float entry; nothing is partially converted.
    """
    sd, notes = extract_state_dict(obj)
    deep_supervision = detect_deep_supervision(sd)
    model = UNetPlusPlus(num_classes=num_classes, widths=tuple(widths),
                         deep_supervision=deep_supervision)
    targets = _expected_keys_for(model, in_channels)  # traced once per configuration

    bn_modules = {k[: -len(".running_mean")] for k in targets if k.endswith(".running_mean")}
    dropped = [k for k in sd if k.endswith(DROPPED_SUFFIX) and k[: -len(DROPPED_SUFFIX)] in bn_modules]
    drop = set(dropped)
    present = [k for k in sd if k not in drop]

    heads = "final1..final4" if deep_supervision else "final"
    missing = [f"missing: {k} (model expects {_fmt(t.torch_shape)})"
               for k, t in targets.items() if k not in sd]
    unexpected = [f"unexpected: {k} (checkpoint has {_fmt(sd[k].shape)})"
                  for k in present if k not in targets]
    mismatched, not_float = [], []
    for k in present:
        t = targets.get(k)
        if t is None:
            continue
        shape = tuple(sd[k].shape)
        if shape != t.torch_shape:
            mismatched.append(f"shape mismatch: {k}: checkpoint {_fmt(shape)}, "
                              f"model {_fmt(t.torch_shape)}")
        if np.dtype(sd[k].dtype).name not in FLOAT_DTYPES:
            not_float.append(f"dtype: {k} is {np.dtype(sd[k].dtype).name}, expected floating point")
    problems = missing + unexpected + mismatched + not_float
    if problems:
        counts = ", ".join(f"{n} {what}" for n, what in [
            (len(missing), "missing"), (len(unexpected), "unexpected"),
            (len(mismatched), "shape mismatches"), (len(not_float), "non-float")] if n)
        raise KeyMapError(
            f"checkpoint does not match UNetPlusPlus(deep_supervision={deep_supervision}, heads "
            f"{heads}): {counts} (shapes in PyTorch layout, OIHW for convs)", problems)

    variables: dict = {}
    casts: dict[str, int] = {}
    for k, t in targets.items():
        src_dtype = np.dtype(sd[k].dtype).name
        if src_dtype != "float32":
            casts[src_dtype] = casts.get(src_dtype, 0) + 1
        # np.array copies: the result never aliases the input (or the file's buffer).
        _set(variables, t.path, np.array(t.transform.to_flax(np.asarray(sd[k])),
                                         dtype=np.float32, order="C"))
    return Conversion(variables=variables, model=model, mapped=len(targets), dropped=dropped,
                      notes=notes, dtype_casts=casts)


def _fmt(shape) -> str:
    return str(tuple(int(n) for n in shape))


__all__ = ["RULES", "Rule", "Transform", "Target", "KeyMapError", "Conversion",
           "abstract_variables", "expected_keys", "extract_state_dict", "detect_deep_supervision",
           "convert_state_dict"]
