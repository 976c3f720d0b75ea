"""Counting one batch of an evaluation: the clean pass, every attack at every eps on what is right clean, the
per-example worst case and the per-example inputs of the sanity checks, summed into integer tallies; then the result
rows from the (all-reduced) tallies."""

from __future__ import annotations

import math
import time
from typing import Any

import torch
from torch import nn

from robust_enc.attacks import art_adapter
from robust_enc.attacks.base import Attack, Plan
from robust_enc.attacks.checks import RowStats, check_rows
from robust_enc.attacks.config import AttackConfig, Provenance
from robust_enc.attacks.registry import ATTACKS, FGSM
from robust_enc.attacks.state import CLEAN, Tallies, Tally
from robust_enc.errors import UserError
from robust_enc.images import DatasetInfo, to_float_images
from robust_enc.models import top_k_hits
from robust_enc.results import ResultRow, library_versions
from robust_enc.runtime.device import MEASUREMENT_PRECISION
from robust_enc.runtime.progress import format_eps
from robust_enc.runtime.seeding import seed_everything, seed_for

REFERENCE = "fgsm-reference"  # the FGSM step the checks compare with when fgsm is not in the run (no row)
ROUNDTRIP_EXAMPLES = 16  # examples of each session's first batch that ART's predict re-classifies (the eps-0 check)


class Evaluation:
    """The state of one evaluation on one process: its attacks, ready for batches, and its tallies."""

    def __init__(self, model: nn.Module, info: DatasetInfo, config: AttackConfig, plans: list[Plan],
                 eps: tuple[float, ...], device: torch.device) -> None:
        self.model, self.info, self.config, self.plans, self.eps, self.device = model, info, config, plans, eps, device
        self.topk = 5 if info.num_classes > 10 else 0  # top-5 only means something with many classes
        self.multi = len(plans) > 1
        self.tallies: Tallies = {CLEAN: Tally()}
        for plan in plans:
            for e in eps:
                self.tallies[(plan.name, e)] = Tally()
        if self.multi:
            for e in eps:
                self.tallies[("worst", e)] = Tally()
        self.use_reference = all(plan.name != "fgsm" for plan in plans)
        self.batch = 0  # global index of the batch being attacked (seeds random starts)
        self.prepared: dict[str, Attack] = {}
        self.gradient: FGSM | None = None  # the per-batch clean gradient: FGSM's own, or the reference's
        self.classifier: Any = None
        self.roundtrip_done = False  # ART predict vs the clean pass: once per process and session
        self.levels: torch.Tensor | None = None  # byte -> float table when the loader sends uint8 images

    def prepare(self, classifier: Any) -> None:
        """Build every ART attack object before the first batch: ART's own parameter checks run up front."""
        self.classifier = classifier
        for plan in self.plans:
            entry = ATTACKS.get(plan.name)

            def reseed(eps: float, stage: str, name: str = plan.name) -> None:
                seed_everything(seed_for(self.config.seed, self.batch, f"{name}/{stage}" if stage else name, eps))

            try:
                self.prepared[plan.name] = entry(classifier, self.eps, plan, self.config.batch_size, reseed,
                                                 self.info.num_classes)
            except (ValueError, TypeError) as err:
                raise UserError(f"attack {plan.name}: ART rejected the settings ({err})") from None
        if self.use_reference:  # no fgsm in the run: the checks still need one gradient per batch
            entry = ATTACKS.get("fgsm")
            plan = entry.plan("fgsm", self.config.settings(), self.info.num_classes)
            self.gradient = FGSM(classifier, self.eps, plan, self.config.batch_size, lambda eps, stage: None,
                                 self.info.num_classes)
        else:
            self.gradient = self.prepared["fgsm"]
        assert isinstance(self.gradient, FGSM)

    def _correct(self, logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B] top-1 and top-k hits (top-1 twice when top-5 is not reported)."""
        top1 = logits.argmax(1) == y
        return top1, top_k_hits(logits, y, self.topk).any(1) if self.topk else top1

    def count_batch(self, x_cpu: torch.Tensor, y_cpu: torch.Tensor) -> None:
        """Count one batch: x [B, C, H, W] float32 in [0, 1] (or uint8, turned into those floats on the device by
        ``self.levels``), y [B] int64."""
        model, device = self.model, self.device
        x, y = x_cpu.to(device, non_blocking=True), y_cpu.to(device, non_blocking=True)
        x = to_float_images(x, self.levels)
        started = time.perf_counter()
        with torch.no_grad():
            logits = model(x)
        clean1, clean5 = self._correct(logits, y)
        prob_like = (((logits >= 0) & (logits <= 1)).all(1) & ((logits.sum(1) - 1).abs() < 1e-3)).sum()
        clean = self.tallies[CLEAN]
        clean.n += len(y)
        clean.clean1 += int(clean1.sum())
        clean.clean5 += int(clean5.sum())
        clean.adv1 = clean.clean1
        clean.prob_like += int(prob_like)
        if not self.roundtrip_done:
            # The eps-0 check: every attack sees the batch through ART's numpy round trip, so ART's predictions must
            # be the clean pass's. On the first ROUNDTRIP_EXAMPLES of each session: a conversion bug is systematic and
            # shows on any examples, while ART's predict on every batch would add ~20% to an FGSM run (measured on 32
            # images of ResNet-20/Fashion-MNIST: 1.3% of a 512-image run).
            # Compared with a pass over the same k rows in one batch, as ART's predict runs them: the full batch's
            # logits may differ in their last bits (batch-size-dependent kernels), flipping a near-tie elsewhere.
            self.roundtrip_done = True
            k = min(len(y), ROUNDTRIP_EXAMPLES)
            art = art_adapter.predict_labels(self.classifier, art_adapter.to_numpy_images(x[:k]), k)
            with torch.no_grad():
                same_rows = model(x[:k]).argmax(1).cpu().numpy()
            clean.roundtrip_checked += k
            clean.roundtrip_mismatch += int((art != same_rows).sum())
        clean.wall_s += time.perf_counter() - started

        # Attack only what is right clean (top-1): the rest is not robust whatever the attack does.
        idx = clean1.nonzero().squeeze(1)
        xa, ya = x[idx], y[idx]
        robust: dict[str, dict[float, torch.Tensor]] = {}  # attack -> eps -> [B] top-1 robust, for the checks
        wall = {e: 0.0 for e in self.eps}  # seconds of every attack at eps, for the worst row
        for plan in self.plans:
            prepared = self.prepared[plan.name]
            robust[plan.name] = {}
            started = time.perf_counter()
            if len(idx):
                prepared.set_batch(xa, ya)
            shared = (time.perf_counter() - started) / len(self.eps)  # FGSM's one gradient, split over the sweep
            for e in self.eps:
                started = time.perf_counter()
                t = self.tallies[(plan.name, e)]
                t.n, t.clean1, t.clean5 = t.n + len(y), t.clean1 + int(clean1.sum()), t.clean5 + int(clean5.sum())
                t.attacked += len(idx)
                adv1 = clean1.clone()
                if len(idx):
                    adv1[idx] = self._count_adversarial(t, plan.norm, prepared.adversarial(e), xa, ya)
                t.adv1 += int(adv1.sum())
                robust[plan.name][e] = adv1
                elapsed = time.perf_counter() - started + shared
                t.wall_s += elapsed
                wall[e] += elapsed
        if len(idx):
            self._gradient_checks(xa, ya, idx, clean1, robust)
        self._count_disagreements(robust)
        if self.multi:
            self._count_worst(robust, len(y), int(clean1.sum()), int(clean5.sum()), len(idx), wall)

    def _count_adversarial(self, t: Tally, norm: str, x_adv: torch.Tensor, xa: torch.Tensor,
                           ya: torch.Tensor) -> torch.Tensor:
        """The checks' maxima of one attack's images x_adv of the clean-right examples xa; returns their [A] top-1
        robust flags."""
        with torch.no_grad():
            ok = self.model(x_adv).argmax(1) == ya
        finite = torch.isfinite(x_adv.flatten(1)).all(1)
        t.nonfinite += int((~finite).sum())  # NaN would slip through the max() checks below
        delta = (x_adv - xa).flatten(1)[finite]
        size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
        if len(size):
            t.max_pert = max(t.max_pert, float(size.max()))
            kept = x_adv[finite]
            t.box_excess = max(t.box_excess, float(-kept.min()), float(kept.max()) - 1.0, 0.0)
        return ok

    def _count_worst(self, robust: dict[str, dict[float, torch.Tensor]], n: int, clean1: int, clean5: int,
                     attacked: int, wall: dict[float, float]) -> None:
        """The worst row at each eps: robust only when every attack failed on the example."""
        for e in self.eps:
            t = self.tallies[("worst", e)]
            t.n, t.clean1, t.clean5, t.attacked = t.n + n, t.clean1 + clean1, t.clean5 + clean5, t.attacked + attacked
            t.adv1 += int(torch.stack([robust[plan.name][e] for plan in self.plans]).all(0).sum())
            t.wall_s += wall[e]
            for plan in self.plans:
                sub = self.tallies[(plan.name, e)]
                t.nonfinite = max(t.nonfinite, sub.nonfinite)
                t.max_pert = max(t.max_pert, sub.max_pert)
                t.box_excess = max(t.box_excess, sub.box_excess)

    def _gradient_checks(self, xa: torch.Tensor, ya: torch.Tensor, idx: torch.Tensor, clean1: torch.Tensor,
                         robust: dict[str, dict[float, torch.Tensor]]) -> None:
        """Zero-gradient count and, without fgsm in the run, the FGSM reference: from one clean loss gradient per
        batch (FGSM's own when it runs: no extra cost), then one forward pass per eps. Its time goes to the clean
        row (the sanity checks' share of the run)."""
        started = time.perf_counter()
        assert self.gradient is not None
        if self.use_reference:
            self.gradient.set_batch(xa, ya)
            robust[REFERENCE] = {}
            for e in self.eps:
                with torch.no_grad():
                    ok = self.model(self.gradient.adversarial(e)).argmax(1) == ya
                robust[REFERENCE][e] = clean1.clone()
                robust[REFERENCE][e][idx] = ok  # robust: right clean and under the FGSM step
        clean = self.tallies[CLEAN]
        clean.zero_grad += int(self.gradient.zero_gradient.sum())
        clean.attacked += len(idx)
        clean.wall_s += time.perf_counter() - started

    def _count_disagreements(self, robust: dict[str, dict[float, torch.Tensor]]) -> None:
        """The per-example inputs of the sanity checks' tests (``checks.py``), summed per (attack, eps) row:
        examples a reference attack broke that this attack left robust and the other way round (reference: one FGSM
        step for an iterative white-box attack; the per-example worst case of the iterative white-box attacks for a
        black-box one), and examples broken at the previous eps but not at this one and the other way round."""
        fgsm = robust.get("fgsm") or robust.get(REFERENCE) or {}
        white = [robust[p.name] for p in self.plans if p.white_box and p.iterative]
        for plan in self.plans:
            mine = robust[plan.name]
            previous = None
            for e in self.eps:
                t = self.tallies[(plan.name, e)]
                reference = None
                if plan.white_box and plan.iterative and e in fgsm:
                    reference = fgsm[e]
                elif not plan.white_box and white:
                    reference = torch.stack([w[e] for w in white]).all(0)
                if reference is not None:
                    t.ref_only += int((~reference & mine[e]).sum())
                    t.self_only += int((reference & ~mine[e]).sum())
                if previous is not None:
                    t.prev_eps_only += int((~previous & mine[e]).sum())
                    t.this_eps_only += int((previous & ~mine[e]).sum())
                previous = mine[e]

    def running(self) -> dict[str, float]:
        """Robust accuracy so far at the largest eps, per attack (and worst)."""
        e = self.eps[-1]
        names = [p.name for p in self.plans] + (["worst"] if self.multi else [])
        out = {}
        for name in names:
            t = self.tallies[(name, e)]
            if t.n:
                out[f"{name}@{format_eps(e, self.config.norm)}"] = t.adv1 / t.n
        return out


def gbr_columns(sums: list[float]) -> dict[str, Any]:
    """The rows' GBR columns from the all-reduced sums of ``evaluation._measure_gbr``; {} when GBR was not measured."""
    if not sums or sums[0] <= 0:
        return {}
    n, total, total_sq, spread_sum, loss_sum = sums
    mean, spread = total / n, spread_sum / n
    var = (total_sq - n * mean * mean) / (n - 1) if n > 1 else math.nan
    return dict(gbr=mean, gbr_stderr=math.sqrt(max(var, 0.0) / n) if n > 1 else math.nan, gbr_output="logits",
                logit_spread=spread, gbr_scale_free=mean / spread if spread > 0 else math.nan, gbr_loss=loss_sum / n)


def result_rows(run: Evaluation, provenance: Provenance, gbr: dict[str, Any]) -> list[ResultRow]:
    info, config = run.info, run.config
    versions = library_versions()
    has5 = bool(run.topk)
    common = dict(run_id=provenance.run_id, model=provenance.model, regularizer=provenance.regularizer,
                  dataset=info.name, split=info.split, subset=info.subset, seed=config.seed,
                  train_top1=provenance.train_top1, weight_sq_norm=provenance.weight_sq_norm,
                  checkpoint_hash=provenance.checkpoint_hash, precision=MEASUREMENT_PRECISION, **versions,
                  weights=provenance.weights, preprocessing=provenance.preprocessing)
    common.update(gbr)

    def row(attack: str, norm: str, eps: float, t: Tally, **extra: Any) -> ResultRow:
        frac = (lambda count: count / t.n) if t.n else (lambda count: math.nan)
        return ResultRow(attack=attack, norm=norm, eps=eps, n=t.n, clean_top1=frac(t.clean1),
                         clean_top5=frac(t.clean5) if has5 else math.nan, adv_top1=frac(t.adv1), wall_s=t.wall_s,
                         images_per_s=t.n / t.wall_s if t.wall_s > 0 else math.nan, **extra, **common)

    clean = run.tallies[CLEAN]
    rows = [row("none", "none", 0.0, clean)]
    prob = clean.prob_like / clean.n if clean.n else 0.0
    stats = [RowStats(probability_fraction=prob)]
    # Run-level facts every attack row is checked against: one clean gradient per batch, ART's round trip.
    model_facts = dict(attacked=int(clean.attacked), zero_gradient=int(clean.zero_grad),
                       probability_fraction=prob, roundtrip_checked=int(clean.roundtrip_checked),
                       roundtrip_mismatch=int(clean.roundtrip_mismatch))
    for plan in run.plans:
        for e in run.eps:
            t = run.tallies[(plan.name, e)]
            rows.append(row(plan.name, plan.norm, e, t, steps=plan.steps,
                            step_size=plan.step_size_at(e) if e > 0 else 0.0, restarts=plan.restarts))
            stats.append(RowStats(max_perturbation=t.max_pert, box_excess=t.box_excess,
                                  white_box=plan.white_box, iterative=plan.iterative, non_finite=int(t.nonfinite),
                                  ref_only=int(t.ref_only), self_only=int(t.self_only),
                                  prev_eps_only=int(t.prev_eps_only), this_eps_only=int(t.this_eps_only),
                                  **model_facts))
    if run.multi:
        for e in run.eps:
            t = run.tallies[("worst", e)]
            rows.append(row("worst", run.config.norm, e, t))
            stats.append(RowStats(t.max_pert, t.box_excess, int(t.attacked), 0, True, False, prob))
    return check_rows(rows, stats)
