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
from robust_enc.attacks.checks import RowStats, check_rows
from robust_enc.attacks.registry import ATTACKS, parse_attacks, parse_eps
from robust_enc.attacks.runner import AttackConfig, _measure_gbr, benchmark, evaluate
from robust_enc.checkpoint import save_checkpoint
from robust_enc.cli import main
from robust_enc.data import DatasetInfo, TensorImages, build_dataset, build_loader
from robust_enc.models import ModelSpec, build_model
from robust_enc.results import ResultRow, read_results

REPO = Path(__file__).resolve().parent.parent
MEASURED = ("n", "clean_top1", "clean_top5", "adv_top1", "adv_top5", "steps", "step_size", "restarts", "flags")


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
        x_art = art_adapter.generate(art_adapter.fgsm(classifier, eps=eps, norm="linf", batch_size=128),
                                     art_adapter.to_numpy_images(x), art_adapter.one_hot(y, 10))
        for reduction in ("mean", "sum"):  # the scale of the loss cannot change a sign
            xg = x.clone().requires_grad_(True)
            nn.functional.cross_entropy(model(xg), y, reduction=reduction).backward()
            x_torch = (x + eps * xg.grad.sign()).clamp(0, 1)
            assert np.array_equal(x_art, x_torch.numpy()), (eps, reduction)  # bit for bit, not just within 1 ulp
        assert (x_art != x.numpy()).any()


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_fgsm_sweep_equals_art_run_per_eps_bit_for_bit(trained, test_batch, norm):
    model, _, _ = trained
    x, y = test_batch
    classifier = art_adapter.build_classifier(model, num_classes=10, input_shape=(1, 8, 8), device=torch.device("cpu"))
    x_np, y_np = art_adapter.to_numpy_images(x), art_adapter.one_hot(y, 10)
    sweep = art_adapter.fgsm(classifier, eps=1.0, norm=norm, batch_size=128)
    direction = art_adapter.fgsm_direction(sweep, x_np, y_np)  # one gradient
    for eps in (0.5 / 255, 1 / 255, 2 / 255, 4 / 255, 8 / 255, 0.25, 1.0):
        x_sweep = art_adapter.fgsm_apply(sweep, direction, eps)
        x_art = art_adapter.generate(art_adapter.fgsm(classifier, eps=eps, norm=norm, batch_size=128), x_np, y_np)
        assert x_sweep.dtype == np.float32 and np.array_equal(x_sweep, x_art), (norm, eps)
    assert np.array_equal(art_adapter.fgsm_apply(sweep, direction, 0.0), x_np)
    assert not direction.zero_gradient.any()


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_pgd_stays_inside_ball_and_box(trained, test_batch, norm):
    model, _, _ = trained
    x, y = test_batch
    torch.manual_seed(0)
    np.random.seed(0)
    classifier = art_adapter.build_classifier(model, num_classes=10, input_shape=(1, 8, 8), device=torch.device("cpu"))
    eps = 8 / 255 if norm == "linf" else 0.5
    attack = art_adapter.pgd(classifier, eps=eps, norm=norm, steps=5, step_size=2.5 * eps / 5, random_inits=1,
                             batch_size=128)
    x_np = art_adapter.to_numpy_images(x)
    x_adv = art_adapter.generate(attack, x_np, art_adapter.one_hot(y, 10))
    delta = (x_adv - x_np).reshape(len(x_np), -1)
    size = np.abs(delta).max(1) if norm == "linf" else np.linalg.norm(delta, axis=1)
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
    rows = benchmark(model, "digits", attacks=("fgsm",), eps=(4 / 255,), subset=64, device="cpu")
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
    rows = benchmark(model, "digits", attacks=ATTACKS.names(), eps=eps, norm=norm, subset=64, steps=3,
                     batch_size=64, device="cpu")
    attacks = {r.attack for r in rows}
    assert attacks == {"none", "worst", *ATTACKS.names()}
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


def test_invariants_on_the_trained_model(trained):
    model, _, _ = trained
    eps = (0.0, 1 / 255, 4 / 255, 16 / 255, 64 / 255)
    rows = benchmark(model, "digits", attacks=("fgsm", "pgd"), eps=eps, steps=5, device="cpu", batch_size=128)
    by = {(r.attack, r.eps): r for r in rows}
    clean = by[("none", 0.0)]
    assert clean.n == 450 and clean.clean_top1 > 0.9
    for attack in ("fgsm", "pgd", "worst"):
        accuracies = [by[(attack, e)].adv_top1 for e in eps]
        assert accuracies[0] == clean.clean_top1  # eps 0 is the clean accuracy
        assert all(b <= a for a, b in zip(accuracies, accuracies[1:])), (attack, accuracies)  # non-increasing
    for e in eps:
        assert by[("pgd", e)].adv_top1 <= by[("fgsm", e)].adv_top1  # iterative not weaker than one step
        assert by[("worst", e)].adv_top1 == min(by[("pgd", e)].adv_top1, by[("fgsm", e)].adv_top1) or \
            by[("worst", e)].adv_top1 < min(by[("pgd", e)].adv_top1, by[("fgsm", e)].adv_top1)
    assert by[("pgd", 64 / 255)].adv_top1 < 0.5 * clean.clean_top1  # the attack does something
    assert by[("pgd", 4 / 255)].step_size == pytest.approx(2.5 * (4 / 255) / 5)
    assert all(r.flags == "" for r in rows), [r.flags for r in rows]
    assert all(r.images_per_s > 0 and r.wall_s > 0 for r in rows)
    assert math.isnan(clean.clean_top5)  # top-5 only with more than 10 classes


def test_seeded_run_is_reproducible_and_leaves_global_rng_alone(trained):
    model, _, _ = trained
    kwargs = dict(attacks=("pgd", "square"), eps=(16 / 255,), steps=4, subset=128, batch_size=64, device="cpu")
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    first = benchmark(model, "digits", seed=7, **kwargs)
    after = torch.rand(1)
    assert torch.equal(before, after)  # per-batch seeding is restored afterwards
    second = benchmark(model, "digits", seed=7, **kwargs)
    assert measured(first) == measured(second)


# ------------------------------------------------------------------------------------------------ checks
def test_checks_flag_each_failure():
    base = dict(run_id="r", model="m", regularizer="baseline", dataset="d", split="test", subset=0, n=100,
                clean_top1=0.9, norm="linf")
    rows = [
        ResultRow(attack="none", eps=0.0, adv_top1=0.9, **{**base, "norm": "none"}),
        ResultRow(attack="fgsm", eps=0.0, adv_top1=0.8, **base),  # eps 0 differs from clean
        ResultRow(attack="fgsm", eps=0.1, adv_top1=0.3, **base),
        ResultRow(attack="fgsm", eps=0.2, adv_top1=0.4, **base),  # increases with eps
        ResultRow(attack="pgd", eps=0.1, adv_top1=0.5, **base),  # weaker than FGSM
        ResultRow(attack="square", eps=0.1, adv_top1=0.1, **base),  # black box beats white box
    ]
    stats = [RowStats(), RowStats(), RowStats(max_perturbation=0.1 + 1e-5, attacked=90, zero_gradient=10, non_finite=2),
             RowStats(box_excess=1e-3, attacked=90), RowStats(iterative=True, attacked=90),
             RowStats(white_box=False, attacked=90)]
    flags = [r.flags for r in check_rows(rows, stats)]
    assert flags[0] == ""
    assert flags[1] == "eps0_differs_from_clean"
    assert "perturbation_exceeds_eps" in flags[2] and "zero_gradient=0.111" in flags[2] and "non_finite=2" in flags[2]
    assert "outside_box" in flags[3] and "accuracy_increases_with_eps" in flags[3]
    assert flags[4].startswith("iterative_weaker_than_fgsm")
    assert flags[5].startswith("black_box_stronger_than_white_box")
    # within tolerance: float32 overshoot of ~2e-9 is not a failure
    ok = check_rows(rows[:1] + rows[2:3], [RowStats(), RowStats(max_perturbation=0.1 + 2e-9, attacked=90)])
    assert ok[1].flags == ""
    # Without an fgsm row: the FGSM reference stands in, and ART's round trip is checked on every attack row.
    alone = check_rows([rows[0], rows[4], rows[5]],
                       [RowStats(), RowStats(iterative=True, attacked=90, fgsm_reference=0.2, roundtrip_checked=64,
                                             roundtrip_mismatch=3),
                        RowStats(white_box=False, attacked=90, fgsm_reference=0.2)])
    assert alone[1].flags == "eps0_differs_from_clean(art_predict=3/64);iterative_weaker_than_fgsm(fgsm=0.2000)"
    assert alone[2].flags == "black_box_stronger_than_white_box(white=0.5000)"  # PGD's row, not the FGSM reference
    square_only = check_rows([rows[0], rows[5]], [RowStats(), RowStats(white_box=False, attacked=90,
                                                                        fgsm_reference=0.2)])
    assert square_only[1].flags == ""  # one FGSM step is no yardstick for a 1,000-query black-box attack
    fine = check_rows([rows[0], rows[4]], [RowStats(), RowStats(iterative=True, attacked=90, fgsm_reference=0.6)])
    assert fine[1].flags == ""


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
    rows = benchmark(Softmaxed(model), "digits", attacks=("fgsm",), eps=(8 / 255,), subset=64, device="cpu")
    assert all("outputs_look_like_probabilities" in r.flags for r in rows)
    rows = benchmark(Quantized(model), "digits", attacks=("fgsm", "pgd"), eps=(8 / 255,), subset=64, steps=2,
                     random_start=False, device="cpu")
    by = {r.attack: r for r in rows}
    assert "zero_gradient=1.000" in by["fgsm"].flags and "zero_gradient=1.000" in by["pgd"].flags
    assert by["fgsm"].adv_top1 == by["fgsm"].clean_top1  # masked: the attack cannot move


def test_gradient_masking_is_flagged_without_fgsm_in_the_run(trained):
    """PGD's random start moves every input, so 'unchanged input' would never fire: the zero-gradient count comes
    from the clean gradient of every batch; the square attack is compared with the PGD run beside it."""
    model, _, _ = trained
    rows = benchmark(Quantized(model), "digits", attacks=("pgd",), eps=(8 / 255,), subset=64, steps=2,
                     random_start=True, device="cpu")
    assert "zero_gradient=1.000" in rows[1].flags
    rows = benchmark(Quantized(model), "digits", attacks=("square",), eps=(0.3,), subset=64, steps=20, device="cpu")
    assert "zero_gradient=1.000" in rows[1].flags and "black_box" not in rows[1].flags  # no white-box row to beat
    rows = benchmark(Quantized(model), "digits", attacks=("pgd", "square"), eps=(0.3,), subset=64, steps=20,
                     random_start=False, device="cpu")
    by = {r.attack: r for r in rows}
    assert by["square"].adv_top1 < by["pgd"].adv_top1  # square really got through the masked gradients
    assert "black_box_stronger_than_white_box" in by["square"].flags


def test_iterative_weaker_than_fgsm_is_flagged_without_fgsm_in_the_run(trained, caplog):
    model, _, _ = trained
    rows = benchmark(model, "digits", attacks=("pgd",), eps=(16 / 255,), subset=64, steps=1, step_size=1e-6,
                     random_start=False, device="cpu")  # a step size that cannot move: misconfigured PGD
    assert "iterative_weaker_than_fgsm" in rows[1].flags
    assert any("iterative_weaker_than_fgsm" in r.message and r.levelname == "WARNING" for r in caplog.records)
    rows = benchmark(model, "digits", attacks=("pgd",), eps=(16 / 255,), subset=64, steps=5, device="cpu")
    assert rows[1].flags == ""  # a sound PGD beats its FGSM reference


def test_eps0_check_compares_art_round_trip_with_clean_pass(trained):
    model, _, _ = trained
    rows = benchmark(Randomized(model), "digits", attacks=("fgsm",), eps=(0.0, 8 / 255), subset=64, device="cpu")
    assert all("eps0_differs_from_clean(art_predict=" in r.flags for r in rows[1:])
    rows = benchmark(model, "digits", attacks=("fgsm",), eps=(8 / 255,), subset=64, device="cpu")
    assert rows[1].flags == ""


# ------------------------------------------------------------------------------------------------ runner mechanics
def test_top5_with_many_classes():
    data, info = build_dataset("synthetic:1x8x8:20:96", "test")
    spec = ModelSpec("resnet_tiny", 20, (1, 8, 8), info.mean, info.std)
    rows = benchmark(build_model(spec).eval(), data, info=info, attacks=("fgsm",), eps=(8 / 255,), device="cpu")
    for r in rows:
        assert 0 <= r.adv_top5 <= r.clean_top5 <= 1 and r.adv_top1 <= r.adv_top5


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
    benchmark(model, counting, info=info, attacks=("fgsm",), eps=(4 / 255,), batch_size=50, device="cpu",
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
    assert parse_attacks("fgsm, pgd") == ("fgsm", "pgd")
    with pytest.raises(Exception, match="twice"):
        parse_attacks("pgd,pgd")
    with pytest.raises(Exception, match="not an attack"):
        parse_attacks("worst")


@pytest.mark.gpu
def test_gpu_matches_cpu(trained):
    model, _, _ = trained
    kwargs = dict(attacks=("fgsm", "pgd"), eps=(8 / 255,), steps=3, subset=128, random_start=False)
    cpu = benchmark(model, "digits", device="cpu", **kwargs)
    gpu = benchmark(model, "digits", device="cuda", **kwargs)
    for a, b in zip(cpu, gpu):
        assert abs(a.adv_top1 - b.adv_top1) <= 2 / 128


@pytest.mark.parametrize("random_inits", [0, 1])
def test_pgd_fast_path_equals_art_generate_bit_for_bit(trained, test_batch, random_inits):
    """pgd_generate skips ART's success-rate logging; it must not change a single bit (random start included)."""
    model, _, _ = trained
    x, y = test_batch
    classifier = art_adapter.build_classifier(model, num_classes=10, input_shape=(1, 8, 8), device=torch.device("cpu"))
    x_np, y_np = art_adapter.to_numpy_images(x), art_adapter.one_hot(y, 10)
    results = []
    for run in (art_adapter.generate, art_adapter.pgd_generate):
        attack = art_adapter.pgd(classifier, eps=8 / 255, norm="linf", steps=4, step_size=2.5 * (8 / 255) / 4,
                                 random_inits=random_inits, batch_size=128)
        np.random.seed(3)
        results.append(run(attack, x_np, y_np))
    assert np.array_equal(results[0], results[1])
    assert (results[0] != x_np).any()
