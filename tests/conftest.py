"""Shared fixtures. PyTorch appears only in tests (and the benchmark), as the reference twin."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# One persistent XLA compilation cache for the test session, set before anything imports jax:
# both pytest-xdist workers and every subprocess a test starts (training CLIs, kill -9 runs)
# inherit it, so a program compiled once (the tiny training step, the bundled model's forward)
# is loaded, not compiled again, by the next process that needs it. Only programs that took
# over half a second to compile are stored. (jax falls back to compiling when an entry cannot
# be read.) Set JAX_COMPILATION_CACHE_DIR yourself to use another folder.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      str(Path(__file__).resolve().parents[1] / ".pytest_cache" / "jax-compilation"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")


@pytest.fixture(scope="session")
def torch():
    """PyTorch with one thread (on a shared 2-core machine two OpenMP threads spin against XLA's
    pool), or a skip saying it is not installed."""
    torch = pytest.importorskip("torch", reason="PyTorch (the test extra) is not installed")
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield torch
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def torch_twin(torch):
    """``experiments.torch_twin``: PyTorch NestedUNet / UNet twins of the Flax model."""
    from experiments import torch_twin

    return torch_twin


@pytest.fixture(scope="session")
def bundled():
    """The bundled checkpoint as ``pretrained.Pretrained`` (model, variables, metadata, ...)."""
    from unetpp_jax.pretrained import load_checkpoint

    return load_checkpoint()


# Operators that torchvision's import declares fake (meta) kernels for with
# torch.library.register_fake, which needs each operator to exist already. Its compiled extension
# (torchvision._C) normally defines them; a torchvision wheel built for another torch variant
# (the CUDA wheels beside the project's CPU torch 2.13.0) cannot load its extension, so its
# import fails with "operator torchvision::nms does not exist". Declaring the schemas (exactly
# torchvision's own) lets it import; the operators then have no kernel, and nothing smp's
# UnetPlusPlus runs calls them.
TORCHVISION_SCHEMAS = {
    "nms": "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}


def _import_torchvision(torch):
    import importlib
    import sys

    try:
        return importlib.import_module("torchvision"), []
    except RuntimeError as exc:
        if "torchvision::" not in str(exc):
            raise
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]  # the half-imported package
    declared = []
    for op, schema in TORCHVISION_SCHEMAS.items():
        try:
            getattr(torch.ops.torchvision, op)
        except (AttributeError, RuntimeError):
            torch.library.define(f"torchvision::{op}", schema)
            declared.append(op)
    return importlib.import_module("torchvision"), declared


@pytest.fixture(scope="session")
def smp(torch):
    """``segmentation_models_pytorch`` (the test extra), or a skip saying it is not installed.

    torchvision is imported first; where its compiled extension does not match the installed
    torch, the operator schemas its import needs are declared (:data:`TORCHVISION_SCHEMAS`).
    Models are always built with ``encoder_weights=None``: nothing is downloaded."""
    try:
        _import_torchvision(torch)
    except ImportError:
        pytest.skip("torchvision (the test extra) is not installed")
    return pytest.importorskip("segmentation_models_pytorch",
                               reason="segmentation_models_pytorch (the test extra) is not installed")
