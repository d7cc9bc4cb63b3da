"""Training UNet++ in JAX: config, loss, jitted data-parallel step, resumable loop.

* The state carries ``batch_stats`` (and optionally an exponential moving average of the
  weights); the step is jitted with the state donated and the batch sharded over a
  ``jax.sharding.Mesh`` of every device (parameters replicated). jit's semantics are global, so
  BatchNorm sees the whole global batch: N devices give the same step as one.
* Orbax ``CheckpointManager``: ``<workdir>/checkpoints/last`` every epoch (resume point) and
  ``<workdir>/checkpoints/best`` (the best validation MIoU, head 4, as UNET-ZOO keeps). The data
  order is a function of ``(seed, epoch)``, so a run killed at any moment resumes from the last
  finished epoch and sees exactly the batches it would have seen.
* Per-epoch metrics go to ``<workdir>/metrics.jsonl`` and ``metrics.csv``; ``curves.png`` at the end.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from tqdm.auto import tqdm

from unetpp_jax.data import pipeline
from unetpp_jax.evaluate import evaluate_split
from unetpp_jax.model import WIDTHS, UNetPlusPlus, init_variables


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything a run depends on; saved next to its checkpoints."""

    name: str = "custom"
    widths: Sequence[int] = WIDTHS
    image_size: int = 96
    batch_size: int = 8  # global batch
    epochs: int = 21
    optimizer: str = "adam"  # "adam" | "adamw" | "sgd"
    learning_rate: float = 1e-3
    schedule: str = "constant"  # "constant" | "cosine"
    warmup_epochs: float = 0.0
    final_learning_rate: float = 1e-5  # end of the cosine
    weight_decay: float = 0.0
    momentum: float = 0.9  # sgd only
    bce_weight: float = 1.0
    dice_weight: float = 0.0
    shuffle: bool = False  # False = UNET-ZOO's fixed split order
    augment: bool = False  # random flips / rot90
    ema_decay: float = 0.0  # 0 = no weight averaging
    seed: int = 0
    eval_batch_size: int = 16
    max_steps_per_epoch: int | None = None  # for tiny test runs
    train_limit: int | None = None  # use only the first N training examples (tests)
    val_limit: int | None = None

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["widths"] = list(self.widths)
        return d


# ---------------------------------------------------------------------------------------------
# Loss


def soft_dice_loss(logits: jax.Array, target: jax.Array, smooth: float = 1e-5) -> jax.Array:
    """1 - per-image soft Dice of sigmoid(logits) against the soft mask, averaged over images.

    As pytorch-nested-unet's ``BCEDiceLoss`` computes its Dice term (per image, smooth 1e-5).
    """
    p = jax.nn.sigmoid(logits).reshape(logits.shape[0], -1)
    t = target.reshape(target.shape[0], -1)
    dice = (2.0 * (p * t).sum(-1) + smooth) / (p.sum(-1) + t.sum(-1) + smooth)
    return 1.0 - dice.mean()


def deep_supervision_loss(logits, target, bce_weight: float = 1.0, dice_weight: float = 0.0):
    """Mean over heads of ``bce_weight * BCE + dice_weight * soft-Dice loss`` (UNET-ZOO: BCE only).

    BCE is computed from logits (``optax.sigmoid_binary_cross_entropy``, stable for any logit)
    against the soft mask; UNET-ZOO applies ``nn.BCELoss`` to its in-model sigmoid, the same
    function of the logits.
    """
    heads = logits if isinstance(logits, (tuple, list)) else (logits,)
    total = 0.0
    for z in heads:
        loss = bce_weight * optax.sigmoid_binary_cross_entropy(z, target).mean()
        if dice_weight:
            loss = loss + dice_weight * soft_dice_loss(z, target)
        total = total + loss
    return total / len(heads)


# ---------------------------------------------------------------------------------------------
# State and step


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    ema: Any  # {"params", "batch_stats"} moving average, or None
    tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)

    def candidate_variables(self) -> dict[str, dict]:
        """The weights validation scores: the raw ones and, with EMA, the moving average.

        Both are scored and the better one is kept as "best": an average of BatchNorm running
        statistics taken while the weights still move fast does not fit the averaged weights
        (measured on the strong run at epoch 8: raw 78.9 MIoU, EMA 37.2, EMA weights with the
        raw statistics 71.5), so early on the raw weights win and late, at low learning rate,
        the average usually does.
        """
        out = {"raw": {"params": self.params, "batch_stats": self.batch_stats}}
        if self.ema is not None:
            out["ema"] = {"params": self.ema["params"], "batch_stats": self.ema["batch_stats"]}
        return out


def learning_rate_schedule(cfg: TrainConfig, steps_per_epoch: int) -> optax.Schedule:
    total = cfg.epochs * steps_per_epoch
    if cfg.schedule == "constant":
        return optax.constant_schedule(cfg.learning_rate)
    if cfg.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(
            init_value=cfg.learning_rate * 0.01 if cfg.warmup_epochs else cfg.learning_rate,
            peak_value=cfg.learning_rate,
            warmup_steps=int(cfg.warmup_epochs * steps_per_epoch),
            decay_steps=total,
            end_value=cfg.final_learning_rate,
        )
    raise ValueError(f"unknown schedule {cfg.schedule!r}: use 'constant' or 'cosine'")


def make_optimizer(cfg: TrainConfig, steps_per_epoch: int) -> optax.GradientTransformation:
    lr = learning_rate_schedule(cfg, steps_per_epoch)
    if cfg.optimizer == "adam":  # torch.optim.Adam(lr, betas=(0.9, 0.999), eps=1e-8), L2 via grads
        tx = optax.adam(lr, b1=0.9, b2=0.999, eps=1e-8)
        if cfg.weight_decay:
            tx = optax.chain(optax.add_decayed_weights(cfg.weight_decay), tx)
        return tx
    if cfg.optimizer == "adamw":
        return optax.adamw(lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        tx = optax.sgd(lr, momentum=cfg.momentum)
        if cfg.weight_decay:
            tx = optax.chain(optax.add_decayed_weights(cfg.weight_decay), tx)
        return tx
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}: use 'adam', 'adamw' or 'sgd'")


def create_state(cfg: TrainConfig, steps_per_epoch: int) -> tuple[UNetPlusPlus, TrainState]:
    model = UNetPlusPlus(widths=tuple(cfg.widths))
    variables = init_variables(model, cfg.seed)
    tx = make_optimizer(cfg, steps_per_epoch)
    ema = None
    if cfg.ema_decay:
        # A copy, not an alias: the step donates the state, and one buffer cannot be donated twice.
        ema = jax.tree_util.tree_map(jnp.copy, {"params": variables["params"],
                                                "batch_stats": variables["batch_stats"]})
    state = TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                       batch_stats=variables["batch_stats"], opt_state=tx.init(variables["params"]),
                       ema=ema, tx=tx)
    return model, state


def make_train_step(model: UNetPlusPlus, cfg: TrainConfig, mesh: Mesh):
    """The jitted step ``(state, batch) -> (state, loss)``: state donated, batch sharded on 'data'."""

    def step(state: TrainState, batch):
        def loss_fn(params):
            logits, updates = model.apply({"params": params, "batch_stats": state.batch_stats},
                                          batch["image"], train=True, mutable=["batch_stats"])
            loss = deep_supervision_loss(logits, batch["mask"], cfg.bce_weight, cfg.dice_weight)
            return loss, updates["batch_stats"]

        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = state.ema
        if ema is not None:
            d = cfg.ema_decay
            ema = jax.tree_util.tree_map(lambda e, x: d * e + (1.0 - d) * x, ema,
                                         {"params": params, "batch_stats": batch_stats})
        new = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                            opt_state=opt_state, ema=ema)
        return new, loss

    replicated = NamedSharding(mesh, P())
    data = NamedSharding(mesh, P("data"))
    # XLA's default compiler options here, not layers.XLA_COMPILER_OPTIONS: with YNNPACK off, the
    # 2-device data-parallel step's first-conv gradient was 6.5e-5 away from a float64 reference
    # (0.4% of its largest entry; 1.6e-7 with the default, and on one device either way), and
    # the training step was no faster without YNNPACK (3.9 images/s both ways).
    return jax.jit(step, in_shardings=(replicated, data), out_shardings=(replicated, replicated),
                   donate_argnums=0)


def data_mesh() -> Mesh:
    """A 1-D mesh named 'data' over every device of every process."""
    return Mesh(np.array(jax.devices()), ("data",))


def shard_batch(batch: dict, mesh: Mesh) -> dict:
    """Place a global host batch on the mesh, split along the batch axis.

    Each process holds the whole global batch in host memory (the split is small) and gives
    its own slice; ``make_array_from_process_local_data`` assembles the global array.
    """
    sharding = NamedSharding(mesh, P("data"))
    n_proc, pid = jax.process_count(), jax.process_index()
    out = {}
    for k, v in batch.items():
        per = v.shape[0] // n_proc
        out[k] = jax.make_array_from_process_local_data(sharding, v[pid * per:(pid + 1) * per],
                                                        v.shape)
    return out


# ---------------------------------------------------------------------------------------------
# Checkpoints and logs


class NonFiniteLossError(RuntimeError):
    pass


def _checkpointable(state: TrainState, epoch: int) -> dict:
    return {"step": state.step, "params": state.params, "batch_stats": state.batch_stats,
            "opt_state": state.opt_state, "ema": state.ema, "epoch": jnp.asarray(epoch, jnp.int32)}


def _restore_into(state: TrainState, tree: dict) -> tuple[TrainState, int]:
    state = state.replace(step=tree["step"], params=tree["params"],
                          batch_stats=tree["batch_stats"], opt_state=tree["opt_state"],
                          ema=tree["ema"])
    return state, int(tree["epoch"])


def _managers(workdir: Path):
    opts_last = ocp.CheckpointManagerOptions(max_to_keep=1, create=True)
    opts_best = ocp.CheckpointManagerOptions(max_to_keep=1, create=True)
    return (ocp.CheckpointManager(workdir / "checkpoints" / "last", options=opts_last),
            ocp.CheckpointManager(workdir / "checkpoints" / "best", options=opts_best))


def _read_log(path: Path, upto_epoch: int) -> list[dict]:
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r["epoch"] <= upto_epoch]


def _write_logs(workdir: Path, rows: list[dict]) -> None:
    (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if rows:
        with open(workdir / "metrics.csv", "w", newline="") as f:
            fields = list(dict.fromkeys(k for r in rows for k in r))  # rows may gain fields
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            w.writerows(rows)


def plot_curves(rows: list[dict], path: Path) -> None:
    """Training loss and validation MIoU (every head) per epoch, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [r["epoch"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(ep, [r["train_loss"] for r in rows], marker="o")
    a.set(xlabel="epoch", ylabel="train loss", title="training loss")
    for k in range(len(rows[0]["val_miou_per_head"])):
        b.plot(ep, [r["val_miou_per_head"][k] for r in rows], marker=".", label=f"head {k + 1}")
    b.set(xlabel="epoch", ylabel="val MIoU (%)", title="validation MIoU (table metric)")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# The loop


def train(cfg: TrainConfig, workdir, train_split: pipeline.Split, val_split: pipeline.Split,
          *, progress: bool = True, stop_after_epochs: int | None = None) -> dict:
    """Train (or resume) ``cfg`` in ``workdir``; returns a summary of the best epoch.

    ``stop_after_epochs`` ends this call after that many epochs even if the run is not
    finished (a later call resumes) — used by tests and for running in slices.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    cfg_path = workdir / "config.json"
    if cfg_path.exists():
        saved = json.loads(cfg_path.read_text())
        if saved != cfg.to_json():
            diff = {k: (saved.get(k), v) for k, v in cfg.to_json().items() if saved.get(k) != v}
            raise ValueError(f"{workdir} holds a run with another config (saved vs now: {diff}); "
                             "use a new --workdir or the same settings to resume")
    else:
        cfg_path.write_text(json.dumps(cfg.to_json(), indent=2))

    if cfg.train_limit:
        train_split = train_split.take(range(min(cfg.train_limit, len(train_split))))
    if cfg.val_limit:
        val_split = val_split.take(range(min(cfg.val_limit, len(val_split))))
    if cfg.batch_size % jax.device_count():
        raise ValueError(f"batch_size {cfg.batch_size} is not divisible by the "
                         f"{jax.device_count()} devices")
    steps_per_epoch = pipeline.num_batches(len(train_split), cfg.batch_size)
    if cfg.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, cfg.max_steps_per_epoch)
    if steps_per_epoch == 0:
        raise ValueError(f"{len(train_split)} training examples make no batch of {cfg.batch_size}")

    mesh = data_mesh()
    model, state = create_state(cfg, steps_per_epoch)
    last_mngr, best_mngr = _managers(workdir)
    start_epoch = 1
    if last_mngr.latest_step() is not None:
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, _checkpointable(state, 0))
        tree = last_mngr.restore(last_mngr.latest_step(), args=ocp.args.StandardRestore(abstract))
        state, done_epoch = _restore_into(state, tree)
        start_epoch = done_epoch + 1
        print(f"resumed {workdir} after epoch {done_epoch} (step {int(state.step)})")
    rows = _read_log(workdir / "metrics.jsonl", start_epoch - 1)
    best = max(rows, key=lambda r: r["val_miou"]) if rows else None

    state = jax.device_put(state, NamedSharding(mesh, P()))
    step_fn = make_train_step(model, cfg, mesh)
    epochs_run = 0
    for epoch in range(start_epoch, cfg.epochs + 1):
        if stop_after_epochs is not None and epochs_run >= stop_after_epochs:
            break
        t0 = time.perf_counter()
        it = pipeline.batches(train_split, cfg.batch_size, seed=cfg.seed, epoch=epoch,
                              shuffle=cfg.shuffle, augment=cfg.augment)
        bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch}/{cfg.epochs}", disable=not progress,
                   dynamic_ncols=True)
        losses = []
        for _, batch in zip(range(steps_per_epoch), it):
            state, loss = step_fn(state, shard_batch(batch, mesh))
            loss = float(loss)
            if not math.isfinite(loss):
                bar.close()
                raise NonFiniteLossError(
                    f"loss became {loss} at step {int(state.step)} (epoch {epoch}); the last good "
                    f"checkpoint is in {workdir / 'checkpoints' / 'last'}. Lower the learning "
                    "rate or check the data.")
            losses.append(loss)
            bar.set_postfix(loss=f"{np.mean(losses):.4f}")
            bar.update()
        bar.close()
        train_s = time.perf_counter() - t0
        candidates = state.candidate_variables()
        scored = {name: evaluate_split(model, v, val_split, batch_size=cfg.eval_batch_size)
                  for name, v in candidates.items()}
        chosen = max(scored, key=lambda name: scored[name].miou)  # ties: the first, raw
        scores = scored[chosen]
        row = {"epoch": epoch, "step": int(state.step), "train_loss": float(np.mean(losses)),
               "val_miou": scores.miou, "val_miou_per_head": scores.miou_per_head,
               "val_dice": scores.dice, "val_weights": chosen,
               **{f"val_miou_{name}": sc.miou for name, sc in scored.items()},
               "train_seconds": round(train_s, 2),
               "train_images_per_s": round(steps_per_epoch * cfg.batch_size / train_s, 3),
               "eval_seconds": round(time.perf_counter() - t0 - train_s, 2)}
        rows.append(row)
        is_best = best is None or row["val_miou"] > best["val_miou"]
        if is_best:
            best = row
            best_mngr.save(epoch, args=ocp.args.StandardSave(candidates[chosen]), force=True)
            best_mngr.wait_until_finished()
        # The resume point is written after the best one, so a kill between the two at worst
        # repeats this epoch.
        last_mngr.save(epoch, args=ocp.args.StandardSave(_checkpointable(state, epoch)), force=True)
        last_mngr.wait_until_finished()
        _write_logs(workdir, rows)
        heads = " ".join(f"{m:.2f}" for m in scores.miou_per_head)
        print(f"epoch {epoch}: loss {row['train_loss']:.4f}  val MIoU per head [{heads}] ({chosen})"
              f"{'  (best)' if is_best else ''}  {row['train_images_per_s']:.2f} img/s "
              f"{train_s:.0f}s+{row['eval_seconds']:.0f}s", flush=True)
        epochs_run += 1
    if rows:
        plot_curves(rows, workdir / "curves.png")
    return {"best": best, "epochs_done": rows[-1]["epoch"] if rows else 0, "workdir": str(workdir)}


def load_best(workdir) -> tuple[UNetPlusPlus, dict]:
    """The best checkpoint of a run as ``(model, variables)``."""
    workdir = Path(workdir)
    cfg = json.loads((workdir / "config.json").read_text())
    model = UNetPlusPlus(widths=tuple(cfg["widths"]))
    abstract = jax.eval_shape(model.init, jax.random.key(0, impl="rbg"),
                              jnp.zeros((1, 16, 16, 3), jnp.float32))
    mngr = ocp.CheckpointManager(workdir / "checkpoints" / "best")
    if mngr.latest_step() is None:
        raise FileNotFoundError(f"no best checkpoint in {workdir / 'checkpoints' / 'best'}")
    return model, dict(mngr.restore(mngr.latest_step(), args=ocp.args.StandardRestore(abstract)))


def export_best(workdir, out, *, force: bool = False) -> Path:
    """Write a run's best checkpoint as a standalone checkpoint directory (what evaluation and
    ``load_pretrained`` read), recording the training config and the best epoch's metrics."""
    from unetpp_jax import __version__, checkpoint
    from unetpp_jax.model import model_metadata

    workdir = Path(workdir)
    checkpoint.ensure_writable(out, force)
    model, variables = load_best(workdir)
    rows = _read_log(workdir / "metrics.jsonl", 10 ** 9)
    best = max(rows, key=lambda r: r["val_miou"]) if rows else None
    metadata = {"model": model_metadata(model),
                "training": {"config": json.loads((workdir / "config.json").read_text()),
                             "best_epoch": best, "epochs_logged": len(rows),
                             "unetpp_jax_version": __version__}}
    return checkpoint.save_variables(out, jax.device_get(variables), metadata, force=force)
