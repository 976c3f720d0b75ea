"""Host-device traffic without a GPU: a stand-in accelerator whose tensors hold real CPU values but report another
device, so every copy between the host and "the device" shows up as an op (and mixing the two fails, as on CUDA)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

from robust_enc.attacks import art_adapter
from robust_enc.data import build_dataset
from robust_enc.models import ModelSpec, build_model

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
    with art_adapter.frozen(model):
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
    short, long = _pgd_traffic(1, norm), _pgd_traffic(3, norm)
    assert max(short.uploads + short.downloads + long.uploads + long.downloads, default=0) <= 1
    assert long.syncs == ["aten.equal.default"] * 3, long  # ART's are-the-labels-one-hot check, once a step
    assert short.syncs == ["aten.equal.default"] and short.scalars() == 1, short
