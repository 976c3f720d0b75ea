"""The state of an evaluation that makes it resumable and shardable: per-(attack, eps) tallies, per-batch seeds,
the batch-level shard sampler, the ``torchrun`` rank and device and its reduction, and the progress file."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Sampler

from robust_enc.io import write_text_atomic

log = logging.getLogger(__name__)

# zero_grad / attacked on the clean tally: examples with an all-zero clean loss gradient / examples it was taken on;
# roundtrip_*: examples whose ART predict (numpy round trip) was compared with the clean pass / disagreed;
# ref_only / self_only: examples only the row's reference attack / only the row's attack broke; prev_eps_only /
# this_eps_only: examples the same attack broke only at the previous eps / only at this one (the checks' inputs).
SUM_FIELDS = ("n", "clean1", "clean5", "adv1", "adv5", "attacked", "zero_grad", "prob_like", "nonfinite",
              "roundtrip_checked", "roundtrip_mismatch", "ref_only", "self_only", "prev_eps_only", "this_eps_only")
MAX_FIELDS = ("max_pert", "box_excess", "wall_s")  # wall_s: summed over batches, max over ranks
Tallies = dict[str, dict[str, float]]  # "attack@eps" -> counts and maxima


def tally_key(attack: str, eps: float) -> str:
    return f"{attack}@{eps!r}"


def new_tally() -> dict[str, float]:
    return {name: 0 for name in SUM_FIELDS} | {name: 0.0 for name in MAX_FIELDS}


def seed_for(seed: int, batch: int, attack: str, eps: float) -> int:
    """The seed of one (global batch, attack, eps): the same whichever other batches, attacks or processes run."""
    text = f"{seed}|{batch}|{attack}|{eps!r}"
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")


def seed_everything(seed: int) -> None:
    """Seed random, numpy and torch together: ART's random starts draw from numpy's global RNG."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@contextlib.contextmanager
def restored_rng() -> Iterator[None]:
    """Per-batch seeding must not leak into the caller's random streams."""
    state = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None  # manual_seed seeds CUDA too
    try:
        yield
    finally:
        random.setstate(state[0])
        np.random.set_state(state[1])
        torch.random.set_rng_state(state[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


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


@contextlib.contextmanager
def distributed(device_name: str) -> Iterator[tuple[int, int, torch.device]]:
    """(rank, world, device) for one evaluation, with ``device`` the current CUDA device throughout (ART's APGD builds
    its classifier on the current device) and attacks and GBR in strict fp32 (``robust_enc.device``).

    Under torchrun (WORLD_SIZE > 1) the process group is the one the CLI joined (or joined here, by the same path as
    training: timeout, ``device_id``), and it stays joined for the next stage: each rank on its own GPU."""
    from robust_enc.cli import resolve_device
    from robust_enc.device import current_device, strict_fp32
    from robust_enc.train.distributed import init_distributed

    ctx, device = init_distributed(resolve_device(device_name))
    with current_device(device), strict_fp32():
        yield ctx.rank, ctx.world_size, device


def all_reduce(tallies: Tallies, gbr_sums: list[float], world: int,
                device: torch.device) -> None:
    """Sum the counts, max the maxima, across ranks, in place (keys are the same on every rank: from the config)."""
    if world <= 1:
        return
    import torch.distributed as dist

    keys = sorted(tallies)
    on = device if dist.get_backend() == "nccl" else torch.device("cpu")
    sums = torch.tensor([[tallies[k][f] for f in SUM_FIELDS] for k in keys], dtype=torch.float64, device=on)
    maxima = torch.tensor([[tallies[k][f] for f in MAX_FIELDS] for k in keys], dtype=torch.float64, device=on)
    extra = torch.tensor(gbr_sums, dtype=torch.float64, device=on)
    dist.all_reduce(sums, op=dist.ReduceOp.SUM)
    dist.all_reduce(maxima, op=dist.ReduceOp.MAX)
    if len(gbr_sums):
        dist.all_reduce(extra, op=dist.ReduceOp.SUM)
    for i, k in enumerate(keys):
        tallies[k].update({f: int(v) for f, v in zip(SUM_FIELDS, sums[i].tolist())})
        tallies[k].update(dict(zip(MAX_FIELDS, maxima[i].tolist())))
    gbr_sums[:] = extra.tolist()


# ------------------------------------------------------------------------------------------------ progress file
def progress_path(out: Path, key: str) -> Path:
    """The progress file of one evaluation (``key``: its config, checkpoint, rank and world): keyed by the run, not the
    results file, so runs that share one results file never resume (or discard) each other's progress."""
    return out.with_name(f"{out.name}.progress.{key}.json")


def load_progress(path: Path, key: str) -> tuple[int, Tallies] | None:
    if not path.is_file():
        return None
    try:
        state = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        log.warning("ignoring unreadable progress file %s", path)
        return None
    if state.get("key") != key:
        log.warning("progress file %s belongs to another config or checkpoint: starting afresh", path)
        return None
    return int(state["next_batch"]), state["tallies"]


def save_progress(path: Path, key: str, next_batch: int, tallies: Tallies) -> None:
    write_text_atomic(path, json.dumps({"key": key, "next_batch": next_batch, "tallies": tallies}))
