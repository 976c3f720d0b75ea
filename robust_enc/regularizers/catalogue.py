"""The regularizer zoo: one ``REGULARIZERS`` entry per regularizer (see ``spec`` for what an entry's hooks do).
Architecture changes (``prepare``) are ENC/WN/WS parametrizations (``enc``) and dropout/DropBlock hooks; the rest
act on batches, labels, the loss or the update rule during training (``train.recipe`` runs them)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from robust_enc.errors import UserError
from robust_enc.models import WEIGHT_LAYERS, CifarResNet, NormalizedModel, classifier_of
from robust_enc.regularizers.enc import VARIANTS, apply_enc, apply_wn, apply_ws, el2_loss, enc_layers, raw_weight
from robust_enc.regularizers.spec import Regularizer, _param, register


# ---------------------------------------------------------------- entries: baseline and weight reparameterizations
@register("baseline", order=0)
class Baseline(Regularizer):
    """L2 weight decay on conv/linear weights only (none on biases and norm layers): the paper's recipe."""


@register("enc", order=10)
class ENC(Regularizer):
    """Equivalent Norm Constraint (paper eq. 20-23): every layer's ||W||_F^2 = alpha, plus epsilon-shifted L2."""

    conflicts: ClassVar[tuple[str, ...]] = ("wn", "ws")
    bakes: ClassVar[bool] = True

    variant: Literal["eq20", "eq21", "eq22", "eq23"] = _param("eq22", "which normalization (eq. 22 is the best)")
    alpha: float | Literal["learnable"] = _param(1.0, "squared Frobenius norm of every layer", lo=0, lo_open=True)
    classifier: bool = _param(True, "also constrain the final classifier")
    el2_eps: float = _param(1e-3, "epsilon of the epsilon-shifted L2 on the raw weights (0 = plain L2)", lo=0)
    el2_lambda: float | Literal["wd"] = _param("wd", "its coefficient; wd = the run's weight decay", lo=0)

    def prepare(self, model: nn.Module) -> nn.Module:
        assert self.variant in VARIANTS
        alpha = None if self.alpha == "learnable" else float(self.alpha)
        return apply_enc(model, variant=self.variant, alpha=alpha, classifier=self.classifier)

    def decay_exempt(self, model: nn.Module) -> list[torch.Tensor]:
        return [raw_weight(module) for _, module, _ in enc_layers(model)]

    def penalty(self, model: nn.Module, weight_decay: float) -> torch.Tensor | None:
        lam = weight_decay if self.el2_lambda == "wd" else float(self.el2_lambda)
        if not any(True for _ in enc_layers(model)):
            return None
        return el2_loss(model, lam=lam, eps=self.el2_eps)


@register("wn", order=11)
class WeightNorm(Regularizer):
    """Weight normalization (Salimans & Kingma 2016): unit-norm rows times a learnable per-row gain g."""

    conflicts: ClassVar[tuple[str, ...]] = ("enc", "ws")
    bakes: ClassVar[bool] = True

    classifier: bool = _param(True, "also normalize the final classifier")

    def prepare(self, model: nn.Module) -> nn.Module:
        return apply_wn(model, classifier=self.classifier)


@register("ws", order=12)
class WeightStandardization(Regularizer):
    """Weight standardization (Qiao et al. 2019): rows to zero mean and unit variance."""

    conflicts: ClassVar[tuple[str, ...]] = ("enc", "wn")
    bakes: ClassVar[bool] = True

    classifier: bool = _param(False, "also standardize the final classifier (Qiao et al. leave it plain)")
    eps: float = _param(1e-5, "added to the row variance", lo=0, lo_open=True)

    def prepare(self, model: nn.Module) -> nn.Module:
        return apply_ws(model, classifier=self.classifier, eps=self.eps)


# ---------------------------------------------------------------- entries: feature noise (hooks: state-dict keys stay)
class _DropoutHook:
    """Forward pre-hook on the classifier: dropout on its input while the model trains (picklable, no parameters)."""

    def __init__(self, p: float) -> None:
        self.p = p

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        if not module.training or self.p == 0:
            return None
        return (F.dropout(args[0], self.p, training=True), *args[1:])


class _DropBlockHook:
    """Forward hook applying a timm DropBlock2d to a BN layer's output, in train mode only (the BN layer's mode)."""

    def __init__(self, block: nn.Module) -> None:
        self.block = block

    def __call__(self, module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        self.block.train(module.training)
        return self.block(output)


def _drop_block_site(block: nn.Module) -> nn.Module:
    """Where timm's ResNet blocks apply drop_block: after bn1 in a basic block (before its first activation), after
    bn2 in a bottleneck (bn3 present; timm.models.resnet.Bottleneck), so the identity path is never dropped."""
    site = getattr(block, "bn2" if hasattr(block, "bn3") else "bn1", None)
    if not isinstance(site, nn.modules.batchnorm._BatchNorm):
        raise UserError(f"dropblock needs ResNet blocks with bn1/bn2 layers; {type(block).__name__} has none. Use "
                        "dropout instead")
    return site


def _last_two_stages(net: nn.Module) -> list[list[nn.Module]]:
    """The residual blocks of the last two stages: ``layer3``/``layer4`` (torchvision and timm ResNets, ResNeXts,
    SE-ResNets) or the last two stride groups of a CifarResNet."""
    if isinstance(getattr(net, "layer3", None), nn.Sequential) and isinstance(getattr(net, "layer4", None),
                                                                               nn.Sequential):
        return [list(net.layer3), list(net.layer4)]
    if isinstance(net, CifarResNet):
        stages: list[list[nn.Module]] = []
        for block in net.layers:
            if not stages or block.conv1.stride != (1, 1):  # a strided block opens a stage
                stages.append([])
            stages[-1].append(block)
        return stages[-2:]
    raise UserError(f"dropblock needs a ResNet-style model (layer3/layer4 stages or a CIFAR ResNet); "
                    f"{type(net).__name__} has neither. Use dropout instead")


@register("dropout", order=20)
class Dropout(Regularizer):
    """Dropout on the classifier's input (after the last BN layer, as the paper)."""

    p: float = _param(0.5, "drop probability", lo=0, hi=1, hi_open=True)

    def prepare(self, model: nn.Module) -> nn.Module:
        head = classifier_of(model)
        if head is None:
            raise UserError(f"dropout needs a model with a final linear classifier; {type(model).__name__} has none")
        head.register_forward_pre_hook(_DropoutHook(self.p))
        return model


@register("dropblock", order=21)
class DropBlock(Regularizer):
    """DropBlock (Ghiasi et al. 2018) with timm's ResNet setting: in every block of the last two stages, after bn1
    (basic) / bn2 (bottleneck) as timm's blocks, block sizes 5 and 3 (timm.models.resnet.drop_blocks)."""

    p: float = _param(0.1, "drop probability (the DropBlock paper's best ResNet-50 keep_prob 0.9)", lo=0, hi=1,
                      hi_open=True)

    def prepare(self, model: nn.Module) -> nn.Module:
        from timm.models.resnet import drop_blocks

        net = model.net if isinstance(model, NormalizedModel) else model
        stages = _last_two_stages(net)
        makers = drop_blocks(self.p)[2:]  # timm's per-stage DropBlock2d factories (None when p == 0)
        for blocks, make in zip(stages, makers):
            for block in blocks if make is not None else []:
                _drop_block_site(block).register_forward_hook(_DropBlockHook(make()))
        return model


# ---------------------------------------------------------------- entries: data and labels
@register("cutout", order=30)
class Cutout(Regularizer):
    """Cutout (DeVries & Taylor 2017): one square patch per image, centre uniform, clipped at the borders."""

    size: float = _param(0.5, "patch side as a fraction of the image side (16/32 on CIFAR)", lo=0, hi=1, lo_open=True)
    p: float = _param(1.0, "probability per image", lo=0, hi=1)
    fill: float | Literal["mean"] = _param("mean", "patch value; mean = the batch's channel mean (the original's 0 "
                                                   "after normalization)", lo=0, hi=1)

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        side_h, side_w = max(1, round(self.size * h)), max(1, round(self.size * w))
        top = torch.randint(0, h, (b, 1), device=x.device) - side_h // 2
        left = torch.randint(0, w, (b, 1), device=x.device) - side_w // 2
        rows = torch.arange(h, device=x.device)[None]
        cols = torch.arange(w, device=x.device)[None]
        in_rows = (rows >= top) & (rows < top + side_h)  # (B, H)
        in_cols = (cols >= left) & (cols < left + side_w)  # (B, W)
        mask = in_rows[:, :, None] & in_cols[:, None, :]
        if self.p < 1:
            mask &= (torch.rand(b, device=x.device) < self.p)[:, None, None]
        fill = x.mean(dim=(0, 2, 3), keepdim=True) if self.fill == "mean" else torch.tensor(self.fill, dtype=x.dtype)
        return torch.where(mask[:, None], fill.to(x.device), x)


@register("noise", order=31)
class InputNoise(Regularizer):
    """Gaussian input-noise injection in pixel units, clamped back to [0, 1]."""

    sigma: float = _param(0.1, "noise standard deviation (pixel units)", lo=0)

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        return (x + self.sigma * torch.randn_like(x)).clamp_(0, 1)


@dataclass(frozen=True)
class _Mixing(Regularizer):
    """timm's Mixup with one kind of mixing (``kind``): mixup blends whole images, CutMix pastes a box."""

    min_batch: ClassVar[int] = 2
    kind: ClassVar[str] = ""

    alpha: float = _param(1.0, "Beta(alpha, alpha) box area", lo=0, lo_open=True)
    prob: float = _param(1.0, "probability a batch is mixed", lo=0, hi=1)

    def mix_args(self) -> dict[str, float]:
        return {f"{self.kind}_alpha": self.alpha, "prob": self.prob}


@register("mixup", order=32)
class Mixup(_Mixing):
    """mixup (Zhang et al. 2018) via timm's Mixup; alpha 0.2 is the mixup paper's ImageNet setting."""

    kind: ClassVar[str] = "mixup"
    alpha: float = _param(0.2, "Beta(alpha, alpha) mixing weight", lo=0, lo_open=True)  # keeps its place before prob


@register("cutmix", order=33)
class CutMix(_Mixing):
    """CutMix (Yun et al. 2019) via timm's Mixup; alpha 1 and prob 1 are the CutMix paper's ImageNet setting."""

    kind: ClassVar[str] = "cutmix"


@register("ls", order=40)
class LabelSmoothing(Regularizer):
    """Label smoothing (Szegedy et al. 2016); with mixup/cutmix the smoothing goes into timm's mixed targets."""

    smoothing: float = _param(0.1, "probability mass spread over all classes", lo=0, hi=1, hi_open=True)

    def label_smoothing(self) -> float:
        return self.smoothing


# ---------------------------------------------------------------- entries: loss terms
def _layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, WEIGHT_LAYERS) and isinstance(m.weight, torch.Tensor)]


def _layer_weights(model: nn.Module) -> list[torch.Tensor]:
    """Conv/linear weights as the forward pass uses them (normalized when reparameterized)."""
    return [m.weight for m in _layers(model)]


@register("weissi", order=50)
class WEISSI(Regularizer):
    """Weight-scale-shift-invariant regularizer: lambda1 sum_l log||W_l|| + lambda2 sum_l ||W_l / ||W_l|| ||_1."""

    lambda1: float = _param(1e-4, "coefficient of the log-norm term", lo=0)
    lambda2: float = _param(1e-4, "coefficient of the L1 norm of the normalized weights", lo=0)

    def decay_exempt(self, model: nn.Module) -> list[torch.Tensor]:
        # Plain L2 on the same weights would undo what WEISSI is for: it is not invariant to the scale shift
        # W_l -> gamma_l W_l (prod gamma_l = 1). So, as ENC, the weights it regularizes get no weight decay.
        return [raw_weight(m) for m in _layers(model)]

    def penalty(self, model: nn.Module, weight_decay: float) -> torch.Tensor | None:
        terms = []
        for w in _layer_weights(model):
            norm = w.float().norm().clamp_min(1e-12)
            terms.append(self.lambda1 * norm.log() + self.lambda2 * (w.float() / norm).abs().sum())
        return torch.stack(terms).sum() if terms else None


@register("l1", order=51)
class L1(Regularizer):
    """L1 penalty coef * sum |W| on conv/linear weights."""

    coef: float = _param(1e-5, "coefficient", lo=0)

    def penalty(self, model: nn.Module, weight_decay: float) -> torch.Tensor | None:
        terms = [w.float().abs().sum() for w in _layer_weights(model)]
        return self.coef * torch.stack(terms).sum() if terms else None


@register("gammadecay", order=52)
class GammaDecay(Regularizer):
    """Gamma decay (Luo et al. 2019): L2 (coef/2) * sum gamma^2 on the BN scales."""

    coef: float = _param(1e-4, "coefficient", lo=0)

    def penalty(self, model: nn.Module, weight_decay: float) -> torch.Tensor | None:
        gammas = [m.weight for m in model.modules()
                  if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None]
        return 0.5 * self.coef * torch.stack([g.float().square().sum() for g in gammas]).sum() if gammas else None


# ---------------------------------------------------------------- entries: update rules
@register("gradnorm", order=60)
class GradNorm(Regularizer):
    """Gradient-norm penalty (Zhao et al. 2022) by its finite-difference rule (1-a) g(t) + a g(t + r g/||g||);
    r 0.1 and a 0.8 are the authors' CIFAR setting. Two forward/backward passes per step."""

    conflicts: ClassVar[tuple[str, ...]] = ("sam",)

    r: float = _param(0.1, "step length of the probe (parameter units)", lo=0)
    a: float = _param(0.8, "weight of the probe gradient (lambda / r)", lo=0, hi=1)

    def sharpness(self) -> tuple[float, float] | None:
        return self.r, self.a


@register("sam", order=61)
class SAM(Regularizer):
    """Sharpness-aware minimization (Foret et al. 2021): the gradnorm rule with a = 1; rho 0.05 is SAM's default."""

    conflicts: ClassVar[tuple[str, ...]] = ("gradnorm",)

    rho: float = _param(0.05, "neighbourhood radius (parameter units)", lo=0)

    def sharpness(self) -> tuple[float, float] | None:
        return self.rho, 1.0
