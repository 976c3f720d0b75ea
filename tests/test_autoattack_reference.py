"""The suite's ``autoattack`` against the reference AutoAttack (``pyautoattack``, Croce & Hein's code): the same
per-example verdicts on trained models, and the reference's success rule (any misclassified iterate, any wrong class)
on constructed models where ART's final-iterate, target-only rule differs."""

from __future__ import annotations

import functools
import math
from dataclasses import replace

import pytest
import torch
from torch import nn

from robust_enc.attacks import art_adapter
from robust_enc.attacks.autoattack import AutoAttack, MemoForward
from robust_enc.attacks.base import AttackSettings
from robust_enc.attacks.evaluation import evaluate_model
from robust_enc.data import build_dataset, build_loader
from robust_enc.images import DatasetInfo, TensorImages
from robust_enc.models import ModelSpec, frozen
from robust_enc.regularizers import build_model
from robust_enc.runtime.seeding import seed_everything

pyautoattack = pytest.importorskip("pyautoattack")
CPU = torch.device("cpu")
EPS = 8 / 255


@functools.cache  # tests share a model; each measures under ``frozen``, which restores it
def train(dataset: str, steps: int) -> tuple[nn.Module, DatasetInfo]:
    """resnet_tiny after ``steps`` SGD steps at batch 64 on the data set's train split."""
    torch.manual_seed(0)
    data, info = build_dataset(dataset, "train")
    model = build_model(ModelSpec("resnet_tiny", info.num_classes, info.input_shape, info.mean, info.std))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    done = 0
    while done < steps:
        for x, y in build_loader(data, batch_size=64, shuffle=True):
            loss = nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            done += 1
            if done == steps:
                break
    return model.eval(), info


def first_images(dataset: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    data, _ = build_dataset(dataset, "test", subset=n)
    return next(iter(build_loader(data, batch_size=n)))


def exact_one_sided_p(b: int, c: int) -> float:
    """P(X >= b), X ~ Binomial(b + c, 1/2): written out here, not the suite's checks.mcnemar_p."""
    n = b + c
    return sum(math.comb(n, k) for k in range(b, n + 1)) / 2**n if n else 1.0


# The per-example comparisons run both sides at the same shortened budgets (APGD and FAB iterations, Square queries),
# so that they fit in minutes on 2 cores; stages, targets, losses and success rules stay the standard version's.
STEPS, QUERIES = 25, 500


def shorten(reference) -> None:
    """The reference at the shortened budgets, with APGD's step-size checkpoints as its constructor derives them from
    the iterations (setting ``n_iter`` alone would keep those of 100 iterations)."""
    for apgd in (reference.apgd, reference.apgd_targeted):
        apgd.n_iter = STEPS
        apgd.n_iter_2, apgd.n_iter_min = max(int(0.22 * STEPS), 1), max(int(0.06 * STEPS), 1)
        apgd.size_decr = max(int(0.03 * STEPS), 1)
    reference.fab.n_iter = STEPS
    reference.square.n_queries = QUERIES


def reference_robust(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    """[N] robust flags of the reference's standard evaluation (one batch, seed 0) at the shortened budgets."""
    reference = pyautoattack.AutoAttack(model, norm="Linf", eps=eps, version="standard", seed=0, device="cpu")
    reference.verbose = False
    shorten(reference)
    x_adv, _ = reference.run_standard_evaluation(x, y, batch_size=len(x))
    with torch.no_grad():
        return (model(x).argmax(1) == y) & (model(x_adv).argmax(1) == y)


def suite_robust(model: nn.Module, x: torch.Tensor, y: torch.Tensor, info: DatasetInfo, eps: float,
                 batch_size: int) -> tuple[torch.Tensor, list]:
    """[N] robust flags of the suite's ``autoattack`` run (its own batching and seeds), from the adversarial images
    it counted (recorded on their way out of the attack)."""
    flags = torch.zeros(len(x), dtype=torch.bool)
    seen: list[torch.Tensor] = []
    original = AutoAttack.adversarial

    def recording(self, e):
        x_adv = original(self, e)
        with torch.no_grad():
            seen.append((model(x_adv).argmax(1) == self.y, self.x))
        return x_adv

    AutoAttack.adversarial = recording
    budgets = AutoAttack.FAB_STEPS, AutoAttack.SQUARE_QUERIES
    AutoAttack.FAB_STEPS, AutoAttack.SQUARE_QUERIES = STEPS, QUERIES
    try:
        rows = evaluate_model(model, TensorImages(x, y), info=replace(info, size=len(x), subset=len(x)),
                              attacks=("autoattack",), eps=(eps,), steps=STEPS, batch_size=batch_size,
                              device="cpu", checkpoint_hash="test")
    finally:
        AutoAttack.adversarial = original
        AutoAttack.FAB_STEPS, AutoAttack.SQUARE_QUERIES = budgets
    for ok, xs in seen:  # attacked rows are the clean-right ones; find each by its pixels
        for flag, image in zip(ok, xs):
            flags[(x.flatten(1) == image.flatten()).all(1).nonzero()[0]] = flag
    return flags, rows


def compare(model: nn.Module, x: torch.Tensor, y: torch.Tensor, info: DatasetInfo, eps: float) -> tuple[int, int]:
    suite, rows = suite_robust(model, x, y, info, eps, batch_size=16)
    reference = reference_robust(model, x, y, eps)
    assert rows[1].adv_top1 == pytest.approx(float(suite.float().mean()))  # the row counts what was recorded
    assert 0 < int(reference.sum()) < int((model(x).argmax(1) == y).sum())  # robust and broken examples both exist
    suite_only, reference_only = int((suite & ~reference).sum()), int((reference & ~suite).sum())
    assert exact_one_sided_p(suite_only, reference_only) >= 0.01, (suite_only, reference_only)
    assert not rows[1].flags
    return suite_only, reference_only


@pytest.mark.slow
@pytest.mark.numerics
def test_per_example_like_the_reference_on_digits():
    """32 digits test images of a briefly trained resnet_tiny at 16/255 (at 8/255 all 32 stay robust): the examples
    the suite calls robust and the reference breaks are not significantly more than the reverse (exact one-sided
    McNemar, p >= 0.01)."""
    model, info = train("digits", 150)
    x, y = first_images("digits", 32)
    with frozen(model):
        compare(model, x, y, info, 2 * EPS)


@pytest.mark.slow
@pytest.mark.numerics
def test_per_example_like_the_reference_on_fashion_mnist():
    """The same on 32 real Fashion-MNIST test images of resnet_tiny trained 200 steps, at 2/255 (some robust)."""
    model, info = train("fashion-mnist", 200)
    x, y = first_images("fashion-mnist", 32)
    with frozen(model):
        compare(model, x, y, info, 2 / 255)


@pytest.mark.slow
@pytest.mark.numerics
def test_per_example_at_least_as_strong_as_torchattacks():
    """torchattacks' independent port of the standard AutoAttack (its own APGD-CE, APGD-T, FAB-T and Square, at its
    defaults) on the same 32 digits images at 16/255: the examples the suite calls robust and torchattacks breaks are
    not significantly more than the reverse (exact one-sided McNemar, p >= 0.01: a 1% false alarm rate when the two
    are equally strong)."""
    torchattacks = pytest.importorskip("torchattacks")
    model, info = train("digits", 150)
    x, y = first_images("digits", 32)
    with frozen(model):
        suite, rows = suite_robust(model, x, y, info, 2 * EPS, batch_size=16)
        other = torchattacks.AutoAttack(model, norm="Linf", eps=2 * EPS, version="standard", n_classes=10, seed=0)
        x_adv = other(x, y)
        theirs = (model(x).argmax(1) == y) & (model(x_adv).argmax(1) == y)
    assert 0 < int(theirs.sum()) < len(y) and not rows[1].flags  # robust and broken examples both exist
    suite_only, theirs_only = int((suite & ~theirs).sum()), int((theirs & ~suite).sum())
    assert exact_one_sided_p(suite_only, theirs_only) >= 0.01, (suite_only, theirs_only)


@pytest.mark.slow
@pytest.mark.numerics
def test_same_seeds_and_one_batch_give_the_reference_images_bit_for_bit(monkeypatch):
    """With every stage seeded 0 (the reference seeds every attack with its one seed) and the batch holding all the
    images, the suite's cascade (stage order, subsetting to the still-robust examples, targets, budgets, the memoized
    Square) returns the reference's adversarial images bit for bit (both at the shortened budgets)."""
    model, info = train("digits", 150)
    x, y = first_images("digits", 32)
    monkeypatch.setattr(AutoAttack, "SQUARE_QUERIES", QUERIES)
    monkeypatch.setattr(AutoAttack, "FAB_STEPS", STEPS)
    with frozen(model):
        right = model(x).argmax(1) == y
        plan = AutoAttack.plan("autoattack", AttackSettings(steps=STEPS), 10)
        classifier = art_adapter.build_classifier(model, num_classes=10, input_shape=info.input_shape, device=CPU)
        cascade = AutoAttack(classifier, (2 * EPS,), plan, len(x), lambda eps, stage: seed_everything(0), 10)
        cascade.set_batch(x[right], y[right])
        ours = cascade.adversarial(2 * EPS)  # at 8/255 all 32 stay robust
        reference = pyautoattack.AutoAttack(model, norm="Linf", eps=2 * EPS, version="standard", seed=0, device="cpu")
        reference.verbose = False
        shorten(reference)
        theirs, _ = reference.run_standard_evaluation(x, y, batch_size=len(x))
        assert torch.equal(ours, theirs[right])
        robust = model(ours).argmax(1) == y[right]
        assert 0 < int(robust.sum()) < len(robust)


def test_square_memo_changes_no_image_and_forwards_fewer_rows():
    """The reference's Square on the memoized forward: the same adversarial images as on the bare model, with fewer
    rows forwarded (the memo answers the final check of the best images and candidates that the ball and the box
    clip back onto the current image). The model runs row by row (``RowByRow``: a row's logits are the same bits in
    any batch), so any difference is the memo's. At 64/255 Square fools most of the images within 200 queries (about
20 of 24 here), so the images compared are mostly adversarial ones, far above the check's 6."""
    from pyautoattack.square import SquareAttack
    from test_square_memo import RowByRow

    trained, _ = train("digits", 150)
    model = RowByRow(trained).eval()
    x, y = first_images("digits", 24)
    counted = []

    def bare(images: torch.Tensor) -> torch.Tensor:
        counted.append(len(images))
        with torch.no_grad():
            return model(images)

    outputs = []
    with frozen(model):
        memo = MemoForward(model, CPU)
        for forward in (bare, memo):
            square = SquareAttack(forward, p_init=0.8, n_queries=200, eps=64 / 255, norm="Linf", n_restarts=1,
                                  seed=0, verbose=False, device=CPU, resc_schedule=False)
            outputs.append(square.perturb(x, y))
    assert torch.equal(outputs[0], outputs[1])
    assert int((outputs[0] != x).flatten(1).any(1).sum()) >= 6, "Square fooled too few images to compare"
    assert 0 < memo.forwarded < sum(counted)


class Constructed(nn.Module):
    """10 classes on 1x8x8 images around x0 = 128/255 (class 0), with logits of a few means of x - x0 in eps units.

    ``corner``: a and b, the means over the top and the bottom half. Class 1 wins only in the corner a, b > 0.9;
    elsewhere class 0, and classes 2-9 share c = -1 + 0.45 a + 1.8 (b - b^2), whose cross-entropy gradient points
    to a = b = 1 from the start (APGD's first step of 2 eps lands in the corner: misclassified) and then drives b
    back to 0.5, where the loss is higher than in the corner and class 0 wins: fooled mid-run, right at the end.
    Otherwise s = mean(x - x0):
    ``off_target``: cross-entropy ascent lowers s and never flips the label, the targeted DLR loss towards class 1
    raises it, and beyond s > 0.5 eps class 5 (the last target) wins: APGD-T misclassifies into a non-target class."""

    def __init__(self, mode: str, eps: float) -> None:
        super().__init__()
        self.mode, self.eps = mode, eps
        self.register_buffer("anchor", torch.tensor(1.0))  # a parameter-free module still needs a device

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        delta = (x - 128 / 255).flatten(1) / self.eps
        s = delta.mean(1)
        z = torch.full((len(x), 10), -1.0) * self.anchor
        if self.mode == "corner":
            a, b = delta[:, :32].mean(1), delta[:, 32:].mean(1)
            z[:, 0] = 0
            z[:, 1] = -5 + 5.01 * ((a > 0.9) & (b > 0.9)).float()
            z[:, 2:] = (-1 + 0.45 * a + 1.8 * (b - b * b))[:, None]
        else:
            z[:, 0] = 0
            z[:, 1] = -0.5 + 0.1 * s
            z[:, 2] = -0.6 + 0.5 * (1 - torch.exp(s))
            z[:, 5] = -5 + 10 * (s > 0.5).float()
        return z


def constructed_run(mode: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor, list]:
    model = Constructed(mode, EPS)
    x, y = torch.full((4, 1, 8, 8), 128 / 255), torch.zeros(4, dtype=torch.long)
    info = DatasetInfo("constructed", "test", 10, (1, 8, 8), (0.5,), (0.5,), 4, 4)
    rows = evaluate_model(model, TensorImages(x, y), info=info, attacks=("autoattack",), eps=(EPS,), device="cpu",
                          checkpoint_hash="constructed")
    return model, x, y, rows


def test_an_example_fooled_mid_run_and_recovered_at_the_end_counts_as_broken():
    """The corner model: APGD-CE's first iterate is misclassified, its last is right. The suite counts all four
    examples broken; ART's APGD-CE, judged on its final iterate as the old cascade did, returns images the model
    classifies right (its random start when the last iterate fails)."""
    model, x, y, rows = constructed_run("corner")
    assert rows[0].clean_top1 == 1.0 and rows[1].adv_top1 == 0.0
    classifier = art_adapter.build_classifier(model, num_classes=10, input_shape=(1, 8, 8), device=CPU)
    seed_everything(0)
    art = art_adapter.apgd(classifier, eps=EPS, norm="linf", steps=100, step_size=2 * EPS, restarts=1,
                           batch_size=4, loss_type="cross_entropy")
    final = art_adapter.generate(art, x, y, 10)
    assert (model(final).argmax(1) == 0).all()  # robust by the final-iterate rule


def test_misclassification_into_a_non_target_class_counts_as_broken():
    """The off-target model: APGD-CE cannot flip it, APGD-T towards class 1 lands in class 5; the suite counts every
    example broken (a target-only rule would not)."""
    model, x, y, rows = constructed_run("off_target")
    assert rows[0].clean_top1 == 1.0 and rows[1].adv_top1 == 0.0
    from pyautoattack.autopgd_base import APGDAttack

    ce = APGDAttack(model, n_iter=100, eps=EPS, norm="Linf", seed=0, loss="ce", device=CPU)
    assert (model(ce.perturb(x, y)).argmax(1) == 0).all()  # APGD-CE alone leaves them right
    cascade_images = []
    original = AutoAttack.adversarial
    try:
        AutoAttack.adversarial = lambda self, e: cascade_images.append(original(self, e)) or cascade_images[-1]
        evaluate_model(model, TensorImages(x, y), info=DatasetInfo("constructed", "test", 10, (1, 8, 8), (0.5,),
                                                                   (0.5,), 4, 4),
                       attacks=("autoattack",), eps=(EPS,), device="cpu", checkpoint_hash="constructed")
    finally:
        AutoAttack.adversarial = original
    assert (model(cascade_images[0]).argmax(1) == 5).all()  # not the target (class 1): another wrong class
