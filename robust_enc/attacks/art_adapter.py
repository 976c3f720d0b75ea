"""The one module that imports ART (adversarial-robustness-toolbox 1.20.x). Everything ART-specific lives here: the
classifier wrapper, the attack constructors with every default set explicitly, and the FGSM eps sweep.

ART's pitfalls this module guards against: inputs of ``generate`` become NCHW float32 numpy in [0, 1]; labels go in
one-hot (``loss_gradient`` raises IndexError on integer labels); ``y=`` is always passed, so ART never attacks the
model's own predictions; ``device_type`` comes from the suite's device, never ART's "gpu" default; batch_size,
max_iter, eps and verbose are always given; parameters are frozen during attacks.

Only ART's public API is used (a minor release may rename private functions): the estimator's ``loss_gradient`` and
``predict``, the attacks' ``generate``. FGSM and PGD step on the torch device from ``loss_gradient`` on torch tensors
(no numpy round trip per step); ``test_attacks`` proves them equal to ART's FastGradientMethod and to a hand-written
torch PGD. Square runs on a ``PyTorchClassifier`` subclass whose ``predict`` memoizes rows (``RowMemo``): ART's loop
asks for most rows two or three times; ``test_square_memo`` proves the same logits and adversarial images as ART's.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
from collections import OrderedDict
from collections.abc import Callable, Sequence

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


class RowMemo:
    """The logits of recently seen input rows, keyed by a 128-bit BLAKE2b digest of each row's float32 bytes (a
    collision among the rows of one attack call is out of the question; a 64-bit hash would not be).

    Why: ART's SquareAttack asks, per query, for the predictions of every image (N rows), the loss of the robust ones
    again (R rows it already evaluated) and the loss of the R candidates: N + 2R forward rows where only the R
    candidates (fewer: a candidate that the box or the ball clips back onto the current image is no new input) are
    new. Each query's current images are rows of the previous query's two calls on N and R rows, so an LRU of twice
    the largest call keeps every row asked for again (a candidate that returns to an older state may be forwarded
    again: 46 of 1,707 rows in a 50-query test run): memory stays O(batch x classes), and ``generate`` empties the
    memo after each attack call."""

    def __init__(self, calls: int = 2) -> None:
        self.logits: OrderedDict[bytes, np.ndarray] = OrderedDict()
        self.calls = calls  # the LRU holds this many of the largest call's rows
        self.capacity = 0
        self.row_shape: tuple[int, ...] | None = None

    def clear(self) -> None:
        self.logits.clear()
        self.capacity, self.row_shape = 0, None

    def predict(self, x: np.ndarray, forward: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
        """[B, ...] rows -> [B, K] logits: the memo's for rows seen before, ``forward`` (rows -> logits) on the rest,
        each distinct new row once."""
        x = np.ascontiguousarray(x, dtype=np.float32)  # the bytes hashed are the float32 values the model sees
        if x.shape[1:] != self.row_shape:
            self.clear()
            self.row_shape = x.shape[1:]
        self.capacity = max(self.capacity, self.calls * len(x))
        keys = [hashlib.blake2b(row, digest_size=16).digest() for row in x]
        new: dict[bytes, int] = {}  # digest -> first row holding it
        for i, key in enumerate(keys):
            if key in self.logits:
                self.logits.move_to_end(key)
            elif key not in new:
                new[key] = i
        if new:
            self.logits.update(zip(new, forward(x[list(new.values())])))
        out = np.stack([self.logits[key] for key in keys])
        while len(self.logits) > self.capacity:
            self.logits.popitem(last=False)
        return out


@functools.cache
def _memo_classifier_type() -> type:
    """``PyTorchClassifier`` whose ``predict`` answers from a ``RowMemo`` (built on first use: ART is imported
    lazily)."""
    from art.estimators.classification import PyTorchClassifier

    class MemoClassifier(PyTorchClassifier):
        """ART's classifier with a lean, memoized ``predict``: rows seen during the current attack call come from the
        memo, new rows take one ``torch.no_grad()`` forward pass in batches on the estimator's device (ART's own
        ``predict`` also sets eval mode over every module and builds a DataLoader on each call)."""

        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.memo = RowMemo()

        def predict(self, x: np.ndarray, batch_size: int = 128, training_mode: bool = False, **kwargs) -> np.ndarray:
            if training_mode or not len(x):
                return super().predict(x, batch_size=batch_size, training_mode=training_mode, **kwargs)
            if not self.memo.logits:  # once per attack call, where ART walks every module on every call
                self.model.eval()
            return self.memo.predict(x, functools.partial(self._forward, batch_size=batch_size))

        def _forward(self, x: np.ndarray, batch_size: int) -> np.ndarray:
            x_all = torch.from_numpy(x)
            with torch.no_grad():
                return np.concatenate([self.model(x_all[i:i + batch_size].to(self.device)).cpu().numpy()
                                       for i in range(0, len(x), batch_size)]).astype(np.float32, copy=False)

    return MemoClassifier


def build_classifier(model: nn.Module, *, num_classes: int, input_shape: Sequence[int], device: torch.device,
                     memo: bool = False):
    """A ``PyTorchClassifier`` on ``device`` with cross-entropy loss and clip values (0, 1); ``memo``: one whose
    ``predict`` is memoized per attack call (``RowMemo``), for attacks that ask for the same rows again (Square).

    ``preprocessing=None``: ART's default (0, 1) standardisation is an identity that copies every input.
    ART only knows "cpu" or "gpu" (= ``torch.cuda.current_device()``): a specific GPU is selected by making it the
    current device while ART reads it."""
    from art.estimators.classification import PyTorchClassifier

    device = torch.device(device)
    context = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    with context:
        return (_memo_classifier_type() if memo else PyTorchClassifier)(
            model=model, loss=RecordingCrossEntropy(), input_shape=tuple(input_shape), nb_classes=num_classes,
            clip_values=CLIP_VALUES, preprocessing=None, device_type="gpu" if device.type == "cuda" else "cpu")


def memo_classifier(classifier):
    """``build_classifier(memo=True)`` on ``classifier``'s model, classes, input shape and device."""
    return build_classifier(classifier.model, num_classes=classifier.nb_classes, input_shape=classifier.input_shape,
                            device=classifier.device, memo=True)


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

    return SquareAttack(memo_classifier(classifier), norm=art_norm(norm), max_iter=steps, eps=eps, p_init=0.8,
                        nb_restarts=restarts, batch_size=batch_size, verbose=False)


def generate(attack, x: torch.Tensor, y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``attack.generate`` on device tensors x [B, C, H, W], labels y [B] (the true labels, or the targets of a
    targeted attack): through numpy float32 and one-hot, as ART wants; the result back on x's device."""
    x_np = to_numpy_images(x)
    try:
        x_adv = np.asarray(attack.generate(x=x_np, y=one_hot(y, num_classes)), dtype=np.float32)
    finally:  # a memo lives for one attack call: nothing carries over to the next batch, eps or model
        memo = getattr(attack.estimator, "memo", None)
        if memo is not None:
            memo.clear()
    return torch.from_numpy(x_adv).to(x.device)
