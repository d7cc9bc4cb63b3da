"""DSB2018 data: OpenCV-exact preprocessing, UNET-ZOO split, TFDS builder, folders, batches.

Real-data tests read ``../shared/data/dsb2018/stage1_train`` (670 Kaggle images) and are skipped,
with a message, when it is absent. OpenCV appears only here, as the reference implementation.
"""

from __future__ import annotations

import glob

import os
import shutil
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from unetpp_jax.data import pipeline
from unetpp_jax.data.preprocess import (
    PreprocessError,
    Stage1Train,
    encode_png,
    image_bgr_from_png,
    preprocess_example,
    read_image_bgr,
    resize_linear,
    resize_linear_uint8,
)
from unetpp_jax.data.split import FIRST_VAL_ID_PREFIX, split_ids

DATA = Path(__file__).resolve().parents[1].parent / "shared/data/dsb2018/stage1_train"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"DSB2018 stage1_train not found at {DATA}; "
                                "real-data tests need ../shared/data (see the README, section Data)")


def _cv2():
    return pytest.importorskip("cv2", reason="opencv-python-headless (test extra) is not installed")


@pytest.fixture(autouse=True, scope="module")
def _quiet_tfds():
    import tensorflow_datasets as tfds

    tfds.disable_progress_bar()


def _reference_preprocess(cv2, image_id: str, sizes):
    """pytorch-nested-unet's preprocess_dsb2018.py for one image, restated with OpenCV."""
    img = cv2.imread(str(DATA / image_id / "images" / f"{image_id}.png"))
    mask = np.zeros(img.shape[:2])
    for p in sorted(glob.glob(str(DATA / image_id / "masks" / "*"))):
        mask = np.maximum(mask, cv2.imread(p, cv2.IMREAD_GRAYSCALE) > 127)
    return {s: (cv2.resize(img, (s, s)), (cv2.resize(mask, (s, s)) * 255).astype("uint8")) for s in sizes}


def _ids_of_every_size() -> list[str]:
    """One id per image size (the one with the fewest masks, to keep the test quick)."""
    best: dict[tuple[int, int], tuple[int, str]] = {}
    for image_id in sorted(os.listdir(DATA)):
        with Image.open(DATA / image_id / "images" / f"{image_id}.png") as im:
            n_masks = len(os.listdir(DATA / image_id / "masks"))
            best[im.size] = min(best.get(im.size, (n_masks, image_id)), (n_masks, image_id))
    return [image_id for _, image_id in best.values()]


def _small_stage1(tmp_path: Path, n: int = 12) -> Path:
    """A stage1_train of the first n real ids (symlinks; nothing is copied)."""
    root = tmp_path / "stage1_train"
    root.mkdir()
    for image_id in sorted(os.listdir(DATA))[:n]:
        (root / image_id).symlink_to(DATA / image_id)
    return root


def _fake_stage1(tmp_path: Path, n: int = 5, hw=(20, 30)) -> Path:
    """A synthetic stage1_train: RGBA images, 2 instance masks each."""
    rng = np.random.default_rng(0)
    root = tmp_path / "fake_stage1_train"
    for k in range(n):
        image_id = f"{k:064x}"
        (root / image_id / "images").mkdir(parents=True)
        (root / image_id / "masks").mkdir()
        Image.fromarray(rng.integers(0, 256, (*hw, 4), dtype=np.uint8)).save(root / image_id / "images" / f"{image_id}.png")
        for m in range(2):
            mask = np.zeros(hw, np.uint8)
            mask[2 + 5 * m: 8 + 5 * m, 3:12] = 255
            Image.fromarray(mask).save(root / image_id / "masks" / f"m{m}.png")
    return root


def _zip_folder(folder: Path, zip_path: Path, prefix: str = "") -> Path:
    with zipfile.ZipFile(zip_path, "w", zipfile.ZIP_STORED) as zf:
        for dirpath, _, files in sorted(os.walk(folder, followlinks=True)):
            for f in sorted(files):
                p = Path(dirpath) / f
                zf.write(p, prefix + p.relative_to(folder).as_posix())
    return zip_path


# ---------------------------------------------------------------------------------------------
# Resize: hand-computed cases and OpenCV on synthetic arrays


def test_resize_linear_half_pixel_centres_and_edge_clamp():
    # 1x2 -> 1x4: samples at x = -0.25, 0.25, 0.75, 1.25 -> clamp, 1/4, 3/4, clamp.
    np.testing.assert_array_equal(resize_linear(np.array([[0.0, 4.0]]), (1, 4)), [[0, 1, 3, 4]])
    # 3 rows -> 6 rows, values 0, 6, 12: rows at y = -0.25, 0.25, 0.75, 1.25, 1.75, 2.25.
    col = resize_linear(np.array([[0.0], [6.0], [12.0]]), (6, 1))[:, 0]
    np.testing.assert_allclose(col, [0, 1.5, 4.5, 7.5, 10.5, 12])


def test_resize_linear_does_not_antialias():
    # 6 -> 2 samples at x = 1.0 and 4.0 exactly: the spike at x = 2 is not seen (an area or
    # antialiased filter would smear it into the first output pixel).
    out = resize_linear(np.array([[0.0, 0.0, 9.0, 0.0, 0.0, 0.0]]), (1, 2))
    np.testing.assert_array_equal(out, [[0.0, 0.0]])


def test_resize_same_size_is_a_copy_and_shapes():
    x = np.arange(12, dtype=np.uint8).reshape(3, 4)
    np.testing.assert_array_equal(resize_linear(x, (3, 4)), x)
    assert resize_linear(np.zeros((5, 7, 3)), 4).shape == (4, 4, 3)
    assert resize_linear_uint8(np.zeros((5, 7), np.uint8), (2, 9)).shape == (2, 9)
    with pytest.raises(ValueError, match="uint8"):
        resize_linear_uint8(np.zeros((4, 4)), 2)


@pytest.mark.parametrize("src, dst", [((7, 13), (20, 5)), ((256, 320), (96, 96)), ((5, 5), (96, 96)),
                                      ((603, 1272), (256, 256)), ((64, 64), (32, 32))])
def test_resize_matches_opencv_on_random_arrays(src, dst):
    cv2 = _cv2()
    rng = np.random.default_rng(sum(src) + sum(dst))
    x64 = rng.random(src)  # float64: bit-identical to OpenCV 5.0; 4.10 may differ in the last bit
    ref64 = cv2.resize(x64, dst[::-1], interpolation=cv2.INTER_LINEAR)
    np.testing.assert_allclose(resize_linear(x64, dst), ref64, rtol=0, atol=1e-12)
    x8 = rng.integers(0, 256, (*src, 3), dtype=np.uint8)
    ref = cv2.resize(x8, dst[::-1], interpolation=cv2.INTER_LINEAR).astype(int)
    ours = resize_linear_uint8(x8, dst).astype(int)
    assert np.abs(ours - ref).max() <= 1
    assert np.mean(ours == ref) > 0.999, "the fixed-point restatement should match OpenCV's SIMD path"
    # The rounded float resize is the fallback notion of "OpenCV INTER_LINEAR": within 1 level.
    assert np.abs(np.floor(resize_linear(x8, dst) + 0.5) - ref).max() <= 1


def test_rgba_alpha_is_dropped_not_composited_and_grey_is_replicated(tmp_path):
    cv2 = _cv2()
    rng = np.random.default_rng(1)
    rgba = rng.integers(0, 256, (9, 11, 4), dtype=np.uint8)
    rgba[..., 3] = 0  # fully transparent: compositing would change every pixel
    Image.fromarray(rgba).save(tmp_path / "a.png")
    bgr = read_image_bgr(tmp_path / "a.png")
    np.testing.assert_array_equal(bgr, rgba[..., 2::-1])
    np.testing.assert_array_equal(bgr, cv2.imread(str(tmp_path / "a.png")))
    grey = rng.integers(0, 256, (9, 11), dtype=np.uint8)
    Image.fromarray(grey).save(tmp_path / "g.png")
    np.testing.assert_array_equal(read_image_bgr(tmp_path / "g.png"), cv2.imread(str(tmp_path / "g.png")))


def test_encode_png_bgr_round_trips_like_cv2_imwrite(tmp_path):
    cv2 = _cv2()
    bgr = np.random.default_rng(2).integers(0, 256, (6, 5, 3), dtype=np.uint8)
    (tmp_path / "x.png").write_bytes(encode_png(bgr, bgr=True))
    np.testing.assert_array_equal(image_bgr_from_png(encode_png(bgr, bgr=True)), bgr)
    np.testing.assert_array_equal(cv2.imread(str(tmp_path / "x.png")), bgr)
    cv2.imwrite(str(tmp_path / "y.png"), bgr)
    np.testing.assert_array_equal(read_image_bgr(tmp_path / "y.png"), bgr)


# ---------------------------------------------------------------------------------------------
# Split rule


def test_split_rule_on_synthetic_ids():
    ids = [f"{i:03d}" for i in range(10)]
    train, val = split_ids(reversed(ids))  # input order does not matter
    perm = np.random.RandomState(41).permutation(10)
    assert val == [ids[i] for i in perm[:2]] and train == [ids[i] for i in perm[2:]]
    assert split_ids(ids) == (train, val)
    with pytest.raises(ValueError, match="duplicate"):
        split_ids(["a", "a", "b"])


@needs_data
def test_split_on_real_ids():
    ids = sorted(os.listdir(DATA))
    assert len(ids) == 670
    train, val = split_ids(ids)
    assert (len(train), len(val)) == (536, 134)
    assert val[0].startswith(FIRST_VAL_ID_PREFIX)
    assert sorted(train + val) == ids


# ---------------------------------------------------------------------------------------------
# Preprocessing against OpenCV on real images


@needs_data
def test_preprocess_matches_opencv_reference_on_real_images():
    cv2 = _cv2()
    ids = _ids_of_every_size()  # all 9 sizes, 256x256 to 1040x1388
    assert len(ids) == 9
    raw = Stage1Train(DATA)
    exact = []
    for image_id in ids:
        ref = _reference_preprocess(cv2, image_id, (96, 256))
        masks = sorted(glob.glob(str(DATA / image_id / "masks" / "*.png")))
        ours = {96: preprocess_example(DATA / image_id / "images" / f"{image_id}.png", masks, 96),
                256: raw.preprocess(image_id, 256)}
        for size, (img, mask) in ours.items():
            ref_img, ref_mask = ref[size]
            assert img.shape == (size, size, 3) and img.dtype == np.uint8 and mask.shape == (size, size)
            np.testing.assert_array_equal(mask, ref_mask, err_msg=f"soft mask of {image_id} at {size}")
            diff = np.abs(img.astype(int) - ref_img)
            assert diff.max() <= 1, f"image {image_id} at {size}"
            exact.append(np.mean(diff == 0))
    # Measured: identical on all 670 images at both sizes; the contract is "within 1 level".
    assert np.mean(exact) > 0.999
    assert np.count_nonzero((mask > 0) & (mask < 255)) > 0, "resized masks have soft edges"


# ---------------------------------------------------------------------------------------------
# Raw source errors


def test_bad_raw_inputs_name_the_file_and_the_problem(tmp_path):
    with pytest.raises(PreprocessError, match=r"nowhere.*no such file or folder.*stage1_train\.zip"):
        Stage1Train(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PreprocessError, match=r"empty.*holds no <id>/images/<id>\.png"):
        Stage1Train(tmp_path / "empty")

    root = _fake_stage1(tmp_path)
    ids = sorted(os.listdir(root))
    shutil.rmtree(root / ids[1] / "masks")
    with pytest.raises(PreprocessError, match=rf"{ids[1]}/masks: missing.*no masks folder"):
        Stage1Train(root)

    root2 = _fake_stage1(tmp_path / "b")
    bad = root2 / ids[2] / "images" / f"{ids[2]}.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    raw = Stage1Train(root2)
    with pytest.raises(PreprocessError, match=rf"{ids[2]}\.png: not a readable PNG"):
        raw.preprocess(ids[2], 8)

    not_stage1 = tmp_path / "other.zip"
    with zipfile.ZipFile(not_stage1, "w") as zf:
        zf.writestr("readme.txt", "hello")
        zf.writestr("train/cat.png", encode_png(np.zeros((2, 2), np.uint8)))
    with pytest.raises(PreprocessError, match=r"other\.zip: this zip is not stage1_train"):
        Stage1Train(not_stage1)
    (tmp_path / "junk.zip").write_bytes(b"not a zip")
    with pytest.raises(PreprocessError, match=r"junk\.zip: not a readable zip"):
        Stage1Train(tmp_path / "junk.zip")


def test_zip_and_folder_give_the_same_examples(tmp_path):
    root = _fake_stage1(tmp_path)
    for prefix in ("", "stage1_train/"):
        z = _zip_folder(root, tmp_path / f"s{len(prefix)}.zip", prefix)
        with Stage1Train(z) as from_zip:
            raw = Stage1Train(root)
            assert from_zip.ids == raw.ids
            for image_id in raw.ids:
                for a, b in zip(from_zip.preprocess(image_id, 12), raw.preprocess(image_id, 12)):
                    np.testing.assert_array_equal(a, b)
    # A folder that contains stage1_train.zip (TFDS's manual folder) is accepted too.
    manual = tmp_path / "manual"
    manual.mkdir()
    _zip_folder(root, manual / "stage1_train.zip")
    assert Stage1Train(manual).ids == Stage1Train(root).ids


# ---------------------------------------------------------------------------------------------
# TFDS builder


def _records(data_dir, split, size=96):
    """Parsed tf.Example records of a split, re-serialized deterministically (sorted map keys)."""
    from array_record.python.array_record_module import ArrayRecordReader
    from tensorflow_datasets.proto import tf_example_pb2

    out = []
    for f in sorted(glob.glob(str(Path(data_dir) / "dsb2018" / str(size) / "1.0.0" / f"dsb2018-{split}.array_record-*"))):
        for rec in ArrayRecordReader(f).read_all():
            ex = tf_example_pb2.Example()
            ex.ParseFromString(rec)
            out.append(ex.SerializeToString(deterministic=True))
    return out


@needs_data
def test_tfds_build_small_subset_twice_and_from_zip(tmp_path):
    import tensorflow_datasets as tfds

    from unetpp_jax.data.dsb2018 import build

    root = _small_stage1(tmp_path)
    build(root, tmp_path / "a")
    build(root, tmp_path / "b")
    build(_zip_folder(root, tmp_path / "stage1_train.zip", "stage1_train/"), tmp_path / "c")
    for split, n in (("train", 9), ("validation", 3)):
        a, b, c = (_records(tmp_path / d, split) for d in "abc")
        assert len(a) == n
        # Identical records (the files' bytes are not: protobuf writes map entries in any order).
        assert a == b == c
    assert not (tmp_path / "a" / "downloads").exists()

    source = tfds.data_source("dsb2018/96", data_dir=os.fspath(tmp_path / "a"), split="validation")
    rec = source[0]
    assert rec["image"].shape == (96, 96, 3) and rec["mask"].shape == (96, 96, 1)
    from_tfds = pipeline.load_tfds_split(tmp_path / "a", "validation")
    from_raw = pipeline.load_split(root, "validation", progress=False)
    assert from_tfds.ids == from_raw.ids == split_ids(os.listdir(root))[1]
    np.testing.assert_array_equal(from_tfds.images, from_raw.images)  # BGR both
    np.testing.assert_array_equal(from_tfds.masks, from_raw.masks)
    np.testing.assert_array_equal(rec["image"], from_raw.images[0][..., ::-1])  # stored as RGB

    # Readers (what each process of a multi-host training uses) fetch only the rows asked for.
    class Counting:
        def __init__(self, inner):
            self.inner, self.keys = inner, []

        def __len__(self):
            return len(self.inner)

        def __getitems__(self, keys):
            self.keys += list(keys)
            return self.inner.__getitems__(keys)

    reader = pipeline.open_tfds_split(tmp_path / "a", "validation")
    counting = Counting(reader.source)
    part = type(reader)(counting, reader.size).read(1, 3)
    assert counting.keys == [1, 2] and part.ids == from_raw.ids[1:3]
    np.testing.assert_array_equal(part.images, from_raw.images[1:3])
    preprocessed = []
    real = pipeline.Stage1Train.preprocess
    try:
        pipeline.Stage1Train.preprocess = lambda self, i, size: preprocessed.append(i) or real(self, i, size)
        raw_reader = pipeline.open_split(root, "validation", progress=False)
        assert preprocessed == [] and len(raw_reader) == 3
        raw_part = raw_reader.read(2, 3)
    finally:
        pipeline.Stage1Train.preprocess = real
    assert preprocessed == from_raw.ids[2:3] == raw_part.ids
    np.testing.assert_array_equal(raw_part.masks, from_raw.masks[2:3])


def test_tfds_build_failure_leaves_nothing_behind(tmp_path):
    from unetpp_jax.data.dsb2018 import build

    root = _fake_stage1(tmp_path)
    ids = sorted(os.listdir(root))
    (root / ids[-1] / "masks" / "m1.png").write_bytes(b"\x89PNG truncated")
    data_dir = tmp_path / "tfds"
    data_dir.mkdir()
    with pytest.raises(PreprocessError, match=rf"{ids[-1]}/masks/m1\.png: not a readable PNG"):
        build(root, data_dir)
    assert list(data_dir.iterdir()) == []
    with pytest.raises(FileNotFoundError, match="not built"):
        pipeline.load_tfds_split(data_dir)


def test_build_data_cli_prints_timings(tmp_path, capsys):
    from experiments import build_data

    build_data.main(["--source", str(_fake_stage1(tmp_path)), "--data-dir", str(tmp_path / "d")])
    out = capsys.readouterr().out
    assert "build: dsb2018/96" in out and "5 examples" in out
    assert "read: validation split, 1 images (96, 96, 3)" in out


@pytest.fixture(scope="module")
def full_build(tmp_path_factory):
    """dsb2018/96 built from all 670 raw images (the slowest thing here: ~30 s on 2 busy cores)."""
    if not DATA.is_dir():
        pytest.skip(f"DSB2018 stage1_train not found at {DATA}")
    from unetpp_jax.data.dsb2018 import build

    data_dir = tmp_path_factory.mktemp("tfds_full")
    t0 = time.perf_counter()
    build(DATA, data_dir)
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    val = pipeline.load_tfds_split(data_dir, "validation")
    read_s = time.perf_counter() - t0
    print(f"\nfull dsb2018/96 build: {build_s:.1f} s; validation read: {read_s:.3f} s")
    return data_dir, val, build_s, read_s


def test_full_build_is_fast_and_has_the_reference_split(full_build):
    data_dir, val, build_s, read_s = full_build
    # Build and read times are reported (printed above; docs/data.md has measured ones), not
    # asserted: on a shared machine a timed test fails for reasons that are not the code's.
    train = pipeline.load_tfds_split(data_dir, "train")
    ids = sorted(os.listdir(DATA))
    assert (len(train), len(val)) == (536, 134)
    assert (train.ids, val.ids) == split_ids(ids)
    assert val.ids[0].startswith(FIRST_VAL_ID_PREFIX)


def test_bundled_split_equals_preprocessing_the_raw_data(full_build):
    _, val, _, _ = full_build
    bundled = pipeline.load_split()
    assert bundled.ids == val.ids
    np.testing.assert_array_equal(bundled.images, val.images)
    np.testing.assert_array_equal(bundled.masks, val.masks)


def test_first_validation_batch_from_real_data(full_build):
    _, val, _, _ = full_build
    batch = next(pipeline.batches(val, 8, shuffle=False))
    assert batch["image"].shape == (8, 96, 96, 3) and batch["image"].dtype == np.float32
    assert batch["mask"].shape == (8, 96, 96, 1) and batch["mask"].dtype == np.float32
    assert -1.0 <= batch["image"].min() < 0 < batch["image"].max() <= 1.0
    assert batch["mask"].min() == 0.0 and batch["mask"].max() == 1.0
    soft = batch["mask"][(batch["mask"] > 0) & (batch["mask"] < 1)]
    assert soft.size > 0, "UNET-ZOO's masks have soft (resized) edges"
    np.testing.assert_array_equal(batch["image"][0], pipeline.normalize(val.images[0]))


# ---------------------------------------------------------------------------------------------
# Bundled split and preprocessed folders


def test_bundled_split_layout_and_cv2_reads_the_same_bgr():
    cv2 = _cv2()
    split = pipeline.load_split()
    assert split.images.shape == (134, 96, 96, 3) and split.images.dtype == np.uint8
    assert split.masks.shape == (134, 96, 96) and split.masks.dtype == np.uint8
    assert split.ids[0].startswith(FIRST_VAL_ID_PREFIX) and len(set(split.ids)) == 134
    folder = pipeline.bundled_path()
    assert (folder / "PROVENANCE.md").is_file()
    first = split.ids[0]
    np.testing.assert_array_equal(cv2.imread(str(folder / "images" / f"{first}.png")), split.images[0])
    np.testing.assert_array_equal(cv2.imread(str(folder / "masks" / "0" / f"{first}.png"), cv2.IMREAD_GRAYSCALE),
                                  split.masks[0])
    with pytest.raises(ValueError, match="validation split only"):
        pipeline.load_split(split="train")
    with pytest.raises(ValueError, match="96x96"):
        pipeline.load_split(size=256)


def test_folder_of_the_validation_ids_in_both_layouts(tmp_path):
    split = pipeline.load_split()
    pipeline.write_folder(split, tmp_path / "new", compress_level=1)
    old = tmp_path / "old"  # older layout: masks/<id>.png
    shutil.copytree(tmp_path / "new" / "images", old / "images")
    shutil.copytree(tmp_path / "new" / "masks" / "0", old / "masks")
    for folder in (tmp_path / "new", old):
        got = pipeline.load_split(folder)
        assert got.ids == split.ids  # reference order, from the bundled manifest
        np.testing.assert_array_equal(got.images, split.images)
        np.testing.assert_array_equal(got.masks, split.masks)
    with pytest.raises(ValueError, match="only the 134 validation images"):
        pipeline.load_split(old, "train")
    with pytest.raises(PreprocessError, match="size=256"):
        pipeline.load_split(old, size=256)


def test_folder_split_rule_and_errors(tmp_path):
    rng = np.random.default_rng(3)
    ids = [f"{i:064x}" for i in range(10)]
    split = pipeline.Split(rng.integers(0, 256, (10, 8, 8, 3), dtype=np.uint8),
                           rng.integers(0, 256, (10, 8, 8), dtype=np.uint8), ids)
    pipeline.write_folder(split, tmp_path / "f")
    with pytest.warns(UserWarning, match="holds 10 images, not the 670"):
        val = pipeline.load_split(tmp_path / "f", "validation", size=8)
    assert val.ids == split_ids(ids)[1]
    np.testing.assert_array_equal(val.images, split.take([ids.index(i) for i in val.ids]).images)

    with pytest.raises(FileExistsError):
        pipeline.write_folder(split, tmp_path / "f")
    with pytest.raises(FileNotFoundError, match="nowhere: no such file or folder"):
        pipeline.load_split(tmp_path / "nowhere")
    bad_id = split_ids(ids)[0][0]
    (tmp_path / "f" / "images" / f"{bad_id}.png").write_bytes(b"corrupt")
    with pytest.warns(UserWarning), pytest.raises(PreprocessError, match=rf"images/{bad_id}\.png: not a readable PNG"):
        pipeline.load_split(tmp_path / "f", "train", size=8)
    shutil.rmtree(tmp_path / "f" / "masks")
    with pytest.raises(PreprocessError, match=r"f/masks: missing"):
        pipeline.load_split(tmp_path / "f", size=8)
    (tmp_path / "e" / "images").mkdir(parents=True)
    (tmp_path / "e" / "masks").mkdir()
    with pytest.raises(PreprocessError, match="holds no .png images"):
        pipeline.load_split(tmp_path / "e")


# ---------------------------------------------------------------------------------------------
# Batches


def _toy_split(n=10, s=4) -> pipeline.Split:
    rng = np.random.default_rng(4)
    images = rng.integers(0, 256, (n, s, s, 3), dtype=np.uint8)
    return pipeline.Split(images, images[..., 0].copy(), [str(i) for i in range(n)])


def test_normalize_values():
    x = np.array([0, 255, 128, 51], np.uint8)
    np.testing.assert_allclose(pipeline.normalize(x), [-1.0, 1.0, 0.003921628, -0.6], rtol=0, atol=1e-6)
    assert pipeline.normalize(x).dtype == np.float32
    # BGR in, BGR out: no channel swap.
    np.testing.assert_array_equal(pipeline.normalize(np.array([[[0, 255, 0]]], np.uint8)), [[[-1, 1, -1]]])


def test_batches_order_is_a_function_of_seed_and_epoch():
    split = _toy_split()

    def ids(**kw):
        return [i for b in pipeline.batches(split, 3, **kw) for i in np.round((b["mask"][:, 0, 0, 0] * 255)).astype(int)]

    first = split.masks[:, 0, 0].astype(int)
    unshuffled = ids(shuffle=False, drop_remainder=False)
    assert unshuffled == list(first)  # UNET-ZOO's fixed order
    e0, e0_again, e1 = ids(seed=0, epoch=0), ids(seed=0, epoch=0), ids(seed=0, epoch=1)
    assert e0 == e0_again and e0 != e1 and len(e0) == 9  # 10 // 3 * 3, remainder dropped
    assert ids(seed=1, epoch=0) != e0
    assert sorted(ids(seed=0, epoch=0, drop_remainder=False)) == sorted(first)
    sizes = [b["image"].shape[0] for b in pipeline.batches(split, 3, drop_remainder=False)]
    assert sizes == [3, 3, 3, 1] and pipeline.num_batches(10, 3, drop_remainder=False) == 4


def test_augmentation_is_the_same_on_image_and_mask_and_deterministic():
    split = _toy_split(n=16)
    a = list(pipeline.batches(split, 4, seed=5, epoch=2, augment=True))
    b = list(pipeline.batches(split, 4, seed=5, epoch=2, augment=True))
    plain = list(pipeline.batches(split, 4, seed=5, epoch=2, augment=False))
    for x, y, p in zip(a, b, plain):
        np.testing.assert_array_equal(x["image"], y["image"])
        # mask = channel 0 (B) of the uint8 image, so the same transform keeps them consistent.
        np.testing.assert_allclose(x["mask"][..., 0], (x["image"][..., 0] * 0.5 + 0.5), atol=1e-6)
        for img_aug, img in zip(x["image"], p["image"]):  # each is one of the 8 symmetries
            variants = [np.rot90(img, k, axes=(0, 1)) for k in range(4)]
            variants += [v[:, ::-1] for v in variants]
            assert any(np.array_equal(img_aug, v) for v in variants)
    changed = sum(not np.array_equal(x["image"], p["image"]) for x, p in zip(a, plain))
    assert changed >= 3
