"""Benchmark UNet++: JAX inference per prune level, JAX / ONNX Runtime / PyTorch side by side,
GFLOP/s per conv shape and the matmul ceiling, fp16/int8, training, converter.

    python -m experiments.bench [--checkpoint DIR] [--data SRC] [--json OUT] [--repeats N]
                                [--quick] [--no-torch] [--only SECTION ...] [--prune-only]
                                [--execution {emulated,native,all}]

Prints one table and writes the report as JSON (default ``runs/bench.json``); progress lines go
to stderr. What each number means is in :mod:`experiments.benchmark`. For numbers worth
publishing run it on an otherwise idle machine: the table's first line shows the load average
at the start. ``--quick`` is a seconds-scale smoke run (32x32 input, batches 1 and 2, few
repeats, 8 validation images) for tests, not for reporting.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import shlex
import sys
import time

from experiments.benchmark import QUICK, SECTIONS, BenchConfig, format_table, run_benchmark, write_json


def _progress():
    t0 = time.perf_counter()

    def log(message: str) -> None:
        print(f"[bench {time.perf_counter() - t0:7.1f} s] {message}", file=sys.stderr, flush=True)

    return log


def load_model(checkpoint):
    """``(model, variables, description, scored)``: ``--checkpoint``, else the bundled weights
    (found as ``experiments.eval`` finds them), else a randomly initialised model (no MIoU)."""
    from unetpp_jax.checkpoint import is_checkpoint
    from unetpp_jax.model import UNetPlusPlus, init_variables
    from unetpp_jax.pretrained import bundled_checkpoint_path, load_checkpoint

    if checkpoint is not None or is_checkpoint(bundled_checkpoint_path()):
        loaded = load_checkpoint(checkpoint)
        return loaded.model, loaded.variables, loaded.name, True
    model = UNetPlusPlus()
    return (model, init_variables(model),
            "none bundled (random weights: MIoU skipped; pass --checkpoint DIR)", False)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", help="a checkpoint directory (weights_port/convert.py output or "
                    "an exported one) or a training workdir (its best checkpoint); default: the "
                    "bundled weights if this version ships them, else random weights and no MIoU")
    ap.add_argument("--data", help="validation data: a stage1_train folder/zip, a preprocessed "
                    "folder or a TFDS data_dir (default: the bundled 96x96 validation split)")
    ap.add_argument("--json", default="runs/bench.json", help="where to write the report "
                    "(default runs/bench.json)")
    ap.add_argument("--repeats", type=int, help="timed calls per measurement, median reported "
                    f"(default {BenchConfig.repeats}; --quick {QUICK.repeats})")
    ap.add_argument("--rounds", type=int, help="alternating rounds over which compared programs "
                    f"share their timed calls (default {BenchConfig.rounds}; --quick {QUICK.rounds})")
    ap.add_argument("--warmup", type=int, help="untimed calls after the compiling one "
                    f"(default {BenchConfig.warmup})")
    ap.add_argument("--size", type=int, help=f"input side for the timings (default {BenchConfig.size})")
    ap.add_argument("--batches", type=int, nargs="+", help="inference batches (default 1 16)")
    ap.add_argument("--quick", action="store_true", help="tiny smoke run (tests): 32x32, batches "
                    "1 2, 2 repeats, 8 images; its numbers are not for reporting")
    ap.add_argument("--no-torch", action="store_true", help="skip the PyTorch twin and the converter")
    ap.add_argument("--torch-threads", type=int, help="PyTorch threads (default: one per core)")
    ap.add_argument("--onnx", action="append", default=[], metavar="FILE",
                    help="an exported ONNX file (python -m experiments.export --format onnx) "
                         "timed by ONNX Runtime in the precision section's alternating rounds; "
                         "repeatable (e.g. the fp32 and the int8 export)")
    ap.add_argument("--only", action="append", choices=SECTIONS, metavar="SECTION",
                    help=f"run only these sections (repeatable): {', '.join(SECTIONS)}")
    ap.add_argument("--execution", choices=("emulated", "native", "all"), default="all",
                    help="precision rows: fp16/bf16/int8 emulated, native (int8 x int8 -> int32, "
                         "bfloat16 convs), or both (default all); fp32 is always timed beside them")
    ap.add_argument("--prune-only", action="store_true", help="only the JAX prune-level table "
                    "(same as --only inference)")
    args = ap.parse_args(argv)

    cfg = QUICK if args.quick else BenchConfig()
    overrides = {"repeats": args.repeats, "rounds": args.rounds, "warmup": args.warmup,
                 "size": args.size,
                 "batches": tuple(args.batches) if args.batches else None,
                 "torch_threads": args.torch_threads,
                 "sections": ("inference",) if args.prune_only else
                 tuple(dict.fromkeys(args.only)) if args.only else None}
    cfg = dataclasses.replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
    if args.execution != "all":
        native = args.execution == "native"
        cfg = dataclasses.replace(cfg, precision_rows=tuple(
            r for r in cfg.precision_rows if r == "fp32" or r.endswith(" native") == native))

    log = _progress()
    log("loading the model and the validation split")
    from unetpp_jax.data.pipeline import load_split

    try:
        model, variables, checkpoint, scored = load_model(args.checkpoint)
        split = load_split(args.data, "validation", progress=False)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    data = f"{args.data or 'bundled validation split'} ({len(split)} images, {split.size}x{split.size})"

    make_twin, no_twin = None, "--no-torch"
    if not args.no_torch:
        if importlib.util.find_spec("torch") is None:
            no_twin = "PyTorch is not installed (pip install torch to benchmark the twin)"
        else:
            def make_twin(m, v):
                from experiments.torch_twin import from_flax

                return from_flax(m, v)

    extra_rows = {}
    for path in args.onnx:
        try:
            from unetpp_jax.export import onnx_predict_fn, onnx_session

            extra_rows[f"onnxruntime {os.path.basename(path)}"] = onnx_predict_fn(onnx_session(path))
        except Exception as e:  # a missing onnxruntime, an unreadable file: one line, exit 2
            print(f"error: --onnx {path}: {type(e).__name__}: {e}", file=sys.stderr)
            return 2
    report = run_benchmark(model, variables, split, cfg, scored=scored, make_twin=make_twin,
                           extra_rows=extra_rows, checkpoint_path=args.checkpoint,
                           no_twin_reason=no_twin, log=log,
                           meta={"checkpoint": checkpoint, "data": data, "quick": args.quick,
                                 "command": "python -m experiments.bench "
                                            + " ".join(shlex.quote(a) for a in (argv if argv is not None
                                                                              else sys.argv[1:]))})
    print(format_table(report))
    path = write_json(report, args.json)
    print(f"report written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
