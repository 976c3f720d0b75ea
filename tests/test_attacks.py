"""Attacks through ART on a briefly trained resnet_tiny (digits 8x8): real ART calls, real training steps."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from robust_enc.attacks import art_adapter
from robust_enc.attacks.checks import RowStats, check_rows, mcnemar_p
from robust_enc.attacks.config import AttackConfig
from robust_enc.attacks.evaluation import _measure_gbr, evaluate, evaluate_model
from robust_enc.attacks.registry import ATTACKS, parse_attacks
from robust_enc.checkpoint import save_checkpoint
from robust_enc.cli import main
from robust_enc.data import build_dataset, build_loader
from robust_enc.images import DatasetInfo, TensorImages
from robust_enc.models import ModelSpec, frozen
from robust_enc.regularizers import build_model
from robust_enc.results import ResultRow, parse_eps, read_results, write_results
from robust_enc.runtime.seeding import seed_everything, seed_for

REPO = Path(__file__).resolve().parent.parent
MEASURED = ("n", "clean_top1", "clean_top5", "adv_top1", "steps", "step_size", "restarts", "flags")


def measured(rows: list[ResultRow]) -> list[tuple]:
    """The numbers a row reports, without timings and timestamps."""
    values = [(r.attack, r.eps) + tuple(getattr(r, f) for f in MEASURED) for r in rows]
    return [tuple("nan" if isinstance(v, float) and math.isnan(v) else v for v in row) for row in values]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[nn.Module, Path, DatasetInfo]:
    """resnet_tiny after 300 SGD steps at batch 64 on digits (~96% test accuracy), saved as a run folder."""
    torch.manual_seed(0)
    data, info = build_dataset("digits", "train")
    spec = ModelSpec("resnet_tiny", info.num_classes, info.input_shape, info.mean, info.std)
    model = build_model(spec)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    loader = build_loader(data, batch_size=64, shuffle=True)
    steps, correct, seen = 0, 0, 0
    while steps < 300:
        for x, y in loader:
            logits = model(x)
            loss = nn.functional.cross_entropy(logits, y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            steps += 1
            if steps > 250:
                correct += int((logits.argmax(1) == y).sum())
                seen += len(y)
            if steps == 300:
                break
    model.eval()
    run = tmp_path_factory.mktemp("runs") / "tiny-baseline"
    save_checkpoint(run / "checkpoint.pt", model, spec, run_id="tiny-baseline", dataset_info=info,
                    metrics={"train_top1": correct / seen, "weight_sq_norm": 12.5})
    return model, run, info


@pytest.fixture(scope="module")
def test_batch() -> tuple[torch.Tensor, torch.Tensor]:
    data, _ = build_dataset("digits", "test")
    return data.x[:128], data.y[:128]


# ------------------------------------------------------------------------------------------------ ART itself
def test_art_fgsm_equals_hand_written_torch_fgsm_bit_for_bit(trained, test_batch):
    model, _, _ = trained
    x, y = test_batch
    classifier = art_adapter.build_classifier(model, num_classes=10, input_shape=(1, 8, 8), device=torch.device("cpu"))
    for eps in (1 / 255, 8 / 255, 0.3):
        x_art = art_adapter.generate(art_adapter.fgsm(classifier, eps=eps, norm="linf", batch_size=128), x, y,
                                     10).numpy()
        for reduction in ("mean", "sum"):  # the scale of the loss cannot change a sign
            xg = x.clone().requires_grad_(True)
            nn.functional.cross_entropy(model(xg), y, reduction=reduction).backward()
            x_torch = (x + eps * xg.grad.sign()).clamp(0, 1)
            assert np.array_equal(x_art, x_torch.numpy()), (eps, reduction)  # bit for bit, not just within 1 ulp
        assert (x_art != x.numpy()).any()


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_fgsm_sweep_through_the_public_api_equals_art_fast_gradient_method(trained, test_batch, norm):
    """One loss_gradient for the sweep, then x + eps * direction per eps on the device: FastGradientMethod.generate at
    every eps, bit for bit for linf (sign steps); for l2 to float32 rounding (torch and numpy sum the norm in another
    order)."""
    model, _, _ = trained
    x, y = test_batch
    classifier = art_adapter.build_classifier(model, num_classes=10, input_shape=(1, 8, 8), device=torch.device("cpu"))
    x_np, y_np = art_adapter.to_numpy_images(x), art_adapter.one_hot(y, 10)
    with frozen(model):
        step = art_adapter.fgsm_direction(classifier, x, torch.from_numpy(y_np), norm)  # one gradient
        for eps in (0.5 / 255, 1 / 255, 2 / 255, 4 / 255, 8 / 255, 0.25, 1.0):
            x_sweep = art_adapter.fgsm_apply(x, step, eps, norm).numpy()
            x_art = art_adapter.fgsm(classifier, eps=eps, norm=norm, batch_size=128).generate(x=x_np, y=y_np)
            if norm == "linf":
                assert x_sweep.dtype == np.float32 and np.array_equal(x_sweep, x_art), eps
            else:
                assert np.abs(x_sweep - x_art).max() <= 1e-6 * max(eps, 1.0), eps
            assert (x_sweep != x_np).any()
    assert torch.equal(art_adapter.fgsm_apply(x, step, 0.0, norm), x)


def hand_written_pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, step: float,
                     steps: int, start: torch.Tensor | None = None) -> torch.Tensor:
    """L-inf PGD from x (or from ``start``) in plain torch: mean cross-entropy, sign step, clip to [0, 1], project;
    per example the first iterate that is misclassified is kept, else the last one."""
    x_adv = x.clone() if start is None else start.clone()
    best = x_adv.clone()
    found = torch.zeros(len(x), dtype=torch.bool)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        logits = model(x_adv)
        (grad,) = torch.autograd.grad(nn.functional.cross_entropy(logits, y), x_adv)
        x_adv = x_adv.detach()
        new = (logits.argmax(1) != y) & ~found
        best[new], found = x_adv[new], found | new
        x_adv = (x_adv + step * grad.sign()).clamp(0, 1)
        delta = x_adv - x
        x_adv = x + delta.sign() * delta.abs().clamp_max(eps)
    return torch.where(found[:, None, None, None], best, x_adv)


@pytest.mark.numerics
def test_suite_pgd_equals_hand_written_torch_pgd_bit_for_bit(trained, test_batch):
    """The adapter's PGD equals hand-written torch PGD bit for bit on the same rows, and the runner's count equals
    the count from hand-written PGD on the rows the runner attacks: the clean-correct ones, in one batch, as the
    runner forms it (float32 logits of a row can change in the last bits with the rows beside it, so the reference
    uses the same batches to be exact)."""
    model, _, _ = trained
    x, y = test_batch
    eps = 16 / 255
    rows = evaluate_model(model, TensorImages(x, y), info=replace(build_dataset("digits", "test")[1], subset=128),
                     attacks=("pgd",), eps=(eps,), steps=5, random_start=False, device="cpu", batch_size=128)
    with frozen(model):
        expected = hand_written_pgd(model, x, y, eps, 2.5 * eps / 5, 5)
        classifier = art_adapter.build_classifier(model, num_classes=10, input_shape=(1, 8, 8),
                                                  device=torch.device("cpu"))
        suite = art_adapter.pgd(classifier, x, y, eps=eps, norm="linf", steps=5, step_size=2.5 * eps / 5, restarts=0,
                                num_classes=10)
        assert torch.equal(suite, expected)  # bit for bit
        clean_ok = model(x).argmax(1) == y
        xa, ya = x[clean_ok], y[clean_ok]
        robust = model(hand_written_pgd(model, xa, ya, eps, 2.5 * eps / 5, 5)).argmax(1) == ya
    assert rows[1].adv_top1 == int(robust.sum()) / 128
    assert rows[1].adv_top1 < rows[0].clean_top1  # the attack does something


def test_pgd_restarts_only_add_fooled_examples(trained, test_batch):
    """Restart 1 draws the same random start as a one-start run (same per-batch seed); later restarts only run on
    what is still robust, so more restarts never leave an example robust that one start fooled."""
    model, _, _ = trained
    x, y = test_batch
    eps = 8 / 255
    common = dict(attacks=("pgd",), eps=(eps,), steps=3, device="cpu", batch_size=128, seed=1)
    data, info = TensorImages(x, y), replace(build_dataset("digits", "test")[1], subset=128)
    one = evaluate_model(model, data, info=info, restarts=1, **common)[1]
    three = evaluate_model(model, data, info=info, restarts=3, **common)[1]
    assert three.adv_top1 <= one.adv_top1 and three.restarts == 3 and not three.flags


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_pgd_stays_inside_ball_and_box(trained, test_batch, norm):
    model, _, _ = trained
    x, y = test_batch
    torch.manual_seed(0)
    classifier = art_adapter.build_classifier(model, num_classes=10, input_shape=(1, 8, 8), device=torch.device("cpu"))
    eps = 8 / 255 if norm == "linf" else 1.5  # L2 radii go past 1 (sqrt(64) = 8 is the 8x8 cube's diameter)
    with frozen(model):
        x_adv = art_adapter.pgd(classifier, x, y, eps=eps, norm=norm, steps=5, step_size=2.5 * eps / 5, restarts=2,
                                num_classes=10)
    delta = (x_adv - x).flatten(1)
    size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
    assert size.max() <= eps + 1e-6 and size.max() > 0.5 * eps
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0


def test_model_state_is_restored_after_an_attack(trained):
    model, _, _ = trained
    model.train()
    frozen_bn = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)][0]
    frozen_bn.eval()  # a mixed state (e.g. frozen BN while fine-tuning) must come back module by module
    frozen_bn.weight.requires_grad_(False)
    modes = [m.training for m in model.modules()]
    flags = [p.requires_grad for p in model.parameters()]
    grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    rows = evaluate_model(model, "digits", attacks=("fgsm",), eps=(4 / 255,), subset=64, device="cpu")
    assert [m.training for m in model.modules()] == modes and not frozen_bn.training
    assert [p.requires_grad for p in model.parameters()] == flags
    for p, g in zip(model.parameters(), grads):  # ART's zero_grad/backward did not touch the weights' .grad
        assert (p.grad is None and g is None) or torch.equal(p.grad, g)
    model.requires_grad_(True)
    model.eval()
    assert rows[0].n == 64


# ------------------------------------------------------------------------------------------------ every attack
# ART's L2 square attack divides by the norm of all-zero proposals on 8x8 images (numpy warns); the checks below
# (no non_finite flag, bounds) show that no NaN reaches the returned adversarial images.
@pytest.mark.filterwarnings("ignore:.*encountered in divide:RuntimeWarning")
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_every_registered_attack_respects_ball_box_and_clean_bound(trained, norm):
    model, _, _ = trained
    eps = (0.0, 8 / 255) if norm == "linf" else (0.0, 0.5)
    # autoattack has its own test: its Square stage makes 5,000 queries whatever --steps says
    names = [name for name in ATTACKS.names() if name != "autoattack"]
    rows = evaluate_model(model, "digits", attacks=names, eps=eps, norm=norm, subset=64, steps=3, batch_size=64,
                     device="cpu")
    attacks = {r.attack for r in rows}
    assert attacks == {"none", "worst", *names}
    for r in rows:
        assert "exceeds_eps" not in r.flags and "outside_box" not in r.flags and "non_finite" not in r.flags, r
        assert "eps0_differs" not in r.flags, r
        assert r.adv_top1 <= r.clean_top1
        if r.eps == 0:
            assert r.adv_top1 == r.clean_top1
    worst = {r.eps: r.adv_top1 for r in rows if r.attack == "worst"}
    for r in rows:
        if r.attack not in ("none", "worst"):
            assert worst[r.eps] <= r.adv_top1


@pytest.mark.numerics
def test_invariants_on_the_trained_model(trained):
    """Structural facts hold exactly (eps 0 is the clean accuracy, worst <= each attack: a per-example AND); "PGD not
    weaker than FGSM" and "accuracy does not rise with eps" are statistical claims (neither holds per example), so
    they are checked per example by the runner's exact one-sided McNemar test on the disagreeing examples (flags
    ``iterative_weaker_than_fgsm``, ``accuracy_increases_with_eps``; p < 0.01, a false alarm in at most 1% of the
    comparisons where the two are equally strong, far less here, where PGD is the stronger), not on totals, where one
    image of float32 rounding would decide."""
    model, _, _ = trained
    eps = (0.0, 1 / 255, 4 / 255, 16 / 255, 64 / 255)
    rows = evaluate_model(model, "digits", attacks=("fgsm", "pgd"), eps=eps, steps=5, device="cpu", batch_size=128)
    by = {(r.attack, r.eps): r for r in rows}
    clean = by[("none", 0.0)]
    assert clean.n == 450 and clean.clean_top1 > 0.9
    for attack in ("fgsm", "pgd", "worst"):
        assert by[(attack, 0.0)].adv_top1 == clean.clean_top1  # eps 0 is the clean accuracy
    for e in eps:
        assert by[("worst", e)].adv_top1 <= min(by[("pgd", e)].adv_top1, by[("fgsm", e)].adv_top1)
    assert by[("pgd", 64 / 255)].adv_top1 < 0.5 * clean.clean_top1  # the attack does something
    assert {r.attack for r in rows if r.eps > 0 and r.attack != "worst"} == {"fgsm", "pgd"}  # both were compared
    assert by[("pgd", 4 / 255)].step_size == pytest.approx(2.5 * (4 / 255) / 5)
    assert all(r.flags == "" for r in rows), [r.flags for r in rows]
    assert all(r.images_per_s > 0 and r.wall_s > 0 for r in rows)
    assert math.isnan(clean.clean_top5)  # top-5 only with more than 10 classes


@pytest.mark.numerics
def test_worst_is_the_per_example_and_not_the_minimum_of_the_totals(trained):
    """Per example, worst = robust under FGSM AND under one PGD step from a random start, recomputed here in plain
    torch (the random start drawn with the seed the runner documents for (seed, batch 0, "pgd", eps)). Steps from
    different points break different examples, so a runner that returned min(fgsm, pgd) would report a higher
    worst-case accuracy than the per-example AND. The reference attacks the rows the runner attacks (the clean-correct
    ones, one batch): a row's float32 gradient and logits can change in the last bits with the rows beside it."""
    model, _, _ = trained
    data, info = build_dataset("digits", "test")
    eps_values = (16 / 255, 32 / 255)
    rows = evaluate_model(model, data, info=info, attacks=("fgsm", "pgd"), eps=eps_values, steps=1, step_size=32 / 255,
                     device="cpu", batch_size=450)
    by = {(r.attack, r.eps): r.adv_top1 for r in rows}
    x, y = data.x, data.y
    differs = 0
    with frozen(model):
        clean_ok = model(x).argmax(1) == y
        xa, ya = x[clean_ok], y[clean_ok]
        xg = xa.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(nn.functional.cross_entropy(model(xg), ya), xg)
        for eps in eps_values:
            fgsm_ok = clean_ok.clone()
            fgsm_ok[clean_ok] = model((xa + eps * grad.sign()).clamp(0, 1)).argmax(1) == ya
            seed_everything(seed_for(0, 0, "pgd", eps))
            start = (xa + torch.empty_like(xa).uniform_(-eps, eps)).clamp(0, 1)
            pgd_ok = clean_ok.clone()
            pgd_ok[clean_ok] = model(hand_written_pgd(model, xa, ya, eps, 32 / 255, 1, start)).argmax(1) == ya
            worst = int((clean_ok & fgsm_ok & pgd_ok).sum()) / 450
            assert by[("fgsm", eps)] == int((clean_ok & fgsm_ok).sum()) / 450
            assert by[("pgd", eps)] == int(pgd_ok.sum()) / 450
            assert by[("worst", eps)] == worst
            differs += worst < min(by[("fgsm", eps)], by[("pgd", eps)])
    assert differs  # the constructed case: the two attacks' broken sets are not nested


def test_l2_eps_goes_past_one_and_stops_at_the_image_diameter(trained, capsys):
    model, run, _ = trained
    rows = evaluate_model(model, "digits", attacks=("fgsm", "pgd"), eps=(1.0, 3.0), norm="l2", subset=32, steps=2,
                     device="cpu")
    assert {(r.attack, r.eps) for r in rows if r.attack == "pgd"} == {("pgd", 1.0), ("pgd", 3.0)}
    assert all("exceeds_eps" not in r.flags for r in rows)
    assert read_results_roundtrip(rows)
    out = str(run / "l2.csv")
    assert "sqrt(C*H*W) = 8" in _bad(capsys, ["attack", "--checkpoint", str(run), "--norm", "l2", "--eps", "8.5",
                                              "--device", "cpu", "--subset", "20", "--out", out])
    assert "outside [0, 1]" in _bad(capsys, ["attack", "--checkpoint", str(run), "--eps", "1.5", "--device", "cpu",
                                             "--out", out])


def read_results_roundtrip(rows: list[ResultRow]) -> bool:
    """L2 rows with eps > 1 are valid rows: they survive the schema check on the way out and back."""
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "rows.csv"
        from robust_enc.results import write_results

        write_results(path, rows)
        return measured(read_results(path)) == measured(rows)


def test_seeded_run_is_reproducible_and_leaves_global_rng_alone(trained):
    model, _, _ = trained
    kwargs = dict(attacks=("pgd", "square"), eps=(16 / 255,), steps=4, subset=128, batch_size=64, device="cpu")
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    first = evaluate_model(model, "digits", seed=7, **kwargs)
    after = torch.rand(1)
    assert torch.equal(before, after)  # per-batch seeding is restored afterwards
    second = evaluate_model(model, "digits", seed=7, **kwargs)
    assert measured(first) == measured(second)


# ------------------------------------------------------------------------------------------------ checks
def test_checks_flag_each_failure():
    base = dict(run_id="r", model="m", regularizer="baseline", dataset="d", split="test", subset=0, n=100,
                clean_top1=0.9, norm="linf")
    rows = [
        ResultRow(attack="none", eps=0.0, adv_top1=0.9, **{**base, "norm": "none"}),
        ResultRow(attack="fgsm", eps=0.0, adv_top1=0.8, **base),  # eps 0 differs from clean
        ResultRow(attack="fgsm", eps=0.1, adv_top1=0.3, **base),
        ResultRow(attack="fgsm", eps=0.2, adv_top1=0.4, **base),  # broke 12 at 0.1 that it missed at 0.2, 2 new
        ResultRow(attack="pgd", eps=0.1, adv_top1=0.5, **base),  # FGSM broke 25 that PGD missed, PGD 5 of its own
        ResultRow(attack="square", eps=0.1, adv_top1=0.1, **base),  # square broke 40 the white box missed, 0 back
    ]
    stats = [RowStats(), RowStats(), RowStats(max_perturbation=0.1 + 1e-5, attacked=90, zero_gradient=10, non_finite=2),
             RowStats(box_excess=1e-3, attacked=90, prev_eps_only=12, this_eps_only=2),
             RowStats(iterative=True, attacked=90, ref_only=25, self_only=5),
             RowStats(white_box=False, attacked=90, ref_only=0, self_only=40)]
    flags = [r.flags for r in check_rows(rows, stats)]
    assert flags[0] == ""
    assert flags[1] == "eps0_differs_from_clean"
    assert "perturbation_exceeds_eps" in flags[2] and "zero_gradient=0.111" in flags[2] and "non_finite=2" in flags[2]
    assert "outside_box" in flags[3] and "accuracy_increases_with_eps(from=0.3000,12 vs 2,p=0.0065)" in flags[3]
    assert flags[4] == "iterative_weaker_than_fgsm(fgsm broke 25 vs 5,p=0.00016)"
    assert flags[5] == "black_box_stronger_than_white_box(square broke 40 vs 0,p=9.1e-13)"
    # within tolerance: float32 overshoot of ~2e-9 is not a failure
    ok = check_rows(rows[:1] + rows[2:3], [RowStats(), RowStats(max_perturbation=0.1 + 2e-9, attacked=90)])
    assert ok[1].flags == ""
    # ART's round trip is checked on every attack row
    alone = check_rows([rows[0], rows[4]], [RowStats(), RowStats(iterative=True, attacked=90, roundtrip_checked=64,
                                                                 roundtrip_mismatch=3)])
    assert alone[1].flags == "eps0_differs_from_clean(art_predict=3/64)"


@pytest.mark.parametrize("weaker, stronger, fires", [(1, 0, False), (2, 0, False), (6, 0, False), (7, 0, True),
                                                     (10, 3, False), (20, 4, True), (0, 50, False)])
def test_per_example_comparisons_fire_only_when_significant(weaker, stronger, fires):
    """The exact one-sided McNemar test against scipy's binomial tail computed by hand: P(X >= b), X ~ Bin(b + c,
    1/2). One image of noise (PGD-10 missing 1 image FGSM broke, out of 450) never fires."""
    expected = sum(math.comb(weaker + stronger, k) for k in range(weaker, weaker + stronger + 1)) / 2 ** (
        weaker + stronger) if weaker + stronger else 1.0
    assert mcnemar_p(weaker, stronger) == pytest.approx(expected, rel=1e-9)
    base = dict(run_id="r", model="m", regularizer="baseline", dataset="d", split="test", subset=0, n=450,
                clean_top1=0.98, norm="linf", eps=8 / 255)
    rows = [ResultRow(attack="fgsm", adv_top1=0.9, **base), ResultRow(attack="pgd", adv_top1=0.9, **base),
            ResultRow(attack="square", adv_top1=0.9, **base)]
    stats = [RowStats(), RowStats(iterative=True, ref_only=weaker, self_only=stronger),
             RowStats(white_box=False, self_only=weaker, ref_only=stronger)]
    checked = check_rows(rows, stats)
    assert ("iterative_weaker_than_fgsm" in checked[1].flags) == fires
    assert ("black_box_stronger_than_white_box" in checked[2].flags) == fires


class Softmaxed(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).softmax(1)


class Quantized(nn.Module):
    """Rounds the input to 0/1 first: the input gradient is exactly zero (gradient masking by shattering)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(torch.round(x))


class Randomized(nn.Module):
    """Adds large noise to the logits on every call: a randomized 'defense' whose predictions change between the
    suite's clean pass and ART's forward passes."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.model(x)
        return logits + 100.0 * torch.randn_like(logits)


def test_real_runs_raise_probability_and_gradient_masking_flags(trained):
    model, _, _ = trained
    rows = evaluate_model(Softmaxed(model), "digits", attacks=("fgsm",), eps=(8 / 255,), subset=64, device="cpu")
    assert all("outputs_look_like_probabilities" in r.flags for r in rows)
    rows = evaluate_model(Quantized(model), "digits", attacks=("fgsm", "pgd"), eps=(8 / 255,), subset=64, steps=2,
                     random_start=False, device="cpu")
    by = {r.attack: r for r in rows}
    assert "zero_gradient=1.000" in by["fgsm"].flags and "zero_gradient=1.000" in by["pgd"].flags
    assert by["fgsm"].adv_top1 == by["fgsm"].clean_top1  # masked: the attack cannot move


def test_gradient_masking_is_flagged_without_fgsm_in_the_run(trained):
    """PGD's random start moves every input, so 'unchanged input' would never fire: the zero-gradient count comes
    from the clean gradient of every batch; the square attack is compared with the PGD run beside it."""
    model, _, _ = trained
    rows = evaluate_model(Quantized(model), "digits", attacks=("pgd",), eps=(8 / 255,), subset=64, steps=2,
                     random_start=True, device="cpu")
    assert "zero_gradient=1.000" in rows[1].flags
    rows = evaluate_model(Quantized(model), "digits", attacks=("square",), eps=(0.3,), subset=64, steps=20,
                          device="cpu")
    assert "zero_gradient=1.000" in rows[1].flags and "black_box" not in rows[1].flags  # no white-box row to beat
    rows = evaluate_model(Quantized(model), "digits", attacks=("pgd", "square"), eps=(0.3,), subset=64, steps=20,
                     random_start=False, device="cpu")
    by = {r.attack: r for r in rows}
    assert by["square"].adv_top1 < by["pgd"].adv_top1  # square really got through the masked gradients
    assert "black_box_stronger_than_white_box(square broke " in by["square"].flags  # significant per example


def test_iterative_weaker_than_fgsm_is_flagged_without_fgsm_in_the_run(trained, caplog):
    model, _, _ = trained
    rows = evaluate_model(model, "digits", attacks=("pgd",), eps=(16 / 255,), subset=128, steps=1, step_size=1e-6,
                     random_start=False, device="cpu")  # a step size that cannot move: misconfigured PGD
    assert "iterative_weaker_than_fgsm(fgsm broke " in rows[1].flags and " vs 0," in rows[1].flags
    warnings = [r for r in caplog.records if "iterative_weaker_than_fgsm" in r.message]
    assert len(warnings) == 1 and warnings[0].levelname == "WARNING"  # one line for the run, not one per row
    rows = evaluate_model(model, "digits", attacks=("pgd",), eps=(16 / 255,), subset=64, steps=5, device="cpu")
    assert rows[1].flags == ""  # a sound PGD beats its FGSM reference


def test_eps0_check_compares_art_round_trip_with_clean_pass(trained):
    model, _, _ = trained
    rows = evaluate_model(Randomized(model), "digits", attacks=("fgsm",), eps=(0.0, 8 / 255), subset=64, device="cpu")
    assert all("eps0_differs_from_clean(art_predict=" in r.flags for r in rows[1:])
    rows = evaluate_model(model, "digits", attacks=("fgsm",), eps=(8 / 255,), subset=64, device="cpu")
    assert rows[1].flags == ""


# ------------------------------------------------------------------------------------------------ runner mechanics
def test_top5_with_many_classes():
    data, info = build_dataset("synthetic:1x8x8:20:96", "test")
    spec = ModelSpec("resnet_tiny", 20, (1, 8, 8), info.mean, info.std)
    rows = evaluate_model(build_model(spec).eval(), data, info=info, attacks=("fgsm",), eps=(8 / 255,), device="cpu")
    for r in rows:
        assert 0 <= r.adv_top1 <= r.clean_top1 <= r.clean_top5 <= 1
        assert not hasattr(r, "adv_top5")  # PGD stops at the first top-1 flip: it measures no robust top-5


def test_an_older_file_with_the_adv_top5_column_reads_without_it(tmp_path):
    """Files written before adv_top5 was dropped hold it after adv_top1: read, the column is ignored."""
    import csv

    row = ResultRow(run_id="r", model="m", regularizer="baseline", dataset="digits", split="test", subset=0,
                    attack="fgsm", norm="linf", eps=8 / 255, n=10, clean_top1=0.9, adv_top1=0.5)
    new = tmp_path / "new.csv"
    write_results(new, [row])
    lines = list(csv.reader(new.read_text().splitlines()))
    at = lines[0].index("adv_top1") + 1
    old = tmp_path / "old.csv"
    with old.open("w", newline="") as f:
        csv.writer(f).writerows([lines[0][:at] + ["adv_top5"] + lines[0][at:], lines[1][:at] + ["0.7"] + lines[1][at:]])
    assert read_results(old) == read_results(new) == [row]


def test_streaming_reads_the_data_one_batch_at_a_time(trained):
    model, _, _ = trained
    data, info = build_dataset("digits", "test")

    class Counting(TensorImages):
        served = 0

        def __getitem__(self, i: int):
            Counting.served += 1
            return super().__getitem__(i)

    counting = Counting(data.x, data.y)
    seen: list[tuple[int, int]] = []
    evaluate_model(model, counting, info=info, attacks=("fgsm",), eps=(4 / 255,), batch_size=50, device="cpu",
              on_batch=lambda report: seen.append((report.done, Counting.served)))
    assert [done for done, _ in seen] == list(range(50, 451, 50))
    assert all(served == done for done, served in seen)  # no look-ahead: nothing beyond the current batch is held


def _config(run: Path, out: Path, **overrides) -> AttackConfig:
    """4 batches of 64 (the last one short); PGD with a random start, so resuming must replay the same seeds."""
    base = AttackConfig(checkpoint=str(run), attacks=("fgsm", "pgd"), eps=(4 / 255, 16 / 255), steps=3,
                        batch_size=64, subset=230, device="cpu", out=str(out))
    return replace(base, **overrides)


@pytest.fixture(scope="module")
def uninterrupted(trained, tmp_path_factory) -> list[ResultRow]:
    _, run, _ = trained
    return evaluate(_config(run, tmp_path_factory.mktemp("whole") / "whole.csv"))


def test_resume_after_a_kill_gives_the_uninterrupted_rows(trained, uninterrupted, tmp_path):
    _, run, _ = trained
    whole = uninterrupted
    config = _config(run, tmp_path / "resumed.csv")
    assert evaluate(config, max_batches=2) == []  # "killed" after 2 of 5 batches
    progress = next(tmp_path.glob("resumed.csv.progress.*.json"))
    assert progress.is_file() and not (tmp_path / "resumed.csv").exists()
    served: list[int] = []
    resumed = evaluate(config, on_batch=lambda report: served.append(report.done))
    assert served[0] == 64 * 3  # continued at batch 3, counting the 2 done batches once
    assert measured(resumed) == measured(whole)
    assert measured(read_results(tmp_path / "resumed.csv")) == measured(whole)
    assert not progress.exists()
    # another config has its own progress file: it neither resumes this one's nor discards it
    evaluate(config, max_batches=1)
    other = evaluate(replace(config, attacks=("fgsm",), eps=(8 / 255,)))
    assert other[0].n == 230 and progress.is_file()


@pytest.mark.numerics
def test_channels_last_attacks_in_nhwc_and_counts_like_nchw(trained, uninterrupted, tmp_path, monkeypatch):
    """``attack --channels-last``: the classifier ART attacks holds NHWC convolution weights, and the rows are the
    NCHW run's up to float rounding (a flipped gradient sign or argmax may move an example: 2 of 230 allowed)."""
    _, run, _ = trained
    layouts: list[tuple[bool, bool]] = []  # (NHWC-contiguous, NCHW-contiguous): a 1x1 or 1-channel kernel is both
    build = art_adapter.build_classifier

    def recording(model, **kwargs):
        layouts.extend((p.is_contiguous(memory_format=torch.channels_last), p.is_contiguous())
                       for p in model.parameters() if p.dim() == 4)
        return build(model, **kwargs)

    monkeypatch.setattr(art_adapter, "build_classifier", recording)
    out = tmp_path / "nhwc.csv"
    assert main(["attack", "--checkpoint", str(run), "--attack", "fgsm,pgd", "--eps", "4/255,16/255", "--steps", "3",
                 "--batch-size", "64", "--subset", "230", "--device", "cpu", "--out", str(out),
                 "--channels-last"]) == 0
    assert all(nhwc for nhwc, _ in layouts) and not all(nchw for _, nchw in layouts)
    rows = read_results(out)
    assert [(r.attack, r.eps, r.n) for r in rows] == [(r.attack, r.eps, r.n) for r in uninterrupted]
    for nhwc, nchw in zip(rows, uninterrupted):
        assert abs(nhwc.clean_top1 - nchw.clean_top1) * 230 <= 1
        assert abs(nhwc.adv_top1 - nchw.adv_top1) * 230 <= 2
        assert not nhwc.flags


def test_a_run_killed_in_nhwc_resumes_in_nchw(trained, uninterrupted, tmp_path):
    """The layout is a kernel choice, like the device: the progress file of a ``--channels-last`` run serves a rerun
    without it, and the rows are the uninterrupted NCHW run's up to float rounding."""
    _, run, _ = trained
    config = _config(run, tmp_path / "resumed.csv")
    assert evaluate(replace(config, channels_last=True), max_batches=2) == []
    served: list[int] = []
    resumed = evaluate(config, on_batch=lambda report: served.append(report.done))
    assert served[0] == 64 * 3
    for row, whole in zip(resumed, uninterrupted, strict=True):
        assert abs(row.adv_top1 - whole.adv_top1) * 230 <= 2 and row.clean_top1 == pytest.approx(whole.clean_top1,
                                                                                                  abs=1 / 230)


def test_channels_last_leaves_the_callers_weights_as_they_were(trained):
    """``evaluate_model(..., channels_last=True)`` swaps the weights' storage only while measuring: afterwards each
    parameter is the same tensor, in its own layout, on its own storage (an optimizer holding it sees no change)."""
    model, _, _ = trained
    before = [(p, p.data_ptr(), p.stride(), p.detach().clone()) for p in model.parameters()]
    rows = evaluate_model(model, "digits", attacks=("fgsm",), eps=(4 / 255,), subset=64, device="cpu", gbr=True,
                          channels_last=True)
    assert rows[0].n == 64 and math.isfinite(rows[0].gbr)
    for (p, pointer, stride, value), now in zip(before, model.parameters()):
        assert now is p and p.data_ptr() == pointer and p.stride() == stride and torch.equal(p, value)


def test_sharded_hutchinson_gbr_sums_to_the_one_process_totals():
    """--gbr under torchrun: each rank measures its shard and the sums are reduced. With > 100 classes auto picks
    hutchinson, whose probes are seeded per global batch, so 3 ranks give the one-process totals; a rank left with
    no batch (6 ranks, 5 batches) reports zeros instead of raising while the others wait in all_reduce."""
    data, info = build_dataset("synthetic:1x8x8:101:40", "test")
    model = build_model(ModelSpec("resnet_tiny", 101, (1, 8, 8), info.mean, info.std)).eval()
    config = AttackConfig(batch_size=8, seed=3, gbr=True)
    cpu = torch.device("cpu")
    one = _measure_gbr(model, data, config, cpu, 0, 1)
    shards = [_measure_gbr(model, data, config, cpu, rank, 3) for rank in range(3)]
    assert one[0] == 40 and [sum(column) for column in zip(*shards)] == pytest.approx(one, rel=1e-9)
    assert _measure_gbr(model, data, config, cpu, 5, 6) == [0.0] * 5  # n, sum, sum of squares, spread, loss GBR


def test_two_process_sharding_gives_the_same_totals(trained, uninterrupted, tmp_path, torchrun):
    _, run, _ = trained
    single = uninterrupted
    out = tmp_path / "sharded.csv"
    torchrun("robust_enc.cli", ["attack", "--checkpoint", str(run), "--attack", "fgsm,pgd", "--eps", "4/255,16/255",
                                "--steps", "3", "--batch-size", "64", "--subset", "230", "--device", "cpu",
                                "--out", str(out)], timeout=240, cwd=REPO)
    sharded = read_results(out)
    assert measured(sharded) == measured(single)
    assert not list(tmp_path.glob("*.progress*"))


# ------------------------------------------------------------------------------------------------ command line
def test_cli_end_to_end_writes_readable_results(trained, tmp_path, capsys):
    _, run, _ = trained
    args = ["attack", "--checkpoint", str(run), "--attack", "fgsm,pgd", "--eps", "0,2/255,0.0314",
            "--steps", "3", "--subset", "100", "--device", "cpu", "--gbr"]
    assert main(args) == 0
    rows = read_results(run / "results.csv")
    assert [(r.attack, r.eps) for r in rows] == (
        [("none", 0.0)] + [(a, e) for a in ("fgsm", "pgd") for e in (0.0, 2 / 255, 0.0314)]
        + [("worst", e) for e in (0.0, 2 / 255, 0.0314)])
    for r in rows:
        assert r.run_id == "tiny-baseline" and r.model == "resnet_tiny" and r.regularizer == "baseline"
        assert r.dataset == "digits" and r.split == "test" and r.subset == 100 and r.n == 100
        assert len(r.checkpoint_hash) == 12 and r.art_version.startswith("1.20")
        assert r.weight_sq_norm == 12.5 and 0 < r.train_top1 <= 1
        assert r.gbr > 0 and r.gbr_stderr > 0 and r.gbr_output == "logits"
    assert "results appended" in capsys.readouterr().out
    assert main(args) == 0  # a rerun replaces its rows instead of duplicating them
    assert len(read_results(run / "results.csv")) == len(rows)


def _bad(capsys, args: list[str]) -> str:
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("robust-enc: error:"), err
    return err[0]


def test_bad_inputs_give_one_line_errors_and_no_rows(trained, tmp_path, capsys):
    _, run, _ = trained
    out = tmp_path / "bad.csv"
    common = ["attack", "--checkpoint", str(run), "--device", "cpu", "--out", str(out), "--subset", "50"]
    assert "outside [0, 1]" in _bad(capsys, common + ["--eps=-1/255"])
    assert "outside [0, 1]" in _bad(capsys, common + ["--eps", "8"])
    assert "bad eps" in _bad(capsys, common + ["--eps", "8/x"])
    assert "Did you mean 'pgd'" in _bad(capsys, common + ["--attack", "pgdd"])
    assert "--steps >= 1" in _bad(capsys, common + ["--attack", "pgd", "--steps", "0"])
    assert "--random-start" in _bad(capsys, common + ["--attack", "pgd", "--no-random-start", "--restarts", "3"])
    assert "5 classes" in _bad(capsys, common + ["--dataset", "synthetic:1x8x8:5:50"])
    assert "(1, 16, 16)" in _bad(capsys, common + ["--dataset", "synthetic:1x16x16:10:50"])
    empty = tmp_path / "empty" / "cls"
    empty.mkdir(parents=True)
    assert "cannot read image folder" in _bad(capsys, common + ["--dataset", f"folder:{empty.parent}"])
    assert "no checkpoint" in _bad(capsys, ["attack", "--checkpoint", str(tmp_path / "nope"), "--out", str(out)])
    assert not out.exists() and not list(tmp_path.glob("*.progress*"))


def test_a_data_set_of_only_unreadable_images_is_a_user_error_and_writes_no_rows(tmp_path, capsys):
    """The folder opens (the files have image names), every image fails to load in the runner's loop: one line,
    exit 2, no NaN rows and no progress file left behind."""
    root = tmp_path / "corrupt"
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            (root / cls / f"{i}.png").write_bytes(b"not a png")
    spec = ModelSpec("resnet_tiny", 2, (3, 224, 224), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    weights = tmp_path / "tiny3.pt"
    torch.save(build_model(spec).net.state_dict(), weights)
    out = tmp_path / "rows.csv"
    assert main(["attack", "--model", "resnet_tiny", "--weights", str(weights), "--dataset", f"folder:{root}",
                 "--attack", "fgsm,pgd", "--batch-size", "2", "--device", "cpu", "--gbr", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()  # progress lines (0/6 images), then the error
    assert err[-1].startswith("robust-enc: error: no readable image") and "all 6" in err[-1], err
    assert not any("error" in line for line in err[:-1])
    assert not out.exists() and not list(tmp_path.glob("*.progress*"))


def test_plain_weights_and_class_count_checks(trained, tmp_path, capsys):
    model, _, _ = trained
    weights = tmp_path / "tiny.pt"
    torch.save(model.net.state_dict(), weights)
    out = tmp_path / "w.csv"
    assert main(["attack", "--model", "resnet_tiny", "--weights", str(weights), "--dataset", "digits",
                 "--subset", "50", "--device", "cpu", "--out", str(out)]) == 0
    rows = read_results(out)
    assert rows[0].run_id == "tiny" and rows[0].clean_top1 > 0.8
    # apgd-dlr needs 3 classes: caught before the first batch
    two = tmp_path / "two.pt"
    spec = ModelSpec("resnet_tiny", 2, (1, 8, 8), (0.5,), (0.25,))
    torch.save(build_model(spec).net.state_dict(), two)
    capsys.readouterr()  # forget the progress lines of the run above
    assert "at least 3 classes" in _bad(capsys, ["attack", "--model", "resnet_tiny", "--weights", str(two),
                                                 "--dataset", "synthetic:1x8x8:2:20", "--attack", "apgd-dlr",
                                                 "--device", "cpu", "--out", str(tmp_path / "two.csv")])
    assert not (tmp_path / "two.csv").exists()


def test_parsers():
    assert parse_eps("2/255, 1/255,0.5,1/255") == (1 / 255, 2 / 255, 0.5)
    assert parse_eps("0.5,3", "l2") == (0.5, 3.0)  # RobustBench CIFAR and ImageNet L2 radii
    with pytest.raises(Exception, match="outside"):
        parse_eps("3")
    assert parse_attacks("fgsm, pgd") == ("fgsm", "pgd")
    assert parse_attacks("fgsm,aa") == ("fgsm", "autoattack")
    with pytest.raises(Exception, match="twice"):
        parse_attacks("pgd,pgd")
    with pytest.raises(Exception, match="not an attack"):
        parse_attacks("worst")


@pytest.mark.gpu
def test_gpu_matches_cpu(trained):
    model, _, _ = trained
    kwargs = dict(attacks=("fgsm", "pgd"), eps=(8 / 255,), steps=3, subset=128, random_start=False)
    cpu = evaluate_model(model, "digits", device="cpu", **kwargs)
    gpu = evaluate_model(model, "digits", device="cuda", **kwargs)
    for a, b in zip(cpu, gpu):
        assert abs(a.adv_top1 - b.adv_top1) <= 2 / 128
