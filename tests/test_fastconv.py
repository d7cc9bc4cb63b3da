"""Winograd convolutions (unetpp_jax.fastconv) against the plain XLA conv and a float64 numpy
conv, and the model's outputs through them against the float64 PyTorch twin."""

from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unetpp_jax import fastconv, layers, numerics
from unetpp_jax.inference import predict_fn
from unetpp_jax.model import UNetPlusPlus, init_variables


def conv3x3_float64(x: np.ndarray, kernel: np.ndarray, bias=None) -> np.ndarray:
    """'same' 3x3 cross-correlation NHWC x HWIO in float64, nine shifted products."""
    x = np.asarray(x, np.float64)
    n, h, w, _ = x.shape
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    y = sum(xp[:, dy:dy + h, dx:dx + w] @ np.asarray(kernel[dy, dx], np.float64)
            for dy in range(3) for dx in range(3))
    return y if bias is None else y + np.asarray(bias, np.float64)


@pytest.mark.parametrize("m", [2, 4])
def test_transform_matrices_compute_a_tile_exactly(m):
    # Y = A^T [(G g G^T) * (B^T d B)] A equals the valid correlation of one (m+2)-tile, in
    # float64 to rounding: the matrices are F(m x m, 3 x 3)'s.
    rng = np.random.default_rng(m)
    t = fastconv.TRANSFORMS[m]
    bt, g, at = (np.asarray(t[k], np.float64) for k in ("BT", "G", "AT"))
    d, k = rng.normal(size=(m + 2, m + 2)), rng.normal(size=(3, 3))
    y = at @ ((g @ k @ g.T) * (bt @ d @ bt.T)) @ at.T
    ref = np.array([[np.sum(d[i:i + 3, j:j + 3] * k) for j in range(m)] for i in range(m)])
    np.testing.assert_allclose(y, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("m", [2, 4])
@pytest.mark.parametrize("hw, channels, out", [((7, 10), (5,), 3),
                                                ((9, 6), (4, 6, 3), 8),
                                                ((1, 5), (2,), 2),
                                                ((16, 16), (8, 16), 16)])
def test_winograd_equals_float64_and_the_xla_conv(m, hw, channels, out):
    # Odd sizes (tiles cropped), parts of a concatenation, batch 2, bias.
    rng = np.random.default_rng(sum(hw) + m)
    parts = [rng.normal(size=(2, *hw, c)).astype(np.float32) for c in channels]
    c = sum(channels)
    kernel = (rng.normal(size=(3, 3, c, out)) / np.sqrt(9 * c)).astype(np.float32)
    bias = rng.normal(size=out).astype(np.float32)
    ref = conv3x3_float64(np.concatenate(parts, -1), kernel, bias)
    u = fastconv.transform_kernel(kernel, m)
    assert u.shape == ((m + 2) ** 2, c, out) and u.dtype == jnp.float32
    got = jax.jit(lambda p, u: fastconv.winograd_conv3x3(p, u, bias, m=m))(parts, u)
    assert got.shape == ref.shape and got.dtype == jnp.float32
    # F(2x2) is as close to float64 as a direct float32 conv; F(4x4) a few times further.
    np.testing.assert_allclose(got, ref, rtol=0, atol=(2e-6 if m == 2 else 1e-5) * np.abs(ref).max())
    plain = layers.conv2d([jnp.asarray(p) for p in parts], kernel, bias)
    np.testing.assert_allclose(got, plain, rtol=0, atol=2e-5 * np.abs(ref).max())
    # One array, no bias, the kernel transformed inside the program.
    whole = jax.jit(lambda x, k: fastconv.winograd_conv3x3(x, fastconv.transform_kernel(k, m), m=m))(
        np.concatenate(parts, -1), kernel)
    np.testing.assert_allclose(whole, ref - bias, rtol=0, atol=2e-5 * np.abs(ref).max())


def test_seam_chooses_by_backend_shape_and_impl():
    x = jnp.zeros((1, 24, 24, 8))
    k3 = (3, 3, 8, 4)
    assert fastconv.choose("auto", x, k3, backend="cpu") == "winograd4"
    assert fastconv.choose("auto", [x, x], (3, 3, 16, 4), backend="cpu") == "winograd4"
    for backend in ("gpu", "tpu"):
        assert fastconv.choose("auto", x, k3, backend=backend) == "xla"
    assert fastconv.choose("auto", jnp.zeros((1, 6, 6, 8)), k3, backend="cpu") == "xla"  # small
    for other in [dict(stride=2), dict(padding=0)]:
        assert fastconv.choose("winograd4", x, k3, **other) == "xla"
    assert fastconv.choose("winograd2", x, (1, 1, 8, 4)) == "xla"  # 1x1 heads
    assert fastconv.choose("winograd4", x.astype(jnp.float16), k3) == "xla"
    assert fastconv.choose("xla", x, k3, backend="cpu") == "xla"
    assert fastconv.choose("winograd2", x, k3, backend="gpu") == "winograd2"  # asked for
    with pytest.raises(ValueError, match="conv_impl"):
        fastconv.choose("fft", x, k3)
    with pytest.raises(ValueError, match="conv_impl"):
        numerics.Float32(conv_impl="fft")
    with pytest.raises(ValueError, match="3x3"):
        fastconv.transform_kernel(jnp.zeros((1, 1, 2, 2)), 4)
    # Stride 2 and 1x1 convs through the seam are the plain conv.
    rng = np.random.default_rng(0)
    xs, w = rng.normal(size=(1, 8, 8, 3)).astype(np.float32), rng.normal(size=(3, 3, 3, 2))
    np.testing.assert_array_equal(fastconv.conv2d(xs, w.astype(np.float32), impl="winograd4", stride=2),
                                  layers.conv2d(xs, w.astype(np.float32), stride=2))


@pytest.fixture(scope="module")
def small(torch, torch_twin):
    """A 3-level UNet++ with trained-like BatchNorm, its float64 twin's heads on a 16x16 batch
    ('auto' runs the 16x16 convs by Winograd, the 8x8 and 4x4 ones by XLA)."""
    widths = (4, 8, 16)
    model = UNetPlusPlus(widths=widths)
    twin = torch_twin.randomize_batchnorm(
        torch_twin.from_flax(model, init_variables(model)), calibration_shape=(2, 3, 16, 16))
    x = np.array(jax.random.normal(jax.random.PRNGKey(3), (2, 16, 16, 3)), np.float32)  # writable
    with torch.no_grad():
        ref = copy.deepcopy(twin).double()(torch.from_numpy(x).permute(0, 3, 1, 2).double())
    ref = [r.numpy().transpose(0, 2, 3, 1) for r in ref]
    variables = _variables_of(twin, model)
    return model, variables, x, ref


def _variables_of(twin, model):
    """The twin's (randomised) weights and statistics as Flax variables, by the converter's
    key rules."""
    from weights_port.keymap import OIHW_TO_HWIO, abstract_variables, expected_keys

    sd = {k: v.numpy() for k, v in twin.state_dict().items()}
    variables: dict = {}
    for key, target in expected_keys(abstract_variables(model)).items():
        a = sd[key]
        if target.transform is OIHW_TO_HWIO:
            a = a.transpose(2, 3, 1, 0)
        node = variables
        for k in target.path[:-1]:
            node = node.setdefault(k, {})
        node[target.path[-1]] = jnp.asarray(a, jnp.float32)
    return variables


@pytest.mark.parametrize("impl", ["auto", "winograd4", "winograd2"])
def test_model_outputs_stay_within_1e5_of_the_float64_twin(small, impl):
    model, variables, x, ref = small
    num = numerics.Float32(conv_impl=impl)
    prepared = numerics.prepare_variables(num, variables)
    has = numerics.FASTCONV_COLLECTION in prepared
    assert has == (impl != "xla" and (impl != "auto" or jax.default_backend() == "cpu"))
    got = predict_fn(model.clone(numerics=num))(prepared, jnp.asarray(x))
    assert len(got) == len(ref) == 2
    for g, r in zip(got, ref):
        assert float(np.std(r)) > 1e-2  # probabilities, not saturated
        np.testing.assert_allclose(np.asarray(g, np.float64), r, rtol=0, atol=1e-5)
    if impl == "winograd4":  # without prepared kernels the program transforms them itself (in float32)
        again = predict_fn(model.clone(numerics=num))(numerics.prepare_variables(
            numerics.Float32(conv_impl="xla"), variables), jnp.asarray(x))
        for a, g in zip(again, got):
            np.testing.assert_allclose(a, g, rtol=0, atol=1e-5)
