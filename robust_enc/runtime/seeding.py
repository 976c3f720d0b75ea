"""Seeds and random states: seeding every generator at once, seeds derived per stream, RNG states saved in a form
``torch.load(weights_only=True)`` reads, and a block whose seeding does not leak into the caller's streams."""

from __future__ import annotations

import contextlib
import hashlib
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed random, numpy and torch (CUDA included) together: ART's random starts draw from numpy's global RNG,
    timm's mixing from numpy's, augmentations from torch's."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def stream_seed(seed: int, *parts: int) -> int:
    """A distinct, deterministic seed per (seed, parts...): ranks and epochs get independent streams."""
    for part in parts:
        seed = (seed * 1_000_003 + part + 1) % 2**63
    return seed


def seed_for(seed: int, batch: int, attack: str, eps: float) -> int:
    """The seed of one (global batch, attack, eps): the same whichever other batches, attacks or processes run."""
    text = f"{seed}|{batch}|{attack}|{eps!r}"
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")


@contextlib.contextmanager
def restored_rng() -> Iterator[None]:
    """Per-batch seeding inside the block must not leak into the caller's random streams."""
    state = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None  # manual_seed seeds CUDA too
    try:
        yield
    finally:
        random.setstate(state[0])
        np.random.set_state(state[1])
        torch.random.set_rng_state(state[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def safe_rng_state(state: dict[str, Any]) -> dict[str, Any]:
    """{"torch", "numpy", "python", "cuda"} RNG states as ``weights_only``-loadable values: numpy's MT19937 tuple as a
    dict with an int64 key tensor, python's state tuple as a list. Already-safe states pass through unchanged."""
    numpy_state, python_state = state["numpy"], state["python"]
    if isinstance(numpy_state, tuple):  # np.random.get_state(): (name, uint32 key[624], pos, has_gauss, gauss)
        name, key, pos, has_gauss, gauss = numpy_state
        numpy_state = {"name": str(name), "key": torch.from_numpy(key.astype("int64")), "pos": int(pos),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)}
    if isinstance(python_state, tuple):  # random.getstate(): (version, 625 ints, gauss_next)
        python_state = [python_state[0], list(python_state[1]), python_state[2]]
    return {"torch": state["torch"], "numpy": numpy_state, "python": python_state, "cuda": state.get("cuda")}


def live_rng_state(state: dict[str, Any]) -> dict[str, Any]:
    """The inverse of ``safe_rng_state``: values that np.random.set_state and random.setstate take."""
    numpy_state = state["numpy"]
    numpy_state = (numpy_state["name"], numpy_state["key"].numpy().astype("uint32"), numpy_state["pos"],
                   numpy_state["has_gauss"], numpy_state["gauss"])
    version, internal, gauss_next = state["python"]
    return {"torch": state["torch"], "numpy": numpy_state, "python": (version, tuple(internal), gauss_next),
            "cuda": state.get("cuda")}


def capture_rng(device: torch.device) -> dict[str, Any]:
    """This process's random streams (and ``device``'s CUDA stream), safe to store in a checkpoint."""
    return safe_rng_state({"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
                           "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None})


def restore_rng(state: dict[str, Any], device: torch.device) -> None:
    """Set this process's random streams from ``capture_rng``'s output."""
    state = live_rng_state(state)
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], device)
