"""Timing compiled calls: compile time apart, steady state as the median of repeated calls
(each ended with ``block_until_ready``: JAX dispatch is asynchronous), and alternating rounds
so that a drift in the machine's speed hits every compared program alike."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable

import jax
import numpy as np


@dataclass
class Timing:
    compile_s: float  # first call: trace + compile + one run (PyTorch: first call)
    median_s: float  # median steady-state seconds per call
    repeats: int
    times: tuple[float, ...] = ()  # every steady-state call, seconds

    def per_item(self, n: int) -> float:
        return n / self.median_s

    def to_json(self, batch: int) -> dict:
        """images/s and latency (ms per call) at ``batch``, with the spread of the calls."""
        times = self.times or (self.median_s,)
        return {"batch": batch, "images_per_s": self.per_item(batch),
                "latency_ms": 1e3 * self.median_s, "compile_s": self.compile_s,
                "median_s": self.median_s, "min_s": min(times), "max_s": max(times),
                "repeats": self.repeats}


def time_jitted(fn, *args, repeats: int = 5, warmup: int = 1, min_time: float = 0.0,
                sync: Callable | None = jax.block_until_ready, compiled: bool = False) -> Timing:
    """Time ``fn(*args)``: the first call (compile) apart, then ``warmup`` untimed calls, then
    the median of at least ``repeats`` timed calls, more until they add up to ``min_time``
    seconds (fast calls, batch 1, get enough samples to ride out a noisy machine). ``sync``
    waits for a call's result (JAX dispatch is asynchronous); pass ``None`` for callables that
    return when done (PyTorch eager on CPU). ``compiled=True``: ``fn`` already ran once, so
    there is no first call to set apart (``compile_s`` is then 0)."""
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    sync = sync or (lambda out: out)
    compile_s = 0.0
    if not compiled:
        t0 = time.perf_counter()
        sync(fn(*args))
        compile_s = time.perf_counter() - t0
    for _ in range(warmup):
        sync(fn(*args))
    times = []
    while len(times) < repeats or sum(times) < min_time:
        t0 = time.perf_counter()
        sync(fn(*args))
        times.append(time.perf_counter() - t0)
    return Timing(compile_s, float(np.median(times)), len(times), tuple(times))


def interleaved_timings(calls: dict, *, rounds: int, repeats: int, warmup: int = 1,
                        min_time: float = 0.0) -> tuple[dict[Any, Timing], list[dict]]:
    """Time several callables in alternating rounds, so that a drift in the machine's speed
    (a shared VM's neighbours: 10-20% between minutes here) hits all of them alike.

    ``calls`` maps a key to ``(fn, args, sync)``. Each is first called untimed
    ``max(warmup, 1) + 1`` times (compile and warm-up); then every round times each key in turn, ``ceil(repeats / rounds)``
    calls at least and ``min_time / rounds`` seconds at least. Returns ``(timings, per_round)``:
    per key a :class:`Timing` over all its timed calls, and per round ``{key: median s}``, from
    which callers take ratios (a ratio is the median of its per-round ratios).
    """
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")
    # compile, then `warmup` untimed calls (the last one is time_jitted's single timed call)
    first = {k: time_jitted(fn, *args, repeats=1, warmup=max(warmup - 1, 0), sync=sync)
             for k, (fn, args, sync) in calls.items()}
    times: dict[Any, list[float]] = {k: [] for k in calls}
    per_round = []
    for _ in range(rounds):
        medians = {}
        for k, (fn, args, sync) in calls.items():
            t = time_jitted(fn, *args, repeats=math.ceil(repeats / rounds), warmup=0,
                            min_time=min_time / rounds, sync=sync, compiled=True)
            times[k] += t.times
            medians[k] = t.median_s
        per_round.append(medians)
    timings = {k: Timing(first[k].compile_s, float(np.median(times[k])), len(times[k]),
                         tuple(times[k])) for k in calls}
    return timings, per_round


def round_ratio(per_round: list[dict], num, den) -> tuple[float, float, float]:
    """(median, min, max) over rounds of ``per_round[r][num] / per_round[r][den]``."""
    r = [m[num] / m[den] for m in per_round]
    return float(np.median(r)), min(r), max(r)
