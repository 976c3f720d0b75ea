"""ImageNet-style evaluation input and model: JPEG decoding against the decode cache, baked ENC against parametrized.

1. Decode vs cache: a val/<wnid>/ tree of 500x375 JPEGs (ImageNet's typical size; seeded smooth images plus noise,
   quality 90) read through the DataLoader with the evaluation transform (resize 256, centre crop 224), against the
   same images read from the memory-mapped cache (``robust_enc.cache``). Both loaders use the same batch size and
   workers and alternate round by round; images/s are medians, the speed-up the median per-round ratio.
2. FGSM (``robust_enc.attacks.benchmark``, eps 8/255) on a ResNet-50 with ENC as parametrizations (each weight
   normalized in every forward pass) against the same model baked into plain weights (``bake_model``), alternating.
   On the CPU the images are small (32x32) on purpose: the normalization's cost grows with the 23.5M weights, not
   with batch x pixels, so it only shows where the convolutions are cheap; on a GPU it is many small kernels per pass.

    .venv/bin/python -m benchmarks.bench_imagenet                          # CPU, writes BENCHMARKS.md
    .venv/bin/python -m benchmarks.bench_imagenet --device cuda --section imagenet-gpu --jpegs 2048 --workers 8 \\
        --model-n 512 --model-size 224 --model-batch 128
    .venv/bin/python -m benchmarks.bench_imagenet --jpegs 16 --model resnet_tiny --model-n 4 --model-size 32 \\
        --rounds 1 --no-write
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from benchmarks._common import alternate, machine, write_section
from robust_enc.attacks import evaluate_model
from robust_enc.data import build_dataset, build_loader
from robust_enc.imagenet import canonical_wnids
from robust_enc.models import ModelSpec
from robust_enc.regularizers import bake_model, build_model

EPS = 8 / 255


def write_jpegs(root: Path, n: int, size: tuple[int, int] = (500, 375), classes: int = 10) -> int:
    """n seeded JPEGs under root/val/<wnid>/; returns their total bytes."""
    rng = np.random.default_rng(0)
    wnids = canonical_wnids()
    total = 0
    for i in range(n):
        folder = root / "val" / wnids[(i % classes) * 97]
        folder.mkdir(parents=True, exist_ok=True)
        low = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize(size, Image.BICUBIC)
        noisy = np.asarray(low, dtype=np.int16) + rng.integers(-24, 25, (size[1], size[0], 3))
        path = folder / f"ILSVRC2012_val_{i + 1:08d}.JPEG"
        Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(path, "JPEG", quality=90)
        total += path.stat().st_size
    return total


def read_all(dataset, batch_size: int, workers: int) -> int:
    n = 0
    for _, y in build_loader(dataset, batch_size=batch_size, workers=workers):
        n += len(y)
    return n


def decode_vs_cache(args: argparse.Namespace, folder: Path) -> list[str]:
    jpeg_bytes = write_jpegs(folder / "data", args.jpegs)
    decoded, _ = build_dataset("imagenet", "val", data_dir=str(folder / "data"))
    start = time.perf_counter()
    cached, _ = build_dataset("imagenet", "val", data_dir=str(folder / "data"), cache=str(folder / "cache"),
                              workers=args.workers)
    build_s = time.perf_counter() - start
    cache_bytes = sum(p.stat().st_size for p in cached.folder.iterdir())
    assert all(torch.equal(decoded[i][0], cached[i][0]) for i in range(min(4, len(cached))))
    t_decode, t_cache = alternate(lambda: read_all(decoded, args.batch_size, args.workers),
                                  lambda: read_all(cached, args.batch_size, args.workers), args.rounds, False)
    n = args.jpegs
    ratio = statistics.median(d / c for d, c in zip(t_decode, t_cache))
    return [
        f"Decode vs cache: {n} JPEGs of 500x375 ({jpeg_bytes / n / 1e3:.0f} kB each) -> float32 3x224x224 through "
        f"the DataLoader, batch {args.batch_size}, {args.workers} workers, {args.rounds} alternating rounds. The "
        f"cache was built once in {build_s:.1f} s ({n / build_s:,.0f} img/s, {cache_bytes / n / 1e3:.0f} kB per "
        "image on disk, uint8).",
        "",
        "| input | images/s | seconds per pass |",
        "|---|---|---|",
        f"| JPEG decode + resize 256 + centre crop 224 | {n / statistics.median(t_decode):,.0f} | "
        f"{statistics.median(t_decode):.2f} |",
        f"| memory-mapped cache (uint8 -> float) | {n / statistics.median(t_cache):,.0f} | "
        f"{statistics.median(t_cache):.2f} |",
        f"| cache speed-up (median per-round ratio) | {ratio:.1f}x | |",
    ]


def baked_vs_parametrized(args: argparse.Namespace) -> list[str]:
    size = args.model_size
    data, info = build_dataset(f"synthetic:3x{size}x{size}:10:{args.model_n}", "test")
    spec = ModelSpec(args.model, 10, info.input_shape, info.mean, info.std, regularizer="enc")
    torch.manual_seed(0)
    parametrized = build_model(spec).eval()
    # Not bake_model(copy.deepcopy(...)): a deep copy shares torch's generated Parametrized* classes, so removing the
    # copy's parametrizations deletes the original's weight property too. A fresh model with the same state instead.
    baked = build_model(spec)
    baked.load_state_dict(parametrized.state_dict())
    baked = bake_model(baked).eval()

    def fgsm(model: torch.nn.Module) -> Callable[[], object]:
        return lambda: evaluate_model(model, data, info=info, attacks=("fgsm",), eps=(EPS,),
                                      batch_size=args.model_batch, device=args.device)

    rows_p, rows_b = fgsm(parametrized)(), fgsm(baked)()
    same = [(r.clean_top1, r.adv_top1) for r in rows_p] == [(r.clean_top1, r.adv_top1) for r in rows_b]
    t_param, t_baked = alternate(fgsm(parametrized), fgsm(baked), args.rounds, args.device.startswith("cuda"))
    n = args.model_n
    ratio = statistics.median(p / b for p, b in zip(t_param, t_baked))
    return [
        f"FGSM (suite, eps 8/255, clean pass + one gradient + adversarial pass) on {args.model} with ENC (eq. 22, "
        f"every conv/linear layer), synthetic 3x{size}x{size}, N = {n}, batch {args.model_batch}, {args.rounds} "
        "alternating rounds; "
        f"the two give {'the same' if same else 'DIFFERENT'} accuracies.",
        "",
        "| model | images/s | seconds |",
        "|---|---|---|",
        f"| ENC as parametrizations (normalized every forward pass) | {n / statistics.median(t_param):,.1f} | "
        f"{statistics.median(t_param):.2f} |",
        f"| ENC baked into plain weights (what `robust-enc attack` runs) | {n / statistics.median(t_baked):,.1f} | "
        f"{statistics.median(t_baked):.2f} |",
        f"| parametrized / baked time (median per-round ratio) | {ratio:.2f}x | |",
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jpegs", type=int, default=256, help="500x375 JPEGs generated for decode vs cache")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers for both inputs")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--model", default="resnet50", help="model registry name for the FGSM comparison")
    parser.add_argument("--model-n", type=int, default=32, help="images for the FGSM comparison")
    parser.add_argument("--model-size", type=int, default=32, help="image side for the FGSM comparison")
    parser.add_argument("--model-batch", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--skip-fgsm", action="store_true", help="decode vs cache only (no ART installed)")
    parser.add_argument("--section", default="imagenet", help="BENCHMARKS.md section to write")
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-imagenet-") as tmp:
        decode = decode_vs_cache(args, Path(tmp))
    print("\n".join(decode), flush=True)
    fgsm = ["FGSM comparison skipped (--skip-fgsm)."] if args.skip_fgsm else baked_vs_parametrized(args)
    command = " ".join(["benchmarks/bench_imagenet.py", *(argv if argv is not None else __import__("sys").argv[1:])])
    text = "\n".join([
        f"## {args.section}: JPEG decode vs the decode cache, baked vs parametrized ENC under FGSM",
        "",
        f"Machine: {machine()}; device {args.device}; load average {os.getloadavg()[0]:.1f} when it ended. "
        f"`{command.strip()}`. Shared cores jitter: read the ratios.",
        "",
        *decode,
        "",
        *fgsm,
    ])
    print("\n".join(fgsm))
    if not args.no_write:
        write_section(args.section, text)


if __name__ == "__main__":
    main()
