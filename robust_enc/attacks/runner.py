"""Evaluate a model under attack over a data set: clean accuracy, each attack at each eps, the per-example worst case.

Protocol (RobustBench/AutoAttack): images in [0, 1], eps in pixel units; each attack runs only on the examples the
model gets right clean (top-5 right when top-5 is reported), so an example counts as robust only when it is correct
clean AND under attack, and ``adv <= clean`` by construction. ``worst`` ANDs the per-example robust flags of every
attack at an eps.

Streaming: batches come from a DataLoader; a batch's images are dropped once counted, so memory does not grow with
the data set. Only integer counts (and a few maxima) are kept per (attack, eps). They are:

- sharded over ``torchrun`` processes by whole batches (rank r takes global batches r, r + world, ...), then summed
  with ``all_reduce``: every batch holds the same images as in one process, so the totals are identical;
- saved atomically after every batch to a progress file next to the results file, named by a hash of the config and
  the checkpoint (so runs sharing a results file keep their own): a killed run resumes at the next batch. Random
  starts are seeded per (seed, global batch, attack, eps), so a resumed or sharded run draws the same random numbers
  as an uninterrupted one (``state.py``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from robust_enc.attacks import art_adapter
from robust_enc.attacks.checks import RowStats, check_rows, flag_lines
from robust_enc.attacks.registry import (
    ATTACKS,
    AttackSettings,
    Plan,
    Prepared,
    SweepFGSM,
    check_eps,
    parse_attacks,
    parse_eps,
)
from robust_enc.attacks.state import (
    Tallies,
    all_reduce,
    load_progress,
    new_tally,
    progress_path,
    save_progress,
    tally_key,
)
from robust_enc.data import (
    DatasetInfo,
    build_dataset,
    build_loader,
    eval_split,
    loader_levels,
    to_float_images,
    unreadable_count,
)
from robust_enc.errors import UserError
from robust_enc.results import ResultRow, append_results, check_results_target, library_versions
from robust_enc.runtime.device import MEASUREMENT_PRECISION
from robust_enc.runtime.distributed import evaluation_process
from robust_enc.runtime.seeding import restored_rng, seed_everything, seed_for
from robust_enc.runtime.sharding import ShardSampler

log = logging.getLogger(__name__)

REFERENCE = "fgsm-reference"  # the FGSM step the checks compare with when fgsm is not in the run (no row)
PROGRESS_FORMAT = 3  # bump when the tallies' keys or fields change: older progress files are then not resumed
ROUNDTRIP_EXAMPLES = 16  # examples of each session's first batch that ART's predict re-classifies (the eps-0 check)


@dataclass(frozen=True)
class AttackConfig:
    """One ``robust-enc attack`` run. Either ``checkpoint`` or ``model`` + ``weights``."""

    checkpoint: str = ""  # run folder or checkpoint file
    model: str = ""  # model registry name, with ``weights`` (a plain torchvision/timm state dict)
    weights: str = ""
    dataset: str = ""  # data set registry name; "" = the checkpoint's
    data_dir: str | None = None
    download: bool = False
    split: str = ""  # "" = the data set's natural evaluation split (test, else val)
    subset: int = 0  # deterministic class-balanced subset; 0 = whole split
    subset_list: str = ""  # file naming the images to take, in its order (e.g. RobustBench's 5,000); "" = none
    cache: str = ""  # folder of decoded evaluation images (robust_enc.cache); "" = decode every run
    batch_size: int = 128  # images per batch, also ART's batch size
    workers: int = 0  # DataLoader worker processes
    device: str = "auto"
    attacks: tuple[str, ...] = ("fgsm",)  # attack registry names
    eps: tuple[float, ...] = (1 / 255, 2 / 255, 4 / 255)  # pixel units, images in [0, 1]
    norm: str = "linf"  # "linf" or "l2"
    steps: int | None = None  # iterations; None = each attack's default (pgd 10, apgd 100, square 1000 queries)
    step_size: float | None = None  # pixel units; None = each attack's rule (pgd 2.5 * eps / steps)
    random_start: bool = True  # PGD starts at a random point in the ball
    restarts: int = 1  # random starts / restarts; the per-example best is kept
    seed: int = 0  # seeds random, numpy and torch per batch
    out: str = ""  # results file (.csv/.json); "" = <run>/results.csv next to the checkpoint
    gbr: bool = False  # attach the model's GBR (paper eq. 18) measured on the same examples

    def settings(self) -> AttackSettings:
        return AttackSettings(self.norm, self.steps, self.step_size, self.random_start, self.restarts)


@dataclass
class Provenance:
    """What the rows say about the model."""

    run_id: str
    model: str
    regularizer: str = "baseline"
    checkpoint_hash: str = ""
    train_top1: float = math.nan
    weight_sq_norm: float = math.nan


@dataclass
class BatchReport:
    """Sent to ``on_batch`` after every batch (rank 0 of a sharded run reports its own shard)."""

    done: int  # images counted so far on this process (resumed ones included)
    total: int  # images this process will count
    images_per_s: float  # over this session's batches, attacks included
    running: dict[str, float] = field(default_factory=dict)  # "attack@eps" -> running robust accuracy
    data_wait_s: float = 0.0  # this session: seconds the loop waited for the DataLoader (decoding, transfer)
    compute_s: float = 0.0  # this session: seconds in the model and the attacks (clean pass, attacks, checks)
    session_images: int = 0  # images counted in this session (not resumed ones)

    def time_split(self) -> str:
        """Where this session's time went: waiting for data vs model compute, with images/s for each (a data wait
        near zero means the loaders keep up; a large one, more --workers or --cache)."""
        n = self.session_images

        def rate(seconds: float) -> str:
            return f"{n / seconds:,.0f} img/s" if seconds > 0 else "-"

        return (f"time: data wait {self.data_wait_s:.1f} s ({rate(self.data_wait_s)}), model compute "
                f"{self.compute_s:.1f} s ({rate(self.compute_s)}), {n} images")


OnBatch = Callable[[BatchReport], None]


def _progress_key(config: AttackConfig, provenance: Provenance, info: DatasetInfo, rank: int, world: int) -> str:
    settings = asdict(config)
    for name in ("out", "device", "workers", "gbr", "download", "data_dir", "cache"):  # do not change what is counted
        settings.pop(name)
    payload = {"config": settings, "checkpoint": provenance.checkpoint_hash, "run_id": provenance.run_id,
               "dataset": info.name, "split": info.split, "size": info.size, "rank": rank, "world": world,
               "art": library_versions().get("art_version", ""), "format": PROGRESS_FORMAT}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------------ the loop
class _Run:
    """The state of one evaluation on one process."""

    def __init__(self, model: nn.Module, info: DatasetInfo, config: AttackConfig, plans: list[Plan],
                 eps: tuple[float, ...], device: torch.device) -> None:
        self.model, self.info, self.config, self.plans, self.eps, self.device = model, info, config, plans, eps, device
        self.topk = 5 if info.num_classes > 10 else 0  # top-5 only means something with many classes
        self.multi = len(plans) > 1
        self.tallies: Tallies = {tally_key("none", 0.0): new_tally()}
        for plan in plans:
            for e in eps:
                self.tallies[tally_key(plan.name, e)] = new_tally()
        if self.multi:
            for e in eps:
                self.tallies[tally_key("worst", e)] = new_tally()
        self.use_reference = all(plan.name != "fgsm" for plan in plans)
        self.batch = 0  # global index of the batch being attacked (seeds random starts)
        self.prepared: dict[str, Prepared] = {}
        self.gradient: SweepFGSM | None = None  # the per-batch clean gradient: FGSM's own, or the reference's
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
                self.prepared[plan.name] = entry.prepare(classifier, self.eps, plan, self.config.batch_size, reseed,
                                                         self.info.num_classes)
            except (ValueError, TypeError) as err:
                raise UserError(f"attack {plan.name}: ART rejected the settings ({err})") from None
        if self.use_reference:  # no fgsm in the run: the checks still need one gradient per batch
            entry = ATTACKS.get("fgsm")
            plan = entry.plan("fgsm", self.config.settings(), self.info.num_classes)
            self.gradient = entry.prepare(classifier, self.eps, plan, self.config.batch_size,
                                          lambda eps, stage: None, self.info.num_classes)
        else:
            self.gradient = self.prepared["fgsm"]
        assert isinstance(self.gradient, SweepFGSM)

    def _correct(self, logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        top1 = logits.argmax(1) == y
        if not self.topk:
            return top1, top1
        return top1, (logits.topk(min(self.topk, logits.shape[1]), dim=1).indices == y[:, None]).any(1)

    def step(self, x_cpu: torch.Tensor, y_cpu: torch.Tensor) -> None:
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
        clean = self.tallies[tally_key("none", 0.0)]
        clean["n"] += len(y)
        clean["clean1"] += int(clean1.sum())
        clean["clean5"] += int(clean5.sum())
        clean["adv1"], clean["adv5"] = clean["clean1"], clean["clean5"]
        clean["prob_like"] += int(prob_like)
        if not self.roundtrip_done:
            # The eps-0 check: every attack sees the batch through ART's numpy round trip, so ART's predictions must
            # be the clean pass's. On the first ROUNDTRIP_EXAMPLES of each session: a conversion bug is systematic and
            # shows on any examples, while ART's predict on every batch would add ~20% to an FGSM run (measured on 32
            # images of ResNet-20/Fashion-MNIST: 1.3% of a 512-image run).
            self.roundtrip_done = True
            k = min(len(y), ROUNDTRIP_EXAMPLES)
            art = art_adapter.predict_labels(self.classifier, art_adapter.to_numpy_images(x[:k]), k)
            clean["roundtrip_checked"] += k
            clean["roundtrip_mismatch"] += int((art != logits[:k].argmax(1).cpu().numpy()).sum())
        clean["wall_s"] += time.perf_counter() - started

        # Attack only what is right clean: the rest is not robust whatever the attack does.
        attack_mask = clean5 if self.topk else clean1
        idx = attack_mask.nonzero().squeeze(1)
        xa, ya = x[idx], y[idx]
        worst = {e: [clean1.clone(), clean5.clone(), 0.0] for e in self.eps}
        robust: dict[str, dict[float, torch.Tensor]] = {}  # attack -> eps -> [B] top-1 robust, for the checks
        for plan in self.plans:
            prepared = self.prepared[plan.name]
            robust[plan.name] = {}
            started = time.perf_counter()
            if len(idx):
                prepared.start(xa, ya)
            shared = (time.perf_counter() - started) / len(self.eps)  # FGSM's one gradient, split over the sweep
            for e in self.eps:
                started = time.perf_counter()
                t = self.tallies[tally_key(plan.name, e)]
                t["n"] += len(y)
                t["clean1"] += int(clean1.sum())
                t["clean5"] += int(clean5.sum())
                t["attacked"] += len(idx)
                adv1 = clean1.clone()
                if len(idx):
                    x_adv = prepared.at(e)
                    with torch.no_grad():
                        ok1_sub, ok5_sub = self._correct(model(x_adv), ya)
                    ok1 = torch.zeros_like(clean1)
                    ok5 = torch.zeros_like(clean5)
                    ok1[idx], ok5[idx] = ok1_sub, ok5_sub
                    adv1, adv5 = clean1 & ok1, clean5 & ok5
                    finite = torch.isfinite(x_adv.flatten(1)).all(1)
                    t["nonfinite"] += int((~finite).sum())  # NaN would slip through the max() checks below
                    delta = (x_adv - xa).flatten(1)[finite]
                    size = delta.abs().amax(1) if plan.norm == "linf" else delta.norm(dim=1)
                    if len(size):
                        t["max_pert"] = max(t["max_pert"], float(size.max()))
                        kept = x_adv[finite]
                        excess = max(float(-kept.min()), float(kept.max()) - 1.0, 0.0)
                        t["box_excess"] = max(t["box_excess"], excess)
                    t["adv1"] += int(adv1.sum())
                    t["adv5"] += int(adv5.sum())
                    w = worst[e]
                    w[0] &= adv1
                    w[1] &= adv5
                robust[plan.name][e] = adv1
                elapsed = time.perf_counter() - started + shared
                t["wall_s"] += elapsed
                worst[e][2] += elapsed
        if len(idx):
            self._gradient_checks(xa, ya, idx, clean1, robust)
        self._count_disagreements(robust)
        if self.multi:
            for e, (w1, w5, elapsed) in worst.items():
                t = self.tallies[tally_key("worst", e)]
                t["n"] += len(y)
                t["clean1"] += int(clean1.sum())
                t["clean5"] += int(clean5.sum())
                t["attacked"] += len(idx)
                t["adv1"] += int(w1.sum())
                t["adv5"] += int(w5.sum())
                t["wall_s"] += elapsed
                for plan in self.plans:
                    sub = self.tallies[tally_key(plan.name, e)]
                    t["nonfinite"] = max(t["nonfinite"], sub["nonfinite"])
                    t["max_pert"] = max(t["max_pert"], sub["max_pert"])
                    t["box_excess"] = max(t["box_excess"], sub["box_excess"])

    def _gradient_checks(self, xa: torch.Tensor, ya: torch.Tensor, idx: torch.Tensor, clean1: torch.Tensor,
                         robust: dict[str, dict[float, torch.Tensor]]) -> None:
        """Zero-gradient count and, without fgsm in the run, the FGSM reference: from one clean loss gradient per
        batch (FGSM's own when it runs: no extra cost), then one forward pass per eps. Its time goes to the clean
        row (the sanity checks' share of the run)."""
        started = time.perf_counter()
        assert self.gradient is not None
        if self.use_reference:
            self.gradient.start(xa, ya)
            robust[REFERENCE] = {}
            for e in self.eps:
                with torch.no_grad():
                    ok = self.model(self.gradient.at(e)).argmax(1) == ya
                robust[REFERENCE][e] = clean1.clone()
                robust[REFERENCE][e][idx] = ok  # robust: right clean and under the FGSM step
        clean = self.tallies[tally_key("none", 0.0)]
        clean["zero_grad"] += int(self.gradient.zero_gradient.sum())
        clean["attacked"] += len(idx)
        clean["wall_s"] += time.perf_counter() - started

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
                t = self.tallies[tally_key(plan.name, e)]
                reference = None
                if plan.white_box and plan.iterative and e in fgsm:
                    reference = fgsm[e]
                elif not plan.white_box and white:
                    reference = torch.stack([w[e] for w in white]).all(0)
                if reference is not None:
                    t["ref_only"] += int((~reference & mine[e]).sum())
                    t["self_only"] += int((reference & ~mine[e]).sum())
                if previous is not None:
                    t["prev_eps_only"] += int((~previous & mine[e]).sum())
                    t["this_eps_only"] += int((previous & ~mine[e]).sum())
                previous = mine[e]

    def running(self) -> dict[str, float]:
        """Robust accuracy so far at the largest eps, per attack (and worst)."""
        e = self.eps[-1]
        names = [p.name for p in self.plans] + (["worst"] if self.multi else [])
        out = {}
        for name in names:
            t = self.tallies[tally_key(name, e)]
            if t["n"]:
                out[f"{name}@{e:.4g}"] = t["adv1"] / t["n"]
        return out


# ------------------------------------------------------------------------------------------------ rows
def _gbr_columns(sums: list[float]) -> dict[str, Any]:
    """The rows' GBR columns from the all-reduced sums of ``_measure_gbr``; {} when GBR was not measured."""
    if not sums or sums[0] <= 0:
        return {}
    n, total, total_sq, spread_sum, loss_sum = sums
    mean, spread = total / n, spread_sum / n
    var = (total_sq - n * mean * mean) / (n - 1) if n > 1 else math.nan
    return dict(gbr=mean, gbr_stderr=math.sqrt(max(var, 0.0) / n) if n > 1 else math.nan, gbr_output="logits",
                logit_spread=spread, gbr_scale_free=mean / spread if spread > 0 else math.nan, gbr_loss=loss_sum / n)


def _rows(run: _Run, provenance: Provenance, gbr: dict[str, Any]) -> list[ResultRow]:
    info, config = run.info, run.config
    versions = library_versions()
    has5 = bool(run.topk)
    common = dict(run_id=provenance.run_id, model=provenance.model, regularizer=provenance.regularizer,
                  dataset=info.name, split=info.split, subset=info.subset, seed=config.seed,
                  train_top1=provenance.train_top1, weight_sq_norm=provenance.weight_sq_norm,
                  checkpoint_hash=provenance.checkpoint_hash, precision=MEASUREMENT_PRECISION, **versions)
    common.update(gbr)

    def row(attack: str, norm: str, eps: float, t: dict[str, float], **extra: Any) -> ResultRow:
        n = int(t["n"])
        frac = (lambda k: t[k] / n) if n else (lambda k: math.nan)
        wall = float(t["wall_s"])
        return ResultRow(attack=attack, norm=norm, eps=eps, n=n, clean_top1=frac("clean1"),
                         clean_top5=frac("clean5") if has5 else math.nan, adv_top1=frac("adv1"),
                         adv_top5=frac("adv5") if has5 else math.nan, wall_s=wall,
                         images_per_s=n / wall if wall > 0 else math.nan, **extra, **common)

    clean = run.tallies[tally_key("none", 0.0)]
    rows = [row("none", "none", 0.0, clean)]
    prob = clean["prob_like"] / clean["n"] if clean["n"] else 0.0
    stats = [RowStats(probability_fraction=prob)]
    # Run-level facts every attack row is checked against: one clean gradient per batch, ART's round trip.
    model_facts = dict(attacked=int(clean["attacked"]), zero_gradient=int(clean["zero_grad"]),
                       probability_fraction=prob, roundtrip_checked=int(clean["roundtrip_checked"]),
                       roundtrip_mismatch=int(clean["roundtrip_mismatch"]))
    for plan in run.plans:
        for e in run.eps:
            t = run.tallies[tally_key(plan.name, e)]
            rows.append(row(plan.name, plan.norm, e, t, steps=plan.steps,
                            step_size=plan.step_size_at(e) if e > 0 else 0.0, restarts=plan.restarts))
            stats.append(RowStats(max_perturbation=t["max_pert"], box_excess=t["box_excess"],
                                  white_box=plan.white_box, iterative=plan.iterative, non_finite=int(t["nonfinite"]),
                                  ref_only=int(t["ref_only"]), self_only=int(t["self_only"]),
                                  prev_eps_only=int(t["prev_eps_only"]), this_eps_only=int(t["this_eps_only"]),
                                  **model_facts))
    if run.multi:
        for e in run.eps:
            t = run.tallies[tally_key("worst", e)]
            rows.append(row("worst", run.config.norm, e, t))
            stats.append(RowStats(t["max_pert"], t["box_excess"], int(t["attacked"]), 0, True, False, prob))
    return check_rows(rows, stats)


def _measure_gbr(model: nn.Module, dataset: Dataset, config: AttackConfig, device: torch.device, rank: int,
                 world: int) -> list[float]:
    """[n, sum, sum of squares] of per-example GBR, then the sums of the logit spread and of the loss GBR (the
    scale-free companions, see gbr.py), over this rank's shard (combined across ranks by the caller).

    An empty shard gives zeros rather than an error: the other ranks are waiting for it in ``all_reduce``."""
    from robust_enc.gbr import gbr_values  # lazy: only runs with --gbr

    loader = build_loader(dataset, batch_size=config.batch_size, workers=config.workers,
                          sampler=ShardSampler(len(dataset), config.batch_size, rank, world))
    # Hutchinson probes seeded per global batch (this rank's j-th batch is global batch rank + j * world), so the
    # totals do not depend on the number of processes.
    measured = gbr_values(model, loader, output="logits", device=device, seed=config.seed,
                          batch_seed=lambda j: seed_for(config.seed, rank + j * world, "gbr", 0.0))
    values = measured.values.double()
    return [float(len(values)), float(values.sum()), float(values.pow(2).sum()),
            float(measured.logit_spread.sum()), float(measured.loss_gbr.sum())]


def run_evaluation(model: nn.Module, dataset: Dataset, info: DatasetInfo, config: AttackConfig,
                   provenance: Provenance, *, out: Path | None, max_batches: int | None = None,
                   on_batch: OnBatch | None = None) -> list[ResultRow]:
    """The loop shared by ``evaluate`` and ``benchmark``. Returns [] when stopped by ``max_batches`` (progress kept
    for a later call to resume); otherwise the checked rows, appended to ``out`` by rank 0 when ``out`` is given."""
    attacks = parse_attacks(config.attacks)
    if config.norm not in art_adapter.NORMS:
        raise UserError(f"unknown --norm {config.norm!r}; known: {', '.join(art_adapter.NORMS)}")
    eps = parse_eps(config.eps, config.norm)
    check_eps(eps, config.norm, info.input_shape)
    if config.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {config.batch_size}")
    if len(dataset) == 0:
        raise UserError(f"data set {info.name} split {info.split} is empty: nothing to evaluate")
    plans = [ATTACKS.get(name).plan(name, config.settings(), info.num_classes) for name in attacks]

    with evaluation_process(config.device) as (rank, world, device), restored_rng():
        model = model.to(device)
        run = _Run(model, info, config, plans, eps, device)
        with art_adapter.frozen(model):
            classifier = art_adapter.build_classifier(model, num_classes=info.num_classes,
                                                      input_shape=info.input_shape, device=device)
            run.prepare(classifier)
            key = _progress_key(config, provenance, info, rank, world)
            progress = progress_path(out, key) if out is not None else None
            start = 0
            if progress is not None and (saved := load_progress(progress, key)) is not None:
                start, run.tallies = saved
                log.warning("resuming %s from batch %d of this process (progress file %s)", provenance.run_id, start,
                            progress)
            sampler = ShardSampler(len(dataset), config.batch_size, rank, world, start)
            loader = build_loader(dataset, batch_size=config.batch_size, workers=config.workers, sampler=sampler,
                                  uint8=True)
            run.levels = loader_levels(loader, device)
            done_before = int(run.tallies[tally_key("none", 0.0)]["n"])
            total = done_before + len(sampler)
            session_start, session_images = time.perf_counter(), 0
            data_wait = compute = 0.0  # where the time goes: waiting for batches vs the model and attacks
            stopped = False
            waited_from = time.perf_counter()
            for j, (x, y) in enumerate(loader):
                arrived = time.perf_counter()
                data_wait += arrived - waited_from
                if max_batches is not None and j >= max_batches:
                    stopped = True
                    break
                run.batch = rank + (start + j) * world
                if len(y):
                    run.step(x, y)  # ends on host reads of the counts, so CUDA work is finished when it returns
                compute += time.perf_counter() - arrived
                session_images += len(y)
                if progress is not None:
                    save_progress(progress, key, start + j + 1, run.tallies)
                if on_batch is not None:
                    rate = session_images / max(time.perf_counter() - session_start, 1e-9)
                    on_batch(BatchReport(done_before + session_images, total, rate, run.running(), data_wait, compute,
                                         session_images))
                waited_from = time.perf_counter()
            if session_images:
                log.info(BatchReport(0, 0, 0.0, {}, data_wait, compute, session_images).time_split())
            if stopped:
                log.warning("stopped after %d batches; rerun the same command to resume", max_batches)
                return []
        skipped = unreadable_count(dataset)
        if skipped:
            log.warning("%d unreadable images were skipped", skipped)
        gbr_sums = _measure_gbr(model, dataset, config, device, rank, world) if config.gbr else []
        all_reduce(run.tallies, gbr_sums)
        if run.tallies[tally_key("none", 0.0)]["n"] == 0:  # after the reduction: every rank raises alike
            if progress is not None:
                progress.unlink(missing_ok=True)
            raise UserError(f"no readable image in data set {info.name} split {info.split} (all {len(dataset)} "
                            "failed to load, see the warnings): fix or replace the files, or pass another --dataset")
        rows = _rows(run, provenance, _gbr_columns(gbr_sums))
        flagged = flag_lines(rows)
        if flagged and rank == 0:  # one line per run, on one process; the command line shows them in a panel
            log.warning("sanity checks flagged %d rows of %s: %s", len(flagged), provenance.run_id,
                        " | ".join(line.split(" ", 1)[1] for line in flagged))
        if out is not None and rank == 0:
            append_results(out, rows)
            log.info("wrote %d rows to %s", len(rows), out)
        if world > 1:
            import torch.distributed as dist

            dist.barrier()  # rows are written before any rank forgets its progress
        if progress is not None:
            progress.unlink(missing_ok=True)
        return rows


# ------------------------------------------------------------------------------------------------ entry points
def natural_split(dataset: str, data_dir: str | None, download: bool, subset: int,
                  image_size: int | None, **kwargs: Any) -> tuple[Dataset, DatasetInfo]:
    """The data set's evaluation split (test; val for ImageNet layouts), as its registry entry names it; ``kwargs``
    go to ``build_dataset`` (subset_list, cache, workers)."""
    return build_dataset(dataset, eval_split(dataset), data_dir=data_dir, download=download, subset=subset,
                         image_size=image_size, **kwargs)


def results_path(config: AttackConfig) -> Path:
    """--out, or results.csv in the run folder (the checkpoint file's folder), or ./results.csv for --weights."""
    if config.out:
        return Path(config.out)
    if config.checkpoint:
        path = Path(config.checkpoint)
        return (path if path.is_dir() else path.parent) / "results.csv"
    return Path("results.csv")


def load_model(config: AttackConfig, info: DatasetInfo | None = None) -> tuple[nn.Module, Provenance,
                                                                               DatasetInfo | None, tuple]:
    """(model, provenance, the checkpoint's DatasetInfo or None, the model's (classes, input shape))."""
    from robust_enc.checkpoint import load_checkpoint, load_plain_weights, model_from_checkpoint, state_hash
    from robust_enc.models import ModelSpec, weight_norms
    from robust_enc.train.enc import bake_model

    if bool(config.checkpoint) == bool(config.model or config.weights):
        raise UserError("give either --checkpoint RUN_OR_FILE or --model NAME --weights PATH")
    if config.checkpoint:
        ckpt = load_checkpoint(config.checkpoint)
        # ENC/WN/WS baked into plain weights: each layer normalized once here, not in every forward pass of the
        # attacks (the same outputs: bake_model keeps the very tensors the parametrizations compute).
        model = bake_model(model_from_checkpoint(ckpt))
        metrics = ckpt.metrics or {}
        wsq = metrics.get("weight_sq_norm")
        provenance = Provenance(
            run_id=ckpt.run_id, model=ckpt.spec.name, regularizer=ckpt.spec.regularizer,
            checkpoint_hash=ckpt.content_hash or state_hash(ckpt.state_dict),
            train_top1=float(metrics.get("train_top1", math.nan)),
            weight_sq_norm=float(wsq) if wsq is not None else sum(weight_norms(model).values()))
        return model, provenance, ckpt.dataset_info, (ckpt.spec.num_classes, tuple(ckpt.spec.input_shape))
    if not (config.model and config.weights):
        raise UserError("--model and --weights go together: --model NAME --weights PATH")
    assert info is not None
    spec = ModelSpec(config.model, info.num_classes, info.input_shape, info.mean, info.std)
    model = load_plain_weights(spec, config.weights)
    provenance = Provenance(run_id=Path(config.weights).stem, model=config.model,
                            checkpoint_hash=state_hash(model.state_dict()),
                            weight_sq_norm=sum(weight_norms(model).values()))
    return model, provenance, None, (info.num_classes, tuple(info.input_shape))


def evaluate(config: AttackConfig, *, max_batches: int | None = None,
             on_batch: OnBatch | None = None) -> list[ResultRow]:
    """Run ``config``: load the model, build the data, attack, check, append rows to the results file.

    Everything the user can get wrong is checked before the first batch (UserError)."""
    parse_attacks(config.attacks)
    if config.norm not in art_adapter.NORMS:
        raise UserError(f"unknown --norm {config.norm!r}; known: {', '.join(art_adapter.NORMS)}")
    parse_eps(config.eps, config.norm)
    if config.checkpoint:
        model, provenance, ckpt_info, (classes, shape) = load_model(config)
        dataset_name = config.dataset or (ckpt_info.name if ckpt_info else "")
        if not dataset_name:
            raise UserError("the checkpoint records no data set: pass --dataset")
    else:
        dataset_name, ckpt_info = config.dataset or "digits", None
    image_size = None
    if config.checkpoint and shape[1] == shape[2]:
        image_size = int(shape[1])  # image-folder data sets resize to what the model was trained on
    files = dict(subset_list=config.subset_list or None, cache=config.cache or None, workers=config.workers)
    if config.split:
        dataset, info = build_dataset(dataset_name, config.split, data_dir=config.data_dir, download=config.download,
                                      subset=config.subset, image_size=image_size, **files)
    else:
        dataset, info = natural_split(dataset_name, config.data_dir, config.download, config.subset, image_size,
                                      **files)
    if not config.checkpoint:
        model, provenance, _, (classes, shape) = load_model(config, info)
    if classes != info.num_classes or tuple(shape) != tuple(info.input_shape):
        raise UserError(f"the model was built for {classes} classes of {tuple(shape)} images, but {info.name} "
                        f"({info.split}) has {info.num_classes} classes of {tuple(info.input_shape)}: pass the "
                        "data set the model was trained on (--dataset)")
    out = check_results_target(results_path(config))  # a folder or a broken file fails now, not after the attack
    return run_evaluation(model, dataset, info, config, provenance, out=out, max_batches=max_batches,
                          on_batch=on_batch)


def benchmark(model: nn.Module, dataset: str | Dataset = "digits", *, attacks: Sequence[str] = ("fgsm",),
              eps: Sequence[float] | str = (1 / 255, 2 / 255, 4 / 255), norm: str = "linf",
              info: DatasetInfo | None = None, split: str = "", data_dir: str | None = None, subset: int = 0,
              batch_size: int = 128, device: str = "auto", steps: int | None = None,
              step_size: float | None = None, random_start: bool = True, restarts: int = 1, seed: int = 0,
              gbr: bool = False, run_id: str = "model", model_name: str = "", out: str | Path | None = None,
              on_batch: OnBatch | None = None, checkpoint_hash: str = "") -> list[ResultRow]:
    """RobustBench-style one call: clean, each attack at each eps and their worst case for an ``nn.Module`` taking
    images in [0, 1] (normalization inside) and returning logits.

    ``dataset``: a registry name (its natural evaluation split unless ``split``) or a Dataset of (x [C, H, W] in
    [0, 1], label) with its ``info``. The model is moved to ``device`` (and stays there); its train/eval mode,
    requires_grad flags and ``.grad`` are restored. Rows are returned, and appended to ``out`` when given.
    ``checkpoint_hash``: the rows' model hash; "" = hash the state dict now (a ResNet-50's 100 MB, copied off the GPU:
    pass it when calling repeatedly, e.g. in a timing loop)."""
    if isinstance(dataset, str):
        if split:
            data, info = build_dataset(dataset, split, data_dir=data_dir, subset=subset)
        else:
            data, info = natural_split(dataset, data_dir, False, subset, None)
    else:
        if info is None:
            raise UserError("benchmark(model, dataset) with a Dataset object needs its DatasetInfo: info=...")
        data = dataset
    from robust_enc.checkpoint import state_hash
    from robust_enc.models import weight_norms

    config = AttackConfig(dataset=info.name, split=info.split, subset=info.subset, batch_size=batch_size,
                          device=device, attacks=tuple(attacks), eps=parse_eps(eps, norm), norm=norm, steps=steps,
                          step_size=step_size, random_start=random_start, restarts=restarts, seed=seed, gbr=gbr)
    provenance = Provenance(run_id=run_id, model=model_name or type(model).__name__,
                            checkpoint_hash=checkpoint_hash or state_hash(model.state_dict()),
                            weight_sq_norm=sum(weight_norms(model).values()))
    return run_evaluation(model, data, info, config, provenance, out=Path(out) if out else None, on_batch=on_batch)
