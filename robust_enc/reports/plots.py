"""Report figures, drawn with matplotlib's Agg canvas (no pyplot, no global backend switch) and written atomically.

- accuracy vs eps: one figure per attack and norm, one line per Table 3 row (clean accuracy at eps 0);
- GBR vs adversarial top-1: one marker per model, named in a legend beside the axes (text on the points overlaps),
  with the least-squares line and Pearson r from ``MIN_P_VALUE_MODELS`` models on (a line through 3 points says
  little; paper section 2: lower GBR, more robust);
- GBR over training epochs, one line per run (the paper's Fig. 1 / Fig. 3), from each run's metrics.csv.
Every run gets its own colour AND marker (``run_styles``): 10 colours and 11 markers give 110 distinct pairs.
A figure without data is skipped with a logged note; the functions then return None.
"""

from __future__ import annotations

import io
import logging
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from robust_enc.io import write_atomic
from robust_enc.reports.render import attack_label, format_eps, threat_label
from robust_enc.reports.stats import MIN_P_VALUE_MODELS
from robust_enc.reports.tables import Threat, threat_columns

log = logging.getLogger(__name__)

DPI = 120
SIZE = (6.4, 4.2)  # inches
COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf")  # matplotlib's tab10
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h")  # 11: coprime with the 10 colours


def run_styles(labels: list[str]) -> dict[str, tuple[str, str]]:
    """(colour, marker) per label, in order: the i-th takes colour i mod 10 and marker i mod 11, so no two of the
    first 110 labels share both, and no two of the first 10 share either."""
    unique = list(dict.fromkeys(labels))
    return {label: (COLOURS[i % len(COLOURS)], MARKERS[i % len(MARKERS)]) for i, label in enumerate(unique)}


def slug(text: str) -> str:
    """A file-name-safe form of an attack, norm, eps or data set name."""
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", text).strip("_") or "x"


def save_png(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)  # attach the Agg canvas: rendering needs no display and no pyplot state
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
    return write_atomic(path, lambda f: f.write(buffer.getvalue()), binary=True)


def _eps_axis(norm: str, eps: np.ndarray) -> tuple[np.ndarray, str]:
    """Linf eps in units of 1/255 (how they are quoted), others in pixel units."""
    if norm == "linf":
        return eps * 255, "eps (x / 255, L∞)"
    return eps, f"eps ({norm}, pixel units)"


def plot_accuracy_vs_eps(curves: pd.DataFrame, out_dir: Path) -> list[Path]:
    """``curves`` from ``accuracy_vs_eps``; one PNG per data set x attack x norm (data set in the name only
    when there are several). Returns the files written."""
    if curves.empty:
        log.info("no adversarial results: accuracy-vs-eps plots skipped")
        return []
    several_datasets = curves["dataset"].nunique() > 1
    written = []
    for (dataset, attack, norm), rows in curves.groupby(["dataset", "attack", "norm"], sort=False):
        fig = Figure(figsize=SIZE)
        ax = fig.add_subplot()
        styles = run_styles(list(curves["label"]))
        for label, line in rows.groupby("label", sort=False):
            line = line.sort_values("eps")
            x, xlabel = _eps_axis(norm, line["eps"].to_numpy(float))
            std = line["std"].to_numpy(float) * 100
            colour, marker = styles[label]
            ax.errorbar(x, line["top1"].to_numpy(float) * 100, yerr=None if np.isnan(std).all() else std,
                        color=colour, marker=marker, markersize=4, capsize=2, label=str(label))
        ax.set_xlabel(xlabel)
        ax.set_ylabel("top-1 accuracy (%)")
        ax.set_ylim(bottom=0)
        ax.set_title(f"{attack_label(attack, norm)} on {dataset}")
        ax.grid(alpha=0.3)
        _legend_beside(ax)
        name = f"adv_vs_eps_{slug(attack)}_{slug(norm)}" + (f"_{slug(dataset)}" if several_datasets else "")
        written.append(save_png(fig, out_dir / f"{name}.png"))
    return written


def plot_gbr_vs_accuracy(table: pd.DataFrame, threat: Threat, path: Path) -> Path | None:
    """Scatter of GBR (x) against adversarial top-1 at ``threat`` (y) over the rows of a Table 3 view of one data
    set, with the least-squares line and Pearson r (from 3 models on)."""
    column = threat.column
    if column not in table or "gbr" not in table:
        log.info("no %s results: GBR scatter skipped", column)
        return None
    points = table[["label", "gbr", column]].replace([np.inf, -np.inf], np.nan).dropna()  # a diverged GBR: no point
    if points.empty:
        log.info("no model has both GBR and %s: GBR scatter skipped", column)
        return None
    x, y = points["gbr"].to_numpy(float), points[column].to_numpy(float) * 100
    fig = Figure(figsize=SIZE)
    ax = fig.add_subplot()
    styles = run_styles([str(label) for label in points["label"]])
    for label, xi, yi in zip(points["label"], x, y):
        colour, marker = styles[str(label)]
        ax.scatter([xi], [yi], color=colour, marker=marker, s=36, zorder=3, label=str(label))
    title = f"GBR vs top-1 under {threat_label(*threat)}"
    if len(x) >= MIN_P_VALUE_MODELS and np.ptp(x) > 0 and np.ptp(y) > 0:
        slope, intercept = np.polyfit(x, y, 1)
        grid = np.linspace(x.min(), x.max(), 50)
        r = float(np.corrcoef(x, y)[0, 1])
        ax.plot(grid, slope * grid + intercept, "--", color="gray",
                label=f"least-squares fit (r = {r:+.3f}, n = {len(x)})")
    else:
        title += f"\n(n = {len(x)} models: no fit below {MIN_P_VALUE_MODELS})"
    _legend_beside(ax)
    ax.set_xlabel("GBR (eq. 18, mean ||df/dx||_F^2)")
    ax.set_ylabel("adversarial top-1 (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    return save_png(fig, path)


def plot_gbr_over_epochs(histories: dict[str, pd.DataFrame], path: Path, *, title: str = "") -> Path | None:
    """GBR per epoch, one line per run (``histories``: run label -> metrics.csv frame with columns epoch, gbr and
    optionally gbr_stderr, drawn as a band). Log scale when the values span more than two decades."""
    # A hand-edited or half-written metrics.csv may hold text ("oops", "inf?"): such cells count as missing.
    usable = {label: frame[["epoch", "gbr"] + (["gbr_stderr"] if "gbr_stderr" in frame else [])]
              .apply(pd.to_numeric, errors="coerce").replace([np.inf, -np.inf], np.nan).dropna(subset=["epoch", "gbr"])
              for label, frame in histories.items() if {"epoch", "gbr"} <= set(frame.columns)}
    usable = {label: frame.sort_values("epoch") for label, frame in usable.items() if not frame.empty}
    if not usable:
        log.info("no run has per-epoch GBR in its metrics.csv: GBR-over-epochs plot skipped")
        return None
    fig = Figure(figsize=SIZE)
    ax = fig.add_subplot()
    styles = run_styles(list(usable))
    for label, frame in usable.items():
        epoch, gbr = frame["epoch"].to_numpy(), frame["gbr"].to_numpy()
        colour, marker = styles[label]
        (line,) = ax.plot(epoch, gbr, color=colour, marker=marker, markersize=4, label=str(label))
        if "gbr_stderr" in frame and frame["gbr_stderr"].notna().any():
            err = frame["gbr_stderr"].fillna(0).to_numpy()
            ax.fill_between(epoch, gbr - err, gbr + err, color=line.get_color(), alpha=0.2, linewidth=0)
    values = np.concatenate([f["gbr"].to_numpy() for f in usable.values()])
    positive = values[values > 0]
    if len(positive) and positive.max() / positive.min() > 100:
        ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("GBR (eq. 18)")
    ax.set_title(title or "GBR during training")
    ax.grid(alpha=0.3)
    _legend_beside(ax)
    return save_png(fig, path)


def _legend_beside(ax) -> None:
    """The legend right of the axes (the PNG grows to hold it: bbox_inches="tight"), never over the data; two
    columns from 16 entries on."""
    handles, _ = ax.get_legend_handles_labels()
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize="x-small", frameon=False,
              ncols=2 if len(handles) > 15 else 1)


def eps_name(eps: float, norm: str) -> str:
    """"8-255" for 8/255, else the number: for file names."""
    text = format_eps(eps, norm)
    return slug(text.replace("/", "-")) if not math.isnan(eps) else "x"


def accuracy_vs_eps(table: pd.DataFrame) -> pd.DataFrame:
    """Long form for the accuracy-vs-eps plot: one row per table row x threat, plus the clean accuracy at eps 0 for
    every attack curve. Columns label, dataset, attack, norm, eps, top1, std (fractions)."""
    records = []
    for _, row in table.iterrows():
        for column, threat in threat_columns(table):
            if pd.isna(row[column]):
                continue
            std = row.get(f"{column}:std", math.nan)
            records.append({"label": row["label"], "dataset": row["dataset"], "attack": threat.attack,
                            "norm": threat.norm, "eps": threat.eps, "top1": float(row[column]), "std": float(std)})
    curves = pd.DataFrame(records, columns=["label", "dataset", "attack", "norm", "eps", "top1", "std"])
    clean = []
    for (label, attack, norm), _ in curves.groupby(["label", "attack", "norm"], sort=False):
        row = table[table["label"] == label].iloc[0]
        if not pd.isna(row["clean_top1"]) and not (curves[(curves["label"] == label) & (curves["attack"] == attack)
                                                          & (curves["norm"] == norm)]["eps"] == 0).any():
            clean.append({"label": label, "dataset": row["dataset"], "attack": attack, "norm": norm, "eps": 0.0,
                          "top1": float(row["clean_top1"]), "std": float(row.get("clean_top1:std", math.nan))})
    if clean:
        curves = pd.concat([pd.DataFrame(clean), curves], ignore_index=True)
    return curves.sort_values(["attack", "norm", "label", "eps"], kind="stable").reset_index(drop=True)
