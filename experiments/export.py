"""Export a training run's best checkpoint as a standalone checkpoint directory.

    python -m experiments.export --workdir runs/strong -o unetpp_jax/assets/weights/unetpp_dsb2018_96

The output is what `python -m experiments.eval --checkpoint DIR` and
`unetpp_jax.model.load_pretrained(DIR)` read; its metadata.json records the training config
and the best epoch's validation metrics.
"""

import argparse
import sys


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--workdir", required=True, help="training run directory")
    ap.add_argument("-o", "--out", required=True, help="checkpoint directory to write")
    ap.add_argument("--force", action="store_true", help="replace an existing checkpoint")
    args = ap.parse_args(argv)

    from unetpp_jax.checkpoint import CheckpointExistsError
    from unetpp_jax.train import export_best

    try:
        path = export_best(args.workdir, args.out, force=args.force)
    except (FileNotFoundError, CheckpointExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
