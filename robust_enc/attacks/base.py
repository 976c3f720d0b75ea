"""What every attack class shares: the user's settings (``AttackSettings``), one attack's resolved parameters
(``Plan``) and the ``Attack`` base class, with its defaults as class attributes (as torchattacks writes them).

An attack's life in a run: ``Cls.plan(name, settings, num_classes)`` (validate, resolve defaults) ->
``Cls(classifier, eps_values, plan, batch_size, reseed, num_classes)`` (build the attack objects once, so their own
parameter checks run before any batch) -> per batch ``set_batch(x, y)`` (work shared by every eps, e.g. FGSM's one
gradient) then ``adversarial(eps)`` for each eps.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from robust_enc.errors import UserError

Reseed = Callable[[float, str], None]  # (eps, stage) -> seeds random, numpy and torch for that batch/attack/eps/stage


@dataclass(frozen=True)
class AttackSettings:
    """What the user asked for, shared by every attack of a run."""

    norm: str = "linf"  # "linf" or "l2"
    steps: int | None = None  # iterations (queries for square); None = the attack's default
    step_size: float | None = None  # pixel units; None = the attack's rule (PGD: 2.5 * eps / steps)
    random_start: bool = True  # PGD starts at a random point of the eps ball
    restarts: int = 1  # random starts (PGD, APGD) or restarts (square); the per-example best is kept


def madry_step(eps: float, steps: int) -> float:
    """2.5 * eps / steps: the step size of Madry et al. and RobustBench, so PGD can cross the ball and come back."""
    return 2.5 * eps / steps


def croce_step(eps: float, steps: int) -> float:
    """APGD's initial step 2 * eps (Croce & Hein 2020); it halves it itself when progress stalls."""
    return 2.0 * eps


def no_step(eps: float, steps: int) -> float:
    return 0.0


def full_step(eps: float, steps: int) -> float:
    return eps


@dataclass(frozen=True)
class Plan:
    """One attack's resolved parameters, as its result rows record them."""

    name: str
    norm: str
    steps: int  # 0 for one-step attacks
    restarts: int  # random starts actually used (0 = starts at x)
    step_size: float | None  # fixed step, or None = ``step_rule(eps, steps)``
    step_rule: Callable[[float, int], float]
    white_box: bool
    iterative: bool

    def step_size_at(self, eps: float) -> float:
        return self.step_size if self.step_size is not None else self.step_rule(eps, self.steps)


class Attack:
    """One attack, ready for batches: ``set_batch(x, y)`` once per batch, then ``adversarial(eps)`` -> x_adv
    [B, C, H, W]. x: [B, C, H, W] float32 in [0, 1] on the run's device; y: [B] int64 labels; x_adv on the same
    device. Subclasses set the defaults below and build their attack objects in ``__init__``."""

    white_box: ClassVar[bool] = True
    default_steps: ClassVar[int] = 0  # 0 = one step (FGSM)
    step_rule: ClassVar[Callable[[float, int], float]] = staticmethod(full_step)
    random_start: ClassVar[str] = "never"  # "never", "optional" (PGD: --random-start) or "always" (APGD, square)
    min_classes: ClassVar[int] = 2
    fixed_restarts: ClassVar[int | None] = None  # the attack's own protocol (autoattack: one start per stage)
    fixed_step: ClassVar[bool] = False  # the attack sets its own step size (autoattack): --step-size is not used

    def __init__(self, classifier: Any, eps_values: Sequence[float], plan: Plan, batch_size: int, reseed: Reseed,
                 num_classes: int) -> None:
        raise NotImplementedError

    def set_batch(self, x: torch.Tensor, y: torch.Tensor) -> None:
        raise NotImplementedError

    def adversarial(self, eps: float) -> torch.Tensor:
        raise NotImplementedError

    @classmethod
    def plan(cls, name: str, settings: AttackSettings, num_classes: int) -> Plan:
        """Resolve defaults and reject settings this attack cannot run with (before any batch)."""
        if num_classes < cls.min_classes:
            raise UserError(f"attack {name} needs at least {cls.min_classes} classes, the data set has {num_classes}")
        steps = 0
        if cls.default_steps:
            steps = cls.default_steps if settings.steps is None else settings.steps
            if steps < 1:
                raise UserError(f"attack {name} needs --steps >= 1, got {steps}")
        if settings.restarts < 1:
            raise UserError(f"--restarts must be >= 1, got {settings.restarts}")
        restarts = {"never": 0, "always": settings.restarts,
                    "optional": settings.restarts if settings.random_start else 0}[cls.random_start]
        if cls.fixed_restarts is not None:
            restarts = cls.fixed_restarts
        if cls.random_start == "optional" and not settings.random_start and settings.restarts > 1:
            raise UserError(f"attack {name}: --restarts {settings.restarts} needs --random-start (without it every "
                            "restart starts at x and finds the same point)")
        step_size = settings.step_size if cls.default_steps and not cls.fixed_step else None
        if step_size is not None and not (math.isfinite(step_size) and step_size > 0):
            raise UserError(f"--step-size must be > 0 (pixel units), got {step_size}")
        return Plan(name, settings.norm, steps, restarts, step_size, cls.step_rule, cls.white_box,
                    bool(cls.default_steps))
