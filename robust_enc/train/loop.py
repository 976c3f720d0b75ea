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
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from robust_enc.checkpoint import CHECKPOINT_NAME, load_state_strict, save_checkpoint
from robust_enc.config import config_to_dict
from robust_enc.data import balanced_subset, build_dataset, build_loader, evaluation_split
from robust_enc.errors import UserError
from robust_enc.images import collate_readable, uint8_view
from robust_enc.io import write_text_atomic
from robust_enc.models import ModelSpec, build_network, weight_norms
from robust_enc.regularizers import prepare_model
from robust_enc.runtime import distributed as D
from robust_enc.runtime.device import resolve_device
from robust_enc.runtime.progress import Task, task
from robust_enc.runtime.seeding import capture_rng, restore_rng, seed_everything, stream_seed
from robust_enc.runtime.sharding import GlobalBatchSampler, shard_indices
from robust_enc.train.config import AMP_DTYPES, TrainConfig, lr_factor, require, resolve_config
from robust_enc.train.epoch import NAN, NonFiniteLoss, Progress, evaluate, exploded_loss, train_one_epoch
from robust_enc.train.recipe import build_recipe
from robust_enc.train.run_folder import (
    EXPORT_NAME,
    TORCHSCRIPT_NAME,
    decide_on_rank0,
    finish_run,
    upgrade_row,
    write_metrics,
)

log = logging.getLogger(__name__)

TRAIN_EVAL_SIZE = 10_000  # training examples for the clean train top-1 at the end (class-balanced subset)


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
    require(not single, f"--batch-size {batch_size} over {world_size} process(es) gives batches of one image, and BN "
                       f"layer {single[0] if single else ''} then sees one value per channel (a 1x1 feature map); use "
                       f"--batch-size >= {2 * world_size} (2 x processes)")


def _check_device(config: TrainConfig, device: torch.device, world_size: int) -> None:
    require(not (config.amp == "fp16" and device.type == "cpu"),
           "amp fp16 needs a GPU (its GradScaler guards fp16 gradients); on the CPU use --amp bf16 or none")
    require(not (config.sync_bn and device.type == "cpu" and world_size > 1),
           "sync-BN works on GPUs only (torch's SyncBatchNorm); drop --sync-bn for CPU processes")


def build_training_model(spec: ModelSpec, *, sync_bn: bool = False) -> nn.Module:
    """``build_model(spec)``, with every BatchNorm a SyncBatchNorm when ``sync_bn``. The conversion replaces the BN
    modules, so it comes before the regularizer's hooks and parametrizations are attached: converted afterwards, the
    DropBlock hooks on BN layers would silently vanish (ResNet-50 enc+dropblock: 9 hooks before, 0 after)."""
    net = build_network(spec)
    if sync_bn:
        net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
    return prepare_model(net, spec.regularizer)


def set_lr(optimizer: torch.optim.Optimizer, factor: float) -> float:
    """Set every group's lr to its ``initial_lr`` x factor; return the first group's lr."""
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * factor
    return optimizer.param_groups[0]["lr"]


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


def train(config: TrainConfig, *, progress: Progress | None = None) -> Path:
    """Train one run; return its folder. A finished run (same config, epochs reached) is skipped; an interrupted one
    continues with ``resume=True``. Under torchrun every rank calls this; rank 0 writes the files."""
    config = resolve_config(config)
    device = resolve_device(config.device)
    _check_device(config, device, D.env_world_size())
    ctx, device = D.init_distributed(device)  # joined once per process (by the CLI), kept for the next stage
    return _train(dataclasses.replace(config, device=str(device)), device, ctx,
                  progress if ctx.is_main and progress is not None else Progress())


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
    kind, ckpt = decide_on_rank0(run_dir, config)
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
    with task(f"train {config.run_id}", config.epochs, completed=first_epoch, show=ctx.is_main) as bar:
        for epoch in range(first_epoch, config.epochs):
            start = time.perf_counter()
            lr = set_lr(optimizer, lr_factor(config, epoch))
            sampler.set_epoch(epoch)
            loader_generator.manual_seed(stream_seed(config.seed, epoch, ctx.rank))  # worker seeds
            progress.start_epoch(epoch, lr)
            try:
                with task(f"epoch {epoch + 1} (lr {lr:.3g})", len(sampler), show=ctx.is_main) as batches:
                    stats = train_one_epoch(train_model, train_loader, recipe, optimizer, device=device, epoch=epoch,
                                            autocast=autocast, scaler=scaler, channels_last=config.channels_last,
                                            progress=_Shown(progress, batches),
                                            loss_limit=exploded_loss(train_info.num_classes))
                # The last step's loss is taken before its update: that update can still leave inf/NaN weights, or
                # finite ones whose squared norm overflows (a run as diverged as the other).
                if D.any_rank(not all_finite(net) or not math.isfinite(sum(weight_norms(net).values()))):
                    raise NonFiniteLoss(f"the weights became inf/NaN (or their squared norm overflowed) in the last "
                                        f"step of epoch {epoch + 1} (lr {lr:.4g})")
                if ctx.distributed:  # evaluate (and save) rank 0's BN statistics on every rank
                    for buffer in net.buffers():
                        torch.distributed.broadcast(buffer, 0)
                val = evaluate(net, val_loader, device=device, autocast=autocast, channels_last=config.channels_last,
                               num_classes=train_info.num_classes)
                if not math.isfinite(val["loss"]):  # the same on every rank: the loss is summed over them
                    raise NonFiniteLoss(f"the validation loss became {val['loss']} after epoch {epoch + 1} "
                                        f"(lr {lr:.4g})")
            except NonFiniteLoss as err:
                kept = f"the checkpoint of epoch {epoch} (the last good one) is kept" if epoch else "nothing was saved"
                raise UserError(f"{err}; {kept} in {run_dir}; lower --lr or add --warmup-epochs and start a new run "
                                "(another --run-id, or delete the folder)") from None
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
                         "scaler": scaler.state_dict() if scaler is not None else None, "rng": rng,
                         "world_size": ctx.world_size, "history": history}
                metrics = {k: v for k, v in row.items() if not k.startswith("norm:")}
                save_checkpoint(run_dir / CHECKPOINT_NAME, net, spec, run_id=config.run_id, dataset_info=train_info,
                                config=config_to_dict(config), metrics=metrics, extra=extra)
                write_metrics(run_dir / "metrics.csv", history)
            if ctx.is_main:
                log.info("%s epoch %d/%d: lr %.4g, train loss %.4f, running top-1 %.4f, val top-1 %.4f, GBR %.4g, "
                         "sum ||W||^2 %.4g, %.1f s (%.0f img/s)", config.run_id, epoch + 1, config.epochs, lr,
                         row["train_loss"], row["train_top1_running"], row["val_top1"], gbr, row["weight_sq_norm"],
                         row["wall_s"], row["images_per_s"])
            bar.update(advance=1, info=f"val top-1 {row['val_top1']:.2%}, GBR {gbr:.3g}")
            progress.end_epoch(row)
            D.barrier()
    progress.finish()
    if ctx.is_main:
        finish_run(run_dir, config)
    D.barrier()
    return run_dir


class _Shown(Progress):
    """The loop's per-step events to the caller's ``progress`` and to the display's batches bar (loss, images/s)."""

    def __init__(self, progress: Progress, batches: Task) -> None:
        self.progress, self.batches, self.images, self.started = progress, batches, 0, time.perf_counter()

    def advance(self, images: int, loss: float) -> None:
        self.progress.advance(images, loss)
        self.images += images
        rate = self.images / max(time.perf_counter() - self.started, 1e-9)
        self.batches.update(advance=1, info=f"loss {loss:.3f}, {rate:,.0f} img/s")
