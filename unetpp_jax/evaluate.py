"""Run a model over a split and score every head with the table's metric.

Shared by training (validation each epoch) and ``experiments.eval`` (the table), so the number a
training log reports and the number the evaluation prints are computed by the same code.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import jax
import numpy as np
from tqdm.auto import tqdm

from unetpp_jax import metrics
from unetpp_jax.data.pipeline import Split
from unetpp_jax.card import CARD_GFLOPS, CARD_PARAMS_M, CARD_ROWS
from unetpp_jax.data.normalization import UNETZOO_INPUT, InputSpec
from unetpp_jax.inference import predict_fn
from unetpp_jax.numerics import (
    Int8,
    get_numerics,
    merge_trees,
    options_of,
    prepare_variables,
    program_compiler_options,
    switches,
)


def predict_program(model, prune_level: int | None = None, *, micro_batch="auto"):
    """``inference.predict_fn`` compiled with the compiler options ``model.numerics`` asks for
    (``numerics.program_compiler_options``: the package's, or native int8's YNNPACK
    convolutions): a jitted ``f(variables, images) -> probabilities``. Give it
    ``numerics.prepare_variables(model.numerics, variables)`` (folded once, int8 kernels once)."""
    return predict_fn(model, prune_level, micro_batch=micro_batch,
                      compiler_options=program_compiler_options(model.numerics))


def predict_split(model, variables, images_uint8: np.ndarray, *, batch_size: int = 16,
                  prune_level: int | None = None, progress: bool = False, desc: str = "predict",
                  input_spec: InputSpec = UNETZOO_INPUT) -> np.ndarray:
    """Probabilities of every head for uint8 BGR images: ``(heads, N, H, W)`` float32
    (foreground channel of a one-class model).

    Images are normalised by ``input_spec`` (the checkpoint's). The last batch is padded to
    ``batch_size`` (and the padding dropped), so the whole split runs through one compiled
    program. BatchNorm is folded once for the whole split (and native int8 kernels quantized
    once: ``numerics.prepare_variables``); the program has the compiler options the model's
    numerics ask for (:func:`predict_program`).
    """
    normalize = input_spec.normalize
    f = predict_program(model, prune_level)
    variables = prepare_variables(model.numerics, variables)
    n = len(images_uint8)
    out = []
    for start in tqdm(range(0, n, batch_size), desc=desc, disable=not progress, leave=False):
        chunk = images_uint8[start:start + batch_size]
        pad = batch_size - len(chunk)
        if pad:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
        probs = f(variables, normalize(chunk))
        heads = probs if isinstance(probs, tuple) else (probs,)
        out.append(np.stack([np.asarray(h)[: batch_size - pad, ..., 0] for h in heads]))
    return np.concatenate(out, axis=1)


@dataclass
class HeadScores:
    """Per-head scores in percent (like the table); ``miou`` is the last (deepest) head's."""

    miou_per_head: list[float]
    dice_per_head: list[float]

    @property
    def miou(self) -> float:
        return self.miou_per_head[-1]

    @property
    def dice(self) -> float:
        return self.dice_per_head[-1]


def score_heads(probs: np.ndarray, masks_uint8: np.ndarray) -> HeadScores:
    """Table MIoU and Dice (x100) of each head of ``probs`` ``(heads, N, H, W)``."""
    return HeadScores(
        [100.0 * float(metrics.miou_foreground(p, masks_uint8)) for p in probs],
        [100.0 * float(metrics.dice_foreground(p, masks_uint8)) for p in probs],
    )


def evaluate_split(model, variables, split: Split, *, batch_size: int = 16,
                   prune_level: int | None = None, progress: bool = False,
                   input_spec: InputSpec = UNETZOO_INPUT) -> HeadScores:
    """Predict ``split`` and score every head."""
    probs = predict_split(model, variables, split.images, batch_size=batch_size,
                          prune_level=prune_level, progress=progress, input_spec=input_spec)
    return score_heads(probs, split.masks)



# ---------------------------------------------------------------------------------------------
# Precisions and the reference table



@dataclass
class PrecisionResult:
    """One precision's evaluation; ``miou``/``dice`` are of the scored head (default: last)."""

    precision: str
    miou: float
    miou_per_head: list[float]
    dice: float
    dice_per_head: list[float]
    n_images: int
    checkpoint: str
    calibration: dict | None
    seconds: float  # prediction of the split (compile included), calibration excluded
    head: int  # 1-based index of the head ``miou`` refers to
    probs: np.ndarray | None = None  # (heads, N, H, W), kept for overlays; not in to_json
    execution: str = "native"  # fp32 has one execution; fp16/bf16/int8 emulated or native
    options: dict = field(default_factory=dict)  # the numerics' options
    extra: dict = field(default_factory=dict)  # more JSON entries (int8: the sensitivity)

    @property
    def label(self) -> str:
        """``int8``, ``int8 native``, ``bf16 native``: the precision and, when not the
        default, its execution."""
        return self.precision + (" native" if self.precision != "fp32"
                                 and self.execution == "native" else "")

    def to_json(self) -> dict:
        return {"precision": self.precision, "execution": self.execution,
                "options": self.options, "miou": round(self.miou, 4),
                "miou_per_head": [round(m, 4) for m in self.miou_per_head],
                "dice": round(self.dice, 4), "head": self.head, "n_images": self.n_images,
                "checkpoint": self.checkpoint, "calibration": self.calibration,
                "seconds": round(self.seconds, 3), **self.extra}


def evaluate_precision(model, variables, split: Split, precision, *, head: int | None = None,
                       calibration=None, checkpoint: str = "", batch_size: int = 16,
                       progress: bool = False, input_spec: InputSpec = UNETZOO_INPUT,
                       **options) -> PrecisionResult:
    """Evaluate ``split`` at ``precision`` -- a name of ``numerics.PRECISIONS`` with its
    ``options`` (e.g. ``execution='native'``), or a numerics object -- and score every head.
    Precisions that need a calibration (int8) take the :class:`unetpp_jax.quant.Calibration`;
    the result's ``calibration`` records which one (method, images, path, reused or created)."""
    numerics = get_numerics(precision, **options)
    precision = numerics.name
    qmodel = model.clone(numerics=numerics)
    if numerics.needs_calibration:
        if calibration is None:
            raise ValueError(f"{precision} evaluation needs a calibration "
                             "(unetpp_jax.quant.calibrate)")
        variables = calibration.attach(variables)
    t0 = time.perf_counter()
    probs = predict_split(qmodel, variables, split.images, batch_size=batch_size,
                          progress=progress, desc=f"eval {precision}", input_spec=input_spec)
    seconds = time.perf_counter() - t0
    scores = score_heads(probs, split.masks)
    n_heads = len(scores.miou_per_head)
    head = n_heads if head is None else head
    if not 1 <= head <= n_heads:
        raise ValueError(f"head {head} does not exist: the model has {n_heads} head(s)")
    opts = options_of(numerics)
    calib = None
    if calibration is not None and numerics.needs_calibration:
        calib = {**calibration.provenance(), **opts}
    return PrecisionResult(precision, scores.miou_per_head[head - 1], scores.miou_per_head,
                           scores.dice_per_head[head - 1], scores.dice_per_head, len(split),
                           checkpoint, calib, seconds, head, probs,
                           execution=opts.get("execution", "native"), options=opts)


def conv_sensitivity(model, variables, split: Split, calibration, *, head: int | None = None,
                     batch_size: int = 16, progress: bool = False,
                     input_spec: InputSpec = UNETZOO_INPUT, **int8_options) -> dict:
    """The MIoU drop of quantizing each conv alone, everything else float32, ranked.

    One compiled program (``numerics.Int8(switchable=True)``: which convs are quantized is
    data) evaluated once with every conv float, once with every conv quantized, and once per
    conv with that conv alone quantized, over ``split`` (pass a subset: this is
    ``len(convs) + 2`` evaluations). ``int8_options`` as :class:`numerics.Int8`'s (a conv they
    keep float is left out). Returns ``{'fp32': miou, 'int8': miou, 'head', 'n_images',
    'ranking': [{'conv', 'drop', 'miou'}, ...]}`` with the largest drop first.
    """
    numerics = Int8(**{**int8_options, "switchable": True})
    qmodel = model.clone(numerics=numerics)
    keep = set(numerics.keep_float)
    paths = [p for p in calibration.conv_paths() if p not in keep]
    if numerics.skip_first_conv:
        paths = [p for p in paths if p != _input_conv(model)]
    base = prepare_variables(numerics, calibration.attach(variables))

    def miou(quantized) -> float:
        v = {**base, "quant": merge_trees(base["quant"], switches(paths, quantized))}
        probs = predict_split(qmodel, v, split.images, batch_size=batch_size,
                              input_spec=input_spec)
        scores = score_heads(probs, split.masks).miou_per_head
        return scores[(len(scores) if head is None else head) - 1]

    ref = miou(())
    full = miou(paths)
    ranking = []
    for path in tqdm(paths, desc="sensitivity", disable=not progress, leave=False):
        m = miou((path,))
        ranking.append({"conv": path, "drop": ref - m, "miou": m})
    ranking.sort(key=lambda r: -r["drop"])
    return {"fp32": ref, "int8": full, "head": head, "n_images": len(split),
            "options": options_of(numerics), "ranking": ranking}


def _input_conv(model) -> str:
    """The path of the conv that reads the image (``skip_first_conv``'s): the first conv the
    Record numerics sees."""
    import jax.numpy as jnp

    from unetpp_jax.model import min_input_shape
    from unetpp_jax.numerics import ROLE_INPUT, Float32, conv_path

    found = []

    class Spy(Float32):
        def conv(self, module, name, x, kernel, bias, role, **kw):
            if role == ROLE_INPUT:
                found.append(conv_path(module, name))
            return super().conv(module, name, x, kernel, bias, role, **kw)

    spy = model.clone(numerics=Spy())
    jax.eval_shape(lambda: spy.init(jax.random.PRNGKey(0),
                                    jnp.zeros(min_input_shape(model)), train=False))
    return found[0] if found else ""


def format_table(results: list[PrecisionResult], *, flops_g: float, params_m: float,
                 shape: str = "3x96x96", per_head: bool = False) -> str:
    """The card's table (Model, Code Source, FLOPs, Params, MIoU, Shape) with our rows, the
    reference rows and the deltas to the reference row of the same precision."""
    lines = ["| Model | Code Source | FLOPs (G) | Params (M) | MIoU | Shape | vs reference |",
             "|---|---|---|---|---|---|---|"]
    for src, m in CARD_ROWS.values():
        flops = f"{CARD_GFLOPS:.3f}" if src.startswith("UNET") else "-"
        params = f"{CARD_PARAMS_M:.3f}" if src.startswith("UNET") else "-"
        lines.append(f"| UnetPP | {src} | {flops} | {params} | {m:.3f} | {shape} | reference |")
    for r in results:
        src = f"unetpp-jax {r.label}" + (f" ({r.calibration['method']})" if r.calibration else "")
        if r.options.get("keep_float"):
            src += f", {len(r.options['keep_float'])} convs float"
        if r.head != len(r.miou_per_head):
            src += f", head {r.head}"
        ref = CARD_ROWS.get(r.precision)
        delta = f"{r.miou - ref[1]:+.3f}" if ref else "-"
        lines.append(f"| UnetPP | {src} | {flops_g:.3f} | {params_m:.3f} | {r.miou:.3f} | {shape} "
                     f"| {delta} |")
    if per_head:
        n = len(results[0].miou_per_head)
        lines += ["", "| precision | " + " | ".join(f"head {k + 1} X(0,{k + 1})" for k in range(n))
                  + " |", "|---|" + "---|" * n]
        for r in results:
            lines.append(f"| {r.label} | " + " | ".join(f"{m:.3f}" for m in r.miou_per_head)
                         + " |")
    return "\n".join(lines)
