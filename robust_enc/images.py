"""What every data set is made of: ``DatasetInfo`` (what a model and a result row need to know about a split),
in-memory images, image files that survive corrupt ones, and the evaluation transform split into decode (uint8, what
the decode cache stores) and ``to_float``. Images are float32 in [0, 1] (C, H, W); labels are integers.

Sets made of bytes (Fashion-MNIST, CIFAR, image files, the decode cache) also have a uint8 form: ``uint8_view`` gives
their items as bytes (a quarter of float32's through DataLoader workers), and ``to_float_images`` converts a batch on
the device through a 256-entry table of the set's own conversion, so the floats are bit for bit the items' on any
device.
"""

from __future__ import annotations

import logging
import multiprocessing
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from robust_enc.errors import UserError
from robust_enc.preprocessing import Preprocessing, suite_preprocessing

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DatasetInfo:
    """Metadata a model and a result row need about a data set split."""

    name: str  # registry name as given, e.g. "digits" or "folder:/data/x"
    split: str  # "train", "test" or "val"
    num_classes: int
    input_shape: tuple[int, int, int]  # (C, H, W) of one image as the model sees it
    mean: tuple[float, ...]  # per channel, for the model's normalizer
    std: tuple[float, ...]
    size: int  # number of examples (after --subset)
    subset: int = 0  # subset size evaluated (at most the split's size); 0 = whole split
    class_names: tuple[str, ...] = field(default=(), compare=False)
    # Provenance a result row records (``data.build_dataset`` fills them; "" = not recorded):
    image_set: str = field(default="", compare=False)  # digest of (data set, split, the indices or the file list)
    preprocessing: str = field(default="", compare=False)  # image files: their decode ("resize 256 bilinear, crop 224")
    pixels: str = field(default="", compare=False)  # "decoded", or "cache <key>" when the decode cache serves them

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DatasetInfo:
        data = dict(data)
        for key in ("input_shape", "mean", "std", "class_names"):
            data[key] = tuple(data.get(key, ()))
        return cls(**data)


def bytes_to_unit(x: torch.Tensor) -> torch.Tensor:
    """uint8 k -> float32 k / 255 (a true division): how Fashion-MNIST and CIFAR images have always been scaled."""
    return x.float().div_(255)


class TensorImages(Dataset):
    """In-memory images (N, C, H, W) with int64 labels; an optional per-item transform (crops and flips: they move
    pixels, so they commute with the scaling). ``images``: float32 in [0, 1], or uint8 k standing for k / 255 (a
    quarter of the memory); items always come out float32."""

    def __init__(self, images: torch.Tensor, y: torch.Tensor, transform: Callable | None = None) -> None:
        assert images.dtype in (torch.float32, torch.uint8) and images.ndim == 4 and len(images) == len(y)
        self.images, self.y, self.transform = images, y.long(), transform

    @property
    def x(self) -> torch.Tensor:
        """All images as float32 [N, C, H, W] in [0, 1] (converted on each access when stored as bytes)."""
        return bytes_to_unit(self.images) if self.images.dtype == torch.uint8 else self.images

    def __len__(self) -> int:
        return len(self.images)

    def uint8_item(self, i: int) -> tuple[torch.Tensor, int]:
        x = self.images[i]
        return (self.transform(x) if self.transform else x), int(self.y[i])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x, label = self.uint8_item(i)
        return (bytes_to_unit(x) if x.dtype == torch.uint8 else x), label

    @property
    def uint8_levels(self) -> torch.Tensor | None:
        """[256] float32: the value of each byte (None: stored as floats, no uint8 form)."""
        return bytes_to_unit(torch.arange(256, dtype=torch.uint8)) if self.images.dtype == torch.uint8 else None

    @property
    def targets(self) -> list[int]:
        return self.y.tolist()


class ImageFiles(Dataset):
    """Image files with known labels: ``samples`` = [(path, label)], decoded with ``transform``, then ``finish``
    (None: the transform's output is final). A corrupt file survives: its item gets label -1, is logged by path,
    counted in a counter shared with DataLoader workers, and dropped by ``collate_readable``."""

    def __init__(self, samples: Sequence[tuple[str, int]], transform: Callable,
                 finish: Callable | None = None) -> None:
        self.samples = [(str(path), int(label)) for path, label in samples]
        self.targets = [label for _, label in self.samples]
        self.transform, self.finish = transform, finish
        self.unreadable = multiprocessing.Value("i", 0)  # shared memory: forked workers add to the same count

    def __len__(self) -> int:
        return len(self.samples)

    def uint8_item(self, i: int) -> tuple[torch.Tensor, int]:
        """The decoded image before ``finish`` (uint8 for the standard transforms)."""
        from torchvision.datasets.folder import default_loader

        path, label = self.samples[i]
        try:
            return self.transform(default_loader(path)), label  # PIL, converted to RGB (ImageNet has CMYK/grey JPEGs)
        except Exception as err:  # PIL raises many types for corrupt files
            with self.unreadable.get_lock():
                self.unreadable.value += 1
            log.warning("skipping unreadable image %s (%s)", path, err)
            return torch.zeros(0), -1

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x, label = self.uint8_item(i)
        return (self.finish(x) if self.finish is not None and label >= 0 else x), label

    @property
    def uint8_levels(self) -> torch.Tensor | None:
        return levels_of(self.finish) if self.finish is not None else None


class SafeImageFolder(ImageFiles):
    """torchvision ImageFolder (classes = the folders present, sorted) that survives corrupt files (``ImageFiles``)."""

    def __init__(self, root: Path, transform: Callable, finish: Callable | None = None) -> None:
        from torchvision.datasets import ImageFolder

        try:
            folder = ImageFolder(str(root))
        except (FileNotFoundError, RuntimeError) as err:
            raise UserError(f"cannot read image folder {root}: {err}") from None
        super().__init__(folder.samples, transform, finish)
        self.classes = tuple(folder.classes)


def collate_readable(batch: Sequence[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Default collation minus the items ``SafeImageFolder`` marked unreadable (label -1)."""
    from torch.utils.data import default_collate

    kept = [item for item in batch if item[1] >= 0]
    if not kept:
        return torch.zeros(0), torch.zeros(0, dtype=torch.long)
    return default_collate(kept)


def unreadable_count(dataset: Dataset) -> int:
    """Number of files skipped as unreadable so far (0 for data sets that cannot have any)."""
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    counter = getattr(dataset, "unreadable", None)
    return int(counter.value) if counter is not None else 0


def eval_decode_transform(image_size: int) -> Callable:
    """PIL image -> uint8 (3, S, S): resize the short side to S * 256 / 224, centre crop S (the standard ImageNet
    evaluation, the suite's own ``preprocessing.suite_preprocessing``). What the decode cache stores; ``to_float``
    finishes it."""
    return suite_preprocessing(image_size).decode_transform()


def to_float() -> Callable:
    """uint8 image -> float32 in [0, 1]: the last step of the evaluation transform, cached or not (torchvision's
    scaling, a multiplication by 1/255: in float32 it differs from ``bytes_to_unit``'s division for 126 of 256 bytes,
    so each set keeps its own)."""
    from torchvision.transforms import v2

    return v2.ToDtype(torch.float32, scale=True)


def levels_of(finish: Callable) -> torch.Tensor:
    """[256] float32: what ``finish`` makes of each byte value (an element-wise conversion is then a table lookup)."""
    return finish(torch.arange(256, dtype=torch.uint8).view(1, 1, 256)).flatten()


def image_folder_transform(train: bool, image_size: int, preprocessing: Preprocessing | None = None) -> Callable:
    """Decode to uint8 (3, S, S); ``to_float`` finishes it. ``preprocessing``: the model's evaluation transform
    (default: the suite's own at ``image_size``)."""
    from torchvision.transforms import v2

    # The standard ImageNet recipes: random-resized crop + flip for training; resize 256 / centre crop 224 to evaluate.
    if train:
        return v2.Compose([v2.ToImage(), v2.RandomResizedCrop(image_size, antialias=True), v2.RandomHorizontalFlip()])
    return (preprocessing or suite_preprocessing(image_size)).decode_transform()


class Uint8Items(Dataset):
    """``dataset``'s items in their uint8 form (same order and labels, Subsets included); ``levels`` [256] float32
    turns them into the items' floats (``to_float_images``)."""

    def __init__(self, dataset: Dataset, levels: torch.Tensor) -> None:
        self.dataset, self.levels = dataset, levels

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        dataset = self.dataset
        while isinstance(dataset, Subset):
            dataset, i = dataset.dataset, dataset.indices[i]
        return dataset.uint8_item(i)


def uint8_view(dataset: Dataset) -> Dataset:
    """``Uint8Items`` of ``dataset`` when its images are bytes; else ``dataset`` itself (float items)."""
    base = dataset
    while isinstance(base, Subset):
        base = base.dataset
    levels = getattr(base, "uint8_levels", None)
    return Uint8Items(dataset, levels) if levels is not None else dataset


def loader_levels(loader: DataLoader, device: torch.device) -> torch.Tensor | None:
    """The byte -> float table of a loader's uint8 images, on ``device`` (None: the loader yields floats)."""
    dataset = loader.dataset
    return dataset.levels.to(device) if isinstance(dataset, Uint8Items) else None


def to_float_images(x: torch.Tensor, levels: torch.Tensor | None) -> torch.Tensor:
    """A batch as float32 in [0, 1] on its device: uint8 through the table ``levels`` (bit for bit the item's float,
    whatever the device's arithmetic), floats unchanged."""
    if levels is None or x.dtype != torch.uint8:
        return x
    return levels[x.int()]  # int, not uint8: a uint8 index would be read as a mask
