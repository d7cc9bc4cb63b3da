"""Prediction: the library (``unetpp_jax.predict``) and the command line (experiments/predict.py):
relative paths and default outputs, every bad input, image formats, --native shapes, stem
collisions, multi-class masks. A tiny checkpoint (depth 2) keeps the compiles short; one test
checks the bundled model against evaluation's prediction."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from experiments import predict as cli


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Checkpoints of a depth-2 UNet++: one class (input size 32) and three classes."""
    from unetpp_jax import checkpoint
    from unetpp_jax.model import UNetPlusPlus, init_variables
    from unetpp_jax.pretrained import model_description

    root = tmp_path_factory.mktemp("ckpt")
    out = {}
    for name, classes in (("one", 1), ("three", 3)):
        model = UNetPlusPlus(num_classes=classes, widths=(4, 8, 8))
        meta = {"model": model_description(model),
                "input": {"channel_order": "BGR", "mean": [0.5] * 3, "std": [0.5] * 3,
                          "size": [32, 32]}}
        out[name] = str(checkpoint.save_variables(root / name, init_variables(model, 1), meta))
    return out


def _images(root: Path) -> dict[str, tuple[int, int]]:
    """Inputs of every kind; returns file -> (H, W)."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    made = {}
    Image.fromarray(rng.integers(0, 256, (20, 30), dtype=np.uint8)).save(root / "grey.png")
    made["grey.png"] = (20, 30)
    Image.fromarray(rng.integers(0, 65535, (17, 40), dtype=np.uint16)).save(root / "g16.png")
    made["g16.png"] = (17, 40)
    Image.fromarray(rng.integers(0, 256, (33, 21, 4), dtype=np.uint8), "RGBA").save(root / "rgba.png")
    made["rgba.png"] = (33, 21)
    Image.fromarray(rng.integers(0, 256, (24, 36, 3), dtype=np.uint8)).save(root / "photo.jpg")
    made["photo.jpg"] = (24, 36)
    Image.fromarray(rng.integers(0, 256, (45, 19, 3), dtype=np.uint8)).save(root / "scan.tif")
    made["scan.tif"] = (45, 19)
    return made


def _run(argv, capsys):
    rc = cli.main(argv + ["--no-progress"])
    return rc, capsys.readouterr()


def test_cli_relative_paths_default_outputs_and_formats(tmp_path, monkeypatch, capsys, tiny):
    monkeypatch.chdir(tmp_path)
    made = _images(Path("in"))
    (Path("in") / "notes.txt").write_text("not an image, skipped in folders")
    rc, cap = _run(["in", "--checkpoint", tiny["one"], "--probabilities"], capsys)
    assert rc == 0, cap.err
    out = Path("predictions")
    for name, (h, w) in made.items():
        stem = Path(name).stem
        mask = np.asarray(Image.open(out / "masks" / f"{stem}.png"))
        assert mask.shape == (h, w) and set(np.unique(mask)) <= {0, 255}
        probs = np.load(out / "probabilities" / f"{stem}.npy")
        assert probs.shape == (h, w) and probs.dtype == np.float32
        np.testing.assert_array_equal(mask == 255, probs >= 0.5)
        assert Image.open(out / "overlays" / f"{stem}.png").mode == "RGB"
    assert "5 images in" in cap.out and "images/s" in cap.out
    rows = (out / "index.tsv").read_text().splitlines()
    assert len(rows) == 6 and rows[0].startswith("input")
    # No temporary files left behind.
    assert not [p for p in out.rglob(".*")]


def test_cli_native_shapes_and_multiclass(tmp_path, monkeypatch, capsys, tiny):
    monkeypatch.chdir(tmp_path)
    made = _images(Path("in"))
    rc, cap = _run(["in/*.png", "in/scan.tif", "-o", "o", "--native", "--checkpoint",
                    tiny["three"], "--probabilities", "--head", "1"], capsys)
    assert rc == 0, cap.err
    for name in ("grey.png", "g16.png", "rgba.png", "scan.tif"):
        h, w = made[name]
        stem = Path(name).stem
        mask = np.asarray(Image.open(Path("o/masks") / f"{stem}.png"))
        assert mask.shape == (h, w) and mask.max() <= 2
        probs = np.load(Path("o/probabilities") / f"{stem}.npy")
        assert probs.shape == (h, w, 3)
        np.testing.assert_allclose(probs.sum(-1), 1, atol=1e-5)
        np.testing.assert_array_equal(mask, probs.argmax(-1))
    assert not Path("o/masks/photo.png").exists()
    rc, cap = _run(["in/grey.png", "-o", "o", "--checkpoint", tiny["three"], "--head", "7"],
                   capsys)
    assert rc == 2 and "--head 7" in cap.err


def test_stem_collisions_get_folder_prefixes(tmp_path, monkeypatch, capsys, tiny):
    monkeypatch.chdir(tmp_path)
    for d in ("a", "b"):
        Path(d).mkdir()
        Image.fromarray(np.zeros((16, 16), np.uint8)).save(Path(d) / "x.png")
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(Path("a") / "x.jpg")
    rc, cap = _run(["a", "b", "a/x.png", "-o", "o", "--checkpoint", tiny["one"]], capsys)
    assert rc == 0, cap.err
    assert sorted(p.name for p in Path("o/masks").iterdir()) == [
        "a__x_jpg.png", "a__x_png.png", "b__x.png"]
    names = cli.output_names([Path("/p/a/x.png"), Path("/p/b/x.png"), Path("/q/x.png"),
                              Path("/r/y.png"), Path("/r/a__x.png")])
    assert len(set(names)) == 5 and names[3] == "y"


@pytest.mark.parametrize("case", ["missing", "truncated", "not_image", "empty_file",
                                  "empty_folder", "glob", "too_small", "out_is_file"])
def test_bad_input_one_line_exit_2_nothing_written(tmp_path, monkeypatch, capsys, tiny, case):
    monkeypatch.chdir(tmp_path)
    good = Path("good.png")
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(good)
    out = "o"
    if case == "missing":
        arg, expect = "nope.png", "nope.png: no such file or folder"
    elif case == "truncated":
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
                        ).save("cut.png")
        data = Path("cut.png").read_bytes()
        Path("cut.png").write_bytes(data[: len(data) // 2])
        arg, expect = "cut.png", "cut.png: truncated"
    elif case == "not_image":
        Path("fake.png").write_text("hello")
        arg, expect = "fake.png", "fake.png: not an image"
    elif case == "empty_file":
        Path("zero.png").write_bytes(b"")
        arg, expect = "zero.png", "zero.png: the file is empty"
    elif case == "empty_folder":
        Path("nothing").mkdir()
        arg, expect = "nothing", "nothing: the folder holds no image files"
    elif case == "glob":
        arg, expect = "*.tif", "*.tif: the glob matches no image file"
    elif case == "too_small":
        Image.fromarray(np.zeros((3, 40), np.uint8)).save("thin.png")
        arg, expect = "thin.png", "thin.png: image too small (40x3); each side must be at least 4"
    else:
        Path("o").write_text("a file")
        arg, expect = "good.png", "o: exists and is not a folder"
    rc, cap = _run([str(good), arg, "-o", out, "--checkpoint", tiny["one"]], capsys)
    assert rc == 2
    lines = cap.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expect in lines[0], cap.err
    if case != "out_is_file":
        assert not Path(out).exists()  # checked before anything is written


def test_library_on_numpy_arrays(tiny):
    import unetpp_jax
    from unetpp_jax.pretrained import load_checkpoint

    ck = load_checkpoint(tiny["three"])
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (20, 30, 3), dtype=np.uint8),
              rng.integers(0, 65535, (17, 17), dtype=np.uint16)]
    out = unetpp_jax.predict(images, ck.model, ck.variables, input_spec=ck.input_spec)
    assert [m.shape for m in out.masks] == [(20, 30), (17, 17)]
    assert [p.shape for p in out.probabilities] == [(20, 30, 3), (17, 17, 3)]
    # uint16 = its high byte; RGB order = the BGR image reversed (same batch shape: same program).
    def one(im, **kw):
        return unetpp_jax.predict(im, ck.model, ck.variables, input_spec=ck.input_spec, **kw)

    np.testing.assert_array_equal(one((images[1] >> 8).astype(np.uint8)).probabilities, one(images[1]).probabilities)
    np.testing.assert_array_equal(one(images[0][..., ::-1], channel_order="RGB").probabilities,
                                  one(images[0]).probabilities)
    stack = unetpp_jax.predict(np.stack([images[0]] * 2), ck.model, ck.variables, native=True)
    assert stack.masks.shape == (2, 20, 30) and stack.probabilities.shape == (2, 20, 30, 3)
    with pytest.raises(ValueError, match="too small"):
        unetpp_jax.predict(np.zeros((2, 9), np.uint8), ck.model, ck.variables)
    with pytest.raises(ValueError, match="float"):
        unetpp_jax.predict(np.zeros((9, 9), np.float32), ck.model, ck.variables)
    from unetpp_jax.predict import predict as fn

    assert unetpp_jax.predict is sys.modules["unetpp_jax.predict"] and callable(fn)


def test_import_stays_light():
    code = "import sys, unetpp_jax; assert 'jax' not in sys.modules; print('ok')"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "ok"


def test_bundled_model_masks_equal_evaluation(bundled):
    from unetpp_jax.data.pipeline import load_split
    from unetpp_jax.evaluate import predict_split
    import unetpp_jax

    val = load_split().take([0, 1])
    out = unetpp_jax.predict(val.images, batch_size=2)
    ref = predict_split(bundled.model, bundled.variables, val.images, batch_size=2)[-1]
    np.testing.assert_array_equal(out.masks, (ref >= 0.5).astype(np.uint8))
