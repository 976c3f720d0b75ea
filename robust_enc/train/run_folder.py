"""A training run's folder: config.json, checkpoint.pt, metrics.csv (one row per epoch), model_card.json and, when
asked, exported.pt (the baked model as a robust-enc checkpoint) and exported.ts (the same model as TorchScript,
loadable with plain ``torch.jit.load``). Deciding whether a folder is fresh, finished or to be resumed, and writing
its files atomically."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from robust_enc.checkpoint import CHECKPOINT_NAME, Checkpoint, load_checkpoint, model_from_checkpoint, save_checkpoint
from robust_enc.config import config_to_dict
from robust_enc.errors import UserError
from robust_enc.io import write_atomic, write_text_atomic
from robust_enc.regularizers import bake_model, export_spec
from robust_enc.runtime import distributed as D

if TYPE_CHECKING:
    from robust_enc.train.config import TrainConfig

NAN = float("nan")
EXPORT_NAME = "exported.pt"  # the baked plain model, robust-enc checkpoint format
TORCHSCRIPT_NAME = "exported.ts"  # the same model traced: torch.jit.load needs nothing but torch
# train_top1_running: per epoch, the fraction of hard labels the train-mode logits got right on the augmented/mixed
# batches (cheap, but far from the clean accuracy under mixup/cutmix/cutout). train_top1: clean top-1 in eval mode on
# a fixed class-balanced subset of the training split (evaluation transform), measured at the last epoch only (NaN
# before); it is the checkpoint's and model card's train_top1, which attack rows use for the generalization gap.
METRIC_COLUMNS = ("epoch", "lr", "train_loss", "train_top1_running", "train_top1", "val_top1", "val_top5",
                  "weight_sq_norm", "gbr", "gbr_stderr", "wall_s", "samples_seen", "images_per_s")  # then norm:<layer>
# Settings that say how a run is executed, not what it computes: they may differ between a run and its resumption.
RUN_ONLY_FIELDS = frozenset({"data_dir", "download", "device", "workers", "out_dir", "resume", "export", "compile",
                             "channels_last"})


def _differences(old: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    keys = (set(old) | set(new)) - RUN_ONLY_FIELDS
    return {k: (old.get(k), new.get(k)) for k in sorted(keys) if old.get(k) != new.get(k)}


def _previous_run(run_dir: Path, config: TrainConfig) -> tuple[str, Checkpoint | None]:
    """What the run folder holds: ("fresh", None), ("finished", ckpt) or ("resume", ckpt). Raises UserError for a
    folder holding another run, or an unfinished one without ``resume``."""
    config_path, ckpt_path = run_dir / "config.json", run_dir / CHECKPOINT_NAME
    ckpt = load_checkpoint(ckpt_path) if ckpt_path.is_file() else None
    if ckpt is not None:
        old = ckpt.config
    elif config_path.is_file():
        old = json.loads(config_path.read_text())
    else:
        return "fresh", None
    diff = _differences(old, config_to_dict(config))
    done = int(ckpt.extra.get("epoch", 0)) if ckpt is not None else 0
    # The one change resume accepts: more epochs (the schedule is recomputed for the new total).
    extending = config.resume and set(diff) == {"epochs"} and config.epochs > done
    if diff and not extending:
        shown = "; ".join(f"{k}: {a!r} there, {b!r} here" for k, (a, b) in list(diff.items())[:4])
        raise UserError(f"{run_dir} holds a different run ({shown}); choose another --run-id or --out-dir, or delete "
                        "the folder")
    if ckpt is None:  # stopped before its first epoch ended: nothing to keep
        return "fresh", None
    if done >= config.epochs:
        return "finished", ckpt
    if not config.resume:
        raise UserError(f"{run_dir} holds an unfinished run ({done}/{config.epochs} epochs): pass --resume to "
                        "continue it, or delete the folder to start again")
    return "resume", ckpt


def decide_on_rank0(run_dir: Path, config: TrainConfig) -> tuple[str, Checkpoint | None]:
    """Rank 0 reads the folder; every rank learns the decision (or the same UserError, so none is left waiting).
    The checkpoint itself stays on rank 0."""
    decision, ckpt = ("fresh", ""), None
    if D.is_main():
        try:
            kind, ckpt = _previous_run(run_dir, config)
            decision = (kind, "")
        except UserError as err:
            decision = ("error", str(err))
    kind, message = D.broadcast_object(decision)
    if kind == "error":
        raise UserError(message)
    return kind, ckpt


def upgrade_row(row: dict[str, Any]) -> dict[str, Any]:
    """A metrics row written before train_top1 meant the clean accuracy (its train_top1 was the running one), in
    today's columns; newer rows come back as they are."""
    if "train_top1_running" in row:
        return row
    return {**row, "train_top1_running": row.get("train_top1", NAN), "train_top1": NAN}


def _nan_to_none(value: Any) -> Any:
    """For JSON: NaN (not measured) becomes null, inf (overflowed, e.g. a GBR) the string "inf", never null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else str(value)
    return value


def write_metrics(path: Path, rows: list[dict[str, Any]]) -> Path:
    """metrics.csv: METRIC_COLUMNS, then the norm:<layer> columns in module order; NaN as an empty cell, inf as
    ``inf``."""
    columns = list(METRIC_COLUMNS) + [k for k in rows[0] if k.startswith("norm:")]

    def write(f) -> None:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="raise")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if isinstance(row[k], float) and math.isnan(row[k]) else row[k]) for k in columns})

    return write_atomic(path, write)


def write_torchscript(path: Path, model: nn.Module, input_shape: Sequence[int]) -> Path:
    """``torch.jit.trace`` of the eval-mode ``model`` (Normalize layer included) on one random (1, C, H, W) image in
    [0, 1], saved atomically: ``torch.jit.load(path)`` gives the logits with plain torch, no robust-enc needed. Eval
    mode only: the train-time hooks (dropout, DropBlock) are Python branches the trace does not keep."""
    model = model.eval()
    example = torch.rand(1, *input_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), warnings.catch_warnings():
        # This torch marks torch.jit deprecated in favour of torch.export; a TorchScript file still loads with torch
        # alone (no defining code) as an nn.Module that ART's PyTorchClassifier wraps, so keep it, quietly.
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.jit")
        traced = torch.jit.trace(model, example)
        return write_atomic(path, lambda f: torch.jit.save(traced, f), binary=True)


def finish_run(run_dir: Path, config: TrainConfig) -> Path:
    """Write model_card.json (and, when asked, exported.pt and exported.ts) from the final checkpoint; idempotent."""
    ckpt = load_checkpoint(run_dir / CHECKPOINT_NAME)
    last = upgrade_row(ckpt.metrics)
    card = {"run_id": ckpt.run_id, "model": ckpt.spec.name, "regularizer": ckpt.spec.regularizer,
            "dataset": config.dataset, "subset": config.subset, "epochs": int(ckpt.extra.get("epoch", 0)),
            **{k: _nan_to_none(last.get(k, NAN)) for k in ("val_top1", "val_top5", "train_top1", "train_top1_running",
                                                          "train_loss", "gbr", "gbr_stderr", "weight_sq_norm")},
            "checkpoint_hash": ckpt.content_hash, "world_size": ckpt.extra.get("world_size", 1),
            "wall_s": sum(row["wall_s"] for row in ckpt.extra.get("history", [])),
            "config": config_to_dict(config), "versions": ckpt.versions}
    if config.export:
        exported = run_dir / EXPORT_NAME
        spec = dataclasses.replace(ckpt.spec, regularizer=export_spec(ckpt.spec.regularizer))
        baked = bake_model(model_from_checkpoint(ckpt))
        card["exported_hash"] = save_checkpoint(exported, baked, spec, run_id=ckpt.run_id,
                                                dataset_info=ckpt.dataset_info, config=ckpt.config,
                                                metrics=ckpt.metrics)
        write_torchscript(run_dir / TORCHSCRIPT_NAME, baked, ckpt.spec.input_shape)
        card["exported_torchscript"] = TORCHSCRIPT_NAME
    write_text_atomic(run_dir / "model_card.json", json.dumps(card, indent=2, allow_nan=False) + "\n")
    return run_dir
