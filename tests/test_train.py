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
from unetpp_jax.train import TrainConfig, deep_supervision_loss, soft_dice_loss, train

ROOT = Path(__file__).resolve().parents[1]

TINY = TrainConfig(name="test", widths=(4, 8, 16, 32, 64), image_size=32, batch_size=4, epochs=3,
                   learning_rate=3e-3, bce_weight=0.5, dice_weight=1.0, shuffle=True, augment=True,
                   eval_batch_size=4, seed=0)


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
    from test_train import TINY, synthetic_split
    from unetpp_jax.train import train
    cfg = dataclasses.replace(TINY, **json.loads({overrides!r}))
    train(cfg, {workdir!r}, synthetic_split(32), synthetic_split(8, seed=1), progress=False)
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
    cfg = dataclasses.replace(TINY, epochs=4, ema_decay=0.9)
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
    overrides = json.dumps({"epochs": 4})
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    # Reference: an uninterrupted run, in a subprocess like the interrupted one.
    ref_dir = tmp_path / "ref"
    subprocess.run([sys.executable, "-c", SYNTH_SNIPPET.format(
        root=str(ROOT), tests=str(ROOT / "tests"), overrides=overrides, workdir=str(ref_dir))],
        check=True, env=env, timeout=300)
    # Interrupted: kill -9 as soon as epoch 2 has been logged (mid epoch 3 or during its save).
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", SYNTH_SNIPPET.format(
        root=str(ROOT), tests=str(ROOT / "tests"), overrides=overrides, workdir=str(run_dir))],
        env=env)
    log = run_dir / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if log.exists() and len(log.read_text().splitlines()) >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = len(log.read_text().splitlines())
    assert killed_at < 4
    # Resume in this process: starts after the last saved epoch, ends where the reference ended.
    cfg = dataclasses.replace(TINY, epochs=4)
    train(cfg, run_dir, synthetic_split(32), synthetic_split(8, seed=1), progress=False)
    rows = [json.loads(l) for l in log.read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    ref_rows = [json.loads(l) for l in (ref_dir / "metrics.jsonl").read_text().splitlines()]
    np.testing.assert_allclose([r["train_loss"] for r in rows],
                               [r["train_loss"] for r in ref_rows], rtol=1e-5)
    (s1, p1), (s2, p2) = _final_params(run_dir), _final_params(ref_dir)
    assert s1 == s2 == 4
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), p1, p2)


TWO_DEVICE_SNIPPET = textwrap.dedent("""
    import sys, dataclasses, numpy as np, jax
    sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r})
    from jax.sharding import Mesh
    from test_train import TINY, synthetic_split
    from unetpp_jax.data.pipeline import batches
    from unetpp_jax.train import create_state, make_train_step, shard_batch
    assert jax.device_count() == 2, jax.devices()
    # SGD: the update is linear in the gradient, so the comparison sees the sharded step itself.
    # (Adam divides by sqrt(v); for parameters whose gradient is ~0 it turns float32 reduction-order
    # noise into lr-sized steps, which would make any two reduction orders differ by ~1e-3.)
    cfg = dataclasses.replace(TINY, batch_size=8, optimizer="sgd", learning_rate=0.05)
    batch = next(batches(synthetic_split(8), 8, augment=True))
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
