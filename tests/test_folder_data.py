"""Your own data (data/folder.py): layouts, binary vs class masks, splits, the cache, the
precedence against DSB2018's preprocessed folders, and the image reader's formats.

Real-data tests read ``../shared/data/dsb2018/stage1_train`` and are skipped, with a message,
when it is absent.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from unetpp_jax.data import cache, folder, pipeline
from unetpp_jax.data.classes import ClassSplit
from unetpp_jax.data.folder import FolderError, load_folder, recognizes, select_ids
from unetpp_jax.data.preprocess import resize_linear, resize_linear_uint8
from unetpp_jax.data.registry import load_dataset

DATA = Path(__file__).resolve().parents[1].parent / "shared/data/dsb2018/stage1_train"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"DSB2018 stage1_train not found at "
                                f"{DATA}; real-data tests need ../shared/data")


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(cache.ENV, str(tmp_path / "cache"))


def _rng(seed=0):
    return np.random.default_rng(seed)


def _write(path: Path, arr, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, **kw)


def _binary_folder(root: Path, n=6):
    """Images of mixed sizes and formats; masks 0/255 for even ids, 0/1 for odd ones."""
    rng = _rng()
    shapes = [(20, 30), (33, 17), (24, 24), (40, 50), (16, 64), (30, 30)]
    for k in range(n):
        h, w = shapes[k % len(shapes)]
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        fg = np.zeros((h, w), bool)
        fg[h // 4: 3 * h // 4, w // 4: 3 * w // 4] = True
        ext = ".jpg" if k == 1 else ".png"
        _write(root / "images" / f"img{k}{ext}", image)
        _write(root / "masks" / f"img{k}.png", (fg * (255 if k % 2 == 0 else 1)).astype(np.uint8))
    return root


def test_binary_flat_folder_matches_dsb_preprocessing(tmp_path):
    root = _binary_folder(tmp_path / "d")
    assert recognizes(root)
    split = load_folder(root, "all", 32, progress=False)
    assert type(split) is pipeline.Split and split.images.shape == (6, 32, 32, 3)
    assert split.ids == [f"img{k}" for k in range(6)]
    # Mask = the DSB soft mask of the foreground; image = OpenCV-exact resize of the BGR image.
    raw = np.asarray(Image.open(root / "images/img0.png"))[..., ::-1]
    np.testing.assert_array_equal(split.images[0], resize_linear_uint8(raw, 32))
    fg = np.asarray(Image.open(root / "masks/img3.png")) > 0
    np.testing.assert_array_equal(split.masks[3], (resize_linear(fg.astype(float), 32) * 255
                                                   ).astype(np.uint8))
    # Through the registry (auto-detected) too.
    same = load_dataset(root, "all", 32, progress=False)
    np.testing.assert_array_equal(same.masks, split.masks)


def test_splits_seeded_fraction_and_id_lists(tmp_path):
    root = _binary_folder(tmp_path / "d")
    train = load_folder(root, "train", 16, progress=False)
    val = load_folder(root, "validation", 16, progress=False)
    assert len(val) == 2 and len(train) == 4  # ceil(0.2 * 6) = 2
    assert set(train.ids) | set(val.ids) == {f"img{k}" for k in range(6)}
    assert not set(train.ids) & set(val.ids)
    # The default rule is UNET-ZOO's (seed 41, 0.2) -- the same as split.split_ids.
    from unetpp_jax.data.split import split_ids

    assert (train.ids, val.ids) == split_ids(train.ids + val.ids)
    other = load_folder(root, "validation", 16, progress=False, seed=3, val_fraction=0.5)
    assert len(other) == 3
    assert load_folder(root, "validation", 16, progress=False, seed=3, val_fraction=0.5).ids == \
        other.ids
    picked = load_folder(root, size=16, progress=False, ids=["img5", "img0"])
    assert picked.ids == ["img5", "img0"]
    (tmp_path / "ids.txt").write_text("# my validation\nimg2\nimg4\n")
    assert load_dataset(root, size=16, progress=False, ids=tmp_path / "ids.txt").ids == ["img2", "img4"]
    with pytest.raises(FolderError, match="nope"):
        select_ids(["a", "b"], ids=["a", "nope"])
    with pytest.raises(ValueError, match="val_fraction"):
        select_ids(["a", "b"], "train", val_fraction=1.0)
    with pytest.raises(FolderError, match="empty"):
        select_ids(["a"], "train")


def test_indexed_class_masks_and_per_class_layout(tmp_path):
    rng = _rng(1)
    root = tmp_path / "idx"
    (root / "masks").mkdir(parents=True)
    for k in range(3):
        labels = rng.integers(0, 3, (20, 24), dtype=np.uint8)
        _write(root / "images" / f"a{k}.png", rng.integers(0, 256, (20, 24, 3), dtype=np.uint8))
        pal = Image.fromarray(labels, mode="P")
        pal.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * 759)
        pal.save(root / "masks" / f"a{k}.png")
    split = load_folder(root, "all", 20, progress=False)
    assert isinstance(split, ClassSplit) and split.num_classes == 3
    assert split.masks.max() <= 2 and split.masks.shape == (3, 20, 20)
    assert load_folder(root, "all", 20, progress=False, num_classes=5).num_classes == 5

    # pytorch-nested-unet: masks/<class>/<id>.png
    nested = tmp_path / "nested"
    for k in range(2):
        _write(nested / "images" / f"n{k}.png", rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
        c0 = np.zeros((16, 16), np.uint8)
        c0[:8] = 255
        c1 = np.zeros((16, 16), np.uint8)
        c1[4:12, 8:] = 255  # overlaps class 0 in rows 4..7: the later folder wins
        _write(nested / "masks" / "0" / f"n{k}.png", c0)
        _write(nested / "masks" / "1" / f"n{k}.png", c1)
    split = load_folder(nested, "all", 16, progress=False)
    assert isinstance(split, ClassSplit) and split.num_classes == 3
    assert split.masks[0, 0, 0] == 1 and split.masks[0, 5, 10] == 2 and split.masks[0, 14, 0] == 0
    shutil.rmtree(nested / "masks" / "1")
    binary = load_folder(nested, "all", 16, progress=False)
    assert type(binary) is pipeline.Split and binary.masks[0, 0, 0] == 255


def test_bad_folders_name_the_file(tmp_path):
    root = _binary_folder(tmp_path / "d", n=3)
    (root / "masks" / "img2.png").unlink()
    with pytest.raises(FolderError, match="img2"):
        load_folder(root, "all", 16, progress=False)
    _write(root / "masks" / "img2.png", np.zeros((5, 5), np.uint8))
    with pytest.raises(FolderError, match="img2.png: mask is 5x5"):
        load_folder(root, "all", 16, progress=False)
    colour = np.zeros((24, 24, 3), np.uint8)
    colour[..., 0] = 255
    _write(root / "masks" / "img2.png", colour)
    with pytest.raises(FolderError, match="colour mask"):
        load_folder(root, "all", 16, progress=False)
    ignore = np.zeros((24, 24), np.uint8)
    ignore[0, :3] = [1, 2, 255]
    _write(root / "masks" / "img2.png", ignore)
    with pytest.raises(FolderError, match="ignore"):
        load_folder(root, "all", 16, progress=False)
    (root / "masks" / "img9.png").write_bytes(b"")
    with pytest.raises(FolderError, match="img9.png: a mask without an image"):
        load_folder(root, "all", 16, progress=False)


def test_second_load_hits_the_cache_and_a_touched_file_misses_it(tmp_path, monkeypatch):
    root = _binary_folder(tmp_path / "d")
    calls = []
    real = folder._preprocess
    monkeypatch.setattr(folder, "_preprocess", lambda *a: calls.append(1) or real(*a))
    first = load_folder(root, "train", 16, progress=False)
    val = load_folder(root, "validation", 16, progress=False)  # same entry: the split is taken after
    again = load_folder(root, "train", 16, progress=False)
    assert len(calls) == 1
    np.testing.assert_array_equal(first.images, again.images)
    assert len(list((tmp_path / "cache" / "folder").glob("*.npz"))) == 1
    assert not list((tmp_path / "cache" / "folder").glob(".*"))  # no temporary file left
    load_folder(root, "train", 24, progress=False)  # another size: another entry
    assert len(calls) == 2
    st = os.stat(root / "masks/img0.png")
    os.utime(root / "masks/img0.png", ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))
    load_folder(root, "train", 16, progress=False)
    assert len(calls) == 3
    load_folder(root, "train", 16, progress=False, cache=False)
    assert len(calls) == 4 and len(val) == 2


def test_dsb2018_preprocessed_folder_is_not_taken(tmp_path):
    bundle = pipeline.bundled_path()
    copy = tmp_path / "val96"
    shutil.copytree(bundle, copy)
    assert folder.is_dsb2018_folder(copy) and not recognizes(copy)
    got = load_dataset(copy, "validation", 96, progress=False)
    ref = pipeline.load_split()
    assert got.ids == ref.ids  # the reference order, not a sorted/seeded folder split
    # One image fewer: no longer DSB2018's exact id set -> the folder dataset.
    next((copy / "images").iterdir()).unlink()
    assert recognizes(copy)


def test_reader_formats_match_opencv(tmp_path):
    cv2 = pytest.importorskip("cv2", reason="opencv-python-headless (test extra) is not installed")
    from unetpp_jax.data.images import read_image_bgr_any

    rng = _rng(2)
    g16 = rng.integers(0, 65536, (9, 11), dtype=np.uint16)
    c16 = rng.integers(0, 65536, (9, 11, 3), dtype=np.uint16)
    rgba = rng.integers(0, 256, (9, 11, 4), dtype=np.uint8)
    grey = rng.integers(0, 256, (9, 11), dtype=np.uint8)
    files = {"g16.png": g16, "c16.png": c16, "rgba.png": rgba, "grey.png": grey,
             "g16.tif": g16, "grey.tif": grey, "c8.tif": rgba[..., :3]}
    for name, arr in files.items():
        cv2.imwrite(str(tmp_path / name), arr)
        np.testing.assert_array_equal(read_image_bgr_any(tmp_path / name),
                                      cv2.imread(str(tmp_path / name), cv2.IMREAD_COLOR), name)
    # 16 bit keeps the high byte (cv2.imread: floor(v / 256)), grey is replicated.
    np.testing.assert_array_equal(read_image_bgr_any(tmp_path / "g16.png")[..., 1], g16 >> 8)
    # JPEG: decoders may differ by a grey level.
    cv2.imwrite(str(tmp_path / "c.jpg"), rgba[..., :3])
    diff = read_image_bgr_any(tmp_path / "c.jpg").astype(int) - cv2.imread(str(tmp_path / "c.jpg"))
    assert np.abs(diff).max() <= 2


@needs_data
def test_folder_made_from_stage1_train_equals_dsb_preprocessing(tmp_path):
    from unetpp_jax.data.preprocess import Stage1Train, encode_png

    root = tmp_path / "own"
    with Stage1Train(DATA) as raw:
        ids = raw.ids[:4]
        for i in ids:
            image, union = raw.read(i)
            (root / "images").mkdir(parents=True, exist_ok=True)
            (root / "masks").mkdir(exist_ok=True)
            (root / "images" / f"{i}.png").write_bytes(encode_png(image, bgr=True))
            (root / "masks" / f"{i}.png").write_bytes(encode_png(union.astype(np.uint8) * 255))
        ref = [raw.preprocess(i, 96) for i in ids]
    split = load_dataset(root, "all", 96, progress=False)
    np.testing.assert_array_equal(split.images, np.stack([r[0] for r in ref]))
    np.testing.assert_array_equal(split.masks, np.stack([r[1] for r in ref]))


@needs_data
def test_three_class_dsb2018_from_the_raw_instances(tmp_path):
    from unetpp_jax.data.dsb2018_classes import instance_classes
    from unetpp_jax.data.preprocess import Stage1Train

    sub = tmp_path / "stage1_train"
    sub.mkdir()
    with Stage1Train(DATA) as raw:
        ids = raw.ids[:3]
    for i in ids:
        os.symlink(DATA / i, sub / i)
    split = load_dataset(sub, "all", 64, dataset="dsb2018-3class", progress=False)
    assert isinstance(split, ClassSplit) and split.num_classes == 3 and split.ids == sorted(ids)
    assert set(np.unique(split.masks)) == {0, 1, 2}
    t0 = time.perf_counter()
    again = load_dataset(sub, "all", 64, dataset="dsb2018-3class", progress=False)
    assert time.perf_counter() - t0 < 5
    np.testing.assert_array_equal(again.masks, split.masks)
    with Stage1Train(sub) as raw:
        image, union = raw.read(ids[0])
        from unetpp_jax.data.dsb2018_classes import _instances

        classes = instance_classes(_instances(raw, ids[0], image.shape[:2]))
    np.testing.assert_array_equal(classes > 0, union)
