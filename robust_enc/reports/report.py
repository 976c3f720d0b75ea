"""The report: tables built from the inputs (``tables``), rendered in every format (``render``), plots (``plots``),
``index.md`` and the self-contained ``index.html`` (``html``) tying them together, and a RobustBench-style
``model_info/<model>.json`` per model (``cards``), written into a folder that replaces the previous report whole.

A report folder holds the marker file ``MARKER``: ``--out`` replaces a folder only when it holds one (a report this
suite wrote), or when it is empty; never because its files' names look like a report's."""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from robust_enc.errors import UserError
from robust_enc.io import replace_folder_atomic, write_text_atomic
from robust_enc.reports.inputs import ReportInputs, RunFolder, load_inputs, runs_frame
from robust_enc.results import parse_eps

if TYPE_CHECKING:
    import pandas as pd

    from robust_enc.reports.cards import ModelCard

log = logging.getLogger(__name__)

DEFAULT_FORMATS = ("md", "csv", "json")
TABLES = {  # file stem -> title
    "table3": "Table 3: clean and adversarial top-1 (%), difference to the baseline, GBR",
    "leaderboard": "Leaderboard",
    "correlation": "Correlation of GBR with accuracy and the generalization gap",
}
MARKER = ".robust-enc-report"  # written into every report folder: only such a folder (or an empty one) is replaced
MODEL_INFO = "model_info"


def check_formats(formats: Iterable[str]) -> tuple[str, ...]:
    from robust_enc.reports.render import FORMATS

    chosen = tuple(dict.fromkeys(f.strip().lower() for f in formats if f.strip()))
    for fmt in chosen:
        FORMATS.lookup(fmt)  # unknown -> UserError with the known names
    if not chosen:
        raise UserError(f"no report format given; choose from {', '.join(FORMATS.names())}")
    return chosen


def check_out_dir(out_dir: str | Path) -> Path:
    """``out_dir`` when it is a folder or can be made one (no file in its place or above it) and is empty or holds a
    report this suite wrote (its ``MARKER`` file; the folder is replaced whole), else a UserError."""
    out_dir = Path(out_dir)
    for path in (out_dir, *out_dir.parents):
        if path.exists():
            if not path.is_dir():
                raise UserError(f"--out {out_dir}: {path} is a file, not a folder; choose another output folder")
            break
    marker = out_dir / MARKER
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (marker.is_file() and not marker.is_symlink()):
        found = sorted(p.name for p in out_dir.iterdir())
        raise UserError(f"--out {out_dir} is not a robust-enc report (no {MARKER} file; it holds "
                        f"{', '.join(found[:3])}{', ...' if len(found) > 3 else ''}), and a report replaces its folder "
                        "whole: choose a new or empty folder")
    return out_dir


def _normalize_eps(eps: float | str | Sequence[float | str] | None) -> list[float] | None:
    if eps is None:
        return None
    return list(parse_eps(eps)) if isinstance(eps, (int, float, str)) or list(eps) else None


@dataclass
class Report:
    """The report's tables before rendering: ``tables`` as shown (table3, leaderboard, correlation), ``full_table3``
    with every attack and eps (for the plots), and the notes for the reader."""
    data: ReportInputs
    tables: dict[str, pd.DataFrame]
    full_table3: pd.DataFrame
    notes: list[str]
    boards: dict[str, pd.DataFrame] = field(default_factory=dict)  # threat label -> leaderboard, for the page's tabs
    cards: list[ModelCard] = field(default_factory=list)


def make_report(inputs: Sequence[str | Path], *, baseline: str | None = None, attack: str | None = None,
                eps: float | str | Sequence[float | str] | None = None, link_base: Path | None = None,
                order: Sequence[str] = ()) -> Report:
    """Read and merge the inputs and build the tables; ``attack`` / ``eps`` restrict the tables to that attack /
    those eps (floats or "k/255") and pick the leaderboard's threat; ``order`` gives Table 3's row order after the
    baseline (see ``tables.table3``); model-card and checkpoint links are relative to ``link_base``."""
    from robust_enc.reports import cards, render, tables, threats

    eps_values = _normalize_eps(eps)
    data = load_inputs(inputs)
    frame = tables.results_frame(data.rows)
    full = tables.table3(frame, baseline=baseline, order=order)
    shown = threats.select_threats(full, attack=attack, eps=eps_values)
    links = runs_frame(data.runs, link_base)
    built = {"table3": shown,
             "leaderboard": tables.leaderboard(frame, links, attack=attack, eps=eps_values),
             # Each trained model is a point (seeds too), so n and the p-values count models, not row means.
             "correlation": tables.correlation(threats.select_threats(tables.replicates(frame), attack=attack,
                                                                     eps=eps_values))}
    notes = [f"conflicting duplicate rows (kept the newest): {c.describe()}" for c in data.conflicts] + data.notes
    # What was left out of the inputs concerns every table: each JSON file carries it with the table's own notes.
    input_notes = list(notes)
    for table in built.values():
        own = table.attrs.get("notes", [])
        notes += [n for n in own if n not in notes]
        table.attrs["notes"] = input_notes + [n for n in own if n not in input_notes]
    # One leaderboard per threat shown, for the page's tabs (the strongest first: the files' leaderboard).
    boards = {render.threat_label(*t): tables.leaderboard(frame, links, threat=t)
              for _, t in sorted(threats.threat_columns(shown), key=lambda ct: threats.threat_order(ct[1]),
                                 reverse=True)}
    return Report(data, built, full, notes, boards, cards.model_cards(frame, links))


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
    written.update(_write_model_info(report, out_dir))
    written["index.html"] = write_text_atomic(out_dir / "index.html",
                                              _index_html(report, figures, sorted(written), notes))
    written[MARKER] = write_text_atomic(out_dir / MARKER, "a report written by robust-enc: `robust-enc report --out` "
                                        "replaces this folder whole\n")
    return written


def _summary(report: Report) -> str:
    from robust_enc import __version__

    data = report.data
    stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return (f"{len(data.rows)} result rows ({data.rows_read} read, duplicates merged) from {len(data.sources)} "
            f"results files; {len(data.runs)} run folders. Written {stamp} by robust-enc {__version__}.")


def _index_html(report: Report, figures: list[Path], files: list[str], notes: list[str]) -> str:
    from robust_enc.reports import html, render

    board = report.tables["leaderboard"]
    threat = board.attrs.get("threat")
    chosen = render.threat_label(threat["attack"], threat["norm"], threat["eps"]) if threat else ""
    return html.render_index_html(summary=_summary(report), notes=notes, table3=report.tables["table3"],
                                  boards=report.boards, chosen=chosen, correlation=report.tables["correlation"],
                                  figures=figures, cards=report.cards,
                                  files=[f for f in files if not f.startswith("plots/")])


def _file_stem(text: str) -> str:
    """A file-name-safe stem; a long run id is cut and given a digest of the whole (names stay unique, and the
    name plus the atomic writer's temp suffix stays under the 255 bytes a file name may have)."""
    stem = re.sub(r"[^A-Za-z0-9._+-]+", "_", text).strip("._") or "model"
    if len(stem) > 120:
        stem = f"{stem[:100]}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"
    return stem


def _write_model_info(report: Report, out_dir: Path) -> dict[str, Path]:
    """``model_info/<run id>.json`` per model (RobustBench's fields; see ``cards.model_info``)."""
    from robust_enc.reports import cards, tables

    threat = report.tables["leaderboard"].attrs.get("threat")
    threat = tables.Threat(**threat) if threat else None
    written: dict[str, Path] = {}
    for card in report.cards:
        stem = _file_stem(card.run_id)
        rel = f"{MODEL_INFO}/{stem}.json"
        if rel in written:  # one run id on two data sets (or two checkpoints)
            rel = f"{MODEL_INFO}/{stem}@{_file_stem(card.dataset)}-{card.checkpoint_hash[:8]}.json"
        payload = json.dumps(cards.model_info(card, threat), indent=1, allow_nan=False) + "\n"
        written[rel] = write_text_atomic(out_dir / rel, payload)
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

    figures = plots.plot_accuracy_vs_eps(plots.accuracy_vs_eps(full), plot_dir)
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
        histories.setdefault(run.dataset or "unknown", {})[run.run_id] = metrics
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
    from robust_enc.reports import render

    built = report.tables
    lines = ["# robust-enc report", "", _summary(report), "",
             "The self-contained page: [index.html](index.html) (leaderboard per threat, model cards, plots).", "",
             "Accuracies are top-1 in percent; differences to the baseline row in percentage points; GBR is eq. 18 "
             "of the paper (± the spread over seeds, or the estimator's standard error for one seed).", ""]
    if notes:
        lines += ["## Notes", ""] + [f"- {render.escape_markdown(n)}" for n in notes] + [""]
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
