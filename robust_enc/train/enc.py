"""Equivalent Norm Constraint (paper section 3, eq. 19-23) and its baselines as weight reparameterizations.

Every conv and linear weight gets a ``torch.nn.utils.parametrize`` parametrization: the raw tensor
(``module.parametrizations.weight.original``) is what the optimizer updates, the normalized tensor ``module.weight``
is what forward and backward use. A layer's rows are its output units: for a convolution row j is output filter j,
of length in_channels / groups * kh * kw, so grouped and depthwise convolutions need no special case.

- ENC (eq. 20-23) scales every layer to ||W_hat||_F^2 = alpha, alpha fixed or learnable (one scalar per layer).
- WN (Salimans & Kingma): rows to unit norm times a learnable per-row gain g (torch's ``weight_norm``).
- WS (Qiao et al.): rows to zero mean and unit (biased) variance.
- The epsilon-shifted L2 penalty (Li, Chen, Xia, Yang, arXiv 1911.05920) on the raw weights of ENC layers.
- ``bake_model`` removes the parametrizations and keeps the normalized weights: a plain model, same outputs.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from typing import Literal

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import weight_norm

logger = logging.getLogger(__name__)

Variant = Literal["eq20", "eq21", "eq22", "eq23"]
VARIANTS: tuple[str, ...] = ("eq20", "eq21", "eq22", "eq23")
LAYER_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)  # the layers whose weights ENC constrains
NORM_EPS = 1e-12  # guards the divisions by a norm; far below any trained weight's norm, so the invariant stays exact


class ENCWeight(nn.Module):
    """W (m_i rows) -> W_hat with ||W_hat||_F^2 = alpha (paper eq. 20-23).

    ``alpha=None`` makes alpha learnable: a parameter ``log_alpha`` (starts at log 1 = 0), so alpha = exp(log_alpha)
    stays positive whatever the optimizer does.
    """

    def __init__(self, variant: str = "eq22", alpha: float | None = 1.0) -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"ENC variant must be one of {VARIANTS}, got {variant!r}")
        if alpha is not None and not alpha > 0:
            raise ValueError(f"ENC alpha must be positive, got {alpha}")
        self.variant = variant
        self.per_row = variant in ("eq21", "eq22")  # eq. 21/22 normalize each row, eq. 20/23 the whole tensor
        self.centred = variant in ("eq22", "eq23")  # eq. 22/23 subtract the mean first (weight standardization)
        self.alpha = alpha
        self.log_alpha = nn.Parameter(torch.zeros(())) if alpha is None else None

    def current_alpha(self) -> torch.Tensor | float:
        return self.log_alpha.exp() if self.log_alpha is not None else self.alpha

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        rows = weight.shape[0]
        flat = weight.reshape(rows, -1)
        # A centred row of length 1 (or a centred one-element tensor) is identically zero: normalize uncentred there.
        centred = self.centred and (flat.shape[1] > 1 if self.per_row else flat.numel() > 1)
        if self.per_row:
            c = flat - flat.mean(dim=1, keepdim=True) if centred else flat
            norm = c.norm(dim=1, keepdim=True)
            share = 1.0 / rows  # each of the m_i rows gets squared norm alpha / m_i
        else:
            c = flat - flat.mean() if centred else flat
            # Accumulate in float64: torch's float32 CPU norm over a 2048x2048 conv (4M entries) is off by ~1e-4
            # relative (measured), enough to break ||W_hat||_F^2 = alpha. The per-row norms above are short.
            norm = torch.linalg.vector_norm(c, dtype=torch.float64).to(c.dtype)
            share = 1.0
        if self.log_alpha is not None:
            scale = (0.5 * self.log_alpha).exp() * math.sqrt(share)
        else:
            scale = math.sqrt(self.alpha * share)
        return (c * (scale / norm.clamp_min(NORM_EPS))).reshape(weight.shape)

    def extra_repr(self) -> str:
        return f"variant={self.variant}, alpha={'learnable' if self.alpha is None else self.alpha}"


class WSWeight(nn.Module):
    """Weight standardization: each row to zero mean and unit biased variance, (W_j - mu_j) / sqrt(var_j + eps)."""

    def __init__(self, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps  # inside the square root, as Qiao et al.'s code; the squared row norm is then ~ row length

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        flat = weight.reshape(weight.shape[0], -1)
        var, mean = torch.var_mean(flat, dim=1, keepdim=True, correction=0)
        return ((flat - mean) / (var + self.eps).sqrt()).reshape(weight.shape)


def target_layers(model: nn.Module, *, classifier: bool = True) -> list[tuple[str, nn.Module]]:
    """(name, module) of every conv and linear layer with a weight, optionally without the final classifier."""
    from robust_enc.models import classifier_of  # lazy: models imports train/ lazily too

    head = None if classifier else classifier_of(model)
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, LAYER_TYPES) and m is not head and isinstance(getattr(m, "weight", None), torch.Tensor)]


def _check_unparametrized(name: str, module: nn.Module) -> None:
    if parametrize.is_parametrized(module, "weight"):
        raise ValueError(f"layer {name!r} already has a weight parametrization; apply one of ENC, WN, WS only")


def apply_enc(model: nn.Module, *, variant: str = "eq22", alpha: float | None = 1.0,
              classifier: bool = True) -> nn.Module:
    """Reparameterize every conv/linear weight with ENC (in place; returns the model). ``alpha=None``: learnable."""
    for name, module in target_layers(model, classifier=classifier):
        _check_unparametrized(name, module)
        parametrize.register_parametrization(module, "weight", ENCWeight(variant, alpha))
    return model


def apply_ws(model: nn.Module, *, classifier: bool = False, eps: float = 1e-5) -> nn.Module:
    """Weight standardization on every conv/linear weight (the classifier only with ``classifier=True``)."""
    for name, module in target_layers(model, classifier=classifier):
        _check_unparametrized(name, module)
        parametrize.register_parametrization(module, "weight", WSWeight(eps))
    return model


def apply_wn(model: nn.Module, *, classifier: bool = True) -> nn.Module:
    """Weight normalization (torch's ``weight_norm`` parametrization, dim 0 = rows): W_j = g_j * v_j / ||v_j||.
    At creation g_j = ||v_j||, so the function is unchanged until training moves g and v."""
    for name, module in target_layers(model, classifier=classifier):
        _check_unparametrized(name, module)
        weight_norm(module, "weight", dim=0)
    return model


def _is_ours(parametrization: nn.Module) -> bool:
    return isinstance(parametrization, (ENCWeight, WSWeight)) or type(parametrization).__name__ == "_WeightNorm"


def parametrized_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(name, module) of every layer whose weight carries an ENC, WN or WS parametrization."""
    for name, module in model.named_modules():
        if parametrize.is_parametrized(module, "weight") and any(map(_is_ours, module.parametrizations.weight)):
            yield name, module


def enc_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module, ENCWeight]]:
    """(name, module, its ENCWeight) of every ENC-reparameterized layer."""
    for name, module in parametrized_layers(model):
        for p in module.parametrizations.weight:
            if isinstance(p, ENCWeight):
                yield name, module, p


def raw_weight(module: nn.Module) -> torch.Tensor:
    """The tensor the optimizer updates for this layer's weight: the parametrization's ``original`` (WN: the direction
    v, ``original1``; its gain g is ``original0``), or the plain weight of an unparametrized layer."""
    if not parametrize.is_parametrized(module, "weight"):
        return module.weight
    plist = module.parametrizations.weight
    return plist.original if hasattr(plist, "original") else plist.original1


def bake_model(model: nn.Module) -> nn.Module:
    """Remove every ENC/WN/WS parametrization keeping the normalized weights (in place; returns the model): the
    plain model gives the same outputs, and its state dict has ``weight`` keys where the raw one had
    ``parametrizations.weight.original``. Learnable alphas are baked into the weights."""
    for _, module in list(parametrized_layers(model)):
        parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
    return model


# ---------------------------------------------------------------- epsilon-shifted L2 (arXiv 1911.05920)
def el2_penalty(weight: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """sum_i [(n-1) (sigma_i - eps)^2 + n mu_i^2] over the rows i of ``weight`` (conv filters / linear rows; n entries
    per row, mean mu_i, unbiased std sigma_i). Multiply by lambda/2: its gradient is then the authors'
    lambda * [(1 - eps/sigma_i)(w_i - mu_i) + mu_i]; eps = 0 gives ||W||_F^2 (plain L2). A scalar, at least float32."""
    flat = weight.reshape(weight.shape[0], -1)
    if flat.dtype in (torch.float16, torch.bfloat16):
        flat = flat.float()
    n = flat.shape[1]
    mean = flat.mean(dim=1)
    penalty = n * mean.square().sum()
    if n > 1:  # a row of one entry has no spread term ((n - 1) = 0) and no defined unbiased std
        sq = (flat - mean[:, None]).square().sum(dim=1)
        # clamp: the sqrt's gradient is infinite at 0 (a constant row); below 1e-30 the row is treated as constant
        sigma = (sq / (n - 1)).clamp_min(1e-30).sqrt()
        penalty = penalty + (n - 1) * (sigma - eps).square().sum()
    return penalty


def el2_loss(model: nn.Module, *, lam: float, eps: float = 1e-3) -> torch.Tensor:
    """(lam / 2) * el2_penalty over the raw weights of every ENC layer of ``model`` (0 when there is none)."""
    total = None
    for _, module, _ in enc_layers(model):
        term = el2_penalty(raw_weight(module), eps)
        total = term if total is None else total + term
    if total is None:
        return torch.zeros(())
    return 0.5 * lam * total
