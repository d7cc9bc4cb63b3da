"""Shared fixtures. PyTorch appears only in tests (and the benchmark), as the reference twin."""

from __future__ import annotations

import pytest


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
