"""Host-device traffic without a GPU: a stand-in accelerator whose tensors hold real CPU values but report another
device, so every copy between the host and "the device" shows up as an op (and mixing the two fails, as on CUDA)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

from robust_enc.attacks import art_adapter
from robust_enc.attacks.evaluation import evaluate_model
from robust_enc.data import build_dataset, build_loader
from robust_enc.images import (
    TensorImages,
    bytes_to_unit,
    levels_of,
    loader_levels,
    to_float,
    to_float_images,
    uint8_view,
)
from robust_enc.models import ModelSpec, frozen
from robust_enc.regularizers import build_model
from robust_enc.train.epoch import train_one_epoch
from robust_enc.train.recipe import build_recipe

# The stand-in accelerator is torch's "meta" device (it has no storage of its own, so nothing else can put real
# values there, and autograd runs its backward on the CPU thread); the values live in a CPU tensor inside.
DEVICE = torch.device("meta")
aten = torch.ops.aten


@dataclass
class Traffic:
    """What crossed between host and device: element counts of each copy, and host reads the device had to wait for."""

    uploads: list[int] = field(default_factory=list)  # host -> device copies (elements)
    downloads: list[int] = field(default_factory=list)  # device -> host copies and scalar reads (elements)
    syncs: list[str] = field(default_factory=list)  # ops whose result size or value the host needs (nonzero, ...)

    def scalars(self) -> int:
        """Elements moved in either direction plus syncs: each a scalar when nothing image-sized moves."""
        return sum(self.uploads) + sum(self.downloads) + len(self.syncs)


TRAFFIC = Traffic()


def _on_device(tensor: torch.Tensor) -> bool:
    return isinstance(tensor, OnDevice)


def _bool_index(args: tuple) -> bool:
    flat, _ = tree_flatten(args[1:])
    return any(isinstance(a, torch.Tensor) and a.dtype == torch.bool for a in flat)


# Ops whose output shape or value the host must read from the device (on CUDA: a synchronising copy).
SYNCING = {aten.nonzero.default, aten.masked_select.default, aten.equal.default, aten.is_nonzero.default,
           aten.unique_consecutive.default, aten._unique2.default}


class OnDevice(torch.Tensor):
    """A tensor on the stand-in device: reports ``DEVICE``, computes on the CPU tensor ``elem`` it wraps."""

    @staticmethod
    def __new__(cls, elem: torch.Tensor) -> OnDevice:
        wrapped = torch.Tensor._make_wrapper_subclass(cls, elem.shape, strides=elem.stride(), dtype=elem.dtype,
                                                      storage_offset=elem.storage_offset(), device=DEVICE,
                                                      requires_grad=elem.requires_grad, layout=elem.layout)
        wrapped.elem = elem
        return wrapped

    def __repr__(self) -> str:
        return f"OnDevice({self.elem!r})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is aten.copy_.default and not _on_device(args[1]):  # host -> device, in place
            TRAFFIC.uploads.append(args[1].numel())
            args[0].elem.copy_(args[1])
            return args[0]
        flat, _ = tree_flatten((args, kwargs))
        host = [a for a in flat if isinstance(a, torch.Tensor) and not _on_device(a)]
        if any(a.dim() > 0 for a in host):  # CUDA refuses this too (0-dim host tensors go by value)
            raise RuntimeError(f"{func}: tensors on the host and on the device mixed")
        TRAFFIC.uploads.extend(1 for _ in host)
        if func in SYNCING or (func in (aten.index.Tensor, aten.index_put_.default, aten.index_put.default)
                               and _bool_index(args)):
            TRAFFIC.syncs.append(str(func))

        def unwrap(a):
            return a.elem if _on_device(a) else a

        out = func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs))
        if func is aten._local_scalar_dense.default:  # .item(), int(), float(), bool()
            TRAFFIC.downloads.append(1)
            return out
        target = kwargs.get("device")
        if func is aten._to_copy.default and target is not None and torch.device(target) != DEVICE:
            TRAFFIC.downloads.append(out.numel())
            return out
        if func is aten.copy_.default:  # device -> host when the destination is a host tensor; else in place
            if not _on_device(args[0]):
                TRAFFIC.downloads.append(out.numel())
                return out
            return args[0]
        return tree_map(lambda o: OnDevice(o) if isinstance(o, torch.Tensor) else o, out)


class Uploads(TorchDispatchMode):
    """Tensors created on, or copied to, the stand-in device from the host (ops with no device tensor argument)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        target = kwargs.get("device")
        flat, _ = tree_flatten(args)
        if target is None or torch.device(target) != DEVICE or any(_on_device(a) for a in flat):
            return func(*args, **kwargs)
        if func is aten._to_copy.default:
            TRAFFIC.uploads.append(args[0].numel())
        return OnDevice(func(*args, **{**kwargs, "device": torch.device("cpu")}))


@contextmanager
def counted() -> Iterator[Traffic]:
    """Count the traffic of the block."""
    global TRAFFIC
    TRAFFIC = Traffic()
    with Uploads():
        yield TRAFFIC


def test_the_stand_in_device_sees_copies_and_scalar_reads():
    """The counter itself: an upload, a download, a scalar read, a sync and a host/device mix are each seen."""
    with counted() as traffic:
        x = torch.rand(3, 4).to(DEVICE)
        w = torch.nn.Linear(4, 2).to(DEVICE)
        logits = w(x)
        logits.sum().backward()
        assert isinstance(w.weight.grad, OnDevice) and w.weight.grad.device == DEVICE
        kept = logits[logits[:, 0] > 0]
        value = float(logits.detach().sum())
        back = kept.cpu()
        with pytest.raises(RuntimeError, match="mixed"):
            x + torch.ones(4)
    assert type(back) is torch.Tensor and value == pytest.approx(float(logits.elem.sum()))
    assert traffic.uploads == [12, 8, 2] and traffic.downloads == [1, back.numel()]
    assert traffic.syncs == ["aten.index.Tensor"]


def _pgd_traffic(steps: int, norm: str) -> Traffic:
    data, info = build_dataset("digits", "test", subset=16)
    x = torch.stack([data[i][0] for i in range(len(data))])
    y = torch.tensor([data[i][1] for i in range(len(data))])
    model = build_model(ModelSpec("resnet_tiny", 10, (1, 8, 8), info.mean, info.std))
    with frozen(model):
        classifier = art_adapter.build_classifier(model, num_classes=10, input_shape=(1, 8, 8), device="cpu")
        with counted() as traffic:
            model.to(DEVICE)  # in place: ART's wrapper holds the same module
            x_dev, y_dev = x.to(DEVICE), y.to(DEVICE)
            before = len(traffic.uploads), len(traffic.downloads)
            x_adv = art_adapter.pgd(classifier, x_dev, y_dev, eps=8 / 255, norm=norm, steps=steps, step_size=2 / 255,
                                    restarts=1, num_classes=10)
        assert isinstance(x_adv, OnDevice) and x_adv.shape == x.shape
    setup = sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers()) + x.numel() + len(y)
    assert sum(traffic.uploads[:before[0]]) == setup and before[1] == 0
    return Traffic(traffic.uploads[before[0]:], traffic.downloads, traffic.syncs)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_a_pgd_step_moves_no_images_between_host_and_device(norm):
    """PGD through ART's public ``loss_gradient`` on device tensors: every step's gradient, projection, random
    start and first-fooling bookkeeping stay on the device. Per step at most a few scalars cross (ART reads one flag
    from the labels), never an image-sized array (ART's own PGD uploads a float64 eps array of the batch's size every
    step; a numpy projection would download and upload the whole batch)."""
    traffic = _pgd_traffic(3, norm)
    assert not traffic.uploads and not traffic.downloads, traffic
    assert traffic.syncs == ["aten.equal.default"] * 3, traffic  # ART's are-the-labels-one-hot check, once a step


# ------------------------------------------------------------------------------------------------ uint8 batches
FASHION = "/usr/share/datasets/fashion-mnist"


def test_each_sets_byte_table_is_its_own_scaling():
    """Fashion-MNIST/CIFAR divide by 255, torchvision's ToDtype multiplies by 1/255: in float32 they differ for 126
    of the 256 bytes, so one shared table would change the numbers of one family. Each table equals numpy's
    float32 arithmetic of its rule."""
    codes = np.arange(256, dtype=np.float32)
    divided, multiplied = bytes_to_unit(torch.arange(256, dtype=torch.uint8)), levels_of(to_float())
    assert np.array_equal(divided.numpy(), codes / np.float32(255))
    assert np.array_equal(multiplied.numpy(), codes * np.float32(1 / 255))
    assert int((divided != multiplied).sum()) == 126


def _image_folder(root) -> str:
    """A folder:PATH set of 12 seeded RGB JPEGs of odd sizes in 3 classes (train/ and val/)."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in range(3):
            (root / split / f"c{c}").mkdir(parents=True)
            for i in range(2):
                pixels = rng.integers(0, 256, (20 + 3 * i, 17 + c, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / f"c{c}" / f"{i}.jpg", quality=90)
    return f"folder:{root}"


def _byte_sets(tmp_path):
    name = _image_folder(tmp_path / "imgs")
    sets = {f"{name}/{split}/{aug}": build_dataset(name, split, augment=aug, image_size=16)[0]
            for split, aug in (("train", True), ("val", False))}
    sets["cache"] = build_dataset(name, "val", image_size=16, cache=str(tmp_path / "cache"))[0]
    if Path(FASHION).is_dir():
        sets["fashion-mnist/augmented/subset"] = build_dataset("fashion-mnist", "train", subset=40, augment=True)[0]
    return sets


def test_uint8_items_become_the_float_items_bit_for_bit(tmp_path):
    """Every set stored or decoded as bytes (image files, augmented or not, the decode cache, Fashion-MNIST) has a
    uint8 form whose table lookup gives the float items exactly (same augmentation draws: seeded alike)."""
    for name, dataset in _byte_sets(tmp_path).items():
        view = uint8_view(dataset)
        assert view is not dataset, name
        for i in range(len(dataset)):
            torch.manual_seed(i)
            x, label = dataset[i]
            torch.manual_seed(i)
            codes, same_label = view[i]
            assert codes.dtype == torch.uint8 and label == same_label, name
            assert torch.equal(to_float_images(codes, view.levels), x), (name, i)
    digits, _ = build_dataset("digits", "test")
    assert uint8_view(digits) is digits  # digits' levels are k / 16: it stays float (256 bytes an image)


def test_workers_send_uint8_and_the_device_converts(tmp_path):
    """Through 2 DataLoader workers: the batches that cross are uint8, and converted on the (stand-in) device they
    are the float loader's batches; what was uploaded is the bytes plus the 256-entry table."""
    dataset = _byte_sets(tmp_path)["cache"]
    floats = list(build_loader(dataset, batch_size=4, workers=2))
    loader = build_loader(dataset, batch_size=4, workers=2, uint8=True)
    with counted() as traffic:
        levels = loader_levels(loader, DEVICE)
        for (codes, y), (x, y_float) in zip(loader, floats, strict=True):
            assert codes.dtype == torch.uint8 and torch.equal(y, y_float)
            on_device = to_float_images(codes.to(DEVICE), levels)
            assert isinstance(on_device, OnDevice) and torch.equal(on_device.elem, x)
    assert traffic.uploads == [256] + [c.numel() for c, _ in floats] and not traffic.downloads
    assert sum(traffic.uploads[1:]) == sum(x.numel() for x, _ in floats)  # elements: one byte each, not four


def test_training_and_attacks_on_uint8_batches_match_float_batches():
    """The training loop and the attack runner get uint8 batches from a byte set: one epoch and one FGSM
    evaluation give bit-identical weights and rows to the same images fed as floats."""
    if not Path(FASHION).is_dir():
        pytest.skip("Debian package dataset-fashion-mnist not installed")
    data, info = build_dataset("fashion-mnist", "test", subset=32)
    items = [data[i] for i in range(len(data))]
    floats = TensorImages(torch.stack([x for x, _ in items]), torch.tensor([label for _, label in items]))
    spec = ModelSpec("resnet_tiny", 10, (1, 28, 28), info.mean, info.std)
    weights = []
    for dataset in (data, floats):
        torch.manual_seed(0)
        model = build_model(spec)
        recipe = build_recipe("baseline", num_classes=10, batch_size=16, weight_decay=1e-4)
        optimizer = torch.optim.SGD(recipe.param_groups(model), lr=0.05, momentum=0.9)
        loader = build_loader(dataset, batch_size=16, uint8=True)
        assert next(iter(loader))[0].dtype == (torch.uint8 if dataset is data else torch.float32)
        train_one_epoch(model, loader, recipe, optimizer, device=torch.device("cpu"), epoch=0)
        weights.append(model.state_dict())
        rows = evaluate_model(model, dataset, info=info, attacks=("fgsm",), eps="8/255", batch_size=16,
                         device="cpu", checkpoint_hash="same")
        weights.append([(r.attack, r.eps, r.n, r.clean_top1, r.adv_top1, r.flags) for r in rows])
    assert all(torch.equal(a, b) for a, b in zip(weights[0].values(), weights[2].values(), strict=True))
    assert weights[1] == weights[3]
