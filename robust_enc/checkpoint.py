"""One checkpoint format: state dict + model spec + resolved config + data set metadata + metrics + library versions
+ a content hash, written atomically. Also loads plain torchvision/timm state-dict files (``--weights``)."""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from robust_enc.data import DatasetInfo
from robust_enc.errors import UserError
from robust_enc.io import write_atomic
from robust_enc.models import ModelSpec, NormalizedModel, build_model
from robust_enc.results import library_versions

FORMAT = "robust-enc-checkpoint"
FORMAT_VERSION = 1
CHECKPOINT_NAME = "checkpoint.pt"  # inside a run folder


@dataclass
class Checkpoint:
    spec: ModelSpec
    state_dict: dict[str, torch.Tensor]
    dataset_info: DatasetInfo | None
    config: dict[str, Any] = field(default_factory=dict)  # the resolved config that made it
    metrics: dict[str, Any] = field(default_factory=dict)  # e.g. train_top1, val_top1, epoch
    versions: dict[str, str] = field(default_factory=dict)
    content_hash: str = ""
    run_id: str = ""
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. optimizer state for --resume
    path: str = ""


def state_hash(state_dict: dict[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes of the tensors, in key order: the weights' identity (12 hex)."""
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        tensor = state_dict[key].detach().cpu().contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()[:12]


def save_checkpoint(path: str | Path, model: nn.Module, spec: ModelSpec, *, run_id: str,
                    dataset_info: DatasetInfo | None = None, config: dict[str, Any] | None = None,
                    metrics: dict[str, Any] | None = None, extra: dict[str, Any] | None = None) -> str:
    """Write a checkpoint atomically; return its content hash."""
    module = getattr(model, "module", model)  # unwrap DDP
    state = {k: v.detach().cpu() for k, v in module.state_dict().items()}
    content_hash = state_hash(state)
    payload = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "run_id": run_id, "spec": spec.to_dict(),
        "state_dict": state, "dataset_info": dataset_info.to_dict() if dataset_info else None,
        "config": config or {}, "metrics": metrics or {}, "versions": library_versions(),
        "content_hash": content_hash, "extra": extra or {},
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    write_atomic(path, lambda f: f.write(buffer.getvalue()), binary=True)
    return content_hash


def checkpoint_file(path: str | Path) -> Path:
    """A run folder means its checkpoint.pt."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise UserError(f"no checkpoint at {path}: give a run folder (with {CHECKPOINT_NAME}) or a checkpoint file")
    return path


def load_checkpoint(path: str | Path) -> Checkpoint:
    path = checkpoint_file(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # torch raises several types for a truncated or foreign file
        raise UserError(f"cannot read checkpoint {path}: {err.__class__.__name__}: {err}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise UserError(f"{path} is not a robust-enc checkpoint; for a plain torchvision/timm state dict use "
                        "--model NAME --weights PATH")
    return Checkpoint(
        spec=ModelSpec.from_dict(payload["spec"]), state_dict=payload["state_dict"],
        dataset_info=DatasetInfo.from_dict(payload["dataset_info"]) if payload.get("dataset_info") else None,
        config=payload.get("config", {}), metrics=payload.get("metrics", {}), versions=payload.get("versions", {}),
        content_hash=payload.get("content_hash", ""), run_id=payload.get("run_id", path.parent.name),
        extra=payload.get("extra", {}), path=str(path),
    )


def load_state_strict(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """load_state_dict with a one-line error naming the first mismatched key."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shape = [k for k in own if k in state_dict and own[k].shape != state_dict[k].shape]
    if missing or unexpected or shape:
        if shape:
            k = shape[0]
            detail = f"key {k!r} has shape {tuple(state_dict[k].shape)}, the model expects {tuple(own[k].shape)}"
        elif missing:
            detail = f"key {missing[0]!r} is missing ({len(missing)} missing)"
        else:
            detail = f"unexpected key {unexpected[0]!r} ({len(unexpected)} unexpected)"
        raise UserError(f"{source} does not fit the model: {detail}")
    model.load_state_dict(state_dict)


def model_from_checkpoint(ckpt: Checkpoint) -> NormalizedModel:
    model = build_model(ckpt.spec)
    load_state_strict(model, ckpt.state_dict, ckpt.path or "checkpoint")
    return model.eval()


def load_plain_weights(spec: ModelSpec, weights: str | Path) -> NormalizedModel:
    """A torchvision/timm state dict (keys without our ``net.`` prefix) loaded into the registry model, or
    ``weights="pretrained"``: the library's own pretrained weights (downloaded, so the machine must be online)."""
    if str(weights) == "pretrained":
        try:
            return build_model(spec, pretrained=True).eval()
        except (OSError, RuntimeError) as err:  # urllib/hub errors when offline
            raise UserError(f"cannot fetch pretrained weights for {spec.name} ({err.__class__.__name__}): the "
                            "machine must be online; or pass --weights PATH to a downloaded state dict") from None
    weights = Path(weights)
    if not weights.is_file():
        raise UserError(f"weights file {weights} does not exist")
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as err:
        raise UserError(f"cannot read weights {weights}: {err.__class__.__name__}: {err}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    state = {k.removeprefix("module."): v for k, v in state.items()}
    model = build_model(spec)
    if not any(k.startswith("net.") for k in state):
        state = {**{f"net.{k}": v for k, v in state.items()},
                 "normalize.mean": model.normalize.mean, "normalize.std": model.normalize.std}
    load_state_strict(model, state, str(weights))
    return model.eval()
