"""A PyTorch twin of UNET-ZOO's ``NestedUNet``: the reference for the tests and the benchmark.

PyTorch is never a dependency of the package: this module imports torch at the top, so import
it only where torch is known to be installed (the tests ``importorskip`` torch first;
``experiments.bench`` imports it lazily, after checking that torch is importable).

Module names follow UNET-ZOO so that ``state_dict()`` has its keys:
``conv{i}_{j}.conv.{0,1,3,4}.*`` (a ``VGGBlock`` whose ``conv`` is
``Sequential(Conv2d, BatchNorm2d, ReLU, Conv2d, BatchNorm2d, ReLU)``) and ``final1..final4``
(or ``final``). As in UNET-ZOO the sigmoid is applied inside ``forward``; upsampling is bilinear
x2 with ``align_corners=True``; the blocks are registered column by column, UNET-ZOO's order.
"""

from __future__ import annotations

import torch
from torch import nn

WIDTHS = (32, 64, 128, 256, 512)


class VGGBlock(nn.Module):
    def __init__(self, in_channels: int, middle_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, middle_channels, 3, padding=1),
            nn.BatchNorm2d(middle_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(middle_channels, out_channels, 3, padding=1),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )

    def forward(self, x):
        return self.conv(x)


class NestedUNet(nn.Module):
    """NCHW in, sigmoid probabilities out: a list of heads 1..D, or one tensor without DS.

    ``skips='unet'`` is pytorch-nested-unet's plain ``UNet`` (the encoder column and the
    decoder diagonal X(D-j, j), concatenating only X(i,0)); the depth D is ``len(widths) - 1``.
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 1, deep_supervision: bool = True,
                 widths=WIDTHS, skips: str = "nested"):
        super().__init__()
        self.deep_supervision = deep_supervision
        self.skips = skips
        self.depth = d = len(widths) - 1
        self.pool = nn.MaxPool2d(2, 2)
        self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)
        if skips == "nested":
            self.nodes = [(i, j) for j in range(d + 1) for i in range(d + 1 - j)]
        else:
            self.nodes = [(i, 0) for i in range(d + 1)] + [(d - j, j) for j in range(1, d + 1)]
        for i, j in self.nodes:
            if j == 0:
                cin = in_channels if i == 0 else widths[i - 1]
            else:
                cin = (j if skips == "nested" else 1) * widths[i] + widths[i + 1]
            setattr(self, f"conv{i}_{j}", VGGBlock(cin, widths[i], widths[i]))
        if deep_supervision:
            for k in range(1, d + 1):
                setattr(self, f"final{k}", nn.Conv2d(widths[0], num_classes, 1))
        else:
            self.final = nn.Conv2d(widths[0], num_classes, 1)

    def forward(self, x):
        X = {}
        for i, j in self.nodes:
            if j == 0:
                inp = x if i == 0 else self.pool(X[i - 1, 0])
            else:
                same_row = range(j) if self.skips == "nested" else [0]
                inp = torch.cat([X[i, k] for k in same_row] + [self.up(X[i + 1, j - 1])], 1)
            X[i, j] = getattr(self, f"conv{i}_{j}")(inp)
        if self.deep_supervision:
            return [torch.sigmoid(getattr(self, f"final{k}")(X[0, k]))
                    for k in range(1, self.depth + 1)]
        return torch.sigmoid(self.final(X[0, self.depth]))


@torch.no_grad()
def randomize_batchnorm(model: NestedUNet, seed: int = 0, calibration_shape=(4, 3, 32, 32)):
    """Random but realistic BatchNorm state, so eval-mode activations stay O(1).

    One train-mode forward with cumulative averaging sets every running statistic to the
    statistics of the activations it will actually see; then each is perturbed (mean shifted by
    up to 0.2 standard deviations, variance scaled by 0.6..1.6) and the affine parameters are
    drawn around (1, 0). The heads' logits then stay in sigmoid's sensitive range.
    """
    g = torch.Generator().manual_seed(seed)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average
    model.train()
    model(torch.randn(calibration_shape, generator=g))
    for m in bns:
        m.momentum = 0.1
        std = m.running_var.sqrt()
        m.running_mean += 0.2 * std * (2 * torch.rand(m.num_features, generator=g) - 1)
        m.running_var *= 0.6 + torch.rand(m.num_features, generator=g)
        m.weight.copy_(0.7 + 0.6 * torch.rand(m.num_features, generator=g))
        m.bias.copy_(0.1 * torch.randn(m.num_features, generator=g))
    model.eval()
    return model


@torch.no_grad()
def from_flax(model, variables) -> NestedUNet:
    """A twin of the Flax ``UNetPlusPlus`` ``model`` holding its ``variables``, in eval mode.

    The inverse of the converter: every key and layout comes from ``weights_port.keymap``'s
    rules (HWIO kernels back to OIHW), so the twin and the converter cannot disagree.
    """
    import numpy as np

    from weights_port.keymap import OIHW_TO_HWIO, abstract_variables, expected_keys

    twin = NestedUNet(num_classes=model.num_classes, deep_supervision=model.deep_supervision,
                      widths=tuple(model.widths), skips=model.skips)
    state = {}
    for key, target in expected_keys(abstract_variables(model)).items():
        leaf = variables
        for k in target.path:
            leaf = leaf[k]
        a = np.asarray(leaf, np.float32)
        if target.transform is OIHW_TO_HWIO:
            a = a.transpose(3, 2, 0, 1)
        state[key] = torch.from_numpy(np.array(a, np.float32, order="C"))  # a writable copy
    missing, unexpected = twin.load_state_dict(state, strict=False)
    assert not unexpected and all(k.endswith("num_batches_tracked") for k in missing), (missing,
                                                                                          unexpected)
    return twin.eval()
