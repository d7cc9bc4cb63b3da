"""MIoU of UNet++ on the DSB2018 validation split at every precision, next to the model-zoo card.

    python -m experiments.eval --precision all                     # bundled weights and data
    python -m experiments.eval --precision int8 --calibration kl-trt --head all
    python -m experiments.eval --checkpoint my_flax_ckpt --data stage1_train.zip --json out.json
    python -m experiments.eval --precision int8 --precision bf16 --execution native
    python -m experiments.eval --precision int8 --sensitivity --keep-float 3

int8 calibrations are saved (``<checkpoint>/calibration/``, or the user cache for the bundled
or a read-only checkpoint) and reused by later runs; ``--recalibrate`` computes them again.

The metric is the card's: per-image foreground IoU (prediction >= 0.5, ground truth >= 125),
averaged over the validation images, x100. UNET-ZOO scores the last head.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from experiments.cli import positive_int as _positive


def _precisions(values: list[str]) -> list[str]:
    from unetpp_jax.numerics import EVAL_PRECISIONS

    out = []
    for v in values or ["fp32"]:
        for p in (EVAL_PRECISIONS if v == "all" else [v]):
            if p not in out:
                out.append(p)
    return out




def _check_output(path: str, what: str, *, is_dir: bool, protect: list[Path]) -> None:
    """Raise ValueError now, before any work, if ``path`` cannot be written or would overwrite
    one of the inputs (``protect``: the checkpoint being read)."""
    p = Path(path).expanduser().absolute()
    for q in protect:
        q = q.absolute()
        if p == q or q in p.parents:
            raise ValueError(f"{what} {path} is inside the checkpoint {q} being evaluated; "
                             "write it somewhere else")
    parent = p if is_dir and p.exists() else p.parent
    while not parent.exists():  # the nearest existing ancestor must be writable
        parent = parent.parent
    if (p.exists() and is_dir and not p.is_dir()) or (p.exists() and not is_dir and p.is_dir()):
        raise ValueError(f"{what} {path} exists and is a {'file' if is_dir else 'directory'}")
    target = p if p.exists() else parent
    if not os.access(target, os.W_OK):
        raise ValueError(f"{what} {path}: {target} is not writable")


def main(argv=None) -> int:
    from unetpp_jax.numerics import EVAL_PRECISIONS
    from unetpp_jax.quant import METHODS

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--precision", action="append", choices=EVAL_PRECISIONS + ("all",),
                    help=f"{', '.join(EVAL_PRECISIONS)} or all; repeatable (default fp32)")
    ap.add_argument("--checkpoint", help="a checkpoint directory (weights_port/convert.py output "
                    "or an exported one) or a training workdir (its best checkpoint); "
                    "default: the bundled weights")
    ap.add_argument("--data", help="stage1_train folder or .zip, a preprocessed folder, or a TFDS "
                    "data_dir; default: the bundled 96x96 validation split")
    ap.add_argument("--dataset", help="dataset name (data/registry.py: folder, dsb2018, "
                    "dsb2018-3class); default: the one that recognizes --data")
    ap.add_argument("--split", default="validation", choices=["validation", "train", "all"],
                    help="which images to score (default validation; 'all' for a folder dataset)")
    ap.add_argument("--val-fraction", type=float,
                    help="folder datasets: validation fraction of a seeded split (default 0.2)")
    ap.add_argument("--split-seed", type=int, help="folder datasets: the split's seed (default 41)")
    ap.add_argument("--ids", metavar="FILE", help="folder datasets: the validation ids, one per line")
    ap.add_argument("--head", default="last",
                    help="head whose MIoU fills the table: 1..D, 'last' (default, as UNET-ZOO "
                         "scores) or 'all' (also prints every head's MIoU)")
    ap.add_argument("--calibration", default="kl", choices=METHODS,
                    help="int8 activation calibration (default kl: TVM/MXNet, as the vendor)")
    ap.add_argument("--calib-images", type=_positive, default=50,
                    help="images used for calibration (default 50, as the vendor)")
    ap.add_argument("--calib-split", default="validation", choices=["validation", "train"],
                    help="where calibration images come from (default validation, as the vendor; "
                         "train needs --data with the training split)")
    ap.add_argument("--skip-first-conv", action="store_true",
                    help="int8: keep the conv reading the image in float (TVM's skip_conv_layers=[0])")
    ap.add_argument("--requantize-concat", action="store_true",
                    help="int8: also round every node output to its own int8 grid before concat")
    ap.add_argument("--execution", choices=("emulated", "native"), default="emulated",
                    help="fp16/bf16/int8: 'emulated' (default: the vendor engines' arithmetic in "
                         "float32) or 'native' (int8 x int8 -> int32 / bfloat16 convolutions)")
    ap.add_argument("--recalibrate", action="store_true",
                    help="int8: calibrate again even if a saved calibration fits")
    ap.add_argument("--sensitivity", action="store_true",
                    help="int8: rank the convs by the MIoU drop of quantizing each alone "
                         "(everything else fp32), on --sensitivity-images images")
    ap.add_argument("--sensitivity-images", type=_positive, default=32,
                    help="validation images of the sensitivity pass (default 32: it runs one "
                         "evaluation per conv, ~35)")
    ap.add_argument("--keep-float", type=int, default=0, metavar="K",
                    help="int8: keep the K most sensitive convs in float (runs the "
                         "sensitivity pass; mixed precision)")
    ap.add_argument("--batch-size", type=_positive, default=16, help="evaluation batch (default 16)")
    ap.add_argument("--json", metavar="OUT", help="write the results as JSON")
    ap.add_argument("--save-overlays", metavar="DIR",
                    help="write a PNG panel per image: image, ground truth, each precision, disagreement")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)

    progress = not args.no_progress
    if args.keep_float < 0:
        print("error: --keep-float must be >= 0", file=sys.stderr)
        return 2
    try:
        from unetpp_jax.pretrained import bundled_checkpoint_path

        protect = [Path(args.checkpoint) if args.checkpoint else bundled_checkpoint_path()]
        if args.json:
            _check_output(args.json, "--json", is_dir=False, protect=protect)
        if args.save_overlays:
            _check_output(args.save_overlays, "--save-overlays", is_dir=True, protect=protect)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    from unetpp_jax import evaluate, quant
    from unetpp_jax.counting import count_params, xla_flops
    from unetpp_jax.data.registry import load_dataset
    from unetpp_jax.numerics import get_numerics
    from unetpp_jax.pretrained import load_checkpoint

    data_options = {k: v for k, v in (("val_fraction", args.val_fraction),
                                      ("seed", args.split_seed), ("ids", args.ids)) if v is not None}

    def load_split(source, which, progress):
        size = loaded.input_spec.size[0] if loaded.input_spec.size else 96
        return load_dataset(source, which, size, dataset=args.dataset, progress=progress,
                            **data_options)

    try:
        loaded = load_checkpoint(args.checkpoint)
        split = load_split(args.data, args.split, progress=progress)
    except (FileNotFoundError, ValueError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    model, variables, spec = loaded.model, loaded.variables, loaded.input_spec
    if model.num_classes > 1:
        return _eval_classes(args, loaded, split, progress)
    precisions = _precisions(args.precision)
    if (args.sensitivity or args.keep_float) and "int8" not in precisions:
        precisions.append("int8")
    n_heads = model.num_heads
    if args.head in ("all", "last"):
        head = n_heads
    elif args.head.isdigit() and 1 <= int(args.head) <= n_heads:
        head = int(args.head)
    else:
        print(f"error: --head {args.head}: the checkpoint has heads 1..{n_heads} "
              "(or use 'last' / 'all')", file=sys.stderr)
        return 2
    int8_options = _precision_options(args, "int8")

    calibration = None
    if any(get_numerics(p).needs_calibration for p in precisions):
        try:
            calib_split = split if args.calib_split == "validation" else load_split(
                args.data, "train", progress=progress)
        except (FileNotFoundError, ValueError) as e:
            print(f"error: --calib-split train: {e}", file=sys.stderr)
            return 2
        n = min(args.calib_images, len(calib_split))
        ckpt_dir = _checkpoint_dir(args.checkpoint)
        calibration = quant.load_or_calibrate(
            ckpt_dir, model, variables, spec.normalize(calib_split.images[:n]),
            args.calibration, progress=_calibration_bar(progress),
            recalibrate=args.recalibrate, log=lambda m: print(m, file=sys.stderr))
        if calibration.reused:
            print(f"reused the {args.calibration} calibration on {n} {args.calib_split} images "
                  f"saved at {calibration.path} ({calibration.created})")
        else:
            where = f"saved to {calibration.path}" if calibration.path else "not saved"
            print(f"calibrated {args.calibration} on {n} {args.calib_split} images in "
                  f"{calibration.seconds:.1f} s; {where}")

    sensitivity = None
    if args.sensitivity or args.keep_float:
        sub = split.take(range(min(args.sensitivity_images, len(split))))
        sensitivity = evaluate.conv_sensitivity(
            model, variables, sub, calibration, head=head, batch_size=args.batch_size,
            progress=progress, input_spec=spec, **int8_options)
        _print_sensitivity(sensitivity)
        if args.keep_float:
            kept = tuple(r["conv"] for r in sensitivity["ranking"][:args.keep_float])
            int8_options["keep_float"] = kept
            print(f"int8 keeps {len(kept)} conv(s) float: {', '.join(kept)}")

    results = []
    for p in precisions:
        options = int8_options if p == "int8" else _precision_options(args, p)
        r = evaluate.evaluate_precision(
            model, variables, split, p, head=head, calibration=calibration,
            checkpoint=loaded.name, batch_size=args.batch_size, progress=progress,
            input_spec=spec, **options)
        if sensitivity is not None and p == "int8":
            r.extra["sensitivity"] = sensitivity
        if getattr(split, "num_classes", None) is None:  # the class metrics beside the headline
            from unetpp_jax.evaluate_classes import evaluate_classes

            classes = evaluate_classes(model, variables, split, probs=r.probs[r.head - 1])
            classes.pop("confusion", None)
            r.extra.update(classes)
        results.append(r)
        print(f"{r.label}: MIoU {r.miou:.3f} (head {r.head}), Dice {r.dice:.3f}, {r.n_images} images, "
              f"{r.seconds:.1f} s", flush=True)
        if not all(map(_finite, r.miou_per_head)) or r.probs is not None and not _all_finite(r.probs):
            print(f"warning: {p} predictions hold NaN or Inf: the checkpoint's weights may be "
                  "damaged", file=sys.stderr)

    h, w = split.images.shape[1:3]
    flops = xla_flops(model, variables, (1, h, w, spec.channels)) / 1e9
    params = count_params(variables["params"]) / 1e6
    print()
    print(evaluate.format_table(results, flops_g=flops, params_m=params,
                                shape=f"{spec.channels}x{h}x{w}", per_head=args.head == "all"))
    print(f"\ncheckpoint: {loaded.name}; data: {args.data or 'bundled validation split'} "
          f"({len(split)} images); FLOPs: XLA count (the card's 10.897 is thop-based)")
    if args.json:
        from unetpp_jax.files import write_text_atomic

        payload = [r.to_json() for r in results]
        write_text_atomic(args.json, json.dumps(payload[0] if len(payload) == 1 else payload,
                                                indent=2))
        print(f"wrote {args.json}")
    if args.save_overlays:
        from unetpp_jax.visualize import save_overlays

        preds = {r.label: r.probs[r.head - 1] for r in results}
        paths = save_overlays(args.save_overlays, split.images, split.masks, split.ids, preds)
        print(f"wrote {len(paths)} overlay panels to {args.save_overlays}")
    return 0


def _precision_options(args, precision: str) -> dict:
    """The numerics options the command line sets for ``precision``."""
    if precision == "int8":
        return {"skip_first_conv": args.skip_first_conv,
                "requantize_concat_inputs": args.requantize_concat, "execution": args.execution}
    return {"execution": args.execution} if precision in ("fp16", "bf16") else {}


def _eval_classes(args, loaded, split, progress) -> int:
    """A multi-class model: per-class IoU from one pooled confusion matrix, their mean and the
    pixel accuracy, per precision (x100 printed, fractions in the JSON)."""
    from unetpp_jax import quant
    from unetpp_jax.evaluate_classes import evaluate_classes, format_classes
    from unetpp_jax.numerics import get_numerics, options_of

    unsupported = [flag for flag, used in (("--sensitivity", args.sensitivity),
                                           ("--keep-float", args.keep_float),
                                           ("--save-overlays", args.save_overlays),
                                           ("--calib-split train", args.calib_split == "train"))
                   if used]
    if unsupported:
        print(f"error: {', '.join(unsupported)}: not available for a model with "
              f"{loaded.model.num_classes} classes (binary models only); drop the flag",
              file=sys.stderr)
        return 2
    head = loaded.model.num_heads if args.head in ("all", "last") else int(args.head)
    payload = []
    for p in _precisions(args.precision):
        calibration = None
        numerics = get_numerics(p, **_precision_options(args, p))
        if p == "int8":
            n = min(args.calib_images, len(split))
            calibration = quant.load_or_calibrate(
                _checkpoint_dir(args.checkpoint), loaded.model, loaded.variables,
                loaded.input_spec.normalize(split.images[:n]), args.calibration,
                recalibrate=args.recalibrate)
        result = evaluate_classes(loaded.model, loaded.variables, split, head=head,
                                  input_spec=loaded.input_spec, precision=numerics,
                                  calibration=calibration, batch_size=args.batch_size)
        print(f"{p}: {format_classes(result)} ({len(split)} images, head {head})", flush=True)
        result.pop("confusion", None)
        payload.append({"precision": p, "options": options_of(numerics), "head": head,
                        "n_images": len(split), "checkpoint": loaded.name, **result})
    if args.json:
        from unetpp_jax.files import write_text_atomic

        write_text_atomic(args.json, json.dumps(payload[0] if len(payload) == 1 else payload,
                                                indent=2))
        print(f"wrote {args.json}")
    return 0


def _checkpoint_dir(checkpoint):
    """Where calibrations are saved (``<dir>/calibration/``): the ``--checkpoint`` directory or
    training workdir (not inside its orbax ``checkpoints/``; a calibration records the weights'
    fingerprint, so the next best epoch's is never mixed up with it), None for the bundled
    weights (the user cache)."""
    return None if checkpoint is None else Path(checkpoint).expanduser()


def _print_sensitivity(result: dict) -> None:
    print(f"\nint8 sensitivity on {result['n_images']} images: fp32 MIoU {result['fp32']:.3f}, "
          f"all convs int8 {result['int8']:.3f} (drop {result['fp32'] - result['int8']:.3f}); "
          "each conv quantized alone:")
    print("| rank | conv | MIoU drop |\n|---|---|---|")
    for k, r in enumerate(result["ranking"], 1):
        print(f"| {k} | {r['conv']} | {r['drop']:+.3f} |")
    print()


def _finite(x) -> bool:
    import math

    return math.isfinite(x)


def _all_finite(a) -> bool:
    import numpy as np

    return bool(np.isfinite(a).all())


def _calibration_bar(enabled: bool):
    """A progress callback for quant.calibrate: one tqdm bar per pass."""
    if not enabled:
        return None
    from tqdm.auto import tqdm

    bars = {}

    def update(pass_name: str, done: int, total: int) -> None:
        bar = bars.get(pass_name)
        if bar is None:
            bar = bars[pass_name] = tqdm(total=total, desc=f"calibrate ({pass_name})", leave=False)
        bar.update(done - bar.n)
        if done == total:
            bar.close()

    return update


if __name__ == "__main__":
    sys.exit(main())
