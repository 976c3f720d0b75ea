"""The regularizer zoo: one registry entry per regularizer, combined with '+' into a spec (``enc+cutmix+ls``).

A spec is ``name[:key=value,...]`` joined by '+'. Each entry is a frozen dataclass whose fields are its
hyperparameters (defaults from the paper, its references or timm), parsed and range-checked from text, and whose
hooks say what it does: change the architecture (``prepare``), transform a batch (``transform``), add mixing or
label smoothing (``mix_args``, ``label_smoothing``), add a loss term (``penalty``), replace plain weight decay on
some tensors (``decay_exempt``) or change the update rule (``sharpness``). ``Recipe`` runs the hooks; nothing here
switches on an entry's name.

Public API: ``REGULARIZERS``, ``parse_spec``, ``canonical_spec``, ``run_name``, ``export_spec``, ``prepare_model``,
``build_recipe``, ``Recipe`` (``param_groups``, ``train_step``), ``StepResult``, ``spec_help``; ENC itself lives in
``robust_enc.train.enc`` (``bake_model`` is re-exported here).
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import math
import re
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from robust_enc.errors import UserError
from robust_enc.registry import Registry
from robust_enc.train.enc import (
    LAYER_TYPES,
    VARIANTS,
    apply_enc,
    apply_wn,
    apply_ws,
    bake_model,
    el2_loss,
    enc_layers,
    raw_weight,
    step_weights,
)

__all__ = [
    "REGULARIZERS", "Recipe", "Regularizer", "StepResult", "bake_model", "build_recipe", "canonical_spec",
    "export_spec", "parse_spec", "prepare_model", "run_name", "spec_help",
]

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


def _parse_value(text: str, annotation: Any) -> Any:
    """Parse ``text`` as ``annotation`` (bool, int, float, Literal[...] or a union of them); ValueError if it fails."""
    origin = typing.get_origin(annotation)
    if origin is Literal:
        if text in typing.get_args(annotation):
            return text
        choices = typing.get_args(annotation)
        raise ValueError(str(choices[0]) if len(choices) == 1 else f"one of {', '.join(map(str, choices))}")
    if origin is typing.Union or type(annotation).__name__ == "UnionType":
        wanted = []
        for member in typing.get_args(annotation):
            try:
                return _parse_value(text, member)
            except ValueError as err:
                wanted.append(str(err))
        raise ValueError(" or ".join(wanted))
    if annotation is bool:
        lowered = text.lower()
        if lowered in ("true", "1", "yes", "on"):
            return True
        if lowered in ("false", "0", "no", "off"):
            return False
        raise ValueError("true or false")
    if annotation is int:
        try:
            return int(text)
        except ValueError:
            raise ValueError("an integer") from None
    if annotation is float:
        try:
            value = float(text)
        except ValueError:
            raise ValueError("a number") from None
        if not math.isfinite(value):
            raise ValueError("a finite number")
        return value
    raise TypeError(f"unsupported hyperparameter type {annotation!r}")


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
            kwargs[key] = _parse_value(text, hints[key])
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


def spec_help() -> str:
    """One line per entry with its settings and defaults (for --help texts)."""
    lines = []
    for entry in REGULARIZERS.entries():
        cls = entry.obj
        settings = ", ".join(f"{f.name}={_format_value(f.default)}" for f in dataclasses.fields(cls))
        lines.append(f"{entry.name}{' (' + settings + ')' if settings else ''}: {entry.help}")
    return "\n".join(lines)


# ---------------------------------------------------------------- entries: baseline and weight reparameterizations
@register("baseline", order=0)
class Baseline(Regularizer):
    """L2 weight decay on conv/linear weights only (none on biases and norm layers): the paper's recipe."""


@register("enc", order=10)
class ENC(Regularizer):
    """Equivalent Norm Constraint (paper eq. 20-23): every layer's ||W||_F^2 = alpha, plus epsilon-shifted L2."""

    conflicts: ClassVar[tuple[str, ...]] = ("wn", "ws")
    bakes: ClassVar[bool] = True

    variant: Literal["eq20", "eq21", "eq22", "eq23"] = _param("eq22", "which normalization (eq. 22 is the best)")
    alpha: float | Literal["learnable"] = _param(1.0, "squared Frobenius norm of every layer", lo=0, lo_open=True)
    classifier: bool = _param(True, "also constrain the final classifier")
    el2_eps: float = _param(1e-3, "epsilon of the epsilon-shifted L2 on the raw weights (0 = plain L2)", lo=0)
    el2_lambda: float | Literal["wd"] = _param("wd", "its coefficient; wd = the run's weight decay", lo=0)

    def prepare(self, model: nn.Module) -> nn.Module:
        assert self.variant in VARIANTS
        alpha = None if self.alpha == "learnable" else float(self.alpha)
        return apply_enc(model, variant=self.variant, alpha=alpha, classifier=self.classifier)

    def decay_exempt(self, model: nn.Module) -> list[torch.Tensor]:
        return [raw_weight(module) for _, module, _ in enc_layers(model)]

    def penalty(self, model: nn.Module, weight_decay: float) -> torch.Tensor | None:
        lam = weight_decay if self.el2_lambda == "wd" else float(self.el2_lambda)
        if not any(True for _ in enc_layers(model)):
            return None
        return el2_loss(model, lam=lam, eps=self.el2_eps)


@register("wn", order=11)
class WeightNorm(Regularizer):
    """Weight normalization (Salimans & Kingma 2016): unit-norm rows times a learnable per-row gain g."""

    conflicts: ClassVar[tuple[str, ...]] = ("enc", "ws")
    bakes: ClassVar[bool] = True

    classifier: bool = _param(True, "also normalize the final classifier")

    def prepare(self, model: nn.Module) -> nn.Module:
        return apply_wn(model, classifier=self.classifier)


@register("ws", order=12)
class WeightStandardization(Regularizer):
    """Weight standardization (Qiao et al. 2019): rows to zero mean and unit variance."""

    conflicts: ClassVar[tuple[str, ...]] = ("enc", "wn")
    bakes: ClassVar[bool] = True

    classifier: bool = _param(False, "also standardize the final classifier (Qiao et al. leave it plain)")
    eps: float = _param(1e-5, "added to the row variance", lo=0, lo_open=True)

    def prepare(self, model: nn.Module) -> nn.Module:
        return apply_ws(model, classifier=self.classifier, eps=self.eps)


# ---------------------------------------------------------------- entries: feature noise (hooks: state-dict keys stay)
class _DropoutHook:
    """Forward pre-hook on the classifier: dropout on its input while the model trains (picklable, no parameters)."""

    def __init__(self, p: float) -> None:
        self.p = p

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        if not module.training or self.p == 0:
            return None
        return (F.dropout(args[0], self.p, training=True), *args[1:])


class _DropBlockHook:
    """Forward hook applying a timm DropBlock2d to a BN layer's output, in train mode only (the BN layer's mode)."""

    def __init__(self, block: nn.Module) -> None:
        self.block = block

    def __call__(self, module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        self.block.train(module.training)
        return self.block(output)


def _drop_block_site(block: nn.Module) -> nn.Module:
    """Where timm's ResNet blocks apply drop_block: after bn1 in a basic block (before its first activation), after
    bn2 in a bottleneck (bn3 present; timm.models.resnet.Bottleneck), so the identity path is never dropped."""
    site = getattr(block, "bn2" if hasattr(block, "bn3") else "bn1", None)
    if not isinstance(site, nn.modules.batchnorm._BatchNorm):
        raise UserError(f"dropblock needs ResNet blocks with bn1/bn2 layers; {type(block).__name__} has none. Use "
                        "dropout instead")
    return site


def _last_two_stages(net: nn.Module) -> list[list[nn.Module]]:
    """The residual blocks of the last two stages: ``layer3``/``layer4`` (torchvision and timm ResNets, ResNeXts,
    SE-ResNets) or the last two stride groups of a CifarResNet."""
    from robust_enc.models import CifarResNet

    if isinstance(getattr(net, "layer3", None), nn.Sequential) and isinstance(getattr(net, "layer4", None),
                                                                               nn.Sequential):
        return [list(net.layer3), list(net.layer4)]
    if isinstance(net, CifarResNet):
        stages: list[list[nn.Module]] = []
        for block in net.layers:
            if not stages or block.conv1.stride != (1, 1):  # a strided block opens a stage
                stages.append([])
            stages[-1].append(block)
        return stages[-2:]
    raise UserError(f"dropblock needs a ResNet-style model (layer3/layer4 stages or a CIFAR ResNet); "
                    f"{type(net).__name__} has neither. Use dropout instead")


@register("dropout", order=20)
class Dropout(Regularizer):
    """Dropout on the classifier's input (after the last BN layer, as the paper)."""

    p: float = _param(0.5, "drop probability", lo=0, hi=1, hi_open=True)

    def prepare(self, model: nn.Module) -> nn.Module:
        from robust_enc.models import classifier_of

        head = classifier_of(model)
        if head is None:
            raise UserError(f"dropout needs a model with a final linear classifier; {type(model).__name__} has none")
        head.register_forward_pre_hook(_DropoutHook(self.p))
        return model


@register("dropblock", order=21)
class DropBlock(Regularizer):
    """DropBlock (Ghiasi et al. 2018) with timm's ResNet setting: in every block of the last two stages, after bn1
    (basic) / bn2 (bottleneck) as timm's blocks, block sizes 5 and 3 (timm.models.resnet.drop_blocks)."""

    p: float = _param(0.1, "drop probability (the DropBlock paper's best ResNet-50 keep_prob 0.9)", lo=0, hi=1,
                      hi_open=True)

    def prepare(self, model: nn.Module) -> nn.Module:
        from timm.models.resnet import drop_blocks

        from robust_enc.models import NormalizedModel

        net = model.net if isinstance(model, NormalizedModel) else model
        stages = _last_two_stages(net)
        makers = drop_blocks(self.p)[2:]  # timm's per-stage DropBlock2d factories (None when p == 0)
        for blocks, make in zip(stages, makers):
            for block in blocks if make is not None else []:
                _drop_block_site(block).register_forward_hook(_DropBlockHook(make()))
        return model


# ---------------------------------------------------------------- entries: data and labels
@register("cutout", order=30)
class Cutout(Regularizer):
    """Cutout (DeVries & Taylor 2017): one square patch per image, centre uniform, clipped at the borders."""

    size: float = _param(0.5, "patch side as a fraction of the image side (16/32 on CIFAR)", lo=0, hi=1, lo_open=True)
    p: float = _param(1.0, "probability per image", lo=0, hi=1)
    fill: float | Literal["mean"] = _param("mean", "patch value; mean = the batch's channel mean (the original's 0 "
                                                   "after normalization)", lo=0, hi=1)

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        side_h, side_w = max(1, round(self.size * h)), max(1, round(self.size * w))
        top = torch.randint(0, h, (b, 1), device=x.device) - side_h // 2
        left = torch.randint(0, w, (b, 1), device=x.device) - side_w // 2
        rows = torch.arange(h, device=x.device)[None]
        cols = torch.arange(w, device=x.device)[None]
        in_rows = (rows >= top) & (rows < top + side_h)  # (B, H)
        in_cols = (cols >= left) & (cols < left + side_w)  # (B, W)
        mask = in_rows[:, :, None] & in_cols[:, None, :]
        if self.p < 1:
            mask &= (torch.rand(b, device=x.device) < self.p)[:, None, None]
        fill = x.mean(dim=(0, 2, 3), keepdim=True) if self.fill == "mean" else torch.tensor(self.fill, dtype=x.dtype)
        return torch.where(mask[:, None], fill.to(x.device), x)


@register("noise", order=31)
class InputNoise(Regularizer):
    """Gaussian input-noise injection in pixel units, clamped back to [0, 1]."""

    sigma: float = _param(0.1, "noise standard deviation (pixel units)", lo=0)

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        return (x + self.sigma * torch.randn_like(x)).clamp_(0, 1)


@register("mixup", order=32)
class Mixup(Regularizer):
    """mixup (Zhang et al. 2018) via timm's Mixup; alpha 0.2 is the mixup paper's ImageNet setting."""

    min_batch: ClassVar[int] = 2

    alpha: float = _param(0.2, "Beta(alpha, alpha) mixing weight", lo=0, lo_open=True)
    prob: float = _param(1.0, "probability a batch is mixed", lo=0, hi=1)

    def mix_args(self) -> dict[str, float]:
        return {"mixup_alpha": self.alpha, "prob": self.prob}


@register("cutmix", order=33)
class CutMix(Regularizer):
    """CutMix (Yun et al. 2019) via timm's Mixup; alpha 1 and prob 1 are the CutMix paper's ImageNet setting."""

    min_batch: ClassVar[int] = 2

    alpha: float = _param(1.0, "Beta(alpha, alpha) box area", lo=0, lo_open=True)
    prob: float = _param(1.0, "probability a batch is mixed", lo=0, hi=1)

    def mix_args(self) -> dict[str, float]:
        return {"cutmix_alpha": self.alpha, "prob": self.prob}


@register("ls", order=40)
class LabelSmoothing(Regularizer):
    """Label smoothing (Szegedy et al. 2016); with mixup/cutmix the smoothing goes into timm's mixed targets."""

    smoothing: float = _param(0.1, "probability mass spread over all classes", lo=0, hi=1, hi_open=True)

    def label_smoothing(self) -> float:
        return self.smoothing


# ---------------------------------------------------------------- entries: loss terms
def _layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, LAYER_TYPES) and isinstance(m.weight, torch.Tensor)]


def _layer_weights(model: nn.Module) -> list[torch.Tensor]:
    """Conv/linear weights as the forward pass uses them (normalized when reparameterized)."""
    return [m.weight for m in _layers(model)]


@register("weissi", order=50)
class WEISSI(Regularizer):
    """Weight-scale-shift-invariant regularizer: lambda1 sum_l log||W_l|| + lambda2 sum_l ||W_l / ||W_l|| ||_1."""

    lambda1: float = _param(1e-4, "coefficient of the log-norm term", lo=0)
    lambda2: float = _param(1e-4, "coefficient of the L1 norm of the normalized weights", lo=0)

    def decay_exempt(self, model: nn.Module) -> list[torch.Tensor]:
        # Plain L2 on the same weights would undo what WEISSI is for: it is not invariant to the scale shift
        # W_l -> gamma_l W_l (prod gamma_l = 1). So, as ENC, the weights it regularizes get no weight decay.
        return [raw_weight(m) for m in _layers(model)]

    def penalty(self, model: nn.Module, weight_decay: float) -> torch.Tensor | None:
        terms = []
        for w in _layer_weights(model):
            norm = w.float().norm().clamp_min(1e-12)
            terms.append(self.lambda1 * norm.log() + self.lambda2 * (w.float() / norm).abs().sum())
        return torch.stack(terms).sum() if terms else None


@register("l1", order=51)
class L1(Regularizer):
    """L1 penalty coef * sum |W| on conv/linear weights."""

    coef: float = _param(1e-5, "coefficient", lo=0)

    def penalty(self, model: nn.Module, weight_decay: float) -> torch.Tensor | None:
        terms = [w.float().abs().sum() for w in _layer_weights(model)]
        return self.coef * torch.stack(terms).sum() if terms else None


@register("gammadecay", order=52)
class GammaDecay(Regularizer):
    """Gamma decay (Luo et al. 2019): L2 (coef/2) * sum gamma^2 on the BN scales."""

    coef: float = _param(1e-4, "coefficient", lo=0)

    def penalty(self, model: nn.Module, weight_decay: float) -> torch.Tensor | None:
        gammas = [m.weight for m in model.modules()
                  if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None]
        return 0.5 * self.coef * torch.stack([g.float().square().sum() for g in gammas]).sum() if gammas else None


# ---------------------------------------------------------------- entries: update rules
@register("gradnorm", order=60)
class GradNorm(Regularizer):
    """Gradient-norm penalty (Zhao et al. 2022) by its finite-difference rule (1-a) g(t) + a g(t + r g/||g||);
    r 0.1 and a 0.8 are the authors' CIFAR setting. Two forward/backward passes per step."""

    conflicts: ClassVar[tuple[str, ...]] = ("sam",)

    r: float = _param(0.1, "step length of the probe (parameter units)", lo=0)
    a: float = _param(0.8, "weight of the probe gradient (lambda / r)", lo=0, hi=1)

    def sharpness(self) -> tuple[float, float] | None:
        return self.r, self.a


@register("sam", order=61)
class SAM(Regularizer):
    """Sharpness-aware minimization (Foret et al. 2021): the gradnorm rule with a = 1; rho 0.05 is SAM's default."""

    conflicts: ClassVar[tuple[str, ...]] = ("gradnorm",)

    rho: float = _param(0.05, "neighbourhood radius (parameter units)", lo=0)

    def sharpness(self) -> tuple[float, float] | None:
        return self.rho, 1.0


# ---------------------------------------------------------------- the recipe: what a training step does
@dataclass(frozen=True)
class StepResult:
    """Kept on the device: reading ``loss`` or ``correct`` waits for the GPU, so the loop sums the tensors and reads
    them every few steps."""

    loss_on_device: torch.Tensor  # 0-dim float32: data loss + penalty terms, at the pre-step weights
    correct_on_device: torch.Tensor  # 0-dim int64: top-1 correct against the hard labels y (before mixing)
    n: int  # batch size

    @property
    def loss(self) -> float:
        return float(self.loss_on_device)

    @property
    def correct(self) -> int:
        return int(self.correct_on_device)


def _batchnorm_state(model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(buf, buf.detach().clone()) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
            for buf in m.buffers()]


class Recipe:
    """A parsed spec bound to a run's number of classes, batch size and weight decay."""

    def __init__(self, entries: Sequence[Regularizer], *, num_classes: int, weight_decay: float) -> None:
        from timm.data import Mixup as TimmMixup
        from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

        self.entries = tuple(entries)
        self.spec = "+".join(e.canonical() for e in self.entries)
        self.name = re.sub(r"[^A-Za-z0-9._+=-]", "-", "+".join(e.short() for e in self.entries))
        self.num_classes = num_classes
        self.weight_decay = weight_decay
        self.smoothing = sum(e.label_smoothing() for e in self.entries)
        mix: dict[str, float] = {}
        for entry in self.entries:
            for key, value in entry.mix_args().items():
                if key in mix and mix[key] != value:
                    raise UserError(f"mixup and cutmix are combined with different {key} ({mix[key]} vs {value}); "
                                    f"give both the same {key}")
                mix[key] = value
        self.mixer = None
        if mix:
            # timm's Mixup defaults mixup_alpha to 1: unset alphas must be 0 so cutmix alone stays cutmix.
            self.mixer = TimmMixup(**{"mixup_alpha": 0.0, "cutmix_alpha": 0.0, **mix},
                                   label_smoothing=self.smoothing, num_classes=num_classes)
        if self.mixer is not None:
            self.criterion: nn.Module = SoftTargetCrossEntropy()
        elif self.smoothing > 0:
            self.criterion = LabelSmoothingCrossEntropy(self.smoothing)
        else:
            self.criterion = nn.CrossEntropyLoss()
        rules = [e.sharpness() for e in self.entries if e.sharpness() is not None]
        self.sharpness = rules[0] if rules else None

    def __repr__(self) -> str:
        return f"Recipe({self.spec!r}, num_classes={self.num_classes}, weight_decay={self.weight_decay})"

    # --- optimizer groups
    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        """Two groups for torch.optim.SGD: "decay" (conv/linear weights, the raw tensors of reparameterized layers,
        without those an entry penalizes itself, e.g. ENC's epsilon-shifted L2) with weight_decay, and "no_decay"
        (biases, norm layers, WN gains, learnable alphas, everything else) with 0. Empty groups are left out."""
        exempt = {id(t) for e in self.entries for t in e.decay_exempt(model)}
        decay_ids = {id(raw_weight(m)) for m in model.modules()
                     if isinstance(m, LAYER_TYPES) and isinstance(getattr(m, "weight", None), torch.Tensor)}
        decay, no_decay = [], []
        for _, p in model.named_parameters():
            if p.requires_grad:
                (decay if id(p) in decay_ids and id(p) not in exempt else no_decay).append(p)
        groups = [{"params": decay, "weight_decay": self.weight_decay, "name": "decay"},
                  {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]
        return [g for g in groups if g["params"]]

    # --- one step
    def transform_batch(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, target): pixel transforms in canonical order, then mixing. target is y (int64, B) or soft (B, K)."""
        from timm.data.mixup import mixup_target

        with torch.no_grad():
            for entry in self.entries:
                x = entry.transform(x)
            if self.mixer is None:
                return x, y
            even = len(x) - len(x) % 2  # timm's Mixup wants an even batch: the odd one out stays unmixed
            x_mix, t_mix = self.mixer(x[:even].clone(), y[:even]) if even else (x[:0], None)
            if even == len(x):
                return x_mix, t_mix
            t_rest = mixup_target(y[even:], self.num_classes, 1.0, self.smoothing)
            x = torch.cat([x_mix, x[even:]])
            return x, (t_rest if t_mix is None else torch.cat([t_mix, t_rest]))

    def _forward_backward(self, model: nn.Module, x: torch.Tensor, target: torch.Tensor,
                          autocast: Callable[[], contextlib.AbstractContextManager],
                          scaler: torch.amp.GradScaler | None) -> tuple[torch.Tensor, torch.Tensor]:
        with step_weights(model):  # each reparameterized weight normalized once per pass, shared with ENC's L2 term
            with autocast():
                logits = model(x)
                loss = self.criterion(logits, target)
            loss = loss.float()
            for entry in self.entries:  # penalties in float32, outside autocast
                term = entry.penalty(model, self.weight_decay)
                if term is not None:
                    loss = loss + term.to(loss.device)
        (scaler.scale(loss) if scaler is not None else loss).backward()
        return loss.detach(), logits.detach()

    def _sharpness_pass(self, model: nn.Module, x: torch.Tensor, target: torch.Tensor,
                        optimizer: torch.optim.Optimizer, autocast: Callable[[], contextlib.AbstractContextManager],
                        scaler: torch.amp.GradScaler | None) -> None:
        """Replace the gradients g(theta) by (1 - a) g(theta) + a g(theta + r g/||g||) (global norm over the
        optimizer's parameters). With a scaler both gradients carry the same scale, so their mix does too."""
        r, a = self.sharpness
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if a == 0 or not params:
            return
        inv_scale = 1.0 / scaler.get_scale() if scaler is not None else 1.0
        first = [p.grad.detach().clone() for p in params]
        grad_norm = float(torch.linalg.vector_norm(torch.stack([g.float().norm() for g in first]))) * inv_scale
        if not math.isfinite(grad_norm) or grad_norm == 0:
            return  # an AMP overflow (the scaler skips this step) or a flat point (the probe would not move)
        step = r * inv_scale / grad_norm
        saved = [p.detach().clone() for p in params]
        batchnorm = _batchnorm_state(model)  # the probe pass must not count twice in the running statistics
        with torch.no_grad():
            for p, g in zip(params, first):
                p.add_(g, alpha=step)
        optimizer.zero_grad(set_to_none=True)
        self._forward_backward(model, x, target, autocast, scaler)
        with torch.no_grad():
            for p, old in zip(params, saved):
                p.copy_(old)
            for buf, old in batchnorm:
                buf.copy_(old)
            for p, g in zip(params, first):
                p.grad = g.mul_(1 - a) if p.grad is None else p.grad.mul_(a).add_(g, alpha=1 - a)

    def train_step(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, optimizer: torch.optim.Optimizer, *,
                   autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                   scaler: torch.amp.GradScaler | None = None) -> StepResult:
        """zero_grad, batch transforms, forward, loss + penalties, backward (twice for gradnorm/SAM), optimizer
        step (``scaler.step`` + ``scaler.update`` when a scaler is given). x: (B, C, H, W) in [0, 1]; y: (B,) int64."""
        optimizer.zero_grad(set_to_none=True)
        x_in, target = self.transform_batch(x, y)
        loss, logits = self._forward_backward(model, x_in, target, autocast, scaler)
        if self.sharpness is not None:
            self._sharpness_pass(model, x_in, target, optimizer, autocast, scaler)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        return StepResult(loss_on_device=loss, correct_on_device=(logits.argmax(dim=1) == y).sum(), n=len(y))


def build_recipe(spec: str, *, num_classes: int, batch_size: int, weight_decay: float) -> Recipe:
    """Parse and check a spec for a run (UserError before any training for bad or incompatible settings)."""
    entries = parse_spec(spec)
    if num_classes < 2:
        raise UserError(f"training needs at least 2 classes, got num_classes={num_classes}")
    if batch_size < 1:
        raise UserError(f"batch size must be positive, got {batch_size}")
    if not (math.isfinite(weight_decay) and weight_decay >= 0):
        raise UserError(f"weight decay must be a finite number >= 0, got {weight_decay}")
    for entry in entries:
        if batch_size < entry.min_batch:
            raise UserError(f"regularizer {entry.name} mixes pairs of images and needs a batch size of at least "
                            f"{entry.min_batch}; got {batch_size}")
    return Recipe(entries, num_classes=num_classes, weight_decay=weight_decay)
