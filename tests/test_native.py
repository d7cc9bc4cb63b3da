"""Native execution (int8 x int8 -> int32 convolutions, bfloat16 convolutions), saved
calibrations, and the per-conv sensitivity pass, on small models (one compile per program)."""

from __future__ import annotations

import functools
import math
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unetpp_jax import evaluate, layers, numerics, quant
from unetpp_jax.data.pipeline import Split
from unetpp_jax.model import UNetPlusPlus

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_quant import _primitives, _trained_like_variables  # noqa: E402

# Depth 2: small programs. Widths both below and above YNNPACK's 16-channel minimum, so both of
# XLA:CPU's int8 conv paths run.
WIDTHS = (8, 24, 48)
SIZE = 16


@pytest.fixture(scope="module")
def tiny():
    model = UNetPlusPlus(widths=WIDTHS)
    variables = _trained_like_variables(model, (1, SIZE, SIZE, 3))
    images = np.asarray(jax.random.uniform(jax.random.PRNGKey(1), (5, SIZE, SIZE, 3),
                                           minval=-1, maxval=1), np.float32)
    calib = quant.calibrate(model, variables, images[:4], "kl", batch_size=4)
    return model, variables, images, calib


@functools.lru_cache(maxsize=None)
def _program(model, prune_level):
    return evaluate.predict_program(model, prune_level)


def predict(model, numerics_, variables, images, prune_level=None):
    m = model.clone(numerics=numerics_)
    return [np.asarray(p) for p in _program(m, prune_level or m.depth)(
        numerics.prepare_variables(numerics_, variables), jnp.asarray(images))]


# ------------------------------------------------------------------ the integer grid


def test_int8_conv_accumulates_exactly_in_int32():
    rng = np.random.default_rng(0)
    # Two parts of a concatenation, values on the int8 grid: the int32 accumulator times one
    # scale equals the float32 conv of the grid values (all sums below 2**24: exact in both).
    parts = [rng.integers(-127, 128, (2, 6, 6, c)).astype(np.int8) for c in (5, 3)]
    kernel = rng.integers(-127, 128, (3, 3, 8, 4)).astype(np.int8)
    acc = layers.conv2d(parts, jnp.asarray(kernel), preferred_element_type=jnp.int32)
    assert acc.dtype == jnp.int32
    grid = layers.conv2d([p.astype(np.float32) for p in parts], kernel.astype(np.float32))
    np.testing.assert_array_equal(np.asarray(acc, np.float32), np.asarray(grid))
    # Sums beyond 2**24: int32 is exact, float32 accumulation rounds them.
    x = np.full((1, 1, 1, 2048), 127, np.int8)
    x[..., 0] = 1
    w = np.full((1, 1, 2048, 1), 127, np.int8)
    exact = int(np.sum(x.astype(np.int64) * w[0, 0, :, 0].astype(np.int64)))
    assert exact > 2 ** 24
    got = layers.conv2d(jnp.asarray(x), jnp.asarray(w), preferred_element_type=jnp.int32)
    assert int(got.ravel()[0]) == exact
    as_float = float(layers.conv2d(x.astype(np.float32), w.astype(np.float32)).ravel()[0])
    assert as_float != exact  # the float32 emulation cannot hold this sum


def test_native_int8_runs_int8_convs_and_equals_emulation(tiny):
    model, variables, images, calib = tiny
    v = calib.attach(variables)
    native = numerics.Int8(execution="native")
    m = model.clone(numerics=native)
    jaxpr = jax.make_jaxpr(lambda v, x: m.apply(numerics.prepare_variables(native, v), x))(
        v, images[:1]).jaxpr
    convs = [e for e in _primitives(jaxpr) if e.primitive.name == "conv_general_dilated"]
    assert convs and all(e.invars[0].aval.dtype == jnp.int8 and e.invars[1].aval.dtype == jnp.int8
                         and e.outvars[0].aval.dtype == jnp.int32 for e in convs)
    # Every prune level, batch of 5 (micro-batched on CPU: one image per step) and of 1.
    for level in (1, 2):
        emulated = predict(model, numerics.Int8(), v, images, level)
        got = predict(model, native, v, images, level)
        for a, b in zip(emulated, got):
            # Sums stay far below 2**24 here: the same float32 values, bit for bit.
            np.testing.assert_array_equal(a, b)
    one = predict(model, native, v, images[:1])
    np.testing.assert_array_equal(one[-1], got[-1][:1])


def test_native_int8_prepared_weights_equal_quantizing_per_call(tiny):
    model, variables, images, calib = tiny
    folded = numerics.prepare_variables(numerics.Float32(), calib.attach(variables))
    prepared = numerics.prepare_variables(numerics.Int8(execution="native"), folded)
    wq = prepared["quant"]["conv0_1"]["conv1_wq"]
    assert wq.dtype == jnp.int8 and wq.shape == folded["params"]["conv0_1"]["conv1"]["kernel"].shape
    assert float(jnp.max(jnp.abs(wq.astype(jnp.int32)))) == 127
    m = model.clone(numerics=numerics.Int8(execution="native"))
    f = jax.jit(lambda v, x: m.apply(v, x))
    for a, b in zip(f(prepared, images), f(folded, images)):
        np.testing.assert_array_equal(a, b)


def test_bf16_native_asks_for_bfloat16_results(tiny):
    model, variables, images, _ = tiny
    m = model.clone(numerics=numerics.BFloat16(execution="native"))
    jaxpr = jax.make_jaxpr(lambda v, x: m.apply(v, x))(variables, images[:1]).jaxpr
    convs = [e for e in _primitives(jaxpr) if e.primitive.name == "conv_general_dilated"]
    assert convs and all(e.params["preferred_element_type"] == jnp.bfloat16 for e in convs)
    p32 = predict(model, numerics.Float32(), variables, images)
    p16 = predict(model, numerics.BFloat16(execution="native"), variables, images)
    assert 0 < max(float(np.abs(a - b).max()) for a, b in zip(p32, p16)) < 0.05
    with pytest.raises(ValueError, match="execution"):
        numerics.get_numerics("int8", execution="fast")


# ------------------------------------------------------------------ saved calibrations


def test_calibration_round_trips_exactly(tiny, tmp_path):
    _, _, _, calib = tiny
    path = calib.save(tmp_path / "c")
    back = quant.Calibration.load(path)
    assert back.reused and back.path == str(path) and back.method == calib.method
    for a, b in zip(jax.tree_util.tree_leaves(calib.scales), jax.tree_util.tree_leaves(back.scales)):
        assert b.dtype == jnp.float32 and np.asarray(a).tobytes() == np.asarray(b).tobytes()
    assert jax.tree_util.tree_structure(calib.scales) == jax.tree_util.tree_structure(back.scales)
    assert back.thresholds == calib.thresholds and back.amax == calib.amax
    assert (back.images_sha256, back.weights_sha256, back.num_images, back.options) == (
        calib.images_sha256, calib.weights_sha256, calib.num_images, calib.options)
    assert calib.images_sha256 and calib.weights_sha256
    # Saving over it replaces it atomically (no debris left next to it).
    calib.save(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


def test_load_or_calibrate_reuses_a_saved_calibration(tiny, tmp_path, monkeypatch):
    model, variables, images, _ = tiny
    calls = []
    real = quant.calibrate
    monkeypatch.setattr(quant, "calibrate", lambda *a, **k: calls.append(1) or real(*a, **k))
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    first = quant.load_or_calibrate(ckpt, model, variables, images[:3], "max", batch_size=3)
    assert not first.reused and Path(first.path).parent == ckpt / "calibration"
    again = quant.load_or_calibrate(ckpt, model, variables, images[:3], "max", batch_size=3)
    assert again.reused and again.path == first.path and len(calls) == 1
    for a, b in zip(jax.tree_util.tree_leaves(first.scales), jax.tree_util.tree_leaves(again.scales)):
        np.testing.assert_array_equal(a, b)
    # Other images, or other weights (a replaced checkpoint): calibrated again, never reused.
    quant.load_or_calibrate(ckpt, model, variables, images[1:4], "max", batch_size=3)
    assert len(calls) == 2
    changed = jax.tree_util.tree_map(lambda a: a * 1.5, variables)
    stale = quant.load_or_calibrate(ckpt, model, changed, images[:3], "max", batch_size=3)
    assert len(calls) == 3 and not stale.reused
    # No checkpoint directory (the bundled weights): the user cache, keyed by the weights.
    monkeypatch.setenv("UNETPP_JAX_CACHE", str(tmp_path / "cache"))
    cached = quant.load_or_calibrate(None, model, variables, images[:3], "max", batch_size=3)
    assert Path(cached.path).is_relative_to(tmp_path / "cache" / "calibration")
    assert quant.load_or_calibrate(None, model, variables, images[:3], "max",
                                   batch_size=3).reused and len(calls) == 4


# ------------------------------------------------------------------ sensitivity, keep_float


def test_sensitivity_ranks_a_broken_conv_first_and_keep_float_recovers(tiny):
    model, variables, images, _ = tiny
    # Break one conv for int8: a single weight 1000x the others in every output channel, so the
    # per-channel int8 grid rounds all its other weights to 0 (the float model just uses it).
    broken = "conv1_1/conv2"
    params = jax.tree_util.tree_map(lambda a: a, variables["params"])
    k = np.array(params["conv1_1"]["conv2"]["kernel"])
    k[0, 0, 0, :] = 1000 * np.abs(k).max()
    params["conv1_1"]["conv2"]["kernel"] = jnp.asarray(k)
    v = {**variables, "params": params}
    calib = quant.calibrate(model, v, images[:4], "max", batch_size=4)
    # Masks: the float32 model's own decisions, so fp32 scores 100 and every flip costs.
    p32 = predict(model, numerics.Float32(), v, images)[-1]
    uint8 = np.zeros(images.shape, np.uint8)  # predict_split normalises uint8: feed the floats
    split = Split(uint8, ((p32[..., 0] >= 0.5) * 255).astype(np.uint8),
                  [f"i{k}" for k in range(len(images))])

    class Identity:
        channels = 3

        @staticmethod
        def normalize(_):
            return images

    result = evaluate.conv_sensitivity(model, v, split, calib, batch_size=len(images),
                                       input_spec=Identity)
    ranking = result["ranking"]
    assert result["fp32"] == pytest.approx(100.0)
    assert ranking[0]["conv"] == broken and ranking[0]["drop"] > 1.5 * ranking[1]["drop"]
    assert len(ranking) == len(calib.conv_paths()) == 2 * 6 + 2  # 6 blocks, 2 heads
    # Mixed precision: the broken conv kept float recovers most of the loss.
    full = evaluate.score_heads(np.stack(predict(model, numerics.Int8(), calib.attach(v), images))
                                [..., 0], split.masks).miou
    kept = evaluate.score_heads(np.stack(predict(
        model, numerics.Int8(keep_float=(broken,)), calib.attach(v), images))[..., 0],
        split.masks).miou
    assert math.isclose(full, result["int8"], abs_tol=1e-6)
    assert 100 - kept < 0.75 * (100 - full)  # (a random network: every conv costs some)
