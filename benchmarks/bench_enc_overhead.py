"""ENC's training-step overhead against the baseline: the same model, data and optimizer, steps interleaved.

The paper calls ENC's cost negligible; the targets are <= 1.05x per step for ResNet-20 (CPU) and ResNet-50 on a GPU,
<= 1.25x for a small-input ResNet-50 on a CPU. A step is ``Recipe.train_step`` (zero_grad, forward, loss + penalties,
backward, SGD update), so ENC pays for normalizing every conv/linear weight once per step (``enc.step_weights``) and
for its epsilon-shifted L2 term; WN and WS rows measure the same mechanism.

All specs of a setting alternate step by step (the order rotates each round), so drift in a shared machine's load
hits them alike; an overhead is the median over rounds of the per-round ratio spec / baseline.

    .venv/bin/python -m benchmarks.bench_enc_overhead              # CPU rows -> BENCHMARKS.md section enc-overhead
    .venv/bin/python -m benchmarks.bench_enc_overhead --gpu-only   # GPU rows -> section enc-overhead-gpu (gpu.sh)
    .venv/bin/python -m benchmarks.bench_enc_overhead --compile    # adds torch.compile'd baseline and ENC rows
    .venv/bin/python -m benchmarks.bench_enc_overhead --profile after   # per-op table -> section enc-profile-after
    .venv/bin/python -m benchmarks.bench_enc_overhead --profile resnet20-after --profile-model resnet20
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from benchmarks._common import machine, write_section
from robust_enc.models import ModelSpec
from robust_enc.regularizers import build_model, canonical_spec
from robust_enc.train.recipe import build_recipe


@dataclass(frozen=True)
class Setting:
    label: str
    model: str
    input_shape: tuple[int, int, int]  # (C, H, W)
    batch: int
    device: str = "cpu"
    amp: str = "none"  # "none" or "bf16"
    channels_last: bool = False
    steps: int = 30  # timed rounds (one step of every spec each)


RESNET20_CPU = Setting("ResNet-20, Fashion-MNIST 1x28x28, batch 128, fp32", "resnet20", (1, 28, 28), 128)
RESNET50_CPU = Setting("ResNet-50, synthetic 3x64x64, batch 16, fp32", "resnet50", (3, 64, 64), 16)


def gpu_settings(args: argparse.Namespace) -> list[Setting]:
    """The GPU rows: ResNet-50, 224x224, bf16 autocast, channels_last, batch 64 and 128 (gpu.sh's --dry-run shrinks
    them onto the CPU)."""
    name = "ResNet-50" if args.gpu_model == "resnet50" else args.gpu_model
    size = args.gpu_size
    return [Setting(f"{name}, 3x{size}x{size}, batch {batch}, bf16 autocast, channels_last", args.gpu_model,
                    (3, size, size), batch, device=args.gpu_device, amp="bf16", channels_last=True,
                    steps=args.gpu_steps) for batch in (int(b) for b in args.gpu_batches.split(","))]


def fashion_batch(batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A real Fashion-MNIST training batch when the files are installed; seeded noise otherwise."""
    from robust_enc.data import FASHION_MNIST_SYSTEM_DIR, build_dataset

    if (FASHION_MNIST_SYSTEM_DIR / "train-images-idx3-ubyte.gz").is_file():
        data, _ = build_dataset("fashion-mnist", "train", subset=batch)
        x = torch.stack([data[i][0] for i in range(batch)])
        y = torch.tensor([data[i][1] for i in range(batch)])
        return x, y
    g = torch.Generator().manual_seed(0)
    return torch.rand(batch, 1, 28, 28, generator=g), torch.randint(0, 10, (batch,), generator=g)


def setting_batch(setting: Setting) -> tuple[torch.Tensor, torch.Tensor]:
    if setting.model == "resnet20":
        return fashion_batch(setting.batch)
    g = torch.Generator().manual_seed(0)
    return torch.rand(setting.batch, *setting.input_shape, generator=g), torch.randint(0, 10, (setting.batch,),
                                                                                       generator=g)


def build_step(spec: str, setting: Setting, x: torch.Tensor, y: torch.Tensor, *, compile: bool = False
               ) -> tuple[Callable[[], object], torch.nn.Module]:
    """(a zero-argument callable running one training step of ``spec`` on (x, y), the model it trains)."""
    device = torch.device(setting.device)
    torch.manual_seed(0)
    model_spec = ModelSpec(setting.model, 10, setting.input_shape, (0.5,) * setting.input_shape[0],
                           (0.25,) * setting.input_shape[0], regularizer=canonical_spec(spec))
    model = build_model(model_spec).to(device).train()
    if setting.channels_last:
        model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    recipe = build_recipe(spec, num_classes=10, batch_size=setting.batch, weight_decay=1e-4)
    optimizer = torch.optim.SGD(recipe.param_groups(model), lr=0.01, momentum=0.9)
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if setting.amp == "bf16" else None
    kwargs = {"autocast": autocast} if autocast else {}
    train_model = torch.compile(model) if compile else model  # as `robust-enc train --compile` does
    return (lambda: recipe.train_step(train_model, x, y, optimizer, **kwargs)), model


def measure(setting: Setting, variants: list[tuple[str, str, bool]], warmup: int = 3, clock: str = "wall"
            ) -> dict[str, dict[str, float]]:
    """variants: (row name, spec, compiled); the first is the reference. Per row: median seconds per step, and the
    median, 25th and 75th percentile of the per-round ratio row / reference. ``clock="cpu"``: the process's CPU time
    instead of wall time (with one thread, the work done, not the time spent waiting for a shared core)."""
    cuda = setting.device.startswith("cuda")
    now = time.process_time if clock == "cpu" else time.perf_counter
    x, y = (t.to(setting.device) for t in setting_batch(setting))
    steps = {name: build_step(spec, setting, x, y, compile=compiled)[0] for name, spec, compiled in variants}

    def timed(fn: Callable[[], object]) -> float:
        if cuda:
            torch.cuda.synchronize()
        t0 = now()
        fn()
        if cuda:
            torch.cuda.synchronize()
        return now() - t0

    for _ in range(warmup):  # compiled variants compile here
        for fn in steps.values():
            fn()
    names = list(steps)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(setting.steps):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(timed(steps[name]))
    reference = names[0]
    result = {}
    for name in names:
        ratios = [t / b for t, b in zip(times[name], times[reference])]
        q = statistics.quantiles(ratios, n=4)
        result[name] = {"s": statistics.median(times[name]), "ratio": statistics.median(ratios),
                        "q25": q[0], "q75": q[2]}
    return result


def table_rows(setting: Setting, result: dict[str, dict[str, float]], where: str) -> list[str]:
    base = next(iter(result))
    return [f"| {setting.label} | {name} | {r['s'] * 1e3:.1f} | "
            + ("1 (reference)" if name == base else f"{r['ratio']:.3f}x ({r['q25']:.2f}-{r['q75']:.2f})")
            + f" | {setting.steps} | {where} |" for name, r in result.items()]


def profile_markdown(setting: Setting, specs: tuple[str, ...], steps: int, top: int = 14) -> str:
    """Per-op self CPU time (ms per step) and calls per step of each spec's step (torch.profiler), the ``top`` ops of
    the last spec first; and how often a weight is normalized per step."""
    from torch.profiler import ProfilerActivity, profile

    from robust_enc.regularizers import enc

    x, y = (t.to(setting.device) for t in setting_batch(setting))
    stats: dict[str, dict[str, tuple[float, float]]] = {}
    totals: dict[str, float] = {}
    per_step: dict[str, float] = {}
    for spec in specs:
        step, model = build_step(spec, setting, x, y)
        for _ in range(3):
            step()
        calls = [0]
        hooks = [m.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1)) for m in model.modules()
                 if isinstance(m, (enc.ENCWeight, enc.WSWeight))]
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                step()
        for h in hooks:
            h.remove()
        layers = sum(1 for _ in enc.parametrized_layers(model))
        per_step[spec] = calls[0] / steps / layers if layers else 0.0
        events = prof.key_averages()
        stats[spec] = {e.key: (e.self_cpu_time_total / 1e3 / steps, e.count / steps) for e in events}
        totals[spec] = sum(e.self_cpu_time_total for e in events) / 1e3 / steps
    last = specs[-1]
    ops = sorted(stats[last], key=lambda k: -stats[last][k][0])[:top]
    header = "| op | " + " | ".join(f"{s} ms/step | {s} calls/step" for s in specs) + " |"
    lines = [header, "|---|" + "---|---|" * len(specs)]
    for op in ops:
        cells = " | ".join(f"{stats[s].get(op, (0, 0))[0]:.1f} | {stats[s].get(op, (0, 0))[1]:.0f}" for s in specs)
        lines.append(f"| `{op}` | {cells} |")
    total_cells = " | ".join(f"**{totals[s]:.1f}** | {sum(c for _, c in stats[s].values()):.0f}" for s in specs)
    lines.append(f"| **all ops (self CPU)** | {total_cells} |")
    recompute = ", ".join(f"{s}: {per_step[s]:.0f}" for s in specs if per_step[s])
    return "\n".join(lines) + f"\n\nWeight normalizations per constrained layer and step: {recompute or 'none'}."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="timed rounds per setting (CPU ResNet-20)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--specs", default=None,
                        help="specs timed against the baseline, comma-separated (default enc,wn,ws; enc for GPU rows)")
    parser.add_argument("--skip-resnet50-cpu", action="store_true", help="leave out the small CPU ResNet-50 check")
    parser.add_argument("--compile", action="store_true", help="add torch.compile'd baseline and ENC rows")
    # For benchmarks/gpu.sh: only the GPU rows, into their own section; its --dry-run runs them tiny on the CPU.
    parser.add_argument("--gpu-only", action="store_true", help="only the GPU rows (ResNet-50 224x224 bf16 "
                                                                "channels_last, batch 64 and 128), into section "
                                                                "enc-overhead-gpu")
    parser.add_argument("--gpu-device", default="cuda", help="device of the GPU rows (cpu for a dry run)")
    parser.add_argument("--gpu-model", default="resnet50", help="model of the GPU rows (a tiny one for a dry run)")
    parser.add_argument("--gpu-size", type=int, default=224, help="image side of the GPU rows")
    parser.add_argument("--gpu-batches", default="64,128", help="batch sizes of the GPU rows")
    parser.add_argument("--gpu-steps", type=int, default=50, help="timed rounds per GPU row")
    parser.add_argument("--profile", metavar="TAG", default=None,
                        help="instead of timing: a per-op profile of a CPU step (baseline and ENC), "
                             "into section enc-profile-TAG")
    parser.add_argument("--profile-model", choices=("resnet50", "resnet20"), default="resnet50",
                        help="the setting --profile runs: the small-input ResNet-50 or ResNet-20 at batch 128")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="cpu: time steps by process CPU time (use with --threads 1 on a machine shared with "
                             "other jobs, where wall time is mostly waiting)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    flags = [(f"--steps {args.steps}", not args.gpu_only), (f"--threads {args.threads}", args.threads),
             (f"--specs {args.specs}", args.specs), ("--compile", args.compile),
             ("--skip-resnet50-cpu", args.skip_resnet50_cpu), ("--gpu-only", args.gpu_only),
             (f"--clock {args.clock}", args.clock != "wall")]
    command = "`benchmarks/bench_enc_overhead.py" + "".join(f" {flag}" for flag, on in flags if on) + "`"

    if args.profile:
        setting = RESNET50_CPU if args.profile_model == "resnet50" else RESNET20_CPU
        table = profile_markdown(setting, ("baseline", "enc"), steps=5)
        model_flag = "" if args.profile_model == "resnet50" else f" --profile-model {args.profile_model}"
        markdown = "\n".join([
            f"## enc-profile-{args.profile}: where a CPU {setting.label.split(',')[0]} ENC step spends its time "
            f"({args.profile})", "",
            f"Machine: {machine()}; load average {load:.1f} when it ran. `benchmarks/bench_enc_overhead.py --profile "
            f"{args.profile}{model_flag}`: torch.profiler over 5 steps of {setting.label} after 3 warm-up steps, "
            "self CPU time per op (the profiler's own cost inflates small ops; the shared cores make milliseconds "
            "jitter, calls per step do not).", "", table])
        print(markdown)
        if not args.no_write:
            write_section(f"enc-profile-{args.profile}", markdown)
        return

    specs = [s for s in (args.specs or ("enc" if args.gpu_only else "enc,wn,ws")).split(",") if s]
    variants = [("baseline", "baseline", False)] + [(s, s, False) for s in specs]
    if args.compile:
        variants += [("baseline compiled", "baseline", True), ("enc compiled", "enc", True)]
    if args.gpu_only:
        if args.gpu_device.startswith("cuda") and not torch.cuda.is_available():
            parser.error("--gpu-only needs CUDA (or --gpu-device cpu for a dry run)")
        settings = gpu_settings(args)
    else:
        settings = [Setting(**{**RESNET20_CPU.__dict__, "steps": args.steps})]
        if not args.skip_resnet50_cpu:
            settings.append(Setting(**{**RESNET50_CPU.__dict__, "steps": max(5, args.steps // 3)}))
    rows = []
    for setting in settings:
        result = measure(setting, variants, clock=args.clock)
        for line in table_rows(setting, result, args.gpu_device.upper() if args.gpu_only else "CPU"):
            print(line, flush=True)
            rows.append(line)
        if args.compile:  # compiled ENC against compiled baseline, from the same rounds
            c = result["enc compiled"]["ratio"] / result["baseline compiled"]["ratio"]
            print(f"compiled ENC / compiled baseline ~ {c:.3f}x", flush=True)

    name = "enc-overhead-gpu" if args.gpu_only else "enc-overhead"
    markdown = "\n".join([
        f"## {name}: ENC (and WN, WS) training step against the baseline" + (" on a GPU" if args.gpu_only else ""),
        "",
        f"Machine: {machine()}; load average {load:.1f} when it ran. {command}.",
        "",
        "One step = `Recipe.train_step` (zero_grad, forward, loss + penalties, backward, SGD momentum update). "
        "`enc` is the default spec (eq. 22 on every conv/linear layer, alpha 1, epsilon-shifted L2), `wn` and `ws` the "
        "default weight normalization and standardization. All rows of a setting alternate step by step, rotating "
        "the order each round; times are medians per step, an overhead is the median of the per-round ratios to the "
        "eager baseline (interquartile range in brackets). Targets: ENC <= 1.05x for ResNet-20 and for ResNet-50 on "
        "a GPU, <= 1.25x for the small-input ResNet-50 on a CPU.",
        "",
        f"| setting | step | {'CPU ' if args.clock == 'cpu' else ''}ms/step | / eager baseline | rounds | device |",
        "|---|---|---|---|---|---|",
        *rows,
    ])
    if not args.no_write:
        write_section(name, markdown)
    print(markdown)


if __name__ == "__main__":
    main()
