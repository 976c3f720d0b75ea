"""benchmarks/gpu.sh, the prepared GPU run, in its CPU dry run: the same steps and code paths at tiny sizes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_gpu_script_dry_run_passes_and_leaves_benchmarks_alone(tmp_path):
    benchmarks_md = ROOT / "BENCHMARKS.md"
    before = benchmarks_md.read_bytes()
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT)}
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), "--dry-run"], capture_output=True, text=True,
                          env=env, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    summary = done.stdout[done.stdout.index("gpu.sh summary"):]
    for name in ("gpu-tests", "enc-overhead", "attacks", "channels-last", "imagenet"):
        assert f"{name}: ok" in summary, summary
    assert "torchrun-2gpu: skipped (needs 2 GPUs" in summary
    # Each step wrote its table: the rows the GPU run would put into BENCHMARKS.md.
    assert "bf16 autocast, channels_last" in (tmp_path / "enc-overhead.log").read_text()
    assert "| PGD-10 |" in (tmp_path / "attacks.log").read_text()
    assert "| PGD-10 |" in (tmp_path / "channels-last.log").read_text()
    imagenet = (tmp_path / "imagenet.log").read_text()
    assert "cache speed-up" in imagenet and "the same accuracies" in imagenet
    assert benchmarks_md.read_bytes() == before
