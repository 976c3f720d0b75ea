"""Where every stage runs and in what arithmetic: ``--device`` resolved, the current CUDA device for a whole
evaluation, and strict fp32 (no TF32, no cuDNN autotuning) for attacks and GBR.

Why: ART builds some estimators on ``torch.cuda.current_device()`` (APGD makes its own ``PyTorchClassifier`` and
moves the caller's model there in place), so ``--device cuda:1`` must be the current device while an evaluation
runs. TF32 is on by default for cuDNN convolutions: "fp32" attacks and GBR would round convolution inputs to 10-bit
mantissas on Ampere and later GPUs. ``cudnn.benchmark`` (set by training for speed) picks kernels by timing, so two
runs of the same evaluation could differ.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from robust_enc.errors import UserError

# What ``strict_fp32`` enforces, as the results' provenance states it.
MEASUREMENT_PRECISION = "fp32 (TF32 off, cudnn.benchmark off)"


def resolve_device(name: str) -> torch.device:
    """``--device``: auto (cuda when available), cpu, cuda or cuda:N; a GPU torch cannot see is a UserError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"bad --device {name!r}: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name} asked for CUDA but torch sees no GPU; use --device cpu")
    return device


@contextlib.contextmanager
def strict_fp32() -> Iterator[None]:
    """float32 matmuls and cuDNN convolutions without TF32, and ``cudnn.benchmark`` off; every flag restored after.

    Uses ``torch.backends.cudnn.flags`` and ``set_float32_matmul_precision``: both exist in every supported torch
    and, unlike setting ``allow_tf32`` by hand, do not clash with the newer ``fp32_precision`` settings."""
    cudnn = torch.backends.cudnn
    matmul = torch.get_float32_matmul_precision()
    with cudnn.flags(enabled=cudnn.enabled, benchmark=False, deterministic=cudnn.deterministic, allow_tf32=False):
        torch.set_float32_matmul_precision("highest")
        try:
            yield
        finally:
            torch.set_float32_matmul_precision(matmul)


@contextlib.contextmanager
def current_device(device: torch.device) -> Iterator[None]:
    """Make ``device`` the current CUDA device for the block (nothing to do on the CPU)."""
    if device.type != "cuda":
        yield
        return
    with torch.cuda.device(device):
        yield
