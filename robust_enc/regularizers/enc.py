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

import contextlib
import functools
import logging
import math
from collections.abc import Iterator

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import weight_norm

from robust_enc.models import WEIGHT_LAYERS, classifier_of
from robust_enc.regularizers.rownorm import NORM_EPS, BatchedRowNormalize, normalize_rows, row_statistics

logger = logging.getLogger(__name__)

VARIANTS: tuple[str, ...] = ("eq20", "eq21", "eq22", "eq23")


class _RowBatch:
    """One step's row-wise layers of one kind (``step_weights``), normalized together at the first one's forward."""

    def __init__(self, key: tuple, members: list[tuple[nn.Module, torch.Tensor]]) -> None:
        self.key = key
        self.members = members  # (parametrization, the raw weight it normalizes)
        self.index = {id(p): i for i, (p, _) in enumerate(members)}
        self.outputs: tuple[list[torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def w_hat(self, p: nn.Module, weight: torch.Tensor) -> torch.Tensor | None:
        """p's normalized weight, or None when ``weight`` is not the raw weight the batch was built for."""
        i = self.index[id(p)]
        if weight is not self.members[i][1]:
            return None
        if self.outputs is None:
            raws = [raw for _, raw in self.members]
            rows = torch.tensor([len(raw) for raw in raws])
            n = torch.tensor([raw[0].numel() for raw in raws], dtype=raws[0].dtype).repeat_interleave(rows)
            gain = torch.tensor([p.batch_gain(len(raw)) for p, raw in self.members],
                                dtype=raws[0].dtype).repeat_interleave(rows)
            consts = (n.unsqueeze(1).to(raws[0].device), gain.unsqueeze(1).to(raws[0].device))
            *w_hats, mean, norm = BatchedRowNormalize.apply(self.key, consts, *raws)
            self.outputs = (w_hats, mean, norm, consts[0])
            for (q, _), mean_l, norm_l in zip(self.members, mean.split(rows.tolist()), norm.split(rows.tolist())):
                if isinstance(q, ENCWeight):
                    q.row_stats = (mean_l, norm_l)
        return self.outputs[0][i]


class ENCWeight(nn.Module):
    """W (m_i rows) -> W_hat with ||W_hat||_F^2 = alpha (paper eq. 20-23).

    ``alpha=None`` makes alpha learnable: a parameter ``log_alpha`` (starts at log 1 = 0), so alpha = exp(log_alpha)
    stays positive whatever the optimizer does. Inside ``step_weights`` the layer keeps the raw rows' statistics of
    the pass in ``row_stats`` for the epsilon-shifted L2 (``el2_loss``), so that term costs no pass over the weights.
    """

    def __init__(self, variant: str = "eq22", alpha: float | None = 1.0, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"ENC variant must be one of {VARIANTS}, got {variant!r}")
        if alpha is not None and not alpha > 0:
            raise ValueError(f"ENC alpha must be positive, got {alpha}")
        self.variant = variant
        self.per_row = variant in ("eq21", "eq22")  # eq. 21/22 normalize each row, eq. 20/23 the whole tensor
        self.centred = variant in ("eq22", "eq23")  # eq. 22/23 subtract the mean first (weight standardization)
        self.alpha = alpha
        # in the weight's dtype: a float64 network keeps a float64 alpha (a float32 one would round every scale)
        self.log_alpha = nn.Parameter(torch.zeros((), dtype=dtype)) if alpha is None else None
        self.recording = False  # set by step_weights: keep row_stats of the pass
        self.row_stats: tuple[torch.Tensor, torch.Tensor] | None = None  # (row means, centred row norms)
        self.batch: _RowBatch | None = None  # set by step_weights: normalized with the step's other row-wise layers

    def batch_key(self, weight: torch.Tensor) -> tuple | None:
        """Which _RowBatch kind this layer joins: the row-wise variants with a fixed alpha, centred only where a row
        has more than one entry (a row of one entry is normalized uncentred, see forward); None: per layer."""
        if not self.per_row or self.log_alpha is not None or (self.centred and weight[0].numel() == 1):
            return None
        return ("enc", self.centred)

    def batch_gain(self, rows: int) -> float:
        return math.sqrt(self.alpha / rows)  # each of the rows gets squared norm alpha / rows

    def current_alpha(self) -> torch.Tensor | float:
        return self.log_alpha.exp() if self.log_alpha is not None else self.alpha

    def _scale(self, centred: bool, mean: torch.Tensor, norm: torch.Tensor, n: int,
               *log_alpha: torch.Tensor) -> torch.Tensor:
        """k of W_hat = k (W - m) from the row means and centred row norms: sqrt(alpha share) / ||W - m||."""
        if self.per_row:
            share = 1.0 / len(mean)  # each of the m_i rows gets squared norm alpha / m_i
            # eq. 21: ||W_i||^2 = ||W_i - mean_i||^2 + n mean_i^2, a sum of positives (no cancellation)
            target = norm if centred else (norm.square() + n * mean.square()).sqrt()
        else:
            share = 1.0
            offset = mean - mean.mean() if centred else mean
            # ||W - m||^2 over the tensor summed row by row: a two-level float32 sum, accurate to ~1e-7 relative even
            # for 9.4M entries (float32 in one long run was off by ~1e-4); the (1, 1) result scales every row.
            target = (norm.square() + n * offset.square()).sum().sqrt().reshape(1, 1)
        scale = (0.5 * log_alpha[0]).exp() * math.sqrt(share) if log_alpha else math.sqrt(self.alpha * share)
        return scale / target.clamp_min(NORM_EPS)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if not torch.compiler.is_compiling() and self.batch is not None:  # a compiled graph traces the plain ops
            w_hat = self.batch.w_hat(self, weight)
            if w_hat is not None:
                return w_hat
        rows = weight.shape[0]
        flat = weight.reshape(rows, -1)
        # A centred row of length 1 (or a centred one-element tensor) is identically zero: normalize uncentred there.
        centred = self.centred and (flat.shape[1] > 1 if self.per_row else flat.numel() > 1)
        centre = ("row" if self.per_row else "all") if centred else "none"
        params = (self.log_alpha,) if self.log_alpha is not None else ()
        w_hat, mean, norm = normalize_rows(flat, functools.partial(self._scale, centred), centre, *params)
        if self.recording and not torch.compiler.is_compiling():  # a compiled graph keeps no side outputs
            self.row_stats = (mean, norm)
        return w_hat.reshape(weight.shape)

    def extra_repr(self) -> str:
        return f"variant={self.variant}, alpha={'learnable' if self.alpha is None else self.alpha}"


class WSWeight(nn.Module):
    """Weight standardization: each row to zero mean and unit biased variance, (W_j - mu_j) / sqrt(var_j + eps)."""

    def __init__(self, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps  # inside the square root, as Qiao et al.'s code; the squared row norm is then ~ row length
        self.batch: _RowBatch | None = None  # set by step_weights, as ENCWeight's

    def batch_key(self, weight: torch.Tensor) -> tuple:
        return ("ws", self.eps)

    def batch_gain(self, rows: int) -> float:
        return 1.0  # unused: WS's scale has no gain

    def _scale(self, mean: torch.Tensor, norm: torch.Tensor, n: int) -> torch.Tensor:
        return (norm.square() / n + self.eps).rsqrt()  # biased variance = ||W_j - mu_j||^2 / n

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if not torch.compiler.is_compiling() and self.batch is not None:
            w_hat = self.batch.w_hat(self, weight)
            if w_hat is not None:
                return w_hat
        flat = weight.reshape(weight.shape[0], -1)
        return normalize_rows(flat, self._scale, "row")[0].reshape(weight.shape)


def target_layers(model: nn.Module, *, classifier: bool = True) -> list[tuple[str, nn.Module]]:
    """(name, module) of every conv and linear layer with a weight, optionally without the final classifier."""
    head = None if classifier else classifier_of(model)
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, WEIGHT_LAYERS) and m is not head and isinstance(getattr(m, "weight", None), torch.Tensor)]


def _check_unparametrized(name: str, module: nn.Module) -> None:
    if parametrize.is_parametrized(module, "weight"):
        raise ValueError(f"layer {name!r} already has a weight parametrization; apply one of ENC, WN, WS only")


def apply_enc(model: nn.Module, *, variant: str = "eq22", alpha: float | None = 1.0,
              classifier: bool = True) -> nn.Module:
    """Reparameterize every conv/linear weight with ENC (in place; returns the model). ``alpha=None``: learnable."""
    for name, module in target_layers(model, classifier=classifier):
        _check_unparametrized(name, module)
        parametrize.register_parametrization(module, "weight", ENCWeight(variant, alpha, dtype=module.weight.dtype))
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
def el2_from_row_stats(mean: torch.Tensor, norm: torch.Tensor, n: int | torch.Tensor, eps: float = 1e-3
                       ) -> torch.Tensor:
    """el2_penalty from the rows' means and centred norms (n entries per row, or a tensor of n per row): with
    sigma_i = norm_i / sqrt(n - 1), (n - 1) (sigma_i - eps)^2 = (norm_i - eps sqrt(n - 1))^2. A scalar, at least
    float32."""
    if mean.dtype in (torch.float16, torch.bfloat16):
        mean, norm = mean.float(), norm.float()
    if isinstance(n, torch.Tensor):  # a row of one entry has norm 0 and sqrt(n - 1) = 0: its spread term is 0
        return (n * mean.square()).sum() + (norm - eps * (n - 1).sqrt()).square().sum()
    penalty = n * mean.square().sum()
    if n > 1:  # a row of one entry has no spread term ((n - 1) = 0) and no defined unbiased std
        penalty = penalty + (norm - eps * math.sqrt(n - 1)).square().sum()
    return penalty


def el2_penalty(weight: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """sum_i [(n-1) (sigma_i - eps)^2 + n mu_i^2] over the rows i of ``weight`` (conv filters / linear rows; n entries
    per row, mean mu_i, unbiased std sigma_i). Multiply by lambda/2: its gradient is then the authors'
    lambda * [(1 - eps/sigma_i)(w_i - mu_i) + mu_i]; eps = 0 gives ||W||_F^2 (plain L2). A scalar, at least float32."""
    flat = weight.reshape(weight.shape[0], -1)
    if flat.dtype in (torch.float16, torch.bfloat16):
        flat = flat.float()
    mean, _, norm = row_statistics(flat)  # torch's norm backward gives a constant row (norm 0) a zero gradient
    return el2_from_row_stats(mean, norm, flat.shape[1], eps)


def el2_loss(model: nn.Module, *, lam: float, eps: float = 1e-3) -> torch.Tensor:
    """(lam / 2) * el2_penalty over the raw weights of every ENC layer of ``model`` (0 when there is none). Inside
    ``step_weights`` it reuses the row statistics the forward pass computed; elsewhere it computes them."""
    total = None
    batches = set()
    for _, module, p in enc_layers(model):
        if p.batch is not None and p.batch.outputs is not None:  # once for all the batch's rows
            if id(p.batch) in batches:
                continue
            batches.add(id(p.batch))
            _, mean, norm, n = p.batch.outputs
            term = el2_from_row_stats(mean, norm, n, eps)
        elif p.row_stats is not None:
            term = el2_from_row_stats(*p.row_stats, raw_weight(module)[0].numel(), eps)
        else:
            term = el2_penalty(raw_weight(module), eps)
        total = term if total is None else total + term
    if total is None:
        return torch.zeros(())
    return 0.5 * lam * total


@contextlib.contextmanager
def step_weights(model: nn.Module) -> Iterator[None]:
    """One training step's weights: ``parametrize.cached()`` (each ENC/WN/WS weight normalized once, shared by every
    use in the pass), the row-wise ENC/WS layers normalized together (one _RowBatch per kind, dtype and device) and
    ENC layers keeping their raw rows' statistics for ``el2_loss``; dropped again on exit."""
    layers = [p for _, _, p in enc_layers(model)]
    groups: dict[tuple, list[tuple[nn.Module, torch.Tensor]]] = {}
    for _, module in parametrized_layers(model):
        plist = module.parametrizations.weight
        if len(plist) == 1 and isinstance(plist[0], (ENCWeight, WSWeight)):
            key = plist[0].batch_key(plist.original)
            if key is not None:
                groups.setdefault((key, plist.original.dtype, plist.original.device), []).append(
                    (plist[0], plist.original))
    batched = []
    for (key, _, _), members in groups.items():
        batch = _RowBatch(key, members)
        for p, _ in members:
            p.batch = batch
            batched.append(p)
    for p in layers:
        p.recording, p.row_stats = True, None
    try:
        with parametrize.cached():
            yield
    finally:
        for p in layers:
            p.recording, p.row_stats = False, None
        for p in batched:
            p.batch = None
