"""The attack suite's cost against a bare torch loop doing the same work, and the cost of an FGSM eps sweep.

Both sides run the same protocol on the same model and DataLoader: a clean forward pass, the attack on the
clean-correct examples only, a forward pass on the adversarial images, counts. The bare loop is plain torch with the
parameters frozen (no ART, no numpy); the suite is ``robust_enc.attacks.benchmark`` (ART behind the adapter, checks,
bookkeeping). Suite and bare runs alternate (and swap which goes first each round), so load drift on a shared
machine hits both alike; the overhead is the median over rounds of the per-round ratio suite / bare.

CPU part: ResNet-20 briefly trained on Fashion-MNIST, evaluated on a class-balanced test subset. GPU part (only with
CUDA): ResNet-50 at 224x224 on synthetic:3x224x224:1000:N, images/s. Both sides run in strict fp32 (TF32 and
cudnn.benchmark off), as the suite's attacks do.

    .venv/bin/python -m benchmarks.bench_attacks                 # CPU (and GPU when there is one), writes BENCHMARKS.md
    .venv/bin/python -m benchmarks.bench_attacks --n 300 --rounds 2 --no-write
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from benchmarks._common import alternate, machine, write_section
from robust_enc.attacks import evaluate_model
from robust_enc.checkpoint import state_hash
from robust_enc.data import build_dataset, build_loader
from robust_enc.images import DatasetInfo
from robust_enc.models import ModelSpec
from robust_enc.regularizers import build_model
from robust_enc.runtime.device import strict_fp32

EPS = 8 / 255
SWEEP = tuple(k / 255 for k in (1, 2, 4, 8, 16, 32))


# ------------------------------------------------------------------------------------------------ the bare loop
def bare_attack(model: nn.Module, loader, *, eps: float, steps: int, device: torch.device,
                generator: torch.Generator) -> tuple[int, int, int]:
    """(n, clean correct, robust) with plain torch: FGSM when steps == 0, else PGD (random start, 2.5 * eps / steps,
    first fooling iterate kept)."""
    n = clean = robust = 0
    step = 2.5 * eps / steps if steps else eps
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        with torch.no_grad():
            ok = model(x).argmax(1) == y
        xa, ya = x[ok], y[ok]
        if steps:
            noise = torch.empty(xa.shape, device="cpu").uniform_(-eps, eps, generator=generator).to(device)
            x_adv = (xa + noise).clamp(0, 1)
        else:
            x_adv = xa
        best, found = x_adv.clone(), torch.zeros(len(xa), dtype=torch.bool, device=device)
        for _ in range(max(steps, 1)):
            x_adv = x_adv.detach().requires_grad_(True)
            logits = model(x_adv)
            (grad,) = torch.autograd.grad(nn.functional.cross_entropy(logits, ya), x_adv)
            x_adv = x_adv.detach()
            if steps:  # PGD keeps each example's first iterate that fools the model, as the suite's does
                new = (logits.argmax(1) != ya) & ~found
                best[new], found = x_adv[new], found | new
            x_adv = x_adv + step * grad.sign()
            x_adv = torch.min(torch.max(x_adv, xa - eps), xa + eps).clamp(0, 1)
        x_adv = torch.where(found[:, None, None, None], best, x_adv)
        with torch.no_grad():
            adv_ok = model(x_adv).argmax(1) == ya
        n, clean, robust = n + len(y), clean + int(ok.sum()), robust + int(adv_ok.sum())
    return n, clean, robust


def interleaved(suite: Callable[[], object], bare: Callable[[], object], rounds: int,
                sync: bool) -> tuple[float, float, float]:
    """Median seconds of suite and bare, and the median per-round ratio; one warm-up of each first."""
    suite_s, bare_s = alternate(suite, bare, rounds, sync)
    times = {"suite": suite_s, "bare": bare_s}
    ratios = [s / b for s, b in zip(times["suite"], times["bare"])]
    return statistics.median(times["suite"]), statistics.median(times["bare"]), statistics.median(ratios)


def train_briefly(model: nn.Module, steps: int, batch_size: int = 128) -> None:
    """A few SGD steps on Fashion-MNIST train, so the attacks run on a model with real clean accuracy."""
    data, _ = build_dataset("fashion-mnist", "train", subset=steps * batch_size)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    model.train()
    for x, y in build_loader(data, batch_size=batch_size, shuffle=True):
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


def overhead_profile(model: nn.Module, data, info: DatasetInfo, device: str) -> list[tuple[str, float]]:
    """Where the suite's PGD-10 time goes: one cProfile'd run split into model compute inside the PGD steps, the
    per-step work around it (ART's ``loss_gradient`` wrapper, sign, clip, projection, best-iterate bookkeeping), the
    suite's forward passes, the sanity checks and the suite's own bookkeeping (seconds).

    The checks (``Evaluation._gradient_checks``: one clean gradient through ``fgsm_direction``, then one forward pass
    per eps for the FGSM reference; ``predict_labels``: ART's predict on a few images) also run the model: their time
    is taken out of the other parts."""
    profile = cProfile.Profile()
    profile.enable()
    evaluate_model(model, data, info=info, attacks=("pgd",), eps=(EPS,), steps=10, device=device,
                   checkpoint_hash="bench")
    profile.disable()
    stats = pstats.Stats(profile).stats  # type: ignore[attr-defined]

    def cum(func: str, path: str = "") -> float:
        hits = [v[3] for k, v in stats.items() if k[2] == func and k[0].endswith(path)]
        return max(hits, default=0.0)  # the outermost call of a recursive/nested name

    def cum_from(func: str, path: str, caller: str) -> float:
        """Cumulative seconds of ``func`` when called from the function named ``caller``."""
        return sum(edge[3] for k, v in stats.items() if k[2] == func and k[0].endswith(path)
                   for c, edge in v[4].items() if c[2] == caller)

    total = cum("run_evaluation", "attacks/evaluation.py")
    attack = cum("pgd", "art_adapter.py")
    compute = cum_from("loss_gradient", "classification/pytorch.py", "loss_gradient")  # ART's, from the adapter's
    check_gradient = cum_from("loss_gradient", "art_adapter.py", "fgsm_direction")
    pgd_compute = compute - check_gradient
    all_forward = cum("forward", "robust_enc/models.py")  # NormalizedModel.forward, every caller
    check_predict = cum("predict_labels", "art_adapter.py")
    checks = cum("_gradient_checks", "attacks/counting.py") + check_predict
    art_forward = cum("forward", "classification/pytorch.py")  # ART's model wrapper: every loss_gradient/predict
    suite_forward = all_forward - art_forward - (checks - check_gradient - check_predict)
    return [
        ("total (run_evaluation)", total),
        ("model forward + backward inside the PGD steps (ART's loss_gradient)", pgd_compute),
        ("per-step work around it (sign, clip, projection, first-fooling iterate)", attack - pgd_compute),
        ("suite's clean and adversarial forward passes", suite_forward),
        ("sanity checks: one clean gradient + FGSM reference per batch, ART predict on 16 images", checks),
        ("suite's own bookkeeping (masks, counts, flags)", total - attack - suite_forward - checks),
    ]


def bare_sweep(model: nn.Module, loader, *, eps_values: tuple[float, ...], device: torch.device) -> int:
    """The sweep protocol in plain torch: one gradient per batch, then one forward pass per eps."""
    robust = 0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        with torch.no_grad():
            ok = model(x).argmax(1) == y
        xa, ya = x[ok].requires_grad_(True), y[ok]
        (grad,) = torch.autograd.grad(nn.functional.cross_entropy(model(xa), ya), xa)
        for eps in eps_values:
            with torch.no_grad():
                robust += int((model((xa + eps * grad.sign()).clamp(0, 1)).argmax(1) == ya).sum())
    return robust


def cpu_part(args: argparse.Namespace) -> str:
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    data, info = build_dataset("fashion-mnist", "test", subset=args.n)
    model = build_model(ModelSpec("resnet20", 10, info.input_shape, info.mean, info.std))
    t0 = time.perf_counter()
    train_briefly(model, args.train_steps)
    train_s = time.perf_counter() - t0
    loader = build_loader(data, batch_size=args.batch_size)
    generator = torch.Generator().manual_seed(0)

    model_hash = state_hash(model.state_dict())  # once: not part of what is timed

    def run_suite(attack: str, steps: int | None, eps=(EPS,)) -> Callable[[], object]:
        return lambda: evaluate_model(model, data, info=info, attacks=(attack,), eps=eps, steps=steps,
                                 batch_size=args.batch_size, device="cpu", checkpoint_hash=model_hash)

    def run_bare(steps: int) -> Callable[[], object]:
        def go() -> object:
            model.requires_grad_(False)  # the same freezing the suite does: no weight gradients
            try:
                return bare_attack(model, loader, eps=EPS, steps=steps, device=device, generator=generator)
            finally:
                model.requires_grad_(True)
        return go

    rows = evaluate_model(model, data, info=info, attacks=("fgsm", "pgd"), eps=(EPS,), steps=10,
                     batch_size=args.batch_size, device="cpu", checkpoint_hash="bench")
    acc = {r.attack: r for r in rows}
    bare_fgsm, bare_pgd = run_bare(0)(), run_bare(10)()
    fgsm = interleaved(run_suite("fgsm", None), run_bare(0), args.rounds, False)
    pgd = interleaved(run_suite("pgd", 10), run_bare(10), max(1, args.rounds // 2 + 1), False)
    sweep = interleaved(run_suite("fgsm", None, SWEEP), run_suite("fgsm", None, (EPS,)), args.rounds, False)

    def frozen(fn: Callable[[], object]) -> Callable[[], object]:
        def go() -> object:
            model.requires_grad_(False)
            try:
                return fn()
            finally:
                model.requires_grad_(True)
        return go

    bare_k = interleaved(frozen(lambda: bare_sweep(model, loader, eps_values=SWEEP, device=device)),
                         frozen(lambda: bare_sweep(model, loader, eps_values=(EPS,), device=device)), args.rounds,
                         False)
    start = time.perf_counter()
    for eps in SWEEP:  # what a sweep costs without reusing the gradient: one suite run per eps
        run_suite("fgsm", None, (eps,))()
    separate = time.perf_counter() - start
    profile = overhead_profile(model, data, info, "cpu")

    n = args.n
    lines = [
        "## attacks: suite vs bare torch, FGSM sweep cost",
        "",
        f"Machine: {machine()}; device cpu. `benchmarks/bench_attacks.py --n {n} --rounds {args.rounds} "
        f"--train-steps {args.train_steps}`. The 2 cores were shared with other jobs: seconds are medians of "
        "interleaved runs and still jitter; the ratios (median of per-round ratios) are the numbers to read.",
        "",
        f"ResNet-20 after {args.train_steps} SGD steps on Fashion-MNIST ({train_s:.0f} s), N = {n} test images "
        f"(class-balanced subset), batch {args.batch_size}, L-inf eps = 8/255. Clean top-1 "
        f"{acc['none'].clean_top1:.1%}; suite FGSM {acc['fgsm'].adv_top1:.1%} vs bare "
        f"{bare_fgsm[2] / bare_fgsm[0]:.1%}; suite PGD-10 {acc['pgd'].adv_top1:.1%} vs bare "
        f"{bare_pgd[2] / bare_pgd[0]:.1%} (PGD random starts are drawn differently).",
        "",
        "| run | suite s | bare torch s | suite / bare | suite img/s |",
        "|---|---|---|---|---|",
        f"| FGSM | {fgsm[0]:.2f} | {fgsm[1]:.2f} | {fgsm[2]:.3f}x | {n / fgsm[0]:,.0f} |",
        f"| PGD-10 (random start) | {pgd[0]:.2f} | {pgd[1]:.2f} | {pgd[2]:.3f}x | {n / pgd[0]:,.0f} |",
        "",
        "FGSM eps sweep, k = 1 (8/255) against k = 6 (1, 2, 4, 8, 16, 32 /255). The suite takes one gradient per "
        "batch for every eps, then one forward pass per eps; the bare torch row is the same protocol, the floor "
        "this model sets (a forward pass costs about a third of a gradient, and the clean pass is paid once):",
        "",
        "| protocol | k = 1 s | k = 6 s | k = 6 / k = 1 |",
        "|---|---|---|---|",
        f"| suite (one gradient, k forward passes) | {sweep[1]:.2f} | {sweep[0]:.2f} | {sweep[2]:.2f}x |",
        f"| bare torch, same protocol | {bare_k[1]:.2f} | {bare_k[0]:.2f} | {bare_k[2]:.2f}x |",
        f"| suite, one run per eps (k gradients) | {sweep[1]:.2f} | {separate:.2f} | {separate / sweep[1]:.2f}x |",
        "",
        "Where the suite's PGD-10 time goes (one cProfile'd run, so slower than the table above):",
        "",
        "| part | seconds | share |",
        "|---|---|---|",
    ]
    total = profile[0][1]
    lines += [f"| {label} | {seconds:.2f} | {seconds / total:.0%} |" for label, seconds in profile]
    return "\n".join(lines)


def gpu_part(args: argparse.Namespace) -> str:
    device = torch.device(args.gpu_device)
    sync = device.type == "cuda"
    size = args.gpu_size
    data, info = build_dataset(f"synthetic:3x{size}x{size}:1000:{args.gpu_n}", "test")
    net = build_model(ModelSpec(args.gpu_model, 1000, info.input_shape, info.mean, info.std))
    model_all = _WithPrototypes(net, data.prototypes).to(device).eval()
    loader = build_loader(data, batch_size=args.gpu_batch_size)
    generator = torch.Generator().manual_seed(0)

    model_hash = state_hash(model_all.state_dict())  # once: not part of what is timed

    def run_suite(attack: str, steps: int | None) -> Callable[[], object]:
        return lambda: evaluate_model(model_all, data, info=info, attacks=(attack,), eps=(EPS,), steps=steps,
                                 batch_size=args.gpu_batch_size, device=args.gpu_device, checkpoint_hash=model_hash)

    def run_bare(steps: int) -> Callable[[], object]:
        def go() -> object:
            model_all.requires_grad_(False)
            try:
                with strict_fp32():  # the suite's arithmetic: a TF32 bare loop would flatter it
                    return bare_attack(model_all, loader, eps=EPS, steps=steps, device=device, generator=generator)
            finally:
                model_all.requires_grad_(True)
        return go

    fgsm = interleaved(run_suite("fgsm", None), run_bare(0), args.gpu_rounds, sync)
    pgd = interleaved(run_suite("pgd", 10), run_bare(10), max(1, args.gpu_rounds - 1), sync)
    n = args.gpu_n
    return "\n".join([
        "",
        f"GPU: {args.gpu_model} (untrained, plus a nearest-prototype score so clean examples are right and get "
        f"attacked) at {size}x{size}, synthetic:3x{size}x{size}:1000:{n}, batch {args.gpu_batch_size}, eps 8/255 "
        f"(device {args.gpu_device}):",
        "",
        "| run | suite img/s | bare torch img/s | suite / bare time |",
        "|---|---|---|---|",
        f"| FGSM | {n / fgsm[0]:,.0f} | {n / fgsm[1]:,.0f} | {fgsm[2]:.3f}x |",
        f"| PGD-10 | {n / pgd[0]:,.0f} | {n / pgd[1]:,.0f} | {pgd[2]:.3f}x |",
    ])


class _WithPrototypes(nn.Module):
    """ResNet-50 logits plus a nearest-prototype score (2 x.p_c - |p_c|^2, the synthetic classes' own prototypes),
    so the untrained network still gets most clean examples right and the attacks run on full batches, as they
    would for a trained model. Both the suite and the bare loop time this same module."""

    def __init__(self, model: nn.Module, prototypes: torch.Tensor) -> None:
        super().__init__()
        self.model = model
        flat = prototypes.flatten(1)
        self.register_buffer("weight", 2 * flat)
        self.register_buffer("bias", -flat.pow(2).sum(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x) + nn.functional.linear(x.flatten(1), self.weight, self.bias)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000, help="Fashion-MNIST test images")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (PGD uses half + 1)")
    parser.add_argument("--train-steps", type=int, default=150)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--gpu-n", type=int, default=512)
    parser.add_argument("--gpu-batch-size", type=int, default=128)
    parser.add_argument("--no-write", action="store_true", help="print instead of writing BENCHMARKS.md")
    # For benchmarks/gpu.sh: only the GPU part, into its own section; its --dry-run runs it tiny on the CPU.
    parser.add_argument("--gpu-only", action="store_true", help="only the ResNet-50 GPU part")
    parser.add_argument("--gpu-device", default="cuda", help="device of the GPU part (cpu for a dry run)")
    parser.add_argument("--gpu-model", default="resnet50", help="model of the GPU part (a tiny one for a dry run)")
    parser.add_argument("--gpu-size", type=int, default=224, help="image side of the GPU part")
    parser.add_argument("--gpu-rounds", type=int, default=3, help="timed FGSM rounds of the GPU part (PGD: one less)")
    args = parser.parse_args()
    if args.gpu_only:
        text = f"## attacks-gpu: ResNet-50 images/s under FGSM and PGD-10\n\nMachine: {machine()}.\n" + gpu_part(args)
        print(text)
        if not args.no_write:
            write_section("attacks-gpu", text)
        return
    text = cpu_part(args)
    if torch.cuda.is_available():
        text += "\n" + gpu_part(args)
    else:
        text += "\n\nGPU part (ResNet-50, 224x224, synthetic 1,000 classes): not run, no CUDA on this machine."
    print(text)
    if not args.no_write:
        write_section("attacks", text)


if __name__ == "__main__":
    main()
