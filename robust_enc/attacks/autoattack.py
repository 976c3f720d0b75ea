"""AutoAttack's standard version (Croce & Hein 2020), per example as their reference code computes it, inside the
suite's batching, seeding, resume, sharding and checks.

The four stages are the reference's own attack classes (``pyautoattack`` 0.2.0, Croce & Hein's code) with the
standard version's settings, called per batch on the examples every earlier stage failed on:

- APGD-CE: 100 iterations (``--steps``), 1 random start;
- APGD-T: the reference's targeted DLR loss, one run per target class (the k-th highest clean logit, k = 2 .. 10);
- FAB-T: the same 9 targets, 100 iterations;
- Square: 5,000 queries, p_init 0.8, the standard's p schedule (``resc_schedule=False``), on a row-memoized forward.

Success is the reference's: an example is broken as soon as any iterate of any stage is misclassified (into any
class, not only a stage's target), not only when the last iterate is. Why the reference code rather than ART's
attacks: ART 1.20's APGD judges the final iterate only, its APGD-T counts only the target class, its targeted DLR
loss and Square's schedule differ, and it has no FAB.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from robust_enc.attacks.art_adapter import RowMemo
from robust_enc.attacks.base import Attack, Plan, Reseed, croce_step

REFERENCE_NORMS = {"linf": "Linf", "l2": "L2"}  # suite name -> the reference's
# The reference warns through this logger about zero gradients on every batch where it sees one: the suite's own
# ``zero_gradient`` flag reports that once per row, so the reference's logger is a detached one that drops warnings.
QUIET = logging.Logger("pyautoattack", logging.ERROR)


class MemoForward:
    """The model's forward as Square calls it (x [B, C, H, W] -> logits [B, K], no gradient), answered from a
    ``RowMemo``: a row asked for again within one Square call (the clean rows, a candidate that the ball and the box
    clip back onto the current image, the final check of the best images) is not forwarded again.

    The reference's Square asks, per query, only for the candidates of the examples still robust; a candidate equals
    the current image when the new square already holds the values it would set (late queries on small images move
    one pixel), and the current image may be thousands of queries old: the memo keeps ``CALLS`` calls' rows."""

    CALLS = 256  # rows of this many calls of the largest size: ~300 bytes each, 10 MB for batches of 128

    def __init__(self, model: nn.Module, device: torch.device) -> None:
        self.model, self.device = model, device
        self.memo = RowMemo(calls=self.CALLS)
        self.forwarded = 0  # rows the model was asked for (tests and the benchmark read it)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.memo.predict(x.detach().cpu().numpy(), self._forward)
        return torch.from_numpy(logits).to(x.device)

    def _forward(self, rows: np.ndarray) -> np.ndarray:
        self.forwarded += len(rows)
        with torch.no_grad():
            return self.model(torch.from_numpy(rows).to(self.device)).float().cpu().numpy()


class AutoAttack(Attack):
    """AutoAttack, standard version: APGD-CE -> APGD-T -> FAB-T -> Square, each on the examples still robust, every
    misclassified iterate counts (the reference's classes, see the module). Random starts are seeded per (batch, eps,
    stage), as every other attack's, so resumed and sharded runs draw what an uninterrupted one does."""

    white_box = True
    default_steps = 100
    step_rule = staticmethod(croce_step)
    random_start = "always"
    min_classes = 3
    fixed_restarts = 1
    fixed_step = True
    SQUARE_QUERIES = 5000
    TARGETS = 9
    FAB_STEPS = 100
    STAGES = ("apgd-ce", "apgd-t", "fab-t", "square")

    def __init__(self, classifier: Any, eps_values: Sequence[float], plan: Plan, batch_size: int, reseed: Reseed,
                 num_classes: int) -> None:
        self.model: nn.Module = classifier.model
        self.device = torch.device(classifier.device)
        self.reseed, self.plan = reseed, plan
        self.targets = min(self.TARGETS, num_classes - 1)
        self.forward = MemoForward(self.model, self.device)
        self.stages = {eps: self._stages(eps) for eps in eps_values if eps > 0}
        self.x: torch.Tensor | None = None
        self.y: torch.Tensor | None = None

    def _stages(self, eps: float) -> dict[str, Any]:
        """The reference's four attack objects at ``eps``, with the standard version's settings."""
        from pyautoattack.autopgd_base import APGDAttack, APGDAttack_targeted
        from pyautoattack.fab_pt import FABAttack_PT
        from pyautoattack.square import SquareAttack

        common = dict(eps=eps, norm=REFERENCE_NORMS[self.plan.norm], device=self.device, verbose=False)
        apgd = dict(n_iter=self.plan.steps, n_restarts=1, eot_iter=1, rho=0.75, logger=QUIET, **common)
        return {
            "apgd-ce": APGDAttack(self.model, loss="ce", **apgd),
            "apgd-t": APGDAttack_targeted(self.model, n_target_classes=self.targets, **apgd),
            "fab-t": FABAttack_PT(self.model, n_restarts=1, n_iter=self.FAB_STEPS, targeted=True,
                                  n_target_classes=self.targets, **common),
            "square": SquareAttack(self.forward, p_init=0.8, n_queries=self.SQUARE_QUERIES, n_restarts=1,
                                   resc_schedule=False, **common),
        }

    def set_batch(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def _fooled(self, x_adv: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.model(x_adv).argmax(1) != y

    def adversarial(self, eps: float) -> torch.Tensor:
        x, y = self.x, self.y
        assert x is not None and y is not None
        x_adv = x.clone()
        if eps == 0:
            return x_adv
        robust = ~self._fooled(x, y)
        for name, attack in self.stages[eps].items():
            idx = robust.nonzero().squeeze(1)
            if not len(idx):
                break
            self.reseed(eps, name)
            attack.seed = torch.initial_seed()  # the reference seeds torch itself from it at the start of perturb
            try:
                candidate = attack.perturb(x[idx], y[idx]).detach()
            finally:  # a memo lives for one Square call: nothing carries over to the next batch, eps or model
                self.forward.memo.clear()
            fooled = self._fooled(candidate, y[idx])  # the reference's own judgement after each stage
            x_adv[idx[fooled]] = candidate[fooled]
            robust[idx[fooled]] = False
        return x_adv
