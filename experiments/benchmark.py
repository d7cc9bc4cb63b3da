"""The sections of ``python -m experiments.bench`` (timing itself: ``unetpp_jax.timing``).

Compile time is measured separately from steady-state time; steady state is the median of
repeated calls after a warm-up, each ended with ``block_until_ready`` (JAX dispatch is async).
The same :func:`time_jitted` times PyTorch eager calls and the converter (``sync=None``: those
return when done), so every number in the report is measured one way.

Sections, each a function returning JSON-ready values, run in this order by
:func:`run_benchmark`:

* ``inference`` -- fp32 images/s and latency at each batch for prune levels L1..L4, each level's
  XLA FLOPs, and ``flops_ratio = FLOPs(L4) / FLOPs(Lk)`` (how many times fewer FLOPs),
  ``speedup = t(L4) / t(Lk)`` at the same batch (levels timed in alternating rounds,
  :func:`interleaved_timings`; the median of the rounds' ratios),
  ``efficiency = speedup / flops_ratio``
  (1.0: time falls exactly with FLOPs; issue 7 asks >= 0.8), and, given a checkpoint, each
  level's MIoU on the validation split. Level k's output is head k of the full network (the
  pruned program computes exactly the nodes head k reads, tested in ``tests/test_model.py``),
  so one full-depth evaluation scores every level.
* ``ablation`` -- L4 with one speed measure of the package undone at a time
  (:data:`ABLATIONS`: the opt-in Winograd convs instead of XLA's; XLA's default convolution path
  (YNNPACK); BatchNorm folded inside every call
  instead of once; the whole batch in one step instead of one image per step; each node's
  input concatenated before its conv), and the package's speedup over each, at each batch.
* ``pytorch`` -- the same model (a PyTorch twin holding the same weights) in eager mode,
  ``channels_last``, eval mode under ``torch.inference_mode``, same batch and input size,
  in the same process; ``jax_over_pytorch`` = JAX L4 images/s / PyTorch images/s, the median
  over rounds that alternate the two (see :func:`pytorch_section`).
* ``engines`` -- the fp32 forward of every engine at each batch in the same alternating rounds:
  JAX as the package runs it (XLA's convolution), JAX with the opt-in Winograd convs
  (``Float32(conv_impl='auto')``, ``unetpp_jax.fastconv``), ONNX Runtime on the model exported
  in memory (``unetpp_jax.export``), and
  PyTorch eager ``channels_last``; ``vs_onnxruntime`` = t(ONNX Runtime) / t(engine) (issue 15
  asks >= 1 for the package at batch 1 and 16).
* ``convs`` -- GFLOP/s of every distinct conv of the forward (one image, as the CPU micro-batch
  runs them) by XLA's convolution, ``'auto'``'s choice (column "package"), Winograd F(4x4) and F(2x2), ONNX
  Runtime and PyTorch, the sum of each one's conv times per image, and the machine's XLA f32
  matmul rate (the ceiling a conv lowered to matmuls can reach).
* ``precision`` -- fp16 / bf16 / int8, emulated and native (``unetpp_jax.numerics``), next to
  fp32, all timed in the same alternating rounds (:data:`PRECISION_ROWS`): steady-state
  forward at the evaluation batch, the split's forward time derived from it, the ratio to
  fp32 (median of the rounds' ratios, with their spread), and the int8 calibration time.
  ``extra_rows`` times any other callable in the same rounds (:func:`callable_row`: e.g. an
  ONNX Runtime session on the same batch).
* ``train_step`` -- images/s of the real jitted, donated training step (``make_train_step``).
* ``converter`` -- ``weights_port.convert.convert`` on a UNET-ZOO-format ``.pth`` written from
  the twin (needs PyTorch only to *write* that file).
* the process's peak resident memory (``ru_maxrss``) after each section.

PyTorch is never imported at module level: the PyTorch sections receive the twin as an
argument, built by the caller (``experiments.bench``) only when torch is installed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from unetpp_jax.layers import concat_parts
from unetpp_jax.model import WIDTHS
from unetpp_jax.numerics import Float32
from unetpp_jax.timing import Timing, interleaved_timings, round_ratio, time_jitted  # noqa: F401

SECTIONS = ("inference", "ablation", "pytorch", "engines", "convs", "precision", "train_step",
            "converter")
# The precision section's rows: '<precision>' (emulated; fp32 has one execution) or
# '<precision> native'.
PRECISION_ROWS = ("fp32", "fp16", "bf16", "int8", "bf16 native", "int8 native")


def forward_call(model, variables, batch: int = 16, size: int = 96, prune_level: int = 4,
                 micro_batch="auto"):
    """``(fn, args)``: the inference forward (probabilities of heads 1..prune_level) as the
    package runs it -- variables prepared once beforehand (BatchNorm folded, native int8
    kernels quantized: ``numerics.prepare_variables``, as ``evaluate.predict_split`` does),
    the compiler options of the model's numerics and the default micro-batch
    (``evaluate.predict_program``)."""
    from unetpp_jax.evaluate import predict_program
    from unetpp_jax.numerics import prepare_variables

    f = predict_program(model, prune_level, micro_batch=micro_batch)
    x = jax.random.normal(jax.random.PRNGKey(0), (batch, size, size, 3), jnp.float32)
    return f, (prepare_variables(model.numerics, variables), x)


def forward_timing(model, variables, batch: int = 16, size: int = 96, prune_level: int = 4,
                   repeats: int = 5, warmup: int = 1, min_time: float = 0.0) -> Timing:
    """:func:`time_jitted` of :func:`forward_call`."""
    f, args = forward_call(model, variables, batch, size, prune_level)
    return time_jitted(f, *args, repeats=repeats, warmup=warmup, min_time=min_time)


# What the package does for speed, undone one thing at a time (the README's "what helped"):
# each variant is timed at L4 next to the package's own path, in the same run.
ABLATIONS = {
    "Winograd conv (opt-in)": "Float32(conv_impl='auto'): Winograd F(4x4) where fastconv picks it",
    "XLA default conv (YNNPACK)": "the package's compiler options left out",
    "BatchNorm folded per call": "checkpoint variables, folded inside every forward",
    "whole batch per step": "micro_batch=None instead of one image per step (CPU)",
    "skip inputs concatenated": "each node's input concatenated before its conv, as torch.cat",
}


@dataclasses.dataclass(frozen=True)
class _ConcatenatingFloat32(Float32):
    """fp32 numerics that write each conv input's concatenation first (the ablation)."""

    def conv(self, module, name, x, kernel, bias, role, **kw):
        return super().conv(module, name, concat_parts(x), kernel, bias, role, **kw)


def ablation_call(model, variables, what: str, batch: int = 16, size: int = 96):
    """``(fn, args)``: the L4 forward of :func:`forward_call` with one of :data:`ABLATIONS`
    undone."""
    from unetpp_jax.inference import default_micro_batch, map_in_micro_batches, probabilities

    f, (folded, x) = forward_call(model, variables, batch, size)
    if what == "Winograd conv (opt-in)":
        return forward_call(model.clone(numerics=Float32(conv_impl="auto")), variables, batch, size)
    if what == "XLA default conv (YNNPACK)":
        mb = default_micro_batch()
        return jax.jit(lambda v, x: map_in_micro_batches(
            lambda xc: probabilities(model.apply(v, xc, train=False)), x, mb)), (folded, x)
    if what == "BatchNorm folded per call":
        if "batch_stats" not in variables:
            raise ValueError("BatchNorm folded per call: needs unfolded variables")
        return f, (variables, x)
    if what == "whole batch per step":
        return forward_call(model, variables, batch, size, micro_batch=None)
    if what == "skip inputs concatenated":
        return forward_call(model.clone(numerics=_ConcatenatingFloat32()), variables, batch, size)
    raise ValueError(f"unknown ablation {what!r}: one of {sorted(ABLATIONS)}")


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, MiB (``ru_maxrss``: KiB on Linux, bytes on macOS)."""
    import resource  # Unix only
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


# ---------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class BenchConfig:
    """What :func:`run_benchmark` measures; :data:`QUICK` is a seconds-scale smoke setting."""

    size: int = 96  # input height = width of the inference, PyTorch and precision timings
    batches: tuple[int, ...] = (1, 16)
    levels: tuple[int, ...] = (1, 2, 3, 4)
    repeats: int = 10  # timed calls per measurement (median) at least ...
    min_time_s: float = 2.0  # ... and more until they take this long (batch-1 calls are short)
    warmup: int = 1  # untimed calls after the first (compiling) one
    rounds: int = 5  # JAX / PyTorch alternations behind the ratio (the machine's speed drifts)
    eval_batch: int = 16  # batch of the evaluation and of the precision timings
    eval_images: int | None = None  # None: the whole validation split (134 images)
    calib_images: int = 50  # int8 calibration images from the split (the vendor used 50)
    calib_method: str = "kl"
    precision_rows: tuple[str, ...] = None  # default: PRECISION_ROWS
    reuse_calibration: bool = True  # int8: a saved calibration (quant.load_or_calibrate)
    train_batch: int = 8
    train_size: int = 96
    train_widths: tuple[int, ...] | None = None  # None: the full model's (32 .. 512)
    converter_repeats: int = 3
    torch_threads: int | None = None  # None: one per available core
    max_conv_shapes: int | None = None  # convs section: the first N distinct convs (None: all)
    sections: tuple[str, ...] = SECTIONS

    def __post_init__(self):
        unknown = set(self.sections) - set(SECTIONS)
        if unknown:
            raise ValueError(f"unknown sections {sorted(unknown)}; choose from {SECTIONS}")
        bad = [lv for lv in self.levels if not 1 <= lv <= 4]
        if bad or not self.levels:
            raise ValueError(f"levels must be in 1..4, got {self.levels}")
        if self.precision_rows is None:
            object.__setattr__(self, "precision_rows", PRECISION_ROWS)
        bad_rows = set(self.precision_rows) - set(PRECISION_ROWS)
        if bad_rows:
            raise ValueError(f"unknown precision rows {sorted(bad_rows)}; choose from "
                             f"{PRECISION_ROWS}")
        if self.size % 16 or self.train_size % 16:
            raise ValueError(f"sizes must be multiples of 16, got {self.size} and {self.train_size}")

    def to_json(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v
                for k, v in dataclasses.asdict(self).items()}


# Smoke setting for tests: every section and field, seconds of compute (compiling dominates, so
# one batch -- 2, which still runs the micro-batch loop -- the extreme levels only, and a
# narrow model's train step: its gradient compiled in ~24 s here against ~30 s at full width).
# ``max`` calibration skips the histogram pass; the section's code path is the same. One
# PyTorch thread: on a busy machine its OpenMP threads spin against each other (a 32x32
# forward took 1.6 s with 2 threads next to a training job, 45 ms with 1).
QUICK = BenchConfig(size=32, batches=(2,), levels=(1, 4), repeats=2, min_time_s=0.0, warmup=0, rounds=2,
                    eval_batch=4, eval_images=8,
                    calib_images=4, calib_method="max", train_batch=2, train_size=32,
                    train_widths=(8, 16, 32, 64, 128),
                    precision_rows=("fp32", "fp16", "int8"), reuse_calibration=False,
                    converter_repeats=1, torch_threads=1, max_conv_shapes=2)


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def machine_info() -> dict:
    """Versions, the CPU and its load: what a reader needs to compare two reports."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import flax
    import jaxlib

    return {"jax": jax.__version__, "jaxlib": jaxlib.__version__, "flax": flax.__version__,
            "backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()],
            "device_kind": jax.devices()[0].device_kind, "cpu": cpu, "cores": available_cores(),
            "python": platform.python_version(), "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
            "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


# ---------------------------------------------------------------------------------------------
# Sections


def level_mious(model, variables, split, *, batch_size: int = 16) -> dict[int, float]:
    """MIoU (table metric, percent) of each prune level's own head on ``split``.

    One full-depth evaluation: level k outputs head k, which the full network computes with the
    same nodes. A single-head model has level 4 only.
    """
    from unetpp_jax.evaluate import evaluate_split

    scores = evaluate_split(model, variables, split, batch_size=batch_size)
    if not model.deep_supervision:
        return {4: scores.miou}
    return {k: m for k, m in enumerate(scores.miou_per_head, 1)}


def inference_section(model, variables, cfg: BenchConfig, *, mious: dict[int, float] | None = None,
                      log: Callable[[str], None] = lambda s: None) -> list[dict]:
    """fp32 inference rows, one per (level, batch): speed, FLOPs and their ratios to L4."""
    from unetpp_jax.counting import xla_flops

    levels = sorted(set(cfg.levels) | {4})  # L4 is the reference of every ratio
    if not model.deep_supervision:
        levels = [4]  # pruning needs the deep-supervision heads
    flops = {lv: xla_flops(model, variables, (1, cfg.size, cfg.size, 3), prune_level=lv)
             for lv in levels}
    rows = []
    for batch in cfg.batches:
        calls = {lv: (*forward_call(model, variables, batch, cfg.size, lv), jax.block_until_ready)
                 for lv in levels}
        timings, per_round = interleaved_timings(calls, rounds=cfg.rounds, repeats=cfg.repeats,
                                                 warmup=cfg.warmup, min_time=cfg.min_time_s)
        for level in levels:
            t = timings[level]
            speedup, lo, hi = round_ratio(per_round, 4, level)
            row = {"level": level, **t.to_json(batch), "xla_flops": flops[level],
                   "flops_ratio": flops[4] / flops[level], "speedup": speedup,
                   "speedup_min": lo, "speedup_max": hi, "rounds": len(per_round),
                   "miou": None if mious is None else mious.get(level)}
            row["efficiency"] = speedup / row["flops_ratio"]
            rows.append(row)
            log(f"inference L{level} batch {batch}: {row['images_per_s']:.2f} img/s, "
                f"efficiency {row['efficiency']:.2f} (compile {t.compile_s:.1f} s)")
    return [r for r in rows if r["level"] in cfg.levels]


def ablation_section(model, variables, cfg: BenchConfig, *,
                     log: Callable[[str], None] = lambda s: None) -> list[dict]:
    """L4 with each of :data:`ABLATIONS` undone, at each batch, in rounds alternating with the
    package's own L4; ``package_speedup``: the package's speed over the variant's (median of
    the rounds, with their spread)."""
    rows = []
    for batch in cfg.batches:
        # At batch 1 "whole batch per step" is the package's own program; already folded
        # variables have no per-call fold to compare with.
        variants = [w for w in ABLATIONS
                    if not (w == "whole batch per step" and batch == 1)
                    and not (w == "BatchNorm folded per call" and "batch_stats" not in variables)]
        calls = {"package": (*forward_call(model, variables, batch, cfg.size),
                             jax.block_until_ready)}
        calls.update({w: (*ablation_call(model, variables, w, batch, cfg.size),
                          jax.block_until_ready) for w in variants})
        timings, per_round = interleaved_timings(calls, rounds=cfg.rounds, repeats=cfg.repeats,
                                                 warmup=cfg.warmup, min_time=cfg.min_time_s)
        for what in variants:
            gain, lo, hi = round_ratio(per_round, what, "package")
            row = {"variant": what, **timings[what].to_json(batch), "package_speedup": gain,
                   "package_speedup_min": lo, "package_speedup_max": hi,
                   "package_images_per_s": timings["package"].per_item(batch)}
            rows.append(row)
            log(f"ablation {what} batch {batch}: {row['images_per_s']:.2f} img/s, package "
                f"x{gain:.2f}")
    return rows


def pytorch_section(torch_model, cfg: BenchConfig, model=None, variables=None, *,
                    log: Callable[[str], None] = lambda s: None) -> dict:
    """PyTorch eager, channels_last, eval mode, ``inference_mode``, at each batch of ``cfg``,
    alternating with the package's JAX L4 forward when ``model``/``variables`` are given.

    ``torch_model`` is a twin holding the JAX model's weights (``experiments.torch_twin``).
    Threads: ``cfg.torch_threads`` or one per core, restored afterwards. The ratio
    ``jax_over_pytorch`` (JAX images/s over PyTorch's) is the median over ``cfg.rounds``
    rounds, each timing JAX then PyTorch back to back, so that a drift in the machine's speed
    (a shared VM's neighbours) hits both sides of a round alike; ``*_min``/``*_max`` give the
    spread of the rounds.
    """
    import torch

    threads = cfg.torch_threads or available_cores()
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        tmodel = torch_model.eval().to(memory_format=torch.channels_last)
        gen = torch.Generator().manual_seed(0)
        rows = []
        for batch in cfg.batches:
            x = torch.randn(batch, 3, cfg.size, cfg.size, generator=gen).contiguous(
                memory_format=torch.channels_last)
            xj = jnp.asarray(x.permute(0, 2, 3, 1).numpy())

            def forward(x=x):
                with torch.inference_mode():
                    return tmodel(x)

            calls = {"pytorch": (forward, (), None)}
            if model is not None:
                f, (folded, _) = forward_call(model, variables, batch, cfg.size)
                calls["jax"] = (f, (folded, xj), jax.block_until_ready)
            timings, per_round = interleaved_timings(calls, rounds=cfg.rounds,
                                                     repeats=cfg.repeats, warmup=cfg.warmup,
                                                     min_time=cfg.min_time_s)
            row = timings["pytorch"].to_json(batch)
            row["rounds"] = len(per_round)
            row["jax_images_per_s"] = row["jax_over_pytorch"] = None
            row["jax_over_pytorch_min"] = row["jax_over_pytorch_max"] = None
            if model is not None:
                row["jax_images_per_s"] = timings["jax"].per_item(batch)
                (row["jax_over_pytorch"], row["jax_over_pytorch_min"],
                 row["jax_over_pytorch_max"]) = round_ratio(per_round, "pytorch", "jax")
            rows.append(row)
            log(f"pytorch batch {batch}: {row['images_per_s']:.2f} img/s"
                + (f", JAX L4 / PyTorch {row['jax_over_pytorch']:.2f} "
                   f"({row['jax_over_pytorch_min']:.2f}-{row['jax_over_pytorch_max']:.2f} over "
                   f"{row['rounds']} rounds)" if model is not None else ""))
    finally:
        torch.set_num_threads(previous)
    return {"torch": torch.__version__, "threads": threads, "memory_format": "channels_last",
            "mode": "eager, eval, inference_mode", "rows": rows}


def onnx_fp32_fn(model, variables, onnx_path=None) -> tuple[Callable[[np.ndarray], Any], str]:
    """``(f, what)``: ONNX Runtime fp32 on NHWC float32 images (a session of ``onnx_path``, or
    of the model exported in memory by ``unetpp_jax.export``), and a description. Raises
    ImportError without onnx/onnxruntime."""
    from unetpp_jax.export import onnx_model, onnx_predict_fn, onnx_session

    if onnx_path is not None:
        return onnx_predict_fn(onnx_session(onnx_path)), os.path.basename(str(onnx_path))
    proto = onnx_model(model, variables, precision="fp32")
    return onnx_predict_fn(onnx_session(proto.SerializeToString())), "exported in memory"


def engines_section(model, variables, cfg: BenchConfig, *, torch_model=None, onnx_path=None,
                    log: Callable[[str], None] = lambda s: None) -> dict:
    """The fp32 forward (L4, all heads) of every engine at each batch, in the same alternating
    rounds: JAX as the package runs it (``Float32()``: XLA's convolution), JAX with the opt-in
    Winograd convs (``conv_impl='auto'``: where ``fastconv.choose`` picks them), ONNX Runtime fp32 (the
    exported graph: :func:`onnx_fp32_fn`) and, given a twin, PyTorch eager ``channels_last``.
    ``vs_onnxruntime``: t(ONNX Runtime) / t(engine), the median over rounds with its spread
    (> 1: faster than ONNX Runtime)."""
    import onnxruntime

    ort_fn, ort_what = onnx_fp32_fn(model, variables, onnx_path)
    torch_threads = None
    if torch_model is not None:
        import torch

        torch_threads = cfg.torch_threads or available_cores()
        previous = torch.get_num_threads()
        torch.set_num_threads(torch_threads)
        tmodel = torch_model.eval().to(memory_format=torch.channels_last)
    try:
        rows = []
        for batch in cfg.batches:
            f, (prepared, x) = forward_call(model, variables, batch, cfg.size)
            xn = np.asarray(x)
            calls = {"JAX fp32 (package)": (f, (prepared, x), jax.block_until_ready),
                     "JAX fp32, Winograd (opt-in)": (*forward_call(model.clone(
                         numerics=Float32(conv_impl="auto")), variables, batch, cfg.size),
                         jax.block_until_ready),
                     "onnxruntime fp32": callable_row(ort_fn, xn)}
            if torch_model is not None:
                xt = torch.from_numpy(np.array(xn)).permute(0, 3, 1, 2).contiguous(
                    memory_format=torch.channels_last)

                def forward(xt=xt):
                    with torch.inference_mode():
                        return tmodel(xt)

                calls["PyTorch eager channels_last"] = (forward, (), None)
            timings, per_round = interleaved_timings(calls, rounds=cfg.rounds,
                                                     repeats=cfg.repeats, warmup=cfg.warmup,
                                                     min_time=cfg.min_time_s)
            for engine, t in timings.items():
                ratio, lo, hi = round_ratio(per_round, "onnxruntime fp32", engine)
                rows.append({"engine": engine, **t.to_json(batch), "vs_onnxruntime": ratio,
                             "vs_onnxruntime_min": lo, "vs_onnxruntime_max": hi,
                             "rounds": len(per_round)})
                log(f"engines batch {batch}: {engine} {rows[-1]['images_per_s']:.2f} img/s, "
                    f"x{ratio:.2f} ONNX Runtime's speed ({lo:.2f}-{hi:.2f})")
    finally:
        if torch_model is not None:
            torch.set_num_threads(previous)
    return {"onnxruntime": onnxruntime.__version__, "onnx_model": ort_what,
            "torch_threads": torch_threads, "rows": rows}


@dataclasses.dataclass(frozen=True, eq=False)
class _ConvRecorder(Float32):
    """fp32 numerics (XLA convs) that note each conv's input parts and kernel shape as the
    model is traced (the convs of :func:`conv_shapes`)."""

    seen: list = dataclasses.field(default_factory=list, compare=False, hash=False)
    conv_impl: str = "xla"

    def conv(self, module, name, x, kernel, bias, role, *, stride=1, padding=None):
        from unetpp_jax.layers import input_parts

        self.seen.append((tuple(p.shape for p in input_parts(x)), tuple(kernel.shape), stride,
                          padding))
        return super().conv(module, name, x, kernel, bias, role, stride=stride, padding=padding)


def conv_shapes(model, variables, size: int, batch: int = 1) -> list[tuple[tuple, tuple, int]]:
    """The model's distinct inference convs at ``batch`` images per step (the CPU micro-batch:
    1) as ``(part shapes, kernel shape, count)``, stride 1 and 'same' padding only (UNet++'s),
    in the order the forward runs them."""
    recorder = _ConvRecorder()
    x = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
    jax.eval_shape(lambda v, x: model.clone(numerics=recorder).apply(v, x, train=False),
                   variables, x)
    counts: dict = {}
    for parts, kernel, stride, padding in recorder.seen:
        if stride == 1 and padding is None:
            counts[parts, kernel] = counts.get((parts, kernel), 0) + 1
    return [(parts, kernel, n) for (parts, kernel), n in counts.items()]


def _ort_conv_fn(x: np.ndarray, kernel: np.ndarray):
    """ONNX Runtime running one 'same' conv (a one-node graph, NCHW, all optimizations) on
    NHWC ``x``, timed on the NCHW input; returns (fn, NHWC output)."""
    from onnx import TensorProto, helper, numpy_helper

    from unetpp_jax.export import onnx_session

    kh, kw, c, o = kernel.shape
    node = helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=[kh, kw],
                            pads=[kh // 2, kw // 2, kh // 2, kw // 2])
    graph = helper.make_graph(
        [node], "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                       [x.shape[0], c, *x.shape[1:3]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1)), "w")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    session = onnx_session(proto.SerializeToString())
    xn = np.ascontiguousarray(x.transpose(0, 3, 1, 2))

    def run():
        return session.run(["y"], {"x": xn})

    return run, run()[0].transpose(0, 2, 3, 1)


def convs_section(model, variables, cfg: BenchConfig, *, with_torch: bool = True,
                  log: Callable[[str], None] = lambda s: None) -> dict:
    """GFLOP/s of each distinct conv of the forward (:func:`conv_shapes`, one image as the
    package's CPU micro-batch runs them) by each engine, timed in alternating rounds per
    shape: XLA's convolution with the package's compiler options, the package's seam
    (``fastconv.conv2d``, ``'auto'``: which implementation it chose is given), Winograd
    F(4x4,3x3) and F(2x2,3x3) (kernels transformed beforehand, as ``prepare_variables`` does),
    ONNX Runtime (a one-conv graph on the concatenated input) and PyTorch eager
    ``channels_last`` (when installed). GFLOP/s count a direct conv's 2*H*W*9*Cin*Cout FLOPs
    for every method, so Winograd's figures are *effective* rates. Also the machine's measured
    XLA f32 matmul rate (1024^3 and the largest Winograd batched matmul of the model), the
    ceiling a conv lowered to matmuls can reach. Every output is checked against the
    ``precision='highest'`` XLA conv."""
    from unetpp_jax.inference import compiler_options

    opts = compiler_options()

    def jit(fn):
        return jax.jit(fn, **({"compiler_options": opts} if opts else {}))

    torch = None
    if with_torch:
        try:
            import torch
        except ImportError:
            torch = None
    if torch is not None:
        previous = torch.get_num_threads()
        torch.set_num_threads(cfg.torch_threads or available_cores())
    try:
        return _convs(model, variables, cfg, jit, torch, log)
    finally:
        if torch is not None:
            torch.set_num_threads(previous)


def _convs(model, variables, cfg, jit, torch, log) -> dict:
    from unetpp_jax import fastconv
    from unetpp_jax.layers import conv2d

    shapes = conv_shapes(model, variables, cfg.size)[:cfg.max_conv_shapes]
    rows, seconds = [], {}
    rng = np.random.default_rng(0)
    for parts_shapes, kshape, count in shapes:
        parts = [jnp.asarray(rng.normal(size=p), jnp.float32) for p in parts_shapes]
        kernel = jnp.asarray(rng.normal(size=kshape) / math.sqrt(np.prod(kshape[:3])),
                             jnp.float32)
        whole = np.concatenate([np.asarray(p) for p in parts], -1)
        ref = np.asarray(jax.lax.conv_general_dilated(
            whole, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
            precision="highest"))
        chosen = fastconv.choose("auto", parts, kshape)
        calls = {"xla": (jit(lambda p, k: conv2d(p, k)), (parts, kernel), jax.block_until_ready)}
        if kshape[:2] == (3, 3):
            for impl in ("winograd4", "winograd2"):
                u = fastconv.transform_kernel(kernel, fastconv.TILE[impl])
                calls[impl] = (jit(lambda p, u, k, impl=impl: fastconv.conv2d(
                    p, k, impl=impl, transformed=u)), (parts, u, kernel), jax.block_until_ready)
        try:
            ort_run, ort_y = _ort_conv_fn(whole, np.asarray(kernel))
            np.testing.assert_allclose(ort_y, ref, rtol=1e-3, atol=1e-3)
            calls["onnxruntime"] = (ort_run, (), None)
        except ImportError:
            pass
        if torch is not None:
            xt = torch.from_numpy(whole).permute(0, 3, 1, 2).contiguous(
                memory_format=torch.channels_last)
            wt = torch.from_numpy(np.asarray(kernel).transpose(3, 2, 0, 1).copy())
            pad = kshape[0] // 2

            def tconv(xt=xt, wt=wt, pad=pad):
                with torch.inference_mode():
                    return torch.nn.functional.conv2d(xt, wt, padding=pad)

            np.testing.assert_allclose(tconv().permute(0, 2, 3, 1).numpy(), ref, rtol=1e-3,
                                       atol=1e-3)
            calls["pytorch"] = (tconv, (), None)
        for key in ("xla", "winograd4", "winograd2"):
            if key in calls:
                fn, args, _ = calls[key]
                np.testing.assert_allclose(fn(*args), ref, rtol=1e-3, atol=1e-3)
        timings, _ = interleaved_timings(calls, rounds=cfg.rounds, repeats=cfg.repeats,
                                         warmup=cfg.warmup, min_time=cfg.min_time_s / 4)
        n, h, w, _ = parts_shapes[0]
        flops = 2 * n * h * w * int(np.prod(kshape))
        gflops = {k: flops / t.median_s / 1e9 for k, t in timings.items()}
        gflops["package"] = gflops[chosen]
        for k, t in timings.items():
            seconds[k] = seconds.get(k, 0.0) + count * t.median_s
        seconds["package"] = seconds.get("package", 0.0) + count * timings[chosen].median_s
        rows.append({"hw": [h, w], "parts": [p[-1] for p in parts_shapes],
                     "cin": kshape[2], "cout": kshape[3], "kernel": kshape[0], "count": count,
                     "mflop": flops / 1e6, "package_impl": chosen, "gflops": gflops})
        log(f"conv {h}x{w} {rows[-1]['parts']} -> {kshape[3]} (x{count}): "
            + ", ".join(f"{k} {v:.0f}" for k, v in gflops.items()) + " GFLOP/s")
    matmul = []
    big = max((r for r in rows if r["kernel"] == 3), key=lambda r: r["mflop"] * r["count"],
              default=None)
    dims = [("1024x1024 @ 1024x1024", (), 1024, 1024, 1024)]
    if big is not None:
        th = -(-big["hw"][0] // 4) * -(-big["hw"][1] // 4)
        dims.append((f"Winograd F4 {big['hw'][0]}x{big['hw'][1]} {big['cin']}->{big['cout']}: "
                     f"36 x ({th}x{big['cin']} @ {big['cin']}x{big['cout']})", (36,), th,
                     big["cin"], big["cout"]))
    for what, batch_dims, m, k, n in dims:
        a = jnp.asarray(rng.normal(size=(*batch_dims, m, k)), jnp.float32)
        b = jnp.asarray(rng.normal(size=(*batch_dims, k, n)), jnp.float32)
        t = time_jitted(jit(jnp.matmul), a, b, repeats=cfg.repeats, warmup=cfg.warmup,
                        min_time=cfg.min_time_s / 4)
        rate = 2 * int(np.prod(batch_dims or (1,))) * m * k * n / t.median_s / 1e9
        matmul.append({"what": what, "gflops": rate, "median_s": t.median_s})
        log(f"matmul {what}: {rate:.0f} GFLOP/s")
    return {"batch": 1, "size": cfg.size, "rows": rows, "matmul": matmul,
            "seconds_per_image": seconds,
            "torch_threads": None if torch is None else torch.get_num_threads()}


def callable_row(fn: Callable[[np.ndarray], Any], images: np.ndarray,
                 sync: Callable | None = None) -> tuple:
    """A row for :func:`interleaved_timings` (and ``precision_section``'s ``extra_rows``) that
    times ``fn(images)``: any callable -- an ONNX Runtime session, a StableHLO export -- on the
    same batch. ``sync`` waits for an asynchronous result (``jax.block_until_ready``); None for
    callables that return when done."""
    return (lambda: fn(images)), (), sync


def precision_section(model, variables, images_uint8: np.ndarray, cfg: BenchConfig, *,
                      extra_rows: dict[str, Callable[[np.ndarray], Any]] | None = None,
                      checkpoint_path=None,
                      log: Callable[[str], None] = lambda s: None) -> dict:
    """Every row of ``cfg.precision_rows`` (fp32, fp16/bf16/int8 emulated and native) and
    ``extra_rows`` timed in the same alternating rounds, plus the int8 calibration time.

    Each row's forward is timed at ``cfg.eval_batch`` and ``cfg.size``; ``split_forward_s`` is
    that steady-state time times the batches of the evaluated split, ``time_vs_fp32`` the ratio
    of the row's median time to fp32's, ``time_vs_fp32_rounds`` the median over rounds of the
    per-round ratios (``_min``/``_max``: their spread; the number to quote on a noisy machine). int8 is calibrated (``cfg.calib_method``) on the first ``cfg.calib_images`` images
    of ``images_uint8`` (the validation split, as the vendor did), or, with
    ``cfg.reuse_calibration``, the one saved for ``checkpoint_path`` (None: the bundled weights)
    by an earlier run of the benchmark or of ``experiments.eval`` with the same images
    (``quant.load_or_calibrate``); ``seconds`` are those of the run that computed it, its
    passes' compilation included. ``extra_rows`` maps a label to a callable taking the
    normalised float32 NHWC batch (numpy) and returning when done (see :func:`callable_row`).
    """
    from unetpp_jax import quant
    from unetpp_jax.data.pipeline import normalize
    from unetpp_jax.numerics import get_numerics

    n_images = len(images_uint8)
    n_batches = math.ceil(n_images / cfg.eval_batch)
    calib = None
    calls, labels = {}, {}
    for label in ("fp32", *[r for r in cfg.precision_rows if r != "fp32"]):
        precision, _, execution = label.partition(" ")
        options = {"execution": execution or "emulated"} if precision != "fp32" else {}
        numerics = get_numerics(precision, **options)
        qvars = variables
        if numerics.needs_calibration:
            if calib is None:
                calib_images = normalize(images_uint8[:cfg.calib_images])
                if cfg.reuse_calibration:
                    calib = quant.load_or_calibrate(checkpoint_path, model, variables,
                                                    calib_images, cfg.calib_method,
                                                    batch_size=cfg.eval_batch, log=log)
                else:
                    calib = quant.calibrate(model, variables, calib_images, cfg.calib_method,
                                            batch_size=cfg.eval_batch)
                log(f"int8 calibration ({cfg.calib_method}, {calib.num_images} images): "
                    f"{calib.seconds:.1f} s" + (f", reused from {calib.path}" if calib.reused
                                                else ""))
            qvars = calib.attach(variables)
        f, args = forward_call(model.clone(numerics=numerics), qvars, cfg.eval_batch, cfg.size)
        calls[label] = (f, args, jax.block_until_ready)
        labels[label] = (precision, options.get("execution", "native"))
    x = np.asarray(jax.random.normal(jax.random.PRNGKey(0),
                                     (cfg.eval_batch, cfg.size, cfg.size, 3), jnp.float32))
    for label, fn in (extra_rows or {}).items():
        calls[label] = callable_row(fn, x)
        labels[label] = (label, "external")
    timings, per_round = interleaved_timings(calls, rounds=cfg.rounds, repeats=cfg.repeats,
                                             warmup=cfg.warmup, min_time=cfg.min_time_s)
    rows = []
    for label, t in timings.items():
        ratio, lo, hi = round_ratio(per_round, label, "fp32")
        precision, execution = labels[label]
        row = {"precision": precision, "execution": execution, "label": label,
               **t.to_json(cfg.eval_batch), "split_forward_s": t.median_s * n_batches,
               "time_vs_fp32": t.median_s / timings["fp32"].median_s,
               "time_vs_fp32_rounds": ratio, "time_vs_fp32_min": lo, "time_vs_fp32_max": hi,
               "rounds": len(per_round)}
        rows.append(row)
        log(f"{label} forward batch {cfg.eval_batch}: {row['images_per_s']:.2f} img/s, "
            f"x{ratio:.2f} fp32 time ({lo:.2f}-{hi:.2f} over {len(per_round)} rounds)")
    return {"n_images": n_images, "eval_batch": cfg.eval_batch,
            "calibration": None if calib is None else
            {"method": calib.method, "num_images": calib.num_images, "seconds": calib.seconds,
             "path": calib.path, "reused": calib.reused},
            "rows": rows}


def train_step_section(cfg: BenchConfig, *, log: Callable[[str], None] = lambda s: None) -> dict:
    """Images/s of ``make_train_step`` (Adam, BCE over the four heads) on the real model
    (``cfg.train_widths``: a narrower one, for the smoke setting whose time is compiling).

    The step donates its state, so each timed call feeds the previous call's state back in.
    The batch is random (speed does not depend on the pixel values).
    """
    from unetpp_jax.train import TrainConfig, create_state, data_mesh, make_train_step, shard_batch
    from jax.sharding import NamedSharding, PartitionSpec as P

    widths = {} if cfg.train_widths is None else {"widths": tuple(cfg.train_widths)}
    tcfg = TrainConfig(name="bench", batch_size=cfg.train_batch, image_size=cfg.train_size,
                       **widths)
    mesh = data_mesh()
    model, state = create_state(tcfg, steps_per_epoch=1)
    state = jax.device_put(state, NamedSharding(mesh, P()))
    step_fn = make_train_step(model, tcfg, mesh)
    rng = np.random.default_rng(0)
    shape = (cfg.train_batch, cfg.train_size, cfg.train_size)
    batch = shard_batch({"image": rng.uniform(-1, 1, (*shape, 3)).astype(np.float32),
                         "mask": rng.uniform(0, 1, (*shape, 1)).astype(np.float32)}, mesh)
    holder = {"state": state}

    def step():
        holder["state"], loss = step_fn(holder["state"], batch)
        return loss

    t = time_jitted(step, repeats=cfg.repeats, warmup=cfg.warmup)
    row = {**t.to_json(cfg.train_batch), "size": cfg.train_size, "widths": list(tcfg.widths),
           "optimizer": tcfg.optimizer,
           "devices": len(mesh.devices.flat)}
    log(f"train step batch {cfg.train_batch}: {row['images_per_s']:.2f} img/s")
    return row


def converter_section(torch_model, cfg: BenchConfig, *,
                      log: Callable[[str], None] = lambda s: None) -> dict:
    """Seconds of ``weights_port.convert.convert`` on a UNET-ZOO ``.pth`` of ``torch_model``.

    The file is ``torch.save(model.state_dict())`` in a temporary folder, named as UNET-ZOO
    names its checkpoints; the first conversion is reported apart from the median of the rest.
    """
    import torch

    from weights_port.convert import convert

    with tempfile.TemporaryDirectory(prefix="unetpp-bench-") as tmp:
        src = Path(tmp) / "unet++_8_dsb2018Cell_21.pth"
        torch.save(torch_model.state_dict(), src)
        results = []

        def once():
            results.append(convert(src, Path(tmp) / "converted", force=True))

        t = time_jitted(once, repeats=cfg.converter_repeats, warmup=0, sync=None)
    last = results[-1]
    row = {"first_s": t.compile_s, "median_s": t.median_s, "repeats": t.repeats,
           "phases_s": dict(last.seconds), "size_bytes": last.size_bytes,
           "params": last.param_count, "source_format": last.source_format}
    log(f"converter: {t.median_s:.2f} s ({last.size_bytes / 1e6:.1f} MB)")
    return row


# ---------------------------------------------------------------------------------------------
# The whole run


def run_benchmark(model, variables, split, cfg: BenchConfig, *, scored: bool,
                  make_twin: Callable[[Any, dict], Any] | None = None,
                  extra_rows: dict[str, Callable[[np.ndarray], Any]] | None = None,
                  checkpoint_path=None,
                  no_twin_reason: str = "PyTorch is not installed (the twin needs torch)",
                  log: Callable[[str], None] = lambda s: None, meta: dict | None = None) -> dict:
    """Run the sections of ``cfg`` and return the report (a JSON-ready dict).

    Args:
      model, variables: the JAX model (a checkpoint's, or a fresh initialisation).
      split: the validation :class:`~unetpp_jax.data.pipeline.Split` (MIoU, calibration,
        evaluation size); ``cfg.eval_images`` limits it.
      scored: whether ``variables`` are trained weights worth an MIoU (False: random init).
      make_twin: ``(model, variables) -> torch.nn.Module`` holding the same weights, or None
        when PyTorch is not installed or not wanted (the PyTorch and converter sections are
        then skipped, giving ``no_twin_reason``).
      extra_rows: more rows of the precision section (label -> callable on the normalised
        batch), timed in its rounds (:func:`precision_section`).
      checkpoint_path: the checkpoint directory whose saved int8 calibration the precision
        section reuses (None: the bundled weights' or a fresh model's, in the user cache).
      log: progress callback, one line per measurement.
      meta: extra entries for ``report['meta']`` (checkpoint, data, command line).
    """
    t_start = time.perf_counter()
    if cfg.eval_images is not None:
        split = split.take(range(min(cfg.eval_images, len(split))))
    report: dict[str, Any] = {
        "meta": {**machine_info(), **(meta or {}), "config": cfg.to_json()},
        "skipped": {}, "peak_rss_mb_after": {},
    }
    for name in SECTIONS:
        report[name] = None
    skipped = report["skipped"]
    for name in set(SECTIONS) - set(cfg.sections):
        skipped[name] = "not selected"

    def done(name):
        report["peak_rss_mb_after"][name] = peak_rss_mb()

    twin = None
    if make_twin is not None and {"pytorch", "converter", "engines"} & set(cfg.sections):
        twin = make_twin(model, variables)
    for name in ("pytorch", "converter"):
        if name in cfg.sections and twin is None:
            skipped[name] = no_twin_reason

    if "inference" in cfg.sections:
        mious = None
        if scored:
            log(f"MIoU of every head on {len(split)} validation images")
            mious = level_mious(model, variables, split, batch_size=cfg.eval_batch)
        else:
            report["meta"]["miou_note"] = "no checkpoint: MIoU skipped (random weights)"
        report["inference"] = inference_section(model, variables, cfg, mious=mious, log=log)
        done("inference")
    if "ablation" in cfg.sections:
        report["ablation"] = ablation_section(model, variables, cfg, log=log)
        done("ablation")
    if "pytorch" in cfg.sections and twin is not None:
        report["pytorch"] = pytorch_section(twin, cfg, model, variables, log=log)
        done("pytorch")
    if "engines" in cfg.sections:
        import importlib.util

        if any(importlib.util.find_spec(m) is None for m in ("onnx", "onnxruntime")):
            skipped["engines"] = "onnx and onnxruntime are needed (pip install onnx onnxruntime)"
        else:
            report["engines"] = engines_section(model, variables, cfg, torch_model=twin, log=log)
            done("engines")
    if "convs" in cfg.sections:
        report["convs"] = convs_section(model, variables, cfg, with_torch=make_twin is not None,
                                        log=log)
        done("convs")
    if "precision" in cfg.sections:
        report["precision"] = precision_section(model, variables, split.images, cfg,
                                                extra_rows=extra_rows,
                                                checkpoint_path=checkpoint_path, log=log)
        done("precision")
    if "train_step" in cfg.sections:
        report["train_step"] = train_step_section(cfg, log=log)
        done("train_step")
    if "converter" in cfg.sections and twin is not None:
        report["converter"] = converter_section(twin, cfg, log=log)
        done("converter")
    report["peak_rss_mb"] = peak_rss_mb()
    report["meta"]["seconds"] = time.perf_counter() - t_start
    if hasattr(os, "getloadavg"):
        report["meta"]["load_average_1min_end"] = os.getloadavg()[0]
    return report


# ---------------------------------------------------------------------------------------------
# The table


def _f(x, fmt: str) -> str:
    return "" if x is None else format(x, fmt)


def format_table(report: dict) -> str:
    """One plain-text table of a :func:`run_benchmark` report."""
    meta, cfg = report["meta"], report["meta"]["config"]
    head = (f"{'':30s}{'batch':>6s}{'img/s':>9s}{'ms/call':>10s}{'compile s':>10s}"
            f"{'GFLOP/img':>10s}{'FLOPs x':>8s}{'speedup':>8s}{'effic.':>7s}{'MIoU':>7s}  note")
    lines = [
        f"UNet++ benchmark: {meta['cpu']} ({meta['cores']} cores, load "
        f"{_f(meta['load_average_1min'], '.2f') or '?'} at start), JAX {meta['jax']} "
        f"{meta['backend']}; input {cfg['size']}x{cfg['size']}, "
        f"median of >= {cfg['repeats']} timed calls (more until they take "
        f"{cfg.get('min_time_s', 0):g} s) after {cfg['warmup']} warm-up",
        f"checkpoint: {meta.get('checkpoint', '?')}; data: {meta.get('data', '?')}",
        head, "-" * len(head)]

    def line(what, batch=None, ips=None, ms=None, comp=None, gflop=None, fx=None, sp=None,
             eff=None, miou=None, note=""):
        return (f"{what:30s}{_f(batch, 'd'):>6s}{_f(ips, '.2f'):>9s}{_f(ms, '.1f'):>10s}"
                f"{_f(comp, '.2f'):>10s}{_f(gflop, '.3f'):>10s}{_f(fx, '.2f'):>8s}"
                f"{_f(sp, '.2f'):>8s}{_f(eff, '.2f'):>7s}{_f(miou, '.2f'):>7s}  {note}".rstrip())

    for r in report.get("inference") or []:
        note = "" if r["level"] == 4 else (f"speedup {r['speedup_min']:.2f}-"
                                           f"{r['speedup_max']:.2f} over {r['rounds']} rounds")
        lines.append(line(f"JAX fp32 L{r['level']}", r["batch"], r["images_per_s"], r["latency_ms"],
                          r["compile_s"], r["xla_flops"] / 1e9, r["flops_ratio"], r["speedup"],
                          r["efficiency"], r["miou"], note=note))
    for r in report.get("ablation") or []:
        lines.append(line(f"L4 {r['variant']}", r["batch"], r["images_per_s"],
                          r["latency_ms"], r["compile_s"],
                          note=f"package L4 x{r['package_speedup']:.2f} faster "
                               f"({r['package_speedup_min']:.2f}-{r['package_speedup_max']:.2f})"
                               f"; {ABLATIONS[r['variant']]}"))
    pt = report.get("pytorch")
    for r in (pt or {}).get("rows", []):
        ratio = r["jax_over_pytorch"]
        note = "" if ratio is None else (
            f"JAX L4 / PyTorch = {ratio:.2f} ({r['jax_over_pytorch_min']:.2f}-"
            f"{r['jax_over_pytorch_max']:.2f}, {r['rounds']} alternating rounds; JAX "
            f"{r['jax_images_per_s']:.2f} img/s)")
        lines.append(line("PyTorch eager channels_last", r["batch"], r["images_per_s"],
                          r["latency_ms"], r["compile_s"],
                          note=note + f"  ({pt['threads']} thread{'s' if pt['threads'] != 1 else ''})"))
    en = report.get("engines")
    for r in (en or {}).get("rows", []):
        lines.append(line(f"{r['engine']}"[:30], r["batch"], r["images_per_s"], r["latency_ms"],
                          r["compile_s"],
                          note=f"x{r['vs_onnxruntime']:.2f} ONNX Runtime's speed "
                               f"({r['vs_onnxruntime_min']:.2f}-{r['vs_onnxruntime_max']:.2f}, "
                               f"{r['rounds']} alternating rounds)"))
    cs = report.get("convs")
    if cs:
        keys = [k for k in ("package", "xla", "winograd4", "winograd2", "onnxruntime", "pytorch")
                if any(k in r["gflops"] for r in cs["rows"])]
        lines.append(f"GFLOP/s per conv (1 image, direct-conv FLOPs; {cs['size']}x{cs['size']} "
                     "input), n = convs of that shape in the forward, package = the impl "
                     "'auto' chose:")
        lines.append(f"  {'H x W':>7s} {'Cin parts':22s}{'Cout':>5s}{'n':>3s}{'MFLOP':>7s}  "
                     + "".join(f"{k:>12s}" for k in keys) + "  chosen")
        for r in cs["rows"]:
            lines.append(f"  {r['hw'][0]:>3d}x{r['hw'][1]:<3d} "
                         f"{'+'.join(map(str, r['parts'])) + ('' if r['kernel'] == 3 else ' (1x1)'):22s}"
                         f"{r['cout']:>5d}{r['count']:>3d}{r['mflop']:>7.1f}  "
                         + "".join(f"{_f(r['gflops'].get(k), '.0f'):>12s}" for k in keys)
                         + f"  {r['package_impl']}")
        sec = cs["seconds_per_image"]
        lines.append("  sum of conv times per image, ms:" + "".join(
            f"  {k} {1e3 * sec[k]:.1f}" for k in keys if k in sec))
        for mm in cs["matmul"]:
            lines.append(f"  XLA f32 matmul {mm['what']}: {mm['gflops']:.0f} GFLOP/s")
    pr = report.get("precision")
    if pr:
        for r in pr["rows"]:
            note = (f"x{r['time_vs_fp32_rounds']:.2f} fp32 time ({r['time_vs_fp32_min']:.2f}-"
                    f"{r['time_vs_fp32_max']:.2f}, {r['rounds']} rounds); {pr['n_images']} "
                    f"images {r['split_forward_s']:.2f} s")
            if r["precision"] == "int8" and pr["calibration"]:
                c = pr["calibration"]
                note += (f"; calib {c['method']} {c['num_images']} img {c['seconds']:.1f} s"
                         + (" (saved, reused)" if c.get("reused") else ""))
            what = (r["label"] if r["execution"] in ("native", "external") or r["label"] == "fp32"
                    else f"{r['label']} (emulated)")
            lines.append(line(f"eval forward {what}", r["batch"], r["images_per_s"],
                              r["latency_ms"], r["compile_s"], note=note))
    ts = report.get("train_step")
    if ts:
        lines.append(line(f"train step {ts['size']}x{ts['size']} {ts['optimizer']}", ts["batch"],
                          ts["images_per_s"], ts["latency_ms"], ts["compile_s"],
                          note=f"{ts['devices']} device(s)"
                               + ("" if ts.get("widths", list(WIDTHS)) == list(WIDTHS)
                                  else f"; widths {tuple(ts['widths'])}")))
    cv = report.get("converter")
    if cv:
        ph = cv["phases_s"]
        lines.append(line("converter .pth -> Flax", ms=1e3 * cv["median_s"], comp=cv["first_s"],
                          note=f"{cv['size_bytes'] / 1e6:.1f} MB; read {ph['read']:.2f} s, map "
                               f"{ph['map']:.2f} s, write {ph['write']:.2f} s (compile s = first run)"))
    lines.append(line("peak RSS of the process", note=f"{report['peak_rss_mb']:.0f} MiB"))
    lines.append("-" * len(head))
    lines.append("FLOPs x = FLOPs(L4)/FLOPs(Lk); speedup = time(L4)/time(Lk) at the same batch; "
                 "effic. = speedup / FLOPs x (1 = proportional).")
    if meta.get("miou_note"):
        lines.append(f"note: {meta['miou_note']}")
    for name, why in report.get("skipped", {}).items():
        if why != "not selected":
            lines.append(f"skipped {name}: {why}")
    return "\n".join(lines)


def write_json(report: dict, path) -> Path:
    path = Path(path)
    if path.parent != Path(""):
        path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path
