"""Export a model: ONNX (fp32, fp16, int8 QDQ), StableHLO (jax.export), or a training run's best
epoch as a checkpoint directory.

    unetpp-export --checkpoint bundled --format onnx -o unetpp.onnx
    unetpp-export --checkpoint DIR --format onnx --precision int8 -o unetpp_int8.onnx
    unetpp-export --checkpoint DIR --format onnx --prune-level 2 -o unetpp_l2.onnx
    unetpp-export --checkpoint DIR --format stablehlo -o unetpp.stablehlo   (+ unetpp.stablehlo.json)
    unetpp-export --workdir runs/strong -o my_weights          (format checkpoint: the old behaviour)

--checkpoint takes a checkpoint directory (converted, exported or bundled), a training workdir
(its best epoch) or the word 'bundled'. ONNX models take input 'image' (NHWC float32, normalised
as the checkpoint's input spec says: it is recorded in the model's metadata and doc string) and
give the probabilities of heads 1..L as head1..headL (one output 'head' for a model without
deep supervision, e.g. a converted segmentation_models_pytorch UnetPlusPlus); batch, height and
width are dynamic (multiples of 2**depth). int8 calibrates first (the checkpoint's calibration method and images:
--calibration, --calib-images; default kl on the first 50 bundled validation images, as
experiments.eval). StableHLO has a dynamic batch and a fixed height and width (default: the
input spec's size, else 96). Every file is written atomically (temporary file, then rename).
Errors print one line and exit with status 2. See docs/export.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

FORMATS = ("checkpoint", "onnx", "stablehlo")
PRECISIONS = ("fp32", "fp16", "int8")  # what both model formats offer here


class UsageError(Exception):
    """A request the CLI refuses before doing any work."""


def _log_fn(quiet: bool):
    t0 = time.perf_counter()

    def log(message: str) -> None:
        if not quiet:
            print(f"[export {time.perf_counter() - t0:6.1f} s] {message}", file=sys.stderr,
                  flush=True)

    return log


def _check_writable(out: Path, force: bool, what: str = "file") -> None:
    """Fail before any slow work when ``out`` cannot be written."""
    if out.is_dir():
        raise UsageError(f"-o {out} is a directory; give a {what} path")
    if out.exists() and not force:
        raise UsageError(f"-o {out} exists; pass --force to replace it")
    parent = out.parent if str(out.parent) else Path(".")
    existing = parent
    while not existing.exists():  # the folders to create must be creatable
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"cannot write -o {out}: {existing} is not a writable directory")


def _calibration_bar(log):
    def progress(pass_name: str, done: int, total: int) -> None:
        if done == total or done == 1:
            log(f"calibration pass '{pass_name}': batch {done}/{total}")

    return progress


def _validation_split(args, loaded):
    """The validation split the int8 calibration and --check read, at the checkpoint's input
    size as experiments.eval loads it (the bundled split, the default, exists at 96 only)."""
    from unetpp_jax.data.registry import load_dataset

    size = loaded.input_spec.size[0] if loaded.input_spec.size and args.calib_data else 96
    return load_dataset(args.calib_data, "validation", size, progress=False)


def _calibrate(args, loaded, log):
    """The int8 scales, through ``quant.load_or_calibrate``: the checkpoint's saved calibration
    of the same weights, images and method is reused, else one is computed and saved."""
    from unetpp_jax import quant

    split = _validation_split(args, loaded)
    n = min(args.calib_images, len(split))
    images = loaded.input_spec.normalize(split.images[:n])
    log(f"int8 calibration ({args.calibration}, {n} validation images): a saved one is reused, "
        "else it runs, about a minute per pass on a small CPU")
    calib = quant.load_or_calibrate(args.checkpoint_path, loaded.model, loaded.variables,
                                    images, args.calibration, progress=_calibration_bar(log),
                                    recalibrate=args.recalibrate, log=log)
    if calib.reused:
        log(f"reusing the saved calibration {calib.path}")
        return calib
    log(f"calibrated in {calib.seconds:.1f} s")
    return calib


def _export_checkpoint(args, log) -> int:
    from unetpp_jax.checkpoint import CheckpointExistsError
    from unetpp_jax.train import export_best

    if args.precision != "fp32" or args.prune_level is not None:
        raise UsageError("--format checkpoint copies the float32 variables: --precision and "
                         "--prune-level apply to onnx and stablehlo")
    source = args.workdir or args.checkpoint
    log(f"exporting the best epoch of {source}")
    try:
        path = export_best(source, args.out, force=args.force)
    except CheckpointExistsError as e:
        raise UsageError(str(e)) from None
    print(f"wrote {path}")
    return 0


def _export_model(args, log) -> int:
    from unetpp_jax import export
    from unetpp_jax.pretrained import in_channels_of, load_checkpoint

    out = Path(args.out)
    _check_writable(out, args.force)
    if args.format == "stablehlo":
        _check_writable(export.sidecar_path(out), args.force, "file (the sidecar)")
    if args.format == "onnx":
        try:
            import onnx  # noqa: F401
        except ImportError:
            raise UsageError("ONNX export needs the onnx package: pip install "
                             "'unetpp-jax[deploy]'") from None

    source = args.checkpoint or args.workdir
    log(f"loading {source}")
    loaded = load_checkpoint(None if source == "bundled" and not Path(source).exists()
                             else source)
    args.checkpoint_path = None if source == "bundled" else source
    model = loaded.model
    level = args.prune_level
    if level is not None and not 1 <= level <= model.depth:
        raise UsageError(f"--prune-level must be in 1..{model.depth} for this model, got {level}")

    scales = info = None
    if args.precision == "int8":
        calib = _calibrate(args, loaded, log)
        scales, info = calib.scales, export.calibration_info(calib)

    if args.format == "onnx":
        log(f"building the ONNX graph ({args.precision})")
        proto = export.onnx_model(model, loaded.variables, input_spec=loaded.input_spec,
                                  precision=args.precision, prune_level=level, scales=scales,
                                  calibration_info=info, source=loaded.name)
        path = export.save_onnx(proto, out)
        outputs = export.output_names(model, level)
    else:
        h, w = _stablehlo_size(args, loaded, model)
        log(f"tracing and lowering to StableHLO ({args.precision}, {h}x{w}, batch dynamic)")
        exp = export.stablehlo_export(model, loaded.variables, input_spec=loaded.input_spec,
                                      height=h, width=w, prune_level=level,
                                      precision=args.precision, scales=scales,
                                      platforms=args.platforms, calibration_info=info,
                                      in_channels=in_channels_of(loaded.metadata.get("model", {})),
                                      source=loaded.name)
        path = export.save_stablehlo(exp, out)
        outputs = exp.sidecar["outputs"]
    size = path.stat().st_size / 2 ** 20
    print(f"wrote {path} ({size:.1f} MiB; {args.format} {args.precision}, outputs "
          f"{', '.join(outputs)})" + (f" and {export.sidecar_path(path)}"
                                      if args.format == "stablehlo" else ""))
    if args.check:
        _check(args, path, model, loaded, scales, level, log)
    return 0


def _stablehlo_size(args, loaded, model) -> tuple[int, int]:
    if args.height or args.width:
        h = args.height or args.width
        return h, args.width or h
    size = loaded.input_spec.size or (96, 96)
    return int(size[0]), int(size[1])


def _check(args, path, model, loaded, scales, level, log) -> None:
    """Run the exported file on a few bundled validation images next to the JAX model."""
    import numpy as np

    from unetpp_jax import export
    from unetpp_jax.inference import fold_batchnorm_variables, predict_fn
    from unetpp_jax.numerics import with_numerics

    split = _validation_split(args, loaded)
    images = loaded.input_spec.normalize(split.images[:4])
    if args.format == "stablehlo" and images.shape[1:3] != _stablehlo_size(args, loaded, model):
        h, w = _stablehlo_size(args, loaded, model)  # other size: random images of that size
        images = np.random.RandomState(0).uniform(-1, 1, (4, h, w, images.shape[-1]))
        images = images.astype(np.float32)
    log("checking the export against JAX on 4 validation images")
    variables = fold_batchnorm_variables(loaded.variables)
    jmodel = model if args.precision == "fp32" else with_numerics(model, args.precision)
    if scales is not None:
        variables = {**variables, "quant": scales}
    ref = predict_fn(jmodel, level)(variables, images)
    ref = ref if isinstance(ref, tuple) else (ref,)
    if args.format == "onnx":
        got = export.onnx_predict_fn(export.onnx_session(path))(images)
    else:
        exported, _ = export.load_stablehlo(path)
        got = exported.call(images)
        got = got if isinstance(got, tuple) else (got,)
    diff = max(float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in zip(got, ref))
    agree = min(float(((np.asarray(a) >= 0.5) == (np.asarray(b) >= 0.5)).mean())
                for a, b in zip(got, ref))
    print(f"check: max |export - JAX {args.precision}| = {diff:.2e} over {len(ref)} heads, "
          f"thresholded pixels agree {100 * agree:.3f}%")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="unetpp-export", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="checkpoint directory, training workdir, or 'bundled'")
    src.add_argument("--workdir", help="training run directory (default format: checkpoint)")
    ap.add_argument("--format", choices=FORMATS,
                    help="what to write (default: checkpoint with --workdir, onnx with "
                         "--checkpoint)")
    ap.add_argument("-o", "--out", required=True,
                    help="file to write (a checkpoint directory for --format checkpoint)")
    ap.add_argument("--precision", choices=PRECISIONS, default="fp32",
                    help="fp32 (default); fp16: float16 weights and activations; int8: ONNX QDQ "
                         "with this project's calibrated scales (StableHLO: the float emulation)")
    ap.add_argument("--prune-level", type=int, metavar="L",
                    help="export heads 1..L and only the nodes they need (default: all)")
    ap.add_argument("--calibration", default="kl",
                    choices=("kl", "kl-trt", "max", "percentile"),
                    help="int8 calibration method (default kl, as experiments.eval)")
    ap.add_argument("--calib-images", type=int, default=50,
                    help="int8: calibration images, the first N of the validation split "
                         "(default 50)")
    ap.add_argument("--calib-data", help="int8 calibration (and --check) data: a dataset source as "
                    "experiments.eval --data, read at the checkpoint's input size (default: "
                    "the bundled 96x96 validation split)")
    ap.add_argument("--recalibrate", action="store_true",
                    help="int8: calibrate again even if a saved calibration matches")
    ap.add_argument("--height", type=int, help="stablehlo: input height (default: the input "
                    "spec's size, else 96)")
    ap.add_argument("--width", type=int, help="stablehlo: input width (default: the height)")
    ap.add_argument("--platforms", type=lambda s: [p for p in s.split(",") if p],
                    help="stablehlo: comma-separated platforms to lower for, e.g. cpu,cuda "
                         "(default: this machine's backend)")
    ap.add_argument("--check", action="store_true",
                    help="afterwards, run the file on 4 validation images and print its "
                         "difference from the JAX model")
    ap.add_argument("--force", action="store_true", help="replace an existing output")
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    args = ap.parse_args(argv)
    if args.format is None:
        args.format = "checkpoint" if args.workdir else "onnx"
    if args.calib_images < 1:
        ap.error("--calib-images must be at least 1")

    log = _log_fn(args.quiet)
    try:
        if args.format == "checkpoint":
            return _export_checkpoint(args, log)
        return _export_model(args, log)
    except (UsageError, FileNotFoundError, ValueError, OSError, ImportError) as e:
        msg = " ".join(str(e).split()) or type(e).__name__
        print(f"error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
