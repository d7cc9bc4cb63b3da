"""experiments.bench: a --quick run prints the table and writes a report with every section.

The run is the smoke setting (32x32 input, batch 2, levels 1 and 4, 8 validation images), on a
UNet++ of a quarter of the full widths (8 .. 128) whose checkpoint is written here without any
compute (He-scaled random kernels, identity BatchNorm), so the MIoU path runs too. Its numbers are only checked for being present, positive and
consistent with each other (ratios recomputed from the rows), not for speed.
"""

from __future__ import annotations

import importlib.util
import json
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import bench
from unetpp_jax import checkpoint
from experiments.benchmark import SECTIONS
from unetpp_jax.timing import interleaved_timings, round_ratio, time_jitted
from unetpp_jax.model import WIDTHS, UNetPlusPlus

HAS_TORCH = importlib.util.find_spec("torch") is not None
HAS_ORT = all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxruntime"))

NARROW = tuple(w // 4 for w in WIDTHS)  # (8, 16, 32, 64, 128)

TIMING_FIELDS = {"batch", "images_per_s", "latency_ms", "compile_s", "median_s", "min_s", "max_s",
                 "repeats"}
INFERENCE_FIELDS = TIMING_FIELDS | {"level", "xla_flops", "flops_ratio", "speedup", "efficiency",
                                    "miou"}


@pytest.fixture(scope="module")
def random_checkpoint(tmp_path_factory):
    """A 4-head UNet++ checkpoint with random weights, made from the abstract tree (no compile).
    A quarter of the full widths: the bench reads the model from the checkpoint, so every
    section compiles this narrower grid (compiling is most of a --quick run's time)."""
    model = UNetPlusPlus(widths=NARROW)
    abstract = jax.eval_shape(model.init, jax.ShapeDtypeStruct((2,), jnp.uint32),
                              jax.ShapeDtypeStruct((1, 16, 16, 3), jnp.float32))
    rng = np.random.default_rng(0)

    def leaf(path, a):
        name = path[-1].key
        if name == "kernel":
            return rng.normal(0, math.sqrt(2 / np.prod(a.shape[:-1])), a.shape).astype(np.float32)
        return (np.ones if name in ("scale", "var") else np.zeros)(a.shape, np.float32)

    variables = jax.tree_util.tree_map_with_path(leaf, abstract)
    path = tmp_path_factory.mktemp("bench") / "random"
    metadata = {"model": {"name": "UNetPlusPlus", "deep_supervision": True, "widths": list(NARROW),
                          "num_classes": 1, "in_channels": 3}}
    return checkpoint.save_variables(path, variables, metadata)


def nested_unet_params(w, in_channels=3, heads=4) -> int:
    """Trainable parameters of UNET-ZOO's NestedUNet, counted by hand: node X(i,j) is two
    conv3x3 (+bias) + BatchNorm (scale, shift) blocks of w[i] channels, reading the image or
    the pooled X(i-1,0) when j = 0, else j earlier nodes of row i and X(i+1,j-1) upsampled; each
    head is a 1x1 conv of w[0] channels."""
    total = 0
    for i in range(5):
        for j in range(5 - i):
            cin = (in_channels if i == 0 else w[i - 1]) if j == 0 else j * w[i] + w[i + 1]
            total += (9 * cin * w[i] + 3 * w[i]) + (9 * w[i] * w[i] + 3 * w[i])
    return total + heads * (w[0] + 1)


def test_hand_count_is_unet_zoo_s_published_size():
    assert nested_unet_params(WIDTHS) == 9_163_428  # UNET-ZOO's NestedUNet at 32..512


def positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def check_timing(row: dict, batch: int):
    assert TIMING_FIELDS <= set(row), TIMING_FIELDS - set(row)
    assert row["batch"] == batch
    for k in ("images_per_s", "latency_ms", "compile_s", "median_s", "min_s", "max_s"):
        assert positive(row[k]), (k, row[k])
    assert row["min_s"] <= row["median_s"] <= row["max_s"]
    assert row["images_per_s"] == pytest.approx(batch / row["median_s"])
    assert row["latency_ms"] == pytest.approx(1e3 * row["median_s"])


def test_time_jitted_counts_calls_and_takes_the_median():
    calls = []

    def f(x):
        calls.append(x)
        return x

    t = time_jitted(f, 3, repeats=4, warmup=2, sync=None)
    assert calls == [3] * (1 + 2 + 4)  # compile call, warm-up, timed
    assert t.repeats == 4 and len(t.times) == 4 and t.median_s == float(np.median(t.times))
    with pytest.raises(ValueError, match="repeats"):
        time_jitted(f, 3, repeats=0)
    # min_time: calls of ~10 ms repeated until they add up to 0.1 s (at least 4 of them).
    calls.clear()
    t = time_jitted(lambda: calls.append(time.sleep(0.01)), repeats=4, warmup=0,
                    min_time=0.1, sync=None)
    # (a loaded machine oversleeps: fewer calls then, never fewer than 4 nor a shorter total)
    assert 4 <= t.repeats == len(calls) - 1 <= 11 and sum(t.times) >= 0.1
    # Interleaved rounds: each callable once apart, then ceil(repeats/rounds) calls per round.
    order = []
    timings, per_round = interleaved_timings(
        {"a": (lambda: order.append("a"), (), None), "b": (lambda: order.append("b"), (), None)},
        rounds=3, repeats=5, warmup=1)
    assert order == ["a", "a", "b", "b"] + ["a", "a", "b", "b"] * 3
    assert len(per_round) == 3 and timings["a"].repeats == 6 and len(timings["b"].times) == 6
    assert round_ratio([{"a": 2.0, "b": 1.0}, {"a": 3.0, "b": 1.0}, {"a": 1.0, "b": 1.0}],
                       "a", "b") == (2.0, 1.0, 3.0)
    # compiled=True: no first call set apart.
    calls.clear()
    t = time_jitted(f, 3, repeats=2, warmup=0, sync=None, compiled=True)
    assert calls == [3, 3] and t.compile_s == 0.0


def test_quick_run_reports_every_section(random_checkpoint, tmp_path, capsys):
    out = tmp_path / "report.json"
    assert bench.main(["--quick", "--checkpoint", str(random_checkpoint), "--json", str(out)]) == 0
    printed = capsys.readouterr()
    report = json.loads(out.read_text())
    cfg = report["meta"]["config"]
    assert cfg["batches"] == [2] and cfg["levels"] == [1, 4] and cfg["size"] == 32 and report["meta"]["quick"] is True
    for k in ("jax", "backend", "cpu", "cores", "load_average_1min", "checkpoint", "data",
              "command", "seconds"):
        assert k in report["meta"], k
    assert str(random_checkpoint) in report["meta"]["checkpoint"]

    # Inference: every (level, batch), FLOPs falling with the level, ratios to L4 consistent.
    rows = report["inference"]
    assert [(r["level"], r["batch"]) for r in rows] == [(1, 2), (4, 2)]
    for r in rows:
        assert INFERENCE_FIELDS <= set(r), INFERENCE_FIELDS - set(r)
        check_timing(r, r["batch"])
        ref = next(x for x in rows if x["level"] == 4 and x["batch"] == r["batch"])
        assert r["flops_ratio"] == pytest.approx(ref["xla_flops"] / r["xla_flops"])
        # The speedup is the median of 2 alternating rounds' t(L4)/t(Lk), inside their spread.
        assert r["rounds"] == 2 and r["speedup_min"] <= r["speedup"] <= r["speedup_max"]
        assert r["efficiency"] == pytest.approx(r["speedup"] / r["flops_ratio"])
        assert 0.0 <= r["miou"] <= 100.0  # each level's own head, on 8 validation images
    flops = [r["xla_flops"] for r in rows]
    assert flops[0] < 0.2 * flops[1]  # L1 (one head, X(0,1)) against L4
    assert all(r["flops_ratio"] == 1.0 and r["speedup"] == 1.0 for r in rows if r["level"] == 4)

    # Ablations: L4 with one speed measure undone, at each batch, against the package's L4.
    abl = report["ablation"]
    variants = ("Winograd conv (opt-in)", "XLA default conv (YNNPACK)", "BatchNorm folded per call", "whole batch per step",
                "skip inputs concatenated")
    assert [(r["variant"], r["batch"]) for r in abl] == (
        [(v, 2) for v in variants])
    for r in abl:
        check_timing(r, r["batch"])
        assert r["package_speedup_min"] <= r["package_speedup"] <= r["package_speedup_max"]
        assert positive(r["package_images_per_s"])

    # fp16 / int8 emulation next to fp32.
    prec = report["precision"]
    assert [r["precision"] for r in prec["rows"]] == ["fp32", "fp16", "int8"]
    assert prec["n_images"] == 8 and prec["calibration"]["num_images"] == 4
    assert positive(prec["calibration"]["seconds"])
    for r in prec["rows"]:
        check_timing(r, cfg["eval_batch"])
        assert r["time_vs_fp32"] == pytest.approx(r["median_s"] / prec["rows"][0]["median_s"])
        assert r["split_forward_s"] == pytest.approx(r["median_s"] * 2)  # 8 images, batch 4

    # Engines: JAX (package and XLA-conv-only), ONNX Runtime, PyTorch per batch, one run.
    if HAS_ORT:
        en = report["engines"]
        engines = ["JAX fp32 (package)", "JAX fp32, Winograd (opt-in)", "onnxruntime fp32"] + (
            ["PyTorch eager channels_last"] if HAS_TORCH else [])
        assert [(r["engine"], r["batch"]) for r in en["rows"]] == [(e, b) for b in (2,)
                                                                  for e in engines]
        for r in en["rows"]:
            check_timing(r, r["batch"])
            assert r["vs_onnxruntime_min"] <= r["vs_onnxruntime"] <= r["vs_onnxruntime_max"]
            if r["engine"] == "onnxruntime fp32":
                assert r["vs_onnxruntime"] == 1.0
    else:
        assert report["engines"] is None and "onnxruntime" in report["skipped"]["engines"]
    # Convs: GFLOP/s per distinct conv shape (the first 2 in --quick) and the matmul ceiling.
    cs = report["convs"]
    assert len(cs["rows"]) == 2 and cs["rows"][0]["hw"] == [32, 32]
    for r in cs["rows"]:
        assert r["package_impl"] in ("xla", "winograd4", "winograd2")
        assert r["gflops"]["package"] == r["gflops"][r["package_impl"]]
        assert all(positive(v) for v in r["gflops"].values())
    assert all(positive(m["gflops"]) for m in cs["matmul"])

    ts = report["train_step"]
    check_timing(ts, 2)
    assert ts["size"] == 32 and ts["widths"] == [8, 16, 32, 64, 128] and ts["devices"] >= 1

    assert positive(report["peak_rss_mb"])
    ran = [s for s in SECTIONS if report[s] is not None]
    assert list(report["peak_rss_mb_after"]) == ran
    assert all(positive(v) and v <= report["peak_rss_mb"] for v in report["peak_rss_mb_after"].values())

    if HAS_TORCH:
        pt = report["pytorch"]
        assert pt["threads"] == 1 and pt["memory_format"] == "channels_last"
        for r, b in zip(pt["rows"], (2,), strict=True):
            check_timing(r, b)
            # The ratio is the median of 2 alternating rounds, inside their spread, and agrees
            # with the two sides' pooled speeds up to the rounds' spread.
            assert r["rounds"] == 2 and positive(r["jax_images_per_s"])
            assert r["jax_over_pytorch_min"] <= r["jax_over_pytorch"] <= r["jax_over_pytorch_max"]
            assert r["repeats"] == 2  # one timed call per round (repeats 2 over 2 rounds)
            pooled = r["jax_images_per_s"] / r["images_per_s"]
            assert 0.5 * r["jax_over_pytorch_min"] <= pooled <= 2 * r["jax_over_pytorch_max"]
        cv = report["converter"]
        assert positive(cv["first_s"]) and positive(cv["median_s"])
        assert cv["params"] == nested_unet_params(NARROW)
        assert set(cv["phases_s"]) == {"read", "map", "write", "total"}
        assert report["skipped"] == ({} if HAS_ORT else {"engines": report["skipped"]["engines"]})
    else:
        assert report["pytorch"] is None and report["converter"] is None
        assert "PyTorch is not installed" in report["skipped"]["pytorch"]

    # One table: a line per measured row, then the footnotes; progress on stderr.
    table = printed.out
    assert table.count("JAX fp32 L") == len(rows)
    assert sum(line.startswith("L4 ") for line in table.splitlines()) == len(abl)
    for phrase in ["eval forward fp16 (emulated)", "eval forward int8 (emulated)", "train step",
                   "peak RSS", "speedup", str(out)]:
        assert phrase in table, phrase
    if HAS_TORCH:
        # the pytorch section's rows, and the engines section's beside ONNX Runtime
        assert table.count("PyTorch eager channels_last") == (2 if HAS_ORT else 1)
        assert "converter" in table
    if HAS_ORT:
        assert table.count("onnxruntime fp32") == 1 and "GFLOP/s per conv" in table
    assert "[bench" in printed.err and "inference L4 batch 2" in printed.err


def test_sections_can_be_skipped(random_checkpoint, tmp_path, capsys):
    out = tmp_path / "r.json"
    assert bench.main(["--quick", "--checkpoint", str(random_checkpoint), "--no-torch",
                       "--only", "pytorch", "--only", "converter", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert all(report[s] is None for s in SECTIONS)
    assert report["skipped"] == {"pytorch": "--no-torch", "converter": "--no-torch",
                                 "inference": "not selected", "ablation": "not selected",
                                 "engines": "not selected", "convs": "not selected",
                                 "precision": "not selected",
                                 "train_step": "not selected"}
    assert "skipped pytorch: --no-torch" in capsys.readouterr().out


def test_twin_from_flax_holds_the_converted_weights():
    torch = pytest.importorskip("torch", reason="PyTorch (test extra) is the reference twin")
    from experiments.torch_twin import NestedUNet, from_flax, randomize_batchnorm
    from weights_port.keymap import convert_state_dict

    torch.manual_seed(0)
    sd = randomize_batchnorm(NestedUNet(), seed=0).state_dict()
    conv = convert_state_dict({k: v.numpy() for k, v in sd.items()})
    twin = from_flax(conv.model, conv.variables)
    assert not twin.training
    back = twin.state_dict()
    assert set(back) == set(sd)
    for k, v in sd.items():
        if not k.endswith("num_batches_tracked"):
            assert torch.equal(back[k], v), k


def test_missing_checkpoint_is_a_clear_error(tmp_path, capsys):
    assert bench.main(["--quick", "--checkpoint", str(tmp_path / "nope"),
                       "--json", str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "nope" in err and "Traceback" not in err
    assert not (tmp_path / "r.json").exists()
