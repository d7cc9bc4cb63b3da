"""Short multi-class training, standalone (no resume, one device): until unetpp_jax/train.py
takes class datasets, this trains a UNet++ with softmax heads on a ClassSplit with the
losses of unetpp_jax/losses.py and the optimizer of unetpp_jax/train.py, scores it with the
class metrics each epoch, and saves a checkpoint that experiments/predict.py can use.

    python -m experiments.train_classes --data ../shared/data/dsb2018/stage1_train \
        --dataset dsb2018-3class --epochs 5 --out runs/dsb3
    python -m experiments.train_classes --data my_folder --val-fraction 0.2 --out runs/mine
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--data", required=True, help="a folder dataset or the raw stage1_train")
    ap.add_argument("--dataset", help="registry name (default: detected; dsb2018-3class by name)")
    ap.add_argument("--out", required=True, help="checkpoint folder to write (must not exist)")
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--widths", default="32,64,128,256,512")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--ce-weight", type=float, default=1.0)
    ap.add_argument("--dice-weight", type=float, default=1.0)
    ap.add_argument("--val-fraction", type=float, help="folder datasets: validation fraction")
    ap.add_argument("--limit", type=int, help="use only the first N training images (smoke runs)")
    args = ap.parse_args(argv)

    import jax
    import numpy as np
    import optax

    from unetpp_jax import checkpoint, losses
    from unetpp_jax.data.classes import class_batches
    from unetpp_jax.data.registry import load_dataset
    from unetpp_jax.evaluate_classes import evaluate_classes, format_classes
    from unetpp_jax.model import UNetPlusPlus, init_variables
    from unetpp_jax.pretrained import model_description
    from unetpp_jax.train import TrainConfig, make_optimizer

    opts = {} if args.val_fraction is None else {"val_fraction": args.val_fraction}
    train = load_dataset(args.data, "train", args.size, dataset=args.dataset, **opts)
    val = load_dataset(args.data, "validation", args.size, dataset=args.dataset, **opts)
    n_classes = getattr(train, "num_classes", None)
    if n_classes is None:
        print("error: the data is binary; train it with experiments/train.py", file=sys.stderr)
        return 2
    if args.limit:
        train = train.take(np.arange(min(args.limit, len(train))))
    widths = tuple(int(w) for w in args.widths.split(","))
    cfg = dataclasses.replace(TrainConfig(), widths=widths, learning_rate=args.lr,
                              batch_size=args.batch_size, epochs=args.epochs)
    steps = max(1, len(train) // args.batch_size)
    model = UNetPlusPlus(num_classes=n_classes, widths=widths)
    variables = init_variables(model, 0)
    tx = make_optimizer(cfg, steps)
    params, stats = variables["params"], variables["batch_stats"]
    opt_state = tx.init(params)

    @jax.jit
    def step(params, stats, opt_state, image, label):
        def loss_fn(p):
            logits, upd = model.apply({"params": p, "batch_stats": stats}, image, train=True,
                                      mutable=["batch_stats"])
            loss = losses.multiclass_loss(logits, label, ce_weight=args.ce_weight,
                                          dice_weight=args.dice_weight)
            return loss, upd["batch_stats"]

        (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), stats, opt_state, loss

    print(f"{len(train)} train / {len(val)} val images, {n_classes} classes, {args.size}px, "
          f"widths {widths}", flush=True)
    for epoch in range(args.epochs):
        t0, total = time.perf_counter(), []
        for batch in class_batches(train, args.batch_size, seed=0, epoch=epoch, augment=True):
            params, stats, opt_state, loss = step(params, stats, opt_state, batch["image"],
                                                  batch["label"])
            total.append(float(loss))
        scores = evaluate_classes(model, {"params": params, "batch_stats": stats}, val)
        print(f"epoch {epoch + 1}: loss {np.mean(total):.4f} ({time.perf_counter() - t0:.0f} s); "
              f"val {format_classes(scores)}", flush=True)
    meta = {"model": model_description(model),
            "input": {"channel_order": "BGR", "mean": [0.5] * 3, "std": [0.5] * 3,
                      "size": [args.size, args.size]},
            "training": {"script": "experiments/train_classes.py", "args": vars(args),
                         "val": scores}}
    checkpoint.save_variables(args.out, {"params": params, "batch_stats": stats}, meta)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
