"""Timing helpers shared by ``experiments.model_info`` and ``experiments.bench``.

Compile time is measured separately from steady-state time; steady state is the median of
repeated calls after a warm-up, each ended with ``block_until_ready`` (JAX dispatch is async).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np


@dataclass
class Timing:
    compile_s: float  # first call: trace + compile + one run
    median_s: float  # median steady-state seconds per call
    repeats: int

    def per_item(self, n: int) -> float:
        return n / self.median_s


def time_jitted(fn, *args, repeats: int = 5, warmup: int = 1) -> Timing:
    """Time a jitted function: first call (compile) then ``repeats`` steady-state calls."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    compile_s = time.perf_counter() - t0
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return Timing(compile_s, float(np.median(times)), repeats)


def forward_timing(model, variables, batch: int = 16, size: int = 96, prune_level: int = 4,
                   repeats: int = 5) -> Timing:
    """Inference forward (BatchNorm folded, probabilities of the last head) at one prune level."""
    from unetpp_jax.model import predict_fn

    f = predict_fn(model, prune_level)
    x = jax.random.normal(jax.random.PRNGKey(0), (batch, size, size, 3), jnp.float32)
    return time_jitted(f, variables, x, repeats=repeats)
