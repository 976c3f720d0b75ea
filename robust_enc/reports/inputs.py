"""A report's inputs: results files and run folders (from several machines) read, rows of replaced checkpoints left
out, duplicate rows merged, one image set kept per model and threat, missing run values filled from model cards.

A number is only averaged or compared with numbers of the same provenance: the same trained model (run id + checkpoint
hash) and the same images (``image_set_id``). Rows of one model and threat measured on several image sets (``attack
--subset 30``, then ``attack`` on the whole split, into one results file) are never averaged: the largest image set is
kept and the others are named in a note. Models compared on different image sets (a baseline on 30 images, ENC on
450) are kept, and said so in a note and in ``ReportInputs.mixed``."""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from robust_enc.errors import UserError
from robust_enc.results import ResultRow, read_results

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

RESULTS_FILES = ("results.csv", "results.json")
METRICS_FILE = "metrics.csv"
CARD_FILE = "model_card.json"
CONFIG_FILE = "config.json"  # written when training starts: names the data set of a run still without a card
RUN_FILES = (*RESULTS_FILES, METRICS_FILE, CARD_FILE)  # any of them makes a folder a run folder
MEASURED = ("n", "clean_top1", "clean_top5", "adv_top1", "gbr")  # what must agree between duplicates
FROM_CARD = ("gbr", "gbr_stderr", "train_top1", "weight_sq_norm")  # filled into rows that lack them


@dataclass
class RunFolder:
    """A training run's folder: its model card (empty when absent) and where its per-epoch metrics are."""
    path: Path
    run_id: str
    card: dict[str, Any] = field(default_factory=dict)
    card_path: Path | None = None
    metrics_path: Path | None = None
    dataset: str = ""  # the card's, else the training config's (a run still training has no card yet)


@dataclass
class Conflict:
    """Rows of one measurement (``measurement_key``: same model, image set, threat and seed) but with different
    numbers; ``kept`` is the newest by created_at."""
    key: tuple
    kept: ResultRow
    dropped: list[ResultRow]

    def describe(self) -> str:
        def short(r: ResultRow) -> str:
            return (f"adv_top1={r.adv_top1:.4f} clean_top1={r.clean_top1:.4f} gbr={r.gbr:.6g} n={r.n} "
                    f"({r.created_at})")

        r = self.kept
        return (f"{r.run_id} {r.dataset} {r.attack} {r.norm} eps={r.eps:.6g} on {describe_image_set(r)}: kept "
                f"{short(r)}; dropped " + "; ".join(short(d) for d in self.dropped))


@dataclass
class MixedImageSets:
    """Models of one data set compared at ``threats`` while measured on different image sets: run id -> the image
    set its numbers come from (``describe_image_set``). Their differences mix a model effect with an image effect."""
    dataset: str
    threats: list[str]  # threat labels, e.g. "clean", "fgsm linf 8/255"
    image_sets: dict[str, str]


@dataclass
class ReportInputs:
    rows: list[ResultRow]  # merged: one per key
    runs: list[RunFolder]
    conflicts: list[Conflict]
    sources: list[Path]  # the results files read
    rows_read: int = 0  # before merging
    notes: list[str] = field(default_factory=list)  # rows of earlier checkpoints or smaller image sets left out, ...
    mixed: list[MixedImageSets] = field(default_factory=list)  # comparisons across different image sets


def _created(row: ResultRow) -> datetime:
    try:
        stamp = datetime.fromisoformat(row.created_at)
    except ValueError:
        return datetime.min.replace(tzinfo=timezone.utc)
    return stamp if stamp.tzinfo else stamp.replace(tzinfo=timezone.utc)


def _same_measurement(a: ResultRow, b: ResultRow) -> bool:
    def equal(x: float, y: float) -> bool:
        return (math.isnan(x) and math.isnan(y)) or abs(x - y) <= 1e-9

    return all(equal(float(getattr(a, f)), float(getattr(b, f))) for f in MEASURED)


def image_set_id(row: ResultRow) -> str:
    """The identity of the images a row was measured on: its recorded digest and preprocessing; for rows written
    before digests were recorded (empty ``image_set``), data set, split, requested subset and image count. A recorded
    and an unrecorded image set are never taken for one another."""
    if row.image_set:
        return f"digest {row.image_set} | {row.preprocessing}"
    return f"unrecorded | {row.dataset} | {row.split} | subset {row.subset} | n {row.n}"


def describe_image_set(row: ResultRow) -> str:
    """The image set of a row for a reader: "450 images of digits/test", "30 images of digits/test (subset 30)",
    with the start of its digest where recorded."""
    details = ([f"subset {row.subset}"] if row.subset else []) + ([f"image set {row.image_set[:12]}"]
                                                                 if row.image_set else [])
    return f"{row.n} images of {row.dataset}/{row.split}" + (f" ({', '.join(details)})" if details else "")


def provenance_key(row: ResultRow) -> tuple:
    """One trained model (as ``tables.REPLICATE`` groups): data set, model, regularizer, run id, checkpoint hash."""
    return (row.dataset, row.model, row.regularizer, row.run_id, row.checkpoint_hash)


def threat_key(row: ResultRow) -> tuple:
    """The threat a row measures (the clean row is attack "none"), without the attack's seed: rows of several seeds
    on one image set are repeats, averaged by the tables."""
    return (row.attack, row.norm, round(row.eps, 9), row.steps, round(row.step_size, 9), row.restarts)


def threat_label(row: ResultRow) -> str:
    if row.attack == "none":
        return "clean"
    eps = f"{row.eps * 255:.4g}/255" if row.norm == "linf" else f"{row.eps:.4g}"
    steps = f" ({row.steps} steps)" if row.steps else ""
    return f"{row.attack} {row.norm} {eps}{steps}"


def measurement_key(row: ResultRow) -> tuple:
    """Rows with one measurement key are duplicates of one another: same model, image set, threat and attack seed."""
    return (*provenance_key(row), image_set_id(row), *threat_key(row), row.seed)


def merge_rows(rows: Iterable[ResultRow]) -> tuple[list[ResultRow], list[Conflict]]:
    """One row per ``measurement_key``: exact duplicates (same measurements, e.g. a file copied from another machine)
    collapse silently; conflicting ones (same model, image set and threat, different numbers) keep the newest by
    created_at (the later one read on a tie) and are returned as Conflicts. Order: first appearance of each key."""
    by_key: dict[tuple, list[ResultRow]] = {}
    for row in rows:
        by_key.setdefault(measurement_key(row), []).append(row)
    merged, conflicts = [], []
    for key, group in by_key.items():
        # max() keeps the first of equal stamps: reverse so that a tie goes to the row read last
        kept = max(reversed(group), key=_created)
        merged.append(kept)
        dropped = [r for r in group if r is not kept and not _same_measurement(r, kept)]
        if dropped:
            conflicts.append(Conflict(key, kept, dropped))
    return merged, conflicts


def keep_current_checkpoints(inputs: Sequence[tuple[str, list[ResultRow], dict[str, str]]]
                             ) -> tuple[list[ResultRow], list[str]]:
    """The rows of one checkpoint per run id and data set, and notes on what was left out. ``inputs``: per file or
    run folder read, (its name, its rows, run id -> the checkpoint hash its model card names).

    Retraining a run (e.g. more epochs) replaces its checkpoint while the rows of the old one stay in results.csv:
    counted as replicates they would make one run look like several seeds. Within one input the rows of the current
    checkpoint (the model card's, else the newest by created_at) are kept. The same run id with different checkpoints
    in different inputs (two machines) is a conflict, not two seeds: the newest is kept and the conflict noted.
    Rows without a checkpoint hash cannot be told apart and are kept."""
    notes: list[str] = []
    claims: dict[tuple[str, str], dict[str, tuple[datetime, str]]] = {}  # (run, data set) -> hash -> (newest, input)
    for source, rows, current in inputs:
        stamps: dict[tuple[str, str], dict[str, datetime]] = {}
        for row in rows:
            if row.checkpoint_hash:
                by_hash = stamps.setdefault((row.run_id, row.dataset), {})
                by_hash[row.checkpoint_hash] = max(by_hash.get(row.checkpoint_hash, _created(row)), _created(row))
        for (run_id, dataset), by_hash in stamps.items():
            card_hash = current.get(run_id, "")
            kept = card_hash if card_hash in by_hash else max(by_hash, key=by_hash.__getitem__)
            if card_hash and card_hash != kept:
                notes.append(f"{source}: {run_id} ({dataset}): the model card names checkpoint {card_hash} but the "
                             f"results are of checkpoint {kept}: rerun the attack on the current checkpoint")
            stale = sorted(set(by_hash) - {kept})
            if stale:
                notes.append(f"{source}: {run_id} ({dataset}): rows of earlier checkpoint(s) {', '.join(stale)} left "
                             f"out (retrained); kept checkpoint {kept}")
            claim = claims.setdefault((run_id, dataset), {})
            if kept not in claim or by_hash[kept] > claim[kept][0]:
                claim[kept] = (by_hash[kept], source)
    chosen = {}
    for (run_id, dataset), claim in claims.items():
        chosen[run_id, dataset] = kept = max(claim, key=lambda h: claim[h][0])
        others = [f"{h} ({claim[h][1]})" for h in claim if h != kept]
        if others:
            notes.append(f"conflict: run id {run_id} ({dataset}) names different checkpoints in different inputs; kept "
                         f"the newest, {kept} ({claim[kept][1]}), left out {'; '.join(others)}: one run id is one "
                         "trained model, not several seeds")
    kept_rows = [row for _, rows, _ in inputs for row in rows
                 if not row.checkpoint_hash or chosen[row.run_id, row.dataset] == row.checkpoint_hash]
    return kept_rows, notes


def _model_name(key: tuple) -> str:
    dataset, _, _, run_id, checkpoint_hash = key
    return f"{run_id} ({dataset}{f', checkpoint {checkpoint_hash}' if checkpoint_hash else ''})"


def keep_one_image_set(rows: Sequence[ResultRow]) -> tuple[list[ResultRow], list[str]]:
    """Per trained model and threat, the rows of one image set: the largest (most images; a tie goes to the newest
    measurement, then to the one read last), so a number is never the mean of different images. Returns the rows
    kept (in their order) and a note per model and image set left out. A clean row left out is not named when rows of
    its image set are kept: it is the clean pass of an evaluation whose threats stay in the report (AutoAttack on a
    subset), and the model's clean accuracy comes from its largest image set."""
    sets: dict[tuple, dict[str, list[ResultRow]]] = {}  # (model, threat) -> image set -> rows
    for row in rows:
        sets.setdefault((provenance_key(row), threat_key(row)), {}).setdefault(image_set_id(row), []).append(row)
    chosen: dict[tuple, str] = {}
    for key, by_set in sets.items():
        order = list(reversed(by_set))  # max() keeps the first of equals: a full tie goes to the set read last
        chosen[key] = max(order, key=lambda s: (max(r.n for r in by_set[s]), max(_created(r) for r in by_set[s])))
    kept = [r for r in rows if chosen[provenance_key(r), threat_key(r)] == image_set_id(r)]
    used = {(provenance_key(r), image_set_id(r)) for r in kept}
    left_out: dict[tuple, list[ResultRow]] = {}  # (model, image set left out, image set kept) -> rows
    for (model, threat), by_set in sets.items():
        best = chosen[model, threat]
        for image_set, group in by_set.items():
            clean_companion = threat[0] == "none" and (model, image_set) in used
            if image_set != best and not clean_companion:
                left_out.setdefault((model, image_set, best), []).extend(group)
    notes = []
    for (model, _, best), group in left_out.items():
        best_row = next(r for r in kept if provenance_key(r) == model and image_set_id(r) == best)
        threats = ", ".join(dict.fromkeys(threat_label(r) for r in group))
        notes.append(f"{_model_name(model)}: {threats} measured on {describe_image_set(group[0])} left out: a "
                     f"model's threat is reported on one image set, its largest ({describe_image_set(best_row)}), "
                     "never averaged over different images")
    return kept, notes


def find_mixed_image_sets(rows: Sequence[ResultRow]) -> list[MixedImageSets]:
    """Per data set, the threats at which models (run ids) were measured on different image sets, grouped by who was
    measured on what. Expects one image set per model and threat (``keep_one_image_set``)."""
    by_threat: dict[tuple[str, tuple], dict[str, ResultRow]] = {}  # (data set, threat) -> run id -> row
    for row in rows:
        by_threat.setdefault((row.dataset, threat_key(row)), {}).setdefault(row.run_id, row)
    grouped: dict[tuple, MixedImageSets] = {}
    for (dataset, _), by_run in by_threat.items():
        if len({image_set_id(r) for r in by_run.values()}) < 2:
            continue
        image_sets = {run_id: describe_image_set(r) for run_id, r in sorted(by_run.items())}
        label = threat_label(next(iter(by_run.values())))
        entry = grouped.setdefault((dataset, tuple(image_sets.items())), MixedImageSets(dataset, [], image_sets))
        entry.threats.append(label)
    return list(grouped.values())


def _mixed_note(mixed: MixedImageSets) -> str:
    members = "; ".join(f"{run_id} on {image_set}" for run_id, image_set in mixed.image_sets.items())
    return (f"{mixed.dataset}: {', '.join(mixed.threats)} compare models measured on different image sets ({members}): "
            "their differences mix the models with the images; evaluate them on the same images to compare them")


def _is_run_folder(path: Path) -> bool:
    return any((path / name).is_file() for name in RUN_FILES)


def find_run_folders(root: Path, notes: list[str] | None = None) -> list[Path]:
    """``root`` itself when it is a run folder, and every run folder below it (sorted; hidden folders skipped).

    Links to folders are followed (a study's runs linked in from elsewhere are runs of it); a folder reached a second
    time (a link back up the tree, or a second path to one run) is searched once, and links that point nowhere are
    skipped: both are named in ``notes``, so no run is left out unsaid."""
    found = []
    seen = {os.path.realpath(root)}
    for folder, subfolders, files in os.walk(root, followlinks=True):
        searched = []
        for name in sorted(d for d in subfolders if not d.startswith(".")):
            path = os.path.join(folder, name)
            real = os.path.realpath(path)
            if real in seen:
                if notes is not None:
                    notes.append(f"{path}: the folder {real} was searched already (a link loop, or a second path to "
                                 "it): read once")
                continue
            seen.add(real)
            searched.append(name)
        subfolders[:] = searched
        for name in files:  # os.walk lists a link to nothing among the files
            path = os.path.join(folder, name)
            if notes is not None and os.path.islink(path) and not os.path.exists(path):
                notes.append(f"{path}: a link to {os.readlink(path)}, which does not exist: skipped")
        if _is_run_folder(Path(folder)):
            found.append(Path(folder))
    return found


def _read_card(path: Path) -> dict[str, Any]:
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{path}: not a readable model card ({err}); re-create it or remove the file") from None
    if not isinstance(card, dict):
        raise UserError(f"{path}: a model card must be a JSON object")
    return card


def _config_dataset(path: Path) -> str:
    """The data set a training config names; "" when there is none or it cannot be read (it only labels plots)."""
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return ""
    return str(config.get("dataset") or "") if isinstance(config, dict) else ""


def _read_run_folder(folder: Path) -> tuple[RunFolder, list[ResultRow], list[Path]]:
    card_path = folder / CARD_FILE
    card = _read_card(card_path) if card_path.is_file() else {}
    metrics = folder / METRICS_FILE
    run = RunFolder(path=folder, run_id=str(card.get("run_id") or folder.name), card=card,
                    card_path=card_path if card else None, metrics_path=metrics if metrics.is_file() else None,
                    dataset=str(card.get("dataset") or _config_dataset(folder / CONFIG_FILE)))
    rows, sources = [], []
    for name in RESULTS_FILES:
        if (folder / name).is_file():
            rows += read_results(folder / name)
            sources.append(folder / name)
    return run, rows, sources


def _fill_from_cards(rows: list[ResultRow], runs: list[RunFolder]) -> list[ResultRow]:
    """Rows lacking GBR / train accuracy / weight norm (e.g. attacked before GBR was measured) take them from their
    run's model card: same run id, and the same checkpoint hash where both are known."""
    cards = [r for r in runs if r.card]
    filled = []
    for row in rows:
        card = next((r.card for r in cards if r.run_id == row.run_id
                     and (not row.checkpoint_hash or not r.card.get("checkpoint_hash")
                          or r.card.get("checkpoint_hash") == row.checkpoint_hash)), None)
        updates = {}
        for name in FROM_CARD if card else ():
            value = card.get(name)
            number = (isinstance(value, (int, float)) and not isinstance(value, bool)) or value == "inf"  # overflowed
            if math.isnan(getattr(row, name)) and number:
                updates[name] = float(value)
        filled.append(replace(row, **updates) if updates else row)
    return filled


def load_inputs(inputs: Sequence[str | Path]) -> ReportInputs:
    """Read results files (.csv / .json) and run folders (a folder -> its results, metrics.csv and model card; a
    folder of run folders -> each of them, recursively, links followed); keep each run's current checkpoint
    (``keep_current_checkpoints``), merge duplicate rows (``merge_rows``) and keep one image set per model and threat
    (``keep_one_image_set``); comparisons across image sets are noted (``find_mixed_image_sets``)."""
    if not inputs:
        raise UserError("no results given: pass results files (.csv/.json) or run folders")
    read: list[tuple[str, list[ResultRow], dict[str, str]]] = []  # (input, rows, run id -> card's checkpoint hash)
    runs: list[RunFolder] = []
    sources: list[Path] = []
    notes: list[str] = []
    for item in map(Path, inputs):
        if item.is_dir():
            folders = find_run_folders(item, notes)
            if not folders:
                raise UserError(f"{item}: no run folder (with {', '.join(RUN_FILES)}) in it or below it")
        elif item.is_file() and item.name in (METRICS_FILE, CARD_FILE):
            folders = [item.parent]  # a run folder's file: read the whole folder
        elif item.is_file():
            if item.suffix not in (".csv", ".json"):
                raise UserError(f"{item}: results files are .csv or .json")
            read.append((str(item), read_results(item), {}))
            sources.append(item)
            continue
        else:
            raise UserError(f"{item} does not exist: pass results files or run folders")
        for folder in folders:
            if any(r.path.resolve() == folder.resolve() for r in runs):
                continue  # the same folder given twice (or inside another input)
            run, folder_rows, folder_sources = _read_run_folder(folder)
            runs.append(run)
            card_hash = str(run.card.get("checkpoint_hash") or "")
            read.append((str(folder), folder_rows, {run.run_id: card_hash} if card_hash else {}))
            sources += folder_sources
    rows, checkpoint_notes = keep_current_checkpoints(read)
    notes += checkpoint_notes
    merged, conflicts = merge_rows(rows)
    for conflict in conflicts:
        log.warning("conflicting results for one measurement: %s", conflict.describe())
    merged, image_set_notes = keep_one_image_set(merged)
    mixed = find_mixed_image_sets(merged)
    notes += image_set_notes + [_mixed_note(m) for m in mixed]
    for note in notes:
        log.warning(note)
    return ReportInputs(_fill_from_cards(merged, runs), runs, conflicts, sources,
                        rows_read=sum(len(rows) for _, rows, _ in read), notes=notes, mixed=mixed)


def runs_frame(runs: Sequence[RunFolder], relative_to: Path | None = None) -> pd.DataFrame:
    """run_id, checkpoint_hash, dataset, checkpoint and model_card (paths, relative to ``relative_to`` when given;
    "" when the folder lacks the file) per run folder."""
    import pandas as pd

    from robust_enc.checkpoint import CHECKPOINT_NAME

    def link(path: Path | None) -> str:
        if path is None or not path.is_file():
            return ""
        return Path(os.path.relpath(path, relative_to)).as_posix() if relative_to else str(path)

    columns = ["run_id", "checkpoint_hash", "dataset", "checkpoint", "model_card"]
    return pd.DataFrame([{"run_id": r.run_id, "checkpoint_hash": str(r.card.get("checkpoint_hash") or ""),
                          "dataset": r.dataset, "checkpoint": link(r.path / CHECKPOINT_NAME),
                          "model_card": link(r.card_path)} for r in runs], columns=columns)
