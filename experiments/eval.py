"""MIoU of UNet++ on the DSB2018 validation split at fp32, emulated fp16 and emulated int8,
next to the vendor model-zoo card.

    python -m experiments.eval --precision all                     # bundled weights and data
    python -m experiments.eval --precision int8 --calibration kl-trt --head all
    python -m experiments.eval --checkpoint my_flax_ckpt --data stage1_train.zip --json out.json

The metric is the card's: per-image foreground IoU (prediction >= 0.5, ground truth >= 125),
averaged over the 134 validation images, x100. UNET-ZOO scores the last head, X(0,4).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

PRECISIONS = ("fp32", "fp16", "int8")


def _precisions(values: list[str]) -> list[str]:
    out = []
    for v in values or ["fp32"]:
        for p in (PRECISIONS if v == "all" else [v]):
            if p not in out:
                out.append(p)
    return out


def main(argv=None) -> int:
    from unetpp_jax.quant import METHODS

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--precision", action="append", choices=PRECISIONS + ("all",),
                    help="fp32, fp16, int8 or all; repeatable (default fp32)")
    ap.add_argument("--checkpoint", help="a checkpoint directory (weights_port/convert.py output "
                    "or an exported one) or a training workdir (its best checkpoint); "
                    "default: the bundled weights")
    ap.add_argument("--data", help="stage1_train folder or .zip, a preprocessed folder, or a TFDS "
                    "data_dir; default: the bundled 96x96 validation split")
    ap.add_argument("--head", default="4", choices=["1", "2", "3", "4", "all"],
                    help="head whose MIoU fills the table (default 4, as UNET-ZOO scores); "
                         "'all' also prints every head's MIoU")
    ap.add_argument("--calibration", default="kl", choices=METHODS,
                    help="int8 activation calibration (default kl: TVM/MXNet, as the vendor)")
    ap.add_argument("--calib-images", type=int, default=50,
                    help="images used for calibration (default 50, as the vendor)")
    ap.add_argument("--calib-split", default="validation", choices=["validation", "train"],
                    help="where calibration images come from (default validation, as the vendor; "
                         "train needs --data with the training split)")
    ap.add_argument("--skip-first-conv", action="store_true",
                    help="int8: keep conv0_0's first conv in float (TVM's skip_conv_layers=[0])")
    ap.add_argument("--requantize-concat", action="store_true",
                    help="int8: also round every block output to its own int8 grid before concat")
    ap.add_argument("--batch-size", type=int, default=16, help="evaluation batch (default 16)")
    ap.add_argument("--json", metavar="OUT", help="write the results as JSON")
    ap.add_argument("--save-overlays", metavar="DIR",
                    help="write a PNG panel per image: image, ground truth, each precision, disagreement")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)

    import numpy as np

    from unetpp_jax import evaluate, quant
    from unetpp_jax.data.pipeline import load_split, normalize
    from unetpp_jax.model import DEPTH, count_params, xla_flops
    from unetpp_jax.weights import resolve_checkpoint

    progress = not args.no_progress
    try:
        model, variables, ckpt_name = resolve_checkpoint(args.checkpoint)
        split = load_split(args.data, "validation", progress=progress)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    precisions = _precisions(args.precision)
    n_heads = DEPTH if model.deep_supervision else 1
    head = n_heads if args.head == "all" else int(args.head)
    if head > n_heads:
        print(f"error: --head {head}: the checkpoint has {n_heads} head(s)", file=sys.stderr)
        return 2

    calibration = None
    if "int8" in precisions:
        try:
            calib_split = split if args.calib_split == "validation" else load_split(
                args.data, "train", progress=progress)
        except (FileNotFoundError, ValueError) as e:
            print(f"error: --calib-split train: {e}", file=sys.stderr)
            return 2
        n = min(args.calib_images, len(calib_split))
        calibration = quant.calibrate(model, variables, normalize(calib_split.images[:n]),
                                      method=args.calibration)
        print(f"calibrated {args.calibration} on {n} {args.calib_split} images in "
              f"{calibration.seconds:.1f} s")

    results = []
    for p in precisions:
        r = evaluate.evaluate_precision(
            model, variables, split, p, head=head, calibration=calibration, checkpoint=ckpt_name,
            batch_size=args.batch_size, progress=progress, skip_first_conv=args.skip_first_conv,
            requantize_concat_inputs=args.requantize_concat)
        results.append(r)
        print(f"{p}: MIoU {r.miou:.3f} (head {r.head}), Dice {r.dice:.3f}, {r.n_images} images, "
              f"{r.seconds:.1f} s", flush=True)

    size = split.size
    flops = xla_flops(model, variables, (1, size, size, 3)) / 1e9
    params = count_params(variables["params"]) / 1e6
    print()
    print(evaluate.format_table(results, flops_g=flops, params_m=params, shape=f"3x{size}x{size}",
                                per_head=args.head == "all"))
    print(f"\ncheckpoint: {ckpt_name}; data: {args.data or 'bundled validation split'} "
          f"({len(split)} images); FLOPs: XLA count (the card's 10.897 is thop-based)")
    if args.json:
        payload = [r.to_json() for r in results]
        Path(args.json).write_text(json.dumps(payload[0] if len(payload) == 1 else payload, indent=2))
        print(f"wrote {args.json}")
    if args.save_overlays:
        from unetpp_jax.visualize import save_overlays

        preds = {r.precision: r.probs[r.head - 1] for r in results}
        paths = save_overlays(args.save_overlays, split.images, split.masks, split.ids, preds)
        print(f"wrote {len(paths)} overlay panels to {args.save_overlays}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
