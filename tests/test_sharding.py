"""What each process of a multi-host training reads: split readers and device shards.

The references are hand-stated: shard bounds written out, the one-device order equal to
``pipeline.batches`` (the order single-device training always used), and counts of the files a
reader actually opens.
"""

import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from unetpp_jax.data import pipeline, sharding
from unetpp_jax.data.pipeline import Split

sys.path.insert(0, str(Path(__file__).parent))


def _split(n, size=8, seed=0):
    rng = np.random.default_rng(seed)
    return Split(rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
                 rng.integers(0, 256, (n, size, size), dtype=np.uint8), [f"i{k:02d}" for k in range(n)])


def test_shard_bounds_by_hand():
    assert sharding.shard_bounds(10, 3) == [(0, 3), (3, 6), (6, 10)]
    assert sharding.shard_bounds(32, 2) == [(0, 16), (16, 32)]
    assert sharding.shard_bounds(5, 1) == [(0, 5)]
    assert sharding.even_part(10, 2, 3) == (6, 10)
    # Global batch 8 on 3 devices is refused; on 2 devices, shards of 5 and 6 give 1 step of 4+4.
    with pytest.raises(ValueError, match="not divisible"):
        sharding.shard_steps(11, 8, 3)
    assert sharding.shard_steps(11, 8, 2) == 1
    assert sharding.shard_steps(11, 4, 1) == 2


def test_one_shard_is_exactly_the_single_device_order():
    split = _split(13)
    for epoch in (1, 2):
        for shuffle, augment in ((True, True), (False, False), (True, False)):
            ref = list(pipeline.epoch_examples(split, 4, seed=3, epoch=epoch, shuffle=shuffle,
                                               augment=augment))
            got = list(sharding.shard_batches(split, 4, total=13, num_shards=1, shards=[0],
                                              seed=3, epoch=epoch, shuffle=shuffle,
                                              augment=augment))
            assert len(got) == len(ref) == 3
            for (a, b), (c, d) in zip(got, ref):
                np.testing.assert_array_equal(a, c)
                np.testing.assert_array_equal(b, d)


def test_two_processes_together_make_the_two_device_batches():
    # 13 examples, 2 shards: [0, 6) and [6, 13); per device 2 rows, 3 steps (min(6, 7) // 2).
    split = _split(13)
    whole = list(sharding.shard_batches(split, 4, total=13, num_shards=2, shards=[0, 1], seed=5,
                                        epoch=1, augment=True))
    p0 = list(sharding.shard_batches(split.take(range(0, 6)), 4, total=13, num_shards=2,
                                     shards=[0], seed=5, epoch=1, augment=True))
    p1 = list(sharding.shard_batches(split.take(range(6, 13)), 4, total=13, num_shards=2,
                                     shards=[1], seed=5, epoch=1, augment=True))
    assert len(whole) == len(p0) == len(p1) == 3
    for (wi, wm), (ai, am), (bi, bm) in zip(whole, p0, p1):
        np.testing.assert_array_equal(wi, np.concatenate([ai, bi]))
        np.testing.assert_array_equal(wm, np.concatenate([am, bm]))
    # Unaugmented, the rows are the examples themselves: device 0 only ever gets shard 0's,
    # each at most once per epoch, and the two shards are shuffled differently.
    rows = {bytes(img.tobytes()): k for k, img in enumerate(split.images)}
    seen = [[], []]
    for images, _ in sharding.shard_batches(split, 4, total=13, num_shards=2, shards=[0, 1],
                                            seed=5, epoch=1):
        for r, img in enumerate(images):
            seen[r // 2].append(rows[img.tobytes()])
    assert all(k < 6 for k in seen[0]) and all(6 <= k < 13 for k in seen[1])
    assert len(set(seen[0])) == len(seen[0]) == 6 and len(set(seen[1])) == len(seen[1]) == 6
    o0 = sharding.shard_order(6, shard=0, seed=5, epoch=1)
    o1 = sharding.shard_order(6, shard=1, seed=5, epoch=1)
    assert not np.array_equal(o0, o1)


def test_train_process_batches_match_pipeline_batches_on_one_device():
    from unetpp_jax.train import process_batches

    split = _split(13)
    ref = list(pipeline.batches(split, 4, seed=3, epoch=2, shuffle=True, augment=True))
    got = list(process_batches(split, 4, total=13, seed=3, epoch=2, shuffle=True, augment=True))
    assert len(ref) == len(got) == 3
    for a, b in zip(ref, got):
        for k in ("image", "mask"):
            np.testing.assert_array_equal(a[k], b[k])


def test_in_memory_reader_and_range_checks():
    split = _split(5)
    reader = sharding.as_reader(split)
    assert len(reader) == 5 and reader.read(1, 3).ids == ["i01", "i02"]
    assert sharding.as_reader(reader) is reader
    with pytest.raises(ValueError, match=r"rows \[3, 7\)"):
        reader.read(3, 7)
    with pytest.raises(TypeError):
        sharding.as_reader([1, 2])


def _folder(root: Path, n=12, size=20) -> Path:
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for k in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size + 3, 3), dtype=np.uint8)).save(
            root / "images" / f"im{k:02d}.png")
        m = np.zeros((size, size + 3), np.uint8)
        m[k % 7:k % 7 + 6, 2:9] = 255
        Image.fromarray(m).save(root / "masks" / f"im{k:02d}.png")
    return root


def test_folder_reader_reads_only_its_rows(tmp_path, monkeypatch):
    from unetpp_jax.data import folder as folder_mod
    from unetpp_jax.data.registry import load_dataset, open_dataset

    monkeypatch.setenv("UNETPP_JAX_CACHE", str(tmp_path / "cache"))
    root = _folder(tmp_path / "data")
    opened = []
    real = folder_mod.read_image_bgr_any
    monkeypatch.setattr(folder_mod, "read_image_bgr_any",
                        lambda p: opened.append(Path(p).stem) or real(p))
    reader = open_dataset(root, "train", 16, progress=False)
    assert opened == [] and len(reader) == 9  # 12 images, validation ceil(0.2 * 12) = 3
    part = reader.read(2, 6)
    assert opened == reader.ids[2:6] == part.ids
    # The same pixels as the whole split loaded at once (which opens every image).
    whole = load_dataset(root, "train", 16, progress=False, cache=False)
    np.testing.assert_array_equal(part.images, whole.images[2:6])
    np.testing.assert_array_equal(part.masks, whole.masks[2:6])
    # A second read of the part comes from the cache: no image opened again.
    opened.clear()
    again = reader.read(2, 6)
    assert opened == [] and again.ids == part.ids
    np.testing.assert_array_equal(again.images, part.images)


def test_folder_reader_part_follows_num_classes(tmp_path, monkeypatch):
    from unetpp_jax.data.folder import FolderError, open_folder

    monkeypatch.setenv("UNETPP_JAX_CACHE", str(tmp_path / "cache"))
    root = _folder(tmp_path / "data", n=6)
    # Masks of class indices: five hold only 0/1, one holds 0..2. The dataset is 3-class, but a
    # part without that file would look binary on its own, so training passes the class count.
    for k in range(5):
        path = root / "masks" / f"im{k:02d}.png"
        Image.fromarray((np.asarray(Image.open(path)) // 255).astype(np.uint8)).save(path)
    m = np.zeros((20, 23), np.uint8)
    m[2:6, 2:6], m[8:12, 8:12] = 1, 2
    Image.fromarray(m).save(root / "masks" / "im05.png")
    reader = open_folder(root, "all", 16, progress=False, num_classes=3)
    part = reader.read(0, 2)
    assert part.num_classes == 3 and set(np.unique(part.masks)) <= {0, 1}
    with pytest.raises(FolderError, match="not binary"):
        open_folder(root, "all", 16, progress=False, num_classes=2).read(4, 6)


def test_preprocessed_folder_reader_decodes_only_its_rows(monkeypatch):
    opened = []
    real = pipeline.image_bgr_from_png
    monkeypatch.setattr(pipeline, "image_bgr_from_png",
                        lambda data, name: opened.append(Path(name).stem) or real(data, name=name))
    reader = pipeline.open_split()  # the bundled 134 validation images
    assert len(reader) == 134 and opened == []
    part = reader.read(130, 134)
    assert opened == part.ids and len(opened) == 4
    whole = pipeline.load_split()
    np.testing.assert_array_equal(part.images, whole.images[130:])
    assert part.ids == whole.ids[130:]
