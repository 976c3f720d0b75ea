"""Evaluate a model under attack over a data set: clean accuracy, each attack at each eps, the per-example worst case.

Protocol (RobustBench/AutoAttack): images in [0, 1], eps in pixel units; each attack runs only on the examples the
model gets right clean (top-1), so an example counts as robust only when it is correct
clean AND under attack, and ``adv <= clean`` by construction. ``worst`` ANDs the per-example robust flags of every
attack at an eps.

Streaming: batches come from a DataLoader; a batch's images are dropped once counted, so memory does not grow with
the data set. Only integer counts (and a few maxima) are kept per (attack, eps). They are:

- sharded over ``torchrun`` processes by whole batches (rank r takes global batches r, r + world, ...), then summed
  with ``all_reduce``: every batch holds the same images as in one process, so the totals are identical;
- saved atomically after every batch to a progress file next to the results file, named by a hash of the config and
  the checkpoint (so runs sharing a results file keep their own): a killed run resumes at the next batch. Random
  starts are seeded per (seed, global batch, attack, eps), so a resumed or sharded run draws the same random numbers
  as an uninterrupted one (``runtime.seeding.seed_for``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.data import Dataset

from robust_enc.attacks import art_adapter
from robust_enc.attacks.checks import flag_lines
from robust_enc.attacks.config import AttackConfig, BatchReport, OnBatch, Provenance
from robust_enc.attacks.counting import Evaluation, gbr_columns, result_rows
from robust_enc.attacks.registry import ATTACKS, check_eps, parse_attacks
from robust_enc.attacks.state import CLEAN, all_reduce, load_progress, progress_path, save_progress
from robust_enc.data import build_dataset, build_loader, evaluation_split
from robust_enc.errors import UserError
from robust_enc.images import DatasetInfo, loader_levels, unreadable_count
from robust_enc.models import channels_last_weights, frozen, total_weight_norm
from robust_enc.results import ResultRow, append_results, check_results_target, library_versions, parse_eps
from robust_enc.runtime.distributed import any_rank, barrier, evaluation_process
from robust_enc.runtime.progress import Task, task
from robust_enc.runtime.seeding import restored_rng, seed_for
from robust_enc.runtime.sharding import ShardSampler

if TYPE_CHECKING:
    import pandas as pd

    from robust_enc.model_sources import ModelSource

log = logging.getLogger(__name__)

PROGRESS_FORMAT = 4  # bump when the tallies' keys or fields change: older progress files are then not resumed


def _progress_key(config: AttackConfig, provenance: Provenance, info: DatasetInfo, rank: int, world: int) -> str:
    settings = asdict(config)
    # none of these changes what is counted (channels_last: the kernels, like the device)
    for name in ("out", "device", "workers", "gbr", "download", "data_dir", "cache", "channels_last"):
        settings.pop(name)
    payload = {"config": settings, "checkpoint": provenance.checkpoint_hash, "run_id": provenance.run_id,
               "dataset": info.name, "split": info.split, "size": info.size, "image_set": info.image_set,
               "rank": rank, "world": world,
               "art": library_versions().get("art_version", ""), "format": PROGRESS_FORMAT}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


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
                          batch_seed=lambda j: seed_for(config.seed, rank + j * world, "gbr", 0.0),
                          channels_last=config.channels_last)
    values = measured.values.double()
    return [float(len(values)), float(values.sum()), float(values.pow(2).sum()),
            float(measured.logit_spread.sum()), float(measured.loss_gbr.sum())]


class _CleanWatch:
    """Counts the batches whose clean logits hold NaN or inf: armed before each ``count_batch``, whose first forward
    pass is the clean one. Such a model has no accuracy (argmax of NaN is class 0), so no row may be written."""

    def __init__(self, model: nn.Module) -> None:
        self.armed, self.bad = False, 0
        self.handle = model.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if self.armed:
            self.armed = False
            if isinstance(output, torch.Tensor) and not bool(torch.isfinite(output).all()):
                self.bad += 1


def _non_finite_model(model: nn.Module, info: DatasetInfo, what: str) -> UserError:
    return UserError(f"the model's {what} are NaN/inf on {info.name} ({info.split}): it has no accuracy to report; "
                     "no row was written (check the checkpoint: did its training diverge?)")


def run_evaluation(model: nn.Module, dataset: Dataset, info: DatasetInfo, config: AttackConfig,
                   provenance: Provenance, *, out: Path | None, max_batches: int | None = None,
                   on_batch: OnBatch | None = None) -> list[ResultRow]:
    """The loop shared by ``evaluate`` and ``evaluate_model``. Returns [] when stopped by ``max_batches`` (progress kept
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
    if not all(bool(t.isfinite().all()) for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()):
        raise _non_finite_model(model, info, "weights")

    with evaluation_process(config.device) as (rank, world, device), restored_rng():
        model = model.to(device)
        run = Evaluation(model, info, config, plans, eps, device)
        with frozen(model), channels_last_weights(model, config.channels_last):
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
            done_before = run.tallies[CLEAN].n
            total = done_before + len(sampler)
            watch = _CleanWatch(model)
            with task(f"attack {provenance.run_id} ({','.join(attacks)})", total, completed=done_before,
                      show=rank == 0) as bar:
                try:
                    session = _count_batches(run, loader, bar, start=start, rank=rank, world=world,
                                             max_batches=max_batches, on_batch=on_batch, watch=watch,
                                             save=(lambda done: save_progress(progress, key, done, run.tallies))
                                             if progress is not None else None)
                finally:
                    watch.handle.remove()
            if any_rank(watch.bad > 0):  # every rank stops together
                if progress is not None:
                    progress.unlink(missing_ok=True)
                raise _non_finite_model(model, info, "outputs on clean images")
            if session.session_images:
                log.info(session.time_split())
            if session.stopped:
                log.warning("stopped after %d batches; rerun the same command to resume", max_batches)
                return []
        skipped = unreadable_count(dataset)
        if skipped:
            log.warning("%d unreadable images were skipped", skipped)
        gbr_sums = _measure_gbr(model, dataset, config, device, rank, world) if config.gbr else []
        all_reduce(run.tallies, gbr_sums)
        if run.tallies[CLEAN].n == 0:  # after the reduction: every rank raises alike
            if progress is not None:
                progress.unlink(missing_ok=True)
            raise UserError(f"no readable image in data set {info.name} split {info.split} (all {len(dataset)} "
                            "failed to load, see the warnings): fix or replace the files, or pass another --dataset")
        rows = [dataclasses.replace(row, image_set=info.image_set, preprocessing=provenance.preprocessing
                                    or info.preprocessing, pixels=info.pixels, weights=provenance.weights)
                for row in result_rows(run, provenance, gbr_columns(gbr_sums))]
        flagged = flag_lines(rows)
        if flagged and rank == 0:  # one line per run, on one process; the command line shows them in a panel
            log.warning("sanity checks flagged %d rows of %s: %s", len(flagged), provenance.run_id,
                        " | ".join(line.split(" ", 1)[1] for line in flagged))
        if out is not None and rank == 0:
            append_results(out, rows)
            log.info("wrote %d rows to %s", len(rows), out)
        barrier()  # rows are written before any rank forgets its progress
        if progress is not None:
            progress.unlink(missing_ok=True)
        return rows


def results_path(config: AttackConfig) -> Path:
    """--out, or results.csv in the run folder (the checkpoint file's folder), or ./results.csv for --weights."""
    if config.out:
        return Path(config.out)
    if config.checkpoint:
        path = Path(config.checkpoint)
        return (path if path.is_dir() else path.parent) / "results.csv"
    return Path("results.csv")


def _provenance(source: ModelSource, model: nn.Module) -> Provenance:
    """What the rows say about the model: a checkpoint's run, or the weights file's name."""
    from robust_enc.checkpoint import state_hash

    ckpt = source.checkpoint
    if ckpt is None:
        return Provenance(run_id=Path(source.weights).stem, model=source.model,
                          checkpoint_hash=state_hash(model.state_dict()),
                          weight_sq_norm=total_weight_norm(model))
    metrics = ckpt.metrics or {}
    wsq = metrics.get("weight_sq_norm")
    return Provenance(run_id=ckpt.run_id, model=ckpt.spec.name, regularizer=ckpt.spec.regularizer,
                      checkpoint_hash=ckpt.content_hash or state_hash(ckpt.state_dict),
                      train_top1=float(metrics.get("train_top1", math.nan)),
                      weight_sq_norm=float(wsq) if wsq is not None else total_weight_norm(model))


def evaluate(config: AttackConfig, *, max_batches: int | None = None,
             on_batch: OnBatch | None = None) -> list[ResultRow]:
    """Run ``config``: load the model, build the data, attack, check, append rows to the results file.

    Everything the user can get wrong is checked before the first batch (UserError)."""
    from robust_enc.model_sources import ModelSource, completed, preprocessing_text
    from robust_enc.regularizers import bake_model

    parse_attacks(config.attacks)
    if config.norm not in art_adapter.NORMS:
        raise UserError(f"unknown --norm {config.norm!r}; known: {', '.join(art_adapter.NORMS)}")
    parse_eps(config.eps, config.norm)
    overrides = config.overrides()
    source = ModelSource.open(checkpoint=config.checkpoint, model=config.model, weights=config.weights)
    name = source.dataset(config.dataset)
    prep = source.preprocessing(overrides)  # the model's own: resize/crop for image files, mean/std in the model
    dataset, info = build_dataset(name, config.split or evaluation_split(name), data_dir=config.data_dir,
                                  download=config.download, subset=config.subset, image_size=source.image_size,
                                  subset_list=config.subset_list or None, cache=config.cache or None,
                                  workers=config.workers, preprocessing=prep)
    prep = completed(prep, info, overrides)
    # ENC/WN/WS baked into plain weights: each layer normalized once here, not in every forward pass of the attacks
    # (the same outputs: bake_model keeps the very tensors the parametrizations compute).
    model = bake_model(source.build(info, prep))
    out = check_results_target(results_path(config))  # a folder or a broken file fails now, not after the attack
    provenance = dataclasses.replace(_provenance(source, model), weights=source.weights_label,
                                     preprocessing=preprocessing_text(prep, info))
    if source.checkpoint is None:  # a library's tag or a run folder's name, not "pretrained" or "exported"
        provenance.run_id = source.run_name
    return run_evaluation(model, dataset, info, config, provenance, out=out, max_batches=max_batches,
                          on_batch=on_batch)


def threat_norm(threat_model: str) -> str:
    """"Linf", "L2" (RobustBench's spelling), "linf", "l2", any case -> the suite's norm name; else one line."""
    norm = str(threat_model).strip().lower()
    if norm not in art_adapter.NORMS:
        raise UserError(f"unknown threat model {threat_model!r}: give 'Linf' or 'L2'")
    return norm


def evaluate_model(model: nn.Module, dataset: str | Dataset = "digits", *,
                   attacks: str | Sequence[str] = ("fgsm",), eps: float | str | Sequence[float | str] = (1 / 255,
                   2 / 255, 4 / 255), norm: str = "linf", info: DatasetInfo | None = None, split: str = "",
                   data_dir: str | None = None, subset: int = 0, batch_size: int = 128, device: str = "auto",
                   steps: int | None = None, step_size: float | None = None, random_start: bool = True,
                   restarts: int = 1, seed: int = 0, gbr: bool = False, run_id: str = "model", model_name: str = "",
                   out: str | Path | None = None, on_batch: OnBatch | None = None,
                   checkpoint_hash: str = "", channels_last: bool = False) -> list[ResultRow]:
    """RobustBench-style one call: clean, each attack at each eps and their worst case for an ``nn.Module`` taking
    images in [0, 1] (normalization inside) and returning logits.

    ``dataset``: a registry name (its natural evaluation split unless ``split``) or a Dataset of (x [C, H, W] in
    [0, 1], label) with its ``info``. ``attacks``: a name, "fgsm,pgd" or a list; ``eps``: a float, "8/255", or a list;
    ``norm``: "linf"/"l2" ("Linf"/"L2" too). The model is moved to ``device`` (and stays there); its train/eval mode,
    requires_grad flags and ``.grad`` are restored. Rows are returned, and appended to ``out`` when given.
    ``checkpoint_hash``: the rows' model hash; "" = hash the state dict now (a ResNet-50's 100 MB, copied off the GPU:
    pass it when calling repeatedly, e.g. in a timing loop). ``channels_last``: convolution weights in NHWC while
    measuring (faster kernels, same values; each weight's layout restored afterwards)."""
    from robust_enc.checkpoint import state_hash

    norm = threat_norm(norm)
    names = parse_attacks(attacks)  # a string is "fgsm" or "fgsm,pgd", never its letters
    radii = parse_eps(eps, norm)
    if isinstance(dataset, str):
        data, info = build_dataset(dataset, split or evaluation_split(dataset), data_dir=data_dir, subset=subset)
    else:
        if info is None:
            raise UserError("evaluate_model(model, dataset) with a Dataset object needs its DatasetInfo: info=...")
        data = dataset

    config = AttackConfig(dataset=info.name, split=info.split, subset=info.subset, batch_size=batch_size,
                          device=device, attacks=names, eps=radii, norm=norm, steps=steps, step_size=step_size,
                          random_start=random_start, restarts=restarts, seed=seed, gbr=gbr,
                          channels_last=channels_last)
    provenance = Provenance(run_id=run_id, model=model_name or type(model).__name__,
                            checkpoint_hash=checkpoint_hash or state_hash(model.state_dict()),
                            weight_sq_norm=total_weight_norm(model), weights="in memory",
                            preprocessing=f"{info.preprocessing or 'as stored'}, normalization inside the model")
    return run_evaluation(model, data, info, config, provenance, out=Path(out) if out else None, on_batch=on_batch)


def benchmark(model: nn.Module, dataset: str | Dataset = "digits", *, threat_model: str = "Linf",
              eps: float | str | Sequence[float | str] = 8 / 255, attacks: str | Sequence[str] = "fgsm",
              **options: Any) -> pd.DataFrame:
    """One call, as RobustBench's ``benchmark``: clean and robust accuracy of ``model`` (images in [0, 1] in, logits
    out; normalization inside) on ``dataset`` under ``threat_model`` ("Linf" or "L2") at each ``eps`` (a float,
    "8/255", or a list), for each of ``attacks`` (a name, "fgsm,pgd" or a list). Returns the rows as a DataFrame (the
    ``ResultRow`` fields as columns: the clean row is ``attack == "none"``); the CLI's attack registry, sanity checks
    and rows run behind it. ``options``: ``evaluate_model``'s (``subset``, ``device``, ``steps``, ``out``, ...)."""
    import pandas as pd

    from robust_enc.results import FIELD_NAMES

    rows = evaluate_model(model, dataset, attacks=attacks, eps=eps, norm=threat_model, **options)
    return pd.DataFrame([row.to_dict() for row in rows], columns=FIELD_NAMES)


def _count_batches(run: Evaluation, loader: Iterable, bar: Task, *, start: int, rank: int, world: int,
                   max_batches: int | None, on_batch: OnBatch | None, watch: _CleanWatch,
                   save: Callable[[int], None] | None) -> BatchReport:
    """Count this session's batches (this rank's ``start``-th on), saving the progress after each; returns the last
    report (its ``stopped``: cut short by ``max_batches``)."""
    done_before = run.tallies[CLEAN].n
    session = BatchReport(done_before, bar.total, 0.0)
    session_start = waited_from = time.perf_counter()
    for j, (x, y) in enumerate(loader):
        arrived = time.perf_counter()
        session.data_wait_s += arrived - waited_from
        if max_batches is not None and j >= max_batches:
            session.stopped = True
            break
        run.batch = rank + (start + j) * world
        if len(y):
            watch.armed = True
            run.count_batch(x, y)  # ends on host reads of the counts, so CUDA work is finished when it returns
        session.compute_s += time.perf_counter() - arrived
        session.session_images += len(y)
        session.done = done_before + session.session_images
        session.images_per_s = session.session_images / max(time.perf_counter() - session_start, 1e-9)
        session.running = run.running()
        if save is not None:
            save(start + j + 1)
        if on_batch is not None:
            on_batch(dataclasses.replace(session))
        # The last entry is the worst case (or the only attack) at the largest eps: the number to watch.
        watched = "".join(f", robust {k} {v:.1%}" for k, v in list(session.running.items())[-1:])
        bar.update(completed=session.done, info=f"{session.images_per_s:,.0f} img/s{watched}")
        waited_from = time.perf_counter()
    return session
