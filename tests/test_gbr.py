"""GBR (paper eq. 18): identities from the paper, the estimator's error bar, batching invariance, output modes, CLI."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robust_enc import cli
from robust_enc.checkpoint import save_checkpoint
from robust_enc.data import build_dataset, build_loader
from robust_enc.gbr import OUTPUTS, GBRResult, measure_gbr, per_example_gbr
from robust_enc.models import ModelSpec
from robust_enc.regularizers import build_model


class Linear(nn.Module):
    """y = W x + b on flattened images."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.fc = nn.Linear(in_features, out_features, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


def relu_mlp(widths: list[int], *, act: type[nn.Module] = nn.ReLU, bias: bool = False) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Flatten()]
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b, bias=bias))
        if i < len(widths) - 2:
            layers.append(act())
    return nn.Sequential(*layers)


def tiny_resnet(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(ModelSpec("resnet_tiny", 10, (1, 8, 8), (0.3,), (0.3,)))


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    dataset, _ = build_dataset("digits", "test", subset=64)
    x, y = next(iter(build_loader(dataset, batch_size=64)))
    return x, y


def batches_of(x: torch.Tensor, y: torch.Tensor, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x[i:i + size], y[i:i + size]) for i in range(0, len(x), size)]


# ------------------------------------------------------------------------------------------------ paper identities
@pytest.mark.parametrize("seed", range(4))
def test_linear_model_gbr_is_frobenius_norm_of_w(seed: int) -> None:
    """Eq. 10/13: GBR of y = W x + b is ||W||_F^2 for any input and any bias."""
    torch.manual_seed(seed)
    model = Linear(3 * 5 * 5, 7)
    with torch.no_grad():
        model.fc.bias.normal_(0, 10.0 * (seed + 1))  # a large bias changes nothing
    x = torch.rand(20, 3, 5, 5) * (seed + 1) - seed  # inputs need not be in [0, 1] for the identity
    y = torch.randint(0, 7, (20,))
    expected = float(model.fc.weight.detach().double().pow(2).sum())
    per_example = per_example_gbr(model, x, y)
    assert torch.allclose(per_example, torch.full_like(per_example, expected), rtol=1e-5)
    result = measure_gbr(model, batches_of(x, y, 8), method="exact")
    assert result.mean == pytest.approx(expected, rel=1e-5)
    assert result.stderr == pytest.approx(0.0, abs=1e-5 * expected)  # every example has the same value


@pytest.mark.parametrize("seed", range(6))
def test_relu_mlp_gbr_below_product_and_am_gm_bounds(seed: int) -> None:
    """Eq. 15-17: for a bias-free ReLU MLP, GBR <= prod ||W_i||_F^2 <= (sum ||W_i||_F^2 / L)^L."""
    torch.manual_seed(100 + seed)
    widths = [16, *torch.randint(4, 24, (1 + seed % 3,)).tolist(), 5]
    model = relu_mlp(widths)
    for layer in model:
        if isinstance(layer, nn.Linear):
            layer.weight.data.mul_(float(torch.empty(1).uniform_(0.3, 3.0)))  # unequal norms: AM-GM not tight
    x = torch.randn(50, 1, 4, 4)
    gbr = measure_gbr(model, [(x, torch.zeros(50, dtype=torch.long))], method="exact").mean
    norms = [float(m.weight.detach().double().pow(2).sum()) for m in model if isinstance(m, nn.Linear)]
    product, am = math.prod(norms), (sum(norms) / len(norms)) ** len(norms)
    assert 0 < gbr <= product * (1 + 1e-6)
    assert product <= am * (1 + 1e-9)


# ------------------------------------------------------------------------------------------------ the estimator
def smooth_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return relu_mlp([12, 16, 10], act=nn.Tanh, bias=True)  # tanh: per-example values vary with x


def test_hutchinson_per_example_converges_to_exact() -> None:
    model = smooth_model().eval()
    x = torch.randn(6, 1, 3, 4)
    exact = per_example_gbr(model, x, method="exact")
    estimate = per_example_gbr(model, x, method="hutchinson", probes=4000,
                               generator=torch.Generator().manual_seed(0))
    assert torch.allclose(estimate, exact, rtol=0.05)
    one_probe = per_example_gbr(model, x, method="hutchinson", probes=1, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(one_probe, exact, rtol=1e-3)  # one probe is noisy: the estimator is not secretly exact


def test_hutchinson_ci_covers_exact_value() -> None:
    """Fresh samples and fresh probes per trial: the 95% CI must cover the population GBR (computed exactly on a
    large sample) in most trials, so the error bar accounts for both probe and sample noise; and the estimates
    average to the exact value."""
    model = smooth_model(1).eval()
    population = torch.Generator().manual_seed(1234)
    big = torch.randn(20000, 1, 3, 4, generator=population)
    truth = measure_gbr(model, [(big, torch.zeros(len(big), dtype=torch.long))], method="exact").mean
    covered, means = 0, []
    for seed in range(40):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(40, 1, 3, 4, generator=g)
        r = measure_gbr(model, [(x, torch.zeros(40, dtype=torch.long))], method="hutchinson", probes=1, seed=seed)
        assert r.method == "hutchinson" and r.probes == 1
        covered += r.ci_low <= truth <= r.ci_high
        means.append(r.mean)
    assert covered >= 34  # >= 85% of 40 (nominal 95%)
    spread = torch.tensor(means).std().item() / math.sqrt(len(means))
    assert abs(sum(means) / len(means) - truth) < 4 * spread


def test_hutchinson_ci_covers_probe_noise_alone() -> None:
    """Same samples every trial, only the probes change: the CI still covers the exact mean of those samples."""
    model = smooth_model(2).eval()
    x = torch.randn(30, 1, 3, 4, generator=torch.Generator().manual_seed(7))
    batches = [(x, torch.zeros(30, dtype=torch.long))]
    exact = measure_gbr(model, batches, method="exact").mean
    trials = [measure_gbr(model, batches, method="hutchinson", probes=2, seed=s) for s in range(40)]
    assert sum(r.ci_low <= exact <= r.ci_high for r in trials) >= 34
    assert sum(r.mean for r in trials) / 40 == pytest.approx(exact, rel=0.05)


def test_auto_picks_exact_up_to_max_exact_classes() -> None:
    model = smooth_model().eval()
    batches = [(torch.randn(8, 1, 3, 4), torch.zeros(8, dtype=torch.long))]
    assert measure_gbr(model, batches).method == "exact"
    auto = measure_gbr(model, batches, max_exact_classes=5, probes=3)
    assert (auto.method, auto.probes) == ("hutchinson", 3)
    assert measure_gbr(model, batches, method="exact").probes == 0
    scalar = measure_gbr(model, batches, output="loss", method="hutchinson")  # one output: a probe would be exact
    assert scalar.method == "exact"


# ------------------------------------------------------------------------------------------------ invariances
@pytest.mark.parametrize("method", ["exact", "hutchinson"])
def test_per_example_values_do_not_depend_on_batching(digits, method: str) -> None:
    x, y = digits
    model = tiny_resnet()
    runs = [measure_gbr(model, batches_of(x, y, size), method=method, probes=3, return_values=True)
            for size in (1, 7, 64)]
    reference = runs[-1][1]
    assert reference.shape == (64,) and (reference > 0).all()
    for result, values in runs:
        assert torch.allclose(values, reference, rtol=1e-4)
        assert result.n == 64 and result.mean == pytest.approx(runs[-1][0].mean, rel=1e-5)


def test_model_state_is_restored_and_no_grad_left(digits) -> None:
    x, y = digits
    model = tiny_resnet()
    model.train()
    model.net.fc.requires_grad_(False)  # a mixed requires_grad state must come back as it was
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    eval_gbr = measure_gbr(model, batches_of(x, y, 32))
    train_gbr = measure_gbr(model, batches_of(x, y, 32), train_mode=True)
    assert all(m.training for m in model.modules())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    for n, b in model.named_buffers():  # a train-mode forward updates BN running stats: they must be put back
        assert torch.equal(b, buffers[n]), n
    assert not math.isclose(eval_gbr.mean, train_gbr.mean, rel_tol=1e-3)  # train mode really used batch statistics
    model.eval()
    measure_gbr(model, batches_of(x, y, 32))
    assert not any(m.training for m in model.modules())


def bn_mlp(seed: int = 0) -> nn.Sequential:
    """A tiny MLP with BatchNorm1d: in train mode every example's output depends on the whole batch."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 5))


def jacobian_blocks(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Brute force, train mode, on a copy: ||d f(x_i) / d x_i||^2 (the diagonal blocks of the whole batch's Jacobian)
    and ||d sum_j f(x_j) / d x_i||^2 (what differentiating the batch-summed output gives), both [B] float64."""
    model = copy.deepcopy(model).train()
    jac = torch.autograd.functional.jacobian(model, x).double()  # [B, K, B, C, H, W]
    batch = len(x)
    diagonal = torch.stack([jac[i, :, i].pow(2).sum() for i in range(batch)])
    summed = torch.stack([jac[:, :, i].sum(0).pow(2).sum() for i in range(batch)])
    return diagonal, summed


@pytest.mark.parametrize("build", [tiny_resnet, bn_mlp])
def test_train_mode_gbr_is_each_examples_own_jacobian_block(digits, build) -> None:
    """Train-mode BN couples the batch: GBR must be the diagonal block d f(x_i) / d x_i with that batch's statistics,
    not the gradient of the batch-summed output (which adds the cross terms d f(x_j) / d x_i)."""
    model = build()
    x = digits[0][:6] if build is tiny_resnet else torch.randn(6, 1, 3, 4, generator=torch.Generator().manual_seed(1))
    truth, summed = jacobian_blocks(model, x)
    assert not torch.allclose(truth, summed, rtol=1e-2)  # the coupling is real on this model
    values = per_example_gbr(model, x, train_mode=True)
    assert torch.allclose(values, truth, rtol=1e-4)
    result, batched = measure_gbr(model, [(x, torch.zeros(6, dtype=torch.long))], train_mode=True,
                                  return_values=True)
    assert torch.allclose(batched, truth, rtol=1e-4) and result.mean == pytest.approx(float(truth.mean()), rel=1e-4)
    assert not torch.allclose(per_example_gbr(model, x), truth, rtol=1e-2)  # eval mode is another number


def test_train_mode_hutchinson_converges_to_the_jacobian_blocks() -> None:
    model = bn_mlp(1)
    x = torch.randn(6, 1, 3, 4, generator=torch.Generator().manual_seed(2))
    truth, _ = jacobian_blocks(model, x)
    estimate = per_example_gbr(model, x, method="hutchinson", probes=3000, train_mode=True,
                               generator=torch.Generator().manual_seed(0))
    assert torch.allclose(estimate, truth, rtol=0.05)


def test_per_example_gbr_measures_in_eval_mode_by_default(digits) -> None:
    x = digits[0][:8]
    model = tiny_resnet().train()
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    values = per_example_gbr(model, x)
    assert all(m.training for m in model.modules())  # the caller's mode is back
    assert all(torch.equal(b, buffers[n]) for n, b in model.named_buffers())
    assert torch.allclose(values, per_example_gbr(model.eval(), x), rtol=1e-6)
    assert torch.allclose(values, torch.cat([per_example_gbr(model, x[i:i + 1]) for i in range(8)]), rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_and_model_stays_where_it_was(digits) -> None:
    x, y = digits
    model = tiny_resnet()
    cpu = measure_gbr(model, batches_of(x, y, 32), return_values=True)
    cuda = measure_gbr(model, batches_of(x, y, 32), device="cuda", return_values=True)
    assert torch.allclose(cuda[1], cpu[1], rtol=1e-3)
    assert all(p.device.type == "cpu" for p in model.parameters())
    hutch_cpu = measure_gbr(model, batches_of(x, y, 32), method="hutchinson", return_values=True)[1]
    hutch_cuda = measure_gbr(model, batches_of(x, y, 32), method="hutchinson", device="cuda", return_values=True)[1]
    assert torch.allclose(hutch_cuda, hutch_cpu, rtol=1e-3)  # probes come from a CPU generator: same on any device


# ------------------------------------------------------------------------------------------------ output modes
def grad_sq(model: nn.Module, x: torch.Tensor, f) -> float:
    """||d f(model(x)) / d x||^2 for one example x [1, C, H, W] and a scalar f, by hand."""
    x = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(f(model(x)), x)
    return float(g.double().pow(2).sum())


def test_loss_mode_matches_hand_written_per_example_cross_entropy(digits) -> None:
    x, y = digits[0][:12], digits[1][:12]
    model = tiny_resnet().eval()
    values = per_example_gbr(model, x, y, output="loss")
    by_hand = [grad_sq(model, x[i:i + 1], lambda z, i=i: F.cross_entropy(z, y[i:i + 1])) for i in range(12)]
    assert torch.allclose(values, torch.tensor(by_hand, dtype=torch.float64), rtol=1e-4)
    # Not ART's mean-reduced loss: the same values in one batch of 12 or in batches of 1.
    singles = torch.cat([per_example_gbr(model, x[i:i + 1], y[i:i + 1], output="loss") for i in range(12)])
    assert torch.allclose(values, singles, rtol=1e-4)


def test_true_prob_and_softmax_modes(digits) -> None:
    x, y = digits[0][:6], digits[1][:6]
    model = tiny_resnet(3).eval()
    true_prob = per_example_gbr(model, x, y, output="true-prob")
    softmax = per_example_gbr(model, x, y, output="softmax")
    logits = per_example_gbr(model, x, y, output="logits")
    for i in range(6):
        xi = x[i:i + 1]
        per_class = [grad_sq(model, xi, lambda z, c=c: z.softmax(1)[0, c]) for c in range(10)]
        assert softmax[i].item() == pytest.approx(sum(per_class), rel=1e-4)
        assert true_prob[i].item() == pytest.approx(per_class[int(y[i])], rel=1e-4)
    assert (true_prob <= softmax * (1 + 1e-6)).all()  # one term of the softmax sum
    assert not torch.allclose(softmax, logits)


def test_outputs_registry_and_label_free_modes() -> None:
    assert OUTPUTS.names() == ["log-softmax", "logits", "loss", "softmax", "true-prob"]
    model = smooth_model().eval()
    x = torch.randn(4, 1, 3, 4)
    assert per_example_gbr(model, x, None).shape == (4,)  # logits need no labels
    from robust_enc.errors import UserError

    with pytest.raises(UserError, match="needs the true labels"):
        per_example_gbr(model, x, None, output="loss")
    with pytest.raises(UserError, match="probes"):
        measure_gbr(model, [(x, torch.zeros(4, dtype=torch.long))], probes=0)
    with pytest.raises(UserError, match="unknown gbr output"):
        measure_gbr(model, [(x, torch.zeros(4, dtype=torch.long))], output="logit")
    with pytest.raises(UserError, match="no examples"):
        measure_gbr(model, [])


# ------------------------------------------------------------------------------------------------ scale-free companions
class Scaled(nn.Module):
    """``net`` with its logits multiplied by ``c`` and shifted by ``shift`` on every class: the same predictions."""

    def __init__(self, net: nn.Module, c: float, shift: float = 0.0) -> None:
        super().__init__()
        self.net, self.c, self.shift = net, c, shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) * self.c + self.shift


@pytest.mark.parametrize("c", [0.1, 3.0, 25.0])
def test_scale_free_companion_ignores_the_logits_scale(digits, c: float) -> None:
    """Logits c * z (+ a constant on every class): raw GBR and the logit spread grow by c^2, GBR / spread does not
    change, and neither does the prediction."""
    x, y = digits
    net = tiny_resnet(3)
    base = measure_gbr(net, batches_of(x, y, 32))
    scaled = measure_gbr(Scaled(net, c, shift=7.0), batches_of(x, y, 32))
    assert scaled.mean == pytest.approx(c * c * base.mean, rel=1e-4)
    assert scaled.logit_spread == pytest.approx(c * c * base.logit_spread, rel=1e-4)
    assert scaled.gbr_scale_free == pytest.approx(base.gbr_scale_free, rel=1e-4)
    assert base.gbr_scale_free == pytest.approx(base.mean / base.logit_spread, rel=1e-12)


def test_companions_match_closed_forms_of_a_linear_model() -> None:
    """z = W x + b: spread_i = ||C (W x_i + b)||^2 with C the centring matrix, loss GBR_i = ||W^T (p_i - e_y)||^2
    (the cross-entropy's input gradient), computed by hand in float64."""
    torch.manual_seed(5)
    model = Linear(2 * 3 * 3, 6)
    x, y = torch.rand(40, 2, 3, 3), torch.randint(0, 6, (40,))
    r = measure_gbr(model, batches_of(x, y, 16), method="exact")
    w, b = model.fc.weight.detach().double(), model.fc.bias.detach().double()
    z = x.flatten(1).double() @ w.T + b
    centred = z - z.mean(1, keepdim=True)
    p = z.softmax(1)
    grad = (p - F.one_hot(y, 6).double()) @ w
    assert r.logit_spread == pytest.approx(float(centred.pow(2).sum(1).mean()), rel=1e-5)
    assert r.gbr_loss == pytest.approx(float(grad.pow(2).sum(1).mean()), rel=1e-4)
    assert r.gbr_scale_free == pytest.approx(float(w.pow(2).sum()) / float(centred.pow(2).sum(1).mean()), rel=1e-5)


def test_companions_are_left_out_where_they_mean_nothing(digits) -> None:
    """Train mode (batch-coupled) and other outputs: no scale-free ratio; no labels: no loss GBR."""
    x, y = digits
    net = tiny_resnet()
    assert math.isnan(measure_gbr(net, batches_of(x, y, 32), train_mode=True).logit_spread)
    softmax = measure_gbr(net, batches_of(x, y, 32), output="softmax")
    assert math.isnan(softmax.gbr_scale_free) and softmax.logit_spread > 0
    assert math.isnan(measure_gbr(net, batches_of(x, y, 32), companions=False).gbr_loss)


def test_log_softmax_mode_matches_the_jacobian_by_hand(digits) -> None:
    x, y = digits
    net = tiny_resnet(1).eval()
    values = per_example_gbr(net, x[:6], y[:6], output="log-softmax")
    expected = [torch.autograd.functional.jacobian(lambda v: net(v).log_softmax(1), x[i:i + 1]).pow(2).sum()
                for i in range(6)]
    assert torch.allclose(values, torch.stack(expected).double(), rtol=1e-4)


def test_result_fields_are_consistent(digits) -> None:
    x, y = digits
    r = measure_gbr(tiny_resnet(), batches_of(x, y, 32))
    assert isinstance(r, GBRResult) and r.n == 64
    assert r.min <= r.p05 <= r.median <= r.p95 <= r.max
    assert r.ci_low < r.mean < r.ci_high and r.ci_high - r.mean == pytest.approx(r.mean - r.ci_low)
    assert (r.ci_high - r.mean) / r.stderr == pytest.approx(1.998, abs=0.01)  # t quantile for 63 degrees of freedom
    assert set(r.to_dict()) >= {"mean", "stderr", "ci_low", "ci_high", "n", "output", "method", "probes", "median",
                                "p05", "p95", "min", "max", "wall_s"}


# ------------------------------------------------------------------------------------------------ command line
@pytest.fixture
def gbr_cli(monkeypatch):
    """cli.main with only the gbr subcommand wired: other subcommands' modules (built in parallel) cannot break
    these tests; the parsing, error handling and exit codes are cli.main's own."""
    monkeypatch.setattr(cli, "COMMANDS", {"gbr": cli.COMMANDS["gbr"]})
    return cli.main


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A real run folder: resnet_tiny trained for a few SGD steps on digits, saved with save_checkpoint."""
    torch.manual_seed(0)
    dataset, info = build_dataset("digits", "train", subset=256)
    spec = ModelSpec("resnet_tiny", info.num_classes, info.input_shape, info.mean, info.std, regularizer="baseline")
    model = build_model(spec).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for x, y in build_loader(dataset, batch_size=64, shuffle=True):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    folder = tmp_path_factory.mktemp("runs") / "tiny-baseline"
    save_checkpoint(folder / "checkpoint.pt", model, spec, run_id="tiny-baseline", dataset_info=info)
    torch.save(model.net.state_dict(), folder / "plain_weights.pt")  # a torchvision-style state dict
    return folder


def test_cli_end_to_end_writes_json(gbr_cli, run_dir, tmp_path, capsys) -> None:
    out = tmp_path / "gbr.json"
    rc = gbr_cli(["gbr", "--checkpoint", str(run_dir), "--subset", "40", "--device", "cpu", "--json", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "95% CI" in printed and "n = 40" in printed
    data = json.loads(out.read_text())
    assert data["n"] == 40 and data["dataset"] == "digits" and data["method"] == "exact"
    assert data["run_id"] == "tiny-baseline" and len(data["checkpoint_hash"]) == 12
    assert data["ci_low"] < data["mean"] < data["ci_high"] and data["stderr"] > 0
    # The library on the same data gives the same number.
    model_json = tmp_path / "plain.json"
    rc = gbr_cli(["gbr", "--model", "resnet_tiny", "--weights", str(run_dir / "plain_weights.pt"), "--dataset",
                  "digits", "--subset", "40", "--device", "cpu", "--json", str(model_json)])
    assert rc == 0
    assert json.loads(model_json.read_text())["mean"] == pytest.approx(data["mean"], rel=1e-6)


@pytest.mark.numerics
def test_cli_channels_last_measures_in_nhwc_the_same_gbr(gbr_cli, run_dir, tmp_path, monkeypatch) -> None:
    """``gbr --channels-last``: every batch is measured with NHWC convolution weights, and the GBR is the NCHW one
    up to float rounding."""
    import robust_enc.gbr as gbr_module

    layouts: list[bool] = []
    per_example = gbr_module._per_example

    def recording(model, *args, **kwargs):
        layouts.append(all(p.is_contiguous(memory_format=torch.channels_last)
                           for p in model.parameters() if p.dim() == 4))
        return per_example(model, *args, **kwargs)

    def mean(*extra: str) -> float:
        out = tmp_path / "gbr.json"
        assert gbr_cli(["gbr", "--checkpoint", str(run_dir), "--subset", "40", "--device", "cpu", "--json", str(out),
                        *extra]) == 0
        return json.loads(out.read_text())["mean"]

    nchw = mean()
    monkeypatch.setattr(gbr_module, "_per_example", recording)
    assert mean("--channels-last") == pytest.approx(nchw, rel=1e-5)
    assert layouts and all(layouts)


def test_cli_one_example_prints_the_nan_interval(gbr_cli, run_dir, capsys) -> None:
    assert gbr_cli(["gbr", "--checkpoint", str(run_dir), "--subset", "1", "--device", "cpu"]) == 0
    assert "95% CI [nan, nan], n = 1" in capsys.readouterr().out  # not eaten as rich markup


def test_cli_hutchinson_and_loss(gbr_cli, run_dir, tmp_path) -> None:
    out = tmp_path / "h.json"
    assert gbr_cli(["gbr", "--checkpoint", str(run_dir / "checkpoint.pt"), "--subset", "30", "--method",
                    "hutchinson", "--probes", "2", "--seed", "3", "--device", "cpu", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert (data["method"], data["probes"], data["seed"]) == ("hutchinson", 2, 3)
    assert gbr_cli(["gbr", "--checkpoint", str(run_dir), "--subset", "30", "--output", "loss", "--train-mode",
                    "--device", "cpu", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert (data["output"], data["method"], data["train_mode"]) == ("loss", "exact", True)


@pytest.mark.parametrize("extra, message", [
    (["--output", "logit"], "unknown gbr output 'logit'"),
    (["--probes", "0"], "--probes must be an integer >= 1"),
    (["--method", "jacobian"], "unknown gbr method"),
    (["--dataset", "synthetic:1x8x8:5:20"], "5 classes"),
    (["--dataset", "synthetic:3x8x8:10:20"], "(3, 8, 8)"),
    (["--model", "resnet_tiny"], "either --checkpoint or --model"),
])
def test_cli_bad_inputs_give_one_line_user_error(gbr_cli, run_dir, capsys, extra: list[str], message: str) -> None:
    rc = gbr_cli(["gbr", "--checkpoint", str(run_dir), "--subset", "10", "--device", "cpu", *extra])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("robust-enc: error:") and err.count("\n") == 1
    assert message in err


def test_cli_model_without_weights_or_dataset(gbr_cli, run_dir, capsys) -> None:
    assert gbr_cli(["gbr", "--model", "resnet_tiny", "--dataset", "digits"]) == 2
    assert "--weights" in capsys.readouterr().err
    assert gbr_cli(["gbr", "--model", "resnet_tiny", "--weights", str(run_dir / "plain_weights.pt")]) == 2
    assert "needs --dataset" in capsys.readouterr().err


def test_train_mode_with_a_single_example_batch_is_a_user_error():
    from robust_enc.errors import UserError
    from robust_enc.gbr import measure_gbr
    from robust_enc.models import ModelSpec
    from robust_enc.regularizers import build_model

    model = build_model(ModelSpec("resnet_tiny", 10, (1, 8, 8), (0.5,), (0.25,)))
    x = torch.rand(3, 1, 8, 8)
    y = torch.tensor([0, 1, 2])
    with pytest.raises(UserError, match="batch of 1"):
        measure_gbr(model, [(x[:2], y[:2]), (x[2:], y[2:])], train_mode=True)
    assert model.training  # state restored after the error


def test_cli_defaults_to_the_val_split_where_a_data_set_has_no_test_split(gbr_cli, tmp_path, capsys) -> None:
    """An ImageNet-style folder (train/ and val/, no test/): ``gbr`` without --split measures val's 4 images, as
    ``attack`` does, instead of failing on a missing test split."""
    from PIL import Image

    rng = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for cls in ("a", "b"):
            (tmp_path / "set" / split / cls).mkdir(parents=True)
            for i in range(2):
                pixels = torch.randint(0, 256, (8, 8, 3), generator=rng, dtype=torch.uint8).numpy()
                Image.fromarray(pixels).save(tmp_path / "set" / split / cls / f"{i}.png")
    spec = ModelSpec("resnet_tiny", 2, (3, 8, 8), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    torch.save(build_model(spec).net.state_dict(), tmp_path / "tiny.pt")
    out = tmp_path / "gbr.json"
    assert gbr_cli(["gbr", "--model", "resnet_tiny", "--weights", str(tmp_path / "tiny.pt"), "--dataset",
                    f"folder:{tmp_path / 'set'}", "--device", "cpu", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["split"] == "val" and data["n"] == 4
