"""UNet++ model: parameter counts, shapes per prune level, upsampler, retracing, BatchNorm."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unetpp_jax import inference, layers
from unetpp_jax.counting import conv_macs, count_params, xla_flops
from unetpp_jax.inference import fold_batchnorm_variables, map_in_micro_batches, predict_fn
from unetpp_jax.model import UNetPlusPlus, grid_nodes, init_variables


def jitted_apply(model):
    return jax.jit(model.apply, static_argnames=("train", "prune_level"))


@pytest.fixture(scope="module")
def model_and_vars():
    model = UNetPlusPlus()
    return model, init_variables(model)


NARROW = (8, 16, 32, 64, 128)  # the same grid at a quarter of the width: behaviour, not counts


@pytest.fixture(scope="module")
def narrow_and_vars():
    """The full grid (depth 4, four heads) at narrow widths: tests of behaviour that any width
    shows compile ~4x faster than at UNET-ZOO's widths."""
    model = UNetPlusPlus(widths=NARROW)
    return model, init_variables(model)


def test_parameter_counts_match_unet_zoo(model_and_vars):
    # UNET-ZOO's NestedUNet: 9,163,428 with four heads, 9,163,329 with one; 7,296 running statistics.
    _, v = model_and_vars
    assert count_params(v["params"]) == 9_163_428
    assert sum(x.size for x in jax.tree_util.tree_leaves(v["batch_stats"])) == 7_296
    single = init_variables(UNetPlusPlus(deep_supervision=False))
    assert count_params(single["params"]) == 9_163_329
    assert "final" in single["params"] and "final1" not in single["params"]


def test_parameter_tree_mirrors_pytorch_keys(model_and_vars):
    _, v = model_and_vars
    names = set(v["params"])
    assert names == {f"conv{i}_{j}" for i, j in grid_nodes(4)} | {f"final{k}" for k in range(1, 5)}
    assert v["params"]["conv0_1"]["conv1"]["kernel"].shape == (3, 3, 32 + 64, 32)
    # Concat order: same-level predecessors first, upsampled node last -> conv2_2 in = 2*128 + 256.
    assert v["params"]["conv2_2"]["conv1"]["kernel"].shape == (3, 3, 2 * 128 + 256, 128)
    assert v["params"]["final4"]["kernel"].shape == (1, 1, 32, 1)
    assert set(v["batch_stats"]["conv4_0"]["bn2"]) == {"mean", "var"}


@pytest.mark.parametrize("hw", [(96, 96), (64, 128)])
def test_output_shapes_every_prune_level(narrow_and_vars, hw):
    model, v = narrow_and_vars
    x = jnp.zeros((2, *hw, 3))
    apply = jitted_apply(model)
    for level in range(1, 5):
        out = apply(v, x, prune_level=level)
        assert isinstance(out, tuple) and len(out) == level
        assert all(o.shape == (2, *hw, 1) and o.dtype == jnp.float32 for o in out)
    single = UNetPlusPlus(widths=NARROW, deep_supervision=False)
    sv = init_variables(single)
    assert jitted_apply(single)(sv, x).shape == (2, *hw, 1)


def test_pruning_needs_deep_supervision_and_valid_level(model_and_vars):
    single = UNetPlusPlus(deep_supervision=False)
    sv = init_variables(single)
    with pytest.raises(ValueError, match="deep-supervision"):
        single.apply(sv, jnp.zeros((1, 96, 96, 3)), prune_level=2)
    model, v = model_and_vars
    with pytest.raises(ValueError, match="prune_level"):
        model.apply(v, jnp.zeros((1, 96, 96, 3)), prune_level=5)
    with pytest.raises(ValueError, match="multiples of 16"):
        model.apply(v, jnp.zeros((1, 90, 96, 3)))


def test_pruned_levels_compute_fewer_nodes(model_and_vars):
    # The pruned program really is smaller: XLA-counted FLOPs drop with the level and agree with
    # a hand count of conv multiply-adds (x2) within a few %: XLA adds bias/ReLU/blend but does
    # not count the zero-padding taps, which matter on the 6x6 and 12x12 maps of deep levels.
    model, v = model_and_vars
    flops = [xla_flops(model, v, prune_level=k) for k in range(1, 5)]
    assert flops == sorted(flops) and flops[0] < 0.15 * flops[3]
    for k, f in zip(range(1, 5), flops):
        assert 0.95 <= f / (2 * conv_macs(prune_level=k)) < 1.05
    assert conv_macs() == 4_850_417_664  # plain conv MACs at 96x96: 4.85 G, hand-counted


def test_head_k_of_pruned_model_equals_head_k_of_full_model(model_and_vars):
    model, v = model_and_vars
    x = jax.random.normal(jax.random.PRNGKey(1), (1, 32, 32, 3))
    apply = jitted_apply(model)
    full = apply(v, x)
    for level in range(1, 4):
        np.testing.assert_allclose(apply(v, x, prune_level=level)[-1], full[level - 1],
                                   atol=1e-6)


def test_align_corners_taps_and_upsampler_hand_computed():
    # 2 -> 4 with align_corners=True samples input coords 0, 1/3, 2/3, 1.
    i0, i1, f = layers.align_corners_taps(2, 4)
    np.testing.assert_array_equal(i0, [0, 0, 0, 1])
    np.testing.assert_array_equal(i1, [1, 1, 1, 1])
    np.testing.assert_allclose(f, [0, 1 / 3, 2 / 3, 0], atol=1e-7)
    x = jnp.array([[0.0, 3.0], [6.0, 9.0]]).reshape(1, 2, 2, 1)
    y = layers.upsample2x_align_corners(x)[0, :, :, 0]
    np.testing.assert_allclose(y, [[0, 1, 2, 3], [2, 3, 4, 5], [4, 5, 6, 7], [6, 7, 8, 9]],
                               atol=1e-5)
    # 3 -> 6: corners coincide, output 1 samples input 0.4, output 4 samples 1.6.
    i0, i1, f = layers.align_corners_taps(3, 6)
    assert (i0[1], i1[1]) == (0, 1) and (i0[4], i1[4]) == (1, 2)
    np.testing.assert_allclose([f[1], f[4]], [0.4, 0.6], atol=1e-7)
    # a single row/column is replicated
    one = layers.upsample2x_align_corners(jnp.full((1, 1, 1, 2), 5.0))
    np.testing.assert_allclose(one, np.full((1, 2, 2, 2), 5.0))


def test_upsampler_matches_pytorch_align_corners():
    torch = pytest.importorskip("torch", reason="PyTorch (test extra) is needed for this check")
    x = np.random.default_rng(0).normal(size=(2, 6, 12, 5)).astype(np.float32)
    ref = torch.nn.functional.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), scale_factor=2,
                                          mode="bilinear", align_corners=True)
    ours = layers.upsample2x_align_corners(jnp.asarray(x))
    # float32 rounding only: values are O(1), two interpolation passes, so a few ulp.
    np.testing.assert_allclose(np.asarray(ours), ref.permute(0, 2, 3, 1).numpy(), atol=5e-6)
    # and it is not what jax.image.resize (half-pixel centres) gives
    half = jax.image.resize(jnp.asarray(x), (2, 12, 24, 5), "bilinear")
    assert float(jnp.max(jnp.abs(half - ours))) > 1e-2


def test_no_retrace_for_same_shapes(model_and_vars):
    model, v = model_and_vars
    traces = []

    @jax.jit
    def f(variables, x):
        traces.append(1)
        return model.apply(variables, x)

    x = jnp.ones((2, 32, 32, 3))
    f(v, x)
    f(v, x + 1.0)
    assert len(traces) == 1
    f(v, jnp.ones((3, 32, 32, 3)))
    assert len(traces) == 2


def test_train_mode_updates_batch_stats_and_eval_folds_bn(model_and_vars):
    model, v = model_and_vars
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 32, 32, 3)) * 2.0 + 0.5
    out, updates = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(v, x)
    assert len(out) == 4
    mean0 = updates["batch_stats"]["conv0_0"]["bn1"]["mean"]
    # Running mean moves 10% of the way (momentum 0.9) toward the batch mean of conv0_0's
    # first conv output, which we recompute by hand here.
    p = v["params"]["conv0_0"]["conv1"]
    y = jax.lax.conv_general_dilated(x, p["kernel"], (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC")) + p["bias"]
    np.testing.assert_allclose(mean0, 0.1 * y.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-6)
    assert not np.allclose(updates["batch_stats"]["conv0_0"]["bn1"]["var"], 1.0)
    # Eval with the new statistics uses them (folded), so predictions change.
    new_v = {"params": v["params"], "batch_stats": updates["batch_stats"]}
    a = predict_fn(model)(v, x)[-1]
    b = predict_fn(model)(new_v, x)[-1]
    assert float(jnp.max(jnp.abs(a - b))) > 1e-3
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0


def test_folded_eval_equals_unfolded_batchnorm():
    # Independent re-statement: eval-mode BN written out unfolded, block by block, in numpy-ish jnp.
    from unetpp_jax.encoders.vgg import ConvBlock

    blk = ConvBlock(8)
    x = jax.random.normal(jax.random.PRNGKey(3), (2, 16, 16, 4))
    v = blk.init(jax.random.PRNGKey(0), x)
    rng = np.random.default_rng(0)
    stats = jax.tree_util.tree_map(lambda a: jnp.asarray(rng.uniform(0.5, 2.0, a.shape), a.dtype),
                                   v["batch_stats"])
    params = jax.tree_util.tree_map(lambda a: a + 0.1 * jnp.asarray(rng.normal(size=a.shape), a.dtype),
                                    v["params"])
    got = blk.apply({"params": params, "batch_stats": stats}, x)
    h = x
    for k in (1, 2):
        c, b, s = params[f"conv{k}"], params[f"bn{k}"], stats[f"bn{k}"]
        h = jax.lax.conv_general_dilated(h, c["kernel"], (1, 1), "SAME",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                         precision="highest") + c["bias"]
        h = (h - s["mean"]) / jnp.sqrt(s["var"] + 1e-5) * b["scale"] + b["bias"]
        h = jnp.maximum(h, 0)
    np.testing.assert_allclose(got, h, atol=2e-5, rtol=1e-5)
    # The same block with its BatchNorm folded beforehand, as fold_batchnorm_variables does for
    # a whole network (the block's tree is one node of it).
    folded = fold_batchnorm_variables({"params": {"n": params}, "batch_stats": {"n": stats}})
    assert set(folded) == {"params"} and set(folded["params"]["n"]) == {"conv1", "conv2"}
    np.testing.assert_allclose(blk.apply({"params": folded["params"]["n"]}, x), h,
                               atol=2e-5, rtol=1e-5)


def test_conv2d_of_parts_equals_conv_of_the_concatenation():
    rng = np.random.default_rng(2)
    parts = [jnp.asarray(rng.normal(size=(2, 8, 8, c)), jnp.float32) for c in (3, 5, 2)]
    kernel = jnp.asarray(rng.normal(size=(3, 3, 10, 4)), jnp.float32)
    bias = jnp.asarray(rng.normal(size=(4,)), jnp.float32)
    ref = jax.lax.conv_general_dilated(jnp.concatenate(parts, -1), kernel, (1, 1), "SAME",
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                       precision="highest") + bias
    np.testing.assert_allclose(layers.conv2d(parts, kernel, bias), ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(layers.conv2d(tuple(parts), kernel, bias), ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(layers.conv2d(parts[0], kernel[:, :, :3]),
                               ref - bias - layers.conv2d(parts[1:], kernel[:, :, 3:]),
                               rtol=1e-4, atol=1e-4)
    assert layers.conv2d([p.astype(jnp.float16) for p in parts], kernel.astype(jnp.float16)).dtype \
        == jnp.float16
    np.testing.assert_array_equal(layers.concat_parts(parts), jnp.concatenate(parts, -1))
    with pytest.raises(ValueError, match="input channels"):
        layers.conv2d(parts[:2], kernel, bias)


def test_prefolded_variables_give_the_same_predictions(narrow_and_vars):
    model, v = narrow_and_vars
    rng = np.random.default_rng(1)
    # Non-trivial BatchNorm statistics (small means, variances around 1), so folding matters
    # and the features stay alive through 4 levels of ReLU.
    stats = {node: {bn: {"mean": jnp.asarray(rng.normal(0, 0.05, s["mean"].shape), jnp.float32),
                         "var": jnp.asarray(rng.uniform(0.5, 1.5, s["var"].shape), jnp.float32)}
                    for bn, s in bns.items()}
             for node, bns in v["batch_stats"].items()}
    v = {"params": v["params"], "batch_stats": stats}
    folded = fold_batchnorm_variables(v)
    assert "batch_stats" not in folded
    assert "bn1" not in folded["params"]["conv2_1"] and "final3" in folded["params"]
    assert fold_batchnorm_variables(folded) is folded  # idempotent
    x = jax.random.normal(jax.random.PRNGKey(5), (2, 32, 32, 3))
    apply = jitted_apply(model)
    for level in (2, 4):
        a = apply(v, x, prune_level=level)  # logits: probabilities of random weights saturate
        b = apply(folded, x, prune_level=level)
        assert len(a) == len(b) == level
        for ha, hb in zip(a, b):
            scale = float(jnp.max(jnp.abs(ha)))
            assert float(jnp.std(ha)) > 1e-3 * scale  # a non-constant map
            np.testing.assert_allclose(hb, ha, rtol=1e-4, atol=1e-5 * scale)
    # predict_fn takes either tree.
    np.testing.assert_allclose(predict_fn(model)(folded, x)[-1], predict_fn(model)(v, x)[-1],
                               atol=1e-5)
    with pytest.raises(ValueError, match="folded"):
        model.apply(folded, x, train=True, mutable=["batch_stats"])
    # params without their batch_stats are not "folded": inference refuses them (no silent
    # skip of BatchNorm), folding refuses them, training creates fresh statistics as in Flax.
    with pytest.raises(Exception, match="batch_stats"):
        apply({"params": v["params"]}, x)
    with pytest.raises(ValueError, match="batch_stats"):
        fold_batchnorm_variables({"params": v["params"]})
    _, upd = model.apply({"params": v["params"]}, x, train=True, mutable=["batch_stats"])
    assert "bn2" in upd["batch_stats"]["conv0_4"]


def test_predict_program_uses_the_package_compiler_options(model_and_vars):
    # inference.compiler_options() switches XLA:CPU's YNNPACK fusions off (Eigen convolutions
    # are faster here, docs/performance.md); the compiled inference program must show it.
    if jax.default_backend() != "cpu":
        pytest.skip("XLA:CPU option; this backend is " + jax.default_backend())
    assert inference.compiler_options() == {"xla_cpu_experimental_ynn_fusion_type": ""}

    from unetpp_jax.numerics import Float32

    model, v = model_and_vars
    x = jnp.zeros((1, 32, 32, 3))
    hlo = inference._predict_program().lower(model, 4, None, v, x).compile().as_text()
    assert "__ynn_fusion" not in hlo  # the default (Winograd on CPU) program
    # With XLA's conv for every conv: 15 second convs, 5 first convs of X(i,0), and the first
    # convs of the 10 skip nodes split into their j+1 input parts (30); nothing concatenated.
    plain = model.clone(numerics=Float32(conv_impl="xla"))
    hlo = inference._predict_program().lower(plain, 4, None, v, x).compile().as_text()
    assert hlo.count("convolution(") == 15 + 5 + 30
    assert "concatenate(" not in hlo
    assert "__ynn_fusion" not in hlo


def test_micro_batches_give_the_whole_batch_result(narrow_and_vars):
    model, v = narrow_and_vars
    x = jax.random.normal(jax.random.PRNGKey(7), (5, 32, 32, 3))
    whole = jitted_apply(model)(v, x, prune_level=3)  # logits, one step
    # 5 images by 1, by 2 (a padded last micro-batch) and by 8 (one step): the same logits.
    for mb in (1, 2, 8):
        got = jax.jit(lambda v, x, mb=mb: map_in_micro_batches(
            lambda xc: model.apply(v, xc, prune_level=3), x, mb))(v, x)
        assert len(got) == 3 and got[-1].shape == (5, 32, 32, 1)
        for g, w in zip(got, whole):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
    # predict_fn: every micro-batch setting agrees; bad values are refused.
    ref = predict_fn(model, micro_batch=None)(v, x)[-1]
    for mb in (1, 2, "auto"):
        np.testing.assert_allclose(predict_fn(model, micro_batch=mb)(v, x)[-1], ref, atol=1e-6)
    for bad in (0, -1, 1.5, "all", True):
        with pytest.raises(ValueError, match="micro_batch"):
            predict_fn(model, micro_batch=bad)
    assert predict_fn(model, micro_batch=np.int64(2)).args[-1] == 2  # numpy ints: a plain int


def test_predict_fn_compiles_once_per_model_and_shape(model_and_vars):
    # Validation runs every epoch and eval per precision: an equal model built anew must reuse
    # the compiled program instead of recompiling.
    program = inference._predict_program()
    model, v = model_and_vars
    x = jnp.zeros((3, 48, 80, 3))  # a shape no other test uses: the jit cache is process-wide
    predict_fn(model)(v, x)
    n = program._cache_size()
    predict_fn(UNetPlusPlus())(v, x + 1.0)
    assert program._cache_size() == n
    predict_fn(UNetPlusPlus(), prune_level=2)(v, x)
    assert program._cache_size() == n + 1
