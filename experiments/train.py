"""Train UNet++ in JAX on DSB2018 (resumable: rerun the same command to continue).

    python -m experiments.train --config strong --data ../shared/data/dsb2018/stage1_train --workdir runs/strong

Data parallel over every device. Multi-host (docs/training.md): set JAX_COORDINATOR_ADDRESS
(host:port of process 0), JAX_NUM_PROCESSES and JAX_PROCESS_ID on every host (or run under
SLURM with one task per host) and run the same command everywhere; it initialises
jax.distributed first (CPU collectives: gloo). On CPU,
XLA_FLAGS=--xla_force_host_platform_device_count=N simulates N devices.

Exit codes: 0 done (or stopped by --stop-after-epochs), 2 the workdir is in use by another
training or a checkpoint/log could not be written (one line on stderr says which; rerun the
same command to resume), 3 the loss became non-finite, 4 another process of a multi-host run
was lost.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import os
import sys


def _maybe_init_distributed(heartbeat_timeout: int | None = None) -> None:
    """``jax.distributed.initialize`` when the JAX_* variables are set or under a multi-task SLURM job.

    ``heartbeat_timeout`` (seconds; jax's default 100): how soon the others notice a process
    that died without a word (kill -9, a lost host) and stop.
    """
    import jax

    kw = {} if heartbeat_timeout is None else {"heartbeat_timeout_seconds": heartbeat_timeout}
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
            num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
            process_id=int(os.environ["JAX_PROCESS_ID"]),
            **kw,
        )
    elif os.environ.get("SLURM_JOB_ID") and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(**kw)


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
        else:  # tuples (widths), optional ints or names: a Python literal such as (8, 16, 32)
            try:
                overrides[k] = ast.literal_eval(v)
            except (ValueError, SyntaxError):
                if cur is not None:
                    raise ValueError(f"--set {k}={v}: expected a Python literal like {cur!r}") from None
                overrides[k] = v  # an optional name, e.g. dataset=folder
    return dataclasses.replace(cfg, **overrides)


def _fail(message: str, code: int) -> None:
    """Print ``message`` on stderr; in a multi-process run also exit at once with ``code``:
    jax.distributed's shutdown barrier at exit would otherwise wait for processes that are gone
    or that did not fail."""
    import jax

    print(message, file=sys.stderr, flush=True)
    if jax.process_count() > 1:
        sys.stdout.flush()
        os._exit(code)


def _lost_peer(exc: BaseException) -> bool:
    """Whether ``exc`` says a collective or barrier failed because a peer process went away."""
    text = f"{type(exc).__name__} {exc}".lower()
    return any(k in text for k in ("gloo", "connection", "peer", "heartbeat", "barrier",
                                   "unavailable", "deadline", "coordination", "socket", "closed"))


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
    ap.add_argument("--heartbeat-timeout", type=int, metavar="SECONDS",
                    help="multi-host: seconds after which a silent process counts as dead and "
                         "the others stop (jax's default: 100)")
    args = ap.parse_args(argv)

    _maybe_init_distributed(args.heartbeat_timeout)
    import jax

    from unetpp_jax.data.registry import open_dataset, resolve_dataset
    from unetpp_jax.train import NonFiniteLossError, TrainingError, train

    cfg = get_config(args.config)
    try:
        cfg = apply_overrides(cfg, args.set)
    except ValueError as e:
        ap.error(str(e))
    if args.epochs:
        cfg = dataclasses.replace(cfg, epochs=args.epochs)
    # Absolute from here on: orbax refuses relative checkpoint paths.
    workdir = os.path.abspath(os.path.expanduser(args.workdir or os.path.join("runs", cfg.name)))
    primary = jax.process_index() == 0

    progress = not args.no_progress and primary
    try:
        cfg.build_model()  # a bad --set architecture/encoder/widths fails here, in one line
        # Readers: each process reads only its own rows, inside train().
        options = {}
        if resolve_dataset(args.data, cfg.dataset) == "folder":
            # Every process decides binary/classes alike: from the model, not from its rows.
            options["num_classes"] = max(2, cfg.num_classes)
        train_split = open_dataset(args.data, "train", cfg.image_size, dataset=cfg.dataset,
                                   progress=progress, **options)
        val_split = open_dataset(args.data, "validation", cfg.image_size, dataset=cfg.dataset,
                                 progress=progress, **options)
    except (FileNotFoundError, ValueError) as e:
        _fail(f"error: {e}", 2)
        return 2
    if primary:
        procs = f", {jax.process_count()} processes" if jax.process_count() > 1 else ""
        print(f"config {cfg.name}: {len(train_split)} train / {len(val_split)} val images at "
              f"{cfg.image_size}px, batch {cfg.batch_size} on {jax.device_count()} devices{procs}, "
              f"{cfg.epochs} epochs -> {workdir}", flush=True)
    try:
        summary = train(cfg, workdir, train_split, val_split, progress=progress,
                        stop_after_epochs=args.stop_after_epochs)
    except (TrainingError, NonFiniteLossError) as e:
        _fail(f"error: {e}", 3 if isinstance(e, NonFiniteLossError) else 2)
        return 3 if isinstance(e, NonFiniteLossError) else 2
    except Exception as e:
        if jax.process_count() > 1 and _lost_peer(e):
            _fail(f"error: process {jax.process_index()} lost contact with another process of "
                  f"this {jax.process_count()}-process run ({type(e).__name__}: "
                  f"{str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}); rerun the "
                  f"same command on every host to resume from the last finished epoch in {workdir}",
                  4)
        raise
    best = summary["best"]
    if best and primary:
        print(f"best epoch {best['epoch']}: val MIoU {best['val_miou']:.3f} "
              f"(head {len(best['val_miou_per_head'])}), per head "
              f"{[round(m, 3) for m in best['val_miou_per_head']]}; checkpoints in {workdir}/checkpoints")
    return 0


if __name__ == "__main__":
    sys.exit(main())
