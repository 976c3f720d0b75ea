"""Process-group helpers for runs launched with ``torchrun`` (one process per GPU, or several CPU processes with gloo).

Generic on purpose (training and attack sweeps both use them): everything is a no-op in a plain single-process run,
so callers never branch on "am I distributed?" themselves. ``torchrun`` sets RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR and MASTER_PORT; ``init_distributed`` reads them.
"""

from __future__ import annotations

import atexit
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from robust_enc.errors import UserError

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class DistContext:
    """Where this process sits in the job. ``backend`` is "" for a single-process run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0  # index of this process on its machine: picks its GPU
    backend: str = ""  # "gloo" (CPU) or "nccl" (GPU) when distributed

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def env_world_size() -> int:
    """WORLD_SIZE as torchrun set it (1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


# NCCL's default collective timeout is 10 minutes: a long evaluation shard (Square, APGD at several eps on ImageNet)
# or an epoch's last rank still loading data would time out the rank that finished first.
TIMEOUT_S = 1800.0
_host_group: Any = None  # gloo group for decisions the host takes (empty batch): no GPU sync under nccl


def init_distributed(device: torch.device, *, timeout_s: float = TIMEOUT_S) -> tuple[DistContext, torch.device]:
    """Join the process group torchrun describes (gloo on CPU, nccl on GPU); return the context and this rank's device.

    The one init path of training and evaluation. ``device`` is the device the user asked for: on GPU each rank takes
    ``cuda:LOCAL_RANK`` (made the current CUDA device). Outside torchrun (WORLD_SIZE unset or 1, no group joined)
    nothing is initialised and ``device`` comes back unchanged. A process joins once (the CLI does it first): every
    later call returns the existing group's context, and the group stays until ``cleanup`` (the CLI's exit, or the
    interpreter's), because a destroyed default group cannot be re-created (peers connect to the dead one).
    """
    global _host_group
    joined = dist.is_available() and dist.is_initialized()
    world_size = dist.get_world_size() if joined else env_world_size()
    if world_size <= 1 and not joined:
        return DistContext(), device
    rank = dist.get_rank() if joined else int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise UserError(f"LOCAL_RANK {local_rank} but this machine has {torch.cuda.device_count()} GPUs: start "
                            "torchrun with --nproc_per_node at most the number of GPUs")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not joined:
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_s),
                                **({"device_id": device} if backend == "nccl" else {}))
        _host_group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s)) if backend == "nccl" \
            else None
        atexit.register(cleanup)
        log.info("rank %d/%d joined the %s process group on %s", rank, world_size, backend, device)
    return DistContext(rank, world_size, local_rank, dist.get_backend()), device


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """True on rank 0 (and in a single-process run): the one process that writes files and shows progress."""
    return get_rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def _collective_device() -> torch.device:
    # nccl only reduces CUDA tensors; gloo only CPU ones.
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(values: Sequence[float]) -> list[float]:
    """Element-wise sum of ``values`` over all ranks (float64, so sample counts stay exact up to 2^53)."""
    if not is_distributed():
        return [float(v) for v in values]
    tensor = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.cpu().tolist()


def any_rank(flag: bool) -> bool:
    """True when ``flag`` is true on at least one rank: lets every rank stop together (no rank left waiting)."""
    return all_reduce_sum([1.0 if flag else 0.0])[0] > 0


def broadcast_object(obj: T, src: int = 0) -> T:
    """Rank ``src``'s picklable ``obj`` on every rank (keep tensors inside it on the CPU)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=_collective_device())
    return box[0]


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's picklable ``obj``, in rank order."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def any_rank_host(flag: bool) -> bool:
    """``any_rank`` for a flag the host knows (a batch came back empty): reduced over gloo on the CPU even under
    nccl, so the decision costs no GPU synchronisation."""
    if not is_distributed():
        return flag
    tensor = torch.tensor([1 if flag else 0], dtype=torch.int64)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=_host_group)
    return bool(tensor.item())


def any_rank_tensor(flags: torch.Tensor) -> bool:
    """True when the device tensor ``flags`` holds a non-zero value on at least one rank (one collective and one
    host read: callers batch their checks, e.g. every N training steps)."""
    total = flags.detach().sum().to(torch.float64).reshape(1)
    if is_distributed():
        total = total.to(_collective_device())
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return bool(total.item() > 0)


def cleanup() -> None:
    """Leave the process group (safe to call when none was joined, and more than once)."""
    global _host_group
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _host_group = None


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
