"""The report: read results files and run folders (from several machines), merge duplicates, build the Table 3 view,
the leaderboard and the GBR correlation (``tables``), render them (``render``), draw the plots (``plots``) and tie
everything together in an ``index.md``.

Imports of pandas / matplotlib are deferred to the functions: the CLI imports this package to build its parser.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from robust_enc.errors import UserError
from robust_enc.io import replace_folder_atomic, write_text_atomic
from robust_enc.results import ResultRow, read_results

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

RESULTS_FILES = ("results.csv", "results.json")
METRICS_FILE = "metrics.csv"
CARD_FILE = "model_card.json"
RUN_FILES = (*RESULTS_FILES, METRICS_FILE, CARD_FILE)  # any of them makes a folder a run folder
MEASURED = ("n", "clean_top1", "clean_top5", "adv_top1", "adv_top5", "gbr")  # what must agree between duplicates
FROM_CARD = ("gbr", "gbr_stderr", "train_top1", "weight_sq_norm")  # filled into rows that lack them
DEFAULT_FORMATS = ("md", "csv", "json")
TABLES = {  # file stem -> title
    "table3": "Table 3: clean and adversarial top-1 (%), difference to the baseline, GBR",
    "leaderboard": "Leaderboard",
    "correlation": "Correlation of GBR with accuracy and the generalization gap",
}
# What a report folder holds (write_report), hidden temp files aside: a folder holding only these may be replaced.
_REPORT_ENTRY = re.compile(rf"^(index\.md|plots|({'|'.join(TABLES)})\.\w+|\..*\.tmp)$")


@dataclass
class RunFolder:
    """A training run's folder: its model card (empty when absent) and where its per-epoch metrics are."""
    path: Path
    run_id: str
    card: dict[str, Any] = field(default_factory=dict)
    card_path: Path | None = None
    metrics_path: Path | None = None


@dataclass
class Conflict:
    """Rows with one key but different measurements; ``kept`` is the newest by created_at."""
    key: tuple
    kept: ResultRow
    dropped: list[ResultRow]

    def describe(self) -> str:
        def short(r: ResultRow) -> str:
            return (f"adv_top1={r.adv_top1:.4f} clean_top1={r.clean_top1:.4f} gbr={r.gbr:.6g} n={r.n} "
                    f"({r.created_at})")

        run_id, _, dataset, _, _, attack, norm, eps = self.key[:8]
        return (f"{run_id} {dataset} {attack} {norm} eps={eps:.6g}: kept {short(self.kept)}; dropped "
                + "; ".join(short(r) for r in self.dropped))


@dataclass
class ReportInputs:
    rows: list[ResultRow]  # merged: one per key
    runs: list[RunFolder]
    conflicts: list[Conflict]
    sources: list[Path]  # the results files read
    rows_read: int = 0  # before merging
    notes: list[str] = field(default_factory=list)  # rows of earlier checkpoints left out, checkpoint conflicts


# ------------------------------------------------------------------ eps on the command line
def parse_eps(text: str | float) -> float:
    """"8/255", "0.03137" or 0.03137 -> a float in [0, 1] pixel units."""
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        match = re.fullmatch(r"\s*([0-9.eE+-]+)\s*(?:/\s*([0-9.eE+-]+))?\s*", str(text))
        try:
            value = float(match.group(1)) / (float(match.group(2)) if match.group(2) else 1.0) if match else math.nan
        except (ValueError, ZeroDivisionError):
            value = math.nan
    if not 0.0 <= value <= 1.0:  # also catches NaN
        raise UserError(f"eps {text!r} is not a number in [0, 1] pixel units; write e.g. 8/255 or 0.0314")
    return value


# ------------------------------------------------------------------ reading
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


def merge_rows(rows: Iterable[ResultRow]) -> tuple[list[ResultRow], list[Conflict]]:
    """One row per ``ResultRow.key()``: exact duplicates (same measurements, e.g. a file copied from another machine)
    collapse silently; conflicting ones (same key, different accuracies) keep the newest by created_at (the later
    one read on a tie) and are returned as Conflicts. Order: first appearance of each key."""
    by_key: dict[tuple, list[ResultRow]] = {}
    for row in rows:
        by_key.setdefault(row.key(), []).append(row)
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


def _is_run_folder(path: Path) -> bool:
    return any((path / name).is_file() for name in RUN_FILES)


def find_run_folders(root: Path) -> list[Path]:
    """``root`` itself when it is a run folder, and every run folder below it (sorted; hidden folders skipped)."""
    found = []
    for folder, subfolders, _ in os.walk(root):
        subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
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


def _read_run_folder(folder: Path) -> tuple[RunFolder, list[ResultRow], list[Path]]:
    card_path = folder / CARD_FILE
    card = _read_card(card_path) if card_path.is_file() else {}
    metrics = folder / METRICS_FILE
    run = RunFolder(path=folder, run_id=str(card.get("run_id") or folder.name), card=card,
                    card_path=card_path if card else None, metrics_path=metrics if metrics.is_file() else None)
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
    folder of run folders -> each of them, recursively); merge duplicate rows (see ``merge_rows``)."""
    if not inputs:
        raise UserError("no results given: pass results files (.csv/.json) or run folders")
    read: list[tuple[str, list[ResultRow], dict[str, str]]] = []  # (input, rows, run id -> card's checkpoint hash)
    runs: list[RunFolder] = []
    sources: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            folders = find_run_folders(item)
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
    rows, notes = keep_current_checkpoints(read)
    for note in notes:
        log.warning(note)
    merged, conflicts = merge_rows(rows)
    for conflict in conflicts:
        log.warning("conflicting results for one measurement: %s", conflict.describe())
    return ReportInputs(_fill_from_cards(merged, runs), runs, conflicts, sources,
                        rows_read=sum(len(rows) for _, rows, _ in read), notes=notes)


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
                          "dataset": str(r.card.get("dataset") or ""), "checkpoint": link(r.path / CHECKPOINT_NAME),
                          "model_card": link(r.card_path)} for r in runs], columns=columns)


# ------------------------------------------------------------------ the report
def check_formats(formats: Iterable[str]) -> tuple[str, ...]:
    from robust_enc.reports.render import FORMATS

    chosen = tuple(dict.fromkeys(f.strip().lower() for f in formats if f.strip()))
    for fmt in chosen:
        FORMATS.lookup(fmt)  # unknown -> UserError with the known names
    if not chosen:
        raise UserError(f"no report format given; choose from {', '.join(FORMATS.names())}")
    return chosen


def check_out_dir(out_dir: str | Path) -> Path:
    """``out_dir`` when it is a folder or can be made one (no file in its place or above it) and holds nothing but an
    earlier report (it is replaced whole), else a UserError."""
    out_dir = Path(out_dir)
    for path in (out_dir, *out_dir.parents):
        if path.exists():
            if not path.is_dir():
                raise UserError(f"--out {out_dir}: {path} is a file, not a folder; choose another output folder")
            break
    if out_dir.is_dir():
        foreign = sorted(p.name for p in out_dir.iterdir() if not _REPORT_ENTRY.match(p.name))
        if foreign:
            raise UserError(f"--out {out_dir} holds files that are not a robust-enc report ({', '.join(foreign[:3])}"
                            f"{', ...' if len(foreign) > 3 else ''}), and a report replaces its folder whole: "
                            "choose a new or empty folder")
    return out_dir


def _normalize_eps(eps: float | str | Sequence[float | str] | None) -> list[float] | None:
    if eps is None:
        return None
    values = [eps] if isinstance(eps, (int, float, str)) else list(eps)
    return [parse_eps(v) for v in values] or None


@dataclass
class Report:
    """The report's tables before rendering: ``tables`` as shown (table3, leaderboard, correlation), ``full_table3``
    with every attack and eps (for the plots), and the notes for the reader."""
    data: ReportInputs
    tables: dict[str, pd.DataFrame]
    full_table3: pd.DataFrame
    notes: list[str]


def make_report(inputs: Sequence[str | Path], *, baseline: str | None = None, attack: str | None = None,
                eps: float | str | Sequence[float | str] | None = None, link_base: Path | None = None,
                order: Sequence[str] = ()) -> Report:
    """Read and merge the inputs and build the tables; ``attack`` / ``eps`` restrict the tables to that attack /
    those eps (floats or "k/255") and pick the leaderboard's threat; ``order`` gives Table 3's row order after the
    baseline (see ``tables.table3``); model-card and checkpoint links are relative to ``link_base``."""
    from robust_enc.reports import tables

    eps_values = _normalize_eps(eps)
    data = load_inputs(inputs)
    frame = tables.results_frame(data.rows)
    full = tables.table3(frame, baseline=baseline, order=order)
    shown = tables.select_threats(full, attack=attack, eps=eps_values)
    built = {"table3": shown,
             "leaderboard": tables.leaderboard(frame, runs_frame(data.runs, link_base), attack=attack, eps=eps_values),
             # Each trained model is a point (seeds too), so n and the p-values count models, not row means.
             "correlation": tables.correlation(tables.select_threats(tables.replicates(frame), attack=attack,
                                                                     eps=eps_values))}
    notes = [f"conflicting duplicate rows (kept the newest): {c.describe()}" for c in data.conflicts] + data.notes
    # What was left out of the inputs concerns every table: each JSON file carries it with the table's own notes.
    input_notes = list(notes)
    for table in built.values():
        own = table.attrs.get("notes", [])
        notes += [n for n in own if n not in notes]
        table.attrs["notes"] = input_notes + [n for n in own if n not in input_notes]
    return Report(data, built, full, notes)


def write_report(report: Report, out_dir: str | Path, formats: Sequence[str] = DEFAULT_FORMATS) -> dict[str, Path]:
    """Render every table in every format, draw the plots into plots/, write index.md, all into a temporary folder
    that then takes ``out_dir``'s place: a failure (a full disk, ...) leaves the previous report whole and nothing
    half-written. Returns {path relative to out_dir: path}."""
    formats = check_formats(formats)
    out_dir = check_out_dir(out_dir)
    written = replace_folder_atomic(out_dir, lambda tmp: _write_report_files(report, tmp, formats))
    log.info("report: %d files in %s", len(written), out_dir)
    return {rel: out_dir / rel for rel in written}


def _write_report_files(report: Report, out_dir: Path, formats: Sequence[str]) -> dict[str, Path]:
    from robust_enc.reports import render

    written: dict[str, Path] = {}
    for name, table in report.tables.items():
        for fmt in formats:
            file_name = f"{name}.{render.format_suffix(fmt)}"
            written[file_name] = write_text_atomic(out_dir / file_name,
                                                   render.render_table(table, name, fmt, TABLES[name]))
    notes = list(report.notes)
    figures = _draw_plots(report.full_table3, report.tables["leaderboard"], report.data.runs, out_dir / "plots",
                          notes)
    written.update({p.relative_to(out_dir).as_posix(): p for p in figures})
    index = _index_markdown(report, formats, figures, out_dir, notes)
    written["index.md"] = write_text_atomic(out_dir / "index.md", index)
    return written


def build_report(inputs: Sequence[str | Path], out_dir: str | Path, *, baseline: str | None = None,
                 formats: Sequence[str] = DEFAULT_FORMATS, attack: str | None = None,
                 eps: float | str | Sequence[float | str] | None = None, order: Sequence[str] = ()) -> dict[str, Path]:
    """Write the report into ``out_dir``: table3 / leaderboard / correlation in each format, PNG plots under
    plots/, and index.md (see ``make_report`` for attack / eps / order). Returns {path relative to out_dir: path}."""
    formats = check_formats(formats)  # before any reading: a typo or a bad --out fails fast
    check_out_dir(out_dir)
    report = make_report(inputs, baseline=baseline, attack=attack, eps=eps, link_base=Path(out_dir), order=order)
    return write_report(report, out_dir, formats)


def _draw_plots(full: pd.DataFrame, board: pd.DataFrame, runs: list[RunFolder], plot_dir: Path,
                notes: list[str]) -> list[Path]:
    import pandas as pd

    from robust_enc.reports import plots, tables

    figures = plots.plot_accuracy_vs_eps(tables.accuracy_vs_eps(full), plot_dir)
    if not figures:
        notes.append("accuracy-vs-eps plots skipped: no adversarial results")
    threat = board.attrs.get("threat")
    if threat:
        threat = tables.Threat(**threat)
        datasets = list(dict.fromkeys(full["dataset"]))
        for dataset in datasets:
            name = (f"gbr_vs_{plots.slug(threat.attack)}_{plots.slug(threat.norm)}_"
                    f"{plots.eps_name(threat.eps, threat.norm)}")
            name += f"_{plots.slug(dataset)}" if len(datasets) > 1 else ""
            path = plots.plot_gbr_vs_accuracy(full[full["dataset"] == dataset], threat, plot_dir / f"{name}.png")
            if path is None:
                notes.append(f"GBR scatter for {dataset} skipped: no model with both GBR and that attack's result")
            else:
                figures.append(path)
    else:
        notes.append("GBR scatter skipped: no adversarial results")

    histories: dict[str, dict[str, pd.DataFrame]] = {}  # data set -> run -> metrics
    for run in runs:
        if run.metrics_path is None:
            continue
        try:
            metrics = pd.read_csv(run.metrics_path)
        except (OSError, ValueError, pd.errors.ParserError) as err:
            raise UserError(f"{run.metrics_path}: not a readable metrics.csv ({err})") from None
        histories.setdefault(str(run.card.get("dataset") or "unknown"), {})[run.run_id] = metrics
    for dataset, by_run in histories.items():
        name = "gbr_epochs" + (f"_{plots.slug(dataset)}" if len(histories) > 1 else "")
        path = plots.plot_gbr_over_epochs(by_run, plot_dir / f"{name}.png", title=f"GBR during training ({dataset})")
        if path is not None:
            figures.append(path)
    if not any(p.name.startswith("gbr_epochs") for p in figures):
        notes.append("GBR-over-epochs plot skipped: no run folder with per-epoch gbr in metrics.csv")
    return figures


def _index_markdown(report: Report, formats: Sequence[str], figures: list[Path], out_dir: Path,
                    notes: list[str]) -> str:
    from robust_enc import __version__
    from robust_enc.reports import render

    data, built = report.data, report.tables
    stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
    lines = ["# robust-enc report", "",
             f"{len(data.rows)} result rows ({data.rows_read} read, duplicates merged) from {len(data.sources)} "
             f"results files; {len(data.runs)} run folders. Written {stamp} by robust-enc {__version__}.", "",
             "Accuracies are top-1 in percent; differences to the baseline row in percentage points; GBR is eq. 18 "
             "of the paper (± the spread over seeds, or the estimator's standard error for one seed).", ""]
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    for name, table in built.items():
        title = TABLES[name]
        threat = table.attrs.get("threat")
        if threat:
            title += f" at {render.threat_label(threat['attack'], threat['norm'], threat['eps'])}"
        links = " · ".join(f"[{fmt}]({name}.{render.format_suffix(fmt)})" for fmt in formats)
        lines += [f"## {title}", "", render.render_table(table, name, "md").rstrip(), "", f"Files: {links}", ""]
    if figures:
        lines += ["## Plots", ""]
        for path in figures:
            rel = path.relative_to(out_dir).as_posix()
            lines += [f"![{path.stem}]({rel})", ""]
    return "\n".join(lines)
