"""experiments.eval end to end: fp32 parity with a PyTorch twin through the converter, fp16 and
int8 emulation on the bundled trained model, and the error paths."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from experiments import eval as eval_cli
from unetpp_jax import checkpoint, evaluate, metrics, quant
from unetpp_jax.data.pipeline import load_split, normalize
from unetpp_jax.model import UNetPlusPlus, init_variables
from unetpp_jax.pretrained import model_description as model_metadata



def test_fp32_parity_with_pytorch_twin_through_converter(tmp_path):
    """The table's number from our pipeline equals the metric on the twin's own outputs (0.01).

    On 40 of the bundled validation images, written as a folder (pytorch-nested-unet layout,
    binary masks) and scored with ``--split all``: the converter, the CLI and the metric are the same as on
    the 134, at a third of the PyTorch forward (the bundled split's own loading is tested in
    test_data)."""
    import dataclasses
    import shutil

    from PIL import Image

    torch = pytest.importorskip("torch", reason="PyTorch (test extra) is the reference twin")
    from experiments.torch_twin import NestedUNet, randomize_batchnorm

    from unetpp_jax.data.pipeline import bundled_path
    from weights_port.convert import convert

    val = load_split().take(range(40))  # the first 40 of the bundled 134-image split
    # Binary masks (the bundled soft masks at the metric's ground-truth threshold): a folder's
    # masks are binary or class maps (unetpp_jax/data/folder.py), and so are these.
    val = dataclasses.replace(val, masks=np.where(val.masks > metrics.GT_THRESHOLD, 255, 0)
                              .astype(np.uint8))
    data = tmp_path / "data"
    (data / "masks" / "0").mkdir(parents=True)
    (data / "images").mkdir()
    for i, mask in zip(val.ids, val.masks):
        shutil.copy(bundled_path() / "images" / f"{i}.png", data / "images" / f"{i}.png")
        Image.fromarray(mask).save(data / "masks" / "0" / f"{i}.png")
    torch.manual_seed(0)
    twin = randomize_batchnorm(NestedUNet(), seed=1)
    x = torch.from_numpy(normalize(val.images).transpose(0, 3, 1, 2).copy())
    with torch.no_grad():
        # Centre each head's logits on 0 so about half the pixels sit on each side of 0.5 and
        # the comparison is sensitive to every numeric difference, not a constant prediction.
        feats = twin(x[:16])
        for k in range(1, 5):
            head = getattr(twin, f"final{k}")
            logit = torch.logit(feats[k - 1].clamp(1e-6, 1 - 1e-6))
            head.bias -= logit.median()
        probs = np.stack([p.numpy()[:, 0] for p in twin(x)])
    expected = [100 * float(metrics.miou_foreground(p, val.masks)) for p in probs]
    assert 5.0 < min(expected) and max(expected) < 95.0  # a non-degenerate prediction

    pth = tmp_path / "unet++_8_dsb2018Cell_21.pth"
    torch.save(twin.state_dict(), pth)
    out = tmp_path / "ckpt"
    convert(pth, out)
    rc = eval_cli.main(["--checkpoint", str(out), "--data", str(data), "--split", "all",
                        "--precision", "fp32", "--head", "all",
                        "--json", str(tmp_path / "r.json"), "--no-progress"])
    assert rc == 0
    got = json.loads((tmp_path / "r.json").read_text())
    assert got["precision"] == "fp32" and got["n_images"] == 40 and got["head"] == 4
    np.testing.assert_allclose(got["miou_per_head"], expected, atol=0.01)
    assert got["miou"] == got["miou_per_head"][3]


def test_fp16_and_int8_emulation_stay_close_on_a_trained_model(bundled):
    """The bundled (trained) weights on 16 real validation images: fp16 and int8-KL move the
    probabilities, but little, and the MIoU less than the card's own losses."""
    model, variables = bundled.model, bundled.variables
    split = load_split().take(list(range(16)))
    fp32 = evaluate.evaluate_precision(model, variables, split, "fp32")
    assert fp32.miou > 70.0, fp32.miou_per_head  # the model really is trained
    fp16 = evaluate.evaluate_precision(model, variables, split, "fp16")
    d16 = np.abs(fp16.probs - fp32.probs)
    # Measured: mean 1.1e-4, max 0.028 (a pixel on a steep sigmoid), 7e-5 of the masks flip.
    assert 0.0 < d16.max() < 0.1 and d16.mean() < 1e-3  # fp16 really ran, and stayed close
    assert ((fp16.probs >= 0.5) != (fp32.probs >= 0.5)).mean() < 1e-3
    assert abs(fp16.miou - fp32.miou) < 0.05
    calib = quant.calibrate(model, variables, normalize(split.images[:8]), method="kl")
    int8 = evaluate.evaluate_precision(model, variables, split, "int8", calibration=calib)
    d8 = np.abs(int8.probs - fp32.probs)
    # Measured: mean 2.0e-3, 0.18 % of the masks flip, MIoU +0.09.
    assert d8.max() > 1e-2 and d8.mean() < 1e-2  # int8 really quantized, and stayed close
    assert ((int8.probs >= 0.5) != (fp32.probs >= 0.5)).mean() < 1e-2
    assert abs(int8.miou - fp32.miou) < 0.5
    assert int8.to_json()["calibration"]["method"] == "kl"


def test_errors_are_clear(tmp_path, capsys):
    assert eval_cli.main(["--checkpoint", str(tmp_path / "nope"), "--no-progress"]) == 2
    assert "does not exist" in capsys.readouterr().err

    # Metadata says full width, variables are a small model: the wrong architecture.
    small = UNetPlusPlus(widths=(4, 8, 16, 32, 64))
    wrong = tmp_path / "wrong"
    checkpoint.save_variables(wrong, init_variables(small),
                              {"model": model_metadata(UNetPlusPlus())})
    assert eval_cli.main(["--checkpoint", str(wrong), "--no-progress"]) == 2
    assert "do not fit" in capsys.readouterr().err

    ok = tmp_path / "ok"
    checkpoint.save_variables(ok, init_variables(small), {"model": model_metadata(small)})
    empty = tmp_path / "empty"
    empty.mkdir()
    assert eval_cli.main(["--checkpoint", str(ok), "--data", str(empty), "--no-progress"]) == 2
    assert str(empty) in capsys.readouterr().err

    not_ckpt = tmp_path / "random_dir"
    not_ckpt.mkdir()
    assert eval_cli.main(["--checkpoint", str(not_ckpt), "--no-progress"]) == 2
    assert "weights_port/convert.py" in capsys.readouterr().err


def test_eval_json_records_the_calibration_it_created_then_reused(tmp_path, capsys):
    small = UNetPlusPlus(widths=(8, 16, 32))
    ckpt = tmp_path / "ckpt"
    checkpoint.save_variables(ckpt, init_variables(small), {"model": model_metadata(small)})
    args = ["--checkpoint", str(ckpt), "--precision", "int8", "--calibration", "max",
            "--calib-images", "4", "--execution", "native", "--no-progress"]
    assert eval_cli.main(args + ["--json", str(tmp_path / "a.json")]) == 0
    assert eval_cli.main(args + ["--json", str(tmp_path / "b.json")]) == 0
    out = capsys.readouterr().out
    assert "calibrated max on 4" in out and "reused the max calibration" in out
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("a.json", "b.json"))
    assert a["execution"] == "native" and a["options"]["execution"] == "native"
    assert a["n_images"] == 134  # no --data: the bundled validation split, as users run it
    ca, cb = a["calibration"], b["calibration"]
    assert (ca["method"], ca["num_images"], ca["reused"], cb["reused"]) == ("max", 4, False, True)
    assert ca["path"] == cb["path"] and Path(ca["path"]).parent == ckpt / "calibration"
    assert ca["created"] == cb["created"] and ca["images_sha256"] == cb["images_sha256"]
    assert a["miou"] == b["miou"]


def test_multiclass_eval_on_a_folder_dataset_reports_pooled_class_iou(tmp_path, capsys,
                                                                       monkeypatch):
    # A 3-class model on your own folder (indexed-class PNG masks), every image scored
    # (--split all): the JSON's class IoUs equal a numpy confusion matrix of the argmax.
    from PIL import Image

    from unetpp_jax.inference import predict_fn

    monkeypatch.setenv("UNETPP_JAX_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    for d in ("images", "masks"):
        (tmp_path / "data" / d).mkdir(parents=True)
    for k in range(3):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(
            tmp_path / "data" / "images" / f"im{k}.png")
        Image.fromarray(rng.integers(0, 3, (32, 32), dtype=np.uint8)).save(
            tmp_path / "data" / "masks" / f"im{k}.png")
    model = UNetPlusPlus(widths=(4, 8), num_classes=3)
    v = init_variables(model, 3)
    ckpt = checkpoint.save_variables(tmp_path / "ckpt", v, {
        "model": model_metadata(model), "input": {"channel_order": "BGR", "size": [32, 32]}})
    out = tmp_path / "e.json"
    assert eval_cli.main(["--checkpoint", str(ckpt), "--data", str(tmp_path / "data"),
                          "--split", "all", "--json", str(out), "--no-progress"]) == 0
    got = json.loads(out.read_text())
    assert got["num_classes"] == 3 and got["n_images"] == 3 and len(got["class_iou"]) == 3
    # independent: argmax of the last head against the PNG labels, confusion counted by hand
    from unetpp_jax.data.folder import load_folder

    split = load_folder(tmp_path / "data", "all", 32)
    x = (split.images.astype(np.float32) / 255 - 0.5) / 0.5
    pred = np.argmax(np.asarray(predict_fn(model)(v, x)[-1]), -1)
    ious = []
    for c in range(3):
        inter = np.sum((pred == c) & (split.masks == c))
        union = np.sum((pred == c) | (split.masks == c))
        ious.append(inter / union)
    np.testing.assert_allclose(got["class_iou"], ious, rtol=1e-9)
    np.testing.assert_allclose(got["miou_classes"], np.mean(ious), rtol=1e-9)
    np.testing.assert_allclose(got["pixel_accuracy"], np.mean(pred == split.masks), rtol=1e-9)
    # int8 natively (int8 x int8 -> int32 convs): the options reach the multi-class path and
    # the JSON; its class metrics agree with the emulated int8 (the same grids).
    base = ["--checkpoint", str(ckpt), "--data", str(tmp_path / "data"), "--split", "all",
            "--precision", "int8", "--calibration", "max", "--calib-images", "2", "--no-progress"]
    runs = {}
    for execution in ("emulated", "native"):
        out = tmp_path / f"{execution}.json"
        assert eval_cli.main(base + ["--execution", execution, "--json", str(out)]) == 0
        runs[execution] = json.loads(out.read_text())
        assert runs[execution]["options"]["execution"] == execution
    np.testing.assert_allclose(runs["native"]["class_iou"], runs["emulated"]["class_iou"],
                               atol=0.01)
    # What the multi-class path does not do is refused, not silently ignored.
    capsys.readouterr()
    assert eval_cli.main(base + ["--sensitivity"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--sensitivity" in err and "3 classes" in err
