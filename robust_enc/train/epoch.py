"""One pass over the training data (``train_one_epoch``: the recipe's steps, the divergence checks, the sums over
ranks) and one over evaluation data (``evaluate``: top-1 / top-5 and the loss), and the ``Progress`` events the
training loop sends to its caller."""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from robust_enc.errors import UserError
from robust_enc.images import loader_levels, to_float_images
from robust_enc.models import top_k_hits
from robust_enc.runtime import distributed as D

log = logging.getLogger(__name__)

NAN = float("nan")
# Training steps between reads of the loss (each read waits for the GPU): an inf/NaN loss raises at most this late.
FINITE_CHECK_EVERY = 20
TOP5_MIN_CLASSES = 11  # as in results.py: top-5 of 10 or fewer classes says little, so it is NaN there


class Progress:
    """The training loop's events, for a caller that watches a run (tests stop it after an epoch). This base class
    ignores them; the loop itself reports to the progress display (``runtime.progress``)."""

    def start(self, *, run_id: str, first_epoch: int, epochs: int, batches: int) -> None: ...

    def start_epoch(self, epoch: int, lr: float) -> None: ...

    def advance(self, images: int, loss: float) -> None: ...

    def end_epoch(self, row: dict[str, Any]) -> None: ...

    def finish(self) -> None: ...


class NonFiniteLoss(UserError):
    """The run diverged: a NaN/inf loss or weights, or a loss above ``loss_limit`` (see ``exploded_loss``)."""


# Cross-entropy at chance is ln(classes) (2.3 for 10); a loss 10^4 times that (regularizer terms included) is no
# working run's: it has diverged (lr 1e3 on digits reaches 5e13 in its first epoch while staying finite).
EXPLODED_LOSS_FACTOR = 1e4


def exploded_loss(num_classes: int) -> float:
    """The training loss above which a run is stopped as diverged."""
    return EXPLODED_LOSS_FACTOR * math.log(max(num_classes, 2))


def _levels(loader: Iterable, device: torch.device) -> torch.Tensor | None:
    """The byte -> float table of a DataLoader sending uint8 images (``images.uint8_view``), on ``device``."""
    return loader_levels(loader, device) if isinstance(loader, DataLoader) else None


def _to_device(x: torch.Tensor, y: torch.Tensor, device: torch.device, channels_last: bool,
               levels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch on the device; uint8 images become floats there (a quarter of the bytes cross)."""
    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    x = to_float_images(x, levels)
    if channels_last and x.ndim == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y


def train_one_epoch(model: nn.Module, loader: Iterable, recipe: Any, optimizer: torch.optim.Optimizer, *,
                    device: torch.device, epoch: int, autocast: Callable[[], Any] = contextlib.nullcontext,
                    scaler: torch.amp.GradScaler | None = None, channels_last: bool = False,
                    progress: Progress | None = None, loss_limit: float = math.inf,
                    check_every: int = FINITE_CHECK_EVERY) -> dict[str, float]:
    """One pass over ``loader`` with ``recipe.train_step``; sums are reduced over ranks.

    Returns train_loss (mean per example), train_top1_running (fraction of the step's hard labels its train-mode
    logits got right, on the transformed/mixed inputs: not a clean accuracy), samples_seen (all ranks), images_per_s.

    The loss and hit counts are summed on the device and read every ``check_every`` steps (and at the end): a NaN or
    infinite loss, or one above ``loss_limit``, on any rank then raises NonFiniteLoss on every rank together, at most
    ``check_every`` steps late (the checkpoint of the last good epoch is what is kept either way). A batch whose
    images were all unreadable is skipped by every rank together (decided on the host, without a GPU sync): one rank
    alone skipping would leave the others waiting in DDP's gradient all-reduce. ``progress`` gets the loss of the
    last checked step.
    """
    progress = progress or Progress()
    world = D.get_world_size()
    model.train()
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # loss x n, hits
    seen = 0
    nonfinite = torch.zeros((), dtype=torch.int64, device=device)  # steps with an inf/NaN loss since the last check
    first_bad = torch.full((), -1, dtype=torch.int64, device=device)  # this epoch's first such step (0-based)
    first_bad_loss = torch.zeros((), device=device)  # and its loss
    skipped = 0
    last_loss = NAN
    levels = _levels(loader, device)
    start = time.perf_counter()

    def check() -> None:
        if not D.any_rank_tensor(nonfinite):
            return
        lr = optimizer.param_groups[0]["lr"]
        bad_step = int(first_bad)
        if bad_step < 0:
            raise NonFiniteLoss(f"the training loss became inf/NaN or passed the divergence limit {loss_limit:.3g} on "
                                f"another process at epoch {epoch + 1} (lr {lr:.4g})")
        value = float(first_bad_loss)
        exploded = f", above the divergence limit {loss_limit:.3g}" if math.isfinite(value) else ""
        raise NonFiniteLoss(f"the training loss became {value:.4g}{exploded} at epoch {epoch + 1}, step "
                            f"{bad_step + 1} (lr {lr:.4g})")

    for step, (x, y) in enumerate(loader):
        if D.any_rank_host(len(y) == 0) if world > 1 else len(y) == 0:
            skipped += 1
            continue
        x, y = _to_device(x, y, device, channels_last, levels)
        result = recipe.train_step(model, x, y, optimizer, autocast=autocast, scaler=scaler)
        loss = result.loss_on_device
        bad = ~torch.isfinite(loss) | (loss > loss_limit)
        nonfinite += bad
        new_bad = bad & (first_bad < 0)
        first_bad = torch.where(new_bad, step, first_bad)
        first_bad_loss = torch.where(new_bad, loss.detach().float(), first_bad_loss)
        sums += torch.stack([loss.double() * result.n, result.correct_on_device.double()])
        seen += result.n
        if step % check_every == 0:  # every rank has the same number of steps (GlobalBatchSampler): checks line up
            check()
            last_loss = float(loss)
        progress.advance(result.n * world, last_loss)
    check()
    if skipped:
        log.warning("epoch %d: %d batch(es) skipped: every image of the batch was unreadable on at least one process",
                    epoch + 1, skipped)
    loss_sum, correct, seen = D.all_reduce_sum([*sums.tolist(), seen])
    seconds = time.perf_counter() - start
    return {"train_loss": loss_sum / max(seen, 1), "train_top1_running": correct / max(seen, 1),
            "samples_seen": int(seen), "images_per_s": seen / seconds if seconds > 0 else NAN}


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, *, device: torch.device,
             autocast: Callable[[], Any] = contextlib.nullcontext, channels_last: bool = False,
             num_classes: int | None = None) -> dict[str, float]:
    """Top-1 / top-5 accuracy (fractions) and mean cross-entropy of ``model`` in eval mode over ``loader`` (this
    rank's shard; the counts are summed over ranks). Top-5 is NaN with fewer than TOP5_MIN_CLASSES classes
    (``num_classes``; None = the width of the logits)."""
    was_training = model.training
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, top-1 hits, top-5 hits, n
    levels = _levels(loader, device)
    for x, y in loader:
        if len(y) == 0:
            continue
        x, y = _to_device(x, y, device, channels_last, levels)
        with autocast():
            logits = model(x)
        logits = logits.float()
        num_classes = num_classes or logits.shape[1]
        hits = top_k_hits(logits, y, 5)
        totals += torch.stack([F.cross_entropy(logits, y, reduction="sum").double(), hits[:, 0].sum().double(),
                               hits.any(dim=1).sum().double(), torch.tensor(len(y), device=device).double()])
    model.train(was_training)
    loss, top1, top5, n = D.all_reduce_sum(totals.tolist())
    if n == 0:
        raise UserError("the evaluation split has no readable examples")
    return {"top1": top1 / n, "top5": top5 / n if (num_classes or 0) >= TOP5_MIN_CLASSES else NAN, "loss": loss / n,
            "n": int(n)}
