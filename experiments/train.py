"""Train UNet++ in JAX on DSB2018 (resumable: rerun the same command to continue).

    python -m experiments.train --config strong --data ../shared/data/dsb2018/stage1_train --workdir runs/strong

Data parallel over every local device. Multi-host: set JAX_COORDINATOR_ADDRESS (host:port),
JAX_NUM_PROCESSES and JAX_PROCESS_ID on every host (or run under SLURM), and the same command
initialises jax.distributed first. On CPU, XLA_FLAGS=--xla_force_host_platform_device_count=N
simulates N devices.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import os
import sys


def _maybe_init_distributed() -> None:
    import jax

    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        jax.distributed.initialize(
            coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
            num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
            process_id=int(os.environ["JAX_PROCESS_ID"]),
        )
    elif os.environ.get("SLURM_JOB_ID") and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        jax.distributed.initialize()


def _parse_override(text: str):
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--set expects key=value, got {text!r}")
    k, v = text.split("=", 1)
    return k, v


def apply_overrides(cfg, pairs):
    """``cfg`` with ``--set KEY=VALUE`` pairs applied, each value parsed as the field's type."""
    fields = {f.name for f in dataclasses.fields(cfg)}
    overrides = {}
    for k, v in pairs:
        if k not in fields:
            raise ValueError(f"--set {k}: no such TrainConfig field (fields: {', '.join(sorted(fields))})")
        cur = getattr(cfg, k)
        if isinstance(cur, bool):
            overrides[k] = v.lower() in ("1", "true", "yes")
        elif cur is not None and not isinstance(cur, (tuple, list)):
            overrides[k] = type(cur)(v)
        else:  # tuples (widths) and optional ints: a Python literal such as (8, 16, 32, 64, 128)
            overrides[k] = ast.literal_eval(v)
    return dataclasses.replace(cfg, **overrides)


def main(argv=None) -> int:
    from experiments.configs import NAMES, get_config

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--config", required=True, choices=NAMES, help="recipe (experiments/configs/NAME.py)")
    ap.add_argument("--data", required=True,
                    help="DSB2018 stage1_train folder or stage1_train.zip, or a preprocessed folder "
                         "with all 670 ids (the bundled split holds validation only)")
    ap.add_argument("--workdir", help="run directory (default runs/CONFIG); rerun to resume")
    ap.add_argument("--epochs", type=int, help="override the config's epochs")
    ap.add_argument("--set", type=_parse_override, action="append", default=[], metavar="KEY=VALUE",
                    help="override any TrainConfig field, e.g. --set learning_rate=5e-4")
    ap.add_argument("--stop-after-epochs", type=int,
                    help="end this call after N epochs (resume later with the same command)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars (logs only)")
    args = ap.parse_args(argv)

    _maybe_init_distributed()
    from unetpp_jax.data.pipeline import load_split
    from unetpp_jax.train import NonFiniteLossError, train

    cfg = get_config(args.config)
    try:
        cfg = apply_overrides(cfg, args.set)
    except ValueError as e:
        ap.error(str(e))
    if args.epochs:
        cfg = dataclasses.replace(cfg, epochs=args.epochs)
    workdir = args.workdir or os.path.join("runs", cfg.name)

    progress = not args.no_progress
    train_split = load_split(args.data, "train", cfg.image_size, progress=progress)
    val_split = load_split(args.data, "validation", cfg.image_size, progress=progress)
    print(f"config {cfg.name}: {len(train_split)} train / {len(val_split)} val images at "
          f"{cfg.image_size}px, batch {cfg.batch_size}, {cfg.epochs} epochs -> {workdir}", flush=True)
    try:
        summary = train(cfg, workdir, train_split, val_split, progress=progress,
                        stop_after_epochs=args.stop_after_epochs)
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    best = summary["best"]
    if best:
        print(f"best epoch {best['epoch']}: val MIoU {best['val_miou']:.3f} (head 4), per head "
              f"{[round(m, 3) for m in best['val_miou_per_head']]}; checkpoints in {workdir}/checkpoints")
    return 0


if __name__ == "__main__":
    sys.exit(main())
