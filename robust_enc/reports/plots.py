"""Report figures, drawn with matplotlib's Agg canvas (no pyplot, no global backend switch) and written atomically.

- accuracy vs eps: one figure per attack and norm, one line per Table 3 row (clean accuracy at eps 0);
- GBR vs adversarial top-1: scatter with the least-squares line and Pearson r (paper section 2: lower GBR,
  more robust);
- GBR over training epochs, one line per run (the paper's Fig. 1 / Fig. 3), from each run's metrics.csv.
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
from robust_enc.reports.tables import MIN_MODELS, Threat

log = logging.getLogger(__name__)

DPI = 120
SIZE = (6.4, 4.2)  # inches


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
    """``curves`` from ``tables.accuracy_vs_eps``; one PNG per data set x attack x norm (data set in the name only
    when there are several). Returns the files written."""
    if curves.empty:
        log.info("no adversarial results: accuracy-vs-eps plots skipped")
        return []
    several_datasets = curves["dataset"].nunique() > 1
    written = []
    for (dataset, attack, norm), rows in curves.groupby(["dataset", "attack", "norm"], sort=False):
        fig = Figure(figsize=SIZE)
        ax = fig.add_subplot()
        for label, line in rows.groupby("label", sort=False):
            line = line.sort_values("eps")
            x, xlabel = _eps_axis(norm, line["eps"].to_numpy(float))
            std = line["std"].to_numpy(float) * 100
            ax.errorbar(x, line["top1"].to_numpy(float) * 100, yerr=None if np.isnan(std).all() else std,
                        marker="o", markersize=3, capsize=2, label=str(label))
        ax.set_xlabel(xlabel)
        ax.set_ylabel("top-1 accuracy (%)")
        ax.set_ylim(bottom=0)
        ax.set_title(f"{attack_label(attack, norm)} on {dataset}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
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
    ax.scatter(x, y, zorder=3)
    for label, xi, yi in zip(points["label"], x, y):
        ax.annotate(str(label), (xi, yi), textcoords="offset points", xytext=(4, 3), fontsize="x-small")
    title = f"GBR vs top-1 under {threat_label(*threat)}"
    if len(x) >= 2 and np.ptp(x) > 0:
        slope, intercept = np.polyfit(x, y, 1)
        grid = np.linspace(x.min(), x.max(), 50)
        fit_label = "least-squares fit"
        if len(x) >= MIN_MODELS and np.ptp(y) > 0:
            r = float(np.corrcoef(x, y)[0, 1])
            fit_label += f" (r = {r:+.3f}, n = {len(x)})"
        ax.plot(grid, slope * grid + intercept, "--", color="gray", label=fit_label)
        ax.legend(fontsize="small")
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
    for label, frame in usable.items():
        epoch, gbr = frame["epoch"].to_numpy(), frame["gbr"].to_numpy()
        (line,) = ax.plot(epoch, gbr, marker="o", markersize=3, label=str(label))
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
    ax.legend(fontsize="small")
    return save_png(fig, path)


def eps_name(eps: float, norm: str) -> str:
    """"8-255" for 8/255, else the number: for file names."""
    text = format_eps(eps, norm)
    return slug(text.replace("/", "-")) if not math.isnan(eps) else "x"
