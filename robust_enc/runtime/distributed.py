"""The process group of runs launched with ``torchrun`` (one process per GPU, or several CPU processes with gloo).

Generic on purpose (training and evaluation both use it): everything is a no-op in a plain single-process run,
so callers never branch on "am I distributed?" themselves. ``torchrun`` sets RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR and MASTER_PORT; ``init_distributed`` reads them.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from robust_enc.errors import UserError
from robust_enc.runtime.device import current_device, resolve_device, strict_fp32

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


def is_main_process() -> bool:
    """``is_main`` also before the process group is joined: then the rank torchrun set (RANK) decides."""
    return is_main() if is_distributed() else int(os.environ.get("RANK", "0")) == 0


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
    return _all_reduce(values, "SUM")


def all_reduce_max(values: Sequence[float]) -> list[float]:
    """Element-wise maximum of ``values`` over all ranks."""
    return _all_reduce(values, "MAX")


def _all_reduce(values: Sequence[float], op: str) -> list[float]:
    if not is_distributed() or not len(values):
        return [float(v) for v in values]
    tensor = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(tensor, op=getattr(dist.ReduceOp, op))
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


@contextlib.contextmanager
def evaluation_process(device_name: str) -> Iterator[tuple[int, int, torch.device]]:
    """(rank, world, device) for one evaluation, with ``device`` the current CUDA device throughout (ART's APGD builds
    its classifier on the current device) and attacks and GBR in strict fp32 (``runtime.device``).

    Under torchrun (WORLD_SIZE > 1) the process group is the one the CLI joined (or joined here, by the same path as
    training: timeout, ``device_id``), and it stays joined for the next stage: each rank on its own GPU."""
    ctx, device = init_distributed(resolve_device(device_name))
    with current_device(device), strict_fp32():
        yield ctx.rank, ctx.world_size, device
