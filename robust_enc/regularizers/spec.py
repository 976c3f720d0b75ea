"""The regularizer spec language: ``name[:key=value,...]`` entries joined by '+' (``enc+cutmix+ls``).

Each entry is a frozen dataclass whose fields are its hyperparameters (defaults from the paper, its references or
timm), parsed and range-checked from text, and whose hooks say what it does: change the architecture (``prepare``),
transform a batch (``transform``), add mixing or label smoothing (``mix_args``, ``label_smoothing``), add a loss term
(``penalty``), replace plain weight decay on some tensors (``decay_exempt``) or change the update rule
(``sharpness``). The entries themselves are in ``catalogue``; nothing here switches on an entry's name.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from robust_enc.config import parse_value
from robust_enc.errors import UserError
from robust_enc.registry import Registry

REGULARIZERS: Registry[type[Regularizer]] = Registry("regularizer")


def _param(default: Any, help: str, *, lo: float | None = None, hi: float | None = None, lo_open: bool = False,
           hi_open: bool = False) -> Any:
    """A hyperparameter field: default, one-line help and an optional numeric range checked at construction."""
    return field(default=default, metadata={"help": help, "lo": lo, "hi": hi, "lo_open": lo_open, "hi_open": hi_open})


def _range_text(meta: dict[str, Any]) -> str:
    lo = "-inf" if meta["lo"] is None else meta["lo"]
    hi = "inf" if meta["hi"] is None else meta["hi"]
    left = "(" if meta["lo_open"] or meta["lo"] is None else "["
    right = ")" if meta["hi_open"] or meta["hi"] is None else "]"
    return f"{left}{lo}, {hi}{right}"


@dataclass(frozen=True)
class Regularizer:
    """Base entry: every hook is a no-op, so the bare class is the L2 baseline."""

    name: ClassVar[str] = ""
    order: ClassVar[int] = 50  # position in the canonical spec (architecture, data, labels, loss terms, step rule)
    conflicts: ClassVar[tuple[str, ...]] = ()  # entries that cannot be combined with this one
    bakes: ClassVar[bool] = False  # its effect lives in the weights after bake_model: export_spec drops it
    min_batch: ClassVar[int] = 1  # smallest batch size it works with

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value, meta = getattr(self, f.name), f.metadata
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if isinstance(value, int) and float in (hints[f.name], *typing.get_args(hints[f.name])):
                value = float(value)  # ENC(alpha=2) and "enc:alpha=2" give the same canonical text
                object.__setattr__(self, f.name, value)
            bad = not math.isfinite(value)
            bad |= meta.get("lo") is not None and (value <= meta["lo"] if meta["lo_open"] else value < meta["lo"])
            bad |= meta.get("hi") is not None and (value >= meta["hi"] if meta["hi_open"] else value > meta["hi"])
            if bad:
                raise UserError(f"regularizer {self.name}: {f.name}={value} is out of range; it must lie in "
                                f"{_range_text(dict(meta))}")

    # --- hooks (override what the entry needs)
    def prepare(self, model: nn.Module) -> nn.Module:
        """Architecture change, in place (reparameterizations, hooks); returns the model."""
        return model

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        """Batch transform in pixel space ([0, 1], NCHW); must not modify ``x`` in place."""
        return x

    def mix_args(self) -> dict[str, float]:
        """Keyword arguments for timm's Mixup (merged over the spec's entries)."""
        return {}

    def label_smoothing(self) -> float:
        return 0.0

    def penalty(self, model: nn.Module, weight_decay: float) -> torch.Tensor | None:
        """A float32 scalar added to the loss (computed outside autocast)."""
        return None

    def decay_exempt(self, model: nn.Module) -> list[torch.Tensor]:
        """Conv/linear weights whose plain weight decay this entry replaces with its own penalty."""
        return []

    def sharpness(self) -> tuple[float, float] | None:
        """(r, a) of the two-pass rule (1 - a) g(theta) + a g(theta + r g / ||g||), or None for a plain step."""
        return None

    # --- text form
    def settings(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def defaults(self) -> dict[str, Any]:
        return {f.name: f.default for f in dataclasses.fields(self)}

    def canonical(self) -> str:
        items = ",".join(f"{k}={_format_value(v)}" for k, v in self.settings().items())
        return f"{self.name}:{items}" if items else self.name

    def short(self) -> str:
        """Name plus only the non-default settings, filesystem-safe (for run names)."""
        changed = {k: v for k, v in self.settings().items() if v != self.defaults()[k]}
        return self.name + "".join(f"_{k}-{_format_value(v)}" for k, v in changed.items())


def register(name: str, *, order: int) -> Callable[[type[Regularizer]], type[Regularizer]]:
    """Class decorator: name the entry, make it a frozen dataclass and add it to REGULARIZERS."""

    def add(cls: type[Regularizer]) -> type[Regularizer]:
        cls.name, cls.order = name, order
        cls = dataclass(frozen=True)(cls)
        summary = " ".join((cls.__doc__ or "").strip().split("\n\n")[0].split())  # first paragraph, one line
        return REGULARIZERS.register(name, help=summary)(cls)

    return add


# ---------------------------------------------------------------- value parsing / formatting
def _format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _parse_entry(part: str, spec: str) -> Regularizer:
    name, _, arg_text = part.partition(":")
    name = name.strip()
    if not name:
        raise UserError(f"empty regularizer name in spec {spec!r}; write names joined by '+', e.g. enc+cutmix+ls")
    cls = REGULARIZERS.get(name)
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in arg_text.split(","))):
        key, eq, text = (s.strip() for s in item.partition("="))
        if not eq or not text:
            raise UserError(f"regularizer {name}: setting {item!r} needs the form key=value, e.g. {name}:"
                            f"{known[0] + '=...' if known else ''}")
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise UserError(f"regularizer {name} has no setting {key!r}.{hint} Known: {', '.join(known) or 'none'}")
        if key in kwargs:
            raise UserError(f"regularizer {name}: setting {key!r} is given twice")
        try:
            kwargs[key] = parse_value(text, hints[key])
        except ValueError as err:
            raise UserError(f"regularizer {name}: {key}={text!r} must be {err}") from None
    return cls(**kwargs)


def parse_spec(spec: str) -> list[Regularizer]:
    """Parse, validate and order a spec: the entries in canonical order ('baseline' only when alone).

    Raises UserError for unknown names or settings, bad values, a name given twice and incompatible entries."""
    if not isinstance(spec, str) or not spec.strip():
        raise UserError("empty regularizer spec; use 'baseline' for plain weight decay or e.g. 'enc+cutmix+ls'")
    parts = re.split(r"(?<![0-9.][eE])\+", spec.strip())  # '+' joins entries; the one in '1e+3' is a number's
    entries: list[Regularizer] = []
    for part in parts:
        entry = _parse_entry(part.strip(), spec)
        if any(e.name == entry.name for e in entries):
            raise UserError(f"regularizer {entry.name!r} is given twice in {spec!r}; give it once with all its "
                            "settings")
        entries.append(entry)
    for i, a in enumerate(entries):
        for b in entries[i + 1:]:
            if b.name in a.conflicts or a.name in b.conflicts:
                raise UserError(f"regularizers {a.name!r} and {b.name!r} cannot be combined (both {_CONFLICT_WHY}); "
                                "keep one of them")
    entries = [e for e in entries if e.name != "baseline"] or [e for e in entries if e.name == "baseline"]
    return sorted(entries, key=lambda e: (e.order, e.name))


_CONFLICT_WHY = "reparameterize the same weights or both replace the update rule"


def canonical_spec(spec: str) -> str:
    """Validated spec with every setting spelled out, in canonical order: "enc+cutmix+ls" ->
    "enc:variant=eq22,alpha=1.0,classifier=true,el2_eps=0.001,el2_lambda=wd+cutmix:alpha=1.0,prob=1.0+ls:..."."""
    return "+".join(e.canonical() for e in parse_spec(spec))


def run_name(spec: str) -> str:
    """Short filesystem-safe name: entries in canonical order, non-default settings shown ("enc_alpha-0.5+cutmix")."""
    name = "+".join(e.short() for e in parse_spec(spec))
    return re.sub(r"[^A-Za-z0-9._+=-]", "-", name)


def export_spec(spec: str) -> str:
    """The spec of a model after ``bake_model``: entries whose effect is baked into the weights (enc, wn, ws) are
    dropped; what is left (hooks without parameters, training-only entries) is kept. Canonical form."""
    kept = [e for e in parse_spec(spec) if not e.bakes]
    return "+".join(e.canonical() for e in kept) or "baseline"


def prepare_model(model: nn.Module, spec: str) -> nn.Module:
    """Apply the architecture changes of a (raw or canonical) spec in place: ENC/WN/WS parametrizations, dropout and
    DropBlock hooks. 'baseline' and data/loss entries leave the model as it is. Returns the model."""
    for entry in parse_spec(spec):
        model = entry.prepare(model)
    return model
