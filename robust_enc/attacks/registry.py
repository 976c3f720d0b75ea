"""The attack registry. Each entry knows its own defaults (steps, step-size rule, random starts), validates its
settings before any batch runs, and turns a batch into adversarial images at every eps. Only ``art_adapter`` touches
ART; entries call it.

An entry's life in a run: ``plan(settings, num_classes)`` (validate, resolve defaults) -> ``prepare(classifier,
eps_values, plan, batch_size)`` (build the ART objects once) -> per batch ``set_batch(x, y)`` (work shared by every
eps, e.g. FGSM's one gradient) then ``adversarial(eps)`` for each eps.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from robust_enc.attacks import art_adapter
from robust_enc.errors import UserError
from robust_enc.registry import Registry

RESERVED = ("none", "worst")  # row names that are not attacks: the clean row and the per-example worst case
ALIASES = {"aa": "autoattack"}  # accepted on input; rows carry the registry name


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
    """An attack ready for batches: ``set_batch(x, y)`` once per batch, then ``adversarial(eps)`` -> x_adv [B, C, H, W].
    x: [B, C, H, W] float32 in [0, 1] on the run's device; y: [B] int64 labels; x_adv on the same device."""

    def set_batch(self, x: torch.Tensor, y: torch.Tensor) -> None:
        raise NotImplementedError

    def adversarial(self, eps: float) -> torch.Tensor:
        raise NotImplementedError


class SweepFGSM(Prepared):
    """FGSM without random start steps along the same direction at every eps: one gradient per batch (ART's
    ``loss_gradient``) for the whole sweep, then x + eps * direction clipped and projected per eps on the device."""

    def __init__(self, classifier: Any, plan: Plan, num_classes: int) -> None:
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


class AttackPerEps(Prepared):
    """One attack per eps, built before the first batch (so ART's parameter checks run up front). eps 0 is the clean
    input itself: PGD refuses eps 0 and any attack at eps 0 leaves x unchanged."""

    def __init__(self, build: Callable[..., Any], classifier: Any, eps_values: Sequence[float], plan: Plan,
                 batch_size: int, reseed: Callable[[float, str], None], num_classes: int) -> None:
        self.attacks = {eps: build(classifier, eps, plan, batch_size) for eps in eps_values if eps > 0}
        self.reseed, self.num_classes = reseed, num_classes
        self.x: torch.Tensor | None = None
        self.y: torch.Tensor | None = None

    def set_batch(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def adversarial(self, eps: float) -> torch.Tensor:
        assert self.x is not None and self.y is not None
        if eps == 0:
            return self.x.clone()
        self.reseed(eps, "")  # random starts draw from numpy's (ART) or torch's (the suite's PGD) global RNG
        return self.attacks[eps](self.x, self.y)


class AutoAttack(Prepared):
    """AutoAttack's standard version (Croce & Hein 2020) as a cascade of ART attacks: APGD-CE (``plan.steps``
    iterations, 1 random start), then APGD-T on the DLR loss (one run per target class: the k-th highest clean logit,
    k = 2 .. min(10, classes)), then Square (5,000 queries, p_init 0.8). FAB-T is left out: ART has no FAB attack.

    Each attack runs only on the examples every earlier one failed on, so an example counts as robust only when all
    of them failed; per example the first adversarial image that fools the model is kept. Random starts are seeded
    per (batch, eps, stage), as every other attack's."""

    SQUARE_QUERIES = 5000
    TARGETS = 9

    def __init__(self, classifier: Any, eps_values: Sequence[float], plan: Plan, batch_size: int,
                 reseed: Callable[[float, str], None], num_classes: int) -> None:
        self.classifier, self.reseed, self.num_classes = classifier, reseed, num_classes
        self.targets = min(self.TARGETS, num_classes - 1)
        self.stages: dict[float, list[tuple[str, Any]]] = {}
        for eps in eps_values:
            if eps == 0:
                continue
            common = dict(eps=eps, norm=plan.norm, batch_size=batch_size)
            apgd = dict(steps=plan.steps, step_size=plan.step_size_at(eps), restarts=1, **common)
            self.stages[eps] = [
                ("apgd-ce", art_adapter.apgd(classifier, loss_type="cross_entropy", **apgd)),
                ("apgd-t", art_adapter.apgd(classifier, loss_type="difference_logits_ratio", targeted=True, **apgd)),
                ("square", art_adapter.square(classifier, steps=self.SQUARE_QUERIES, restarts=1, **common)),
            ]
        self.x: torch.Tensor | None = None
        self.y: torch.Tensor | None = None
        self.ranked: torch.Tensor | None = None

    def set_batch(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y
        with torch.no_grad():  # target classes from the clean logits, as AutoAttack picks them
            self.ranked = self.classifier.model(x).argsort(1, descending=True)

    def _fooled(self, x_adv: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.classifier.model(x_adv).argmax(1) != y

    def adversarial(self, eps: float) -> torch.Tensor:
        x, y, ranked = self.x, self.y, self.ranked
        assert x is not None and y is not None and ranked is not None
        x_adv = x.clone()
        if eps == 0:
            return x_adv
        robust = ~self._fooled(x, y)
        for name, attack in self.stages[eps]:
            runs = [(name, y)] if name != "apgd-t" else [(f"apgd-t{k}", ranked[:, k]) for k in
                                                         range(1, self.targets + 1)]
            for run_name, labels in runs:
                idx = robust.nonzero().squeeze(1)
                if not len(idx):
                    return x_adv
                self.reseed(eps, run_name)
                candidate = art_adapter.generate(attack, x[idx], labels[idx], self.num_classes)
                fooled = self._fooled(candidate, y[idx])
                x_adv[idx[fooled]] = candidate[fooled]
                robust[idx[fooled]] = False
        return x_adv


@dataclass(frozen=True)
class AttackEntry:
    """Per-attack behaviour: ``prepare(classifier, eps_values, plan, batch_size, reseed, num_classes)`` makes the
    ``Prepared`` that turns batches into adversarial images."""

    white_box: bool
    default_steps: int  # 0 = one step (FGSM)
    step_rule: Callable[[float, int], float]
    random_start: str  # "never", "optional" (PGD: --random-start) or "always" (APGD, square)
    prepare: Callable[..., Prepared]
    min_classes: int = 2
    fixed_restarts: int | None = None  # the attack's own protocol (autoattack: one start per stage)

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
        if self.fixed_restarts is not None:
            restarts = self.fixed_restarts
        if self.random_start == "optional" and not settings.random_start and settings.restarts > 1:
            raise UserError(f"attack {name}: --restarts {settings.restarts} needs --random-start (without it every "
                            "restart starts at x and finds the same point)")
        step_size = settings.step_size if self.default_steps else None
        if step_size is not None and not (math.isfinite(step_size) and step_size > 0):
            raise UserError(f"--step-size must be > 0 (pixel units), got {step_size}")
        return Plan(name, settings.norm, steps, restarts, step_size, self.step_rule, self.white_box,
                    bool(self.default_steps))


ATTACKS: Registry[AttackEntry] = Registry("attack")


def madry_step(eps: float, steps: int) -> float:
    """2.5 * eps / steps: the step size of Madry et al. and RobustBench, so PGD can cross the ball and come back."""
    return 2.5 * eps / steps


def croce_step(eps: float, steps: int) -> float:
    """APGD's initial step 2 * eps (Croce & Hein 2020); it halves it itself when progress stalls."""
    return 2.0 * eps


def _sweep(classifier: Any, eps_values: Sequence[float], plan: Plan, batch_size: int,
           reseed: Callable[[float, str], None], num_classes: int) -> Prepared:
    return SweepFGSM(classifier, plan, num_classes)


def _pgd(classifier: Any, eps_values: Sequence[float], plan: Plan, batch_size: int,
         reseed: Callable[[float, str], None], num_classes: int) -> Prepared:
    def build(classifier: Any, eps: float, plan: Plan, batch_size: int) -> Callable[..., torch.Tensor]:
        return lambda x, y: art_adapter.pgd(classifier, x, y, eps=eps, norm=plan.norm, steps=plan.steps,
                                            step_size=plan.step_size_at(eps), restarts=plan.restarts,
                                            num_classes=num_classes)

    return AttackPerEps(build, classifier, eps_values, plan, batch_size, reseed, num_classes)


def _art(make: Callable[[Any, float, Plan, int], Any]) -> Callable[..., Prepared]:
    """An ART attack object per eps, run through ``generate`` with the true labels."""

    def prepare(classifier: Any, eps_values: Sequence[float], plan: Plan, batch_size: int,
                reseed: Callable[[float, str], None], num_classes: int) -> Prepared:
        def build(classifier: Any, eps: float, plan: Plan, batch_size: int) -> Callable[..., torch.Tensor]:
            attack = make(classifier, eps, plan, batch_size)
            return lambda x, y: art_adapter.generate(attack, x, y, num_classes)

        return AttackPerEps(build, classifier, eps_values, plan, batch_size, reseed, num_classes)

    return prepare


def _apgd(loss_type: str) -> Callable[[Any, float, Plan, int], Any]:
    return lambda classifier, eps, plan, batch_size: art_adapter.apgd(
        classifier, eps=eps, norm=plan.norm, steps=plan.steps, step_size=plan.step_size_at(eps),
        restarts=plan.restarts, batch_size=batch_size, loss_type=loss_type)


def _square(classifier: Any, eps: float, plan: Plan, batch_size: int) -> Any:
    return art_adapter.square(classifier, eps=eps, norm=plan.norm, steps=plan.steps, restarts=plan.restarts,
                              batch_size=batch_size)


ATTACKS.register("fgsm", help="Fast Gradient Sign Method (L-inf) / Fast Gradient Method (L2); one gradient per "
                 "batch for the whole eps sweep")(
    AttackEntry(white_box=True, default_steps=0, step_rule=lambda eps, steps: eps, random_start="never",
                prepare=_sweep))
ATTACKS.register("pgd", help="Projected Gradient Descent (Madry et al.); --steps (10), --step-size (2.5*eps/steps), "
                 "--random-start, --restarts; per example the first iterate that fools the model is kept")(
    AttackEntry(white_box=True, default_steps=10, step_rule=madry_step, random_start="optional", prepare=_pgd))
ATTACKS.register("apgd-ce", help="Auto-PGD on cross-entropy (Croce & Hein 2020); --steps (100), --restarts")(
    AttackEntry(white_box=True, default_steps=100, step_rule=croce_step, random_start="always",
                prepare=_art(_apgd("cross_entropy"))))
ATTACKS.register("apgd-dlr", help="Auto-PGD on the difference-of-logits ratio (needs >= 3 classes)")(
    AttackEntry(white_box=True, default_steps=100, step_rule=croce_step, random_start="always",
                prepare=_art(_apgd("difference_logits_ratio")), min_classes=3))
ATTACKS.register("square", help="Square Attack: black-box, score-based; --steps = queries (1000), --restarts")(
    AttackEntry(white_box=False, default_steps=1000, step_rule=lambda eps, steps: 0.0, random_start="always",
                prepare=_art(_square)))
ATTACKS.register("autoattack",
                 help="AutoAttack, standard version, as a cascade: APGD-CE (--steps, 100), APGD-T on DLR (9 target "
                 "classes), Square (5,000 queries), each on the examples still robust; no FAB-T (ART has none); "
                 "needs >= 3 classes")(
    AttackEntry(white_box=True, default_steps=100, step_rule=croce_step, random_start="always",
                prepare=AutoAttack, min_classes=3, fixed_restarts=1))


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
