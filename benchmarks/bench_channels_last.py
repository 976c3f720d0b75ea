"""``attack --channels-last`` against the default NCHW layout: the same suite calls side by side, seconds and rows.

The suite's ``evaluate_model`` runs FGSM, PGD-10 (the forward+backward loop AutoAttack's APGD also runs) and FGSM
with ``--gbr`` (exact with 10 classes, Hutchinson's estimate with 1,000), once with the convolution weights in NHWC
and once as stored, alternating (and swapping which goes first each round) so load drift hits both alike. The ratio is
the median of the per-round ratios NCHW / NHWC (> 1: channels_last is faster). Both runs count the same images; float
rounding may move an example, so the table gives the adversarial top-1 of both.

CPU: ResNet-20 briefly trained on Fashion-MNIST, a class-balanced test subset. GPU (``--device cuda``): ResNet-50 at
224x224 on synthetic images with bench_attacks' nearest-prototype head, strict fp32 as the suite's attacks run.

    .venv/bin/python -m benchmarks.bench_channels_last                      # CPU, writes BENCHMARKS.md
    .venv/bin/python -m benchmarks.bench_channels_last --device cuda --model resnet50 --size 224 --n 1024
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from benchmarks._common import alternate, machine, write_section
from benchmarks.bench_attacks import _WithPrototypes, train_briefly
from robust_enc.attacks import evaluate_model
from robust_enc.checkpoint import state_hash
from robust_enc.data import build_dataset
from robust_enc.models import ModelSpec
from robust_enc.regularizers import build_model

EPS = 8 / 255
RUNS = (("FGSM", "fgsm", None, False), ("PGD-10", "pgd", 10, False), ("FGSM + GBR", "fgsm", None, True))


def build(args: argparse.Namespace):
    """(model, data, info, what it is) for the CPU or the GPU setting."""
    if args.size == 0:
        data, info = build_dataset("fashion-mnist", "test", subset=args.n)
        model = build_model(ModelSpec(args.model, 10, info.input_shape, info.mean, info.std))
        start = time.perf_counter()
        train_briefly(model, args.train_steps)
        return model, data, info, (f"{args.model} after {args.train_steps} SGD steps on Fashion-MNIST "
                                   f"({time.perf_counter() - start:.0f} s), {args.n} test images (class-balanced)")
    size = args.size
    data, info = build_dataset(f"synthetic:3x{size}x{size}:1000:{args.n}", "test")
    net = build_model(ModelSpec(args.model, 1000, info.input_shape, info.mean, info.std))
    return (_WithPrototypes(net, data.prototypes).to(args.device).eval(), data, info,
            f"{args.model} (untrained, nearest-prototype head) on synthetic:3x{size}x{size}:1000:{args.n}")


def run(args: argparse.Namespace) -> str:
    torch.set_num_threads(args.threads)
    model, data, info, what = build(args)
    model_hash = state_hash(model.state_dict())  # once: not part of what is timed
    sync = torch.device(args.device).type == "cuda"

    def suite(attack: str, steps: int | None, gbr: bool, nhwc: bool) -> Callable[[], object]:
        return lambda: evaluate_model(model, data, info=info, attacks=(attack,), eps=(EPS,), steps=steps, gbr=gbr,
                                      batch_size=args.batch_size, device=args.device, checkpoint_hash=model_hash,
                                      channels_last=nhwc)

    lines = [
        "## channels-last: `attack --channels-last` against the NCHW default",
        "",
        f"Machine: {machine()}; device {args.device}. `benchmarks/bench_channels_last.py --n {args.n} --rounds "
        f"{args.rounds} --threads {args.threads}`, other jobs paused. {what}, batch {args.batch_size}, L-inf eps "
        "8/255. Seconds are medians of alternating runs; the ratio is the median per-round NCHW / NHWC.",
        "",
        "| run | NCHW s | NHWC s | NCHW / NHWC | adv top-1 NCHW | adv top-1 NHWC | GBR NCHW | GBR NHWC |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, attack, steps, gbr in RUNS:
        nchw_rows, nhwc_rows = suite(attack, steps, gbr, False)(), suite(attack, steps, gbr, True)()
        nhwc_s, nchw_s = alternate(suite(attack, steps, gbr, True), suite(attack, steps, gbr, False), args.rounds,
                                   sync)
        ratio = statistics.median(b / a for a, b in zip(nhwc_s, nchw_s))
        gbrs = (f"{nchw_rows[1].gbr:.4g} | {nhwc_rows[1].gbr:.4g}" if gbr else "| ")
        lines.append(f"| {label} | {statistics.median(nchw_s):.2f} | {statistics.median(nhwc_s):.2f} | "
                     f"{ratio:.2f}x | {nchw_rows[1].adv_top1:.1%} | {nhwc_rows[1].adv_top1:.1%} | {gbrs} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=500, help="test images")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--train-steps", type=int, default=150, help="CPU setting: SGD steps before measuring")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--size", type=int, default=0, help="0: Fashion-MNIST; S: synthetic 3xSxS images (GPU: 224)")
    parser.add_argument("--section", default="channels-last", help="BENCHMARKS.md section to write")
    parser.add_argument("--no-write", action="store_true", help="print instead of writing BENCHMARKS.md")
    args = parser.parse_args()
    text = run(args)
    print(text)
    if not args.no_write:
        write_section(args.section, text)


if __name__ == "__main__":
    main()
