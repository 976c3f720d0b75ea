"""Model zoo, one registry. Every built model is ``NormalizedModel``: a normalizer holding the data set's mean/std
as buffers, then the network. Inputs are images in [0, 1], outputs are logits."""

from __future__ import annotations

import contextlib
import difflib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

from robust_enc.errors import UserError
from robust_enc.preprocessing import Preprocessing, from_timm, from_torchvision
from robust_enc.registry import Registry


class Normalize(nn.Module):
    """(x - mean) / std per channel; buffers, so they travel with the state dict and the device."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class NormalizedModel(nn.Module):
    def __init__(self, normalize: Normalize, net: nn.Module) -> None:
        super().__init__()
        self.normalize = normalize
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(x))


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a model: stored in every checkpoint."""

    name: str  # model registry name
    num_classes: int
    input_shape: tuple[int, int, int]  # (C, H, W)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    regularizer: str = "baseline"  # canonical regularizer spec; some entries change the architecture (ENC, Dropout)
    kwargs: dict[str, Any] = field(default_factory=dict)  # extra builder options

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSpec:
        data = dict(data)
        for key in ("input_shape", "mean", "std"):
            data[key] = tuple(data[key])
        return cls(**data)


# A builder takes (num_classes, in_chans, image_size, argument, **kwargs) and returns the bare network.
ModelBuilder = Callable[..., nn.Module]
MODELS: Registry[ModelBuilder] = Registry("model")


# ---------------------------------------------------------------- CIFAR-style ResNets (He et al. 2016, section 4.2)
class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:  # projection shortcut (option B): a conv ENC can constrain too
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """3x3 stem, three stages (stride 1, 2, 2), global pooling, linear classifier. ``fc`` is the classifier, as in
    torchvision, so regularizers that treat the classifier specially find it by name."""

    def __init__(self, blocks_per_stage: int, widths: Sequence[int], num_classes: int, in_chans: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        layers, in_planes = [], widths[0]
        for stage, planes in enumerate(widths):
            for b in range(blocks_per_stage):
                layers.append(BasicBlock(in_planes, planes, 2 if stage > 0 and b == 0 else 1))
                in_planes = planes
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)
        for m in self.modules():  # Kaiming init, as the paper's recipe
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


# The suite's own models have no library weights: ``pretrained`` is refused (build_network says so in one line).
@MODELS.register("resnet20", help="CIFAR-style ResNet-20 (272k params), any input size >= 8", min_size=8)
def resnet20(num_classes: int, in_chans: int, pretrained: bool = False, **_: Any) -> nn.Module:
    assert not pretrained, "resnet20 has no pretrained weights"
    return CifarResNet(3, (16, 32, 64), num_classes, in_chans)


@MODELS.register("resnet56", help="CIFAR-style ResNet-56 (855k params)", min_size=8)
def resnet56(num_classes: int, in_chans: int, pretrained: bool = False, **_: Any) -> nn.Module:
    assert not pretrained, "resnet56 has no pretrained weights"
    return CifarResNet(9, (16, 32, 64), num_classes, in_chans)


@MODELS.register("resnet_tiny", help="one block per stage, widths 8/16/32 (~20k params): for 8x8 and 28x28 tests",
                 min_size=4)
def resnet_tiny(num_classes: int, in_chans: int, pretrained: bool = False, **_: Any) -> nn.Module:
    assert not pretrained, "resnet_tiny has no pretrained weights"
    return CifarResNet(1, (8, 16, 32), num_classes, in_chans)


# ---------------------------------------------------------------- torchvision ImageNet models
def _set_in_chans(net: nn.Module, attr_path: str, in_chans: int) -> None:
    """Replace the stem conv when the data set has other than 3 channels (e.g. 1 for Fashion-MNIST)."""
    if in_chans == 3:
        return
    parent_path, _, attr = attr_path.rpartition(".")
    parent = net.get_submodule(parent_path) if parent_path else net
    old: nn.Conv2d = getattr(parent, attr)
    setattr(parent, attr, nn.Conv2d(in_chans, old.out_channels, old.kernel_size, old.stride, old.padding,
                                    bias=old.bias is not None))


def _torchvision(arch: str, stem: str, min_size: int, help: str) -> None:
    @MODELS.register(arch, help=help, min_size=min_size, pretrained_source="torchvision")
    def build(num_classes: int, in_chans: int, pretrained: bool = False, **kwargs: Any) -> nn.Module:
        import torchvision

        if pretrained:  # build_network checked the classes and that the download can happen
            net = torchvision.models.get_model(arch, weights="DEFAULT")
        else:
            net = torchvision.models.get_model(arch, weights=None, num_classes=num_classes, **kwargs)
        _set_in_chans(net, stem, in_chans)
        return net


for _arch in ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d", "resnext101_32x8d",
              "wide_resnet50_2"):
    _torchvision(_arch, "conv1", 8, f"torchvision {_arch} (ImageNet stem)")
_torchvision("densenet201", "features.conv0", 32, "torchvision densenet201")


# ---------------------------------------------------------------- timm models
def _timm_build(arch: str, num_classes: int, in_chans: int, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    import timm

    try:
        # timm.create_model drops None kwargs itself, so unset options keep the builder's defaults.
        return timm.create_model(arch, pretrained=pretrained, num_classes=num_classes, in_chans=in_chans, **kwargs)
    except RuntimeError as err:
        if "Unknown model" in str(err):
            close = difflib.get_close_matches(arch, timm.list_models(), n=5, cutoff=0.6)
            hint = f"similar: {', '.join(close)}" if close else "see timm.list_models() for the names"
            raise UserError(f"timm has no model {arch!r} ({hint})") from None
        raise


@MODELS.register("seresnet50", help="timm SE-ResNet-50", min_size=8, pretrained_source="timm")
def seresnet50(num_classes: int, in_chans: int, **kwargs: Any) -> nn.Module:
    return _timm_build("seresnet50", num_classes, in_chans, **kwargs)


@MODELS.register("seresnet101", help="timm SE-ResNet-101", min_size=8, pretrained_source="timm")
def seresnet101(num_classes: int, in_chans: int, **kwargs: Any) -> nn.Module:
    return _timm_build("seresnet101", num_classes, in_chans, **kwargs)


@MODELS.register("timm", takes_argument=True, help="any timm model: timm:<name>", min_size=32,
                 pretrained_source="timm")
def timm_any(num_classes: int, in_chans: int, argument: str, **kwargs: Any) -> nn.Module:
    return _timm_build(argument, num_classes, in_chans, **kwargs)


# ---------------------------------------------------------------- library weights and preprocessing
@dataclass(frozen=True)
class LibraryWeights:
    """The pretrained weights a library holds for a registry model (``--weights pretrained``)."""

    tag: str  # what ran, for the rows: "timm:tf_efficientnet_lite0.in1k", "torchvision:ResNet50_Weights.IMAGENET1K_V2"
    url: str  # where they download from
    cached: bool  # already in the library's local cache: no network needed
    num_classes: int  # the classes the weights were trained for

    def check(self, num_classes: int) -> None:
        """One line when these weights cannot run for ``num_classes``, or cannot be fetched (offline, not cached):
        never a randomly initialized head or network in their place."""
        if num_classes != self.num_classes:
            raise UserError(f"{self.tag} classifies {self.num_classes} classes, the data set has {num_classes}: "
                            "evaluate it on a data set of its classes (e.g. --dataset imagenet) or pass --weights FILE")
        host = urlparse(self.url).hostname or self.url
        if not self.cached and not _reachable(host):
            raise UserError(f"--weights pretrained downloads {self.tag} from {host}, which this machine cannot reach: "
                            "it needs the network once (the library caches the file); or pass --weights FILE")


def _reachable(host: str, port: int = 443, timeout_s: float = 5.0) -> bool:
    """Whether a TCP connection to ``host`` opens: checked before a download, so an offline machine gets one line at
    once instead of the hub's retries and a traceback."""
    import socket

    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
        return True
    except OSError:
        return False


def _timm_config_model(arch: str) -> nn.Module:
    """The timm network on the meta device (no memory, no weights): its ``pretrained_cfg`` is all that is read."""
    with torch.device("meta"):
        return _timm_build(arch, 1000, 3)


def _timm_weights(arch: str) -> LibraryWeights:
    cfg = _timm_config_model(arch).pretrained_cfg
    if not (cfg.get("hf_hub_id") or cfg.get("url") or cfg.get("file")):
        raise UserError(f"timm has no pretrained weights for {arch}: pass --weights FILE (a state dict)")
    tag = f"timm:{cfg['architecture']}" + (f".{cfg['tag']}" if cfg.get("tag") else "")
    if cfg.get("hf_hub_id"):
        from huggingface_hub import try_to_load_from_cache

        names = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")
        cached = any(isinstance(try_to_load_from_cache(cfg["hf_hub_id"], n), str) for n in names)
        return LibraryWeights(tag, "https://huggingface.co", cached, int(cfg.get("num_classes", 1000)))
    url = cfg.get("url") or cfg.get("file")
    cached = Path(torch.hub.get_dir(), "checkpoints", Path(urlparse(url).path).name).is_file()
    return LibraryWeights(tag, url, cached or bool(cfg.get("file")), int(cfg.get("num_classes", 1000)))


def _torchvision_weights(arch: str) -> LibraryWeights:
    import torchvision

    weights = torchvision.models.get_model_weights(arch).DEFAULT
    cached = Path(torch.hub.get_dir(), "checkpoints", Path(urlparse(weights.url).path).name).is_file()
    return LibraryWeights(f"torchvision:{weights}", weights.url, cached, len(weights.meta["categories"]))


def library_weights(name: str) -> LibraryWeights:
    """What ``--weights pretrained`` loads for registry model ``name``; a UserError (one line) when there is none."""
    entry, argument = MODELS.lookup(name)
    source = entry.meta.get("pretrained_source")
    if source is None:
        raise UserError(f"{name} has no pretrained weights (the suite's own model: train it with 'robust-enc train'), "
                        "so --weights pretrained would run random weights: pass --checkpoint RUN or --weights FILE")
    arch = argument or name
    return _timm_weights(arch) if source == "timm" else _torchvision_weights(arch)


def library_preprocessing(name: str, *, pretrained: bool) -> Preprocessing | None:
    """The evaluation preprocessing the library defines for registry model ``name``: timm's data config (any timm
    weights: they were trained with it), torchvision's pretrained weights' transforms; None for the suite's own
    models and torchvision weights files (the suite's pipeline, which is torchvision's original one)."""
    entry, argument = MODELS.lookup(name)
    source = entry.meta.get("pretrained_source")
    if source == "timm":
        return from_timm(_timm_config_model(argument or name))
    if source == "torchvision" and pretrained:
        import torchvision

        return from_torchvision(torchvision.models.get_model_weights(argument or name).DEFAULT)
    return None


def build_network(spec: ModelSpec, *, pretrained: bool = False) -> NormalizedModel:
    """Build the plain network from a spec; ``regularizers.build_model`` adds its regularizer's architecture
    changes."""
    entry, argument = MODELS.lookup(spec.name)
    channels, height, width = spec.input_shape
    min_size = entry.meta.get("min_size", 1)
    if min(height, width) < min_size:
        raise UserError(f"model {spec.name} needs inputs of at least {min_size}x{min_size}, the data set gives "
                        f"{height}x{width}; pick a smaller model such as resnet20 or resnet_tiny")
    kwargs = dict(spec.kwargs)
    if argument is not None:
        kwargs["argument"] = argument
    if pretrained:
        if channels != 3:  # a new stem for other channels would be random: not the library's weights any more
            raise UserError(f"pretrained {spec.name} takes RGB images, the data set has {channels} channel(s): "
                            "evaluate it on RGB images, or pass --weights FILE")
        library_weights(spec.name).check(spec.num_classes)
        kwargs["pretrained"] = True
    net = entry.obj(num_classes=spec.num_classes, in_chans=channels, **kwargs)
    return NormalizedModel(Normalize(spec.mean, spec.std), net)


def classifier_of(model: nn.Module) -> nn.Module | None:
    """The final linear classifier (``fc``, ``classifier`` or timm's ``get_classifier()``), or None."""
    net = model.net if isinstance(model, NormalizedModel) else model
    if hasattr(net, "get_classifier"):
        return net.get_classifier()
    for name in ("fc", "classifier", "head"):
        module = getattr(net, name, None)
        if isinstance(module, nn.Linear):
            return module
        if isinstance(module, nn.Sequential) and isinstance(module[-1], nn.Linear):
            return module[-1]
    return None


def top_k_hits(logits: torch.Tensor, y: torch.Tensor, k: int) -> torch.Tensor:
    """[B, min(k, classes)] bool: column j says whether the j-th highest logit is the label y [B]; column 0 is the
    top-1 hit, ``.any(1)`` the top-k hit."""
    return logits.topk(min(k, logits.shape[1]), dim=1).indices == y[:, None]


WEIGHT_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)  # the layers whose weights decay, ENC and GBR's bound see
SCRIPTED_WEIGHT_LAYERS = frozenset(layer.__name__ for layer in WEIGHT_LAYERS)


def weight_norms(model: nn.Module) -> dict[str, float]:
    """||W||_F^2 of every conv and linear weight as the forward pass uses it (after any reparameterization), by
    module name. Their sum is the quantity weight decay bounds GBR with (paper eq. 17)."""
    norms = {}
    for name, module in model.named_modules():
        # a TorchScript module's layers are script modules that remember their eager class by name
        scripted = getattr(module, "original_name", None) in SCRIPTED_WEIGHT_LAYERS
        if isinstance(module, WEIGHT_LAYERS) or scripted:
            with torch.no_grad():
                norms[name] = float(module.weight.detach().float().pow(2).sum())
    return norms


def total_weight_norm(model: nn.Module) -> float:
    """The sum of ``weight_norms``; NaN when no conv or linear layer is visible (a model built of other layer types):
    not measured, rather than a weight norm of 0."""
    norms = weight_norms(model)
    return sum(norms.values()) if norms else math.nan


@contextlib.contextmanager
def channels_last_weights(model: nn.Module, enabled: bool = True) -> Iterator[nn.Module]:
    """The 4-d (convolution) weights in NHWC layout while a measurement runs, each parameter's own layout restored
    afterwards, also on error. Why: a convolution whose weight is channels_last runs NHWC kernels (the input is
    converted inside it), which are faster on GPUs and on many CPUs (BENCHMARKS.md); values do not change, only the
    kernels' float rounding. Parameters only: their tensors keep their identity (``.data`` swapped), which a
    caller's optimizer or hooks rely on; ``Module.to(memory_format=...)`` would do the same but not undo it."""
    saved = [(p, p.data) for p in model.parameters() if p.dim() == 4] if enabled else []
    for p, data in saved:
        p.data = data.contiguous(memory_format=torch.channels_last)
    try:
        yield model
    finally:
        for p, data in saved:
            p.data = data


@contextlib.contextmanager
def frozen(model: nn.Module, *, train_mode: bool = False) -> Iterator[nn.Module]:
    """Eval (or train) mode and ``requires_grad=False`` on every parameter while a measurement (attack, GBR) runs;
    every module's mode, every parameter's flag and ``.grad`` and, in train mode, every buffer restored afterwards,
    also on error.

    Why: gradients of the weights are wasted work (freezing cut ART's overhead over a bare torch loop from 1.33x to
    1.10x, measured) and ART leaves ``param.grad`` filled; a train-mode forward updates BN running statistics, and
    measuring must not change the model. Modes are restored per module, not with ``model.train(mode)``: a model may
    keep some submodules in eval (e.g. frozen BN) on purpose."""
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad, p.grad) for p in model.parameters()]
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()} if train_mode else {}
    model.train(train_mode)
    model.requires_grad_(False)
    try:
        yield model
    finally:
        for p, flag, grad in flags:
            p.requires_grad_(flag)
            p.grad = grad
        for m, mode in modes:
            m.training = mode
        with torch.no_grad():
            for name, b in model.named_buffers():
                if name in buffers:
                    b.copy_(buffers[name])
