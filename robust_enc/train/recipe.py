"""What one training step does for a regularizer spec: the optimizer's parameter groups, the batch transforms and
mixing, the loss with its penalty terms, and the SAM-style double step. ``Recipe`` runs the spec's hooks; nothing
here switches on an entry's name."""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from robust_enc.errors import UserError
from robust_enc.models import WEIGHT_LAYERS
from robust_enc.regularizers import Regularizer, parse_spec
from robust_enc.regularizers.enc import raw_weight, step_weights


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
                     if isinstance(m, WEIGHT_LAYERS) and isinstance(getattr(m, "weight", None), torch.Tensor)}
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
