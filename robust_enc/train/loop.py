"""The training loop: one ``TrainConfig`` -> one run folder, on the CPU, one GPU, or many through ``torchrun``.

torchvision-reference shape (verb-named ``train_one_epoch`` / ``evaluate``); everything regularizer-specific sits in
the ``Recipe`` of ``train.recipe`` (param groups, batch transforms, loss terms, SAM-style double steps), so this
file knows nothing about ENC, CutMix or label smoothing.

Run folder ``<out_dir>/<run_id>/``: ``config.json`` (written first), ``checkpoint.pt`` (after every epoch, atomic,
with everything ``resume`` needs), ``metrics.csv`` (one row per epoch, rewritten atomically), ``model_card.json`` at the
end, and ``exported.pt`` (the baked plain model) plus ``exported.ts`` (it as TorchScript) when asked. Only rank 0
writes.

Exact resume: the sample order is a function of (seed, epoch) (``GlobalBatchSampler``), DataLoader workers are seeded
from (seed, epoch, rank), and the torch / numpy / python RNG states of every rank are stored at each epoch's end and
restored on resume, so on the CPU a run stopped after epoch k and resumed ends bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from robust_enc.checkpoint import CHECKPOINT_NAME, load_state_strict, save_checkpoint
from robust_enc.config import config_to_dict
from robust_enc.data import DATASETS, balanced_subset, build_dataset, build_loader, evaluation_split
from robust_enc.errors import UserError
from robust_enc.images import collate_readable, loader_levels, to_float_images, uint8_view
from robust_enc.io import write_text_atomic
from robust_enc.models import MODELS, ModelSpec, build_network, top_k_hits, weight_norms
from robust_enc.regularizers import canonical_spec, prepare_model, run_name
from robust_enc.runtime import distributed as D
from robust_enc.runtime.device import resolve_device
from robust_enc.runtime.seeding import capture_rng, restore_rng, seed_everything, stream_seed
from robust_enc.runtime.sharding import GlobalBatchSampler, shard_indices
from robust_enc.train.recipe import build_recipe
from robust_enc.train.run_folder import (
    EXPORT_NAME,
    TORCHSCRIPT_NAME,
    _decide_on_rank0,
    finish_run,
    upgrade_row,
    write_metrics,
)

log = logging.getLogger(__name__)

NAN = float("nan")
AMP_DTYPES: dict[str, torch.dtype | None] = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
TRAIN_EVAL_SIZE = 10_000  # training examples for the clean train top-1 at the end (class-balanced subset)
# Training steps between reads of the loss (each read waits for the GPU): an inf/NaN loss raises at most this late.
FINITE_CHECK_EVERY = 20
TOP5_MIN_CLASSES = 11  # as in results.py: top-5 of 10 or fewer classes says little, so it is NaN there
# Short data set names for run ids; others are used as given (made filesystem-safe).
DATASET_SHORT = {"fashion-mnist": "fmnist", "cifar10": "c10", "cifar100": "c100", "imagenet": "in1k"}


@dataclass(frozen=True)
class TrainConfig:
    """One training run. Defaults follow the paper's ImageNet recipe (section 4) except the model and data set."""

    model: str = "resnet20"  # model registry name
    dataset: str = "digits"  # data set registry name
    data_dir: str | None = None  # folder holding the data set files
    download: bool = False  # let torchvision download the data set (network)
    subset: int = 0  # examples of the training split (deterministic, class-balanced); 0 = all
    val_subset: int = 0  # examples of the evaluation split; 0 = all
    image_size: int | None = None  # pixels (side) for folder/ImageNet data; None = the data set's default (224)
    regularizer: str = "baseline"  # regularizer spec, e.g. "enc+cutmix+ls"; stored canonical
    epochs: int = 100  # passes over the training set
    batch_size: int = 256  # global batch: images per optimizer step over all processes (paper: 8 GPUs x 32)
    lr: float = 0.1  # learning rate at the start (after warmup); not rescaled with the batch size
    momentum: float = 0.9  # SGD momentum
    weight_decay: float = 1e-4  # L2 coefficient on conv/linear weights (the recipe decides which params decay)
    schedule: str = "step"  # "step": lr / 10 every step_epochs (paper); "cosine": to 0 at the last epoch
    step_epochs: int = 30  # epochs between lr drops of the step schedule
    warmup_epochs: int = 0  # epochs of linear warmup (per epoch: lr * (e + 1) / (warmup_epochs + 1))
    amp: str = "none"  # "none", "bf16" or "fp16" autocast (fp16 needs a GPU: it uses a GradScaler)
    channels_last: bool = False  # NHWC memory format (faster convolutions on GPU and on this CPU)
    compile: bool = False  # torch.compile the training model
    sync_bn: bool = False  # SyncBatchNorm across GPUs (multi-GPU runs only)
    seed: int = 0  # model init, sample order, augmentation
    device: str = "auto"  # auto, cpu, cuda, cuda:N (under torchrun each rank takes cuda:LOCAL_RANK)
    workers: int = 0  # DataLoader worker processes per rank
    out_dir: str = "runs"  # parent of the run folder
    run_id: str = ""  # run folder name; "" = f"{model}-{dataset_short}-{run_name(spec)}-s{seed}[-n{subset}]"
    gbr_probe_size: int = 256  # fixed evaluation examples for the per-epoch GBR estimate (eq. 18); 0 = skip GBR
    gbr_every: int = 1  # epochs between GBR estimates (the last epoch always has one); the others are NaN
    resume: bool = False  # continue an interrupted run in the same folder
    export: bool = False  # also write exported.pt (the baked plain model, no ENC/WN/WS) and exported.ts (TorchScript)


# ------------------------------------------------------------------------------------------------ config checks
def _check(condition: bool, message: str) -> None:
    if not condition:
        raise UserError(message)


def dataset_short(name: str) -> str:
    """A short, filesystem-safe data set name for run ids: ``fashion-mnist`` -> ``fmnist``, ``folder:/d/imgs`` ->
    ``folder-imgs``."""
    key, _, argument = name.partition(":")
    text = f"{key}-{Path(argument.rstrip('/')).name or argument}" if argument else DATASET_SHORT.get(key, key)
    return _safe(text)


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+=-]+", "_", text).strip("_")


def default_run_id(config: TrainConfig, spec: str) -> str:
    subset = f"-n{config.subset}" if config.subset else ""
    return _safe(f"{config.model}-{dataset_short(config.dataset)}-{run_name(spec)}-s{config.seed}{subset}")


def resolve_config(config: TrainConfig) -> TrainConfig:
    """Check every setting that can be checked without data, canonicalize the regularizer and fill the run id.

    Raises UserError with what was wrong and what to do; nothing is read or written before this passes."""
    _check(config.epochs >= 1, f"epochs must be >= 1, got {config.epochs}")
    _check(config.batch_size >= 1, f"batch size must be >= 1, got {config.batch_size}")
    _check(config.lr > 0 and math.isfinite(config.lr), f"lr must be a positive number, got {config.lr}")
    _check(0 <= config.momentum < 1, f"momentum must be in [0, 1), got {config.momentum}")
    _check(config.weight_decay >= 0, f"weight decay must be >= 0, got {config.weight_decay}")
    _check(config.schedule in SCHEDULES, f"schedule must be one of {', '.join(SCHEDULES)}, got {config.schedule!r}")
    _check(config.step_epochs >= 1, f"step_epochs must be >= 1, got {config.step_epochs}")
    _check(0 <= config.warmup_epochs < config.epochs,
           f"warmup_epochs must be in [0, epochs), got {config.warmup_epochs} with {config.epochs} epochs")
    _check(config.amp in AMP_DTYPES, f"amp must be one of {', '.join(AMP_DTYPES)}, got {config.amp!r}")
    _check(config.subset >= 0 and config.val_subset >= 0, "subset sizes must be >= 0 (0 = the whole split)")
    _check(config.gbr_probe_size >= 0, f"gbr_probe_size must be >= 0 (0 = no GBR), got {config.gbr_probe_size}")
    _check(config.gbr_every >= 1, f"gbr_every must be >= 1 (epochs between GBR estimates), got {config.gbr_every}")
    _check(config.workers >= 0, f"workers must be >= 0, got {config.workers}")
    _check(config.image_size is None or config.image_size >= 1, f"image size must be >= 1, got {config.image_size}")
    _check_out_dir(Path(config.out_dir))
    MODELS.lookup(config.model)  # unknown names fail here, with a did-you-mean, before any data is read
    DATASETS.lookup(config.dataset)
    spec = canonical_spec(config.regularizer)
    run_id = config.run_id or default_run_id(config, spec)
    _check(run_id not in (".", "..") and _safe(run_id) == run_id,
           f"run id {run_id!r} must be a plain folder name (letters, digits, . _ + = -)")
    return dataclasses.replace(config, regularizer=spec, run_id=run_id)


def _check_out_dir(out_dir: Path) -> None:
    """The first existing path on the way to ``out_dir`` must be a folder (the rest is created)."""
    for path in (out_dir, *out_dir.parents):
        if path.exists():
            _check(path.is_dir(), f"--out-dir {out_dir}: {path} is a file, not a folder; give a folder (missing ones "
                                  "are created)")
            return


def _check_batch_norm_batch(net: nn.Module, input_shape: tuple[int, int, int], batch_size: int,
                            world_size: int) -> None:
    """Train-mode BN needs more than one value per channel: with per-process batches of one (global batch < 2 x
    processes), a BN layer on a 1x1 feature map fails mid-run. Found up front by one eval-mode forward of one image
    (weights, BN statistics and random streams untouched); skipped for batches of two or more per process."""
    if batch_size >= 2 * world_size:
        return
    names = {m: name for name, m in net.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    single: list[str] = []

    def record(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        if args[0][0, 0].numel() == 1 and not single:  # one image: values per channel = its spatial size
            single.append(names[module])

    hooks = [m.register_forward_pre_hook(record) for m in names]
    was_training = net.training
    try:
        net.eval()
        with torch.no_grad():
            net(torch.zeros(1, *input_shape))
    finally:
        net.train(was_training)
        for hook in hooks:
            hook.remove()
    _check(not single, f"--batch-size {batch_size} over {world_size} process(es) gives batches of one image, and BN "
                       f"layer {single[0] if single else ''} then sees one value per channel (a 1x1 feature map); use "
                       f"--batch-size >= {2 * world_size} (2 x processes)")


def _check_device(config: TrainConfig, device: torch.device, world_size: int) -> None:
    _check(not (config.amp == "fp16" and device.type == "cpu"),
           "amp fp16 needs a GPU (its GradScaler guards fp16 gradients); on the CPU use --amp bf16 or none")
    _check(not (config.sync_bn and device.type == "cpu" and world_size > 1),
           "sync-BN works on GPUs only (torch's SyncBatchNorm); drop --sync-bn for CPU processes")


def build_training_model(spec: ModelSpec, *, sync_bn: bool = False) -> nn.Module:
    """``build_model(spec)``, with every BatchNorm a SyncBatchNorm when ``sync_bn``. The conversion replaces the BN
    modules, so it comes before the regularizer's hooks and parametrizations are attached: converted afterwards, the
    DropBlock hooks on BN layers would silently vanish (ResNet-50 enc+dropblock: 9 hooks before, 0 after)."""
    net = build_network(spec)
    if sync_bn:
        net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
    return prepare_model(net, spec.regularizer)


# ------------------------------------------------------------------------------------------------ lr schedule
SCHEDULES: dict[str, Callable[[TrainConfig, int], float]] = {
    "step": lambda c, epoch: 0.1 ** (epoch // c.step_epochs),
    "cosine": lambda c, epoch: 0.5 * (1 + math.cos(math.pi * (epoch - c.warmup_epochs)
                                                    / max(1, c.epochs - c.warmup_epochs))),
}


def lr_factor(config: TrainConfig, epoch: int) -> float:
    """Multiplier of the base lr during ``epoch`` (0-based): linear warmup, then the schedule. A pure function of the
    config, so a resumed run needs no scheduler object to restore."""
    if epoch < config.warmup_epochs:
        return (epoch + 1) / (config.warmup_epochs + 1)
    return SCHEDULES[config.schedule](config, epoch)


def set_lr(optimizer: torch.optim.Optimizer, factor: float) -> float:
    """Set every group's lr to its ``initial_lr`` x factor; return the first group's lr."""
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * factor
    return optimizer.param_groups[0]["lr"]


# ------------------------------------------------------------------------------------------------ progress
class Progress:
    """Receives the loop's events. This base class ignores them (non-main ranks); ``LogProgress`` logs them; the
    CLI renders rich bars (library code only logs)."""

    def start(self, *, run_id: str, first_epoch: int, epochs: int, batches: int) -> None: ...

    def start_epoch(self, epoch: int, lr: float) -> None: ...

    def advance(self, images: int, loss: float) -> None: ...

    def end_epoch(self, row: dict[str, Any]) -> None: ...

    def finish(self) -> None: ...


class LogProgress(Progress):
    """One log line per epoch, and one every ``every_s`` seconds inside long epochs."""

    def __init__(self, every_s: float = 60.0) -> None:
        self.every_s, self.epochs, self.batches = every_s, 0, 0

    def start(self, *, run_id: str, first_epoch: int, epochs: int, batches: int) -> None:
        self.epochs, self.batches = epochs, batches
        log.info("run %s: epochs %d..%d, %d batches per epoch", run_id, first_epoch + 1, epochs, batches)

    def start_epoch(self, epoch: int, lr: float) -> None:
        self.epoch, self.step, self.images, self.t0 = epoch, 0, 0, time.perf_counter()
        self.last = self.t0

    def advance(self, images: int, loss: float) -> None:
        self.step, self.images = self.step + 1, self.images + images
        now = time.perf_counter()
        if now - self.last >= self.every_s:
            self.last = now
            rate = self.images / (now - self.t0)
            eta = (self.batches - self.step) * (now - self.t0) / self.step
            log.info("epoch %d/%d batch %d/%d loss %.4f %.0f img/s eta %.0f s", self.epoch + 1, self.epochs,
                     self.step, self.batches, loss, rate, eta)

    def end_epoch(self, row: dict[str, Any]) -> None:
        log.info("epoch %d/%d lr %.4g train loss %.4f running top1 %.4f val top1 %.4f gbr %.4g |W|^2 %.4g %.1f s "
                 "(%.0f img/s)", row["epoch"], self.epochs, row["lr"], row["train_loss"], row["train_top1_running"],
                 row["val_top1"], row["gbr"], row["weight_sq_norm"], row["wall_s"], row["images_per_s"])


# ------------------------------------------------------------------------------------------------ steps
class NonFiniteLoss(UserError):
    """The run diverged: a NaN/inf loss or weights, or a loss above ``loss_limit`` (see ``exploded_loss``)."""


# Cross-entropy at chance is ln(classes) (2.3 for 10); a loss 10^4 times that (regularizer terms included) is no
# working run's: it has diverged (lr 1e3 on digits reaches 5e13 in its first epoch while staying finite).
EXPLODED_LOSS_FACTOR = 1e4


def exploded_loss(num_classes: int) -> float:
    """The training loss above which a run is stopped as diverged."""
    return EXPLODED_LOSS_FACTOR * math.log(max(num_classes, 2))


def _levels(loader: Iterable, device: torch.device) -> torch.Tensor | None:
    """The byte -> float table of a DataLoader sending uint8 images (``data.uint8_view``), on ``device``."""
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


def clean_train_split(config: TrainConfig, data_kw: dict[str, Any]) -> Dataset:
    """The training examples the run trains on (its --subset), without augmentation (the evaluation transform, as
    the validation split), cut to a deterministic class-balanced TRAIN_EVAL_SIZE when larger."""
    data, _ = build_dataset(config.dataset, "train", subset=config.subset, augment=False, **data_kw)
    return balanced_subset(data, TRAIN_EVAL_SIZE)


def measure_probe_gbr(model: nn.Module, loader: Iterable | None, device: torch.device) -> tuple[float, float]:
    """(GBR, its standard error) of ``model`` on the fixed probe batches: eq. 18 on logits, eval mode, seed 0."""
    if loader is None:
        return NAN, NAN
    from robust_enc.gbr import measure_gbr  # lazy: gbr.py is its own subsystem and CLI command

    result = measure_gbr(model, loader, output="logits", method="auto", device=device, seed=0)
    return result.mean, result.stderr


def all_finite(model: nn.Module) -> bool:
    """True when every floating-point parameter and buffer is finite (one sync for the whole model)."""
    tensors = [t for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()]
    return bool(torch.stack([t.isfinite().all() for t in tensors]).all()) if tensors else True


# ------------------------------------------------------------------------------------------------ train
def train(config: TrainConfig, *, progress: Progress | None = None) -> Path:
    """Train one run; return its folder. A finished run (same config, epochs reached) is skipped; an interrupted one
    continues with ``resume=True``. Under torchrun every rank calls this; rank 0 writes the files."""
    config = resolve_config(config)
    device = resolve_device(config.device)
    _check_device(config, device, D.env_world_size())
    ctx, device = D.init_distributed(device)  # joined once per process (by the CLI), kept for the next stage
    return _train(dataclasses.replace(config, device=str(device)), device, ctx,
                  progress if ctx.is_main and progress is not None else LogProgress() if ctx.is_main else Progress())


def _train(config: TrainConfig, device: torch.device, ctx: D.DistContext, progress: Progress) -> Path:
    run_dir = Path(config.out_dir) / config.run_id
    data_kw: dict[str, Any] = dict(data_dir=config.data_dir, download=config.download, image_size=config.image_size)
    train_set, train_info = build_dataset(config.dataset, "train", subset=config.subset, augment=True, **data_kw)
    eval_split = evaluation_split(config.dataset)
    val_set, _ = build_dataset(config.dataset, eval_split, subset=config.val_subset, **data_kw)
    recipe = build_recipe(config.regularizer, num_classes=train_info.num_classes, batch_size=config.batch_size,
                          weight_decay=config.weight_decay)
    sampler = GlobalBatchSampler(len(train_set), config.batch_size, seed=config.seed, rank=ctx.rank,
                                   world_size=ctx.world_size)
    spec = ModelSpec(config.model, train_info.num_classes, train_info.input_shape, train_info.mean, train_info.std,
                     regularizer=config.regularizer)
    kind, ckpt = _decide_on_rank0(run_dir, config)
    if kind == "finished":
        log.info("%s already finished (%d epochs): skipping", run_dir, config.epochs)
        exports = (EXPORT_NAME, TORCHSCRIPT_NAME) if config.export else ()
        missing = not all((run_dir / name).is_file() for name in ("model_card.json", *exports))
        if ctx.is_main and missing:  # stopped between the last checkpoint and the card, or export asked for now
            finish_run(run_dir, config)
        D.barrier()
        return run_dir

    seed_everything(config.seed)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    net = build_training_model(spec, sync_bn=ctx.distributed and config.sync_bn)
    _check_batch_norm_batch(net, train_info.input_shape, config.batch_size, ctx.world_size)
    if ckpt is not None:
        load_state_strict(net, ckpt.state_dict, str(run_dir / CHECKPOINT_NAME))
    if ctx.rank > 0:  # each rank its own augmentation stream
        seed_everything(stream_seed(config.seed, ctx.rank))
    net.to(device)
    if config.channels_last:
        net.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(recipe.param_groups(net), lr=config.lr, momentum=config.momentum)
    for group in optimizer.param_groups:
        group["initial_lr"] = group["lr"]
    amp_dtype = AMP_DTYPES[config.amp]
    autocast = functools.partial(torch.autocast, device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext
    scaler = torch.amp.GradScaler(device.type) if config.amp == "fp16" else None
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input sizes: let cuDNN pick the fastest kernels

    # What resume needs, from rank 0 to all (the weights travel through DDP's own broadcast at construction).
    state = None
    if kind == "resume" and ckpt is not None:
        state = {k: ckpt.extra[k] for k in ("epoch", "optimizer", "scaler", "rng", "history")}
    state = D.broadcast_object(state)
    history: list[dict[str, Any]] = []
    first_epoch = 0
    if state is not None:
        first_epoch, history = int(state["epoch"]), [upgrade_row(row) for row in state["history"]]
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and state["scaler"]:
            scaler.load_state_dict(state["scaler"])
        if len(state["rng"]) == ctx.world_size:
            restore_rng(state["rng"][ctx.rank], device)
        else:  # another number of processes: exactness is lost anyway, keep the streams distinct
            log.warning("resuming with %d processes, the run had %d: fresh random streams", ctx.world_size,
                        len(state["rng"]))
            seed_everything(stream_seed(config.seed, ctx.rank, first_epoch))
        log.info("resuming %s after epoch %d", run_dir, first_epoch)

    train_model: nn.Module = net
    if ctx.distributed:
        train_model = nn.parallel.DistributedDataParallel(net, device_ids=[device] if device.type == "cuda" else None)
    if config.compile:
        train_model = torch.compile(train_model)
    loader_generator = torch.Generator()
    # Our own batch sampler (build_loader takes per-item samplers only): same collation and pinning as build_loader.
    # Workers send uint8 images where the set has them (converted on the device in train_one_epoch). They are
    # re-forked each epoch, not persistent: their augmentation streams are seeded per (seed, epoch,
    # rank) below, which is what makes a resumed run bit-identical (persistent workers are seeded once).
    train_loader = DataLoader(uint8_view(train_set), batch_sampler=sampler, num_workers=config.workers,
                              collate_fn=collate_readable, pin_memory=device.type == "cuda",
                              generator=loader_generator)
    val_shard = Subset(val_set, shard_indices(len(val_set), ctx.rank, ctx.world_size)) if ctx.distributed \
        else val_set
    eval_batch = max(1, config.batch_size // ctx.world_size)
    val_loader = build_loader(val_shard, batch_size=eval_batch, workers=config.workers, uint8=True)
    probe_loader = None
    if ctx.is_main and config.gbr_probe_size > 0:
        probe_set, _ = build_dataset(config.dataset, eval_split, subset=config.gbr_probe_size, **data_kw)
        probe_loader = build_loader(probe_set, batch_size=min(eval_batch, 64), workers=config.workers)

    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(run_dir / "config.json", json.dumps(config_to_dict(config), indent=2) + "\n")
    progress.start(run_id=config.run_id, first_epoch=first_epoch, epochs=config.epochs, batches=len(sampler))
    for epoch in range(first_epoch, config.epochs):
        start = time.perf_counter()
        lr = set_lr(optimizer, lr_factor(config, epoch))
        sampler.set_epoch(epoch)
        loader_generator.manual_seed(stream_seed(config.seed, epoch, ctx.rank))  # worker seeds
        progress.start_epoch(epoch, lr)
        try:
            stats = train_one_epoch(train_model, train_loader, recipe, optimizer, device=device, epoch=epoch,
                                    autocast=autocast, scaler=scaler, channels_last=config.channels_last,
                                    progress=progress, loss_limit=exploded_loss(train_info.num_classes))
            # The last step's loss is taken before its update: that update can still leave inf/NaN weights.
            if D.any_rank(not all_finite(net)):
                raise NonFiniteLoss(f"the weights became inf/NaN in the last step of epoch {epoch + 1} (lr {lr:.4g})")
        except NonFiniteLoss as err:
            kept = f"the checkpoint of epoch {epoch} (the last good one) is kept" if epoch else "nothing was saved"
            raise UserError(f"{err}; {kept} in {run_dir}; lower --lr or add --warmup-epochs and start a new run "
                            "(another --run-id, or delete the folder)") from None
        if ctx.distributed:  # evaluate (and save) rank 0's BN statistics on every rank
            for buffer in net.buffers():
                torch.distributed.broadcast(buffer, 0)
        val = evaluate(net, val_loader, device=device, autocast=autocast, channels_last=config.channels_last,
                       num_classes=train_info.num_classes)
        last = epoch + 1 == config.epochs
        due = (epoch + 1) % config.gbr_every == 0 or last
        gbr, gbr_stderr = measure_probe_gbr(net, probe_loader if due else None, device)
        # Clean train top-1 (eval mode, no augmentation or mixing) at the last epoch only, so it costs one pass over
        # at most TRAIN_EVAL_SIZE examples: the train accuracy of the generalization gap. Eval mode and a seeded
        # loader: the weights, BN statistics and RNG streams are untouched, so resume stays exact.
        train_top1 = NAN
        if last:
            clean = clean_train_split(config, data_kw)
            clean_shard = Subset(clean, shard_indices(len(clean), ctx.rank, ctx.world_size)) if ctx.distributed \
                else clean
            train_top1 = evaluate(net, build_loader(clean_shard, batch_size=eval_batch, workers=config.workers,
                                                    uint8=True),
                                  device=device, autocast=autocast, channels_last=config.channels_last,
                                  num_classes=train_info.num_classes)["top1"]
        norms = weight_norms(net)
        row = {"epoch": epoch + 1, "lr": lr, **stats, "train_top1": train_top1, "val_top1": val["top1"],
               "val_top5": val["top5"], "weight_sq_norm": sum(norms.values()), "gbr": gbr, "gbr_stderr": gbr_stderr,
               "wall_s": time.perf_counter() - start, **{f"norm:{k}": v for k, v in norms.items()}}
        history.append(row)
        rng = D.all_gather_objects(capture_rng(device))
        if ctx.is_main:
            extra = {"epoch": epoch + 1, "optimizer": optimizer.state_dict(),
                     "scheduler": {"schedule": config.schedule, "next_epoch": epoch + 1},
                     "scaler": scaler.state_dict() if scaler is not None else None, "rng": rng,
                     "world_size": ctx.world_size, "history": history}
            metrics = {k: v for k, v in row.items() if not k.startswith("norm:")}
            save_checkpoint(run_dir / CHECKPOINT_NAME, net, spec, run_id=config.run_id, dataset_info=train_info,
                            config=config_to_dict(config), metrics=metrics, extra=extra)
            write_metrics(run_dir / "metrics.csv", history)
        progress.end_epoch(row)
        D.barrier()
    progress.finish()
    if ctx.is_main:
        finish_run(run_dir, config)
    D.barrier()
    return run_dir
