"""How data is split over the processes of a ``torchrun`` job: disjoint index shards, training's global batches and
evaluation's whole-batch shards. Every split covers each example exactly once (no padding, no dropping)."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

from robust_enc.errors import UserError


def shard_indices(size: int, rank: int, world_size: int) -> list[int]:
    """Every world_size-th index from ``rank``: disjoint shards covering range(size) exactly once, no padding
    (torch's DistributedSampler pads with repeats, which would count some examples twice in an evaluation)."""
    return list(range(rank, size, world_size))


class GlobalBatchSampler(Sampler[list[int]]):
    """Batches of a data set for one rank, cut from *global* batches of ``batch_size`` examples.

    The order is a permutation drawn from (seed, epoch) alone, cut into global batches; rank r takes items r,
    r + world, ... of each. So every epoch visits each example exactly once summed over ranks (no padding, no
    dropping), the global batches do not depend on the number of processes (but for the tail rule below), and
    resuming needs no sampler state. Per-rank batches hold batch_size / world examples (one more or less when it
    does not divide).
    A trailing global batch with fewer than 2 x world_size examples is merged into the previous one, so every rank
    gets the same number of non-empty batches (uneven counts would leave a rank waiting in all-reduce) and the tail
    gives no rank a batch of one (a train-mode BN on a 1x1 feature map cannot normalize it; batch sizes below
    2 x world_size are checked by the training loop). Call ``set_epoch`` before each epoch, as with
    DistributedSampler.
    """

    def __init__(self, size: int, batch_size: int, *, shuffle: bool = True, seed: int = 0, rank: int = 0,
                 world_size: int = 1) -> None:
        if batch_size < world_size:
            raise UserError(f"--batch-size {batch_size} is the global batch: it must be at least the number of "
                            f"processes ({world_size})")
        if size < world_size:
            raise UserError(f"the training set has {size} examples, fewer than the {world_size} processes")
        self.size, self.batch_size, self.shuffle, self.seed = size, batch_size, shuffle, seed
        self.rank, self.world_size, self.epoch = rank, world_size, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _global_batches(self) -> list[torch.Tensor]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.size, generator=generator)
        else:
            order = torch.arange(self.size)
        batches = list(order.split(self.batch_size))
        if len(batches) > 1 and len(batches[-1]) < 2 * self.world_size:
            batches[-2:] = [torch.cat(batches[-2:])]
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self._global_batches():
            yield batch[self.rank::self.world_size].tolist()

    def __len__(self) -> int:
        full, rest = divmod(self.size, self.batch_size)
        return full + (1 if rest >= 2 * self.world_size or full == 0 else 0)


class ShardSampler(Sampler[int]):
    """Indices of global batches ``rank, rank + world, ...`` from the ``start``-th of this rank's batches, in order.

    With the same batch size, the DataLoader's batches are exactly those global batches (only the last global batch
    can be short, and it is the last of its rank), so every batch holds the same images in any number of processes."""

    def __init__(self, size: int, batch_size: int, rank: int = 0, world: int = 1, start: int = 0) -> None:
        self.size, self.batch_size = size, batch_size
        self.batches = list(range(rank, math.ceil(size / batch_size), world))[start:]

    def __iter__(self) -> Iterator[int]:
        for b in self.batches:
            yield from range(b * self.batch_size, min((b + 1) * self.batch_size, self.size))

    def __len__(self) -> int:
        return sum(min((b + 1) * self.batch_size, self.size) - b * self.batch_size for b in self.batches)
