"""Reading a split in parts, and which rows of a global batch each device gets.

Multi-host training (docs/training.md) must not make every process read the whole dataset. Two
pieces make that so:

* A **split reader** (:class:`SplitReader`) knows how many examples a split has without decoding
  any, and ``read(start, stop)`` reads, decodes and preprocesses only examples
  ``[start, stop)`` of the split order. Every dataset source reads in parts: a raw
  ``stage1_train`` folder or zip preprocesses only those ids, a preprocessed folder decodes only
  those PNGs, a TFDS ``array_record`` build fetches only those records
  (``data_source.__getitems__``), a folder dataset of your own reads only those files. A loaded
  :class:`~unetpp_jax.data.pipeline.Split` is a reader too (:class:`InMemoryReader`).
* **Device shards.** A split of ``n`` examples is cut into ``D`` contiguous shards, one per
  device (``D`` = every device of every process): shard ``d`` is rows
  ``[d*n//D, (d+1)*n//D)`` (:func:`shard_bounds`). Devices are ordered by process, so process
  ``p`` of ``P`` (each with ``D/P`` devices) owns rows ``[p*n//P, (p+1)*n//P)``: one contiguous
  read. Each epoch every shard is shuffled (and augmented) on its own, from
  ``(seed, epoch, shard)``, and device ``d``'s ``B/D`` rows of global batch ``s`` are positions
  ``[s*B/D, (s+1)*B/D)`` of its shard's order (:func:`shard_batches`).

The order depends on ``D`` only, never on how the devices are spread over processes: two
processes with one device each see exactly the batches of one process with two devices. With one
device, shard 0 is the whole split and its order and flips are exactly
:func:`pipeline.batches`'s (tested), so single-device training is unchanged. An epoch has
``min(shard sizes) // (B/D)`` steps (at most ``D - 1`` examples fewer than ``n // B`` batches hold).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from typing import Protocol, runtime_checkable

import numpy as np

from unetpp_jax.data.pipeline import Split, augment_examples, epoch_order

__all__ = ["InMemoryReader", "SplitReader", "as_reader", "check_range", "even_part",
           "shard_batches", "shard_bounds", "shard_order", "shard_steps", "shard_transforms"]


@runtime_checkable
class SplitReader(Protocol):
    """A split that can be read in parts: ``len`` without decoding anything, ``read(start,
    stop)`` -> a ``Split`` (or ``ClassSplit``) of examples ``[start, stop)`` in split order,
    reading only those."""

    def __len__(self) -> int: ...

    def read(self, start: int, stop: int) -> Split: ...


@dataclasses.dataclass(frozen=True)
class InMemoryReader:
    """A split already in memory, read by slicing (what a loaded ``Split`` becomes)."""

    split: Split

    def __len__(self) -> int:
        return len(self.split)

    def read(self, start: int, stop: int) -> Split:
        check_range(len(self), start, stop)
        return self.split.take(range(start, stop))


def as_reader(data) -> SplitReader:
    """``data`` as a reader: a ``Split`` is wrapped, a reader returned as it is."""
    if isinstance(data, Split):
        return InMemoryReader(data)
    if isinstance(data, SplitReader):
        return data
    raise TypeError(f"expected a Split or a SplitReader, got {type(data).__name__}")


def check_range(n: int, start: int, stop: int) -> None:
    if not 0 <= start <= stop <= n:
        raise ValueError(f"rows [{start}, {stop}) are not within a split of {n} examples")


def shard_bounds(n: int, count: int) -> list[tuple[int, int]]:
    """``count`` contiguous parts of ``range(n)``, sizes differing by at most one:
    part ``i`` = ``[i*n//count, (i+1)*n//count)``."""
    if count < 1:
        raise ValueError(f"count must be positive, got {count}")
    return [(i * n // count, (i + 1) * n // count) for i in range(count)]


def even_part(n: int, index: int, count: int) -> tuple[int, int]:
    """Part ``index`` of :func:`shard_bounds` ``(n, count)``."""
    return shard_bounds(n, count)[index]


def _rng(seed: int, epoch: int, stream: int, shard: int) -> np.random.Generator:
    # Shard 0 draws from pipeline's one-device key, so a one-device run is unchanged.
    key = [int(seed), int(epoch), stream] + ([int(shard)] if shard else [])
    return np.random.default_rng(key)


def shard_order(n: int, *, shard: int, seed: int = 0, epoch: int = 0,
                shuffle: bool = True) -> np.ndarray:
    """One epoch's order of a shard's ``n`` examples (positions within the shard)."""
    if shard == 0:
        return epoch_order(n, seed=seed, epoch=epoch, shuffle=shuffle)
    return _rng(seed, epoch, 0, shard).permutation(n) if shuffle else np.arange(n)


def shard_transforms(n: int, *, shard: int, seed: int = 0, epoch: int = 0) -> np.ndarray:
    """One epoch's flip/rot90 codes (0..7) of a shard, one per position of its order."""
    return _rng(seed, epoch, 1, shard).integers(0, 8, size=n)


def shard_steps(n: int, batch_size: int, num_shards: int) -> int:
    """Global batches of ``batch_size`` in one epoch of ``n`` examples over ``num_shards``."""
    if batch_size % num_shards:
        raise ValueError(f"batch_size {batch_size} is not divisible by the {num_shards} devices")
    per = batch_size // num_shards
    return min(b - a for a, b in shard_bounds(n, num_shards)) // per


def shard_batches(local: Split, batch_size: int, *, total: int, num_shards: int,
                  shards: Sequence[int], seed: int = 0, epoch: int = 0, shuffle: bool = True,
                  augment: bool = False) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """This process's uint8 ``(images, masks)`` rows of every global batch of one epoch.

    ``total`` examples are cut into ``num_shards`` device shards; ``shards`` are this process's
    (consecutive) shard indices and ``local`` holds exactly their rows (what
    ``reader.read(first shard's start, last shard's stop)`` gives). Each yielded batch is
    ``len(shards) * batch_size // num_shards`` rows: each local device's rows, in device order.
    """
    shards = list(shards)
    if shards != list(range(shards[0], shards[0] + len(shards))):
        raise ValueError(f"a process's shards must be consecutive, got {shards}")
    bounds = shard_bounds(total, num_shards)
    base = bounds[shards[0]][0]
    if len(local) != bounds[shards[-1]][1] - base:
        raise ValueError(f"local split has {len(local)} examples; shards {shards} of {total} "
                         f"hold {bounds[shards[-1]][1] - base}")
    per = batch_size // num_shards
    steps = shard_steps(total, batch_size, num_shards)
    orders, codes = [], []
    for d in shards:
        a, b = bounds[d]
        orders.append(a - base + shard_order(b - a, shard=d, seed=seed, epoch=epoch,
                                             shuffle=shuffle))
        codes.append(shard_transforms(b - a, shard=d, seed=seed, epoch=epoch) if augment else None)
    for s in range(steps):
        rows = slice(s * per, (s + 1) * per)
        idx = np.concatenate([o[rows] for o in orders])
        images, masks = local.images[idx], local.masks[idx]
        if augment:
            images, masks = augment_examples(images, masks, np.concatenate([c[rows] for c in codes]))
        yield images, masks
