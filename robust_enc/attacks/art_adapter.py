"""The one module that imports ART (adversarial-robustness-toolbox 1.20.x). Everything ART-specific lives here: the
classifier wrapper, the attack constructors with every default set explicitly, and the FGSM eps sweep.

ART's pitfalls this module guards against (STYLE.md, "Using ART safely"): inputs become NCHW float32 numpy in
[0, 1]; labels go in one-hot (``loss_gradient`` raises IndexError on integer labels); ``y=`` is always passed, so
ART never attacks the model's own predictions; ``device_type`` comes from the suite's device, never ART's "gpu"
default; batch_size, max_iter, eps and verbose are always given; parameters are frozen during attacks.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

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


@contextlib.contextmanager
def frozen(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode with ``requires_grad=False`` on every parameter; every module's mode and every parameter's flag and
    ``.grad`` restored afterwards.

    Why: ART leaves the model in eval mode and ``param.grad`` filled, and gradients of the weights are wasted work:
    freezing cut ART's overhead over a bare torch loop from 1.33x to 1.10x (MEASURED.md). Modes are restored per
    module, not with ``model.train(mode)``: a model may keep some submodules in eval (e.g. frozen BN) on purpose."""
    modes = [(m, m.training) for m in model.modules()]
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    grads = [p.grad for p in params]
    model.eval()
    model.requires_grad_(False)
    try:
        yield model
    finally:
        for p, flag, grad in zip(params, flags, grads):
            p.requires_grad_(flag)
            p.grad = grad
        for m, mode in modes:
            m.training = mode


def build_classifier(model: nn.Module, *, num_classes: int, input_shape: Sequence[int], device: torch.device):
    """A ``PyTorchClassifier`` on ``device`` with cross-entropy loss and clip values (0, 1).

    ART only knows "cpu" or "gpu" (= ``torch.cuda.current_device()``): a specific GPU is selected by making it the
    current device while ART reads it."""
    from art.estimators.classification import PyTorchClassifier

    device = torch.device(device)
    context = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    with context:
        return PyTorchClassifier(model=model, loss=nn.CrossEntropyLoss(), input_shape=tuple(input_shape),
                                 nb_classes=num_classes, clip_values=CLIP_VALUES,
                                 device_type="gpu" if device.type == "cuda" else "cpu")


def predict_labels(classifier, x: np.ndarray, batch_size: int) -> np.ndarray:
    """ART's ``predict`` on x [B, C, H, W] float32 in [0, 1] -> [B] int64 top-1 labels: the same numpy -> torch round
    trip every attack's forward passes take, for the suite to compare with its own clean pass."""
    assert x.dtype == np.float32 and x.ndim == 4, "ART wants NCHW float32 numpy"
    return np.asarray(classifier.predict(x, batch_size=batch_size)).argmax(1)


# ------------------------------------------------------------------------------------------------ attack constructors
def fgsm(classifier, *, eps: float, norm: str, batch_size: int):
    """ART's FastGradientMethod, one step of size eps, no random start (Goodfellow et al. 2015)."""
    from art.attacks.evasion import FastGradientMethod

    return FastGradientMethod(classifier, norm=art_norm(norm), eps=eps, eps_step=eps, targeted=False,
                              num_random_init=0, batch_size=batch_size, minimal=False)


def pgd(classifier, *, eps: float, norm: str, steps: int, step_size: float, random_inits: int, batch_size: int):
    """ART's ProjectedGradientDescent (Madry et al. 2018); ``random_inits`` 0 = start at x, k = k random starts
    (ART keeps, per example, the first restart that succeeds)."""
    from art.attacks.evasion import ProjectedGradientDescent

    return ProjectedGradientDescent(classifier, norm=art_norm(norm), eps=eps, eps_step=step_size, max_iter=steps,
                                    targeted=False, num_random_init=random_inits, batch_size=batch_size,
                                    random_eps=False, verbose=False)


def apgd(classifier, *, eps: float, norm: str, steps: int, step_size: float, restarts: int, batch_size: int,
         loss_type: str):
    """ART's AutoProjectedGradientDescent (Croce & Hein 2020) with loss ``cross_entropy`` or
    ``difference_logits_ratio``; it always starts from a random point and adapts its step size from ``step_size``."""
    from art.attacks.evasion import AutoProjectedGradientDescent

    return AutoProjectedGradientDescent(classifier, norm=art_norm(norm), eps=eps, eps_step=step_size, max_iter=steps,
                                        targeted=False, nb_random_init=restarts, batch_size=batch_size,
                                        loss_type=loss_type, verbose=False)


def square(classifier, *, eps: float, norm: str, steps: int, restarts: int, batch_size: int):
    """ART's SquareAttack (Andriushchenko et al. 2020): black-box, score-based, ``steps`` queries per restart."""
    from art.attacks.evasion import SquareAttack

    return SquareAttack(classifier, norm=art_norm(norm), max_iter=steps, eps=eps, p_init=0.8, nb_restarts=restarts,
                        batch_size=batch_size, verbose=False)


def generate(attack, x: np.ndarray, y_one_hot: np.ndarray) -> np.ndarray:
    """``attack.generate`` with the true labels always given; returns float32 [B, C, H, W]."""
    assert x.dtype == np.float32 and x.ndim == 4, "ART wants NCHW float32 numpy"
    return np.asarray(attack.generate(x=x, y=y_one_hot), dtype=np.float32)


def pgd_generate(attack, x: np.ndarray, y_one_hot: np.ndarray) -> np.ndarray:
    """``ProjectedGradientDescent.generate`` for one batch, minus its success-rate log line.

    Why: ART's PyTorch PGD evaluates ``compute_success`` for a ``logger.info`` line whatever the log level: two more
    forward passes (clean and adversarial) per call, ~6% of PGD-10, which the runner repeats anyway. With at most one
    random start and one ART batch, generate() is exactly ``_generate_batch`` on the batch (same calls, same RNG
    draws): test_attacks checks bit identity. Otherwise (restarts > 1 keep the per-example best) use generate()."""
    from art.attacks.evasion.projected_gradient_descent.projected_gradient_descent_pytorch import (
        ProjectedGradientDescentPyTorch,
    )

    inner = attack._attack
    if not isinstance(inner, ProjectedGradientDescentPyTorch) or inner.num_random_init > 1 \
            or len(x) > inner.batch_size or inner.random_eps:
        return generate(attack, x, y_one_hot)
    assert x.dtype == np.float32 and x.ndim == 4, "ART wants NCHW float32 numpy"
    inner._check_compatibility_input_and_eps(x=x)
    targets = inner._set_targets(x, y_one_hot)
    inner._batch_id = 0
    x_adv = inner._generate_batch(x=torch.from_numpy(x.astype(np.float32)),
                                  targets=torch.from_numpy(targets.astype(np.float32)), mask=None, eps=inner.eps,
                                  eps_step=inner.eps_step)
    return np.asarray(x_adv, dtype=np.float32)


# ------------------------------------------------------------------------------------------------ FGSM eps sweep
@dataclass
class FgsmDirection:
    """One batch's FGSM direction, reusable for every eps: ``direction`` [B, C, H, W] float32 (sign of the loss
    gradient for linf, the unit-L2 gradient for l2); ``zero_gradient`` [B] bool: examples whose gradient is all 0."""

    x: np.ndarray
    direction: np.ndarray
    zero_gradient: np.ndarray


def fgsm_direction(attack, x: np.ndarray, y_one_hot: np.ndarray) -> FgsmDirection:
    """The gradient step ART's FastGradientMethod computes, once (one forward + backward for the whole batch).

    ``attack`` is an ``fgsm(...)`` instance whose batch_size >= len(x), so the gradient is taken over the same
    batch as ``generate`` would (the loss is a batch mean; its scale cancels in sign() but not in every ulp)."""
    assert len(x) <= attack.batch_size, "one gradient batch, as FastGradientMethod.generate would use"
    x32 = x.astype(np.float32)  # generate() starts from x.astype(ART_NUMPY_DTYPE), a copy
    # ART's own private step: pinned to ART 1.20.x in pyproject; test_attacks checks bit identity with generate().
    direction = attack._compute_perturbation(x32, y_one_hot, None)
    zero = ~np.any(direction.reshape(len(direction), -1) != 0, axis=1)
    return FgsmDirection(x32, direction, zero)


def fgsm_apply(attack, step: FgsmDirection, eps: float) -> np.ndarray:
    """x + eps * direction, clipped to [0, 1] and projected onto the eps ball: exactly FastGradientMethod._compute's
    arithmetic for one batch (same calls, same order), so the result equals ``generate`` at this eps bit for bit."""
    from art.utils import projection

    if eps == 0:  # FastGradientMethod refuses eps 0; x + 0 * direction is x (and L2 projection would divide 0/0)
        return step.x.copy()
    x_adv = attack._apply_perturbation(step.x, step.direction, eps)  # returns a new array: step.x is untouched
    return step.x + projection(x_adv - step.x, eps, attack.norm)
