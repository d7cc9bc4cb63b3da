"""The library's seams: encoder, numerics and dataset registries, model descriptions, depth from
the widths, plain U-Net skips -- checked against the PyTorch twins and hand counts."""

from __future__ import annotations

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unetpp_jax import checkpoint, numerics
from unetpp_jax.counting import count_params
from unetpp_jax.inference import fold_batchnorm_variables, predict_fn
from unetpp_jax.model import UNetPlusPlus, grid_nodes, init_variables, load_pretrained
from unetpp_jax.pretrained import build_model, load_checkpoint, model_description


def test_library_imports_no_torch_no_tools():
    # Import every library module in a fresh interpreter; none may pull in PyTorch, the
    # converter or the experiment scripts.
    code = ("import pkgutil, sys, importlib, unetpp_jax\n"
            "for m in pkgutil.walk_packages(unetpp_jax.__path__, 'unetpp_jax.'):\n"
            "    importlib.import_module(m.name)\n"
            "bad = [m for m in sys.modules if m.split('.')[0] in "
            "('torch', 'experiments', 'weights_port', 'tensorflow')]\n"
            "print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_load_pretrained_without_argument_is_the_bundled_model(bundled):
    model, variables = load_pretrained()
    assert isinstance(model, UNetPlusPlus) and model.widths == (32, 64, 128, 256, 512)
    assert count_params(variables["params"]) == 9_163_428  # UNET-ZOO's NestedUNet, four heads
    assert bundled.input_spec.channel_order == "BGR" and bundled.name.startswith("bundled")


@pytest.mark.parametrize("widths,skips,ds", [((4, 8, 16), "nested", True),
                                             ((4, 8, 16, 32), "unet", False)])
def test_depth_follows_widths_and_matches_the_twin(torch, torch_twin, widths, skips, ds):
    model = UNetPlusPlus(widths=widths, skips=skips, deep_supervision=ds, num_classes=1)
    twin = torch_twin.randomize_batchnorm(
        torch_twin.NestedUNet(widths=widths, skips=skips, deep_supervision=ds), seed=1,
        calibration_shape=(2, 3, 32, 48))
    variables = init_variables(model)
    # The twin's weights into Flax through the converter's key map (HWIO <- OIHW).
    from weights_port.keymap import OIHW_TO_HWIO, abstract_variables, expected_keys

    sd = {k: v.numpy() for k, v in twin.state_dict().items()}
    for key, target in expected_keys(abstract_variables(model)).items():
        a = sd[key].transpose(2, 3, 1, 0) if target.transform is OIHW_TO_HWIO else sd[key]
        node = variables
        for k in target.path[:-1]:
            node = node[k]
        node[target.path[-1]] = jnp.asarray(a)
    d = len(widths) - 1
    assert model.depth == d and model.num_heads == (d if ds else 1)
    # parameters: hand count of the grid (3x3 convs with bias, BatchNorm scale+bias, 1x1 heads)
    n = 0
    for i, j in grid_nodes(d, skips, d):
        cin = (3 if i == 0 else widths[i - 1]) if j == 0 else \
            (j if skips == "nested" else 1) * widths[i] + widths[i + 1]
        n += 9 * cin * widths[i] + 9 * widths[i] ** 2 + 2 * widths[i] + 4 * widths[i]
    n += (d if ds else 1) * (widths[0] + 1)
    assert count_params(variables["params"]) == n == sum(p.numel() for p in twin.parameters())
    x = np.random.default_rng(0).normal(size=(2, 32, 48, 3)).astype(np.float32)
    with torch.no_grad():
        ref = twin(torch.from_numpy(x.transpose(0, 3, 1, 2)))
    ref = [r.numpy().transpose(0, 2, 3, 1) for r in (ref if ds else [ref])]
    got = predict_fn(model)(fold_batchnorm_variables(variables), jnp.asarray(x))
    got = got if ds else (got,)
    assert len(got) == len(ref)
    for g, r in zip(got, ref):
        assert float(r.std()) > 1e-3  # a non-constant map, so the comparison means something
        np.testing.assert_allclose(np.asarray(g), r, atol=1e-5)


def test_numerics_registry_and_roles():
    assert set(numerics.EVAL_PRECISIONS) <= set(numerics.PRECISIONS)
    assert numerics.get_numerics("int8", skip_first_conv=True) == numerics.Int8(True)
    with pytest.raises(ValueError, match="no option"):
        numerics.get_numerics("fp16", skip_first_conv=True)
    with pytest.raises(ValueError, match="unknown precision"):
        numerics.get_numerics("int4")
    with pytest.raises(ValueError, match="one head"):
        UNetPlusPlus(skips="unet", deep_supervision=True)
    # Roles, not names: a numerics that records the role of every conv sees the grid's roles.
    roles = []

    class Spy(numerics.Float32):
        def conv(self, module, name, x, kernel, bias, role, **kw):
            roles.append((module.name, name, role))
            return super().conv(module, name, x, kernel, bias, role, **kw)

    model = UNetPlusPlus(widths=(4, 8, 16), numerics=Spy())
    v = init_variables(model)
    roles.clear()  # init traced the model too
    jax.eval_shape(lambda v, x: model.apply(v, x), v, jnp.zeros((1, 16, 16, 3)))
    assert ("conv0_0", "conv1", "input") in roles
    assert [r for r in roles if r[2] == "input"] == [("conv0_0", "conv1", "input")]
    assert {r[0] for r in roles if r[2] == "node"} == {f"conv{i}_{j}" for i, j in grid_nodes(2)}
    assert [r[1] for r in roles if r[2] == "head"] == ["final1", "final2"]


def test_bf16_emulation_runs_in_bfloat16(bundled):
    model, variables = bundled.model, fold_batchnorm_variables(bundled.variables)
    x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)), jnp.float32)
    m16 = numerics.with_numerics(model, "bf16")
    jaxpr = jax.make_jaxpr(lambda v, x: m16.apply(v, x))(variables, x)
    convs = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "conv_general_dilated"]
    assert convs and all(e.invars[0].aval.dtype == jnp.bfloat16 for e in convs)
    p32 = predict_fn(model)(variables, x)[-1]
    p16 = predict_fn(m16)(variables, x)[-1]
    diff = float(jnp.max(jnp.abs(p32 - p16)))
    assert 1e-4 < diff < 0.1  # really rounded, and bf16's 8-bit mantissa stays close


def test_description_round_trip_and_bad_metadata_names_file_and_field(tmp_path):
    model = UNetPlusPlus(widths=(4, 8, 16), num_classes=3, deep_supervision=False, skips="unet")
    desc = model_description(model)
    assert desc == {"name": "UNetPlusPlus", "in_channels": 3, "num_classes": 3,
                    "widths": [4, 8, 16], "deep_supervision": False, "encoder": "vgg",
                    "skips": "unet"}
    assert build_model(json.loads(json.dumps(desc))) == model
    path = checkpoint.save_variables(tmp_path / "ok", init_variables(model), {"model": desc})
    assert load_checkpoint(path).model == model
    for n, (field, value) in enumerate([("widths", "abc"), ("widths", [4, 0, 16]), ("num_classes", "2"),
                         ("deep_supervision", 1), ("encoder", "resnet999"), ("colour", "red")]):
        bad = tmp_path / f"bad{n}"
        bad_desc = {**desc, field: value}
        checkpoint.save_variables(bad, init_variables(model), {"model": bad_desc})
        with pytest.raises(ValueError) as e:
            load_checkpoint(bad)
        assert "metadata.json" in str(e.value) and (field in str(e.value) or "resnet999" in str(e.value))


def test_every_tool_module_imports():
    # A script whose import breaks (a moved name) fails here, not in front of a user.
    import importlib
    import pkgutil

    import experiments
    import weights_port

    for pkg in (experiments, weights_port):
        for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
            if m.name == "experiments.torch_twin":
                pytest.importorskip("torch")
            importlib.import_module(m.name)
