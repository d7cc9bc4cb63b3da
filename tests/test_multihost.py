"""Multi-host training, as two processes on this machine (one CPU device each, gloo collectives).

One scenario, in order: two processes start ``experiments.train``; process 0 (which also hosts
the jax.distributed coordinator) is killed with SIGKILL after epoch 1 is committed and the
survivor must stop with a clear message instead of hanging; the same command rerun on both
resumes after epoch 1 and finishes (both exit 0), each having read only its own part of the
data (its own cache holds exactly those ids, disjoint from the other's); the per-epoch training
loss equals one process with two simulated devices for the same global batches.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))

from test_train import make_data_folder  # noqa: E402

EPOCHS = 3
# A depth-2 UNet++ (widths (4, 8, 16)): the compile of the step dominates every launch (the
# depth-4 tiny model took 45-115 s per launch on this busy 2-core machine; multi-process
# programs are not stored in jax's persistent compilation cache).
LAUNCH_TIMEOUT = 420


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("JAX_COORDINATOR", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID",
                                "SLURM_"))}
    env.update(PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    env.pop("XLA_FLAGS", None)
    return env


def cli_args(data: Path, workdir: Path) -> list[str]:
    return [sys.executable, "-m", "experiments.train", "--config", "tiny", "--data", str(data),
            "--set", "image_size=16", "--set", "widths=(4, 8, 16)", "--epochs", str(EPOCHS), "--workdir", str(workdir),
            "--no-progress", "--heartbeat-timeout", "10"]


def launch(data: Path, workdir: Path, logs: Path, tag: str) -> list[subprocess.Popen]:
    port = free_port()
    procs = []
    for i in range(2):
        # A data cache per process: what each one read and preprocessed is left in its own.
        env = dict(base_env(), JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                   JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i),
                   UNETPP_JAX_CACHE=str(logs / f"cache{tag}{i}"))
        procs.append(subprocess.Popen(cli_args(data, workdir), cwd=logs, env=env,
                                      stdout=open(logs / f"{tag}{i}.out", "w"),
                                      stderr=open(logs / f"{tag}{i}.err", "w")))
    return procs


def wait_all(procs, timeout):
    deadline = time.time() + timeout
    for p in procs:
        try:
            p.wait(max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"processes still running after {timeout} s (a hang)")
    return [p.returncode for p in procs]


def epochs_logged(workdir: Path) -> list[int]:
    path = workdir / "metrics.jsonl"
    return [json.loads(l)["epoch"] for l in path.read_text().splitlines()] if path.exists() else []


def test_two_processes_kill_resume_and_match_two_devices(tmp_path):
    data = make_data_folder(tmp_path / "data")
    logs = tmp_path / "logs"
    logs.mkdir()
    run = tmp_path / "run"

    # 1. Start both; kill -9 process 0 once epoch 1 is committed (checkpoints/last/1 exists).
    procs = launch(data, run, logs, "a")
    deadline = time.time() + LAUNCH_TIMEOUT
    while not (run / "checkpoints" / "last" / "1").is_dir():
        assert time.time() < deadline, "epoch 1 was never committed"
        assert all(p.poll() is None for p in procs), (logs / "a0.err").read_text()[-3000:]
        time.sleep(0.05)
    procs[0].send_signal(signal.SIGKILL)
    t_kill = time.time()
    # The survivor stops on its own: gloo's all-reduce fails at once, or jax.distributed's
    # heartbeat (10 s here) ends it; 60 s bounds "no hang".
    (rc1,) = wait_all(procs[1:], 60)
    stop_s = time.time() - t_kill
    procs[0].wait()
    err1 = (logs / "a1.err").read_text()
    assert rc1 != 0
    assert ("lost contact with another process" in err1
            or "another task died" in err1), err1[-3000:]
    assert epochs_logged(run)[:1] == [1] and len(epochs_logged(run)) < EPOCHS
    print(f"survivor stopped {stop_s:.2f} s after the kill, exit code {rc1}")

    # 2. The same command on both: resumes after epoch 1, both exit 0, one set of logs.
    procs = launch(data, run, logs, "b")
    assert wait_all(procs, LAUNCH_TIMEOUT) == [0, 0], (logs / "b0.err").read_text()[-3000:]
    out0, out1 = (logs / "b0.out").read_text(), (logs / "b1.out").read_text()
    assert "after epoch 1" in out0 and "resumed" in out0
    assert "epoch" not in out1  # logs are process 0's alone
    assert "val MIoU" in out0 and "(head 2), per head" in out0  # the last head of a depth-2 grid
    # Each process read only its own part. 40 images = 32 train + 8 validation; the tiny config
    # trains on the first 16 (train_limit): two device shards of 8 rows; validation halves of 4.
    # Its cache holds exactly those ids, and no whole-folder entry.
    assert "process 0/2: reads training rows [0, 8) of 16" in out0, out0
    assert "validation rows [4, 8) of 8" in out1, out1
    read = []
    for i in range(2):
        entries = list((logs / f"cacheb{i}" / "folder-part").glob("*.npz"))
        ids = [str(x) for e in entries for x in np.load(e)["ids"]]
        assert len(entries) == 2 and len(ids) == 8 + 4 == len(set(ids)), (i, entries)
        assert not (logs / f"cacheb{i}" / "folder").exists()  # the whole folder never loaded
        read.append(set(ids))
    assert not read[0] & read[1] and len(read[0] | read[1]) == 24
    assert epochs_logged(run) == list(range(1, EPOCHS + 1))
    assert sorted(p.name for p in (run / "checkpoints" / "last").iterdir()) == [str(EPOCHS)]
    assert not list(run.glob(".*.tmp-*"))

    # 3. One process, two simulated devices, same global batches: the same losses.
    ref = tmp_path / "ref"
    env = dict(base_env(), XLA_FLAGS="--xla_force_host_platform_device_count=2",
               UNETPP_JAX_CACHE=str(logs / "cache_ref"))
    out = subprocess.run(cli_args(data, ref), cwd=logs, env=env, capture_output=True, text=True,
                         timeout=LAUNCH_TIMEOUT)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "on 2 devices" in out.stdout
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    ref_rows = [json.loads(l) for l in (ref / "metrics.jsonl").read_text().splitlines()]
    got = [r["train_loss"] for r in rows]
    want = [r["train_loss"] for r in ref_rows]
    print("two processes:", got, "\none process, two devices:", want)
    # Same program up to where the gradient all-reduce runs (gloo across processes vs XLA's
    # in-process reduction; a sum of two terms is exact either way), so the losses agree to
    # float32 rounding; 1e-5 relative leaves room for a different fusion of the reduction.
    for a, b in zip(got, want):
        assert abs(a - b) <= 1e-5 * abs(b), (got, want)
    # Validation is split over the processes and gathered: the same scores as on one process.
    for r, q in zip(rows, ref_rows):
        assert r["val_miou_per_head"] == q["val_miou_per_head"], (r, q)
