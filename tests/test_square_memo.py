"""Square's memoized predict (``art_adapter.RowMemo``): the same logits as ART's own ``PyTorchClassifier.predict``,
one forward pass per distinct row, the same attack results, bounded memory. Real ART attacks on resnet_tiny (digits)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from art.attacks.evasion import SquareAttack
from torch import nn

from robust_enc.attacks import art_adapter
from robust_enc.attacks.autoattack import MemoForward
from robust_enc.attacks.evaluation import evaluate_model
from robust_enc.attacks.registry import ATTACKS, AttackSettings, AutoAttack
from robust_enc.data import build_dataset, build_loader
from robust_enc.models import ModelSpec, frozen
from robust_enc.regularizers import build_model
from robust_enc.runtime.seeding import seed_everything, seed_for

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def model() -> nn.Module:
    """resnet_tiny after 7 epochs (147 SGD steps) on digits: most test images right, some robust at 16/255."""
    torch.manual_seed(0)
    data, info = build_dataset("digits", "train")
    net = build_model(ModelSpec("resnet_tiny", info.num_classes, info.input_shape, info.mean, info.std))
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    for _ in range(7):  # 7 epochs of 21 steps
        for x, y in build_loader(data, batch_size=64, shuffle=True):
            loss = nn.functional.cross_entropy(net(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return net.eval()


class RowByRow(nn.Module):
    """``model`` applied to one row at a time: each row's logits are then the same bits whatever batch it arrives in.

    What the memo guarantees: for every row, the logits of a forward pass of that row (the first call that saw it).
    ART's own predict forwards the same row beside other rows; in float32 a CPU kernel may pick another algorithm or
    blocking for another batch size and change the last bits of a row's logits, and an attack comparing two nearly
    equal losses may then go another way (which rows share a batch differs on every machine and thread count). So
    bit-for-bit equality with ART is claimed, and tested, for a model whose per-row logits do not depend on the batch;
    with a batch-dependent model the memo is exact up to that float32 rounding."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.model(row[None]) for row in x])


@pytest.fixture(scope="module")
def row_model(model) -> nn.Module:
    return RowByRow(model).eval()


@pytest.fixture(scope="module")
def images() -> tuple[torch.Tensor, torch.Tensor]:
    data, _ = build_dataset("digits", "test")
    return data.x[:64], data.y[:64]


@contextlib.contextmanager
def count_forward_rows(model: nn.Module) -> Iterator[dict[str, int]]:
    """Rows through ``model``'s forward (a hook, independent of the memo's own bookkeeping)."""
    rows = {"n": 0}
    handle = model.register_forward_pre_hook(lambda module, args: rows.__setitem__("n", rows["n"] + len(args[0])))
    try:
        yield rows
    finally:
        handle.remove()


def test_memo_predict_equals_art_predict_on_repeated_new_and_odd_layout_rows(row_model, images):
    """Against ART's own predict on the same rows, bit for bit (a row-by-row model: see ``RowByRow``): a first call,
    a call mixing seen rows, new rows and duplicates, a strided and a Fortran-ordered view (hits: same values), float64
    rows (ART's predict wants float32; the memo hashes the float32 the model sees). The model starts in train mode:
    ART's predict sets eval mode, so must the memo's. Only distinct new rows reach the model."""
    model = row_model
    x = art_adapter.to_numpy_images(images[0])
    art = art_adapter.build_classifier(model, num_classes=10, input_shape=(1, 8, 8), device=CPU)
    memo = art_adapter.build_classifier(model, num_classes=10, input_shape=(1, 8, 8), device=CPU, memo=True)
    model.train()
    reference = art.predict(x, batch_size=16)  # ART leaves the model in eval mode
    model.train()
    calls = [(x[:20], 20), (np.concatenate([x[25:30], x[10:30], x[25:30]]), 10),  # 10 seen + 10 new, 5 twice
             (x[:30:2], 0), (np.asfortranarray(x[:8]), 0), (x[30:40].astype(np.float64), 10)]
    for batch, new in calls:
        with count_forward_rows(model) as rows:
            logits = memo.predict(batch, batch_size=16)
        assert rows["n"] == new
        expected = art.predict(np.ascontiguousarray(batch, dtype=np.float32), batch_size=16)
        assert logits.dtype == np.float32 and logits.shape == expected.shape
        np.testing.assert_array_equal(logits, expected)
    np.testing.assert_array_equal(memo.predict(x, batch_size=16), reference)
    assert not model.training


@pytest.mark.filterwarnings("ignore:.*encountered in divide:RuntimeWarning")  # ART's L2 Square on 8x8 images
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_square_forwards_only_new_candidates_and_returns_arts_images(row_model, images, norm):
    """One 50-query Square run. Each query asks for every image's prediction, the current images' loss and the
    candidates' loss; only the first call and the candidates may reach the model, and a candidate call forwards at
    least its never-seen rows and at most its rows that are not a current image. ART's own predict forwards all
    N + 2R rows a query; the adversarial images are the same bit for bit (same seed, a row-by-row model: the same
    logits per row, see ``RowByRow``)."""
    model = row_model
    x, y = images
    eps = 16 / 255 if norm == "linf" else 1.0
    classifier = art_adapter.build_classifier(model, num_classes=10, input_shape=(1, 8, 8), device=CPU)
    results = {}
    with frozen(model), count_forward_rows(model) as rows:
        for memo in (True, False):
            attack = art_adapter.square(classifier, eps=eps, norm=norm, steps=50, restarts=1, batch_size=64)
            if not memo:  # ART's own predict
                attack = SquareAttack(classifier, norm=art_adapter.art_norm(norm), max_iter=50, eps=eps, p_init=0.8,
                                      batch_size=64, verbose=False)
            calls: list[tuple[set[bytes], int]] = []  # (distinct rows asked, rows forwarded) per predict call

            def recording(x, *args, predict=attack.estimator.predict, calls=calls, **kwargs):
                before = rows["n"]
                out = predict(x, *args, **kwargs)
                calls.append(({row.tobytes() for row in np.asarray(x, dtype=np.float32)}, rows["n"] - before))
                return out

            attack.estimator.predict = recording
            seed_everything(3)
            results[memo] = (art_adapter.generate(attack, x, y, 10), calls)
    (x_memo, calls), (x_art, art_calls) = results[True], results[False]
    assert len(calls) == 3 * 51 and calls[0][1] == len(x)
    seen = set(calls[0][0])
    for i, (asked, forwarded) in enumerate(calls[1:], 1):
        if i % 3 != 2:  # every image's prediction, the current images' loss: asked before
            assert forwarded == 0 and asked <= seen, i
        else:  # the candidates: the current images are the rows of the call before
            assert len(asked - seen) <= forwarded <= len(asked - calls[i - 2][0]), i
        seen |= asked
    forwarded = sum(n for _, n in calls)
    assert forwarded == len(x) + sum(n for i, (_, n) in enumerate(calls) if i % 3 == 2)
    assert forwarded < sum(n for _, n in art_calls) / 2
    assert torch.equal(x_memo, x_art) and (x_memo != x).any()


def test_autoattack_cascade_with_the_memo_equals_the_one_without(row_model, images, monkeypatch):
    """The whole cascade (APGD-CE, 9 APGD-T, 9 FAB-T, Square; shortened to 10 iterations and 200 queries) on 64
    images at 16/255, same seeds: the same adversarial images bit for bit, so the same per-example robustness, as
    with the bare model as Square's forward. The model runs row by row (``RowByRow``): the memo's logits for a row
    come from a forward pass beside other rows than the bare model's would, which on a batch-dependent float32 model
    may change their last bits; here they cannot, so any difference is the memo's."""
    model = row_model
    x, y = images
    eps = 16 / 255
    monkeypatch.setattr(AutoAttack, "SQUARE_QUERIES", 200)
    monkeypatch.setattr(AutoAttack, "FAB_STEPS", 10)
    plan = ATTACKS.get("autoattack").plan("autoattack", AttackSettings(steps=10), 10)
    outputs = []
    with frozen(model):
        for memo in (True, False):
            if not memo:  # Square on the bare model: every row it asks for is forwarded
                monkeypatch.setattr(MemoForward, "__call__", lambda self, images: torch.no_grad()(self.model)(images))
            classifier = art_adapter.build_classifier(model, num_classes=10, input_shape=(1, 8, 8), device=CPU)
            cascade = AutoAttack(classifier, (eps,), plan, 64, lambda e, name: seed_everything(
                seed_for(0, 0, f"autoattack{name}", e)), 10)
            cascade.set_batch(x, y)
            x_adv = cascade.adversarial(eps)
            outputs.append((x_adv, model(x_adv).argmax(1) == y))
    (x_memo, robust_memo), (x_art, robust_art) = outputs
    assert torch.equal(robust_memo, robust_art) and torch.equal(x_memo, x_art)
    assert 0 < int(robust_memo.sum()) < int((model(x).argmax(1) == y).sum())  # Square ran, the cascade broke some


def test_the_memo_stays_bounded_and_is_emptied_after_every_attack_call(model, monkeypatch):
    """Three batches of 32 under Square: no memo ever holds more than twice the largest call's rows, and each is
    empty once its ``generate`` returns, so nothing carries over to the next batch or model."""
    sizes: list[int] = []
    memos: list[art_adapter.RowMemo] = []
    predict = art_adapter.RowMemo.predict

    def recording(self, x, forward):
        out = predict(self, x, forward)
        sizes.append(len(self.logits))
        memos.append(self)
        return out

    monkeypatch.setattr(art_adapter.RowMemo, "predict", recording)
    rows = evaluate_model(model, "digits", attacks=("square",), eps=(16 / 255,), steps=40, subset=96, batch_size=32,
                          device="cpu")
    assert rows[0].n == 96 and rows[1].adv_top1 < rows[0].clean_top1
    assert len(sizes) > 3 * 40 and 0 < max(sizes) <= 2 * 32
    assert all(not memo.logits for memo in memos)
