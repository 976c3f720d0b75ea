"""Data sets, one registry. Every data set yields float images in [0, 1] (C, H, W) and integer labels.

Normalization lives inside the model (``models.Normalize``), so attack eps is in pixel units. Small sets (digits,
Fashion-MNIST, CIFAR) sit in memory; ImageNet and other image folders stream through DataLoader workers.

Sets made of bytes also send uint8 batches through ``build_loader(..., uint8=True)`` (see ``images``).
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from robust_enc.errors import UserError
from robust_enc.images import (
    DatasetInfo,
    ImageFiles,
    SafeImageFolder,
    TensorImages,
    collate_readable,
    image_folder_transform,
    to_float,
    uint8_view,
)
from robust_enc.preprocessing import IMAGENET_MEAN, IMAGENET_STD, Preprocessing, suite_preprocessing
from robust_enc.registry import Registry

log = logging.getLogger(__name__)

FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian package dataset-fashion-mnist


Builder = Callable[..., tuple[Dataset, DatasetInfo]]
DATASETS: Registry[Builder] = Registry("dataset")


def _train_augment(image_size: int, flip: bool) -> Callable:
    from torchvision.transforms import v2

    steps: list = [v2.RandomCrop(image_size, padding=max(1, image_size // 8))]
    if flip:
        steps.append(v2.RandomHorizontalFlip())
    return v2.Compose(steps)


@DATASETS.register("digits", help="scikit-learn's bundled 8x8 digits (1,797 images, offline): the default")
def build_digits(split: str, *, augment: bool = False, **_: Any) -> tuple[Dataset, DatasetInfo]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = torch.tensor(bunch.images / 16.0, dtype=torch.float32).unsqueeze(1)  # values 0..16 -> [0, 1]
    y = torch.tensor(bunch.target)
    # A fixed, seeded, stratified 75/25 split: the same on every machine.
    idx_train, idx_test = train_test_split(np.arange(len(y)), test_size=0.25, random_state=0, stratify=bunch.target)
    idx = {"train": idx_train, "test": idx_test}.get(split)
    if idx is None:
        raise UserError(f"digits has splits train and test, not {split!r}")
    idx = np.sort(idx)
    mean, std = float(x[idx_train].mean()), float(x[idx_train].std())
    data = TensorImages(x[idx].contiguous(), y[idx], _train_augment(8, flip=False) if augment else None)
    return data, DatasetInfo("digits", split, 10, (1, 8, 8), (mean,), (std,), len(data))


IDX_UBYTE = 0x08  # the IDX type code of unsigned bytes, the only type (Fashion-)MNIST uses


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file of unsigned bytes (optionally gzipped) as a numpy array. A corrupt or truncated file (bad
    gzip stream, wrong magic number, fewer or more bytes than its header promises) is a UserError naming it."""
    opener = gzip.open if path.suffix == ".gz" else open
    bad = f"{path} is not a readable IDX file"
    fix = "delete it and reinstall dataset-fashion-mnist, or download it again with --download"
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as err:  # gzip raises BadGzipFile (an OSError) or EOFError when truncated
        raise UserError(f"{bad} ({err}); {fix}") from None
    # Magic number: two zero bytes, the type code, the number of dimensions.
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != IDX_UBYTE or not 1 <= raw[3] <= 4:
        raise UserError(f"{bad} (bad magic number {raw[:4].hex() or 'none'}, want 000008 then 01..04); {fix}")
    ndim = raw[3]
    offset = 4 + 4 * ndim
    if len(raw) < offset:
        raise UserError(f"{bad} (truncated header); {fix}")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected = offset + int(np.prod(shape))
    if len(raw) != expected:
        raise UserError(f"{bad} ({len(raw)} bytes, its header {shape} says {expected}: truncated or corrupt); {fix}")
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(shape)


def _find_fashion_file(stem: str, data_dir: str | None) -> Path | None:
    roots = [Path(data_dir)] if data_dir else []
    roots += [FASHION_MNIST_SYSTEM_DIR]
    for root in roots:
        for folder in (root, root / "FashionMNIST" / "raw"):
            for name in (f"{stem}.gz", stem):
                if (folder / name).is_file():
                    return folder / name
    return None


@DATASETS.register("fashion-mnist", help="Fashion-MNIST IDX files (--data-dir, Debian's package, or --download)")
def build_fashion_mnist(split: str, *, data_dir: str | None = None, download: bool = False, augment: bool = False,
                        **_: Any) -> tuple[Dataset, DatasetInfo]:
    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        raise UserError(f"fashion-mnist has splits train and test, not {split!r}")
    images = _find_fashion_file(f"{prefix}-images-idx3-ubyte", data_dir)
    labels = _find_fashion_file(f"{prefix}-labels-idx1-ubyte", data_dir)
    if images is None or labels is None:
        if not download:
            raise UserError("Fashion-MNIST files not found in --data-dir or /usr/share/datasets/fashion-mnist: "
                            "run 'apt-get install dataset-fashion-mnist', or pass --download on a networked machine")
        from torchvision.datasets import FashionMNIST

        root = Path(data_dir or "data")
        FashionMNIST(str(root), train=split == "train", download=True)
        return build_fashion_mnist(split, data_dir=str(root), augment=augment)
    image_array, label_array = read_idx(images), read_idx(labels)
    if image_array.ndim != 3 or label_array.ndim != 1 or len(image_array) != len(label_array):
        raise UserError(f"{images} {image_array.shape} and {labels} {label_array.shape} are not matching images and "
                        "labels; reinstall dataset-fashion-mnist or download the files again with --download")
    x = torch.from_numpy(image_array.copy()).unsqueeze(1)  # uint8: scaled to [0, 1] per item (bytes_to_unit)
    y = torch.from_numpy(label_array.astype(np.int64))
    data = TensorImages(x, y, _train_augment(28, flip=True) if augment else None)
    # Mean/std of the training images (measured: 0.2860 / 0.3530).
    return data, DatasetInfo("fashion-mnist", split, 10, (1, 28, 28), (0.2860,), (0.3530,), len(data),
                             class_names=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                                          "Sneaker", "Bag", "Ankle boot"))


def _build_cifar(cls_name: str, registry_name: str, num_classes: int, mean: tuple, std: tuple) -> Builder:
    def build(split: str, *, data_dir: str | None = None, download: bool = False, augment: bool = False,
              **_: Any) -> tuple[Dataset, DatasetInfo]:
        import torchvision

        if split not in ("train", "test"):
            raise UserError(f"{registry_name} has splits train and test, not {split!r}")
        root = data_dir or "data"
        try:
            ds = getattr(torchvision.datasets, cls_name)(root, train=split == "train", download=download)
        except RuntimeError as err:
            raise UserError(f"{registry_name} not found under {root} ({err}); pass --data-dir or --download") from None
        x = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()  # uint8, scaled per item
        data = TensorImages(x, torch.tensor(ds.targets), _train_augment(32, flip=True) if augment else None)
        info = DatasetInfo(registry_name, split, num_classes, (3, 32, 32), mean, std, len(data),
                           class_names=tuple(ds.classes))
        return data, info

    return build


DATASETS.register("cifar10", help="CIFAR-10 via torchvision (--data-dir or --download)")(
    _build_cifar("CIFAR10", "cifar10", 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)))
DATASETS.register("cifar100", help="CIFAR-100 via torchvision (--data-dir or --download)")(
    _build_cifar("CIFAR100", "cifar100", 100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)))


@DATASETS.register("imagenet", evaluation_split="val",
                   help="ImageNet under --data-dir: val/<wnid>/ (all or some classes), torchvision's root, or the flat "
                        "ILSVRC2012_img_val/ with LOC_val_solution.csv or the devkit; labels in the 1,000-class order")
def build_imagenet(split: str, *, data_dir: str | None = None, augment: bool = False, image_size: int | None = None,
                   preprocessing: Preprocessing | None = None, **_: Any) -> tuple[Dataset, DatasetInfo]:
    from robust_enc import imagenet

    if not data_dir:
        raise UserError("imagenet needs --data-dir pointing at a folder with val/<wnid>/*.JPEG (and train/ to train), "
                        "torchvision's ImageNet root, or ILSVRC2012_img_val/ with LOC_val_solution.csv")
    size = image_size or 224
    layout, samples = imagenet.find_samples(Path(data_dir), split)
    log.info("imagenet %s: %d images, %s layout", split, len(samples), layout)
    prep = _evaluation_preprocessing(size, preprocessing)
    data = ImageFiles(samples, image_folder_transform(augment, size, prep), to_float())
    # Always the 1,000 classes in the standard order, whatever subset of them is on disk: a pretrained model's outputs.
    return data, DatasetInfo("imagenet", split, imagenet.NUM_CLASSES, (3, size, size), prep.mean, prep.std,
                             len(data), class_names=imagenet.class_names(), preprocessing=_decode_text(augment, prep))


@DATASETS.register("folder", takes_argument=True, evaluation_split="val",
                   help="any ImageFolder: folder:PATH (PATH/<class>/<image>)")
def build_folder(split: str, *, argument: str, augment: bool = False, image_size: int | None = None,
                 preprocessing: Preprocessing | None = None, **_: Any) -> tuple[Dataset, DatasetInfo]:
    root = Path(argument)
    if (root / split).is_dir():  # PATH/train, PATH/val layouts; otherwise PATH itself is the (evaluation) split
        root = root / split
    elif split == "train":  # a plain folder has no held-out part: training would validate on its own images
        raise UserError(f"folder:{argument} has no train/ subfolder: to train, lay it out as {argument}/train/<class>/ "
                        f"and {argument}/val/<class>/ (a plain folder of class folders serves evaluation only)")
    elif (root / "train").is_dir():  # PATH itself would be a "split" whose classes are train, val, ...
        raise UserError(f"folder:{argument} has train/ but no {split}/ subfolder: add {argument}/{split}/<class>/ or "
                        "choose a split it has")
    size = image_size or 224
    prep = _evaluation_preprocessing(size, preprocessing)
    data = SafeImageFolder(root, image_folder_transform(augment, size, prep), to_float())
    classes = data.classes
    return data, DatasetInfo(f"folder:{argument}", split, len(classes), (3, size, size), prep.mean, prep.std,
                             len(data), class_names=classes, preprocessing=_decode_text(augment, prep))


def _evaluation_preprocessing(size: int, given: Preprocessing | None) -> Preprocessing:
    """The model's preprocessing for image files at ``size`` (its crop), ImageNet mean/std where it leaves them open."""
    prep = given or suite_preprocessing(size)
    return replace(prep, mean=prep.mean or IMAGENET_MEAN, std=prep.std or IMAGENET_STD)


def _decode_text(augment: bool, prep: Preprocessing) -> str:
    return "random resized crop, flip" if augment else f"resize {prep.resize} {prep.interpolation}, crop {prep.crop}"


class SyntheticImages(Dataset):
    """Seeded images generated per index (nothing held in memory): a class prototype plus noise, so it is learnable."""

    def __init__(self, shape: tuple[int, int, int], num_classes: int, size: int, seed: int) -> None:
        self.shape, self.num_classes, self.size, self.seed = shape, num_classes, size, seed
        g = torch.Generator().manual_seed(seed)
        # Low-resolution prototypes upsampled, so the classes differ in smooth, learnable patterns.
        low = torch.rand(num_classes, shape[0], 4, 4, generator=g)
        self.prototypes = torch.nn.functional.interpolate(low, size=shape[1:], mode="bilinear", align_corners=False)
        self.targets = [i % num_classes for i in range(size)]

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        label = self.targets[i]
        x = self.prototypes[label] + 0.25 * torch.randn(self.shape, generator=g)
        return x.clamp_(0, 1), label


@DATASETS.register("synthetic", takes_argument=True, default_argument="3x32x32:10:512",
                   help="seeded random images: synthetic:CxHxW:CLASSES:N (bare 'synthetic' = 3x32x32:10:512)")
def build_synthetic(split: str, *, argument: str, **_: Any) -> tuple[Dataset, DatasetInfo]:
    try:
        shape_text, classes_text, size_text = argument.split(":")
        shape = tuple(int(v) for v in shape_text.lower().split("x"))
        num_classes, size = int(classes_text), int(size_text)
        assert len(shape) == 3 and min(shape) > 0 and num_classes > 1 and size > 0
    except (ValueError, AssertionError):
        raise UserError(f"bad synthetic spec {argument!r}: use synthetic:CxHxW:CLASSES:N, "
                        "e.g. synthetic:3x32x32:10:512") from None
    seed = {"train": 0, "test": 1, "val": 1}.get(split, 2)  # the splits are different images of the same classes
    data = SyntheticImages(shape, num_classes, size, seed)  # type: ignore[arg-type]
    channels = shape[0]
    return data, DatasetInfo(f"synthetic:{argument}", split, num_classes, shape, (0.5,) * channels,  # type: ignore
                             (0.25,) * channels, size)


def _targets(dataset: Dataset) -> list[int]:
    if isinstance(dataset, Subset):  # without this a Subset's labels would be read by loading every image
        inner = _targets(dataset.dataset)
        return [inner[i] for i in dataset.indices]
    targets = getattr(dataset, "targets", None)
    if targets is None:
        targets = [int(dataset[i][1]) for i in range(len(dataset))]
    return list(targets)


def balanced_subset(dataset: Dataset, n: int) -> Dataset:
    """``dataset`` itself when it has at most ``n`` examples, else its deterministic class-balanced subset of ``n``
    (``balanced_subset_indices``)."""
    if len(dataset) <= n:
        return dataset
    return Subset(dataset, balanced_subset_indices(_targets(dataset), n))


def balanced_subset_indices(targets: Sequence[int], n: int, seed: int = 0) -> list[int]:
    """A deterministic, class-balanced subset of ``n`` indices.

    Within each class the indices are shuffled with a fixed seed; classes then take turns (in class order) giving
    their next index until ``n`` are taken, so class counts differ by at most one while every class lasts. The
    result is sorted, so the subset is the same set, in the same order, on every machine.
    """
    targets = np.asarray(targets)
    rng = np.random.default_rng(seed)
    per_class = [rng.permutation(np.flatnonzero(targets == c)) for c in np.unique(targets)]
    chosen: list[int] = []
    depth = 0
    while len(chosen) < n and any(depth < len(p) for p in per_class):
        for p in per_class:
            if depth < len(p) and len(chosen) < n:
                chosen.append(int(p[depth]))
        depth += 1
    return sorted(chosen)


def evaluation_split(name: str) -> str:
    """The split models are evaluated on: "test", or "val" for ImageNet-style folder layouts."""
    return DATASETS.lookup(name)[0].meta.get("evaluation_split", "test")


def image_set_digest(name: str, split: str, items: Sequence[Any]) -> str:
    """The identity of an exact image set: sha256 (16 hex) of the data set, the split and its items in order (indices
    into the split for in-memory and generated sets; [path relative to the split's folder, label] for image files)."""
    payload = json.dumps({"dataset": name, "split": split, "items": list(items)}, separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _image_items(dataset: Dataset, root: str) -> list[Any]:
    """What identifies each image of ``dataset`` (a set, or a Subset of one), in order (see ``image_set_digest``)."""
    if isinstance(dataset, Subset):
        inner = _image_items(dataset.dataset, root)
        return [inner[i] for i in dataset.indices]
    if isinstance(dataset, ImageFiles):
        return [[os.path.relpath(path, root), label] for path, label in dataset.samples]
    return list(range(len(dataset)))


def _files_root(dataset: Dataset) -> str:
    """The folder all of a split's image files lie under ("" for other sets): paths are recorded relative to it, so
    the same images in another place are the same image set."""
    if not isinstance(dataset, ImageFiles) or not dataset.samples:
        return ""
    return os.path.commonpath([os.path.dirname(os.path.abspath(path)) for path, _ in dataset.samples])


def build_dataset(name: str, split: str, *, data_dir: str | None = None, download: bool = False, subset: int = 0,
                  augment: bool = False, image_size: int | None = None, subset_list: str | None = None,
                  cache: str | None = None, workers: int = 0, verify_cache: bool = False,
                  preprocessing: Preprocessing | None = None) -> tuple[Dataset, DatasetInfo]:
    """Build a registered data set split; ``subset`` > 0 takes a deterministic class-balanced subset (a ``subset`` at
    least the split's size is the whole split, recorded as its size), ``subset_list`` the image files a list names (in
    its order). ``cache``: a folder for the decoded evaluation images (``robust_enc.cache``), built on first use with
    ``workers`` DataLoader workers, every byte checked when ``verify_cache``. ``preprocessing``: the model's evaluation
    transform of image files (``preprocessing.Preprocessing``; its crop is the image size). The info records the image
    set's digest, the decode of image files and where the pixels come from."""
    entry, argument = DATASETS.lookup(name)
    if preprocessing is not None:
        image_size = preprocessing.crop
    if data_dir and not download and not Path(data_dir).is_dir():  # not a silent fallback to the system copy
        raise UserError(f"--data-dir {data_dir} is not a folder; give the folder holding the {name} files, or leave "
                        "--data-dir out to use the default location")
    kwargs: dict[str, Any] = dict(data_dir=data_dir, download=download, augment=augment, image_size=image_size,
                                  preprocessing=preprocessing)
    if argument is not None:
        kwargs["argument"] = argument
    dataset, info = entry.obj(split, **kwargs)
    if subset < 0:
        raise UserError(f"--subset must be >= 0 (0 = whole split), got {subset}")
    if len(dataset) == 0:
        raise UserError(f"data set {name} split {split} is empty")
    root = _files_root(dataset)
    if subset_list:
        from robust_enc.imagenet import select_listed

        if subset:
            raise UserError("give --subset N or --subset-list FILE, not both")
        if not isinstance(dataset, ImageFiles):
            raise UserError(f"--subset-list picks image files by name; {name} is not read from image files "
                            "(use imagenet or folder:PATH)")
        dataset = ImageFiles(select_listed(dataset.samples, subset_list), dataset.transform, dataset.finish)
        info = dataclasses.replace(info, size=len(dataset), subset=len(dataset))
    elif subset:
        dataset = Subset(dataset, balanced_subset_indices(_targets(dataset), subset))
        info = dataclasses.replace(info, size=len(dataset), subset=len(dataset))  # what ran: 450 of --subset 100000
    # info.preprocessing (the decode of image files, "" for stored arrays) comes from the data set's entry
    info = dataclasses.replace(info, image_set=image_set_digest(info.name, split, _image_items(dataset, root)),
                               pixels="decoded")
    if cache:
        from robust_enc.cache import cached_dataset

        if augment:
            raise UserError("--cache stores the evaluation transform (resize + centre crop); training augments each "
                            "epoch anew, so it cannot use the cache")
        dataset = cached_dataset(dataset, info, cache, workers=workers, verify=verify_cache,
                                 preprocessing=preprocessing)
        info = dataclasses.replace(info, pixels=f"cache {dataset.folder.name.rsplit('-', 1)[-1]}")
    return dataset, info


def _base(dataset: Dataset) -> Dataset:
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return dataset


def build_loader(dataset: Dataset, *, batch_size: int, shuffle: bool = False, workers: int = 0, seed: int = 0,
                 sampler: torch.utils.data.Sampler | None = None, drop_last: bool = False,
                 uint8: bool = False) -> DataLoader:
    """A DataLoader that drops unreadable images and, when shuffling, shuffles reproducibly from ``seed``. Its
    workers persist between passes (training reads its validation loader every epoch: no re-fork each time).
    ``uint8``: batches of the uint8 form where the data set has one (``uint8_view``); the caller converts them on its
    device with ``to_float_images(x, loader_levels(loader, device))``."""
    if batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {batch_size}")
    if workers < 0:
        raise UserError(f"--workers must be >= 0 (0 loads in the main process), got {workers}")
    generator = torch.Generator().manual_seed(seed)
    if uint8:
        dataset = uint8_view(dataset)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
                      num_workers=workers, collate_fn=collate_readable, generator=generator, drop_last=drop_last,
                      persistent_workers=workers > 0, pin_memory=torch.cuda.is_available())
