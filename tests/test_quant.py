"""quant.py: BatchNorm folding, fp16/int8 emulation, calibration, and the KL threshold methods.

The KL methods are checked against re-statements written here as plain loops over bins and
candidates (following TVM's ``MinimizeKL`` and pytorch-quantization's ``_compute_amax_entropy``
line by line, not the vectorised sums of quant.py), and on histograms small enough to work
by hand.
"""

import functools
import math

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from unetpp_jax import layers, numerics, quant
from unetpp_jax.model import UNetPlusPlus, grid_nodes

SMALL_WIDTHS = (8, 16, 32, 64, 128)


# --------------------------------------------------------------------------- fixtures


def _trained_like_variables(model, shape, seed=0):
    """Random variables whose activations neither vanish nor explode (He-scaled uniform
    kernels) with non-trivial BatchNorm statistics, so folding and quantization are really
    exercised. Built from ``eval_shape`` (no compile)."""
    rng = np.random.default_rng(seed)
    abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros(shape))

    def fill(path, a):
        name = path[-1].key
        if name == "kernel":
            bound = math.sqrt(6.0 / np.prod(a.shape[:-1]))  # var 2 / fan_in
            return rng.uniform(-bound, bound, a.shape)
        if name in ("scale", "var"):
            return rng.uniform(0.7, 1.4, a.shape)
        return rng.normal(0, 0.1, a.shape)  # conv and BatchNorm biases, running means

    variables = jax.tree_util.tree_map_with_path(fill, abstract)
    return jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), variables)


@functools.lru_cache(maxsize=None)
def logits(model, prune_level=4):
    """One jitted inference forward per (model, prune level): each compiles once per file."""
    return jax.jit(functools.partial(model.apply, prune_level=prune_level))


def probs(model, variables, images, prune_level=4):
    return [jax.nn.sigmoid(x) for x in logits(model, prune_level)(variables, images)]


@pytest.fixture(scope="module")
def small():
    model = UNetPlusPlus(widths=SMALL_WIDTHS)
    variables = _trained_like_variables(model, (1, 32, 32, 3))
    images = np.asarray(jax.random.uniform(jax.random.PRNGKey(1), (6, 32, 32, 3), minval=-1,
                                           maxval=1), np.float32)
    return model, variables, images


@pytest.fixture(scope="module")
def small_kl(small):
    model, variables, images = small
    return quant.calibrate(model, variables, images[:4], "kl", batch_size=4)


# ------------------------------------------------------------------ BatchNorm folding


def _unfolded_forward(params, stats, x):
    """UNet++ in inference mode with BatchNorm written out after each conv (not folded)."""
    hi = jax.lax.Precision.HIGHEST

    def conv(h, p):
        return jax.lax.conv_general_dilated(h, p["kernel"], (1, 1), "SAME",
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                            precision=hi) + p["bias"]

    def block(name, h):
        for k in (1, 2):
            bn, st = params[name][f"bn{k}"], stats[name][f"bn{k}"]
            h = conv(h, params[name][f"conv{k}"])
            h = (h - st["mean"]) / jnp.sqrt(st["var"] + 1e-5) * bn["scale"] + bn["bias"]
            h = jnp.maximum(h, 0.0)
        return h

    def pool(h):
        n, hh, ww, c = h.shape
        return h.reshape(n, hh // 2, 2, ww // 2, 2, c).max(axis=(2, 4))

    X = {}
    for i, j in grid_nodes(4):
        if j == 0:
            inp = x if i == 0 else pool(X[i - 1, 0])
        else:
            inp = jnp.concatenate([X[i, k] for k in range(j)]
                                  + [layers.upsample2x_align_corners(X[i + 1, j - 1])], -1)
        X[i, j] = block(f"conv{i}_{j}", inp)
    return [conv(X[0, k], params[f"final{k}"]) for k in range(1, 5)]


def test_folded_batchnorm_equals_unfolded_in_fp32(small):
    model, variables, images = small
    folded = logits(numerics.with_numerics(model, "fp32"))(variables, images)
    reference = jax.jit(_unfolded_forward)(variables["params"], variables["batch_stats"], images)
    for got, ref in zip(folded, reference):
        scale = float(jnp.max(jnp.abs(ref)))
        assert scale > 0.1  # the activations did not vanish, so the comparison means something
        np.testing.assert_allclose(got, ref, atol=2e-5 * scale, rtol=0)


# ---------------------------------------------------------- fp16 and int8 emulation


def _primitives(jaxpr):
    """All equations of a jaxpr, descending into nested jaxprs (jit, custom_jvp, ...)."""
    out = []
    for eqn in jaxpr.eqns:
        out.append(eqn)
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else [param]:
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    out += _primitives(sub.jaxpr)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    out += _primitives(sub)
    return out


def test_fp16_emulation_runs_in_float16_and_changes_probabilities_little(small):
    model, variables, images = small
    m16 = numerics.with_numerics(model, "fp16")
    # Every conv (30 + 4 heads; the first conv of each of the 10 skip nodes runs as one conv per
    # input part, 30 instead of 10), max-pool and upsampling tap (two gathers per axis,
    # 10 upsamples) reads float16 values.
    ops = _primitives(jax.make_jaxpr(lambda v, x: m16.apply(v, x))(variables, images).jaxpr)
    convs = [e for e in ops if e.primitive.name == "conv_general_dilated"]
    pools = [e for e in ops if e.primitive.name.startswith("reduce_window")]
    taps = [e for e in ops if e.primitive.name == "gather"]
    assert len(convs) == 34 + 20 and len(pools) == 4 and len(taps) == 4 * 10
    assert all(e.invars[0].aval.dtype == jnp.float16 for e in convs + pools + taps)
    # (the blend itself: every arithmetic op of the upsampler runs in float16)
    from unetpp_jax.layers import upsample2x_align_corners

    up = jax.make_jaxpr(upsample2x_align_corners)(jnp.zeros((1, 4, 4, 2), jnp.float16)).jaxpr
    arith = [e for e in up.eqns if e.primitive.name in ("mul", "add", "sub")]
    assert arith and all(v.aval.dtype == jnp.float16 for e in arith for v in e.invars)
    p32 = probs(model, variables, images)
    p16 = probs(m16, variables, images)
    for a, b in zip(p32, p16):
        assert b.dtype == jnp.float32
        diff = float(jnp.max(jnp.abs(a - b)))
        assert 0 < diff < 1e-2


def test_weights_quantized_per_output_channel():
    kernel = jax.random.normal(jax.random.PRNGKey(0), (3, 3, 5, 4)) * jnp.array([1, 10, 0.01, 0])
    q, s = numerics.quantize_weights(kernel)
    assert q.shape == kernel.shape and s.shape == (4,)
    np.testing.assert_array_equal(q, jnp.round(q))
    np.testing.assert_array_equal(jnp.max(jnp.abs(q), axis=(0, 1, 2)), [127, 127, 127, 0])
    np.testing.assert_allclose(s[:3], jnp.max(jnp.abs(kernel), axis=(0, 1, 2))[:3] / 127, rtol=1e-6)
    assert float(jnp.max(jnp.abs(q * s - kernel) - s / 2)) <= 1e-6


def test_fake_quantize_rounds_and_clips_to_plus_minus_127():
    x = jnp.array([-300.0, -1.26, -0.74, 0.0, 0.24, 0.26, 126.6, 127.6, 500.0])
    np.testing.assert_allclose(numerics.fake_quantize(x, 0.5 * jnp.ones(())) / 0.5,
                               [-127, -3, -1, 0, 0, 1, 127, 127, 127])


def test_int8_emulation_close_to_fp32(small, small_kl):
    model, variables, images = small
    p32 = probs(model, variables, images)
    p8 = probs(numerics.with_numerics(model, "int8"), small_kl.attach(variables), images)
    for a, b in zip(p32, p8):
        # A random network's probabilities spread little around 0.5 (std ~0.08); int8 moves
        # them by ~4% of that on average (measured 0.025-0.045 at most).
        diff = jnp.abs(a - b)
        assert 0 < float(diff.max()) < 0.1 and float(diff.mean()) < 0.1 * float(a.std())
        assert float(jnp.mean((a >= 0.5) == (b >= 0.5))) > 0.98


def test_int8_options(small, small_kl):
    # At prune level 1 (X(0,0), X(1,0), X(0,1)): small programs, and both options act there.
    model, variables, images = small
    scales = small_kl.scales
    huge = {**scales, "conv0_0": {**scales["conv0_0"], "conv1_in": jnp.float32(1e3)}}
    v_ok, v_huge = small_kl.attach(variables), {**variables, "quant": huge}

    def run(v, **options):
        return probs(numerics.with_numerics(model, "int8", **options), v, images, 1)[-1]

    # The first conv in float ignores its input scale; quantized, a huge scale zeroes its input.
    np.testing.assert_array_equal(run(v_ok, skip_first_conv=True), run(v_huge, skip_first_conv=True))
    assert float(jnp.max(jnp.abs(run(v_ok) - run(v_huge)))) > 1e-3
    # Rounding every block output at its own scale first is a second, small, error.
    p32 = probs(model, variables, images, 1)[-1]
    once, twice = run(v_ok), run(v_ok, requantize_concat_inputs=True)
    assert float(jnp.max(jnp.abs(once - twice))) > 0
    assert float(jnp.mean(jnp.abs(twice - p32))) < 0.01


def test_int8_without_scales_fails_clearly(small):
    model, variables, images = small
    with pytest.raises(ValueError, match="calibration.attach"):
        numerics.with_numerics(model, "int8").apply(variables, images[:1])
    with pytest.raises(ValueError, match="precision"):
        numerics.with_numerics(model, "int4")


def test_scales_are_data_not_recompiled(small, small_kl):
    model, variables, images = small
    m8 = numerics.with_numerics(model, "int8")
    traces = []

    @jax.jit
    def f(v, x):
        traces.append(1)
        return m8.apply(v, x, prune_level=1)[-1]

    halved = jax.tree_util.tree_map(lambda s: s * 2, small_kl.scales)
    a = f(small_kl.attach(variables), images)
    b = f({**variables, "quant": halved}, images)
    assert len(traces) == 1 and float(jnp.max(jnp.abs(a - b))) > 0
    assert hash(numerics.Int8()) == hash(numerics.Int8()) and numerics.Int8() != numerics.Int8(True)


# ------------------------------------------------------------------------ calibration


def test_calibration_one_compile_per_pass_and_padding_ignored(small):
    model, v, images = small
    before = quant._batch_statistics_program()._cache_size()
    # 5 images at 2 per batch: 3 batches of 2, 1 padded image. (No other test uses batches
    # of 2, so this shape compiles here.)
    amax, hists = quant.site_statistics(model, v, images[:5], "signed", batch_size=2)
    assert quant._batch_statistics_program()._cache_size() - before == 2  # the max pass + the histogram pass
    c = quant.calibrate(model, v, images[:5], "kl", batch_size=2)
    assert quant._batch_statistics_program()._cache_size() - before == 2  # and nothing more
    assert c.amax == amax
    # 30 block convs + 4 heads have an input site, the 15 blocks an output site.
    sites = quant._flatten(c.scales)
    assert len(sites) == 30 + 4 + 15 and "conv0_1/conv1_in" in sites and "final4_in" in sites
    # Every real value is counted once, in int64, and the padded image not at all.
    recorder = model.clone(numerics=numerics.Record())
    _, shapes = jax.eval_shape(lambda x: recorder.apply(v, x, mutable=[quant.RECORD_COLLECTION]),
                               images[:1])
    shapes = quant._unwrap_sown(shapes[quant.RECORD_COLLECTION])
    for h, x in zip(jax.tree_util.tree_leaves(hists), jax.tree_util.tree_leaves(shapes)):
        assert h.dtype == np.int64 and h.sum() == 5 * np.prod(x.shape)
    # Nor does a huge padded image raise the max (same shapes: nothing compiles here).
    batch = jnp.asarray(np.stack([images[0], np.full_like(images[0], 1e3)]))
    one = quant._batch_statistics_program()(recorder, "max", v, batch, jnp.int32(1), None)
    for m, m_all in zip(jax.tree_util.tree_leaves(one), jax.tree_util.tree_leaves(amax)):
        assert 0 < float(m) <= m_all


def test_histogram_bins_like_numpy():
    x = jax.random.normal(jax.random.PRNGKey(0), (3, 8, 8, 16)) * 2.0
    m = float(jnp.max(jnp.abs(x)))
    valid = jnp.array([True, True, False])
    kept = np.asarray(x[:2]).ravel()
    for kind, values, lo in (("signed", kept, -m), ("abs", np.abs(kept), 0.0)):
        got = np.asarray(quant._histogram(x, kind, jnp.float32(m), valid))
        expected, edges = np.histogram(values, len(got), (lo, m))
        np.testing.assert_allclose(edges, quant.histogram_edges(kind, m))
        assert got.sum() == kept.size and np.abs(got - expected).sum() <= 2  # edge rounding


@pytest.mark.parametrize("method", ["kl-trt", "max", "percentile"])
def test_calibration_methods_give_positive_scales(small, method):
    model, variables, images = small
    c = quant.calibrate(model, variables, images[:4], method, batch_size=4)
    scales, thresholds, amax = (quant._flatten(t) for t in (c.scales, c.thresholds, c.amax))
    for site, t in thresholds.items():
        assert 0 < t <= amax[site] * (1 + 1e-6), site
        np.testing.assert_allclose(float(scales[site]), t / 127, rtol=1e-6)
    assert c.summary()["method"] == method and c.num_images == 4


def test_kl_scale_is_tvm_threshold_over_128(small_kl):
    s, t = quant._flatten(small_kl.scales), quant._flatten(small_kl.thresholds)
    for site in s:
        np.testing.assert_allclose(float(s[site]), t[site] / 128, rtol=1e-6)


# ------------------------------------------------------------------ threshold methods


def _smooth(v, eps):
    zeros = sum(1 for x in v if x == 0)
    nonzeros = len(v) - zeros
    if nonzeros == 0:
        return None
    eps1 = eps * zeros / nonzeros
    if eps1 >= 1.0:
        return None
    return [x + eps if x == 0 else x - eps1 for x in v]


def _kl(p, q):
    sp, sq = math.fsum(p), math.fsum(q)
    return math.fsum((a / sp) * math.log((a / sp) / (b / sq)) for a, b in zip(p, q))


def _pick(divergences, last):
    """First (TVM) or last (pytorch-quantization) minimum; values equal to quant.TIE_RTOL tie."""
    low = min(divergences) * (1 + quant.TIE_RTOL) + 1e-15
    tied = [k for k, d in enumerate(divergences) if d <= low]
    return tied[-1] if last else tied[0]


def tvm_divergences_loop(hist, num_quantized_bins=255, eps=1e-4):
    """TVM's MinimizeKL (src/relay/quantize/calibrate.cc), statement by statement."""
    hist = [int(x) for x in hist]
    num_bins = len(hist)
    zero_bin = num_bins // 2
    out = []
    for i in range(num_quantized_bins // 2, zero_bin + 1):
        start, stop = zero_bin - i, zero_bin + i + 1
        size = stop - start
        sliced = [0] * size
        p = [0.0] * size
        for j in range(num_bins):
            if j <= start:
                p[0] += hist[j]
            elif j >= stop:
                p[-1] += hist[j]
            else:
                sliced[j - start] = hist[j]
                p[j - start] = hist[j]
        merged = size // num_quantized_bins
        quantized = [sum(sliced[j * merged:(j + 1) * merged]) for j in range(num_quantized_bins)]
        quantized[-1] += sum(sliced[num_quantized_bins * merged:])
        q = [0.0] * size
        for j in range(num_quantized_bins):
            lo = j * merged
            hi = size if j == num_quantized_bins - 1 else (j + 1) * merged
            norm = sum(1 for k in range(lo, hi) if sliced[k] != 0)
            if norm:
                for k in range(lo, hi):
                    if p[k]:
                        q[k] = quantized[j] / norm
        p, q = _smooth(p, eps), _smooth(q, eps)
        out.append((stop, math.inf if q is None else _kl(p, q)))
    return out


def trt_divergences_loop(hist, num_levels=128, start_bin=128):
    """pytorch-quantization's _compute_amax_entropy, with scipy's entropy written out."""
    bins = [float(x) for x in hist]
    bins[0] = bins[1]
    out = []
    for i in range(start_bin, len(bins) + 1):
        level = np.digitize(range(i), np.linspace(0, i, num=num_levels + 1)) - 1
        sums, counts = [0.0] * num_levels, [0] * num_levels
        for t in range(i):
            if bins[t] != 0:
                sums[level[t]] += bins[t]
                counts[level[t]] += 1
        q = [sums[level[t]] / counts[level[t]] if bins[t] != 0 else 0.0 for t in range(i)]
        p = bins[:i]
        p[-1] += sum(bins[i:])
        sp, sq = math.fsum(p), math.fsum(q)
        terms = []
        for a, b in zip(p, q):
            if a == 0:
                continue
            if b == 0:
                terms = [math.inf]
                break
            terms.append((a / sp) * math.log((a / sp) / (b / sq)))
        out.append((i, math.fsum(terms)))
    return out


def _random_signed_hists(num_bins, seed):
    """Histograms shaped like conv inputs: post-ReLU (empty left half, zero spike, long
    tail), signed heavy-tailed, and a sparse one with a handful of occupied bins."""
    rng = np.random.default_rng(seed)
    relu = np.maximum(rng.standard_t(3, 20_000), 0) * rng.uniform(0.5, 2)
    signed = rng.laplace(0, 1, 20_000)
    sparse = rng.choice([-1.0, 0.0, 0.5, 2.0, 7.0], size=300)
    out = []
    for x in (relu, signed, sparse):
        m = np.abs(x).max()
        out.append(np.histogram(x, num_bins, (-m, m))[0])
    return out


@pytest.mark.parametrize("num_bins,num_quantized_bins", [(601, 255), (1001, 255), (201, 15)])
def test_tvm_kl_matches_loop_restatement(num_bins, num_quantized_bins):
    for seed, hist in enumerate(_random_signed_hists(num_bins, num_bins)):
        stop, div = quant.tvm_kl_divergences(hist, num_quantized_bins)
        ref = tvm_divergences_loop(hist, num_quantized_bins)
        np.testing.assert_array_equal(stop, [s for s, _ in ref])
        np.testing.assert_allclose(div, [d for _, d in ref], rtol=1e-10, atol=1e-15)
        edges = np.linspace(-1, 1, num_bins + 1)
        best = _pick([d for _, d in ref], last=False)
        assert quant.kl_threshold(hist, edges, num_quantized_bins) == edges[ref[best][0]], seed


@pytest.mark.parametrize("num_bins,num_levels,start_bin", [(512, 128, 128), (300, 16, 16)])
def test_trt_kl_matches_loop_restatement(num_bins, num_levels, start_bin):
    rng = np.random.default_rng(num_bins)
    samples = [np.maximum(rng.standard_t(3, 20_000), 0), np.abs(rng.laplace(0, 1, 20_000)),
               rng.choice([0.0, 0.3, 1.0, 4.0], 500)]
    for seed, x in enumerate(samples):
        hist = np.histogram(x, num_bins, (0, x.max()))[0]
        i, div = quant.trt_kl_divergences(hist, num_levels, start_bin)
        ref = trt_divergences_loop(hist, num_levels, start_bin)
        np.testing.assert_array_equal(i, [k for k, _ in ref])
        np.testing.assert_allclose(div, [d for _, d in ref], rtol=1e-10, atol=1e-15)
        edges = np.linspace(0, 1, num_bins + 1)
        best = _pick([d for _, d in ref], last=True)
        got = quant.kl_threshold_trt(hist, edges, num_levels, start_bin)
        assert got == edges[ref[best][0]], seed


def test_tvm_kl_hand_worked():
    # 5 bins over [-5, 5] (edges -5 -3 -1 1 3 5), 3 quantized bins: candidates i = 1 and 2.
    hist = [0, 0, 6, 3, 1]
    # i = 1 keeps bins 1..3: p = [0, 6, 3 + 1] (the right outlier joins the last bin); groups
    #   of one bin, so q = [0, 6, 3]. Ignoring the 1e-4 smoothing, P = [0, .6, .4] and
    #   Q = [0, 6/9, 3/9]: KL = .6 ln .9 + .4 ln 1.2 = 0.009713.
    # i = 2 keeps all: p = [0, 0, 6, 3, 1]; the last group takes bins 2..4, so q spreads 10
    #   over its 3 non-zero bins: KL = .6 ln 1.8 + .3 ln .9 + .1 ln .3 = 0.200667.
    stop, div = quant.tvm_kl_divergences(hist, 3)
    np.testing.assert_array_equal(stop, [4, 5])
    np.testing.assert_allclose(div, [0.009713, 0.200667], atol=2e-5)
    edges = np.linspace(-5, 5, 6)
    assert quant.kl_threshold(hist, edges, 3) == 3.0  # right edge of bin 3
    assert quant.scale_from_threshold("kl", 3.0, 5.0) == 3.0 / 128


def test_trt_kl_hand_worked():
    # |x| histogram, 4 bins over [0, 4], 2 levels, candidates i = 2, 3, 4.
    hist = [5, 4, 2, 1]  # bin 0 is replaced by bin 1: [4, 4, 2, 1], total 11
    # i = 2: P = [4, 7]/11, one bin per level, Q = [4, 4]/8:
    #   KL = 4/11 ln(8/11) + 7/11 ln(14/11) = 0.0376654
    # i = 3: levels [0, 0, 1]: P = [4, 4, 3]/11, Q = [4, 4, 2]/10:
    #   KL = 8/11 ln(10/11) + 3/11 ln(15/11) = 0.0152712
    # i = 4: levels [0, 0, 1, 1]: P = [4, 4, 2, 1]/11, Q = [4, 4, 1.5, 1.5]/11:
    #   KL = 2/11 ln(4/3) + 1/11 ln(2/3) = 0.0154453 -> i = 3 wins, threshold edges[3] = 3
    i, div = quant.trt_kl_divergences(hist, num_levels=2, start_bin=2)
    np.testing.assert_array_equal(i, [2, 3, 4])
    np.testing.assert_allclose(div, [0.0376654, 0.0152712, 0.0154453], atol=1e-6)
    assert quant.kl_threshold_trt(hist, np.arange(5.0), num_levels=2, start_bin=2) == 3.0
    assert quant.scale_from_threshold("kl-trt", 3.0, 4.0) == 3.0 / 127


def test_percentile_threshold():
    hist = np.array([90, 5, 4, 0, 1])  # cumulative 0.90 0.95 0.99 0.99 1.0
    edges = np.arange(6.0)
    assert quant.percentile_threshold(hist, edges, 95) == 1.0  # pytorch-quantization's edges[idx]
    assert quant.percentile_threshold(hist, edges, 99.5) == 4.0
    with pytest.raises(ValueError):
        quant.percentile_threshold(hist, edges, 101)


@pytest.mark.parametrize("dist,margin", [("laplace", 0.8), ("student-t4", 0.9)])
def test_max_calibration_worse_than_kl_on_heavy_tails(dist, margin):
    # Max calibration spends the int8 range on a few extreme values; the KL thresholds clip
    # them and resolve the bulk better, which lowers the quantization MSE on tails like these.
    # (On tails as heavy as Student-t with 2-3 degrees of freedom the clipped outliers
    # dominate the MSE and max wins it: KL does not minimise the MSE.)
    rng = np.random.default_rng(0)
    x = rng.laplace(0, 1, 500_000) if dist == "laplace" else rng.standard_t(4, 500_000)
    x = x.astype(np.float32)
    m = float(np.abs(x).max())
    signed = np.histogram(x, quant.KL_TVM_BINS, (-m, m))
    absolute = np.histogram(np.abs(x), quant.KL_TRT_BINS, (0, m))

    def mse(method, threshold):
        scale = jnp.float32(quant.scale_from_threshold(method, threshold, m))
        return float(jnp.mean((numerics.fake_quantize(jnp.asarray(x), scale) - x) ** 2))

    err_max = mse("max", m)
    assert mse("kl", quant.kl_threshold(*signed)) < margin * err_max
    assert mse("kl-trt", quant.kl_threshold_trt(*absolute)) < margin * err_max
    assert mse("percentile", quant.percentile_threshold(*absolute)) < margin * err_max
