"""One training run's settings (``TrainConfig``), checked and resolved before anything is read or written, its run
id, and the learning-rate schedule (a pure function of the config, so a resumed run needs no scheduler state)."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from pathlib import Path

import torch

from robust_enc.data import DATASETS
from robust_enc.errors import UserError
from robust_enc.models import MODELS
from robust_enc.regularizers import canonical_spec, run_name

AMP_DTYPES: dict[str, torch.dtype | None] = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# Short data set names for run ids; others are used as given (made filesystem-safe).
DATASET_SHORT = {"fashion-mnist": "fmnist", "cifar10": "c10", "cifar100": "c100", "imagenet": "in1k"}


@dataclasses.dataclass(frozen=True)
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
def require(condition: bool, message: str) -> None:
    """A UserError with ``message`` unless ``condition``."""
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
    require(config.epochs >= 1, f"epochs must be >= 1, got {config.epochs}")
    require(config.batch_size >= 1, f"batch size must be >= 1, got {config.batch_size}")
    require(config.lr > 0 and math.isfinite(config.lr), f"lr must be a positive number, got {config.lr}")
    require(0 <= config.momentum < 1, f"momentum must be in [0, 1), got {config.momentum}")
    require(config.weight_decay >= 0, f"weight decay must be >= 0, got {config.weight_decay}")
    require(config.schedule in SCHEDULES, f"schedule must be one of {', '.join(SCHEDULES)}, got {config.schedule!r}")
    require(config.step_epochs >= 1, f"step_epochs must be >= 1, got {config.step_epochs}")
    require(0 <= config.warmup_epochs < config.epochs,
           f"warmup_epochs must be in [0, epochs), got {config.warmup_epochs} with {config.epochs} epochs")
    require(config.amp in AMP_DTYPES, f"amp must be one of {', '.join(AMP_DTYPES)}, got {config.amp!r}")
    require(config.subset >= 0 and config.val_subset >= 0, "subset sizes must be >= 0 (0 = the whole split)")
    require(config.gbr_probe_size >= 0, f"gbr_probe_size must be >= 0 (0 = no GBR), got {config.gbr_probe_size}")
    require(config.gbr_every >= 1, f"gbr_every must be >= 1 (epochs between GBR estimates), got {config.gbr_every}")
    require(config.workers >= 0, f"workers must be >= 0, got {config.workers}")
    require(config.image_size is None or config.image_size >= 1, f"image size must be >= 1, got {config.image_size}")
    _check_out_dir(Path(config.out_dir))
    MODELS.lookup(config.model)  # unknown names fail here, with a did-you-mean, before any data is read
    DATASETS.lookup(config.dataset)
    spec = canonical_spec(config.regularizer)
    run_id = config.run_id or default_run_id(config, spec)
    require(run_id not in (".", "..") and _safe(run_id) == run_id,
           f"run id {run_id!r} must be a plain folder name (letters, digits, . _ + = -)")
    return dataclasses.replace(config, regularizer=spec, run_id=run_id)


def _check_out_dir(out_dir: Path) -> None:
    """The first existing path on the way to ``out_dir`` must be a folder (the rest is created)."""
    for path in (out_dir, *out_dir.parents):
        if path.exists():
            require(path.is_dir(), f"--out-dir {out_dir}: {path} is a file, not a folder; give a folder (missing ones "
                                  "are created)")
            return


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
