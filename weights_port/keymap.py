"""Map a UNET-ZOO ``NestedUNet`` state_dict onto :class:`UNetPlusPlus` variables, strictly.

The target is the model's own variable tree, from ``jax.eval_shape`` of ``model.init`` (no
arrays are allocated). Each Flax leaf is named by one rule of :data:`RULES` -- a pattern over
its path, the PyTorch key it comes from, and the transform between the two layouts -- so the
set of expected PyTorch keys, and their shapes, follow from the model rather than from a list
kept by hand. Every missing key, unexpected key, shape mismatch and non-float tensor is
collected and raised together in one :class:`KeyMapError`.

Two source layouts (:data:`STYLES`), told apart by their keys (docs/converter.md):

* ``unet-zoo`` (UNET-ZOO ``NestedUNet``): ``conv{i}_{j}.conv.0/.3`` are the block's two convs
  (``conv1``/``conv2``), ``.conv.1/.4`` its BatchNorms (``bn1``/``bn2``);
* ``pytorch-nested-unet`` (4uiiurz1's ``NestedUNet`` and ``UNet``): ``conv{i}_{j}.conv1``,
  ``.bn1``, ``.conv2``, ``.bn2`` -- the Flax names themselves.

Heads are ``final1..final4`` or ``final`` in both. PyTorch convs are OIHW, Flax kernels HWIO. The
model's settings (heads, classes, input channels, widths, and ``UNet``'s plain skips) are read
from the tensors' names and shapes unless the caller passes them (``config.yml``).

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

from unetpp_jax.encoders.resnet import RESNETS
from unetpp_jax.model import WIDTHS, UNetPlusPlus, min_input_shape
from unetpp_jax.smp_unetplusplus import SMPUnetPlusPlus
from weights_port.torch_format import RESAVE_HINT, InertNamespace, printable

WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net")  # training checkpoints
DATAPARALLEL_PREFIX = "module."
DROPPED_SUFFIX = ".num_batches_tracked"  # PyTorch's BN step counter; Flax keeps none
FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")
MAX_LISTED = 5  # problems listed by name in an error; the rest are counted


@dataclasses.dataclass(frozen=True)
class Transform:
    """A layout change PyTorch -> Flax, and the PyTorch shape a Flax shape corresponds to."""

    name: str
    to_flax: Callable[[np.ndarray], np.ndarray]
    torch_shape: Callable[[tuple], tuple]


IDENTITY = Transform("identity", lambda a: a, lambda s: tuple(s))
OIHW_TO_HWIO = Transform("OIHW->HWIO", lambda a: np.transpose(a, (2, 3, 1, 0)),
                         lambda s: (s[3], s[2], s[0], s[1]))

SMP_STYLE = "smp-unetplusplus"  # segmentation_models_pytorch UnetPlusPlus (SMP_RULES)

# Per source layout: how a block's sublayer is spelled in the PyTorch key.
STYLES: dict[str, dict[str, str]] = {
    "unet-zoo": {"conv1": "conv.0", "bn1": "conv.1", "conv2": "conv.3", "bn2": "conv.4"},
    "pytorch-nested-unet": {"conv1": "conv1", "bn1": "bn1", "conv2": "conv2", "bn2": "bn2"},
    SMP_STYLE: {},  # spelled out by SMP_RULES' templates
}
ORIGINS = {"unet-zoo": "UNET-ZOO NestedUNet state_dict",
           "pytorch-nested-unet": "pytorch-nested-unet (4uiiurz1) {arch} state_dict",
           SMP_STYLE: "segmentation_models_pytorch {arch}"}


@dataclasses.dataclass(frozen=True)
class Rule:
    flax_path: str  # regex over "collection/module/.../leaf"
    torch_key: str  # str.format template over the regex groups (sublayers spelled per style)
    transform: Transform


RULES: tuple[Rule, ...] = (
    Rule(r"params/(conv\d+_\d+)/(conv[12])/kernel", "{0}.{1}.weight", OIHW_TO_HWIO),
    Rule(r"params/(conv\d+_\d+)/(conv[12])/bias", "{0}.{1}.bias", IDENTITY),
    Rule(r"params/(conv\d+_\d+)/(bn[12])/scale", "{0}.{1}.weight", IDENTITY),
    Rule(r"params/(conv\d+_\d+)/(bn[12])/bias", "{0}.{1}.bias", IDENTITY),
    Rule(r"batch_stats/(conv\d+_\d+)/(bn[12])/mean", "{0}.{1}.running_mean", IDENTITY),
    Rule(r"batch_stats/(conv\d+_\d+)/(bn[12])/var", "{0}.{1}.running_var", IDENTITY),
    Rule(r"params/(final\d*)/kernel", "{0}.weight", OIHW_TO_HWIO),
    Rule(r"params/(final\d*)/bias", "{0}.bias", IDENTITY),
)


def _conv_rules(flax: str, torch: str) -> tuple[Rule, ...]:
    """A conv's kernel and (optional) bias: ``params/<flax>/kernel`` <- ``<torch>.weight``."""
    return (Rule(rf"params/{flax}/kernel", f"{torch}.weight", OIHW_TO_HWIO),
            Rule(rf"params/{flax}/bias", f"{torch}.bias", IDENTITY))


def _bn_rules(flax: str, torch: str) -> tuple[Rule, ...]:
    """A BatchNorm: scale/bias <- weight/bias, batch_stats mean/var <- running_mean/var."""
    return (Rule(rf"params/{flax}/scale", f"{torch}.weight", IDENTITY),
            Rule(rf"params/{flax}/bias", f"{torch}.bias", IDENTITY),
            Rule(rf"batch_stats/{flax}/mean", f"{torch}.running_mean", IDENTITY),
            Rule(rf"batch_stats/{flax}/var", f"{torch}.running_var", IDENTITY))


# segmentation_models_pytorch UnetPlusPlus (unetpp_jax.smp_unetplusplus.SMPUnetPlusPlus): the
# torchvision ResNet encoder under encoder.*, smp's DecoderBlocks (Conv2dReLU = Sequential(conv,
# BatchNorm, ReLU), so conv{k}.0 / conv{k}.1; SCSEModule's cSE.1, cSE.3, sSE.0), the head.
_LAYER = r"encoder/layer(\d)_(\d+)"
_BLOCK = r"decoder/(x_\d+_\d+)"
SMP_RULES: tuple[Rule, ...] = (
    *_conv_rules("encoder/conv1", "encoder.conv1"),
    *_bn_rules("encoder/bn1", "encoder.bn1"),
    *_conv_rules(rf"{_LAYER}/(conv\d)", "encoder.layer{0}.{1}.{2}"),
    *_bn_rules(rf"{_LAYER}/(bn\d)", "encoder.layer{0}.{1}.{2}"),
    *_conv_rules(rf"{_LAYER}/downsample_conv", "encoder.layer{0}.{1}.downsample.0"),
    *_bn_rules(rf"{_LAYER}/downsample_bn", "encoder.layer{0}.{1}.downsample.1"),
    *_conv_rules(rf"{_BLOCK}/conv([12])", "decoder.blocks.{0}.conv{1}.0"),
    *_bn_rules(rf"{_BLOCK}/bn([12])", "decoder.blocks.{0}.conv{1}.1"),
    *_conv_rules(rf"{_BLOCK}/(attention[12])/cse_conv1", "decoder.blocks.{0}.{1}.attention.cSE.1"),
    *_conv_rules(rf"{_BLOCK}/(attention[12])/cse_conv2", "decoder.blocks.{0}.{1}.attention.cSE.3"),
    *_conv_rules(rf"{_BLOCK}/(attention[12])/sse_conv", "decoder.blocks.{0}.{1}.attention.sSE.0"),
    *_conv_rules("segmentation_head", "segmentation_head.0"),
)


def rules_for(style: str) -> tuple[Rule, ...]:
    """The rule table of a source layout."""
    return SMP_RULES if style == SMP_STYLE else RULES


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
    """The checkpoint and the model disagree; ``problems`` lists every disagreement.

    The message is short whatever the file: the header, a few ``hints`` (what the file looks
    like, what to do), the first :data:`MAX_LISTED` problems and a count of the rest.
    """

    def __init__(self, header: str, problems: list[str], hints: list[str] = ()):
        self.header, self.problems, self.hints = header, list(problems), list(hints)
        shown = self.problems[:MAX_LISTED]
        lines = [header] + [f"  {h}" for h in self.hints] + [f"  {p}" for p in shown]
        if len(self.problems) > len(shown):
            lines.append(f"  ... and {len(self.problems) - len(shown)} more")
        super().__init__("\n".join(lines))


class NonFiniteError(ValueError):
    """Some weights are NaN or infinite (after the cast to float32); refused unless allowed."""


def abstract_variables(model, in_channels: int = 3) -> dict:
    """The model's variable tree as ``ShapeDtypeStruct`` leaves (``jax.eval_shape``, no compute).

    Parameter shapes do not depend on the spatial size, so the model's smallest input is traced
    (16x16 for UNetPlusPlus, 2**depth for SMPUnetPlusPlus).
    """
    rng = jax.ShapeDtypeStruct((2,), jnp.uint32)
    x = jax.ShapeDtypeStruct(min_input_shape(model, (1, 16, 16, in_channels)), jnp.float32)
    return jax.eval_shape(model.init, rng, x)


@functools.lru_cache(maxsize=16)
def _expected_keys_for(model, in_channels: int, style: str) -> dict[str, Target]:
    return expected_keys(abstract_variables(model, in_channels), style)


def expected_keys(abstract: Mapping, style: str = "unet-zoo") -> dict[str, Target]:
    """PyTorch key (in the ``style`` layout) -> :class:`Target` for every leaf of an abstract
    variable tree."""
    sublayer = STYLES[style]
    targets: dict[str, Target] = {}
    for keypath, leaf in jax.tree_util.tree_flatten_with_path(dict(abstract))[0]:
        path = tuple(str(k.key) for k in keypath)
        joined = "/".join(path)
        for rule in rules_for(style):
            m = re.fullmatch(rule.flax_path, joined)
            if m:
                key = rule.torch_key.format(*(sublayer.get(g, g) for g in m.groups()))
                targets[key] = Target(path, rule.transform, tuple(leaf.shape))
                break
        else:
            raise AssertionError(f"no rule in weights_port.keymap for model variable {joined} "
                                 f"({style} layout)")
    return targets


def _is_tensor(x) -> bool:
    return (hasattr(x, "shape") and hasattr(x, "dtype") and not isinstance(x, Mapping)
            and not isinstance(x, np.generic))


def describe_value(v) -> str:
    """A short, printable description of an entry read as inert data (for notes)."""
    if v is None or isinstance(v, (bool, int, float, np.generic)):
        kind = type(v).__name__ if not isinstance(v, np.generic) else v.dtype.name
        return f"{kind} {printable(repr(v.item() if isinstance(v, np.generic) else v), 40)}"
    if isinstance(v, str):
        return f"str {printable(repr(v), 40)}"
    if isinstance(v, InertNamespace):
        return f"argparse.Namespace, {len(v.fields)} fields"
    if isinstance(v, Mapping):
        return f"dict, {len(v)} entries"
    if isinstance(v, (list, tuple)):
        return f"{type(v).__name__}, {len(v)} items"
    if _is_tensor(v):
        return f"tensor {_fmt(v.shape)}"
    return type(v).__name__


def _is_state_dict(d) -> bool:
    return isinstance(d, Mapping) and bool(d) and all(_is_tensor(v) for v in d.values())


def _list_names(names, limit: int = 6) -> str:
    names = [printable(n, 60) for n in names]
    more = f", ... ({len(names)} in all)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def extract_state_dict(obj: Any) -> tuple[dict[str, Any], list[str]]:
    """The state_dict inside a loaded checkpoint, and notes on what was unwrapped.

    Accepts a bare state_dict, one wrapped under ``state_dict``/``model_state_dict``/``model``/
    ``net`` (training checkpoints that also hold an epoch, metrics, ``args`` or optimizer state:
    those entries were read as inert data and are listed in the note, then ignored), and
    DataParallel's ``module.`` prefix on every key.
    """
    notes: list[str] = []
    if not isinstance(obj, Mapping):
        raise KeyMapError("no state_dict found", [f"the file holds a {type(obj).__name__}, "
                                                  "not a dict of tensors"])
    sd = obj
    if not _is_state_dict(sd):
        for key in WRAPPER_KEYS:
            inner = sd.get(key)
            if _is_state_dict(inner):
                others = [f"{printable(k, 60)} ({describe_value(v)})"
                          for k, v in sd.items() if k != key]
                shown = ", ".join(others[:8]) + (f", ... ({len(others)} in all)"
                                                 if len(others) > 8 else "")
                notes.append(f"state_dict taken from the checkpoint's {key!r} entry; other "
                             f"entries read as inert data and ignored: {shown or 'none'}")
                sd = inner
                break
        else:
            top = _list_names([repr(k) for k in sd], 12) or "nothing"
            training = {"epoch", "optimizer", "optimizer_state_dict", "scheduler", "args",
                        "best_iou", "best_loss", "config", "step", "global_step"}
            hints = []
            if training & set(map(str, sd)):
                hints.append("this looks like a whole training checkpoint without a model "
                             f"state_dict under {'/'.join(WRAPPER_KEYS)}; {RESAVE_HINT}")
            raise KeyMapError("no state_dict found", [
                f"expected a dict of tensors, or one under {'/'.join(WRAPPER_KEYS)}; "
                f"the file's top-level keys are {top}"], hints)
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


_STYLE_PATTERNS = {
    "pytorch-nested-unet": re.compile(r"conv\d+_\d+\.(conv|bn)[12]\."),
    "unet-zoo": re.compile(r"conv\d+_\d+\.conv\.\d+\."),
    SMP_STYLE: re.compile(r"decoder\.blocks\.x_\d+_\d+\."),
}


def detect_style(keys) -> str | None:
    """``'unet-zoo'``, ``'pytorch-nested-unet'`` or ``'smp-unetplusplus'``, whichever layout
    most keys follow; None if no key looks like any."""
    counts = {style: sum(bool(p.match(k)) for k in keys) for style, p in _STYLE_PATTERNS.items()}
    best = max(counts, key=counts.get)
    return best if counts[best] else None


def infer_settings(sd: Mapping[str, Any], style: str) -> dict:
    """The model settings a state_dict implies, read from its names and shapes: heads
    (``deep_supervision``), ``num_classes`` (head width), ``in_channels`` (the first conv),
    ``widths`` (each level's first conv) and ``skips`` (``'unet'`` when only the plain U-Net's
    nodes are there, as in pytorch-nested-unet's ``UNet``)."""
    sublayer = STYLES[style]

    def shape(key):
        v = sd.get(key)
        return tuple(int(n) for n in v.shape) if _is_tensor(v) else None

    deep_supervision = detect_deep_supervision(sd)
    head = shape("final4.weight" if deep_supervision else "final.weight")
    first = shape(f"conv0_0.{sublayer['conv1']}.weight")
    levels = []
    while shape(f"conv{len(levels)}_0.{sublayer['conv1']}.weight"):
        levels.append(shape(f"conv{len(levels)}_0.{sublayer['conv1']}.weight"))
    plain = (not any(k.startswith(("conv0_1.", "conv1_1.", "conv2_1.")) for k in sd)
             and any(k.startswith("conv0_4.") for k in sd))
    return {
        "deep_supervision": deep_supervision,
        "num_classes": head[0] if head and len(head) == 4 else 1,
        "in_channels": first[1] if first and len(first) == 4 else 3,
        "widths": tuple(s[0] for s in levels) if len(levels) >= 2 and all(
            len(s) == 4 for s in levels) else tuple(WIDTHS),
        "skips": "unet" if plain else "nested",
    }


def _model_supports_skips() -> bool:
    return "skips" in {f.name for f in dataclasses.fields(UNetPlusPlus)}


def build_model(settings: Mapping) -> UNetPlusPlus:
    """``UNetPlusPlus`` for ``settings`` (as :func:`infer_settings` returns them)."""
    kwargs = dict(num_classes=int(settings["num_classes"]), widths=tuple(settings["widths"]),
                  deep_supervision=bool(settings["deep_supervision"]))
    if _model_supports_skips():
        kwargs["skips"] = settings.get("skips", "nested")
    elif settings.get("skips", "nested") != "nested":
        raise KeyMapError(
            "plain U-Net checkpoint not supported yet", [
                "this state_dict has only the plain U-Net's nodes (pytorch-nested-unet's UNet: "
                "conv0_0..conv4_0, conv3_1, conv2_2, conv1_3, conv0_4); this version of "
                "UNetPlusPlus has no skips='unet' option to run it"])
    return UNetPlusPlus(**kwargs)


def _format_hints(keys: list[str], style: str | None) -> list[str]:
    """What a mismatching state_dict looks like, and what to do about it (a line or two)."""
    has = lambda prefix: any(k.startswith(prefix) for k in keys)  # noqa: E731
    if has("encoder.") and (has("decoder.") or has("segmentation_head.")):
        return ["this looks like a segmentation_models_pytorch model (keys encoder.*, decoder.*, "
                "segmentation_head.*) other than UnetPlusPlus (whose decoder has blocks "
                "decoder.blocks.x_{d}_{l}.*): only smp's UnetPlusPlus (ResNet encoders) converts"]
    if style is None:
        return ["no key looks like a UNet++ node (conv{i}_{j}.conv.0.* as in UNET-ZOO, or "
                "conv{i}_{j}.conv1.* as in pytorch-nested-unet); is this the right file? "
                f"first keys: {_list_names(keys, 4)}"]
    return [f"keys follow the {style} layout; the differences below are the file's, not the "
            "layout's (a modified network, or a truncated/edited state_dict)"]


def _finite_problems(name: str, a: np.ndarray) -> str | None:
    if np.isfinite(a).all():
        return None
    nan, inf = int(np.isnan(a).sum()), int(np.isinf(a).sum())
    return f"{printable(name)} ({nan} NaN, {inf} Inf of {a.size})"


@dataclasses.dataclass
class Conversion:
    variables: dict  # {'params': ..., 'batch_stats': ...} of float32 numpy arrays
    model: Any  # UNetPlusPlus, or SMPUnetPlusPlus for the smp-unetplusplus style
    mapped: int  # PyTorch entries loaded
    dropped: list[str]  # entries deliberately ignored (num_batches_tracked; smp: unused parts)
    notes: list[str]  # wrapper / prefix handling
    dtype_casts: dict[str, int]  # source dtype -> number of tensors cast to float32
    style: str = "unet-zoo"  # the source layout (a key of STYLES)
    settings: dict = dataclasses.field(default_factory=dict)  # see infer_settings
    nonfinite: list[str] = dataclasses.field(default_factory=list)  # accepted with allow_nonfinite


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def convert_state_dict(obj: Any, *, settings: Mapping | None = None,
                       allow_nonfinite: bool = False, **overrides) -> Conversion:
    """Convert a loaded UNET-ZOO or pytorch-nested-unet checkpoint object into ``UNetPlusPlus``
    variables (a segmentation_models_pytorch UnetPlusPlus goes to
    :func:`convert_smp_state_dict`).

    ``obj`` is what was unpickled (tensors anything with ``shape``/``dtype`` that ``np.asarray``
    accepts). The model's settings are inferred from the tensors (:func:`infer_settings`);
    ``settings`` (e.g. from a ``config.yml``) and keyword ``overrides`` (``widths``,
    ``num_classes``, ``in_channels``, ``deep_supervision``, ``skips``) take precedence. Raises
    :class:`KeyMapError` listing every missing, unexpected, mis-shaped or non-float entry, and
    :class:`NonFiniteError` for NaN/Inf weights (also float64 values that overflow float32)
    unless ``allow_nonfinite``; nothing is partially converted.
    """
    sd, notes = extract_state_dict(obj)
    style = detect_style(sd) or "unet-zoo"
    if style == SMP_STYLE:
        return convert_smp_state_dict(sd, notes, settings={**(settings or {}), **overrides},
                                      allow_nonfinite=allow_nonfinite)
    resolved = {**infer_settings(sd, style), **(settings or {}), **overrides}
    resolved["widths"] = tuple(int(w) for w in resolved["widths"])
    model = build_model(resolved)
    in_channels = int(resolved["in_channels"])
    targets = _expected_keys_for(model, in_channels, style)  # traced once per configuration

    bn_modules = {k[: -len(".running_mean")] for k in targets if k.endswith(".running_mean")}
    dropped = [k for k in sd if k.endswith(DROPPED_SUFFIX) and k[: -len(DROPPED_SUFFIX)] in bn_modules]
    heads = "final1..final4" if model.deep_supervision else "final"
    skips = f", skips={resolved.get('skips', 'nested')!r}" if resolved.get("skips") == "unet" else ""
    variables, casts, nonfinite = _check_and_map(
        sd, targets, dropped,
        f"checkpoint does not match UNetPlusPlus(deep_supervision={model.deep_supervision}, "
        f"heads {heads}{skips})", _format_hints(list(sd), detect_style(sd)), allow_nonfinite, notes)
    return Conversion(variables=variables, model=model, mapped=len(targets), dropped=dropped,
                      notes=notes, dtype_casts=casts, style=style, settings=resolved,
                      nonfinite=nonfinite)


def _check_and_map(sd: Mapping[str, Any], targets: Mapping[str, Target], dropped: list[str],
                   header: str, hints: list[str], allow_nonfinite: bool,
                   notes: list[str]) -> tuple[dict, dict[str, int], list[str]]:
    """Every entry of ``sd`` but ``dropped`` onto its target, strictly: raises
    :class:`KeyMapError` (``header``: what was expected) listing every missing, unexpected,
    mis-shaped or non-float entry, and :class:`NonFiniteError` for NaN/Inf unless allowed
    (then a note is added). Returns ``(variables, dtype casts, non-finite descriptions)``."""
    drop = set(dropped)
    present = [k for k in sd if k not in drop]

    missing = [f"missing: {k} (model expects {_fmt(t.torch_shape)})"
               for k, t in targets.items() if k not in sd]
    unexpected = [f"unexpected: {printable(k)} (checkpoint has {_fmt(sd[k].shape)})"
                  if _is_tensor(sd[k]) else f"unexpected: {printable(k)} ({describe_value(sd[k])})"
                  for k in present if k not in targets]
    mismatched, not_float = [], []
    for k in present:
        t = targets.get(k)
        if t is None:
            continue
        if not _is_tensor(sd[k]):
            mismatched.append(f"not a tensor: {k} ({describe_value(sd[k])})")
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
        raise KeyMapError(f"{header}: {counts} (shapes in PyTorch layout, OIHW for convs)",
                          problems, hints)

    variables: dict = {}
    casts: dict[str, int] = {}
    nonfinite: list[str] = []
    for k, t in targets.items():
        src_dtype = np.dtype(sd[k].dtype).name
        if src_dtype != "float32":
            casts[src_dtype] = casts.get(src_dtype, 0) + 1
        # np.array copies: the result never aliases the input (or the file's buffer).
        with np.errstate(over="ignore", invalid="ignore"):
            value = np.array(t.transform.to_flax(np.asarray(sd[k])), dtype=np.float32, order="C")
        bad = _finite_problems(k, value)
        if bad:
            nonfinite.append(bad)
        _set(variables, t.path, value)
    if nonfinite and not allow_nonfinite:
        more = f" and {len(nonfinite) - 3} more tensors" if len(nonfinite) > 3 else ""
        raise NonFiniteError(
            f"non-finite weights (NaN/Inf, after the cast to float32): "
            f"{'; '.join(nonfinite[:3])}{more}; a diverged or corrupt checkpoint? pass "
            "--allow-nonfinite (allow_nonfinite=True) to convert it anyway")
    if nonfinite:
        notes.append(f"non-finite weights accepted (--allow-nonfinite): {'; '.join(nonfinite[:3])}"
                     + (f" and {len(nonfinite) - 3} more" if len(nonfinite) > 3 else ""))
    return variables, casts, nonfinite


# ------------------------------------------------ segmentation_models_pytorch UnetPlusPlus

SMP_SETTINGS = ("encoder", "encoder_depth", "decoder_channels", "decoder_attention_type",
                "decoder_use_batchnorm", "num_classes", "in_channels")
_SMP_BLOCK_KEY = re.compile(r"decoder\.blocks\.x_(\d+)_(\d+)\.")
_SMP_LAYER_KEY = re.compile(r"encoder\.layer([1-4])\.(\d+)\.")


def _shape_of(sd: Mapping[str, Any], key: str) -> tuple | None:
    v = sd.get(key)
    return tuple(int(n) for n in v.shape) if _is_tensor(v) else None


def infer_smp_settings(sd: Mapping[str, Any]) -> tuple[dict, list[str]]:
    """``SMPUnetPlusPlus`` settings read from an smp UnetPlusPlus state_dict's names and shapes,
    and what could not be read (a list of reasons; the settings then lack those fields).

    * ``encoder``: the ResNet whose block type (``conv3`` in ``layer1.0``: Bottleneck) and blocks
      per layer match ``encoder.layer{1..4}.{b}``;
    * ``encoder_depth``: decoder layers ``l`` of ``decoder.blocks.x_{d}_{l}`` (0..D-1);
    * ``decoder_channels``: the output width of ``x_0_{l}`` per layer;
    * ``decoder_attention_type``: ``'scse'`` when the blocks have ``attention*`` entries;
    * ``decoder_use_batchnorm``: ``conv1.1`` (BatchNorm) present, not ``conv1.0.bias``;
    * ``num_classes`` / ``in_channels``: the head's output and ``encoder.conv1``'s input width.
    """
    out: dict = {}
    unknown: list[str] = []
    counts: dict[int, int] = {}
    for k in sd:
        m = _SMP_LAYER_KEY.match(k)
        if m:
            layer, block = int(m.group(1)), int(m.group(2))
            counts[layer] = max(counts.get(layer, 0), block + 1)
    kind = "bottleneck" if any(k.startswith("encoder.layer1.0.conv3.") for k in sd) else "basic"
    present = sorted(counts)
    names = [n for n, spec in RESNETS.items() if spec.block == kind and present
             and all(counts[k] == spec.layers[k - 1] for k in present)]
    if names:
        out["encoder"] = names[0]  # several only when deep layers are absent: then identical
    else:
        found = ", ".join(f"layer{k}: {counts[k]}" for k in present) or "no encoder.layer* keys"
        unknown.append(f"encoder: no supported ResNet has {kind} blocks per layer ({found}); "
                       f"supported: {', '.join(RESNETS)} (torchvision layout, encoder.layer1.0...)")
    layers = {int(m.group(2)) for m in map(_SMP_BLOCK_KEY.match, sd) if m}
    if layers:
        depth = max(layers) + 1
        out["encoder_depth"] = depth
        widths = [_shape_of(sd, f"decoder.blocks.x_0_{l}.conv1.0.weight") for l in range(depth)]
        if all(w is not None and len(w) == 4 for w in widths):
            out["decoder_channels"] = tuple(w[0] for w in widths)
        else:
            unknown.append("decoder_channels: some decoder.blocks.x_0_{l}.conv1.0.weight are "
                           "missing or not 4-d")
    else:
        unknown.append("encoder_depth: no decoder.blocks.x_{d}_{l}.* keys")
    out["decoder_attention_type"] = ("scse" if any(".attention" in k and k.startswith(
        "decoder.blocks.") for k in sd) else None)
    out["decoder_use_batchnorm"] = not any(
        re.match(r"decoder\.blocks\.x_\d+_\d+\.conv1\.0\.bias$", k) for k in sd)
    head = _shape_of(sd, "segmentation_head.0.weight")
    if head is not None and len(head) == 4:
        out["num_classes"] = head[0]
    else:
        unknown.append("num_classes: segmentation_head.0.weight missing or not a 4-d conv weight")
    first = _shape_of(sd, "encoder.conv1.weight")
    if first is not None and len(first) == 4:
        out["in_channels"] = first[1]
    else:
        unknown.append("in_channels: encoder.conv1.weight missing or not a 4-d conv weight")
    return out, unknown


def smp_unused_keys(sd: Mapping[str, Any], model: SMPUnetPlusPlus) -> dict[str, list[str]]:
    """Entries of an smp UnetPlusPlus state_dict that its forward never reads, by reason (the
    converter drops them with a note): the ResNet layers beyond ``encoder_depth`` (smp keeps the
    whole torchvision trunk), the final block's ``attention1`` (it has no skip to attend to),
    and an ``aux_params`` classification head."""
    depth = model.encoder_depth
    unused: dict[str, list[str]] = {}
    final = f"decoder.blocks.x_0_{depth - 1}.attention1."
    for k in sd:
        m = _SMP_LAYER_KEY.match(k)
        if m and int(m.group(1)) >= depth:
            unused.setdefault(f"encoder layers beyond encoder_depth={depth}", []).append(k)
        elif k.startswith(("encoder.fc.", "encoder.avgpool.")):
            unused.setdefault("torchvision's classifier (smp deletes it)", []).append(k)
        elif k.startswith(final):
            unused.setdefault(f"x_0_{depth - 1}.attention1 (smp's final block has no skip, so "
                              "it never applies it)", []).append(k)
        elif k.startswith("classification_head."):
            unused.setdefault("the aux_params classification head (only the mask is "
                              "converted)", []).append(k)
    return unused


def build_smp_model(settings: Mapping) -> SMPUnetPlusPlus:
    """``SMPUnetPlusPlus`` for ``settings`` (:data:`SMP_SETTINGS` but ``in_channels``)."""
    try:
        return SMPUnetPlusPlus(
            encoder=settings["encoder"], encoder_depth=int(settings["encoder_depth"]),
            decoder_channels=tuple(int(c) for c in settings["decoder_channels"]),
            decoder_attention_type=settings["decoder_attention_type"],
            decoder_use_batchnorm=bool(settings["decoder_use_batchnorm"]),
            num_classes=int(settings["num_classes"]))
    except (TypeError, ValueError) as exc:
        raise KeyMapError("segmentation_models_pytorch UnetPlusPlus settings not supported",
                          [str(exc)]) from None


def _smp_label(s: Mapping) -> str:
    attention = s.get("decoder_attention_type")
    return (f"segmentation_models_pytorch UnetPlusPlus(encoder_name={s.get('encoder')!r}, "
            f"encoder_depth={s.get('encoder_depth')}, decoder_channels="
            f"{tuple(s.get('decoder_channels') or ())}, decoder_attention_type={attention!r}, "
            f"decoder_use_norm={'batchnorm' if s.get('decoder_use_batchnorm', True) else False!r}, "
            f"classes={s.get('num_classes')})")


def convert_smp_state_dict(sd: Mapping[str, Any], notes: list[str] | None = None, *,
                           settings: Mapping | None = None,
                           allow_nonfinite: bool = False) -> Conversion:
    """A segmentation_models_pytorch ``UnetPlusPlus`` state_dict (already unwrapped) onto
    ``SMPUnetPlusPlus`` variables, strictly (as :func:`convert_state_dict`).

    Settings are inferred from the tensors (:func:`infer_smp_settings`); ``settings`` (smp's
    ``config.json``, see ``weights_port.smp_files``) take precedence, and any disagreement
    between them and the tensors is reported as a key mismatch. Entries smp's forward never
    reads (:func:`smp_unused_keys`) and ``num_batches_tracked`` are dropped, with a note.
    """
    notes = list(notes or [])
    inferred, unknown = infer_smp_settings(sd)
    resolved = {**inferred, **{k: v for k, v in (settings or {}).items() if v is not None
                               or k == "decoder_attention_type"}}
    missing = [u for u in unknown if u.split(":")[0] not in resolved]
    if missing:
        raise KeyMapError(
            "cannot tell which segmentation_models_pytorch UnetPlusPlus this is (its settings "
            "are read from the tensors when there is no config.json)", missing,
            ["keys follow segmentation_models_pytorch's UnetPlusPlus layout (decoder.blocks."
             "x_{d}_{l}.*); only ResNet encoders in torchvision's layout convert"])
    model = build_smp_model(resolved)
    in_channels = int(resolved["in_channels"])
    targets = _expected_keys_for(model, in_channels, SMP_STYLE)
    bn_modules = {k[: -len(".running_mean")] for k in targets if k.endswith(".running_mean")}
    dropped = [k for k in sd if k.endswith(DROPPED_SUFFIX) and k[: -len(DROPPED_SUFFIX)] in bn_modules]
    for reason, keys in smp_unused_keys(sd, model).items():
        dropped += keys
        notes.append(f"{len(keys)} entries not used by smp's forward dropped: {reason}")
    hints = ["keys follow segmentation_models_pytorch's UnetPlusPlus layout; the differences "
             "below are the file's (a different smp version or encoder, a modified network, or "
             "a config.json that does not describe these weights)"]
    variables, casts, nonfinite = _check_and_map(
        sd, targets, dropped, f"checkpoint does not match {_smp_label(resolved)}", hints,
        allow_nonfinite, notes)
    return Conversion(variables=variables, model=model, mapped=len(targets), dropped=dropped,
                      notes=notes, dtype_casts=casts, style=SMP_STYLE, settings=resolved,
                      nonfinite=nonfinite)


def _fmt(shape) -> str:
    return str(tuple(int(n) for n in shape))


__all__ = ["RULES", "SMP_RULES", "SMP_STYLE", "STYLES", "Rule", "Transform", "Target",
           "KeyMapError", "NonFiniteError", "Conversion", "abstract_variables", "expected_keys", "extract_state_dict",
           "detect_deep_supervision", "detect_style", "infer_settings", "build_model",
           "describe_value", "convert_state_dict", "infer_smp_settings",
           "smp_unused_keys", "build_smp_model", "convert_smp_state_dict", "rules_for"]
