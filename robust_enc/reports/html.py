"""``index.html``: the report as one self-contained page people can send (Jinja2 template ``templates/index.html.j2``).

Built from the same DataFrames as the Markdown: the Table 3 view, one leaderboard tab per threat (CSS-only radio
tabs), the correlations with the count of tests, the PNG plots inlined as base64 data URIs and one card per model
with its provenance. No network, no CDN: CSS and a few lines of JavaScript (sorting by a header click) are inline,
and the only links (checkpoints, model cards) are relative to the report folder. Every text is escaped by Jinja2's
autoescape; only the link cells the renderer built (``RawHtml``) pass as markup.
"""

from __future__ import annotations

import base64
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from robust_enc.reports.cards import ModelCard
from robust_enc.reports.render import (
    MISSING,
    RawHtml,
    _right_aligned,
    display_table,
    format_interval,
    format_number,
    format_percent,
    threat_label,
)

TEMPLATES = Path(__file__).parent / "templates"


@dataclass
class HtmlTable:
    headers: list[str]
    right: list[bool]  # numeric columns, right-aligned
    rows: list[list[Any]]  # str, or markupsafe.Markup for the renderer's link cells


@dataclass
class Board:
    label: str
    table: HtmlTable
    notes: list[str]


def html_table(table: pd.DataFrame, kind: str) -> HtmlTable:
    from markupsafe import Markup

    if table.empty:
        return HtmlTable([], [], [])
    view = display_table(table, kind, "html")
    rows = [[Markup(c) if isinstance(c, RawHtml) else str(c) for c in row] for row in view.itertuples(index=False)]
    return HtmlTable([str(c) for c in view.columns], _right_aligned(view), rows)


def _card_view(card: ModelCard) -> dict[str, Any]:
    """A card's lines as the page shows them (strings)."""
    facts = [("model", card.model), ("regularizer", card.regularizer), ("data set", card.dataset),
             ("checkpoint hash", card.checkpoint_hash or MISSING), ("image set", card.image_set or "not recorded"),
             ("n (clean pass)", f"{card.n:,}"),
             ("clean top-1", f"{format_percent(card.clean_top1)}% {format_interval(card.clean_lo, card.clean_hi)}"),
             ("GBR", format_number(card.gbr, card.gbr_stderr if not math.isnan(card.gbr_stderr) else None)
              + ("" if math.isnan(card.gbr_stderr) else f" ± {format_number(card.gbr_stderr, card.gbr_stderr)}"))]
    facts += [(k.replace("_", " "), v) for k, v in card.provenance.items()]
    results = [(threat_label(m.attack, m.norm, m.eps), f"{m.n:,}", format_percent(m.clean_top1),
                format_percent(m.adv_top1), format_interval(m.adv_lo, m.adv_hi)) for m in card.results]
    return {"name": card.run_id, "facts": facts, "results": results, "checkpoint": card.checkpoint,
            "model_card": card.model_card}


def plot_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def render_index_html(*, summary: str, notes: list[str], table3: pd.DataFrame, boards: dict[str, pd.DataFrame],
                      chosen: str, correlation: pd.DataFrame, figures: list[Path], cards: list[ModelCard],
                      files: list[str]) -> str:
    """The page. ``boards``: tab label -> leaderboard table (``chosen`` opens first); ``figures``: PNGs to inline;
    ``files``: the report's other files, linked relative to the page."""
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True, trim_blocks=True,
                             lstrip_blocks=True, undefined=jinja2.StrictUndefined)
    tabs = [Board(label, html_table(table, "leaderboard"), [n for n in table.attrs.get("notes", []) if n not in notes])
            for label, table in boards.items()]
    first = next((i for i, label in enumerate(boards) if label == chosen), 0)
    return env.get_template("index.html.j2").render(
        summary=summary, notes=notes, table3=html_table(table3, "table3"), boards=tabs, first=first,
        correlation=html_table(correlation, "correlation"), tested=int(correlation.attrs.get("tested", 0)),
        correlation_notes=[n for n in correlation.attrs.get("notes", []) if n not in notes],
        plots=[(p.stem, plot_uri(p)) for p in figures], cards=[_card_view(c) for c in cards], files=files)
