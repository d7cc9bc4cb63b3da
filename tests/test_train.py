"""Training: loss goes down, kill -9 + resume reproduces the uninterrupted run, 2 devices == 1."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from unetpp_jax.data.pipeline import Split
from unetpp_jax.train import DataError, TrainConfig, deep_supervision_loss, soft_dice_loss, train

ROOT = Path(__file__).resolve().parents[1]

TINY = TrainConfig(name="test", widths=(4, 8, 16, 32, 64), image_size=32, batch_size=4, epochs=3,
                   learning_rate=3e-3, bce_weight=0.5, dice_weight=1.0, shuffle=True, augment=True,
                   eval_batch_size=4, seed=0)
# Depth 2 at 16 px, for tests about the loop and the checkpoints rather than about learning.
SMALL = dataclasses.replace(TINY, widths=(4, 8, 16), image_size=16)


def synthetic_split(n: int, size: int = 32, seed: int = 0) -> Split:
    """Bright discs on a dark noisy background: learnable in a few steps."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    images = np.zeros((n, size, size, 3), np.uint8)
    masks = np.zeros((n, size, size), np.uint8)
    for k in range(n):
        m = np.zeros((size, size), bool)
        for _ in range(rng.integers(1, 4)):
            cy, cx, r = rng.integers(4, size - 4), rng.integers(4, size - 4), rng.integers(2, 6)
            m |= (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        noise = rng.integers(0, 40, (size, size, 3))
        images[k] = np.clip(noise + 180 * m[..., None], 0, 255).astype(np.uint8)
        masks[k] = 255 * m
    return Split(images, masks, [f"id{k:03d}" for k in range(n)])


SYNTH_SNIPPET = textwrap.dedent("""
    import sys, json, dataclasses
    sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r})
    from test_train import SMALL, synthetic_split
    from unetpp_jax.train import train
    cfg = dataclasses.replace(SMALL, **json.loads({overrides!r}))
    train(cfg, {workdir!r}, synthetic_split(32, size=16), synthetic_split(8, size=16, seed=1),
          progress=False)
""")


def test_losses_on_hand_cases():
    import jax.numpy as jnp

    logits = jnp.array([[0.0, 2.0], [-3.0, 1.0]]).reshape(1, 2, 2, 1)
    target = jnp.array([[0.0, 1.0], [0.5, 1.0]]).reshape(1, 2, 2, 1)
    p = 1 / (1 + np.exp(-np.array([0.0, 2.0, -3.0, 1.0])))
    t = np.array([0.0, 1.0, 0.5, 1.0])
    bce = -(t * np.log(p) + (1 - t) * np.log(1 - p)).mean()
    dice = (2 * (p * t).sum() + 1e-5) / (p.sum() + t.sum() + 1e-5)
    np.testing.assert_allclose(soft_dice_loss(logits, target), 1 - dice, rtol=1e-5)
    got = deep_supervision_loss((logits, logits * 0.0), target, 0.5, 1.0)
    p0 = np.full(4, 0.5)
    bce0 = -(t * np.log(p0) + (1 - t) * np.log(1 - p0)).mean()
    dice0 = (2 * (p0 * t).sum() + 1e-5) / (p0.sum() + t.sum() + 1e-5)
    np.testing.assert_allclose(got, ((0.5 * bce + 1 - dice) + (0.5 * bce0 + 1 - dice0)) / 2, rtol=1e-5)
    # stable for huge logits (BCE from logits, not from a saturated sigmoid)
    assert np.isfinite(float(deep_supervision_loss(logits * 1e4, target)))


def test_tiny_run_loss_goes_down_and_writes_logs(tmp_path):
    # Depth 2 (two heads) at 32 px: the discs are learnt as well as at depth 4 (head 2 68.7 vs
    # the depth-4 model's best head 80.8 after 4 epochs) and the step compiles in half the time.
    cfg = dataclasses.replace(TINY, widths=(4, 8, 16), epochs=4, ema_decay=0.9)
    summary = train(cfg, tmp_path, synthetic_split(32), synthetic_split(8, seed=1), progress=False)
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    assert rows[-1]["train_loss"] < 0.92 * rows[0]["train_loss"]
    assert max(rows[-1]["val_miou_per_head"]) > 50.0  # the discs are found
    assert summary["best"]["val_miou"] == max(r["val_miou"] for r in rows)
    # With EMA both the raw and the averaged weights are scored; the better one is kept.
    for r in rows:
        assert r["val_miou"] == max(r["val_miou_raw"], r["val_miou_ema"])
        assert r["val_weights"] == ("raw" if r["val_miou_raw"] >= r["val_miou_ema"] else "ema")
    assert (tmp_path / "metrics.csv").read_text().startswith("epoch,")
    assert (tmp_path / "curves.png").stat().st_size > 1000
    assert (tmp_path / "checkpoints" / "best").is_dir()
    # A different config in the same workdir is refused, naming the differing field.
    with pytest.raises(ValueError, match="learning_rate"):
        train(dataclasses.replace(cfg, learning_rate=1.0), tmp_path, synthetic_split(32),
              synthetic_split(8, seed=1), progress=False)


def _final_params(workdir):
    from unetpp_jax.train import load_best  # noqa: F401 (import check)
    import orbax.checkpoint as ocp

    mngr = ocp.CheckpointManager(Path(workdir) / "checkpoints" / "last")
    tree = mngr.restore(mngr.latest_step())
    return mngr.latest_step(), tree["params"]


def test_kill_9_then_resume_matches_uninterrupted_run(tmp_path):
    # A depth-2 model at 16 px: the point is the checkpoint protocol, and its compile is short.
    # The uninterrupted reference runs in this process first; the killed run (a subprocess)
    # then loads the same programs from the session's compilation cache, and the resume here
    # reuses this process's.
    epochs = 6
    cfg = dataclasses.replace(SMALL, epochs=epochs)
    ref_dir = tmp_path / "ref"
    train(cfg, ref_dir, synthetic_split(32, size=16), synthetic_split(8, size=16, seed=1),
          progress=False)
    # Interrupted: kill -9 as soon as epoch 2 has been logged (mid epoch 3 or during its save).
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", SYNTH_SNIPPET.format(
        root=str(ROOT), tests=str(ROOT / "tests"), overrides=json.dumps({"epochs": epochs}),
        workdir=str(run_dir))], env=dict(os.environ, PYTHONPATH=str(ROOT)))
    log = run_dir / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if log.exists() and len(log.read_text().splitlines()) >= 2:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = len(log.read_text().splitlines())
    assert killed_at < epochs
    # Resume in this process: starts after the last saved epoch, ends where the reference ended.
    train(cfg, run_dir, synthetic_split(32, size=16), synthetic_split(8, size=16, seed=1),
          progress=False)
    rows = [json.loads(l) for l in log.read_text().splitlines()]
    assert [r["epoch"] for r in rows] == list(range(1, epochs + 1))
    ref_rows = [json.loads(l) for l in (ref_dir / "metrics.jsonl").read_text().splitlines()]
    np.testing.assert_allclose([r["train_loss"] for r in rows],
                               [r["train_loss"] for r in ref_rows], rtol=1e-5)
    (s1, p1), (s2, p2) = _final_params(run_dir), _final_params(ref_dir)
    assert s1 == s2 == epochs
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), p1, p2)


TWO_DEVICE_SNIPPET = textwrap.dedent("""
    import sys, dataclasses, numpy as np, jax
    sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r})
    from jax.sharding import Mesh
    from test_train import SMALL, synthetic_split
    from unetpp_jax.data.pipeline import batches
    from unetpp_jax.train import create_state, make_train_step, shard_batch
    assert jax.device_count() == 2, jax.devices()
    # SGD: the update is linear in the gradient, so the comparison sees the sharded step itself.
    # (Adam divides by sqrt(v); for parameters whose gradient is ~0 it turns float32 reduction-order
    # noise into lr-sized steps, which would make any two reduction orders differ by ~1e-3.)
    cfg = dataclasses.replace(SMALL, batch_size=8, optimizer="sgd", learning_rate=0.05)
    batch = next(batches(synthetic_split(8, size=16), 8, augment=True))
    results = []
    for devices in (jax.devices()[:1], jax.devices()):
        mesh = Mesh(np.array(devices), ("data",))
        model, state = create_state(cfg, steps_per_epoch=10)
        step = make_train_step(model, cfg, mesh)
        sharded = shard_batch(batch, mesh)
        assert len(sharded["image"].sharding.device_set) == len(devices)
        for _ in range(2):
            state, loss = step(state, sharded)
        results.append((float(loss), jax.device_get(state.params), jax.device_get(state.batch_stats)))
    (l1, p1, b1), (l2, p2, b2) = results
    assert abs(l1 - l2) <= 1e-5 * max(1.0, abs(l1)), (l1, l2)
    for a, b in zip(jax.tree_util.tree_leaves((p1, b1)), jax.tree_util.tree_leaves((p2, b2))):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
    print("OK", l1, l2)
""")


def test_two_devices_equal_one_device():
    env = dict(os.environ, PYTHONPATH=str(ROOT),
               XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", TWO_DEVICE_SNIPPET.format(
        root=str(ROOT), tests=str(ROOT / "tests"))], env=env, capture_output=True, text=True,
        timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.startswith("OK")


def test_cli_overrides_are_typed_and_checked():
    from experiments.configs import get_config
    from experiments.train import apply_overrides

    cfg = apply_overrides(get_config("strong"), [("learning_rate", "5e-4"), ("augment", "false"),
                                                 ("widths", "(8, 16, 32, 64, 128)"),
                                                 ("max_steps_per_epoch", "3")])
    assert cfg.learning_rate == 5e-4 and cfg.augment is False
    assert cfg.widths == (8, 16, 32, 64, 128) and cfg.max_steps_per_epoch == 3
    with pytest.raises(ValueError, match="no such TrainConfig field"):
        apply_overrides(cfg, [("lr", "1")])
    with pytest.raises(ValueError, match="unknown config"):
        get_config("nope")


# ---------------------------------------------------------------------------------------------
# The CLI as users run it: relative workdirs, reruns over damaged workdirs, the lock, a full disk


def make_data_folder(folder: Path, n: int = 40, size: int = 16) -> Path:
    """A preprocessed folder (images/<id>.png, masks/0/<id>.png) of synthetic discs: 32 train /
    8 validation images by the split rule."""
    from unetpp_jax.data.pipeline import write_folder

    write_folder(synthetic_split(n, size=size), folder)
    return folder


def cli_env(cache_dir: Path) -> dict:
    # A compilation cache shared by this module's runs: the first run compiles (~1 min on a
    # busy 2-core machine), the next ones load the programs.
    return dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu",
                JAX_COMPILATION_CACHE_DIR=str(cache_dir),
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")


def run_cli(args, *, cwd, env, timeout=400, python_code=None):
    cmd = [sys.executable, "-m", "experiments.train"] if python_code is None else \
        [sys.executable, "-c", python_code]
    return subprocess.run(cmd + list(args), cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def tiny_args(data: Path, *more: str) -> list[str]:
    # The tiny config at 16 px on a depth-2 grid: these tests are about the workdir protocol,
    # and each CLI launch is mostly its compile (about half of the depth-4 grid's).
    return ["--config", "tiny", "--data", str(data), "--set", "image_size=16",
            "--set", "widths=(4, 8, 16)", "--no-progress", *more]


@pytest.fixture(scope="module")
def cli_setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("cli")
    data = make_data_folder(base / "data")
    env = cli_env(base / "jax-cache")
    # Epoch 1 of 2 with a RELATIVE --workdir, from a fresh cwd (the README's form): orbax
    # refuses relative checkpoint paths, so this crashed after epoch 1 before the fix.
    cwd = base / "cwd"
    cwd.mkdir()
    out = run_cli(tiny_args(data, "--workdir", "runs/rel", "--epochs", "2",
                            "--stop-after-epochs", "1"), cwd=cwd, env=env)
    return {"data": data, "env": env, "cwd": cwd, "first": out}


def test_cli_relative_and_default_workdir(cli_setup, tmp_path, monkeypatch):
    from unetpp_jax.train import export_best, load_best

    out, cwd = cli_setup["first"], cli_setup["cwd"]
    assert out.returncode == 0, out.stderr[-3000:]
    run = cwd / "runs" / "rel"
    assert (run / "checkpoints" / "last" / "1").is_dir() and (run / "checkpoints" / "best" / "1").is_dir()
    assert [json.loads(l)["epoch"] for l in (run / "metrics.jsonl").read_text().splitlines()] == [1]
    # Loading and exporting by the same relative path, from that cwd.
    monkeypatch.chdir(cwd)
    model, variables = load_best("runs/rel")
    assert "params" in variables
    exported = export_best("runs/rel", "exported")
    assert (cwd / "exported").is_dir() and Path(exported).is_absolute()
    # The default workdir, runs/<config>, relative to the cwd.
    cwd2 = tmp_path / "fresh"
    cwd2.mkdir()
    out = run_cli(tiny_args(cli_setup["data"], "--epochs", "1"), cwd=cwd2, env=cli_setup["env"])
    assert out.returncode == 0, out.stderr[-3000:]
    assert (cwd2 / "runs" / "tiny" / "checkpoints" / "last" / "1").is_dir()
    assert str(cwd2 / "runs" / "tiny") in out.stdout


def _copy_run(cli_setup, dest: Path) -> Path:
    import shutil

    shutil.copytree(cli_setup["cwd"] / "runs" / "rel", dest)
    (dest / ".lock").unlink(missing_ok=True)
    return dest


def test_rerun_repairs_what_a_kill_between_saves_leaves(cli_setup, tmp_path):
    """The states a kill -9 or a full disk between the saves left (and the older version's
    non-atomic writes): every rerun used to die (StepAlreadyExistsError, JSONDecodeError)."""
    import shutil

    run = _copy_run(cli_setup, tmp_path / "run")
    ck = run / "checkpoints"
    # 1. A best checkpoint of epoch 2 saved, then the run died before epoch 2 was committed
    #    (last still at 1). The epoch-1 row is made the worst possible so that the rerun of
    #    epoch 2 is certainly best and saves best step 2 again (the old code: StepAlreadyExists).
    shutil.copytree(ck / "best" / "1", ck / "best" / "2")
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    rows[0]["val_miou"] = -1.0
    # 2. metrics.jsonl cut mid-line (the older version's write_text, killed while writing).
    (run / "metrics.jsonl").write_text(json.dumps(rows[0]) + "\n" + '{"epoch": 2, "train_lo')
    # 3. orbax's temporary folder of the unfinished last save of epoch 2.
    (ck / "last" / "2.orbax-checkpoint-tmp-1234567").mkdir()
    (ck / "last" / "2.orbax-checkpoint-tmp-1234567" / "junk").write_bytes(b"\0" * 100)
    # 4. config.json cut mid-line.
    config = (run / "config.json").read_text()
    (run / "config.json").write_text(config[: len(config) // 2])

    out = run_cli(tiny_args(cli_setup["data"], "--workdir", str(run), "--epochs", "2"),
                  cwd=tmp_path, env=cli_setup["env"])
    assert out.returncode == 0, out.stderr[-3000:]
    assert "removed the best checkpoint of epoch 2" in out.stdout
    assert "removed the unfinished save" in out.stdout
    assert "resumed" in out.stdout and "after epoch 1" in out.stdout
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert json.loads((run / "config.json").read_text()) == json.loads(config)
    assert sorted(p.name for p in (ck / "last").iterdir()) == ["2"]
    assert sorted(p.name for p in (ck / "best").iterdir()) == ["2"]  # best of epoch 1 pruned


HOLD_LOCK = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {root!r})
    from pathlib import Path
    from unetpp_jax.train import WorkdirLock
    lock = WorkdirLock(Path({workdir!r}))
    lock.acquire()
    print("locked", flush=True)
    time.sleep(300)
""")


def test_second_training_on_a_workdir_exits_2_naming_the_holder(cli_setup, tmp_path):
    from unetpp_jax.train import WorkdirLock, WorkdirLockedError

    run = _copy_run(cli_setup, tmp_path / "run")
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK.format(root=str(ROOT),
                                                                      workdir=str(run))],
                              stdout=subprocess.PIPE, text=True, env=cli_setup["env"])
    try:
        assert holder.stdout.readline().strip() == "locked"
        out = run_cli(tiny_args(cli_setup["data"], "--workdir", str(run), "--epochs", "2"),
                      cwd=tmp_path, env=cli_setup["env"])
        assert out.returncode == 2, out.stderr[-3000:]
        errors = [l for l in out.stderr.splitlines() if l.startswith("error:")]
        assert len(errors) == 1 and "Traceback" not in out.stderr, out.stderr
        assert f"in use by another training (pid {holder.pid} on " in errors[0]
        with pytest.raises(WorkdirLockedError, match=f"pid {holder.pid}"):
            WorkdirLock(run).acquire()
    finally:
        holder.kill()
        holder.wait()
    # The holder died (kill -9): the kernel dropped its lock; the file left behind blocks nothing.
    lock = WorkdirLock(run)
    lock.acquire()
    lock.release()


FULL_DISK = textwrap.dedent("""
    import errno, sys
    sys.path.insert(0, {root!r})
    import orbax.checkpoint as ocp
    save = ocp.CheckpointManager.save
    def full_disk(self, step, *a, **k):
        if step == 2 and self.directory.name == "last":
            raise OSError(errno.ENOSPC, "No space left on device", str(self.directory))
        return save(self, step, *a, **k)
    ocp.CheckpointManager.save = full_disk
    from experiments.train import main
    sys.exit(main(sys.argv[1:]))
""")


def test_full_disk_during_save_exits_2_and_keeps_the_previous_checkpoint(cli_setup, tmp_path):
    import orbax.checkpoint as ocp

    run = _copy_run(cli_setup, tmp_path / "run")
    args = tiny_args(cli_setup["data"], "--workdir", str(run), "--epochs", "2")
    out = run_cli(args, cwd=tmp_path, env=cli_setup["env"],
                  python_code=FULL_DISK.format(root=str(ROOT)))
    assert out.returncode == 2, out.stderr[-3000:]
    errors = [l for l in out.stderr.splitlines() if l.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in out.stderr, out.stderr
    assert "No space left on device" in errors[0] and "intact" in errors[0]
    assert "resume after epoch 1" in errors[0]
    # The epoch-1 checkpoint is still the resume point and restores.
    mngr = ocp.CheckpointManager(run / "checkpoints" / "last")
    assert mngr.all_steps() == [1]
    assert int(mngr.restore(1)["epoch"]) == 1
    mngr.close()
    # Space is back: the same command resumes after epoch 1 and finishes.
    out = run_cli(args, cwd=tmp_path, env=cli_setup["env"])
    assert out.returncode == 0, out.stderr[-3000:]
    assert "after epoch 1" in out.stdout
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]


def test_three_class_training_learns_and_exports(tmp_path):
    # Class-index masks (background / disc interior / a 1-px ring): the step uses softmax CE +
    # soft Dice per head, validation the pooled class mIoU, and the exported checkpoint
    # rebuilds a 3-class model whose argmax agrees with the labels better than chance.
    from unetpp_jax.data.classes import ClassSplit
    from unetpp_jax.model import load_pretrained
    from unetpp_jax.train import export_best

    def three_class(n, seed):
        base = synthetic_split(n, seed=seed)
        fg = base.masks > 0
        ring = fg & ~(np.roll(fg, 1, 1) & np.roll(fg, -1, 1) & np.roll(fg, 1, 2) & np.roll(fg, -1, 2))
        labels = fg.astype(np.uint8) + ring.astype(np.uint8)  # 0 bg, 1 interior, 2 ring
        return ClassSplit(base.images, labels, base.ids, 3)

    cfg = dataclasses.replace(TINY, num_classes=3, epochs=2, widths=(8, 16, 32))
    with pytest.raises(DataError, match="num_classes=3"):
        train(dataclasses.replace(cfg, num_classes=1), tmp_path / "wrong", three_class(8, 0),
              three_class(4, 1), progress=False)
    summary = train(cfg, tmp_path / "run", three_class(32, 0), three_class(8, 1), progress=False)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert 0 <= summary["best"]["val_miou"] <= 100 and len(summary["best"]["val_miou_per_head"]) == 2
    out = export_best(tmp_path / "run", tmp_path / "ckpt")
    model, variables = load_pretrained(out)
    assert model.num_classes == 3 and model.widths == (8, 16, 32)
