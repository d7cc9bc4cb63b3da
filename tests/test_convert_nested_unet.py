"""pytorch-nested-unet (4uiiurz1) checkpoints and training-checkpoint wrappers (issue #13).

The twins below restate pytorch-nested-unet's ``archs.py`` module names (``VGGBlock`` with
``conv1``/``bn1``/``conv2``/``bn2``; ``NestedUNet`` and ``UNet``; logits out), initialised with
Kaiming-normal (fan_in) conv weights and randomised BatchNorm statistics, so a wrong port cannot
pass the 1e-5 bar. Files are written with ``torch.save`` and converted by the CLI entry point.
"""

from __future__ import annotations

import argparse
import json

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from unetpp_jax import checkpoint  # noqa: E402
from unetpp_jax.inference import predict_fn, probabilities  # noqa: E402
from unetpp_jax.model import load_pretrained  # noqa: E402
from weights_port import convert, keymap, torch_format  # noqa: E402

TOL = 1e-5
WIDTHS = [32, 64, 128, 256, 512]


class VGGBlock(nn.Module):
    def __init__(self, cin, cmid, cout):
        super().__init__()
        self.relu = nn.ReLU(inplace=True)
        self.conv1, self.bn1 = nn.Conv2d(cin, cmid, 3, padding=1), nn.BatchNorm2d(cmid)
        self.conv2, self.bn2 = nn.Conv2d(cmid, cout, 3, padding=1), nn.BatchNorm2d(cout)

    def forward(self, x):
        return self.relu(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))))


class Twin(nn.Module):
    """NestedUNet (``plain=False``) or UNet (``plain=True``) with pytorch-nested-unet's names."""

    def __init__(self, num_classes=1, input_channels=3, deep_supervision=False, plain=False):
        super().__init__()
        self.plain, self.ds = plain, deep_supervision and not plain
        self.pool = nn.MaxPool2d(2, 2)
        self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)
        self.nodes = ([(i, 0) for i in range(5)] + [(4 - j, j) for j in range(1, 5)] if plain
                      else [(i, j) for j in range(5) for i in range(5 - j)])
        for i, j in self.nodes:
            cin = (input_channels if i == 0 else WIDTHS[i - 1]) if j == 0 else \
                (1 if plain else j) * WIDTHS[i] + WIDTHS[i + 1]
            setattr(self, f"conv{i}_{j}", VGGBlock(cin, WIDTHS[i], WIDTHS[i]))
        for name in ([f"final{k}" for k in range(1, 5)] if self.ds else ["final"]):
            setattr(self, name, nn.Conv2d(WIDTHS[0], num_classes, 1))

    def forward(self, x):
        X = {}
        for i, j in self.nodes:
            if j == 0:
                inp = x if i == 0 else self.pool(X[i - 1, 0])
            else:
                same = [X[i, 0]] if self.plain else [X[i, k] for k in range(j)]
                inp = torch.cat(same + [self.up(X[i + 1, j - 1])], 1)
            X[i, j] = getattr(self, f"conv{i}_{j}")(inp)
        if self.ds:
            return [getattr(self, f"final{k}")(X[0, k]) for k in range(1, 5)]
        return self.final(X[0, 4])


@torch.no_grad()
def make_twin(seed, **kwargs):
    torch.manual_seed(seed)
    model = Twin(**kwargs)
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu", generator=g)
            m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None  # cumulative: the statistics of the activations it will see
    model.train()
    model(torch.randn(4, kwargs.get("input_channels", 3), 32, 32, generator=g))
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            std = m.running_var.sqrt()
            m.running_mean += 0.2 * std * (2 * torch.rand(m.num_features, generator=g) - 1)
            m.running_var *= 0.6 + torch.rand(m.num_features, generator=g)
            m.weight.copy_(0.7 + 0.6 * torch.rand(m.num_features, generator=g))
            m.bias.copy_(0.1 * torch.randn(m.num_features, generator=g))
    return model.eval()


def write_config(folder, arch, ds, num_classes, input_channels=3, h=96, w=96):
    # What pytorch-nested-unet's train.py writes (yaml.dump of its argparse config, sorted).
    cfg = {"arch": arch, "batch_size": 16, "dataset": "dsb2018_96", "deep_supervision": ds,
           "epochs": 100, "gamma": 2 / 3, "input_channels": input_channels, "input_h": h,
           "input_w": w, "loss": "BCEDiceLoss", "lr": 0.001, "milestones": "1,2",
           "name": f"dsb2018_96_{arch}", "nesterov": False, "num_classes": num_classes,
           "optimizer": "SGD", "scheduler": "CosineAnnealingLR"}
    text = "".join(f"{k}: {json.dumps(v) if isinstance(v, str) and ',' in v else v}\n"
                   for k, v in sorted(cfg.items())).replace("True", "true").replace("False", "false")
    (folder / "config.yml").write_text(text)


# PyTorch with one thread for the whole file (conftest's `torch` fixture).
pytestmark = pytest.mark.usefixtures("torch")


CASES = [  # (arch, deep supervision, classes, config.yml beside model.pth)
    ("NestedUNet", True, 1, True),
    ("NestedUNet", False, 3, False),
    ("NestedUNet", True, 3, False),
    ("NestedUNet", False, 1, True),
    ("UNet", False, 1, True),
    ("UNet", False, 3, False),
]


@pytest.mark.parametrize("arch, ds, num_classes, with_config", CASES)
def test_nested_unet_checkpoint_matches_twin(tmp_path, capsys, arch, ds, num_classes, with_config):
    twin = make_twin(7, num_classes=num_classes, deep_supervision=ds, plain=arch == "UNet")
    folder = tmp_path / "models" / f"dsb2018_96_{arch}"
    folder.mkdir(parents=True)
    torch.save(twin.state_dict(), folder / "model.pth")
    if with_config:
        write_config(folder, arch, ds, num_classes)
    assert convert.main([str(folder / "model.pth")]) == 0, capsys.readouterr().err
    out = folder / "model_flax"

    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    # The reference is the original computed in float64: its exact output, against which
    # JAX's float32 is judged (PyTorch's own float32 is about as far from it as JAX's).
    with torch.no_grad():
        ref = twin.double()(x.double())
    ref = ref if isinstance(ref, list) else [ref]
    ref = [np.asarray(probabilities(r.numpy().transpose(0, 2, 3, 1).astype(np.float32), num_classes))
           for r in ref]
    model, variables = load_pretrained(out)
    ours = predict_fn(model)(variables, x.numpy().transpose(0, 2, 3, 1))
    ours = list(ours) if isinstance(ours, tuple) else [ours]
    assert len(ours) == len(ref) == (4 if ds and arch == "NestedUNet" else 1)
    for k, (a, b) in enumerate(zip(ours, ref), 1):
        err = float(np.max(np.abs(np.asarray(a) - b)))
        assert err < TOL, f"head {k}: max abs {err:.2e}"
        assert float(np.std(b)) > 0.02  # outputs spread: the comparison means something

    _, meta = checkpoint.load_variables(out)
    assert meta["model"]["skips"] == ("unet" if arch == "UNet" else "nested")
    assert meta["model"]["num_classes"] == num_classes and meta["source"]["layout"] == "pytorch-nested-unet"
    spec = meta["input"]
    assert spec["channel_order"] == "BGR" and spec["mean"] == [0.485, 0.456, 0.406]
    assert spec["std"] == [58.395, 57.12, 57.375]
    assert spec.get("size") == ([96, 96] if with_config else None)


def test_nested_unet_input_spec_is_its_pipeline():
    # dataset.py: albumentations Normalize() on the cv2 (BGR) image, then / 255 again.
    pixels = np.arange(256, dtype=np.float64)[:, None].repeat(3, 1)
    m, s = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    theirs = (pixels - m * 255) / (s * 255) / 255
    spec = convert.input_spec("pytorch-nested-unet")
    ours = (pixels / 255 - np.array(spec["mean"])) / np.array(spec["std"])
    np.testing.assert_allclose(ours, theirs, rtol=1e-9, atol=1e-12)
    zoo = convert.input_spec("unet-zoo")
    np.testing.assert_allclose((pixels / 255 - zoo["mean"][0]) / zoo["std"][0], (pixels / 255 - .5) / .5)


@pytest.mark.parametrize("key", ["state_dict", "model_state_dict", "model", "net"])
def test_training_checkpoint_wrappers_convert_with_inert_extras(tmp_path, capsys, key):
    twin = make_twin(1)
    sd = twin.state_dict()
    opt = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9)
    twin.train()
    twin(torch.randn(2, 3, 32, 32)).mean().backward()
    opt.step()
    wrapped = {key: sd, "epoch": 7, "best_iou": np.float64(0.8123),
               "args": argparse.Namespace(arch="NestedUNet", lr=0.1, deep_supervision=False),
               "optimizer": opt.state_dict()}
    torch.save(wrapped, tmp_path / "ckpt.pth")
    torch.save(sd, tmp_path / "bare.pth")
    loaded = torch_format.load(tmp_path / "ckpt.pth").obj
    assert type(loaded["args"]) is torch_format.InertNamespace  # never the real class
    assert loaded["args"].fields["arch"] == "NestedUNet" and loaded["best_iou"] == 0.8123
    assert convert.main([str(tmp_path / "ckpt.pth"), "-o", str(tmp_path / "out")]) == 0
    text = capsys.readouterr().out
    for phrase in [f"'{key}' entry", "epoch (int 7)", "best_iou (float64 0.8123)",
                   "args (argparse.Namespace, 3 fields)", "optimizer (dict, 2 entries)"]:
        assert phrase in text, phrase
    bare = keymap.convert_state_dict(torch_format.load(tmp_path / "bare.pth").obj).variables
    got, _ = checkpoint.load_variables(tmp_path / "out")
    jax.tree_util.tree_map(np.testing.assert_array_equal, got, bare)
