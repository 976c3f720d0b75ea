"""One checkpoint format: state dict + model spec + resolved config + data set metadata + metrics + library versions
+ a content hash, written atomically. Also loads plain torchvision/timm state-dict files (``--weights``).

Loading never runs code: every file is read with ``torch.load(weights_only=True)``, which admits tensors, dicts,
lists, tuples, str, int, float, bool and None only (a pickled ``__reduce__`` payload is refused, not executed). So the
payload holds nothing else: RNG states are stored as tensors and lists (``safe_rng_state``), versions as plain str.
Format 1 (robust-enc before this) pickled numpy RNG states and torch's ``TorchVersion``: such files are refused with a
line naming ``robust-enc checkpoint convert``, which rewrites a *trusted* one in format 2.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from robust_enc.errors import UserError
from robust_enc.images import DatasetInfo
from robust_enc.io import write_atomic
from robust_enc.models import ModelSpec, NormalizedModel
from robust_enc.regularizers import build_model
from robust_enc.results import library_versions
from robust_enc.runtime.seeding import safe_rng_state
from robust_enc.user_models import is_torchscript

FORMAT = "robust-enc-checkpoint"
FORMAT_VERSION = 2  # 2: loads with weights_only=True; 1: pickled numpy RNG states (convert to load)
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
        if tensor.numel():  # the bytes as a buffer: hashlib reads them in place, no copy
            digest.update(tensor.view(-1).view(torch.uint8).numpy())
    return digest.hexdigest()[:12]


def verify_hash(path: str | Path, stored: Any, state_dict: dict[str, torch.Tensor]) -> None:
    """The stored content hash must be the hash of the tensors loaded: a flipped bit in the tensor data, or weights
    edited with the old hash kept, would otherwise be measured under the genuine model's name. UserError naming the
    file and both hashes; a checkpoint that stores no hash is hashed by the caller (``ModelSource``)."""
    if not stored:
        return
    actual = state_hash(state_dict)
    if actual != stored:
        raise UserError(f"{path}: the weights do not match the checkpoint's content hash (stored {stored}, the "
                        f"tensors hash to {actual}): the file is damaged or was edited; re-create it with robust-enc "
                        "train or restore a good copy")


def _plain(value: Any) -> Any:
    """Containers of tensors and JSON-like values, nothing weights_only refuses: str subclasses (torch's
    TorchVersion) become str, numpy scalars Python numbers."""
    if isinstance(value, torch.Tensor) or value is None or type(value) in (bool, int, float, str):
        return value
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    if isinstance(value, str):
        return str(value)
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # numpy scalar
        return value.item()
    for kind in (bool, int, float):  # subclasses (enums, ...)
        if isinstance(value, kind):
            return kind(value)
    raise TypeError(f"a checkpoint holds tensors and JSON-like values only, not {type(value).__name__}")


def _write_payload(path: str | Path, payload: dict[str, Any]) -> None:
    buffer = io.BytesIO()
    torch.save(_plain(payload), buffer)
    write_atomic(path, lambda f: f.write(buffer.getvalue()), binary=True)


def save_checkpoint(path: str | Path, model: nn.Module, spec: ModelSpec, *, run_id: str,
                    dataset_info: DatasetInfo | None = None, config: dict[str, Any] | None = None,
                    metrics: dict[str, Any] | None = None, extra: dict[str, Any] | None = None) -> str:
    """Write a checkpoint atomically; return its content hash. RNG states in ``extra["rng"]`` must come from
    ``safe_rng_state``."""
    module = getattr(model, "module", model)  # unwrap DDP
    state = {k: v.detach().cpu() for k, v in module.state_dict().items()}
    content_hash = state_hash(state)
    _write_payload(path, {
        "format": FORMAT, "format_version": FORMAT_VERSION, "run_id": run_id, "spec": spec.to_dict(),
        "state_dict": state, "dataset_info": dataset_info.to_dict() if dataset_info else None,
        "config": config or {}, "metrics": metrics or {}, "versions": library_versions(),
        "content_hash": content_hash, "extra": extra or {},
    })
    return content_hash


def checkpoint_file(path: str | Path) -> Path:
    """A run folder means its checkpoint.pt."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise UserError(f"no checkpoint at {path}: give a run folder (with {CHECKPOINT_NAME}) or a checkpoint file")
    return path


def _first_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return f"{err.__class__.__name__}: {text[0] if text else ''}"


def read_safely(path: Path, what: str) -> Any:
    """``torch.load(path, weights_only=True)``; a file that needs pickle is refused with one line, never run."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:  # weights_only names the first class or function it refused: a GLOBAL
        if "GLOBAL" not in str(err):
            raise UserError(f"cannot read {what} {path}: not a torch file, or a damaged one") from None
        raise UserError(f"{path} needs pickle to load (a robust-enc checkpoint of format 1, or not a robust-enc "
                        f"file), and unpickling can run code: refused. If you trust it, convert it with "
                        f"'robust-enc checkpoint convert {path}'") from None
    except Exception as err:  # torch raises several types for a truncated or foreign file
        raise UserError(f"cannot read {what} {path}: {_first_line(err)}") from None


def _payload_error(path: Path, payload: Any) -> str:
    """What makes ``payload`` not a usable checkpoint ("" when it is one)."""
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        return (f"{path} is not a robust-enc checkpoint; for a plain torchvision/timm state dict use --model NAME "
                "--weights PATH")
    if payload.get("format_version") not in (1, FORMAT_VERSION):
        return (f"{path} is a robust-enc checkpoint of format {payload.get('format_version')!r}; this robust-enc "
                f"reads format {FORMAT_VERSION}: use the robust-enc that wrote it")
    for key, kind in (("spec", dict), ("state_dict", dict)):
        if not isinstance(payload.get(key), kind):
            return f"{path}: the checkpoint has no {key!r} entry; it is damaged: re-create it with robust-enc train"
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in payload["state_dict"].items()):
        return f"{path}: the checkpoint's state_dict is not a mapping of names to tensors; re-create it"
    return ""


def load_checkpoint(path: str | Path) -> Checkpoint:
    path = checkpoint_file(path)
    payload = read_safely(path, "checkpoint")
    if problem := _payload_error(path, payload):
        raise UserError(problem)
    try:
        ckpt = Checkpoint(
            spec=ModelSpec.from_dict(payload["spec"]), state_dict=payload["state_dict"],
            dataset_info=DatasetInfo.from_dict(payload["dataset_info"]) if payload.get("dataset_info") else None,
            config=payload.get("config", {}), metrics=payload.get("metrics", {}),
            versions=payload.get("versions", {}), content_hash=payload.get("content_hash", ""),
            run_id=payload.get("run_id", path.parent.name), extra=payload.get("extra", {}), path=str(path),
        )
    except (TypeError, ValueError, KeyError) as err:
        raise UserError(f"{path}: the checkpoint's spec or dataset_info is malformed ({_first_line(err)}); "
                        "re-create it with robust-enc train") from None
    verify_hash(path, ckpt.content_hash, ckpt.state_dict)
    return ckpt


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


def read_state_dict(weights: str | Path) -> dict[str, torch.Tensor]:
    """A plain state dict file (names -> tensors; a ``{"state_dict": ...}`` wrapper and DDP's ``module.`` prefix are
    taken off), read with ``weights_only=True``; anything else is one line naming the flag that takes it."""
    weights = Path(weights)
    if not weights.is_file():
        raise UserError(f"weights file {weights} does not exist")
    if is_torchscript(weights):
        raise UserError(f"{weights} is a TorchScript file (a whole model, not a state dict): pass --model torchscript "
                        f"--weights {weights}, or --checkpoint {weights}")
    try:
        state = read_safely(weights, "weights")
    except UserError:
        raise UserError(f"{weights} is not a plain state dict (it needs pickle to load, which can run code): "
                        "for a robust-enc checkpoint use --checkpoint PATH; convert a trusted older one with "
                        f"'robust-enc checkpoint convert {weights}'") from None
    if isinstance(state, dict) and state.get("format") == FORMAT:
        raise UserError(f"{weights} is a robust-enc checkpoint, not a plain state dict: pass it as --checkpoint "
                        f"{weights} (without --model/--weights)")
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not (isinstance(state, dict) and state and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                      for k, v in state.items())):
        held = type(state).__name__ if not isinstance(state, dict) else "a mapping that is not names -> tensors"
        raise UserError(f"{weights} holds {held}, not a state dict (parameter names -> tensors): save "
                        "model.state_dict() with torch.save, then pass that file as --weights")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_plain_weights(spec: ModelSpec, weights: str | Path) -> NormalizedModel:
    """A torchvision/timm state dict (keys without our ``net.`` prefix) loaded into the registry model, or
    ``weights="pretrained"``: the library's own pretrained weights (``models.library_weights``: one line when the
    model has none, or the machine cannot fetch them; never random weights in their place)."""
    if str(weights) == "pretrained":
        try:
            return build_model(spec, pretrained=True).eval()
        except (OSError, RuntimeError) as err:  # the download failed after the reachability check
            raise UserError(f"cannot fetch pretrained weights for {spec.name} ({_first_line(err)}): the machine "
                            "must be online; or pass --weights PATH to a downloaded state dict") from None
    state = read_state_dict(weights)
    model = build_model(spec)
    if not any(k.startswith("net.") for k in state):
        state = {**{f"net.{k}": v for k, v in state.items()},
                 "normalize.mean": model.normalize.mean, "normalize.std": model.normalize.std}
    load_state_strict(model, state, str(weights))
    return model.eval()


# ------------------------------------------------------------------------------------------------ conversion
# The classes a format-1 checkpoint pickled beyond what weights_only admits: numpy RNG states (arrays, dtypes, numpy
# scalars) and torch's version string. Anything else is not a file robust-enc wrote.
_FORMAT_1_GLOBALS = re.compile(r"^(numpy\.(ndarray|dtype|(_core|core)\.multiarray\.(_reconstruct|scalar)"
                               r"|dtypes\.\w+DType)|torch\.torch_version\.TorchVersion)$")


def _format_1_globals(path: Path) -> list[Any]:
    """The globals a format-1 checkpoint needs, imported, after checking, without unpickling anything, that ``path``
    is one: a torch zip file whose one pickle names robust-enc's format and no global outside ``_FORMAT_1_GLOBALS``.
    UserError otherwise (so a hostile file is refused before any of its code could run)."""
    import importlib
    import pickletools
    import zipfile

    refused = f"{path} is not a robust-enc checkpoint of format 1: refused without unpickling it"
    with zipfile.ZipFile(path) as archive:
        pickles = [name for name in archive.namelist() if name.endswith("/data.pkl") and name.count("/") == 1]
        if len(pickles) != 1:
            raise UserError(f"{refused} (no single <archive>/data.pkl record)")
        data = archive.read(pickles[0])
    try:
        strings = {arg for op, arg, _ in pickletools.genops(data) if isinstance(arg, str)}
    except Exception as err:  # a malformed opcode stream: pickletools reads it without running it
        raise UserError(f"{refused} ({_first_line(err)})") from None
    if FORMAT not in strings:
        raise UserError(f"{refused} (it does not name the format {FORMAT!r})")
    names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    foreign = [name for name in names if not _FORMAT_1_GLOBALS.match(name)]
    if foreign:
        raise UserError(f"{refused} (it needs {foreign[0]!r}, which robust-enc never wrote)")
    found = []
    for name in names:
        module, _, attribute = name.rpartition(".")
        try:
            found.append(getattr(importlib.import_module(module), attribute))
        except (ImportError, AttributeError):
            raise UserError(f"{refused} (it needs {name!r}, which this numpy/torch does not have)") from None
    if any(name.endswith(".dtype") for name in names):  # a dtype rebuilds as its class (numpy.dtypes.UInt32DType)
        import numpy.dtypes

        found += [getattr(numpy.dtypes, kind) for kind in dir(numpy.dtypes) if kind.endswith("DType")]
    return found


def convert_checkpoint(path: str | Path) -> bool:
    """Rewrite a format-1 checkpoint in format 2, atomically (weights, hash and RNG streams unchanged, so resume stays
    exact). Returns False when the file already loads safely.

    The file is trusted as far as its values go (its RNG states are restored on resume), but never unpickled as a
    whole: it must be a torch zip naming robust-enc's format whose pickle needs only the numpy and torch classes
    format 1 wrote (``_format_1_globals``, checked on the opcodes, without running them); it is then loaded with
    ``weights_only=True`` admitting those classes alone."""
    import zipfile

    path = checkpoint_file(path)
    if not zipfile.is_zipfile(path):  # both formats are torch zip files; a bare pickle is not even opened
        raise UserError(f"{path} is not a robust-enc checkpoint (not a torch zip file): refused without unpickling it")
    try:
        read_safely(path, "checkpoint")
        return False
    except UserError as err:
        if "needs pickle" not in str(err):
            raise
    allowed = _format_1_globals(path)
    try:
        with torch.serialization.safe_globals(allowed):
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise UserError(f"cannot read checkpoint {path}: {_first_line(err)}") from None
    if problem := _payload_error(path, payload):
        raise UserError(problem)
    extra = dict(payload.get("extra") or {})
    if extra.get("rng"):
        extra["rng"] = [safe_rng_state(state) for state in extra["rng"]]
    payload = {**payload, "format_version": FORMAT_VERSION, "extra": extra,
               "versions": {k: str(v) for k, v in (payload.get("versions") or {}).items()}}
    verify_hash(path, payload.get("content_hash"), payload["state_dict"])
    try:
        _write_payload(path, payload)
    except TypeError as err:
        raise UserError(f"cannot convert {path}: {err}") from None
    return True


