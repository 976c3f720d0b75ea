"""The row normalization ENC and WS share (paper eq. 20-23; Qiao et al.): W (rows x n) -> k * (W - m), as a custom
autograd function per layer, and for every row-wise layer of a training step together in one autograd node
(``BatchedRowNormalize``, which ``enc.step_weights`` uses)."""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

NORM_EPS = 1e-12  # guards the divisions by a norm; far below any trained weight's norm, so the invariant stays exact


# ---------------------------------------------------------------- one fused row normalization for ENC and WS
# ENC (eq. 20-23) and WS all map W (rows x n) to W_hat = k * (W - m): a scale k per row (or one for the whole tensor)
# and a shift m (the row means, the tensor's mean or nothing), both functions of the row means and the centred row
# norms. Autograd through the plain ops makes some 30 passes over the weights per step (mean, sub, norm, mul, their
# backward, and the same again for the epsilon-shifted L2 on the raw rows): on a CPU ResNet-50 that was most of ENC's
# overhead. _RowNormalize makes 4 passes forward (mean, centring, norms, scaling) and 4 backward (two row reductions,
# two fused multiply-adds), returns the row statistics for the L2 term (which then costs nothing on the weights) and
# differentiates the small (rows,) part, where the variants differ, by autograd.
def row_statistics(flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean, centred rows, centred row norms) of a (rows, n) tensor; mean and norms are (rows, 1)."""
    mean = flat.mean(dim=1, keepdim=True)
    centred = flat - mean
    return mean, centred, torch.linalg.vector_norm(centred, dim=1, keepdim=True)


def _shift(mean: torch.Tensor, centre: str) -> torch.Tensor | None:
    """m of W_hat = k * (W - m): the row means ("row"), the tensor's mean ("all", a (1, 1) tensor) or none."""
    if centre == "row":
        return mean
    if centre == "all":
        return mean.mean().reshape(1, 1)
    return None


class _RowNormalize(torch.autograd.Function):
    """flat (rows, n) -> (W_hat, row means, centred row norms) with W_hat = k * (flat - m), k = scale(mean, norm, n,
    *params) of shape (rows, 1) or (1, 1). Gradients reach flat through W_hat and through both statistics."""

    @staticmethod
    def forward(ctx, flat, scale, centre, *params):
        with torch.autocast(flat.device.type, enabled=False):  # the weights stay in their dtype, as plain ops keep them
            mean, centred, norm = row_statistics(flat)
            k = scale(mean, norm, flat.shape[1], *params)
            shift = _shift(mean, centre)
            if shift is None:
                w_hat = flat * k
            elif centre == "row":
                w_hat = centred.mul_(k)  # the centred rows are not needed again: reuse their memory
            else:
                w_hat = centred.add_(mean - shift).mul_(k)
        ctx.scale, ctx.centre = scale, centre
        ctx.save_for_backward(w_hat, mean, norm, *params)
        return w_hat, mean, norm

    @staticmethod
    @once_differentiable  # a double backward (create_graph=True through the weights) raises instead of being wrong
    def backward(ctx, grad_w_hat, grad_mean, grad_norm):
        w_hat, mean, norm, *params = ctx.saved_tensors
        n = w_hat.shape[1]
        with torch.enable_grad():  # the (rows,) part by autograd: every variant's scale is differentiated alike
            mean_, norm_ = mean.detach().requires_grad_(), norm.detach().requires_grad_()
            params_ = [p.detach().requires_grad_() for p in params]
            k = ctx.scale(mean_, norm_, n, *params_)
            shift = _shift(mean_, ctx.centre)
            k_value = k.detach()
            # dL/dk_i = sum_j g_ij (W_ij - m_i) = <g_i, W_hat_i> / k_i;  dL/dm_i = -k_i sum_j g_ij
            dot = torch.linalg.vecdot(grad_w_hat, w_hat, dim=1).unsqueeze(1)
            surrogate = (k * (dot / k_value)).sum() + (mean_ * grad_mean).sum() + (norm_ * grad_norm).sum()
            if shift is not None:
                surrogate = surrogate - (shift * (k_value * grad_w_hat.sum(dim=1, keepdim=True))).sum()
            inputs = [mean_, norm_, *params_]
            grads = torch.autograd.grad(surrogate, inputs, allow_unused=True)
        d_mean, d_norm, *d_params = [torch.zeros_like(t) if g is None else g for t, g in zip(inputs, grads)]
        # d mean_i / dW_ij = 1/n,  d norm_i / dW_ij = (W_ij - mean_i) / norm_i  (0 for a constant row), and
        # W - mean = W_hat / k + (m - mean): so dW = k g + a W_hat + b, two fused passes.
        inv_norm = torch.where(norm > 0, norm.reciprocal(), torch.zeros_like(norm))
        a = d_norm * inv_norm / k_value
        b = d_mean / n + (d_norm * inv_norm * ((0 if shift is None else shift.detach()) - mean))
        grad_flat = torch.addcmul(b, grad_w_hat, k_value).addcmul_(w_hat, a)
        return (grad_flat, None, None, *d_params)


def normalize_rows_plain(flat: torch.Tensor, scale, centre: str, *params: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``normalize_rows`` by plain differentiable ops: what torch.compile traces (its compiler fuses them)."""
    mean, centred, norm = row_statistics(flat)
    shift = _shift(mean, centre)
    k = scale(mean, norm, flat.shape[1], *params)
    w_hat = flat * k if shift is None else (centred if centre == "row" else flat - shift) * k
    return w_hat, mean, norm


def normalize_rows(flat: torch.Tensor, scale, centre: str, *params: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(W_hat, row means, centred row norms) of a (rows, n) weight: W_hat = k * (flat - m), where k = ``scale(mean,
    norm, n, *params)`` ((rows, 1) or (1, 1)) and m is given by ``centre``: "row" (row means), "all" (the tensor's
    mean) or "none". Eager: the fused autograd function; under torch.compile the plain ops."""
    if torch.compiler.is_compiling():
        return normalize_rows_plain(flat, scale, centre, *params)
    return _RowNormalize.apply(flat, scale, centre, *params)


# ---------------------------------------------------------------- every row-wise layer of a step in one node
# On a small network the passes over the weights cost little and the per-layer bookkeeping dominates: _RowNormalize
# spends some 60 small ops per layer on (rows,)-sized scale arithmetic, a nested autograd graph and python, ENC's L2
# term some 10 more. Inside ``step_weights`` the row-wise layers (ENC eq. 21/22 with a fixed alpha, WS) are normalized
# together: per layer only the passes over its weights (the same 4 forward, 4 backward), the scale arithmetic and the
# L2 term once over the rows of every layer. Whole-tensor variants (eq. 20/23) and a learnable alpha keep the per-layer
# function.
def _batch_scale(key: tuple, mean: torch.Tensor, norm: torch.Tensor, n: torch.Tensor, gain: torch.Tensor
                 ) -> torch.Tensor:
    """k per row (R, 1) from the row means and centred norms of a batch's rows (n entries, ``gain`` per row): ENC's
    sqrt(alpha / rows) / ||W_i - m_i|| (eq. 22) or / ||W_i|| (eq. 21), WS's (||W_i - mu_i||^2 / n + eps)^-1/2."""
    if key[0] == "ws":
        return (norm.square() / n + key[1]).rsqrt()
    target = norm if key[1] else (norm.square() + n * mean.square()).sqrt()
    return gain / target.clamp_min(NORM_EPS)


class BatchedRowNormalize(torch.autograd.Function):
    """_RowNormalize for several layers at once: weights -> (*W_hat, row means, centred row norms), the statistics
    of all layers' rows concatenated ((R, 1) each). key: ("enc", centred) or ("ws", eps); consts: (n, gain) per row."""

    @staticmethod
    def forward(ctx, key, consts, *weights):
        centred = key[0] == "ws" or key[1]
        with torch.autocast(weights[0].device.type, enabled=False):
            flats = [w.reshape(w.shape[0], -1) for w in weights]
            stats = [row_statistics(flat) for flat in flats]
            mean, norm = torch.cat([s[0] for s in stats]), torch.cat([s[2] for s in stats])
            k = _batch_scale(key, mean, norm, *consts)
            rows = [len(flat) for flat in flats]
            w_hats = [(c.mul_(k_l) if centred else flat * k_l).reshape(w.shape)
                      for w, flat, (_, c, _), k_l in zip(weights, flats, stats, k.split(rows))]
        ctx.key, ctx.consts, ctx.rows, ctx.centred = key, consts, rows, centred
        ctx.save_for_backward(mean, norm, *w_hats)
        return (*w_hats, mean, norm)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads):
        *grad_w_hats, grad_mean, grad_norm = grads
        mean, norm, *w_hats = ctx.saved_tensors
        n = ctx.consts[0]
        g_flats = [g.reshape(len(g), -1) for g in grad_w_hats]
        w_flats = [w.reshape(len(w), -1) for w in w_hats]
        dot = torch.cat([torch.linalg.vecdot(g, w, dim=1) for g, w in zip(g_flats, w_flats)]).unsqueeze(1)
        with torch.enable_grad():  # as _RowNormalize.backward, over the rows of every layer at once
            mean_, norm_ = mean.detach().requires_grad_(), norm.detach().requires_grad_()
            k = _batch_scale(ctx.key, mean_, norm_, *ctx.consts)
            k_value = k.detach()
            surrogate = (k * (dot / k_value)).sum() + (mean_ * grad_mean).sum() + (norm_ * grad_norm).sum()
            if ctx.centred:  # shift m = the row means: dL/dm_i = -k_i sum_j g_ij
                g_sum = torch.cat([g.sum(dim=1) for g in g_flats]).unsqueeze(1)
                surrogate = surrogate - (mean_ * (k_value * g_sum)).sum()
            d_mean, d_norm = torch.autograd.grad(surrogate, [mean_, norm_])
        inv_norm = torch.where(norm > 0, norm.reciprocal(), torch.zeros_like(norm))
        a = d_norm * inv_norm / k_value
        b = d_mean / n if ctx.centred else d_mean / n - d_norm * inv_norm * mean
        return (None, None, *(torch.addcmul(b_l, g, k_l).addcmul_(w, a_l).reshape(w_hat.shape)
                              for g, w, w_hat, k_l, a_l, b_l in zip(g_flats, w_flats, w_hats, k_value.split(ctx.rows),
                                                                    a.split(ctx.rows), b.split(ctx.rows))))
