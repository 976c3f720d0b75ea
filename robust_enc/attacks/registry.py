"""The attack registry: one class per attack with its defaults as class attributes (``base.Attack``), as
torchattacks writes them. Each validates its settings before any batch runs (``plan``) and turns a batch into
adversarial images at every eps. FGSM, PGD, APGD and Square run through ART (only ``art_adapter`` touches it);
AutoAttack runs the reference's own attack classes (``autoattack``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from robust_enc.attacks import art_adapter
from robust_enc.attacks.autoattack import AutoAttack
from robust_enc.attacks.base import Attack, AttackSettings, Plan, Reseed, croce_step, madry_step, no_step
from robust_enc.errors import UserError
from robust_enc.registry import Registry

__all__ = ["ATTACKS", "Attack", "AttackSettings", "AutoAttack", "Plan", "check_eps", "parse_attacks"]

RESERVED = ("none", "worst")  # row names that are not attacks: the clean row and the per-example worst case
ALIASES = {"aa": "autoattack"}  # accepted on input; rows carry the registry name


class FGSM(Attack):
    """Fast Gradient Sign Method (L-inf) / Fast Gradient Method (L2), without random start: one gradient per batch
    (ART's ``loss_gradient``) for the whole eps sweep, then x + eps * direction clipped and projected per eps on the
    device (``test_attacks`` proves it equal to ART's FastGradientMethod)."""

    def __init__(self, classifier: Any, eps_values: Sequence[float], plan: Plan, batch_size: int, reseed: Reseed,
                 num_classes: int) -> None:
        self.classifier, self.norm, self.num_classes = classifier, plan.norm, num_classes
        self.x: torch.Tensor | None = None
        self.step: torch.Tensor | None = None

    def set_batch(self, x: torch.Tensor, y: torch.Tensor) -> None:
        y_one_hot = torch.nn.functional.one_hot(y, self.num_classes).to(x.dtype)
        self.x, self.step = x, art_adapter.fgsm_direction(self.classifier, x, y_one_hot, self.norm)

    def adversarial(self, eps: float) -> torch.Tensor:
        assert self.x is not None and self.step is not None
        return art_adapter.fgsm_apply(self.x, self.step, eps, self.norm)

    @property
    def zero_gradient(self) -> torch.Tensor:
        """[B] bool: examples of the last ``set_batch`` batch whose clean loss gradient w.r.t. the input is all zero."""
        assert self.step is not None
        return ~self.step.flatten(1).ne(0).any(1)


class PerEps(Attack):
    """One attack object per eps, built before the first batch (so ART's parameter checks run up front) by
    ``build``: (x, y) -> x_adv. eps 0 is the clean input itself: PGD refuses eps 0 and any attack at eps 0 leaves x
    unchanged."""

    def __init__(self, classifier: Any, eps_values: Sequence[float], plan: Plan, batch_size: int, reseed: Reseed,
                 num_classes: int) -> None:
        self.attacks = {eps: self.build(classifier, eps, plan, batch_size, num_classes) for eps in eps_values
                        if eps > 0}
        self.reseed = reseed
        self.x: torch.Tensor | None = None
        self.y: torch.Tensor | None = None

    def build(self, classifier: Any, eps: float, plan: Plan, batch_size: int,
              num_classes: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        raise NotImplementedError

    def set_batch(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def adversarial(self, eps: float) -> torch.Tensor:
        assert self.x is not None and self.y is not None
        if eps == 0:
            return self.x.clone()
        self.reseed(eps, "")  # random starts draw from numpy's (ART) or torch's (the suite's PGD) global RNG
        return self.attacks[eps](self.x, self.y)


class PGD(PerEps):
    """Projected Gradient Descent (Madry et al. 2018) on the torch device from ART's ``loss_gradient``; per example
    the first iterate that fools the model is kept."""

    default_steps = 10
    step_rule = staticmethod(madry_step)
    random_start = "optional"

    def build(self, classifier: Any, eps: float, plan: Plan, batch_size: int, num_classes: int):
        return functools.partial(art_adapter.pgd, classifier, eps=eps, norm=plan.norm, steps=plan.steps,
                                 step_size=plan.step_size_at(eps), restarts=plan.restarts, num_classes=num_classes)


class APGDCE(PerEps):
    """ART's Auto-PGD on cross-entropy (Croce & Hein 2020)."""

    default_steps = 100
    step_rule = staticmethod(croce_step)
    random_start = "always"
    loss_type = "cross_entropy"

    def build(self, classifier: Any, eps: float, plan: Plan, batch_size: int, num_classes: int):
        attack = art_adapter.apgd(classifier, eps=eps, norm=plan.norm, steps=plan.steps,
                                  step_size=plan.step_size_at(eps), restarts=plan.restarts, batch_size=batch_size,
                                  loss_type=self.loss_type)
        return functools.partial(art_adapter.generate, attack, num_classes=num_classes)


class APGDDLR(APGDCE):
    """ART's Auto-PGD on the difference-of-logits ratio (needs >= 3 classes)."""

    min_classes = 3
    loss_type = "difference_logits_ratio"


class Square(PerEps):
    """ART's Square Attack (black-box, score-based) on a row-memoized classifier; ``steps`` = queries."""

    white_box = False
    default_steps = 1000
    step_rule = staticmethod(no_step)
    random_start = "always"

    def build(self, classifier: Any, eps: float, plan: Plan, batch_size: int, num_classes: int):
        attack = art_adapter.square(classifier, eps=eps, norm=plan.norm, steps=plan.steps, restarts=plan.restarts,
                                    batch_size=batch_size)
        return functools.partial(art_adapter.generate, attack, num_classes=num_classes)


ATTACKS: Registry[type[Attack]] = Registry("attack")
ATTACKS.register("fgsm", help="Fast Gradient Sign Method (L-inf) / Fast Gradient Method (L2); one gradient per "
                 "batch for the whole eps sweep")(FGSM)
ATTACKS.register("pgd", help="Projected Gradient Descent (Madry et al.); --steps (10), --step-size (2.5*eps/steps), "
                 "--random-start, --restarts; per example the first iterate that fools the model is kept")(PGD)
ATTACKS.register("apgd-ce", help="Auto-PGD on cross-entropy (Croce & Hein 2020); --steps (100), --restarts")(APGDCE)
ATTACKS.register("apgd-dlr", help="Auto-PGD on the difference-of-logits ratio (needs >= 3 classes)")(APGDDLR)
ATTACKS.register("square", help="Square Attack: black-box, score-based; --steps = queries (1000), --restarts")(Square)
ATTACKS.register("autoattack",
                 help="AutoAttack, standard version, with the reference's code: APGD-CE (--steps, 100), APGD-T (9 "
                 "target classes), FAB-T (9 targets), Square (5,000 queries), each on the examples still robust; any "
                 "misclassified iterate counts; its own step sizes and one start per stage; needs >= 3 classes")(
    AutoAttack)


def parse_attacks(text: str | Sequence[str]) -> tuple[str, ...]:
    """"fgsm,pgd" -> ("fgsm", "pgd"), each checked against the registry (did-you-mean on a typo), no duplicates."""
    names = [n.strip() for n in (text.split(",") if isinstance(text, str) else text)]
    names = [ALIASES.get(n, n) for n in names if n]
    if not names:
        raise UserError(f"--attack needs at least one attack name; known: {', '.join(ATTACKS.names())}")
    for name in names:
        if name in RESERVED:
            raise UserError(f"{name!r} is a result row, not an attack: the clean row ('none') is always written and "
                            f"'worst' is added when two or more attacks run; known: {', '.join(ATTACKS.names())}")
        ATTACKS.lookup(name)
    if len(set(names)) != len(names):
        raise UserError(f"--attack lists an attack twice: {','.join(names)}")
    return tuple(names)


def check_eps(eps: Sequence[float], norm: str, input_shape: Sequence[int]) -> None:
    """An L2 eps above sqrt(C*H*W), the diameter of the [0, 1] image cube, reaches every image: a user error."""
    if norm != "l2":
        return
    limit = math.sqrt(math.prod(input_shape))
    too_big = [e for e in eps if e > limit + 1e-9]
    if too_big:
        raise UserError(f"L2 eps {too_big[0]:g} exceeds sqrt(C*H*W) = {limit:.4g} for {tuple(input_shape)} images: "
                        "every image is within that distance of any other; use a smaller eps")
