"""The fused ENC training step against the straightforward one: the algebra in float64 at every step of a real run,
float32 within the rounding bound of one step (marker ``numerics``: .ci/run runs these under a 2nd kernel set)."""

import copy

import pytest
import torch
from test_enc import _closed_form
from torch import nn
from torch.nn.utils import parametrize

from robust_enc.models import ModelSpec, build_network
from robust_enc.regularizers import enc, prepare_model
from robust_enc.train.recipe import build_recipe


class _StraightforwardENC(nn.Module):
    """Paper eq. 20-23 by their closed forms, autograd through plain ops: the step the fused one must reproduce."""

    def __init__(self, variant: str, alpha: float | None) -> None:
        super().__init__()
        self.variant, self.alpha = variant, alpha
        self.log_alpha = nn.Parameter(torch.zeros(())) if alpha is None else None

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        alpha = self.log_alpha.exp() if self.log_alpha is not None else self.alpha
        self.w_hat = _closed_form(weight, self.variant, alpha)
        if self.w_hat.requires_grad:  # dL/dW_hat sizes the terms of dL/dlog_alpha = <dL/dW_hat, W_hat> / 2
            self.w_hat.retain_grad()
        return self.w_hat


def _el2_by_rows(w: torch.Tensor, eps: float) -> torch.Tensor:
    """sum over rows of (n - 1) (sigma - eps)^2 + n mu^2, unbiased sigma (arXiv 1911.05920), differentiable."""
    rows = w.reshape(w.shape[0], -1)
    n = rows.shape[1]
    return ((n - 1) * (rows.std(dim=1) - eps).square() + n * rows.mean(dim=1).square()).sum()


def _step_pair(variant: str, alpha: float | None, dtype: torch.dtype, wd: float = 5e-4, batch: int = 32):
    """(optimized model, its recipe, straightforward model, its raw weights, digits batches of ``batch``) from the
    same initial resnet_tiny in ``dtype``: the fused Recipe.train_step path, and the closed-form ENC with autograd."""
    from robust_enc.data import build_dataset

    data, info = build_dataset("digits", "train")
    x_all = torch.stack([data[i][0] for i in range(640)]).to(dtype)
    y_all = torch.tensor([data[i][1] for i in range(640)])
    batches = [(x_all[i:i + batch], y_all[i:i + batch]) for i in range(0, 640, batch)]
    spec = f"enc:variant={variant},alpha={'learnable' if alpha is None else alpha}"
    torch.manual_seed(0)
    net = build_network(ModelSpec("resnet_tiny", 10, info.input_shape, info.mean, info.std)).to(dtype)
    optimized = prepare_model(copy.deepcopy(net), spec)
    straightforward = enc.apply_enc(copy.deepcopy(net), variant=variant, alpha=alpha)
    for _, module, _ in enc.enc_layers(straightforward):
        module.parametrizations.weight[0] = _StraightforwardENC(variant, alpha)
    assert not list(enc.enc_layers(straightforward))  # nothing of the fused path is left in the reference
    # A learnable alpha's log_alpha is created in torch's default dtype (float32) whatever the network's: cast again,
    # or both paths would round sqrt(alpha / m) to float32, each in its own order, and differ once alpha != 1.
    optimized.to(dtype)
    straightforward.to(dtype)
    recipe = build_recipe(spec, num_classes=10, batch_size=batch, weight_decay=wd)
    raw = [m.parametrizations.weight.original for m in straightforward.modules()
           if parametrize.is_parametrized(m, "weight")]
    return optimized, recipe, straightforward, raw, batches


CASES = [("eq22", 1.0), ("eq20", 0.5), ("eq21", 1.0), ("eq23", 2.0), ("eq22", None)]


def _sync(straightforward: nn.Module, opt_plain: torch.optim.Optimizer, optimized: nn.Module,
          opt_fast: torch.optim.Optimizer) -> None:
    """Put the optimized model's weights, buffers and momentum into the straightforward one (same parameter names)."""
    straightforward.load_state_dict(optimized.state_dict())
    fast = dict(optimized.named_parameters())
    for name, p in straightforward.named_parameters():
        buffer = opt_fast.state.get(fast[name], {}).get("momentum_buffer")
        if buffer is not None:
            opt_plain.state[p]["momentum_buffer"] = buffer.clone()


def _relative_errors(optimized: nn.Module, straightforward: nn.Module) -> dict[str, float]:
    plain_state = straightforward.state_dict()
    errors = {}
    for key, value in optimized.state_dict().items():
        value, want = value.double(), plain_state[key].double()
        scale = want.norm()
        if key.endswith("log_alpha"):  # compare alpha itself: log_alpha stays near 0, where relative means nothing
            value, want = value.exp(), want.exp()
            scale = want.norm()
        elif key.endswith("running_mean"):
            # A batch mean of conv outputs whose rows are centred (eq. 22/23) cancels to ~0: its rounding is relative
            # to the outputs summed, whose size the running variance gives.
            variance = plain_state[key.removesuffix("mean") + "var"].double()
            scale = (want.square() + variance).sqrt().norm()
        errors[key] = float((value - want).norm() / scale.clamp_min(1e-30))
    return errors


def _gradient_errors(optimized: nn.Module, straightforward: nn.Module) -> dict[str, float]:
    """Every parameter's gradient of the step, relative. A log_alpha ahead of a BN layer (which undoes the scale
    alpha) has dL/dlog_alpha = <dL/dW_hat, W_hat> / 2, a sum cancelling to ~0 (non-zero only through BN's eps): its
    rounding is relative to the sum of its terms' magnitudes (the straightforward path's), so every log_alpha's
    gradient is compared relative to that."""
    fast = dict(optimized.named_parameters())
    modules = dict(straightforward.named_modules())
    errors = {}
    for name, p in straightforward.named_parameters():
        got, want = fast[name].grad, p.grad
        scale = want.norm()
        if name.endswith("log_alpha"):
            w_hat = modules[name.removesuffix(".log_alpha")].w_hat
            scale = 0.5 * (w_hat.grad * w_hat.detach()).abs().sum()
        errors[name] = float((got - want).norm() / scale.clamp_min(1e-30))
    return errors


@pytest.mark.numerics
@pytest.mark.parametrize("variant,alpha", CASES)
def test_optimized_step_gives_the_straightforward_weights_after_20_steps(variant, alpha):
    """The algebra, in float64: Recipe.train_step (fused normalization, L2 term from the forward pass's row
    statistics) and a hand-written step (closed-form ENC, autograd, the L2 term on the raw rows) are the same map,
    checked at the 20 states of a real training run (SGD momentum, digits batches): from the same weights, buffers and
    momentum, one step of each gives the same gradients and the same weights to 1e-10 relative (one float64 step
    differs by ~1e-15); a learnable alpha starts off 1, so a wrong exponent or share of it would show.

    Each step starts both from the optimized run's state: a training trajectory amplifies last-bit differences, in
    float64 too (a log_alpha's gradient is a cancelling sum, see ``_gradient_errors``), so 20 free-running steps would
    compare chaos, not algebra. Float32 is bounded over one step by the test below. The step's loss passes through one
    float32 cast (Recipe adds its penalties in float32), so it is compared to 2^-23 relative."""
    wd, lr = 5e-4, 0.05
    tolerance = 1e-10
    optimized, recipe, straightforward, raw, batches = _step_pair(variant, alpha, torch.float64, wd)
    with torch.no_grad():
        for i, (_, _, p) in enumerate(enc.enc_layers(optimized) if alpha is None else ()):
            p.log_alpha.fill_(0.1 * (i % 5) - 0.2)
    start = [w.detach().clone() for w in raw]
    opt_fast = torch.optim.SGD(recipe.param_groups(optimized), lr=lr, momentum=0.9)
    # ENC's raw weights get the L2 term instead of weight decay; biases and BN get none: no decay anywhere.
    opt_plain = torch.optim.SGD(straightforward.parameters(), lr=lr, momentum=0.9)
    for step, (x, y) in enumerate(batches):
        _sync(straightforward, opt_plain, optimized, opt_fast)
        fast = recipe.train_step(optimized, x, y, opt_fast)
        opt_plain.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(straightforward(x), y) + 0.5 * wd * sum(_el2_by_rows(w, 1e-3) for w in raw)
        loss.backward()
        opt_plain.step()
        assert fast.loss == pytest.approx(float(loss.detach()), rel=2 ** -23, abs=0), step
        for what, errors in (("gradient", _gradient_errors(optimized, straightforward)),
                             ("state", _relative_errors(optimized, straightforward))):
            worst = max(errors.items(), key=lambda item: item[1])
            assert worst[1] <= tolerance, f"step {step}, {what} of {worst[0]}: relative difference {worst[1]:.2e}"
    assert min(float((w - w0).detach().norm()) for w, w0 in zip(raw, start)) > 1e-6  # every weight moved


def _w_hat_bound(raw: torch.Tensor, w_hat: torch.Tensor, per_row: bool, centred: bool) -> torch.Tensor:
    """Elementwise float32 error bound of W_hat = k (W - m), k = gain / ||W - m|| over a block of N entries (a row or
    the tensor), whatever the summation order: |d mean| <= g_N sum|W| / N, the norm's relative error <= g_(N+2) plus
    sqrt(N) |d mean| / ||W - m||, and a few roundings more, with g_K = K u / (1 - K u), u = 2^-24 (Higham, Accuracy
    and Stability of Numerical Algorithms, 3.1). First order in u (the second is ~(N u)^2, below 1e-8 of it)."""
    u = 2.0 ** -24
    flat, out = raw.double().reshape(raw.shape[0], -1), w_hat.double().reshape(raw.shape[0], -1)
    if not per_row:
        flat, out = flat.reshape(1, -1), out.reshape(1, -1)
    n = flat.shape[1]
    gamma = lambda k: k * u / (1 - k * u)  # noqa: E731
    shift = flat.mean(1, keepdim=True) if centred else torch.zeros_like(flat[:, :1])
    centred_rows = flat - shift
    norm = centred_rows.norm(dim=1, keepdim=True)
    # the fused path always takes row means (uncentred variants recombine ||W||^2 = ||W - mean||^2 + n mean^2):
    # the largest row's mean error bounds every mean it uses, the tensor's included
    row_sums = raw.double().reshape(raw.shape[0], -1).abs().mean(1).max()
    d_mean = gamma(n) * row_sums
    gain = out.norm(dim=1, keepdim=True)  # ||W_hat|| over the block = the gain of its scale
    bound = gamma(n + 6) * out.abs() + gain / norm * (1 + n ** 0.5 * centred_rows.abs() / norm) * d_mean
    return bound.reshape(raw.shape)


@pytest.mark.numerics
@pytest.mark.parametrize("variant,alpha", CASES)
def test_optimized_step_in_float32_is_within_the_rounding_bound_of_one_step(variant, alpha):
    """Float32, as training runs, over one step: the fused path's normalized weights (all row-wise layers batched, as
    Recipe.train_step normalizes them) and its epsilon-shifted L2 term (from the forward pass's row statistics)
    against the closed forms in float64, within the float32 error bound of the sums involved (``_w_hat_bound``; the
    L2 term, a sum over R rows of N-entry row sums, within g_(N+R+8) times the sum of its terms' magnitudes). The
    rest of the step (the network around the weights, the optimizer) is the same code on both paths; the float64
    test above proves the whole step's algebra."""
    wd = 5e-4
    optimized, recipe, _, _, batches = _step_pair(variant, alpha, torch.float32, wd)
    layers = [(m, p) for _, m, p in enc.enc_layers(optimized)]
    if alpha is None:  # a learnable alpha: move it off 1, so a wrong exponent or share would show
        with torch.no_grad():
            for i, (_, p) in enumerate(layers):
                p.log_alpha.fill_(0.1 * (i % 5) - 0.2)
    with enc.step_weights(optimized):
        optimized(batches[0][0])
        w_hats = [m.weight.detach() for m, _ in layers]
        l2 = float(enc.el2_loss(optimized, lam=wd).detach())
    u, eps, n_max, rows_total, l2_terms, l2_exact = 2.0 ** -24, 1e-3, 0, 0, 0.0, 0.0
    for (module, p), w_hat in zip(layers, w_hats):
        raw = enc.raw_weight(module).detach()
        alpha_now = float(p.log_alpha.detach().double().exp()) if alpha is None else alpha
        exact = _closed_form(raw.double(), variant, alpha_now)
        bound = _w_hat_bound(raw, exact, p.per_row, p.centred)
        assert w_hat.dtype == torch.float32
        assert ((w_hat.double() - exact).abs() <= bound).all(), (module, float((w_hat.double() - exact).abs().max()))
        rows = raw.double().reshape(len(raw), -1)
        n = rows.shape[1]
        spread, mean_part = (n - 1) * (rows.std(dim=1) - eps).square(), n * rows.mean(dim=1).square()
        l2_exact += float((spread + mean_part).sum())
        l2_terms += float((spread + mean_part + 2 * rows.square().sum(1)).sum())  # the squares summed on the way
        n_max, rows_total = max(n_max, n), rows_total + len(rows)
    k = n_max + rows_total + 8
    assert abs(l2 - 0.5 * wd * l2_exact) <= 0.5 * wd * k * u / (1 - k * u) * l2_terms
