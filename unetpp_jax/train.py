"""Training UNet++ in JAX: config, loss, jitted data-parallel step, resumable loop.

* The state carries ``batch_stats`` (and optionally an exponential moving average of the
  weights); the step is jitted with the state donated and the batch sharded over a
  ``jax.sharding.Mesh`` of every device of every process (parameters replicated). jit's
  semantics are global, so BatchNorm sees the whole global batch: N devices give the same step
  as one, and N processes the same as one process with N devices.
* Multi-process (``jax.distributed``): the training split is cut into one contiguous shard per
  device and each process reads only its devices' shards (``data.sharding``: a split reader
  decodes only those rows); it builds its rows of each global batch (:func:`process_batches`)
  and the global batch is assembled with ``jax.make_array_from_process_local_data``. Each
  process reads and scores an even part of the validation split and the scores are gathered,
  so every process picks the same best epoch. Checkpoints hold
  global arrays only (orbax writes them once); logs, curves and ``config.json`` are written by
  process 0.
* Orbax ``CheckpointManager``: ``<workdir>/checkpoints/last`` every epoch (resume point) and
  ``<workdir>/checkpoints/best`` (the best validation MIoU of the last head, as UNET-ZOO
  keeps). The data order is a function of ``(seed, epoch)``, so a run killed at any moment
  resumes from the last finished epoch and sees exactly the batches it would have seen. What
  survives a kill -9 or a full disk, and how, is in docs/training.md (:func:`train` keeps the
  invariants).
* Per-epoch metrics go to ``<workdir>/metrics.jsonl`` and ``metrics.csv``; ``curves.png`` at the
  end; every file is written atomically (temporary file, fsync, rename).
* One training per workdir: ``<workdir>/.lock`` (``fcntl.flock``, holding pid/host/start time).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import datetime
import fcntl
import io
import json
import math
import os
import shutil
import socket
import sys
import time
import warnings
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

from unetpp_jax import metrics
from unetpp_jax.data import pipeline, sharding
from unetpp_jax.evaluate import HeadScores, predict_split
from unetpp_jax.data.normalization import UNETZOO_INPUT
from unetpp_jax.files import write_bytes_atomic
from unetpp_jax.losses import multiclass_loss
from unetpp_jax.model import WIDTHS, UNetPlusPlus, init_variables


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything a run depends on; saved next to its checkpoints (``config.json``).

    The model is named by ``architecture`` (a key of ``pretrained.ARCHITECTURES``) and the
    settings below that the architecture has (``encoder``, ``widths``, ``deep_supervision``,
    ``num_classes``); :meth:`model_description` is the description written to ``config.json``
    and to every exported checkpoint's ``metadata.json``, from which ``load_pretrained``
    rebuilds the model. ``dataset`` names an entry of ``data.registry.DATASETS`` (None: the one
    that recognizes ``--data``).
    """

    name: str = "custom"
    architecture: str = "UNetPlusPlus"
    encoder: str = "vgg"
    widths: Sequence[int] = WIDTHS
    deep_supervision: bool = True
    num_classes: int = 1
    dataset: str | None = None
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
    bce_weight: float = 1.0  # the cross-entropy term: sigmoid BCE (1 class) or softmax CE (several)
    dice_weight: float = 0.0
    shuffle: bool = False  # False = UNET-ZOO's fixed split order
    augment: bool = False  # random flips / rot90
    ema_decay: float = 0.0  # 0 = no weight averaging
    seed: int = 0
    eval_batch_size: int = 16
    max_steps_per_epoch: int | None = None  # for tiny test runs
    train_limit: int | None = None  # use only the first N training examples (tests)
    val_limit: int | None = None

    def build_model(self):
        """The Flax module this config trains."""
        from unetpp_jax.pretrained import architecture, build_model

        settings = {f.name for f in dataclasses.fields(architecture(self.architecture))}
        desc = {"name": self.architecture}
        for field in ("encoder", "widths", "deep_supervision", "num_classes"):
            if field in settings:
                desc[field] = getattr(self, field)
        return build_model(desc, where=f"config {self.name!r}")

    def model_description(self) -> dict:
        """The model's full description (``pretrained.model_description``): the same dict goes
        to ``config.json`` and to exported checkpoints' ``metadata.json``."""
        from unetpp_jax.pretrained import model_description

        return model_description(self.build_model())

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["widths"] = list(self.widths)
        d["model"] = self.model_description()
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
    model = cfg.build_model()
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
            if "label" in batch:  # class-index masks: softmax cross-entropy + soft Dice per head
                loss = multiclass_loss(logits, batch["label"], ce_weight=cfg.bce_weight,
                                       dice_weight=cfg.dice_weight)
            else:
                loss = deep_supervision_loss(logits, batch["mask"], cfg.bce_weight,
                                             cfg.dice_weight)
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
    # XLA's default compiler options here, not inference.compiler_options(): with YNNPACK off, the
    # 2-device data-parallel step's first-conv gradient was 6.5e-5 away from a float64 reference
    # (0.4% of its largest entry; 1.6e-7 with the default, and on one device either way), and
    # the training step was no faster without YNNPACK (3.9 images/s both ways).
    return jax.jit(step, in_shardings=(replicated, data), out_shardings=(replicated, replicated),
                   donate_argnums=0)


def data_mesh() -> Mesh:
    """A 1-D mesh named 'data' over every device of every process, grouped by process.

    Process ``p``'s devices are contiguous, so its rows of a global batch are one contiguous
    slice of it, and its device shards of the data one contiguous range (:func:`local_shards`).
    """
    devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    return Mesh(np.array(devices), ("data",))


def local_shards() -> tuple[int, list[int]]:
    """``(D, shards)``: the number of data shards (one per device, every process) and this
    process's shard indices (its devices' positions in :func:`data_mesh`)."""
    devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    mine = [i for i, d in enumerate(devices) if d.process_index == jax.process_index()]
    return len(devices), mine


def shard_batch(batch: dict, mesh: Mesh) -> dict:
    """Place a global host batch on the mesh, split along the batch axis.

    Each process gives its own slice of the global batch it holds;
    ``make_array_from_process_local_data`` assembles the global array. (The training loop
    builds only the local rows in the first place: :func:`process_batches`, :func:`global_batch`.)
    """
    n_proc, pid = jax.process_count(), jax.process_index()
    local = {}
    for k, v in batch.items():
        per = v.shape[0] // n_proc
        local[k] = v[pid * per:(pid + 1) * per]
    return global_batch(local, mesh, batch[next(iter(batch))].shape[0])


def global_batch(local: dict, mesh: Mesh, batch_size: int) -> dict:
    """This process's rows of a global batch -> global arrays sharded on 'data'."""
    sharding = NamedSharding(mesh, P("data"))
    return {k: jax.make_array_from_process_local_data(sharding, v, (batch_size,) + v.shape[1:])
            for k, v in local.items()}


def process_batches(local: pipeline.Split, batch_size: int, *, total: int, num_shards: int = 1,
                    shards: Sequence[int] = (0,), seed: int = 0, epoch: int = 0,
                    shuffle: bool = True, augment: bool = False):
    """This process's rows of every global batch of one epoch, as model inputs.

    ``total`` training examples are cut into ``num_shards`` device shards
    (``data.sharding``); ``local`` holds the rows of this process's ``shards`` (all it reads).
    Each shard is shuffled and augmented on its own from ``(seed, epoch, shard)``; with one
    shard the batches are exactly ``pipeline.batches`` (tested). Binary splits give
    ``{"image", "mask"}``, class splits (``ClassSplit``) ``{"image", "label"}``.
    """
    for images, masks in sharding.shard_batches(local, batch_size, total=total,
                                                num_shards=num_shards, shards=shards, seed=seed,
                                                epoch=epoch, shuffle=shuffle, augment=augment):
        if getattr(local, "num_classes", None):  # a ClassSplit: class indices
            yield {"image": pipeline.normalize(images), "label": masks.astype(np.int32)}
        else:
            yield {"image": pipeline.normalize(images),
                   "mask": (masks.astype(np.float32) / np.float32(255))[..., None]}


def replicate(tree, mesh: Mesh):
    """Every leaf as a global array replicated over ``mesh`` (the same value on every process)."""
    sharding = NamedSharding(mesh, P())

    def put(x):
        x = np.asarray(jax.device_get(x))
        return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])

    return jax.tree_util.tree_map(put, tree)


def local_copy(tree):
    """A replicated global array tree as single-device arrays of this process (for inference)."""
    return jax.tree_util.tree_map(lambda x: x.addressable_data(0), tree)


def _gather_parts(part: np.ndarray, total: int) -> np.ndarray:
    """Each process's ``(..., rows)`` part of a split of ``total`` rows (process ``q`` holds
    ``sharding.even_part(total, q, P)``), concatenated in split order on every process. The
    values travel as uint32 words: jax without x64 would round float64 to float32 on the way."""
    n_proc = jax.process_count()
    if n_proc == 1:
        return part
    from jax.experimental import multihost_utils

    longest = -(-total // n_proc)
    padded = np.zeros(part.shape[:-1] + (longest,), part.dtype)
    padded[..., :part.shape[-1]] = part
    words = np.asarray(multihost_utils.process_allgather(padded.view(np.uint32)))
    gathered = np.ascontiguousarray(words).view(part.dtype)  # (n_proc, ..., longest)
    sizes = [hi - lo for lo, hi in sharding.shard_bounds(total, n_proc)]
    return np.concatenate([g[..., :k] for g, k in zip(gathered, sizes)], axis=-1)


def _sum_over_processes(x: np.ndarray) -> np.ndarray:
    """``x`` (int64) summed over every process."""
    if jax.process_count() == 1:
        return x
    from jax.experimental import multihost_utils

    words = np.asarray(multihost_utils.process_allgather(np.ascontiguousarray(x).view(np.uint32)))
    return np.ascontiguousarray(words).view(np.int64).sum(axis=0)


def score_split(model, variables, split: pipeline.Split, *, batch_size: int = 16,
                total: int | None = None) -> HeadScores:
    """Validation scores; every process gets the same result.

    In a multi-process run ``split`` is this process's part of a validation split of ``total``
    images (``sharding.even_part(total, process, processes)``: all it reads); each process
    predicts its part with its local copy of ``variables``. Binary models: the per-image IoU
    and Dice of every head are gathered and averaged in split order, so the number equals
    ``evaluate.evaluate_split`` on one process. Multi-class models: :func:`score_classes`.
    """
    total = len(split) if total is None else total
    if getattr(split, "num_classes", None):
        return score_classes(model, local_copy(variables), split, batch_size=batch_size)
    probs = predict_split(model, local_copy(variables), split.images, batch_size=batch_size)
    scores = np.stack([[metrics.per_image_iou(p, split.masks) for p in probs],
                       [metrics.per_image_dice(p, split.masks) for p in probs]])  # (2, heads, n)
    scores = _gather_parts(scores.astype(np.float64), total)
    return HeadScores([100.0 * float(v.mean()) for v in scores[0]],
                      [100.0 * float(v.mean()) for v in scores[1]])


def score_classes(model, variables, split, *, batch_size: int = 16) -> HeadScores:
    """Validation of a multi-class model on a ``ClassSplit`` (this process's part of it): per
    head, the mean of the per-class IoUs from one confusion matrix pooled over all pixels of
    every process (``metrics.class_iou``) in the ``miou`` slot and the pixel accuracy in the
    ``dice`` slot, x100. The class metric pools pixels, so the processes add their confusion
    matrices rather than average per-image scores."""
    from unetpp_jax.inference import predict_fn
    from unetpp_jax.numerics import prepare_variables

    f = predict_fn(model)
    folded = prepare_variables(model.numerics, variables)
    n, heads = len(split), []
    for start in range(0, n, batch_size):
        chunk = split.images[start:start + batch_size]
        pad = batch_size - len(chunk)
        if pad:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
        out = f(folded, pipeline.normalize(chunk))
        out = out if isinstance(out, tuple) else (out,)
        heads.append([np.argmax(np.asarray(h)[:batch_size - pad], axis=-1) for h in out])
    cms = np.stack([metrics.class_confusion_matrix(np.concatenate([b[k] for b in heads]),
                                                   split.masks, split.num_classes)
                    for k in range(len(heads[0]))]).astype(np.int64)
    cms = _sum_over_processes(cms)
    return HeadScores([100.0 * metrics.miou_classes(cm) for cm in cms],
                      [100.0 * metrics.pixel_accuracy(cm) for cm in cms])


# ---------------------------------------------------------------------------------------------
# Checkpoints, logs, the workdir lock


class NonFiniteLossError(RuntimeError):
    pass


class TrainingError(RuntimeError):
    """A condition the user can act on, stated in one line (the CLI prints it and exits 2)."""


class WorkdirLockedError(TrainingError):
    pass


class DataError(TrainingError):
    """The data cannot be read or does not fit the config (the message names the file or field)."""


class StorageError(TrainingError):
    """Writing a checkpoint or a log failed (full disk, quota, read-only, I/O error)."""


def _is_primary() -> bool:
    return jax.process_index() == 0


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _processes_failing(failed: bool) -> list[int]:
    """The indices of the processes that report ``failed`` (every process learns them all)."""
    if jax.process_count() == 1:
        return [0] if failed else []
    from jax.experimental import multihost_utils

    flags = np.asarray(multihost_utils.process_allgather(np.int32(failed))).reshape(-1)
    return [int(i) for i in np.flatnonzero(flags)]


def _all_agree(ok: bool) -> bool:
    """Process 0's ``ok``, on every process."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils

    return bool(multihost_utils.broadcast_one_to_all(np.int32(ok)))


def atomic_write(path, data) -> None:
    """Write ``data`` (str or bytes) to ``path`` all or nothing (``files.write_bytes_atomic``)."""
    write_bytes_atomic(path, data.encode("utf-8") if isinstance(data, str) else data)


class WorkdirLock:
    """An exclusive ``fcntl.flock`` on ``<workdir>/.lock``; the file names the holder.

    The kernel drops the lock when its holder exits, however it exits (kill -9 included), so a
    stale file never blocks a rerun. (flock is per host on some network filesystems: two hosts
    can then both take it. Multi-host runs take it on process 0 only.)
    """

    def __init__(self, workdir: Path):
        self.path = Path(workdir) / ".lock"
        self.fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace")
            os.close(fd)
            try:
                h = json.loads(holder)
                who = f"pid {h['pid']} on {h['host']}, started {h['started']}"
            except (ValueError, KeyError, TypeError):
                who = "a process that has not recorded itself yet"
            raise WorkdirLockedError(
                f"{self.path.parent} is in use by another training ({who}; lock {self.path}); "
                "wait for it to finish or stop it, or use another --workdir") from None
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                "argv": sys.argv}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        os.fsync(fd)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # drops the flock
            self.fd = None


def _oserror_in(exc: BaseException) -> OSError | None:
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, OSError) and exc.errno is not None:
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


@contextlib.contextmanager
def _storage_errors(what: str, resume_from: int):
    """Turn an OSError while writing (ENOSPC, EDQUOT, EROFS, EIO, ...) into one StorageError line."""
    try:
        yield
    except TrainingError:
        raise
    except Exception as e:
        err = _oserror_in(e)
        if err is None:
            raise
        where = f"after epoch {resume_from}" if resume_from else "from the start"
        raise StorageError(
            f"could not write {what}: {os.strerror(err.errno)} (errno {err.errno}"
            f"{', ' + str(err.filename) if err.filename else ''}); the last complete checkpoint "
            f"is intact: free space or fix the folder and rerun the same command to resume "
            f"{where}") from e


def _checkpointable(state: TrainState, epoch) -> dict:
    return {"step": state.step, "params": state.params, "batch_stats": state.batch_stats,
            "opt_state": state.opt_state, "ema": state.ema, "epoch": epoch}


def _restore_into(state: TrainState, tree: dict) -> tuple[TrainState, int]:
    state = state.replace(step=tree["step"], params=tree["params"],
                          batch_stats=tree["batch_stats"], opt_state=tree["opt_state"],
                          ema=tree["ema"])
    return state, int(np.asarray(tree["epoch"].addressable_data(0)))


def _managers(workdir: Path):
    # best keeps every step until the epoch that wrote one is committed (see train): a kill
    # between the best and the last save must not leave the workdir without its best weights.
    opts_last = ocp.CheckpointManagerOptions(max_to_keep=1, create=True)
    opts_best = ocp.CheckpointManagerOptions(max_to_keep=None, create=True)
    return (ocp.CheckpointManager(workdir / "checkpoints" / "last", options=opts_last),
            ocp.CheckpointManager(workdir / "checkpoints" / "best", options=opts_best))


def _steps(folder: Path) -> list[int]:
    if not folder.is_dir():
        return []
    return sorted(int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit())


def repair_checkpoints(workdir) -> list[str]:
    """Undo what a kill or a failed write left between the two saves; returns what was done.

    * orbax's temporaries of an unfinished save (``*.orbax-checkpoint-tmp*``) are removed;
    * a best checkpoint of an epoch after the last finished one (saved, then the run died
      before the epoch was committed) is removed: that epoch runs again and decides anew.
    """
    ck = Path(workdir) / "checkpoints"
    notes = []
    for sub in ("last", "best"):
        d = ck / sub
        if d.is_dir():
            for p in sorted(d.iterdir()):
                if ".orbax-checkpoint-tmp" in p.name:
                    shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink()
                    notes.append(f"removed the unfinished save {p}")
    last = max(_steps(ck / "last"), default=0)
    for step in _steps(ck / "best"):
        if step > last:
            shutil.rmtree(ck / "best" / str(step))
            notes.append(f"removed the best checkpoint of epoch {step}, written after the last "
                         f"finished epoch ({last}); epoch {step} runs again")
    return notes


def _read_log(path: Path, upto_epoch: int) -> list[dict]:
    """Rows of ``metrics.jsonl`` up to ``upto_epoch``; a torn last line (a non-atomic write by
    an older version, killed mid-line) is dropped with a warning, a torn middle line is an error."""
    if not path.exists():
        return []
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    rows = []
    for k, line in enumerate(lines):
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or not isinstance(row.get("epoch"), int):
                raise ValueError("not a metrics row")
        except ValueError as e:
            if k == len(lines) - 1:
                warnings.warn(f"{path}: last line is cut off ({line[:40]!r}...), dropped; that "
                              "epoch's row is written again", stacklevel=2)
                break
            raise TrainingError(f"{path}: line {k + 1} is not a metrics row ({e}); fix or remove "
                                "that line to resume") from None
        rows.append(row)
    return [r for r in rows if r["epoch"] <= upto_epoch]


def _write_logs(workdir: Path, rows: list[dict]) -> None:
    atomic_write(workdir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    if rows:
        buf = io.StringIO(newline="")
        fields = list(dict.fromkeys(k for r in rows for k in r))  # rows may gain fields
        w = csv.DictWriter(buf, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
        atomic_write(workdir / "metrics.csv", buf.getvalue())


def plot_curves(rows: list[dict], path: Path) -> None:
    """Training loss and validation MIoU (every head) per epoch, as a PNG (written atomically)."""
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
    buf = io.BytesIO()
    fig.savefig(buf, dpi=100, format="png")
    plt.close(fig)
    atomic_write(path, buf.getvalue())


def _check_config(workdir: Path, cfg: TrainConfig) -> bool:
    """Refuse a workdir holding another config; True if config.json must be (re)written."""
    cfg_path = workdir / "config.json"
    if not cfg_path.exists():
        return True
    try:
        saved = json.loads(cfg_path.read_text())
    except ValueError:
        if _is_primary():
            warnings.warn(f"{cfg_path} is cut off or unreadable (a write interrupted by an older "
                          "version); rewriting it from this run's config", stacklevel=3)
        return True
    now = cfg.to_json()
    # A run saved before a field existed had that field's default.
    default = TrainConfig(name=cfg.name, widths=saved.get("widths", WIDTHS)).to_json()
    saved = {**{k: v for k, v in default.items() if k not in saved}, **saved}
    if saved != now:
        diff = {k: (saved.get(k), v) for k, v in now.items() if saved.get(k) != v}
        raise ValueError(f"{workdir} holds a run with another config (saved vs now: {diff}); "
                         "use a new --workdir or the same settings to resume")
    return False


# ---------------------------------------------------------------------------------------------
# The loop


def train(cfg: TrainConfig, workdir, train_split, val_split, *, progress: bool = True,
          stop_after_epochs: int | None = None) -> dict:
    """Train (or resume) ``cfg`` in ``workdir``; returns a summary of the best epoch.

    ``train_split`` and ``val_split``: a ``pipeline.Split`` in memory or a split reader
    (``data.registry.open_dataset``), from which this process reads only its own rows.
    ``stop_after_epochs`` ends this call after that many epochs even if the run is not
    finished (a later call resumes) — used by tests and for running in slices.

    In a multi-process run every process calls this with the same arguments; each reads only
    the rows of its devices' shards of the training split and its even part of the validation
    split (module doc), and the validation scores are gathered.

    Raises :class:`WorkdirLockedError` if another training holds ``workdir`` and
    :class:`StorageError` if a checkpoint or log cannot be written (the previous checkpoint
    stays intact); both are :class:`TrainingError`, one line for the user.
    """
    workdir = Path(workdir).expanduser().resolve()  # orbax wants absolute paths
    primary = _is_primary()
    lock = WorkdirLock(workdir)
    error = None
    if primary:
        try:
            workdir.mkdir(parents=True, exist_ok=True)
            lock.acquire()
        except (WorkdirLockedError, OSError) as e:
            error = e
    if not _all_agree(error is None):
        if error is None:
            raise WorkdirLockedError(f"process 0 could not take {workdir / '.lock'} (see its "
                                     "message); no process trains")
        if isinstance(error, OSError):
            raise StorageError(f"cannot create or lock {workdir}: {error}") from error
        raise error
    try:
        return _train_locked(cfg, workdir, train_split, val_split, progress=progress,
                             stop_after_epochs=stop_after_epochs)
    finally:
        lock.release()


def _read_local_data(cfg, train_data, val_data):
    """This process's part of the data (``data.sharding``): the rows of its devices' shards of
    the training split and an even part of the validation split -- all it reads."""
    n_proc, pid = jax.process_count(), jax.process_index()
    train_reader, val_reader = sharding.as_reader(train_data), sharding.as_reader(val_data)
    n_train, n_val = len(train_reader), len(val_reader)
    if cfg.train_limit:
        n_train = min(cfg.train_limit, n_train)
    if cfg.val_limit:
        n_val = min(cfg.val_limit, n_val)
    num_shards, shards = local_shards()
    if cfg.batch_size % num_shards:
        raise ValueError(f"batch_size {cfg.batch_size} is not divisible by the "
                         f"{num_shards} devices")
    steps_per_epoch = sharding.shard_steps(n_train, cfg.batch_size, num_shards)
    if cfg.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, cfg.max_steps_per_epoch)
    if steps_per_epoch == 0:
        raise ValueError(f"{n_train} training examples make no batch of {cfg.batch_size}"
                         + (f" over {num_shards} devices" if num_shards > 1 else ""))
    if n_val < n_proc:
        raise ValueError(f"{n_val} validation images cannot be split over {n_proc} processes")
    bounds = sharding.shard_bounds(n_train, num_shards)
    train_rows = (bounds[shards[0]][0], bounds[shards[-1]][1])
    val_rows = sharding.even_part(n_val, pid, n_proc)
    if n_proc > 1:
        print(f"process {pid}/{n_proc}: reads training rows [{train_rows[0]}, {train_rows[1]}) "
              f"of {n_train} (device shards {shards[0]}-{shards[-1]} of {num_shards}) and "
              f"validation rows [{val_rows[0]}, {val_rows[1]}) of {n_val}", flush=True)
    train_split = train_reader.read(*train_rows)
    val_split = val_reader.read(*val_rows)
    for data in (train_split, val_split):
        data_classes = getattr(data, "num_classes", None) or 1
        if data_classes != cfg.num_classes:
            raise ValueError(f"the data has {data_classes} class(es) and the config trains "
                             f"num_classes={cfg.num_classes}; pass --set num_classes={data_classes}")
    return train_split, val_split, n_train, n_val, num_shards, shards, steps_per_epoch


def _train_locked(cfg, workdir: Path, train_split, val_split, *, progress, stop_after_epochs):
    primary = _is_primary()
    n_proc, pid = jax.process_count(), jax.process_index()
    say = print if primary else (lambda *a, **k: None)

    write_config = _check_config(workdir, cfg)
    _barrier("unetpp_train_config_read")
    if primary:
        if write_config:
            with _storage_errors(workdir / "config.json", 0):
                atomic_write(workdir / "config.json", json.dumps(cfg.to_json(), indent=2))
        for note in repair_checkpoints(workdir):
            say(f"resume: {note}", flush=True)
    _barrier("unetpp_train_repaired")

    error = None
    try:
        data = _read_local_data(cfg, train_split, val_split)
    except (ValueError, OSError) as e:  # a data or config problem: one line for the user
        error = e
    failed = _processes_failing(error is not None)
    if error is not None:
        raise DataError(str(error)) from error
    if failed:
        raise DataError(f"process {failed[0]} could not read its part of the data (its message "
                        "says why); no process trains")
    train_split, val_split, n_train, n_val, num_shards, shards, steps_per_epoch = data

    mesh = data_mesh()
    model, state = create_state(cfg, steps_per_epoch)
    state = replicate(state, mesh)
    last_mngr, best_mngr = _managers(workdir)
    start_epoch = 1
    if last_mngr.latest_step() is not None:
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct,
                                          _checkpointable(state, replicate(np.int32(0), mesh)))
        tree = last_mngr.restore(last_mngr.latest_step(), args=ocp.args.StandardRestore(abstract))
        state, done_epoch = _restore_into(state, tree)
        start_epoch = done_epoch + 1
        say(f"resumed {workdir} after epoch {done_epoch} (step {int(state.step.addressable_data(0))})")
    rows = _read_log(workdir / "metrics.jsonl", start_epoch - 1)
    best = max(rows, key=lambda r: r["val_miou"]) if rows else None
    if best is not None and best_mngr.latest_step() is None:
        # Only a workdir left by an older version gets here (it kept one best step and could be
        # killed after replacing it): the next epoch becomes best so that one exists again.
        say(f"resume: no best checkpoint left for epoch {best['epoch']}; the next epoch's "
            "weights are kept as best", flush=True)
        best = None

    step_fn = make_train_step(model, cfg, mesh)
    epochs_run = 0
    for epoch in range(start_epoch, cfg.epochs + 1):
        if stop_after_epochs is not None and epochs_run >= stop_after_epochs:
            break
        t0 = time.perf_counter()
        it = process_batches(train_split, cfg.batch_size, total=n_train, num_shards=num_shards,
                             shards=shards, seed=cfg.seed, epoch=epoch, shuffle=cfg.shuffle,
                             augment=cfg.augment)
        bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch}/{cfg.epochs}",
                   disable=not (progress and primary), dynamic_ncols=True)
        losses = []
        for _, local in zip(range(steps_per_epoch), it):
            state, loss = step_fn(state, global_batch(local, mesh, cfg.batch_size))
            loss = float(loss.addressable_data(0))  # replicated: the same on every process
            if not math.isfinite(loss):
                bar.close()
                raise NonFiniteLossError(
                    f"loss became {loss} at step {int(state.step.addressable_data(0))} (epoch "
                    f"{epoch}); the last good checkpoint is in {workdir / 'checkpoints' / 'last'}."
                    " Lower the learning rate or check the data.")
            losses.append(loss)
            bar.set_postfix(loss=f"{np.mean(losses):.4f}")
            bar.update()
        bar.close()
        train_s = time.perf_counter() - t0
        candidates = state.candidate_variables()
        scored = {name: score_split(model, v, val_split, batch_size=cfg.eval_batch_size,
                                    total=n_val)
                  for name, v in candidates.items()}
        chosen = max(scored, key=lambda name: scored[name].miou)  # ties: the first, raw
        scores = scored[chosen]
        row = {"epoch": epoch, "step": int(state.step.addressable_data(0)),
               "train_loss": float(np.mean(losses)),
               "val_miou": scores.miou, "val_miou_per_head": scores.miou_per_head,
               "val_dice": scores.dice, "val_weights": chosen,
               **{f"val_miou_{name}": sc.miou for name, sc in scored.items()},
               "train_seconds": round(train_s, 2),
               "train_images_per_s": round(steps_per_epoch * cfg.batch_size / train_s, 3),
               "eval_seconds": round(time.perf_counter() - t0 - train_s, 2)}
        rows.append(row)
        # The validation scores are gathered from every process, so this agrees everywhere.
        is_best = best is None or row["val_miou"] > best["val_miou"]
        # Commit protocol (docs/training.md): best weights, then the logs, then the resume
        # point. A kill anywhere leaves last at epoch-1 or epoch; on resume, a best or a log row
        # beyond last's epoch is dropped and the epoch runs again (same data, same result).
        with _storage_errors(f"the checkpoints of epoch {epoch} in {workdir / 'checkpoints'}",
                             epoch - 1):
            if is_best:
                best = row
                best_mngr.save(epoch, args=ocp.args.StandardSave(candidates[chosen]), force=True)
                best_mngr.wait_until_finished()
            if primary:
                _write_logs(workdir, rows)
            epoch_arr = replicate(np.int32(epoch), mesh)
            last_mngr.save(epoch, args=ocp.args.StandardSave(_checkpointable(state, epoch_arr)),
                           force=True)
            last_mngr.wait_until_finished()
            for step in best_mngr.all_steps():  # committed: older bests are no longer needed
                if step < best["epoch"]:
                    best_mngr.delete(step)
        heads = " ".join(f"{m:.2f}" for m in scores.miou_per_head)
        say(f"epoch {epoch}: loss {row['train_loss']:.4f}  val MIoU per head [{heads}] ({chosen})"
            f"{'  (best)' if is_best else ''}  {row['train_images_per_s']:.2f} img/s "
            f"{train_s:.0f}s+{row['eval_seconds']:.0f}s", flush=True)
        epochs_run += 1
    if rows and primary:
        with _storage_errors(workdir / "curves.png", rows[-1]["epoch"]):
            plot_curves(rows, workdir / "curves.png")
    last_mngr.close()
    best_mngr.close()
    return {"best": best, "epochs_done": rows[-1]["epoch"] if rows else 0, "workdir": str(workdir)}


def _best_step(workdir: Path) -> int | None:
    """The newest best checkpoint of a committed epoch (none beyond the last finished one)."""
    ck = workdir / "checkpoints"
    last = _steps(ck / "last")
    best = [s for s in _steps(ck / "best") if not last or s <= last[-1]]
    return best[-1] if best else None


def load_best(workdir) -> tuple[UNetPlusPlus, dict]:
    """The best checkpoint of a run as ``(model, variables)``."""
    workdir = Path(workdir).expanduser().resolve()  # orbax wants absolute paths
    from unetpp_jax.pretrained import abstract_variables, build_model

    cfg = json.loads((workdir / "config.json").read_text())
    desc = cfg.get("model") or {"name": "UNetPlusPlus", "widths": cfg["widths"]}  # older runs
    model = build_model(desc, where=str(workdir / "config.json"))
    abstract = abstract_variables(model)
    step = _best_step(workdir)
    if step is None:
        raise FileNotFoundError(f"no best checkpoint in {workdir / 'checkpoints' / 'best'}")
    from absl import logging as absl_logging

    # A read-only manager makes orbax log two warnings ("read_only=True, setting create=False",
    # "Given directory is read only") on every export; they say nothing to the user.
    verbosity = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.ERROR)
    try:
        mngr = ocp.CheckpointManager(workdir / "checkpoints" / "best",
                                     options=ocp.CheckpointManagerOptions(read_only=True,
                                                                          create=False))
    finally:
        absl_logging.set_verbosity(verbosity)
    try:
        return model, dict(mngr.restore(step, args=ocp.args.StandardRestore(abstract)))
    finally:
        mngr.close()


def export_best(workdir, out, *, force: bool = False) -> Path:
    """Write a run's best checkpoint as a standalone checkpoint directory (what evaluation and
    ``load_pretrained`` read), recording the training config and the best epoch's metrics."""
    from unetpp_jax import __version__, checkpoint
    from unetpp_jax.pretrained import model_description as model_metadata

    workdir = Path(workdir).expanduser().resolve()
    checkpoint.ensure_writable(out, force)
    model, variables = load_best(workdir)
    last = _steps(workdir / "checkpoints" / "last")
    rows = _read_log(workdir / "metrics.jsonl", last[-1] if last else 10 ** 9)
    best = max(rows, key=lambda r: r["val_miou"]) if rows else None
    cfg_json = json.loads((workdir / "config.json").read_text())
    # Training normalises as pipeline.normalize (UNET-ZOO's input), at image_size.
    spec = dataclasses.replace(UNETZOO_INPUT, size=(cfg_json.get("image_size", 96),) * 2)
    metadata = {"model": model_metadata(model), "input": spec.to_json(),
                "training": {"config": cfg_json,
                             "best_epoch": best, "epochs_logged": len(rows),
                             "unetpp_jax_version": __version__}}
    return checkpoint.save_variables(out, jax.device_get(variables), metadata, force=force)
