"""Build the DSB2018 TFDS dataset (or the bundled validation folder) and print how long it takes.

    python -m experiments.build_data --source path/to/stage1_train.zip [--data-dir ~/tensorflow_datasets] [--size 96]
    python -m experiments.build_data --bundle --source ../shared/data/dsb2018/stage1_train

The first form builds ``dsb2018/<size>`` (array_record, no TensorFlow) and then times reading the
whole validation split back; the second regenerates ``unetpp_jax/assets/dsb2018_96_val``.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--source", required=True,
                    help="raw stage1_train folder or stage1_train.zip (or a folder holding either)")
    ap.add_argument("--data-dir", default=os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets"),
                    help="TFDS data_dir (default $TFDS_DATA_DIR or ~/tensorflow_datasets)")
    ap.add_argument("--size", type=int, default=96, choices=(96, 256), help="image side (default 96)")
    ap.add_argument("--overwrite", action="store_true", help="rebuild if already built")
    ap.add_argument("--bundle", nargs="?", const="", default=None, metavar="FOLDER",
                    help="write the 96x96 validation folder instead (default: the package's assets)")
    args = ap.parse_args(argv)

    from unetpp_jax.data import pipeline

    if args.bundle is not None:
        t0 = time.perf_counter()
        folder = pipeline.write_bundle(args.source, args.bundle or None,
                                       command=f"python -m experiments.build_data --bundle --source {args.source}")
        print(f"bundle: wrote {folder} in {time.perf_counter() - t0:.1f} s")
        t0 = time.perf_counter()
        split = pipeline.load_folder_split(folder)
        print(f"bundle: read {len(split)} validation images in {time.perf_counter() - t0:.2f} s")
        return

    from unetpp_jax.data import dsb2018

    data_dir = Path(args.data_dir).expanduser()
    if dsb2018.Dsb2018(config=str(args.size), data_dir=os.fspath(data_dir)).is_prepared() and not args.overwrite:
        print(f"build: dsb2018/{args.size} is already built in {data_dir} (--overwrite to rebuild and time it)")
    t0 = time.perf_counter()
    builder = dsb2018.build(args.source, data_dir, args.size, overwrite=args.overwrite)
    build_s = time.perf_counter() - t0
    print(f"build: dsb2018/{args.size} in {builder.data_dir} ({build_s:.1f} s; "
          f"{sum(s.num_examples for s in builder.info.splits.values())} examples)")
    t0 = time.perf_counter()
    split = pipeline.load_tfds_split(data_dir, "validation", args.size)
    read_s = time.perf_counter() - t0
    print(f"read: validation split, {len(split)} images {split.images.shape[1:]} in {read_s:.2f} s")


if __name__ == "__main__":
    main()
