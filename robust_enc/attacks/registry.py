"""The attack registry. Each entry knows its own defaults (steps, step-size rule, random starts), validates its
settings before any batch runs, and turns a batch into adversarial images at every eps. Only ``art_adapter`` touches
ART; entries call it.

An entry's life in a run: ``plan(settings, num_classes)`` (validate, resolve defaults) -> ``prepare(classifier,
eps_values, plan, batch_size)`` (build the ART objects once) -> per batch ``start(x, y)`` (work shared by every eps,
e.g. FGSM's one gradient) then ``at(eps)`` for each eps.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from robust_enc.attacks import art_adapter
from robust_enc.errors import UserError
from robust_enc.registry import Registry

RESERVED = ("none", "worst")  # row names that are not attacks: the clean row and the per-example worst case


@dataclass(frozen=True)
class AttackSettings:
    """What the user asked for, shared by every attack of a run."""

    norm: str = "linf"  # "linf" or "l2"
    steps: int | None = None  # iterations (queries for square); None = the entry's default
    step_size: float | None = None  # pixel units; None = the entry's rule (PGD: 2.5 * eps / steps)
    random_start: bool = True  # PGD starts at a random point of the eps ball
    restarts: int = 1  # random starts (PGD, APGD) or restarts (square); the per-example best is kept


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


class Prepared:
    """An attack ready for batches: ``start(x, y)`` once per batch, then ``at(eps)`` -> x_adv [B, C, H, W] float32.
    x: [B, C, H, W] float32 in [0, 1]; y: [B, K] one-hot float32."""

    def start(self, x: np.ndarray, y: np.ndarray) -> None:
        raise NotImplementedError

    def at(self, eps: float) -> np.ndarray:
        raise NotImplementedError


class SweepFGSM(Prepared):
    """FGSM without random start steps along the same direction at every eps: one gradient per batch for the whole
    sweep, then x + eps * direction clipped and projected per eps, by ART's own arithmetic."""

    def __init__(self, classifier: Any, plan: Plan, batch_size: int) -> None:
        # eps here only satisfies ART's parameter check: the sweep passes each eps explicitly.
        self.attack = art_adapter.fgsm(classifier, eps=1.0, norm=plan.norm, batch_size=batch_size)
        self.step: art_adapter.FgsmDirection | None = None

    def start(self, x: np.ndarray, y: np.ndarray) -> None:
        self.step = art_adapter.fgsm_direction(self.attack, x, y)

    def at(self, eps: float) -> np.ndarray:
        assert self.step is not None
        return art_adapter.fgsm_apply(self.attack, self.step, eps)

    @property
    def zero_gradient(self) -> np.ndarray:
        """[B] bool: examples of the last ``start`` batch whose clean loss gradient w.r.t. the input is all zero."""
        assert self.step is not None
        return self.step.zero_gradient


class PerEps(Prepared):
    """One ART attack object per eps, built before the first batch (so ART's parameter checks run up front).
    eps 0 is the clean input itself: PGD refuses eps 0 and any attack at eps 0 leaves x unchanged."""

    def __init__(self, build: Callable[..., Any], classifier: Any, eps_values: Sequence[float], plan: Plan,
                 batch_size: int, reseed: Callable[[float], None],
                 run: Callable[[Any, np.ndarray, np.ndarray], np.ndarray] = art_adapter.generate) -> None:
        self.attacks = {eps: build(classifier, eps, plan, batch_size) for eps in eps_values if eps > 0}
        self.reseed, self.run = reseed, run
        self.x: np.ndarray | None = None
        self.y: np.ndarray | None = None

    def start(self, x: np.ndarray, y: np.ndarray) -> None:
        self.x, self.y = x, y

    def at(self, eps: float) -> np.ndarray:
        assert self.x is not None and self.y is not None
        if eps == 0:
            return self.x.copy()
        self.reseed(eps)  # random starts draw from numpy's global RNG
        return self.run(self.attacks[eps], self.x, self.y)


@dataclass(frozen=True)
class AttackEntry:
    """Per-attack behaviour. ``build(classifier, eps, plan, batch_size)`` makes the ART object for one eps; when
    ``sweep`` is set the entry instead prepares a ``SweepFGSM``."""

    white_box: bool
    default_steps: int  # 0 = one step (FGSM)
    step_rule: Callable[[float, int], float]
    random_start: str  # "never", "optional" (PGD: --random-start) or "always" (APGD, square)
    build: Callable[..., Any] | None = None
    run: Callable[[Any, np.ndarray, np.ndarray], np.ndarray] = art_adapter.generate  # (attack, x, y) -> x_adv
    sweep: bool = False
    min_classes: int = 2

    def plan(self, name: str, settings: AttackSettings, num_classes: int) -> Plan:
        """Resolve defaults and reject settings this attack cannot run with (before any batch)."""
        if num_classes < self.min_classes:
            raise UserError(f"attack {name} needs at least {self.min_classes} classes, the data set has {num_classes}")
        steps = 0
        if self.default_steps:
            steps = self.default_steps if settings.steps is None else settings.steps
            if steps < 1:
                raise UserError(f"attack {name} needs --steps >= 1, got {steps}")
        if settings.restarts < 1:
            raise UserError(f"--restarts must be >= 1, got {settings.restarts}")
        restarts = {"never": 0, "always": settings.restarts,
                    "optional": settings.restarts if settings.random_start else 0}[self.random_start]
        if self.random_start == "optional" and not settings.random_start and settings.restarts > 1:
            raise UserError(f"attack {name}: --restarts {settings.restarts} needs --random-start (without it every "
                            "restart starts at x and finds the same point)")
        step_size = settings.step_size if self.default_steps else None
        if step_size is not None and not (math.isfinite(step_size) and step_size > 0):
            raise UserError(f"--step-size must be > 0 (pixel units), got {step_size}")
        return Plan(name, settings.norm, steps, restarts, step_size, self.step_rule, self.white_box,
                    bool(self.default_steps))

    def prepare(self, classifier: Any, eps_values: Sequence[float], plan: Plan, batch_size: int,
                reseed: Callable[[float], None]) -> Prepared:
        if self.sweep:
            return SweepFGSM(classifier, plan, batch_size)
        assert self.build is not None
        return PerEps(self.build, classifier, eps_values, plan, batch_size, reseed, self.run)


ATTACKS: Registry[AttackEntry] = Registry("attack")


def madry_step(eps: float, steps: int) -> float:
    """2.5 * eps / steps: the step size of Madry et al. and RobustBench, so PGD can cross the ball and come back."""
    return 2.5 * eps / steps


def croce_step(eps: float, steps: int) -> float:
    """APGD's initial step 2 * eps (Croce & Hein 2020); it halves it itself when progress stalls."""
    return 2.0 * eps


def _pgd(classifier: Any, eps: float, plan: Plan, batch_size: int) -> Any:
    return art_adapter.pgd(classifier, eps=eps, norm=plan.norm, steps=plan.steps, step_size=plan.step_size_at(eps),
                           random_inits=plan.restarts, batch_size=batch_size)


def _apgd(loss_type: str) -> Callable[..., Any]:
    def build(classifier: Any, eps: float, plan: Plan, batch_size: int) -> Any:
        return art_adapter.apgd(classifier, eps=eps, norm=plan.norm, steps=plan.steps,
                                step_size=plan.step_size_at(eps), restarts=plan.restarts, batch_size=batch_size,
                                loss_type=loss_type)

    return build


def _square(classifier: Any, eps: float, plan: Plan, batch_size: int) -> Any:
    return art_adapter.square(classifier, eps=eps, norm=plan.norm, steps=plan.steps, restarts=plan.restarts,
                              batch_size=batch_size)


ATTACKS.register("fgsm", help="Fast Gradient Sign Method (L-inf) / Fast Gradient Method (L2); one gradient per "
                 "batch for the whole eps sweep")(
    AttackEntry(white_box=True, default_steps=0, step_rule=lambda eps, steps: eps, random_start="never", sweep=True))
ATTACKS.register("pgd", help="Projected Gradient Descent (Madry et al.); --steps (10), --step-size (2.5*eps/steps), "
                 "--random-start, --restarts")(
    AttackEntry(white_box=True, default_steps=10, step_rule=madry_step, random_start="optional", build=_pgd,
                run=art_adapter.pgd_generate))
ATTACKS.register("apgd-ce", help="Auto-PGD on cross-entropy (Croce & Hein 2020); --steps (100), --restarts")(
    AttackEntry(white_box=True, default_steps=100, step_rule=croce_step, random_start="always",
                build=_apgd("cross_entropy")))
ATTACKS.register("apgd-dlr", help="Auto-PGD on the difference-of-logits ratio (needs >= 3 classes)")(
    AttackEntry(white_box=True, default_steps=100, step_rule=croce_step, random_start="always",
                build=_apgd("difference_logits_ratio"), min_classes=3))
ATTACKS.register("square", help="Square Attack: black-box, score-based; --steps = queries (1000), --restarts")(
    AttackEntry(white_box=False, default_steps=1000, step_rule=lambda eps, steps: 0.0, random_start="always",
                build=_square))


def parse_attacks(text: str | Sequence[str]) -> tuple[str, ...]:
    """"fgsm,pgd" -> ("fgsm", "pgd"), each checked against the registry (did-you-mean on a typo), no duplicates."""
    names = [n.strip() for n in (text.split(",") if isinstance(text, str) else text)]
    names = [n for n in names if n]
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


def parse_eps(text: str | float | Sequence[str | float]) -> tuple[float, ...]:
    """"1/255,2/255,0.03" -> sorted unique floats in [0, 1] pixel units."""
    items = text.split(",") if isinstance(text, str) else ([text] if isinstance(text, (int, float)) else list(text))
    values = []
    for item in items:
        if isinstance(item, (int, float)):
            value = float(item)
        else:
            item = item.strip()
            if not item:
                continue
            num, sep, den = item.partition("/")
            try:
                value = float(num) / float(den) if sep else float(num)
            except (ValueError, ZeroDivisionError):
                raise UserError(f"bad eps {item!r}: give floats or k/255 fractions, e.g. 1/255,2/255,0.03") from None
        if not (math.isfinite(value) and 0.0 <= value <= 1.0):
            raise UserError(f"eps {item} = {value:g} is outside [0, 1]: eps is in pixel units of images in [0, 1] "
                            "(use 8/255, not 8)")
        values.append(value)
    if not values:
        raise UserError("--eps needs at least one value, e.g. --eps 1/255,2/255,4/255")
    return tuple(sorted(set(values)))
