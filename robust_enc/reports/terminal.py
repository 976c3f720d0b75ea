"""The Table 3 view in a terminal: tables that fit its width, never a cell cut to "…".

The full view (model, regularizer, clean and every threat, GBR, weight norms) is 200+ characters wide for a study
with a few attacks; a terminal has 80-120. When the whole view does not fit, it is shown as one table per threat
model (attack and norm: its eps as short headers "2/255", "8/255", beside the clean accuracy) and one for GBR and the
weight norms, each with the row names; a section still too wide is split by columns. Cells never wrap unless a
single column cannot fit (then they fold, still whole). The files hold the full table.

Every text comes in as ``rich.text.Text``, so a run id such as "[/red]" is shown, never parsed as markup.
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass

import pandas as pd
from rich.console import Console
from rich.table import Table
from rich.text import Text

from robust_enc.reports.render import _fewer_images, _right_aligned, attack_label, display_table
from robust_enc.reports.tables import threat_columns
from robust_enc.runtime.progress import format_eps

PIPE_WIDTH = 200  # a pipe or log without COLUMNS keeps wide tables whole
CLEAN_HEADER = "Clean top-1 (%)"
IDENTITY = ("Model", "Regularizer", "Data set", "Seeds")


def console_width() -> int:
    """``COLUMNS`` when set (also for a pipe), else the terminal's width, else ``PIPE_WIDTH``."""
    columns = os.environ.get("COLUMNS", "")
    if columns.isdigit() and int(columns) > 0:
        return int(columns)
    if sys.stdout.isatty():
        return shutil.get_terminal_size().columns
    return PIPE_WIDTH


def make_console() -> Console:
    return Console(width=console_width(), soft_wrap=False)


@dataclass
class Section:
    title: str
    columns: list[str]  # view columns shown after the row names
    headers: list[str]  # their short headers


def _sections(table: pd.DataFrame, view: pd.DataFrame) -> list[Section]:
    """Clean + each threat model's eps, then GBR and the rest; headers as short as their section's title allows."""
    names = list(view.columns)
    first = names.index(CLEAN_HEADER)
    threats = threat_columns(table)
    groups: dict[str, Section] = {}
    for offset, (column, threat) in enumerate(threats):
        label = attack_label(threat.attack, threat.norm)
        section = groups.setdefault(label, Section(f"{label} top-1 (%)", [CLEAN_HEADER], ["clean"]))
        section.columns.append(names[first + 1 + offset])
        section.headers.append(format_eps(threat.eps, threat.norm) + _fewer_images(table, column).replace(
            " images", " img"))
    rest = names[first + 1 + len(threats):]
    sections = list(groups.values()) or [Section("Clean top-1 (%)", [CLEAN_HEADER], ["clean"])]
    if rest:
        sections.append(Section("GBR and weight norms", rest, rest))
    return sections


def _table(view: pd.DataFrame, keys: list[str], columns: list[str], headers: list[str], title: str,
           fold: bool) -> Table:
    out = Table(title=Text(title))
    for name, header in zip(keys + columns, keys + headers):
        right = _right_aligned(view[[name]])[0]
        out.add_column(Text(str(header)), justify="right" if right else "left", no_wrap=not fold, overflow="fold")
    for row in view[keys + columns].itertuples(index=False):
        out.add_row(*(Text(str(c)) for c in row))
    return out


def _fits(console: Console, table: Table) -> bool:
    """The table's natural width (measured without the console's limit, which clamps it) fits the console."""
    return console.measure(table, options=console.options.update_width(10**6)).maximum <= console.width


def table3_tables(table: pd.DataFrame, title: str, console: Console) -> list[Table]:
    """The Table 3 view as rich tables that fit ``console``'s width (see the module's docstring)."""
    if table.empty:
        return [Table(title=Text(f"{title}: no rows"))]
    view = display_table(table, "table3", "rich")
    keys = [c for c in view.columns if c in IDENTITY]
    whole = _table(view, keys, [c for c in view.columns if c not in keys],
                   [c for c in view.columns if c not in keys], title, fold=False)
    if _fits(console, whole):
        return [whole]
    if view["Model"].nunique() == 1:  # one model: it goes into the titles
        title = f"{title} ({view['Model'].iloc[0]})"
        keys.remove("Model")
    tables = []
    for section in _sections(table, view):
        start = 0
        while start < len(section.columns):  # as many of the section's columns as fit, at least one
            stop = len(section.columns)
            while stop > start + 1 and not _fits(console, _table(view, keys, section.columns[start:stop],
                                                                  section.headers[start:stop], "", fold=False)):
                stop -= 1
            part = _table(view, keys, section.columns[start:stop], section.headers[start:stop],
                          f"{title}: {section.title}", fold=False)
            if not _fits(console, part):
                part = _table(view, keys, section.columns[start:stop], section.headers[start:stop],
                              f"{title}: {section.title}", fold=True)
            tables.append(part)
            start = stop
    return tables


def print_table3(table: pd.DataFrame, title: str, console: Console | None = None) -> None:
    console = console or make_console()
    for part in table3_tables(table, title, console):
        console.print(part)
