"""weights_port: UNET-ZOO PyTorch checkpoints -> unetpp-jax, checked against a PyTorch twin.

Parity: the converted Flax model's probabilities, every head, match the twin's (UNET-ZOO module
names, random weights, randomised BatchNorm statistics) within 1e-5 max abs at 96x96, for both
file formats, with and without DataParallel's ``module.``, single-head, and after a few training
steps. Safety and strictness: a pickle that would run a command is refused without running it,
torch is never imported by the converter, and every error path exits 2 with a message naming
the problem and writes nothing. The 96x96 model is compiled once per head layout.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")  # the twin only; the converter itself never imports torch

from experiments.torch_twin import NestedUNet, randomize_batchnorm  # noqa: E402

from unetpp_jax import checkpoint  # noqa: E402
from unetpp_jax.inference import predict_fn  # noqa: E402
from unetpp_jax.model import load_pretrained  # noqa: E402
from weights_port import convert, keymap, torch_format  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TOL = 1e-5  # max abs difference of probabilities (the bar)


def save(obj, path: Path, fmt: str = "zip") -> Path:
    torch.save(obj, path, _use_new_zipfile_serialization=(fmt == "zip"))
    return path


def with_prefix(sd, prefix="module."):
    return type(sd)((prefix + k, v) for k, v in sd.items())


# PyTorch with one thread for the whole file (conftest's `torch` fixture).
pytestmark = pytest.mark.usefixtures("torch")


@pytest.fixture(scope="module")
def images():
    x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(123))
    return x, x.numpy().transpose(0, 2, 3, 1)  # NCHW for the twin, NHWC for Flax


def twin_probs(model, x) -> list[np.ndarray]:
    """The twin's heads computed in float64: the original's exact output. JAX's float32 is
    judged against it (PyTorch's float32 forward is itself up to ~9e-6 from it at 96x96,
    JAX's ~5e-6, so float32 against float32 could differ by their sum)."""
    import copy

    with torch.no_grad():
        out = copy.deepcopy(model).double()(x.double())
    out = out if isinstance(out, list) else [out]
    return [o.numpy().transpose(0, 2, 3, 1).astype(np.float32) for o in out]


@pytest.fixture(scope="module")
def twin(images):
    torch.manual_seed(0)
    model = randomize_batchnorm(NestedUNet(), seed=0)
    return model.state_dict(), twin_probs(model, images[0])


@pytest.fixture(scope="module")
def flax_probs(images):
    """``f(checkpoint_dir) -> list of head probabilities``; one jitted program per head layout."""
    compiled = {}

    def f(path):
        model, variables = load_pretrained(path)
        if model.deep_supervision not in compiled:
            compiled[model.deep_supervision] = (model, predict_fn(model))
        expected_model, predict = compiled[model.deep_supervision]
        assert model == expected_model
        out = predict(variables, images[1])
        return [np.asarray(o) for o in (out if isinstance(out, tuple) else [out])]

    return f


def assert_heads_match(ours, ref, n_heads):
    assert len(ours) == len(ref) == n_heads
    for k, (a, b) in enumerate(zip(ours, ref), 1):
        assert a.shape == b.shape
        err = float(np.max(np.abs(a - b)))
        assert err < TOL, f"head {k}: max abs {err:.2e}"
    # The comparison means something: probabilities spread over sigmoid's sensitive range.
    assert all(0.02 < float(np.std(b)) for b in ref)


def no_leftovers(parent: Path, out: Path):
    assert not out.exists()
    assert not [p for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


# ------------------------------------------------------------------------------------ parity


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
@pytest.mark.parametrize("prefixed", [False, True], ids=["bare", "module."])
def test_every_head_matches_twin(tmp_path, twin, flax_probs, fmt, prefixed):
    sd, ref = twin
    src = save(with_prefix(sd) if prefixed else sd, tmp_path / "unet++_8_dsb2018Cell_21.pth", fmt)
    result = convert.convert(src)
    out = tmp_path / "unet++_8_dsb2018Cell_21_flax"  # default: next to the input, named after it
    assert result.output == out.absolute() and out.is_dir()
    assert result.source_format == fmt and result.conversion.mapped == 188
    assert len(result.conversion.dropped) == 30  # num_batches_tracked
    assert result.param_count == 9_163_428 and result.stat_count == 7_296
    assert_heads_match(flax_probs(out), ref, 4)

    _, meta = checkpoint.load_variables(out)
    assert meta["model"] == {"name": "UNetPlusPlus", "deep_supervision": True, "in_channels": 3,
                             "widths": [32, 64, 128, 256, 512], "num_classes": 1,
                             "encoder": "vgg", "skips": "nested"}
    assert meta["source"]["sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    assert meta["source"]["format"] == fmt
    assert any("module." in n for n in meta["conversion"]["notes"]) == prefixed


def test_single_head_checkpoint_matches_twin(tmp_path, images, flax_probs):
    torch.manual_seed(1)
    model = randomize_batchnorm(NestedUNet(deep_supervision=False), seed=1)
    src = save(model.state_dict(), tmp_path / "single.pth")
    result = convert.convert(src, tmp_path / "single_flax")
    assert not result.conversion.model.deep_supervision and result.param_count == 9_163_329
    assert_heads_match(flax_probs(tmp_path / "single_flax"), twin_probs(model, images[0]), 1)


def test_trained_twin_matches(tmp_path, images, flax_probs):
    # A few Adam steps on BCE of the in-model sigmoids (UNET-ZOO's loss, mean over the heads),
    # so weights and running statistics are the product of training, not of an initialiser.
    # BatchNorm averages cumulatively here: with PyTorch's momentum 0.1 three steps would leave
    # the running statistics near their (0, 1) start and eval-mode outputs nearly constant.
    torch.manual_seed(2)
    model = NestedUNet()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(2, 3, 32, 32, generator=g), torch.rand(2, 1, 32, 32, generator=g)
    model.train()
    for _ in range(3):
        opt.zero_grad()
        loss = sum(torch.nn.functional.binary_cross_entropy(o, y) for o in model(x)) / 4
        loss.backward()
        opt.step()
    model.eval()
    src = save({"epoch": 1, "state_dict": model.state_dict(),
                "optimizer": opt.state_dict()}, tmp_path / "trained.pth")
    convert.convert(src, tmp_path / "trained_flax")
    assert_heads_match(flax_probs(tmp_path / "trained_flax"), twin_probs(model, images[0]), 4)


# ------------------------------------------------------------------ accepted file layouts


def test_wrappers_strided_tensors_and_dtypes_convert_exactly(tmp_path, twin):
    sd = twin[0]
    base = keymap.convert_state_dict(torch_format.load(save(sd, tmp_path / "b.pth")).obj).variables

    odd = dict(sd)  # a non-contiguous tensor and one at an offset inside a shared storage
    w = sd["conv0_0.conv.0.weight"]
    odd["conv0_0.conv.0.weight"] = w.permute(1, 0, 2, 3).contiguous().permute(1, 0, 2, 3)
    assert not odd["conv0_0.conv.0.weight"].is_contiguous()
    shared = torch.cat([torch.zeros(7), sd["final4.bias"], torch.zeros(3)])
    odd["final4.bias"] = shared[7:8]
    optimizer = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(5)}},
                 "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "params": [0]}]}
    variants = {
        "state_dict": {"state_dict": odd, "epoch": 21, "optimizer": optimizer},
        "model": {"model": with_prefix(sd), "best_iou": 0.77},
        "net": {"net": sd},
    }
    for (key, obj), fmt in zip(variants.items(), ["zip", "legacy", "zip"]):
        conv = keymap.convert_state_dict(torch_format.load(save(obj, tmp_path / f"{key}.pth", fmt)).obj)
        assert conv.notes[0].startswith(f"state_dict taken from the checkpoint's {key!r}")
        jax.tree_util.tree_map(np.testing.assert_array_equal, conv.variables, base)
        assert conv.dtype_casts == {}

    for dtype, name in [(torch.float16, "float16"), (torch.float64, "float64")]:
        cast = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
        conv = keymap.convert_state_dict(torch_format.load(save(cast, tmp_path / f"{name}.pth")).obj)
        assert conv.dtype_casts == {name: 188}
        expect = jax.tree_util.tree_map(lambda a: a.astype(name).astype(np.float32), base)
        jax.tree_util.tree_map(np.testing.assert_array_equal, conv.variables, expect)
        assert all(a.dtype == np.float32 for a in jax.tree_util.tree_leaves(conv.variables))


def test_summary_reports_casts_heads_params_and_time(tmp_path, twin, capsys):
    half = {k: v.half() if v.is_floating_point() else v for k, v in twin[0].items()}
    src = save(half, tmp_path / "half.pth", "legacy")
    assert convert.main([str(src), "-o", str(tmp_path / "out")]) == 0
    text = capsys.readouterr().out
    for phrase in ["legacy pickle", "188 mapped", "30 num_batches_tracked dropped", "final1..final4",
                   "9,163,428", "7,296", "float16 -> float32 for 188 tensors",
                   str((tmp_path / "out").absolute()), "load_pretrained"]:
        assert phrase in text, phrase
    assert re.search(r"time\s+\d+\.\d+ s", text)
    assert len(text.splitlines()) <= 20  # one screen


def test_script_path_runs_without_torch(tmp_path, twin):
    # Run as `python weights_port/convert.py` from another directory, with no PYTHONPATH to the
    # repository and a `torch` that records any import attempt and then fails.
    blocker = tmp_path / "blocked" / "torch"
    blocker.mkdir(parents=True)
    attempted = tmp_path / "torch_import_attempted"
    (blocker / "__init__.py").write_text(
        f"open({str(attempted)!r}, 'w').close()\nraise ImportError('torch is blocked in this test')\n")
    src = save(twin[0], tmp_path / "unet++_8_dsb2018Cell_21.pth")
    env = {**os.environ, "PYTHONPATH": str(blocker.parent)}
    proc = subprocess.run([sys.executable, str(REPO / "weights_port" / "convert.py"), src.name],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert not attempted.exists(), "the converter tried to import torch"
    assert (tmp_path / "unet++_8_dsb2018Cell_21_flax" / "metadata.json").exists()
    print(proc.stdout)  # the summary, including the conversion time (shown with -s)


# ---------------------------------------------------------------------- strictness, errors


def run_cli(capsys, *argv) -> tuple[int, str]:
    code = convert.main([str(a) for a in argv])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return code, captured.err.strip()


def test_key_problems_are_reported_briefly_and_nothing_written(tmp_path, twin, capsys):
    sd = dict(twin[0])
    del sd["conv2_2.conv.3.weight"]
    sd["extra.weight"] = torch.zeros(4, 2)
    sd["conv1_1.conv.0.weight"] = torch.zeros(64, 1, 3, 3)
    sd["final2.bias"] = torch.zeros(2)
    src = save(sd, tmp_path / "bad.pth")
    code, err = run_cli(capsys, src, "-o", tmp_path / "out")
    assert code == 2
    assert "1 missing, 1 unexpected, 2 shape mismatches" in err and "nothing was written" in err
    assert "missing: conv2_2.conv.3.weight (model expects (128, 128, 3, 3))" in err
    assert "unexpected: extra.weight (checkpoint has (4, 2))" in err
    assert "shape mismatch: conv1_1.conv.0.weight: checkpoint (64, 1, 3, 3), model (64, 192, 3, 3)" in err
    assert "shape mismatch: final2.bias: checkpoint (2,), model (1,)" in err
    assert "unet-zoo layout" in err and len(err.splitlines()) <= 8
    no_leftovers(tmp_path, tmp_path / "out")

    many = {k: v for k, v in twin[0].items() if not k.startswith(("conv0_", "conv1_"))}
    code, err = run_cli(capsys, save(many, tmp_path / "many.pth"), "-o", tmp_path / "out")
    assert code == 2 and len(err.splitlines()) <= 8 and re.search(r"\.\.\. and \d+ more", err)


@pytest.mark.parametrize("case, phrase", [
    ("smp", "segmentation_models_pytorch UnetPlusPlus"),
    ("training", "whole training checkpoint"),
    ("unrelated", "no key looks like a UNet++ node"),
])
def test_mismatch_names_the_format_it_looks_like(tmp_path, capsys, case, phrase):
    z = torch.zeros(2)
    obj = {"smp": {"encoder.conv1.weight": z, "encoder.layer1.0.conv1.weight": z,
                   "decoder.blocks.x_0_0.conv1.0.weight": z, "segmentation_head.0.weight": z},
           "training": {"epoch": 7, "optimizer": {"state": {}}, "weights": {"a": 1}},
           "unrelated": {f"layer{i}.weight": z for i in range(50)}}[case]
    code, err = run_cli(capsys, save(obj, tmp_path / f"{case}.pth"), "-o", tmp_path / "out")
    assert code == 2 and phrase in err and len(err.splitlines()) <= 8, err


def _truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _zip_without_torch() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("notes.txt", "hello")
    return buf.getvalue()


@pytest.mark.parametrize("case, phrase", [
    ("empty", "is empty"),
    ("directory", "is a directory"),
    ("missing", "no such file"),
    ("truncated zip", "truncated or corrupt"),
    ("truncated legacy", "truncated"),
    ("text", "is not a PyTorch checkpoint"),
    ("other zip", "not a PyTorch checkpoint"),
    ("plain pickle", "not a PyTorch checkpoint (no PyTorch magic number)"),
])
def test_unreadable_inputs_one_line_exit_2(tmp_path, twin, capsys, case, phrase):
    src = tmp_path / "in.pth"
    if case == "empty":
        src.write_bytes(b"")
    elif case == "directory":
        src.mkdir()
    elif case == "truncated zip":
        src.write_bytes(_truncated(save(twin[0], tmp_path / "full.pth").read_bytes()))
    elif case == "truncated legacy":
        src.write_bytes(_truncated(save(twin[0], tmp_path / "full.pth", "legacy").read_bytes()))
    elif case == "text":
        src.write_text("these are not the weights you are looking for\n")
    elif case == "other zip":
        src.write_bytes(_zip_without_torch())
    elif case == "plain pickle":
        src.write_bytes(pickle.dumps({"a": [1, 2, 3]}, protocol=2))
    code, err = run_cli(capsys, src, "-o", tmp_path / "out")
    assert code == 2
    assert len(err.splitlines()) == 1 and phrase in err and str(src) in err, err
    no_leftovers(tmp_path, tmp_path / "out")


class RunsCommand:
    """Pickles as ``os.system(<touch marker>)``: loading it with plain pickle runs the command."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


@pytest.mark.parametrize("container", ["raw pickle", "legacy", "zip"])
def test_malicious_pickle_is_refused_and_not_run(tmp_path, capsys, container):
    marker = tmp_path / "pwned"
    payload = RunsCommand(marker)
    if container == "raw pickle":
        src = tmp_path / "evil.pth"
        src.write_bytes(pickle.dumps(payload, protocol=2))
        pickle.loads(src.read_bytes())  # control: the payload is live ...
        assert marker.exists()
        marker.unlink()  # ... and now it is gone again
    else:
        src = save({"conv0_0.conv.0.weight": torch.zeros(1), "x": payload},
                   tmp_path / "evil.pth", container)
    code, err = run_cli(capsys, src, "-o", tmp_path / "out")
    assert code == 2
    assert not marker.exists(), "the pickled command ran"
    assert "objects other than tensors" in err and re.search(r"(posix|os|nt)\.system", err)
    assert "torch.save(model.state_dict()" in err and len(err.splitlines()) == 1
    no_leftovers(tmp_path, tmp_path / "out")


def test_whole_model_pickle_is_refused(tmp_path, capsys):
    src = save(NestedUNet(), tmp_path / "model.pth")
    code, err = run_cli(capsys, src)
    assert code == 2 and "objects other than tensors" in err and "NestedUNet" in err


def test_wrapper_without_state_dict(tmp_path, capsys):
    src = save({"epoch": 3, "best_iou": 0.5}, tmp_path / "meta.pth")
    code, err = run_cli(capsys, src)
    assert code == 2 and "no state_dict found" in err and "'epoch', 'best_iou'" in err


def test_existing_output_needs_force_and_force_never_wipes_other_dirs(tmp_path, twin, capsys):
    src = save(twin[0], tmp_path / "w.pth")
    out = tmp_path / "w_flax"
    assert run_cli(capsys, src)[0] == 0
    stamp = (out / "metadata.json").read_text()
    code, err = run_cli(capsys, src)
    assert code == 2 and "already exists" in err and "--force" in err
    assert (out / "metadata.json").read_text() == stamp
    assert run_cli(capsys, src, "--force")[0] == 0
    assert (out / "metadata.json").exists()
    other = tmp_path / "photos"
    other.mkdir()
    (other / "keep.jpg").write_bytes(b"x")
    code, err = run_cli(capsys, src, "-o", other, "--force")
    assert code == 2 and "not a unetpp-jax-variables checkpoint" in err
    assert (other / "keep.jpg").read_bytes() == b"x"
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def test_failed_save_leaves_nothing_behind(tmp_path, monkeypatch):
    import orbax.checkpoint as ocp

    def broken_save(self, directory, *args, **kwargs):
        Path(directory).mkdir(parents=True)
        (Path(directory) / "partial").write_bytes(b"half a checkpoint")
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(ocp.PyTreeCheckpointer, "save", broken_save)
    variables = {"params": {"w": np.ones(3, np.float32)}}
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save_variables(tmp_path / "ckpt", variables, {"model": {}})
    no_leftovers(tmp_path, tmp_path / "ckpt")


def test_load_pretrained_checks_the_tree(tmp_path):
    variables = {"params": {"w": np.ones(3, np.float32)}, "batch_stats": {}}
    checkpoint.save_variables(tmp_path / "c", variables,
                              {"model": {"name": "UNetPlusPlus", "deep_supervision": True}})
    loaded, meta = checkpoint.load_variables(tmp_path / "c")
    assert isinstance(loaded["params"]["w"], jax.Array) and loaded["params"]["w"].shape == (3,)
    with pytest.raises(ValueError, match="do not fit UNetPlusPlus"):
        load_pretrained(tmp_path / "c")
