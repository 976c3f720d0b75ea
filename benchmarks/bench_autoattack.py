"""The suite's ``autoattack`` against the reference AutoAttack (``pyautoattack``, Croce & Hein's code), side by side
on one model and one image set: seconds, robust top-1 and the per-example verdicts.

Both run the standard version (APGD-CE, APGD-T and FAB-T with 9 targets each, Square with 5,000 queries), each stage
on the examples still robust. The suite runs through ``evaluate_model`` (its batching, seeding, checks and the
memoized Square); the reference through ``run_standard_evaluation`` with all images in one batch. The two draw other
random starts (the suite seeds per batch, eps and stage), so single examples may differ both ways; the exact one-sided
McNemar p says whether the suite leaves significantly more robust than the reference.

    .venv/bin/python -m benchmarks.bench_autoattack             # writes BENCHMARKS.md's autoattack section
    .venv/bin/python -m benchmarks.bench_autoattack --n 40 --no-write
"""

from __future__ import annotations

import argparse
import time
from contextlib import contextmanager

import torch
from torch import nn

from benchmarks._common import machine, write_section
from robust_enc.attacks import evaluate_model
from robust_enc.attacks.autoattack import AutoAttack
from robust_enc.attacks.checks import mcnemar_p
from robust_enc.data import build_dataset, build_loader
from robust_enc.models import ModelSpec, frozen
from robust_enc.regularizers import build_model

EPS = 8 / 255


def train_digits(epochs: int = 15) -> tuple[nn.Module, float]:
    """resnet_tiny on digits, 15 epochs at batch 64, lr 0.05 (~95% test top-1): (model, seconds)."""
    torch.manual_seed(0)
    data, info = build_dataset("digits", "train")
    model = build_model(ModelSpec("resnet_tiny", 10, info.input_shape, info.mean, info.std))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    start = time.perf_counter()
    for _ in range(epochs):
        model.train()
        for x, y in build_loader(data, batch_size=64, shuffle=True):
            loss = nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval(), time.perf_counter() - start


def reference_robust(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    """[N] robust flags of the reference's standard evaluation (seed 0, one batch): right clean and under attack."""
    from pyautoattack import AutoAttack as ReferenceAutoAttack

    reference = ReferenceAutoAttack(model, norm="Linf", eps=eps, version="standard", seed=0, device="cpu")
    reference.verbose = False
    x_adv, _ = reference.run_standard_evaluation(x, y, batch_size=len(x))
    with torch.no_grad():
        return (model(x).argmax(1) == y) & (model(x_adv).argmax(1) == y)


@contextmanager
def recording_verdicts(model: nn.Module, x: torch.Tensor, verdicts: torch.Tensor):
    """Sets ``verdicts[i]`` for every image the suite's cascade attacks (found by its pixels), from the adversarial
    image it returns: the suite's rows give only totals, the comparison needs each example."""
    original = AutoAttack.adversarial

    def recording(self: AutoAttack, eps: float) -> torch.Tensor:
        x_adv = original(self, eps)
        with torch.no_grad():
            robust = model(x_adv).argmax(1) == self.y
        for flag, image in zip(robust, self.x):
            verdicts[(x.flatten(1) == image.flatten()).all(1).nonzero()[0]] = flag
        return x_adv

    AutoAttack.adversarial = recording
    try:
        yield
    finally:
        AutoAttack.adversarial = original


def run(args: argparse.Namespace) -> str:
    torch.set_num_threads(args.threads)
    model, train_s = train_digits()
    data, info = build_dataset("digits", "test", subset=args.n)
    x, y = next(iter(build_loader(data, batch_size=len(data))))  # a subset is a torch Subset (no .x)
    suite = torch.zeros(len(x), dtype=torch.bool)  # wrong clean: never attacked, not robust
    with frozen(model):
        clean = float((model(x).argmax(1) == y).float().mean())
        start = time.perf_counter()
        with recording_verdicts(model, x, suite):
            rows = evaluate_model(model, data, info=info, attacks=("autoattack",), eps=(EPS,),
                                  batch_size=args.batch_size, device="cpu", checkpoint_hash="bench")
        suite_s = time.perf_counter() - start
        start = time.perf_counter()
        reference = reference_robust(model, x, y, EPS)
        reference_s = time.perf_counter() - start
    assert round(rows[1].adv_top1 * rows[1].n) == int(suite.sum()), "the recorded verdicts are not the row's count"
    suite_only, reference_only = int((suite & ~reference).sum()), int((reference & ~suite).sum())
    return "\n".join([
        "## autoattack: the suite's `autoattack` against the reference AutoAttack",
        "",
        f"Machine: {machine()}; device cpu. `benchmarks/bench_autoattack.py --n {args.n} --batch-size "
        f"{args.batch_size} --threads {args.threads}`. One run of each, one after the other (the study and other jobs "
        "paused): read the ratio with ~15% jitter.",
        "",
        f"resnet_tiny trained 15 epochs on digits ({train_s:.0f} s), the first {args.n} test images of the "
        f"class-balanced subset, L-inf eps 8/255, clean top-1 {clean:.1%}. Both run APGD-CE, APGD-T (9 targets), "
        "FAB-T (9 targets) and Square (5,000 queries), each on the examples still robust; robust top-1: right "
        "clean and under the attack (per example).",
        "",
        "| evaluation | seconds | vs the reference | robust top-1 | sanity flags |",
        "|---|---:|---:|---:|---|",
        f"| suite: `autoattack` (batch {args.batch_size}) | {suite_s:.1f} | {suite_s / reference_s:.2f}x | "
        f"{rows[1].adv_top1:.1%} | {rows[1].flags or 'none'} |",
        f"| reference: `pyautoattack.AutoAttack` (standard, one batch) | {reference_s:.1f} | 1.00x | "
        f"{int(reference.sum()) / len(reference):.1%} | |",
        "",
        f"Per example: {suite_only} robust for the suite only, {reference_only} for the reference only (exact "
        f"one-sided McNemar p = {mcnemar_p(suite_only, reference_only):.3g} that the suite is weaker).",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100, help="digits test images")
    parser.add_argument("--batch-size", type=int, default=100, help="the suite's batch size")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-write", action="store_true", help="print instead of writing BENCHMARKS.md")
    args = parser.parse_args()
    text = run(args)
    print(text)
    if not args.no_write:
        write_section("autoattack", text)


if __name__ == "__main__":
    main()
