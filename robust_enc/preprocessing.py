"""How image files reach a model: resize, centre crop and the normalization the model's first layer applies.

One record, ``Preprocessing``, from one of three places: the suite's own pipeline (bilinear resize of the short side to
S * 256 / 224, centre crop S, ImageNet mean/std: what the ENC paper's ResNets and the registry's own models were
trained and evaluated with), a library's data config (timm's ``pretrained_cfg`` through its
``resolve_model_data_config`` and ``create_transform``, torchvision's weights' transforms), or the command line's
overrides. Resize and crop go into
the evaluation transform (and the decode cache's key); mean/std go into the model's ``Normalize`` layer, so inputs stay
in [0, 1] and eps stays in pixel units.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch

from robust_enc.errors import UserError

INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "lanczos", "box", "hamming")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SUITE_CROP_PCT = 224 / 256  # the suite's own pipeline: resize 256, crop 224


@dataclass(frozen=True)
class Preprocessing:
    """The evaluation transform of image files and the model's normalization.

    ``library`` says whose pipeline it is: "" for the suite's own (the decoded image is resized as a tensor, as the
    suite always has, so earlier results and caches stay valid), "timm" or "torchvision" (the PIL image is resized,
    then cropped and converted, as those libraries' own transforms do, so the pixels are theirs)."""

    resize: int  # short side in pixels after the resize
    crop: int  # side of the square centre crop, the model's input size
    interpolation: str = "bilinear"
    mean: tuple[float, ...] = IMAGENET_MEAN  # per channel, applied inside the model (pixel units)
    std: tuple[float, ...] = IMAGENET_STD
    library: str = ""  # "" (the suite's), "timm", "torchvision"
    normalize_inside: bool = False  # the model normalizes itself (TorchScript, module:factory): mean/std unused

    def text(self, *, decoded: bool = True) -> str:
        """The row's ``preprocessing`` cell, e.g. "resize 256 bicubic, crop 224, mean 0.5,0.5,0.5 std 0.5,0.5,0.5";
        ``decoded=False`` for images used as stored (in-memory sets: no resize, no crop)."""
        norm = ("normalization inside the model" if self.normalize_inside
                else f"mean {_numbers(self.mean)} std {_numbers(self.std)}")
        if not decoded:
            return f"as stored, {norm}"
        return f"resize {self.resize} {self.interpolation}, crop {self.crop}, {norm}"

    def decode_text(self) -> str:
        """What the decoded pixels depend on (the decode cache's key): resize and crop, not mean/std."""
        where = "PIL" if self.library else "tensor"
        return f"resize {self.resize} {self.interpolation} antialias ({where}), centre crop {self.crop}, uint8 CHW"

    def decode_transform(self) -> Callable:
        """PIL image -> uint8 (3, crop, crop); ``images.to_float`` finishes it."""
        from torchvision.transforms import v2

        mode = v2.InterpolationMode(self.interpolation)
        if not self.library:
            return v2.Compose([v2.ToImage(), v2.Resize(self.resize, interpolation=mode, antialias=True),
                               v2.CenterCrop(self.crop)])
        return v2.Compose([v2.Resize(self.resize, interpolation=mode, antialias=True), v2.CenterCrop(self.crop),
                           v2.PILToTensor()])


def _numbers(values: Sequence[float]) -> str:
    return ",".join(f"{v:.4g}" for v in values)


def suite_preprocessing(image_size: int = 224, mean: Sequence[float] = IMAGENET_MEAN,
                        std: Sequence[float] = IMAGENET_STD) -> Preprocessing:
    """The suite's own pipeline at ``image_size``: resize the short side to S * 256 / 224, centre crop S."""
    return Preprocessing(int(round(image_size * 256 / 224)), image_size, "bilinear", tuple(mean), tuple(std))


@dataclass(frozen=True)
class Overrides:
    """``--mean/--std/--interpolation/--crop-pct``: what the user sets over the model's own preprocessing."""

    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    interpolation: str = ""
    crop_pct: float | None = None  # crop / resize, in (0, 1]

    def __bool__(self) -> bool:
        return bool(self.mean or self.std or self.interpolation or self.crop_pct is not None)

    def apply(self, base: Preprocessing) -> Preprocessing:
        resize = base.resize if self.crop_pct is None else math.floor(base.crop / self.crop_pct)
        return replace(base, resize=resize, interpolation=self.interpolation or base.interpolation,
                       mean=self.mean or base.mean, std=self.std or base.std)


def parse_overrides(mean: str | Sequence[float] | None = None, std: str | Sequence[float] | None = None,
                    interpolation: str | None = None, crop_pct: float | None = None) -> Overrides:
    """Check the overrides once, at the edge: UserError names the flag."""
    means, stds = _channel_values("--mean", mean), _channel_values("--std", std)
    if any(s <= 0 for s in stds):
        raise UserError(f"--std must be positive per channel, got {_numbers(stds)}")
    if interpolation and interpolation not in INTERPOLATIONS:
        raise UserError(f"unknown --interpolation {interpolation!r}; known: {', '.join(INTERPOLATIONS)}")
    if crop_pct is not None and not 0 < crop_pct <= 1:
        raise UserError(f"--crop-pct is crop / resize in (0, 1], e.g. 0.875 (224 of 256), got {crop_pct}")
    return Overrides(means, stds, interpolation or "", crop_pct)


def _channel_values(flag: str, value: str | Sequence[float] | None) -> tuple[float, ...]:
    if value is None or len(value) == 0:
        return ()
    items = value.split(",") if isinstance(value, str) else list(value)
    try:
        numbers = tuple(float(v) for v in items)
    except (TypeError, ValueError):
        raise UserError(f"bad {flag} {value!r}: give one number per channel, e.g. {flag} 0.5,0.5,0.5") from None
    if not all(math.isfinite(v) for v in numbers) or not numbers:
        raise UserError(f"bad {flag} {value!r}: give finite numbers, one per channel")
    return numbers


def from_timm(model: torch.nn.Module) -> Preprocessing:
    """A timm model's own evaluation preprocessing: timm's ``resolve_model_data_config`` and ``create_transform``
    (input size, interpolation, crop_pct, mean/std from its ``pretrained_cfg``)."""
    from timm.data import create_transform, resolve_model_data_config
    from torchvision import transforms

    config = resolve_model_data_config(model)
    steps = create_transform(**config, is_training=False).transforms
    if not (isinstance(steps[0], transforms.Resize) and isinstance(steps[1], transforms.CenterCrop)
            and isinstance(steps[0].size, int)):
        raise UserError(f"the timm model's data config ({config.get('crop_mode')} crop of {config['input_size']}) is "
                        "not a resize + centre crop: pass --crop-pct and --interpolation to evaluate it")
    crop = steps[1].size
    return Preprocessing(steps[0].size, int(crop[0] if isinstance(crop, (tuple, list)) else crop),
                         str(steps[0].interpolation.value), tuple(config["mean"]), tuple(config["std"]), "timm")


def from_torchvision(weights: object) -> Preprocessing:
    """A torchvision weights enum's own transforms (``weights.transforms()``: resize, crop, interpolation, mean/std)."""
    preset = weights.transforms()  # type: ignore[attr-defined]
    return Preprocessing(int(preset.resize_size[0]), int(preset.crop_size[0]), str(preset.interpolation.value),
                         tuple(preset.mean), tuple(preset.std), "torchvision")
