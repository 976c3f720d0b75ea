"""Generalization Bound Regularizer (paper eq. 18): the mean over samples of ||d f(x) / d x||_F^2.

x is the model input, images in [0, 1] (normalization lives inside the model), so the Jacobian is in pixel units.
f is chosen from ``OUTPUTS``: ``logits`` (the paper's f, default), ``softmax``, ``true-prob`` (the theorem's A_s)
or ``loss`` (per-example cross-entropy). Two ways to get each example's squared Frobenius norm:

- ``exact``: the full Jacobian, one backward pass per output (measured fastest on CPU: 9.9 s for ResNet-20 x 1,000
  images x 10 classes, against 10.9 s for batched vector-Jacobian products and 14.3 s for ``vmap(jacrev)``).
- ``hutchinson``: ||J||_F^2 = E_v ||J^T v||^2 for Rademacher v (E[v v^T] = I), k probes per example: k backward
  passes whatever the number of classes, so it is the one to use for 1,000 ImageNet classes.

Per-example values never depend on batching in eval mode: each output is summed over the batch before the
backward pass, and example i's output depends only on x_i, so the gradient w.r.t. x_i is that example's own.

Train mode is different: BatchNorm normalizes with the batch's statistics, so f(x_i) depends on every x_j of its
batch and the gradient of a batch-summed output gives x_i the cross terms d f(x_j) / d x_i as well (measured on
resnet_tiny, 8 random images: 19.0 instead of the true 48.3). Train-mode values are therefore the diagonal blocks
d f(x_i) / d x_i (with the statistics of the batch x_i is in), one vector-Jacobian product per (example, output) pair
(exact: B * K per batch of B; hutchinson: B per probe), batched with ``is_grads_batched``. That is B times the
eval-mode cost.

Scale: eq. 18 on logits grows with the square of the logits' scale (logits c * z give c^2 * GBR and the same
predictions), so a model can lower it by shrinking its logits without becoming any smoother. Every eval-mode
measurement therefore also records scale-free companions on the same examples and forward pass:

- ``logit_spread``: E_i ||z_i - mean_c(z_i)||^2, the squared norm of the class-centred logits (a constant added to
  every logit changes no prediction, so it is removed);
- ``gbr_scale_free`` = GBR / logit_spread (ratio of the two means): unchanged when the logits are scaled by any c;
- ``gbr_loss``: eq. 18 with f = the per-example cross-entropy (one extra backward pass): the loss sensitivity that
  FGSM follows.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Sized
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from robust_enc.errors import UserError
from robust_enc.models import channels_last_weights, frozen
from robust_enc.registry import Registry
from robust_enc.runtime.device import strict_fp32
from robust_enc.runtime.distributed import is_main_process
from robust_enc.runtime.progress import task

log = logging.getLogger(__name__)

METHODS = ("auto", "exact", "hutchinson")

# ------------------------------------------------------------------------------------------------ output functions
# An output function maps (logits [B, C], labels [B] or None) to the outputs [B, K] whose input-Jacobian is measured.
OutputFn = Callable[[torch.Tensor, "torch.Tensor | None"], torch.Tensor]
OUTPUTS: Registry[OutputFn] = Registry("gbr output")


def _labels(y: torch.Tensor | None, name: str) -> torch.Tensor:
    if y is None:
        raise UserError(f"gbr output {name!r} needs the true labels; pass y (or use output 'logits')")
    return y


@OUTPUTS.register("logits", help="the logits vector: the paper's f in eq. 18 (default)")
def logits_output(logits: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
    return logits


@OUTPUTS.register("softmax", help="the class-probability vector")
def softmax_output(logits: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
    return logits.softmax(dim=1)


@OUTPUTS.register("log-softmax", help="the log-probability vector (scale-bounded: it saturates as logits grow)")
def log_softmax_output(logits: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
    return logits.log_softmax(dim=1)


@OUTPUTS.register("true-prob", help="the probability of the true label: A_s in the paper's theorem")
def true_prob_output(logits: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
    return logits.softmax(dim=1).gather(1, _labels(y, "true-prob").view(-1, 1))


@OUTPUTS.register("loss", help="per-example cross-entropy (reduction none: independent of the batch size)")
def loss_output(logits: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
    # reduction="none": ART's loss_sensitivity follows a mean-reduced loss, so its values shrink as batches grow.
    return F.cross_entropy(logits, _labels(y, "loss"), reduction="none").unsqueeze(1)


# ------------------------------------------------------------------------------------------------ per-example values
@dataclass(frozen=True)
class GBRResult:
    """Eq. 18 on a sample set, with its uncertainty and the distribution of the per-example values."""

    mean: float  # (1/n) sum_i ||d f(x_i) / d x_i||_F^2, in (output units / pixel)^2
    stderr: float  # standard error of the mean (sample and, for hutchinson, probe noise); NaN when n = 1
    ci_low: float  # 95% t-interval of the mean
    ci_high: float
    n: int  # examples measured
    output: str  # OUTPUTS name
    method: str  # "exact" or "hutchinson" (what ran; "auto" is resolved)
    probes: int  # Rademacher probes per example; 0 for exact
    median: float  # of the per-example values
    p05: float
    p95: float
    min: float
    max: float
    wall_s: float  # seconds, data loading included
    logit_spread: float = math.nan  # E ||z - mean_c z||^2 of the class-centred logits; NaN when not measured
    gbr_scale_free: float = math.nan  # logits GBR / logit_spread (only for output "logits")
    gbr_loss: float = math.nan  # eq. 18 of the per-example cross-entropy, in (nats / pixel)^2

    @property
    def rel_stderr(self) -> float:
        """stderr / mean: the relative error bar."""
        return self.stderr / self.mean if self.mean > 0 else math.nan

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_options(output: str, method: str, probes: int, max_exact_classes: int = 1) -> OutputFn:
    fn = OUTPUTS.get(output)  # unknown names raise a UserError listing the known ones
    if method not in METHODS:
        raise UserError(f"unknown gbr method {method!r}; use one of {', '.join(METHODS)}")
    if isinstance(probes, bool) or not isinstance(probes, int) or probes < 1:
        raise UserError(f"--probes must be an integer >= 1, got {probes!r}")
    if max_exact_classes < 1:
        raise UserError(f"max_exact_classes must be >= 1, got {max_exact_classes}")
    return fn


def _resolve_method(method: str, num_outputs: int, max_exact_classes: int) -> str:
    if num_outputs == 1:
        return "exact"  # one backward; a Rademacher probe of a scalar (v = +-1, v^2 = 1) would give the same number
    if method == "auto":
        return "exact" if num_outputs <= max_exact_classes else "hutchinson"
    return method


def draw_probes(batch: int, probes: int, num_outputs: int, generator: torch.Generator | None) -> torch.Tensor:
    """Rademacher probes [B, k, K] of +-1, drawn on the CPU in example order: a CPU generator gives example i the same
    probes however the examples are batched (checked in the tests), so hutchinson values are batch-invariant too."""
    bits = torch.randint(0, 2, (batch, probes, num_outputs), generator=generator, dtype=torch.int8)
    return bits.float().mul_(2).sub_(1)


# Elements of the input gradients one batched backward may hold in train mode ([chunk, B, C, H, W] float32: 4 MiB).
# The batched gradients of the first conv layers are 5-16x larger (3 -> 64 channels at half the size in ResNet-50,
# 1 -> 16 channels in resnet_tiny), so a chunk peaks around 100 MiB.
COUPLED_CHUNK_ELEMENTS = 2**20


def _diagonal_blocks(out: torch.Tensor, x: torch.Tensor, rows: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_n ||d <weights[n], out[rows[n]]> / d x[rows[n]]||^2 per example: [B] float64.

    Each vector-Jacobian product puts ``weights[n]`` [K] on the output row of example ``rows[n]`` only and keeps only
    that example's block of the input gradient, so the cross terms d f(x_j) / d x_i that batch-coupled layers (train-
    mode BatchNorm) create are left out. The products run in chunks through ``is_grads_batched`` (vmap'd backward)."""
    batch = x.shape[0]
    values = torch.zeros(batch, dtype=torch.float64, device=x.device)
    chunk = max(1, COUPLED_CHUNK_ELEMENTS // max(1, x.numel()))
    for start in range(0, len(rows), chunk):
        r, w = rows[start:start + chunk], weights[start:start + chunk]
        picked = torch.arange(len(r), device=x.device)
        grad_out = torch.zeros(len(r), *out.shape, dtype=out.dtype, device=out.device)
        grad_out[picked, r] = w
        (g,) = torch.autograd.grad(out, x, grad_out, retain_graph=start + chunk < len(rows), is_grads_batched=True,
                                   materialize_grads=True)
        values.index_add_(0, r, g[picked, r].flatten(1).double().pow(2).sum(1))
    return values


class PerExample(NamedTuple):
    """Per-example values of one batch, float64 on the CPU."""

    values: torch.Tensor  # [B] ||d f(x_i) / d x_i||_F^2
    method: str  # what ran: "exact" or "hutchinson"
    logit_spread: torch.Tensor | None  # [B] ||z_i - mean_c z_i||^2; None when companions were not measured
    loss_gbr: torch.Tensor | None  # [B] ||d CE(z_i, y_i) / d x_i||^2


def _squared_input_gradient(scalar: torch.Tensor, x: torch.Tensor, retain_graph: bool) -> torch.Tensor:
    """||d scalar / d x_i||^2 per example [B] float64, where ``scalar`` sums per-example terms over the batch."""
    (g,) = torch.autograd.grad(scalar, x, retain_graph=retain_graph, materialize_grads=True)
    return g.flatten(1).double().pow(2).sum(1)


def _per_example(model: nn.Module, x: torch.Tensor, y: torch.Tensor | None, output_fn: OutputFn, method: str,
                 probes: int, max_exact_classes: int, generator: torch.Generator | None,
                 coupled: bool = False, companions: bool = False) -> PerExample:
    """Per-example squared Frobenius norms [B] and the method that ran; with ``companions`` (eval mode, labels
    given) also the logit spread and the loss GBR from the same forward pass (one more backward).

    ``coupled``: the examples of the batch depend on each other (train-mode BatchNorm): take each example's own
    diagonal Jacobian block, B times the backward passes (see the module doc)."""
    x = x.detach().requires_grad_(True)  # a new leaf: the caller's tensor is untouched
    with torch.enable_grad():
        logits = model(x)
        out = output_fn(logits, y)
        if out.ndim != 2 or out.shape[0] != x.shape[0]:
            raise UserError(f"the model's output has shape {tuple(out.shape)}; gbr needs [batch, classes]")
        num_outputs = out.shape[1]
        method = _resolve_method(method, num_outputs, max_exact_classes)
        batch = x.shape[0]
        if coupled:
            examples = torch.arange(batch, device=x.device)
            if method == "exact":  # (example i, class c) for every pair: one-hot weights
                rows = examples.repeat_interleave(num_outputs)
                weights = torch.eye(num_outputs, dtype=out.dtype, device=out.device).repeat(batch, 1)
                return PerExample(_diagonal_blocks(out, x, rows, weights).cpu(), method, None, None)
            v = draw_probes(batch, probes, num_outputs, generator).to(device=out.device, dtype=out.dtype)
            rows = examples.repeat(probes)  # probe-major: (probe j, example i) -> v[i, j]
            weights = v.transpose(0, 1).reshape(-1, num_outputs)
            return PerExample((_diagonal_blocks(out, x, rows, weights) / probes).cpu(), method, None, None)
        companions = companions and y is not None
        values = torch.zeros(batch, dtype=torch.float64, device=x.device)
        if method == "exact":
            # Row c of every example's Jacobian in one backward: sum over the batch of output c (see module doc).
            for c in range(num_outputs):
                values += _squared_input_gradient(out[:, c].sum(), x, companions or c < num_outputs - 1)
        else:
            v = draw_probes(x.shape[0], probes, num_outputs, generator).to(device=out.device, dtype=out.dtype)
            for j in range(probes):
                values += _squared_input_gradient((out * v[:, j]).sum(), x, companions or j < probes - 1)
            values /= probes  # each example's mean over its k probes: an unbiased estimate of its ||J||_F^2
        if not companions:
            return PerExample(values.cpu(), method, None, None)
        spread = (logits - logits.mean(dim=1, keepdim=True)).detach().double().pow(2).sum(1)
        loss_gbr = _squared_input_gradient(F.cross_entropy(logits, y, reduction="sum"), x, False)
    return PerExample(values.cpu(), method, spread.cpu(), loss_gbr.cpu())


def per_example_gbr(model: nn.Module, x: torch.Tensor, y: torch.Tensor | None = None, *, output: str = "logits",
                    method: str = "exact", probes: int = 4, generator: torch.Generator | None = None,
                    max_exact_classes: int = 100, train_mode: bool = False) -> torch.Tensor:
    """||d f(x_i) / d x_i||_F^2 for each example of x [B, C, H, W] (pixel units): a float64 tensor [B] on the CPU.

    Measured in eval mode (batch-independent values) unless ``train_mode`` (BN batch statistics of x; each example's
    own Jacobian block, B times the cost), on x's device; the model's modes, requires_grad flags and buffers are
    restored and no ``.grad`` is left. ``generator`` (a CPU generator) draws hutchinson probes.
    """
    fn = check_options(output, method, probes, max_exact_classes)
    with frozen(model, train_mode=train_mode):
        return _per_example(model, x, y, fn, method, probes, max_exact_classes, generator, coupled=train_mode).values


def summarize(values: torch.Tensor, *, output: str, method: str, probes: int, wall_s: float,
              logit_spread: torch.Tensor | None = None, loss_gbr: torch.Tensor | None = None) -> GBRResult:
    """GBRResult from per-example values [n] (and, when measured, the per-example companions [n]).

    Why the standard error over examples is the whole error bar, probe noise included: with hutchinson each value is
    e_i = g_i + noise_i, where g_i is example i's exact ||J||_F^2 and noise_i has mean 0 given x_i and is independent
    across examples (fresh probes). The e_i are then i.i.d. draws whose mean is GBR and whose variance is
    Var(g) + E[Var(noise)] (law of total variance), so the sample variance of the e_i estimates both sources together
    and s / sqrt(n) is the standard error of their mean. For exact values the noise term is 0.
    """
    n = int(values.numel())
    if n == 0:
        raise UserError("gbr got no examples: the data set (or --subset) is empty, or every image was unreadable")
    values = values.double()
    if bad := int(values.isnan().sum()):  # inf is an overflowed GBR (recorded as such); NaN is no number at all
        raise UserError(f"GBR is NaN on {bad} of {n} examples: the model's outputs or input-gradients are not numbers "
                        "(NaN/inf weights or logits); there is no GBR to report (did its training diverge?)")
    mean = float(values.mean())
    if n > 1:
        from scipy.stats import t

        stderr = float(values.std(unbiased=True)) / math.sqrt(n)
        half = float(t.ppf(0.975, n - 1)) * stderr  # t-interval: honest for small n, ~1.96 stderr for large n
    else:
        stderr = half = math.nan
    q = torch.quantile(values, torch.tensor([0.5, 0.05, 0.95], dtype=torch.float64))
    spread = float(logit_spread.double().mean()) if logit_spread is not None else math.nan
    scale_free = mean / spread if output == "logits" and spread > 0 else math.nan
    return GBRResult(mean=mean, stderr=stderr, ci_low=mean - half, ci_high=mean + half, n=n, output=output,
                     method=method, probes=probes if method == "hutchinson" else 0, median=float(q[0]),
                     p05=float(q[1]), p95=float(q[2]), min=float(values.min()), max=float(values.max()),
                     wall_s=wall_s, logit_spread=spread, gbr_scale_free=scale_free,
                     gbr_loss=float(loss_gbr.double().mean()) if loss_gbr is not None else math.nan)


def _model_device(model: nn.Module) -> torch.device:
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


def gbr_values(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], *, output: str = "logits",
               method: str = "auto", probes: int = 4, device: torch.device | str | None = None,
               train_mode: bool = False, seed: int = 0, batch_seed: Callable[[int], int] | None = None,
               max_exact_classes: int = 100, companions: bool = True, channels_last: bool = False) -> PerExample:
    """Per-example values [n] (float64, CPU; n may be 0: no error, so a rank with an empty shard can still join the
    reduction), the method that ran, and the companions (None in train mode). Arguments as ``measure_gbr``."""
    fn = check_options(output, method, probes, max_exact_classes)
    original_device = _model_device(model)
    device = torch.device(device) if device is not None else original_device
    generator = torch.Generator().manual_seed(seed)  # CPU: probes independent of device and batching
    parts: list[PerExample] = []
    try:
        model.to(device)
        total = len(batches) if isinstance(batches, Sized) else 0
        with frozen(model, train_mode=train_mode), channels_last_weights(model, channels_last), strict_fp32(), \
                task(f"gbr ({output})", total, show=is_main_process()) as bar:  # TF32 would move GBR: strict fp32
            for j, (x, y) in enumerate(batches):
                bar.update(advance=1)
                if len(x) == 0:  # a batch whose images were all unreadable
                    continue
                if train_mode and len(x) == 1:  # train-mode BN needs batch statistics of two or more examples
                    raise UserError("train-mode GBR got a batch of 1 example (BatchNorm needs >= 2): choose a "
                                    "--batch-size or --subset that leaves no single-example last batch")
                if batch_seed is not None:
                    generator = torch.Generator().manual_seed(batch_seed(j))
                parts.append(_per_example(model, x.to(device), y.to(device) if y is not None else None, fn, method,
                                          probes, max_exact_classes, generator, coupled=train_mode,
                                          companions=companions))
    finally:
        model.to(original_device)

    def joined(name: str) -> torch.Tensor | None:
        chunks = [getattr(p, name) for p in parts]
        if not chunks:
            return torch.zeros(0, dtype=torch.float64)
        return None if any(c is None for c in chunks) else torch.cat(chunks)

    return PerExample(joined("values"), parts[-1].method if parts else method, joined("logit_spread"),
                      joined("loss_gbr"))


def measure_gbr(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], *, output: str = "logits",
                method: str = "auto", probes: int = 4, device: torch.device | str | None = None,
                train_mode: bool = False, seed: int = 0, batch_seed: Callable[[int], int] | None = None,
                max_exact_classes: int = 100, companions: bool = True, channels_last: bool = False,
                return_values: bool = False) -> GBRResult | tuple[GBRResult, torch.Tensor]:
    """Eq. 18 over ``batches`` of (x [B, C, H, W] in [0, 1], y [B] int64): mean, standard error, 95% CI and the
    per-example distribution.

    ``method``: ``exact`` (one backward per output), ``hutchinson`` (``probes`` Rademacher probes per example) or
    ``auto`` (exact when the model has <= ``max_exact_classes`` outputs). The model is measured in eval mode (BN
    folded, examples independent) unless ``train_mode``: then BN uses each batch's statistics and example i's value is
    its own Jacobian block d f(x_i) / d x_i, at B times the cost (B * K backward passes per batch exact, B per probe
    hutchinson). Its mode, requires_grad flags, buffers and device are restored afterwards and no parameter ``.grad``
    is written. ``device`` None = where the model already is. Probes come from one CPU generator seeded with ``seed``,
    or, with ``batch_seed``, batch j's from a generator seeded with ``batch_seed(j)`` (sharded runs: the same probes
    for a global batch on whichever rank it lands). ``companions`` (eval mode): also the logit spread, the scale-free
    GBR and the loss GBR (see the module doc; one more backward per batch). ``channels_last``: convolution weights in
    NHWC while measuring (faster kernels, same values up to rounding; layouts restored). ``return_values`` also
    returns the per-example values [n] (float64, CPU).
    """
    start = time.perf_counter()
    measured = gbr_values(model, batches, output=output, method=method, probes=probes, device=device,
                          train_mode=train_mode, seed=seed, batch_seed=batch_seed,
                          max_exact_classes=max_exact_classes, companions=companions, channels_last=channels_last)
    result = summarize(measured.values, output=output, method=measured.method, probes=probes,
                       wall_s=time.perf_counter() - start, logit_spread=measured.logit_spread,
                       loss_gbr=measured.loss_gbr)
    log.info("gbr %s (%s): %.4g +- %.2g over %d examples in %.1f s", output, measured.method, result.mean,
             result.stderr, result.n, result.wall_s)
    return (result, measured.values) if return_values else result
