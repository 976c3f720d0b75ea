"""Decode once: the evaluation transform's output stored in a memory-mapped file, read by every later evaluation.

A study attacks 11 models with several attacks over the same images; decoding and resizing JPEGs each time costs
more than FGSM on a GPU. ``--cache DIR`` (or ``robust-enc cache``) stores what the model's decode transform
(``preprocessing.Preprocessing``: by default the suite's resize of the short side to 256, centre crop 224; a timm
model's own resize, interpolation and crop) makes of each image, uint8 CHW, in
``DIR/<data set>-<split>-<key>/images.npy``; later runs memory-map it and finish with ``images.to_float``, so the
tensors are bit for bit those of the decoding path. The key hashes the data set, the decode transform (with
torchvision's and Pillow's versions, which decide the pixels; not mean/std, which live in the model) and the file list
(paths, sizes, labels, order): change any and a new cache is built beside the old one.

Never served stale: meta.json records each source file's size, mtime and sha256 and those of images.npy and
labels.npy. Every use compares the sizes and mtimes (a stat per file) and hashes the bytes of any that changed;
``robust-enc cache --verify`` hashes every byte. A stale or damaged cache is rebuilt (or refused under torchrun).

The file is written incrementally, one DataLoader batch at a time, into a temporary folder renamed into place when
complete: peak memory does not grow with the number of images, and a killed build leaves no half cache. Under
torchrun the first process of each node builds it and the others wait for the rename.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from robust_enc.errors import UserError
from robust_enc.images import (
    DatasetInfo,
    ImageFiles,
    collate_readable,
    levels_of,
    to_float,
)
from robust_enc.io import prepare_folder, temp_prefix
from robust_enc.preprocessing import Preprocessing, suite_preprocessing

log = logging.getLogger(__name__)

CACHE_FORMAT = 2  # bump when the stored layout changes: the key changes and old caches are left alone
# 2: meta.json records each source file's size, mtime and sha256, and images.npy's size, mtime and sha256
BUILD_BATCH = 64  # images decoded per write: bounds the memory a build holds


class CachedImages(Dataset):
    """The images of a built cache: (float32 (3, S, S) in [0, 1], label), memory-mapped per process."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        meta = json.loads((folder / "meta.json").read_text())
        self.size, self.meta = int(meta["size"]), meta
        self.targets = np.load(folder / "labels.npy").tolist()
        self.unreadable = multiprocessing.Value("i", int(meta["unreadable"]))  # skipped when the cache was built
        self.finish = to_float()
        self._images: np.ndarray | None = None  # opened lazily: each DataLoader worker maps the file itself

    def __len__(self) -> int:
        return self.size

    def uint8_item(self, i: int) -> tuple[torch.Tensor, int]:
        """The stored decoded image, uint8 (3, S, S)."""
        if self._images is None:
            self._images = np.load(self.folder / "images.npy", mmap_mode="r")
        return torch.from_numpy(np.array(self._images[i])), self.targets[i]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x, label = self.uint8_item(i)
        return self.finish(x), label

    @property
    def uint8_levels(self) -> torch.Tensor:
        return levels_of(self.finish)

    def __getstate__(self) -> dict[str, Any]:  # spawned workers get the path, not the mapping
        return {**self.__dict__, "_images": None}


def _image_files(dataset: Dataset) -> list[tuple[str, int]]:
    """The (path, label) list behind ``dataset`` (image files, or a Subset of them), in the order it yields them."""
    if isinstance(dataset, Subset):
        inner = _image_files(dataset.dataset)
        return [inner[i] for i in dataset.indices]
    if isinstance(dataset, ImageFiles):
        return list(dataset.samples)
    raise UserError("--cache stores decoded image files (imagenet, folder:PATH); this data set is already in memory "
                    "or generated, so it needs no cache: leave --cache out")


def transform_description(image_size: int, preprocessing: Preprocessing | None = None) -> str:
    """What the stored pixels depend on: the suite's own decode (its text as it always was, so existing caches stay
    valid) or the model's (``preprocessing``), and the libraries that compute it."""
    import PIL
    import torchvision

    if preprocessing is None or preprocessing.decode_text() == suite_preprocessing(image_size).decode_text():
        decode = f"resize {int(round(image_size * 256 / 224))} antialias, centre crop {image_size}, uint8 CHW"
    else:
        decode = preprocessing.decode_text()
    return f"{decode}; torchvision {torchvision.__version__}, Pillow {PIL.__version__}"


def cache_key(info: DatasetInfo, samples: list[tuple[str, int]], preprocessing: Preprocessing | None = None) -> str:
    files = []
    for path, label in samples:
        try:
            size = os.path.getsize(path)
        except OSError:
            size = -1  # unreadable now: decoding will count it as skipped
        files.append([os.path.abspath(path), size, label])
    payload = {"format": CACHE_FORMAT, "dataset": info.name, "split": info.split,
               "transform": transform_description(info.input_shape[1], preprocessing), "files": files}
    return hashlib.sha256(json.dumps(payload).encode()).hexdigest()[:16]


def cache_folder(cache_dir: str | Path, info: DatasetInfo, samples: list[tuple[str, int]],
                 preprocessing: Preprocessing | None = None) -> Path:
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", info.name).strip("_")[:60]
    return Path(cache_dir) / f"{name}-{info.split}-{cache_key(info, samples, preprocessing)}"


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def fingerprint(path: str | Path, *, with_digest: bool = True) -> list:
    """[size, mtime_ns, sha256] of a file ([-1, -1, ""] when it cannot be read): size and mtime are the cheap check
    made on every use, the digest the full one."""
    try:
        stat = os.stat(path)
        return [stat.st_size, stat.st_mtime_ns, file_digest(path) if with_digest else ""]
    except OSError:
        return [-1, -1, ""]


def build_cache(folder: Path, info: DatasetInfo, samples: list[tuple[str, int]], *, workers: int = 0,
                preprocessing: Preprocessing | None = None) -> None:
    """Decode ``samples`` with the evaluation transform into ``folder`` (images.npy uint8 (N, 3, S, S), labels.npy,
    meta.json), writing one batch at a time into a temporary folder renamed into place at the end."""
    _, height, width = info.input_shape
    # marked with this process's pid: a build killed mid-way leaves a temp folder as large as the cache, which the
    # next build here (or any atomic write into this folder) removes once its writer is dead
    prepare_folder(folder.parent)
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(folder.name), suffix=".tmp", dir=folder.parent))
    try:
        sources = [fingerprint(path) for path, _ in samples]  # before decoding: a file edited meanwhile shows as stale
        images = np.lib.format.open_memmap(tmp / "images.npy", mode="w+", dtype=np.uint8,
                                           shape=(len(samples), 3, height, width))
        labels = np.empty(len(samples), dtype=np.int64)
        decoder = ImageFiles(samples, (preprocessing or suite_preprocessing(height)).decode_transform())
        loader = DataLoader(decoder, batch_size=BUILD_BATCH, num_workers=workers, collate_fn=collate_readable)
        kept = 0
        for x, y in loader:
            if not len(y):  # a batch of unreadable files only
                continue
            images[kept: kept + len(y)] = x.numpy()
            labels[kept: kept + len(y)] = y.numpy()
            kept += len(y)
        images.flush()
        del images
        unreadable = len(samples) - kept  # their rows stay unused at the end of images.npy
        np.save(tmp / "labels.npy", labels[:kept])
        meta = {"format": CACHE_FORMAT, "dataset": info.name, "split": info.split, "size": kept,
                "unreadable": unreadable, "transform": transform_description(height, preprocessing),
                "requested": len(samples),
                "shape": [len(samples), 3, height, width], "images": fingerprint(tmp / "images.npy"),
                "labels": fingerprint(tmp / "labels.npy"),
                "sources": [[os.path.abspath(path), *print_] for (path, _), print_ in zip(samples, sources)]}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        if unreadable:
            log.warning("%d unreadable images were left out of the cache %s", unreadable, folder)
        try:
            os.replace(tmp, folder)
        except OSError:  # another process renamed the same cache into place first: keep theirs
            if not (folder / "meta.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def stale_reason(folder: Path, meta: dict[str, Any], *, full: bool = False) -> str:
    """Why the cache in ``folder`` may not be served ("" when it may): images.npy or a source file whose size or mtime
    changed and whose bytes no longer match the digest taken at build time. ``full``: check every byte (the digests of
    images.npy and of every source file) whatever their size and mtime say."""
    for name in ("images", "labels"):
        array, stored = folder / f"{name}.npy", meta.get(name) or [-1, -1, ""]
        now = fingerprint(array, with_digest=False)
        if now[0] != stored[0]:
            return f"{array.name} has {now[0]} bytes, the cache wrote {stored[0]} (truncated or replaced)"
        if (full or now[1] != stored[1]) and file_digest(array) != stored[2]:
            return f"{array.name}'s bytes changed since the cache was built"
    for path, size, mtime, digest in meta.get("sources", []):
        now = fingerprint(path, with_digest=False)
        if now[0] != size:
            return f"source image {path} changed size ({size} -> {now[0]} bytes)"
        if (full or now[1] != mtime) and size >= 0 and file_digest(path) != digest:
            return f"source image {path} changed since the cache was built (same size, other bytes)"
    return ""


def _build_logged(folder: Path, info: DatasetInfo, samples: list[tuple[str, int]], workers: int,
                  preprocessing: Preprocessing | None) -> None:
    log.warning("decoding %d images into the cache %s (once: later runs read it)", len(samples), folder)
    started = time.perf_counter()
    build_cache(folder, info, samples, workers=workers, preprocessing=preprocessing)
    log.warning("cache built in %.0f s", time.perf_counter() - started)


def cached_dataset(dataset: Dataset, info: DatasetInfo, cache_dir: str | Path, *, workers: int = 0,
                   verify: bool = False, preprocessing: Preprocessing | None = None) -> CachedImages:
    """``dataset``'s images from the cache under ``cache_dir``, building it first when there is none for this key
    (``preprocessing``: the model's decode, keyed; None = the suite's own).

    Every use checks the size and mtime of images.npy and of every source file (a stat each), and the bytes of those
    whose size or mtime changed; ``verify`` checks every byte. A stale or damaged cache is never served: it is rebuilt
    (one process), or refused with a line saying how to rebuild it (under torchrun, where other processes read it)."""
    samples = _image_files(dataset)
    if info.input_shape[0] != 3 or info.input_shape[1] != info.input_shape[2]:
        raise UserError(f"--cache stores square RGB images; {info.name} has {info.input_shape}")
    folder = cache_folder(cache_dir, info, samples, preprocessing)
    if Path(cache_dir).exists() and not Path(cache_dir).is_dir():
        raise UserError(f"--cache {cache_dir} is a file: give a folder (created if missing)")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if not (folder / "meta.json").is_file():
        if world > 1 and int(os.environ.get("LOCAL_RANK", "0")) != 0:
            log.warning("waiting for local rank 0 to build the cache %s", folder)
            while not (folder / "meta.json").is_file():  # torchrun ends every rank if the builder fails
                time.sleep(1.0)
        else:
            _build_logged(folder, info, samples, workers, preprocessing)
    meta = read_meta(folder)
    if reason := stale_reason(folder, meta, full=verify):
        if world > 1:
            raise UserError(f"the decode cache {folder} is stale: {reason}; rebuild it with 'robust-enc cache "
                            f"--cache {cache_dir}' (same data options) in one process before this run")
        log.warning("the decode cache %s is stale (%s): rebuilding it", folder, reason)
        shutil.rmtree(folder)
        _build_logged(folder, info, samples, workers, preprocessing)
        meta = read_meta(folder)
        if reason := stale_reason(folder, meta, full=True):  # the files change while being read
            raise UserError(f"the decode cache {folder} is stale right after its build ({reason}): are the images "
                            "being written to? Run again once they are not")
    return CachedImages(folder)


def read_meta(folder: Path) -> dict[str, Any]:
    """meta.json of a cache this version wrote; a damaged one or another format is a UserError saying to delete it."""
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"{folder}/meta.json is unreadable ({err.__class__.__name__}): delete {folder} and it is "
                        "rebuilt on the next use") from None
    if not isinstance(meta, dict) or meta.get("format") != CACHE_FORMAT:
        raise UserError(f"{folder} is not a cache this version reads: delete it")
    return meta
