"""Shared by the benchmark scripts: the machine's description and writing one section of BENCHMARKS.md."""

from __future__ import annotations

import os
import platform
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from robust_enc.io import write_text_atomic

BENCHMARKS_MD = Path(__file__).resolve().parent.parent / "BENCHMARKS.md"
HEADER = "# Benchmarks\n\nWritten by the scripts in `benchmarks/`; each section names the machine it ran on.\n"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no GPU"
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads)"
            f"{gpu}, Python {platform.python_version()}")


def median_time(fn: Callable[[], object], repeats: int, warmup: int = 2, sync: bool = False) -> float:
    """Median wall seconds of ``fn()`` over ``repeats`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if sync:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if sync:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def write_section(name: str, markdown: str) -> None:
    """Replace (or add) the section ``name`` of BENCHMARKS.md, leaving the others as they are."""
    text = BENCHMARKS_MD.read_text() if BENCHMARKS_MD.exists() else HEADER
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    block = f"{start}\n{markdown.strip()}\n{end}"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    write_text_atomic(BENCHMARKS_MD, text)


def alternate(a: Callable[[], object], b: Callable[[], object], rounds: int,
              sync: bool) -> tuple[list[float], list[float]]:
    """Seconds of a and b over ``rounds`` rounds, swapping which goes first each round; one warm-up of each."""
    a(), b()
    times: tuple[list[float], list[float]] = ([], [])
    for r in range(rounds):
        order = [(0, a), (1, b)][:: 1 if r % 2 == 0 else -1]
        for k, fn in order:
            if sync:
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if sync:
                torch.cuda.synchronize()
            times[k].append(time.perf_counter() - start)
    return times
