"""GBR cost and accuracy: exact (one backward per class) vs the Hutchinson estimator (k Rademacher probes).

ResNet-20 on Fashion-MNIST (10 classes, exact available) and ResNet-18 on synthetic 64x64 images with 1,000 classes
(exact would take 1,000 backward passes per batch: extrapolated from the per-probe cost). Writes the 'gbr' section of
BENCHMARKS.md.

    .venv/bin/python -m benchmarks.bench_gbr [--n 1000] [--seeds 3] [--device cpu]
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import statistics
import time

import torch
import torch.nn.functional as F

from benchmarks._common import machine, write_section
from robust_enc.data import build_dataset, build_loader
from robust_enc.gbr import GBRResult, measure_gbr
from robust_enc.models import ModelSpec
from robust_enc.regularizers import build_model

log = logging.getLogger("bench_gbr")


def load_batches(name: str, split: str, n: int, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The whole subset in memory, so the timings are GBR only, not data loading."""
    dataset, _ = build_dataset(name, split, subset=n)
    return list(build_loader(dataset, batch_size=batch_size))


def brief_training(model: torch.nn.Module, steps: int, batch_size: int) -> None:
    """A few SGD steps on Fashion-MNIST train, so the model (and its GBR) is not the random-init one."""
    if steps <= 0:
        return
    dataset, _ = build_dataset("fashion-mnist", "train", subset=steps * batch_size)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    model.train()
    for x, y in build_loader(dataset, batch_size=batch_size, shuffle=True):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()


def timed(fn) -> tuple[GBRResult, float]:
    t0 = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - t0


def interleaved(model: torch.nn.Module, batches: list, settings: list[tuple[str, int]], seeds: int,
                device: torch.device) -> dict[tuple[str, int], list[tuple[GBRResult, float]]]:
    """Every (method, probes) setting once per seed, round-robin: on a shared CPU the load drifts, and interleaving
    spreads that drift over all settings instead of biasing the ratios."""
    runs: dict[tuple[str, int], list[tuple[GBRResult, float]]] = {setting: [] for setting in settings}
    for seed in range(seeds):
        for method, k in settings:
            runs[(method, k)].append(timed(lambda: measure_gbr(model, batches, method=method, probes=k, seed=seed,
                                                               device=device)))
            log.info("%s k=%d seed %d: %.2f s", method, k, seed, runs[(method, k)][-1][1])
    return runs


def row(label: str, seconds: float, rel_err: float | None, results: list[GBRResult], speedup: float | None) -> str:
    rel_se = statistics.mean(r.rel_stderr for r in results)
    per_time = rel_se * math.sqrt(seconds)
    err = "-" if rel_err is None else f"{100 * rel_err:.2f}%"
    ratio = "-" if speedup is None else f"{speedup:.2f}x"
    mean = statistics.mean(r.mean for r in results)
    return (f"| {label} | {seconds:.2f} | {ratio} | {mean:.4g} | {err} | {100 * rel_se:.2f}% | "
            f"{100 * per_time:.2f} |")


def bench_resnet20(args: argparse.Namespace, device: torch.device) -> list[str]:
    torch.manual_seed(0)
    model = build_model(ModelSpec("resnet20", 10, (1, 28, 28), (0.2860,), (0.3530,)))
    brief_training(model, args.train_steps, args.batch_size)
    batches = load_batches("fashion-mnist", "test", args.n, args.batch_size)
    measure_gbr(model, batches[:1], device=device)  # warm-up: allocator, kernels
    settings = [("exact", 1)] + [("hutchinson", k) for k in args.probes]
    runs = interleaved(model, batches, settings, args.seeds, device)
    exact_s = statistics.median(t for _, t in runs[settings[0]])
    exact = runs[settings[0]][0][0]  # exact is deterministic: every seed gives the same number
    lines = [row("exact (10 backward)", exact_s, 0.0, [exact], 1.0)]
    for setting in settings[1:]:
        seconds = statistics.median(t for _, t in runs[setting])
        rel_err = statistics.mean(abs(r.mean - exact.mean) / exact.mean for r, _ in runs[setting])
        lines.append(row(f"hutchinson k={setting[1]}", seconds, rel_err, [r for r, _ in runs[setting]],
                         exact_s / seconds))
    return lines


def bench_imagenet_classes(args: argparse.Namespace, device: torch.device) -> list[str]:
    torch.manual_seed(0)
    name = f"synthetic:3x64x64:1000:{args.big_n}"
    model = build_model(ModelSpec("resnet18", 1000, (3, 64, 64), (0.5,) * 3, (0.25,) * 3)).eval()
    batches = load_batches(name, "test", 0, args.batch_size // 2)
    measure_gbr(model, [(batches[0][0][:4], batches[0][1][:4])], method="hutchinson", probes=1, device=device)
    settings = [("hutchinson", 1), ("hutchinson", 4)]
    runs = interleaved(model, batches, settings, args.seeds, device)
    times = {k: statistics.median(t for _, t in runs[(m, k)]) for m, k in settings}
    results = {k: [r for r, _ in runs[(m, k)]] for m, k in settings}
    # Exact = one forward + 1,000 backward passes: extrapolate from the cost of 3 extra probes (if load noise makes
    # k=4 look no slower than k=1, fall back to a backward costing a fifth of the k=4 run: fwd + 4 bwd, bwd >= fwd).
    per_backward = (times[4] - times[1]) / 3 if times[4] > times[1] else times[4] / 5
    exact_s = times[1] + 999 * per_backward
    lines = [f"| exact (1,000 backward), extrapolated | ~{exact_s:.0f} | 1.00x | - | - | - | - |"]
    for k in (1, 4):
        lines.append(row(f"hutchinson k={k}", times[k], None, results[k], exact_s / times[k]))
    return lines


def bench_train_mode(args: argparse.Namespace, device: torch.device) -> list[str]:
    """Train mode (BN batch statistics) against eval mode on ResNet-20: train mode takes each example's own Jacobian
    block, one vector-Jacobian product per (example, class) pair, so it should cost about batch-size times more."""
    torch.manual_seed(0)
    model = build_model(ModelSpec("resnet20", 10, (1, 28, 28), (0.2860,), (0.3530,)))
    brief_training(model, args.train_steps, args.batch_size)
    batches = load_batches("fashion-mnist", "test", args.train_mode_n, args.train_mode_batch_size)
    measure_gbr(model, [(batches[0][0][:4], batches[0][1][:4])], train_mode=True, device=device)  # warm-up
    lines = []
    for method, probes in (("exact", 1), ("hutchinson", 1)):
        eval_run, eval_s = timed(lambda: measure_gbr(model, batches, method=method, probes=probes, device=device))
        train_run, train_s = timed(lambda: measure_gbr(model, batches, method=method, probes=probes, device=device,
                                                       train_mode=True))
        label = "exact" if method == "exact" else f"hutchinson k={probes}"
        lines.append(f"| {label} | {eval_s:.2f} | {train_s:.2f} | {train_s / eval_s:.0f}x | {eval_run.mean:.4g} | "
                     f"{train_run.mean:.4g} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000, help="Fashion-MNIST test images for ResNet-20")
    parser.add_argument("--big-n", type=int, default=64, help="images for the 1,000-class ResNet-18")
    parser.add_argument("--probes", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--seeds", type=int, default=3, help="probe seeds per estimator setting (errors averaged)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--train-steps", type=int, default=30, help="SGD steps before measuring ResNet-20")
    parser.add_argument("--train-mode-n", type=int, default=64, help="images for the train-mode cost rows")
    parser.add_argument("--train-mode-batch-size", type=int, default=32,
                        help="batch of the train-mode rows (their cost per image grows with the batch)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    device = torch.device(args.device)

    header = ("| method | seconds | speed vs exact | GBR mean | rel. error vs exact | rel. stderr reached | "
              "rel. stderr x sqrt(s), % (lower = better) |\n|---|---|---|---|---|---|---|")
    load = os.getloadavg()
    small = bench_resnet20(args, device)
    big = bench_imagenet_classes(args, device)
    train_mode = bench_train_mode(args, device)
    text = "\n".join([
        "## gbr: exact Jacobian vs Hutchinson estimator",
        "",
        f"Machine: {machine()}; device {device}. "
        f"`benchmarks/bench_gbr.py --n {args.n} --seeds {args.seeds} --train-steps {args.train_steps}`. "
        f"The CPU was shared with other jobs (load average {load[0]:.1f} before, {os.getloadavg()[0]:.1f} after; "
        "2 cores): seconds are medians of runs interleaved round-robin, and still jitter, most for short runs.",
        "",
        f"ResNet-20, Fashion-MNIST test, N = {args.n} (class-balanced subset"
        f"{'; below the default 1,000 to keep the run short on the overloaded shared CPU' if args.n < 1000 else ''}"
        f"), {args.train_steps} SGD steps of "
        "training, eval mode, logits. Estimator rows: median seconds and mean errors over "
        f"{args.seeds} runs (probe seeds 0..{args.seeds - 1}). 'rel. stderr reached' = stderr / mean of the "
        "data-set GBR, sample and probe noise together (for exact: sample noise only); the last column charges it "
        "for time (error bars shrink as 1/sqrt(work)).",
        "",
        header, *small,
        "",
        f"ResNet-18 (ImageNet stem, untrained), synthetic 3x64x64, 1,000 classes, N = {args.big_n}: exact is "
        "extrapolated as one forward + 1,000 backward passes from the measured cost of 3 extra probes.",
        "",
        header, *big,
        "",
        f"Train mode (`--train-mode`), ResNet-20 as above, N = {args.train_mode_n}, batch "
        f"{args.train_mode_batch_size}: BN "
        "normalizes with each batch's statistics, so every example's own Jacobian block is taken (one "
        "vector-Jacobian product per example and class, batched with is_grads_batched) instead of one backward per "
        "class for the whole batch.",
        "",
        "| method | eval s | train s | train / eval | GBR eval | GBR train |",
        "|---|---|---|---|---|---|",
        *train_mode,
    ])
    print(text)
    if not args.no_write:
        write_section("gbr", text)


if __name__ == "__main__":
    main()
