"""The one module that imports ART (adversarial-robustness-toolbox 1.20.x). Everything ART-specific lives here: the
classifier wrapper, the attack constructors with every default set explicitly, and the FGSM eps sweep.

ART's pitfalls this module guards against: inputs of ``generate`` become NCHW float32 numpy in [0, 1]; labels go in
one-hot (``loss_gradient`` raises IndexError on integer labels); ``y=`` is always passed, so ART never attacks the
model's own predictions; ``device_type`` comes from the suite's device, never ART's "gpu" default; batch_size,
max_iter, eps and verbose are always given; parameters are frozen during attacks.

Only ART's public API is used (a minor release may rename private functions): the estimator's ``loss_gradient`` and
``predict``, the attacks' ``generate``. FGSM and PGD step on the torch device from ``loss_gradient`` on torch tensors
(no numpy round trip per step); ``test_attacks`` proves them equal to ART's FastGradientMethod and to a hand-written
torch PGD.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)

NORMS: dict[str, float] = {"linf": np.inf, "l2": 2.0}  # suite name -> ART's norm order
CLIP_VALUES = (0.0, 1.0)  # images in [0, 1]: eps is in pixel units because normalization is inside the model


def art_norm(norm: str) -> float:
    return NORMS[norm]


def to_numpy_images(x: torch.Tensor) -> np.ndarray:
    """[B, C, H, W] float tensor in [0, 1] -> C-contiguous float32 numpy, the only input ART handles correctly."""
    return np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)


def one_hot(y: torch.Tensor | np.ndarray, num_classes: int) -> np.ndarray:
    """[B] integer labels -> [B, K] float32 one-hot (what ``loss_gradient`` wants and ``generate`` accepts)."""
    y = np.asarray(y.cpu() if isinstance(y, torch.Tensor) else y, dtype=np.int64)
    out = np.zeros((len(y), num_classes), dtype=np.float32)
    out[np.arange(len(y)), y] = 1.0
    return out


class RecordingCrossEntropy(nn.CrossEntropyLoss):
    """Cross-entropy (batch mean) that keeps the logits of its last call.

    Why: PGD keeps, per example, the first iterate that fools the model; the forward pass inside ``loss_gradient``
    already computed those logits, so reading them costs nothing, where a separate forward pass per step would add
    about a third of a gradient."""

    last_logits: torch.Tensor | None = None

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:  # noqa: A002 (torch's name)
        self.last_logits = input.detach()
        return super().forward(input, target)


def build_classifier(model: nn.Module, *, num_classes: int, input_shape: Sequence[int], device: torch.device):
    """A ``PyTorchClassifier`` on ``device`` with cross-entropy loss and clip values (0, 1).

    ``preprocessing=None``: ART's default (0, 1) standardisation is an identity that copies every input.
    ART only knows "cpu" or "gpu" (= ``torch.cuda.current_device()``): a specific GPU is selected by making it the
    current device while ART reads it."""
    from art.estimators.classification import PyTorchClassifier

    device = torch.device(device)
    context = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    with context:
        return PyTorchClassifier(model=model, loss=RecordingCrossEntropy(), input_shape=tuple(input_shape),
                                 nb_classes=num_classes, clip_values=CLIP_VALUES, preprocessing=None,
                                 device_type="gpu" if device.type == "cuda" else "cpu")


def predict_labels(classifier, x: np.ndarray, batch_size: int) -> np.ndarray:
    """ART's ``predict`` on x [B, C, H, W] float32 in [0, 1] -> [B] int64 top-1 labels: the same numpy -> torch round
    trip every ``generate`` call's forward passes take, for the suite to compare with its own clean pass."""
    assert x.dtype == np.float32 and x.ndim == 4, "ART wants NCHW float32 numpy"
    return np.asarray(classifier.predict(x, batch_size=batch_size)).argmax(1)


# ------------------------------------------------------------------------------------------------ on the torch device
def loss_gradient(classifier, x: torch.Tensor, y_one_hot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(d mean-CE / d x, logits at x) for x [B, C, H, W] on the classifier's device: one forward + backward through
    ART's ``loss_gradient`` on torch tensors (ART returns a tensor then, on the same device)."""
    grad = classifier.loss_gradient(x, y_one_hot)
    return grad, _last_logits(classifier)


def _last_logits(classifier) -> torch.Tensor:
    loss = classifier.loss  # public property: the loss module given to build_classifier
    assert isinstance(loss, RecordingCrossEntropy) and loss.last_logits is not None
    return loss.last_logits


def direction(grad: torch.Tensor, norm: str) -> torch.Tensor:
    """The steepest-ascent unit step for the norm, as ART's FastGradientMethod computes it: sign(grad) for linf,
    grad / ||grad||_2 per example for l2 (0 where the gradient is all 0)."""
    if norm == "linf":
        return grad.sign()
    flat = grad.flatten(1)
    size = torch.linalg.vector_norm(flat, dim=1, keepdim=True)
    return (flat.abs() / torch.where(size > 0, size, torch.inf)).mul_(flat.sign()).view_as(grad)


def project(x_adv: torch.Tensor, x: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """x_adv clipped to [0, 1], then x + the projection of (x_adv - x) onto the eps ball, in ART's order (clip, then
    project; projecting towards x keeps the box). linf: bit for bit ART's ``projection``."""
    x_adv = x_adv.clamp(*CLIP_VALUES)
    delta = x_adv - x
    if norm == "linf":
        delta = delta.sign() * delta.abs().clamp_max(eps)
    else:
        flat = delta.flatten(1)
        size = torch.linalg.vector_norm(flat, dim=1, keepdim=True)
        delta = (flat * torch.where(size > 0, (eps / size).clamp_max(1.0), 0.0)).view_as(delta)
    return x + delta


def fgsm_direction(classifier, x: torch.Tensor, y_one_hot: torch.Tensor, norm: str) -> torch.Tensor:
    """One gradient for the whole eps sweep: FastGradientMethod's step direction [B, C, H, W]."""
    grad, _ = loss_gradient(classifier, x, y_one_hot)
    return direction(grad, norm)


def fgsm_apply(x: torch.Tensor, step: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """FastGradientMethod at eps from its direction: x + eps * step, clipped and projected (eps 0 gives x)."""
    if eps == 0:  # FastGradientMethod refuses eps 0; x + 0 * step is x
        return x.clone()
    return project(x + eps * step, x, eps, norm)


def random_start(x: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """A uniform point of the linf ball, or of the l2 ball (Gaussian direction, radius eps * U^(1/d)), clipped to
    [0, 1]; drawn from torch's RNG on x's device (the evaluation seeds it per batch, attack and eps)."""
    if norm == "linf":
        noise = torch.empty_like(x).uniform_(-eps, eps)
    else:
        flat = torch.randn_like(x).flatten(1)
        radius = eps * torch.rand(len(x), 1, device=x.device, dtype=x.dtype).pow(1.0 / flat.shape[1])
        noise = (flat / torch.linalg.vector_norm(flat, dim=1, keepdim=True).clamp_min(1e-12) * radius).view_as(x)
    return (x + noise).clamp(*CLIP_VALUES)


def pgd(classifier, x: torch.Tensor, y: torch.Tensor, *, eps: float, norm: str, steps: int, step_size: float,
        restarts: int, num_classes: int) -> torch.Tensor:
    """Projected Gradient Descent (Madry et al. 2018) on x [B, C, H, W] (device tensor in [0, 1]), labels y [B].

    ``restarts`` 0 starts at x; k > 0 makes k random starts, each on the examples no earlier start fooled. Per
    example the first iterate seen to fool the model is kept (ART returns the last iterate, which can step back out
    of a misclassified region); an example never fooled gets its last iterate. Each step: one ``loss_gradient``
    (whose logits tell which iterate fools), x + step_size * direction, clip to [0, 1], project onto the ball."""
    y_one_hot = nn.functional.one_hot(y, num_classes).to(x.dtype)
    x_out = x.clone()
    fooled = torch.zeros(len(x), dtype=torch.bool, device=x.device)
    per_image = (-1, *([1] * (x.dim() - 1)))  # a [B] mask viewed to broadcast over [B, C, H, W]
    for restart in range(max(restarts, 1)):
        if restart == 0:
            xs, ys, y1 = x, y, y_one_hot
        else:
            todo = (~fooled).nonzero().squeeze(1)  # one host read per restart, not per step
            if not len(todo):
                break
            xs, ys, y1 = x[todo], y[todo], y_one_hot[todo]
        x_adv = random_start(xs, eps, norm) if restarts else xs.clone()
        best = x_adv  # replaced by torch.where below, never written in place
        found = torch.zeros(len(xs), dtype=torch.bool, device=x.device)
        for _ in range(steps):
            grad, logits = loss_gradient(classifier, x_adv, y1)
            new = (logits.argmax(1) != ys) & ~found
            # torch.where, not best[new] = x_adv[new]: boolean indexing reads the mask's count on the host every step.
            best = torch.where(new.view(per_image), x_adv, best)
            found |= new
            x_adv = project(x_adv + step_size * direction(grad, norm), xs, eps, norm)
        x_adv = torch.where(found.view(per_image), best, x_adv)
        if restart < max(restarts, 1) - 1:  # the last iterate may fool too; the next restart skips what is fooled
            with torch.no_grad():
                found |= classifier.model(x_adv).argmax(1) != ys
        if restart == 0:
            x_out, fooled = x_adv, found
        else:
            x_out[todo], fooled[todo] = x_adv, found
    return x_out


# ------------------------------------------------------------------------------------------------ ART's own attacks
def fgsm(classifier, *, eps: float, norm: str, batch_size: int):
    """ART's FastGradientMethod, one step of size eps, no random start (Goodfellow et al. 2015): the reference the
    suite's own sweep is tested against."""
    from art.attacks.evasion import FastGradientMethod

    return FastGradientMethod(classifier, norm=art_norm(norm), eps=eps, eps_step=eps, targeted=False,
                              num_random_init=0, batch_size=batch_size, minimal=False)


def apgd(classifier, *, eps: float, norm: str, steps: int, step_size: float, restarts: int, batch_size: int,
         loss_type: str, targeted: bool = False):
    """ART's AutoProjectedGradientDescent (Croce & Hein 2020) with loss ``cross_entropy`` or
    ``difference_logits_ratio``; it always starts from a random point and adapts its step size from ``step_size``.
    ``targeted``: ``generate``'s labels are then the target classes (APGD-T)."""
    from art.attacks.evasion import AutoProjectedGradientDescent

    return AutoProjectedGradientDescent(classifier, norm=art_norm(norm), eps=eps, eps_step=step_size, max_iter=steps,
                                        targeted=targeted, nb_random_init=restarts, batch_size=batch_size,
                                        loss_type=loss_type, verbose=False)


def square(classifier, *, eps: float, norm: str, steps: int, restarts: int, batch_size: int):
    """ART's SquareAttack (Andriushchenko et al. 2020): black-box, score-based, ``steps`` queries per restart, p_init
    0.8 as in AutoAttack's standard version."""
    from art.attacks.evasion import SquareAttack

    return SquareAttack(classifier, norm=art_norm(norm), max_iter=steps, eps=eps, p_init=0.8, nb_restarts=restarts,
                        batch_size=batch_size, verbose=False)


def generate(attack, x: torch.Tensor, y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``attack.generate`` on device tensors x [B, C, H, W], labels y [B] (the true labels, or the targets of a
    targeted attack): through numpy float32 and one-hot, as ART wants; the result back on x's device."""
    x_np = to_numpy_images(x)
    x_adv = np.asarray(attack.generate(x=x_np, y=one_hot(y, num_classes)), dtype=np.float32)
    return torch.from_numpy(x_adv).to(x.device)
