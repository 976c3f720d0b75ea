"""Renderers for the report tables: Markdown (GitHub), CSV, JSON, LaTeX, HTML and a rich table for the terminal.

CSV and JSON get the numeric tables as they are (fractions, pixel-unit eps, NaN -> empty / null). Markdown, LaTeX,
HTML and rich get a display view: percent with two decimals, "29.87 (+12.33)" differences to the baseline,
"mean ± std" over seeds, eps as "8/255" (``format_eps``). Text that came from the inputs (run ids, regularizers) is
escaped for each format: HTML in Markdown and HTML, formulas in CSV (OWASP's CSV-injection advice: a text cell that
starts with = + - @ or a tab/CR gets a leading single quote; numbers stay numbers). Each table kind ("table3",
"leaderboard", "correlation") registers its view in ``VIEWS``; each output format registers in ``FORMATS`` with its
file suffix.
"""

from __future__ import annotations

import functools
import html
import json
import math
import re
from collections.abc import Callable
from typing import Any

import pandas as pd

from robust_enc.registry import Registry
from robust_enc.reports.stats import NO_P_VALUE
from robust_enc.reports.tables import threat_columns
from robust_enc.runtime.progress import format_eps

MISSING = "—"
ATTACK_LABELS = {"none": "clean", "fgsm": "FGSM", "pgd": "PGD", "apgd-ce": "APGD-CE", "apgd-dlr": "APGD-DLR",
                 "square": "Square", "autoattack": "AutoAttack", "worst": "worst case"}
NORM_LABELS = {"linf": "L∞", "l2": "L2", "none": ""}
WEIGHT_NORM = "Σ‖W‖²"  # sum over conv/linear layers of ||W||_F^2
# The scale-free companions of GBR (results columns -> headers): logits scaled by c change GBR by c^2, not these.
COMPANIONS = {"gbr_scale_free": "GBR / spread", "logit_spread": "Logit spread", "gbr_loss": "Loss GBR"}
# Unicode the display views use, as LaTeX (applied after escaping, so the "$" survive).
LATEX_SYMBOLS = {WEIGHT_NORM: r"$\sum\|W\|_F^2$", "±": r"$\pm$", "∞": r"$\infty$", "ρ": r"$\rho$", MISSING: "--"}

View = Callable[[pd.DataFrame, str], pd.DataFrame]  # (numeric table, format) -> table of strings
VIEWS: Registry[View] = Registry("report table")
FORMATS: Registry[Callable[..., str]] = Registry("report format")


# ------------------------------------------------------------------ cell formatting
def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA


def format_percent(fraction: float) -> str:
    return MISSING if _missing(fraction) else f"{fraction * 100:.2f}"


def format_delta(fraction: float) -> str:
    """A difference of fractions as signed percentage points, the paper's "+12.33"."""
    return f"{fraction * 100:+.2f}"


def format_interval(low: float, high: float) -> str:
    """A 95% interval of a fraction in percent, one decimal: "[59.8, 87.3]"."""
    return "" if _missing(low) or _missing(high) else f"[{low * 100:.1f}, {high * 100:.1f}]"


def format_number(value: float, like: float | None = None) -> str:
    """About 4 significant digits without exponents for everyday magnitudes: 2712, 31.42, 0.5123. With ``like``
    (an error bar's value) the decimals follow ``like``: "2712 ± 31", "31.42 ± 1.00"."""
    if _missing(value):
        return MISSING
    magnitude = abs(value if like is None or _missing(like) else like)
    if magnitude == 0 or 1e-3 <= magnitude < 1e9:
        decimals = 0 if magnitude == 0 else max(0, 3 - math.floor(math.log10(magnitude)))
        return f"{value:.{decimals}f}"
    return f"{value:.3g}"


def format_r(value: float) -> str:
    return MISSING if _missing(value) else f"{value:+.3f}"


def format_p(value: float, note: str = "") -> str:
    if note == NO_P_VALUE:
        return NO_P_VALUE
    return MISSING if _missing(value) else f"{value:.2g}"


def attack_label(attack: str, norm: str) -> str:
    """"FGSM L∞"; attacks with a step count keep it: "PGD-50 L∞"."""
    base, _, steps = attack.rpartition("-") if re.search(r"-\d+$", attack) else (attack, "", "")
    name = ATTACK_LABELS.get(base, base) + (f"-{steps}" if steps else "")
    return f"{name} {NORM_LABELS.get(norm, norm)}".strip()


def threat_label(attack: str, norm: str, eps: float) -> str:
    """"FGSM L∞ 8/255"."""
    return f"{attack_label(attack, norm)} {format_eps(eps, norm)}"


@functools.lru_cache(maxsize=256)
def short_regularizer(spec: str) -> str:
    """The regularizer's run name ("enc+cutmix+ls", non-default settings shown) when the regularizer registry can
    read the spec, else the spec as written."""
    try:
        from robust_enc.regularizers import run_name

        return run_name(spec)
    except Exception:  # noqa: BLE001 - display only: an unknown or older spec is shown verbatim
        return spec


def _cell(value: float, std: float = math.nan, delta: float = math.nan, *, fmt=format_percent,
          delta_ci: float = math.nan) -> str:
    """"29.87", "29.87 ± 0.41", "29.87 (+12.33)", "29.87 ± 0.41 (+12.33)" or "29.87 ± 0.41 (+12.33 ± 1.02)"."""
    if _missing(value):
        return MISSING
    text = fmt(value)
    if not _missing(std):
        text += f" ± {fmt(std, value) if fmt is format_number else fmt(std)}"
    if not _missing(delta):
        if fmt is format_percent:
            spread = "" if _missing(delta_ci) else f" ± {format_percent(delta_ci)}"
            text += f" ({format_delta(delta)}{spread})"
        else:  # GBR-like numbers: the difference as a ratio to the baseline is what reads
            base = value - delta
            ratio = value / base if base else math.nan
            text += f" (×{ratio:.2f})" if not _missing(ratio) else ""
    return text


class RawHtml(str):
    """A cell that is already HTML (a link): ``render_html`` escapes every other cell."""


def _link(path: str, fmt: str, text: str = "card") -> str:
    if not path:
        return MISSING
    if fmt == "md":
        return f"[{text}]({path})"
    if fmt == "html":
        return RawHtml(f'<a href="{html.escape(path, quote=True)}">{html.escape(text)}</a>')
    return path


# ------------------------------------------------------------------ display views
@VIEWS.register("table3", help="clean / adversarial top-1 per model + regularizer, GBR, weight norms")
def view_table3(table: pd.DataFrame, fmt: str = "md") -> pd.DataFrame:
    out = pd.DataFrame(index=table.index)
    out["Model"] = table["model"]
    out["Regularizer"] = [short_regularizer(r) + (" (baseline)" if b and r != "baseline" else "")
                          for r, b in zip(table["regularizer"], table.get("is_baseline", [False] * len(table)))]
    if table["dataset"].nunique() > 1:
        out["Data set"] = table["dataset"]
    if "n_seeds" in table and (table["n_seeds"] > 1).any():
        out["Seeds"] = table["n_seeds"].astype(int).astype(str)

    def get(name: str) -> pd.Series:
        return table[name] if name in table else pd.Series(math.nan, index=table.index)

    # The baseline row shows no difference to itself (as in the paper).
    own = table["is_baseline"] if "is_baseline" in table else pd.Series(False, index=table.index)
    # With several seeds, "±" is the 95% t-interval of the mean over seeds (the std when only that is known), and a
    # difference to the baseline carries its 95% Welch interval: a difference whose interval excludes 0 is real.
    spread = ":ci" if "clean_top1:ci" in table else ":std"

    def cells(name: str, fmt=format_percent) -> list[str]:
        return [_cell(v, s, math.nan if b else d, fmt=fmt, delta_ci=c) for v, s, d, c, b in
                zip(table[name], get(f"{name}{spread}"), get(f"{name}:delta"), get(f"{name}:delta_ci"), own)]

    for name, header in [("clean_top1", "Clean top-1 (%)")] + [
            (c, f"{threat_label(*t)} (%{_fewer_images(table, c)})") for c, t in threat_columns(table)]:
        out[header] = cells(name)
    # Error bar of GBR: over seeds when there are several, else the estimator's standard error.
    out["GBR"] = [_cell(g, s if not _missing(s) else e, fmt=format_number)
                  for g, s, e in zip(table["gbr"], get(f"gbr{spread}"), get("gbr_stderr"))]
    for name, header in COMPANIONS.items():  # the scale-free measures, where measured
        if get(name).notna().any():
            out[header] = cells(name, fmt=format_number)
    out[WEIGHT_NORM] = [_cell(w, s, fmt=format_number)
                        for w, s in zip(table["weight_sq_norm"], get("weight_sq_norm:std"))]
    return out.reset_index(drop=True)


def _fewer_images(table: pd.DataFrame, column: str) -> str:
    """", 100 images" when every row evaluated the threat on fewer images than its clean pass (AutoAttack on a
    subset), else "": the header says the column's accuracies are over another, smaller set."""
    if f"n:{column}" not in table or "n_clean" not in table:
        return ""
    counts = table[f"n:{column}"].dropna().astype(int)
    if len(counts) and (counts < table.loc[counts.index, "n_clean"]).all():
        return f", {counts.max():,} images" if counts.nunique() == 1 else f", {counts.min():,}-{counts.max():,} images"
    return ""


@VIEWS.register("leaderboard", help="models ranked by adversarial top-1 at one threat")
def view_leaderboard(table: pd.DataFrame, fmt: str = "md") -> pd.DataFrame:
    out = pd.DataFrame(index=table.index)
    tied = table["tied"] if "tied" in table else pd.Series(False, index=table.index)
    out["Rank"] = [f"{r} (tied)" if t else str(r) for r, t in zip(table["rank"], tied)]
    out["Run"] = table["run_id"]
    out["Model"] = table["model"]
    out["Regularizer"] = [short_regularizer(r) for r in table["regularizer"]]
    out["Data set"] = table["dataset"]
    out["Threat"] = [threat_label(a, n, e) for a, n, e in zip(table["attack"], table["norm"], table["eps"])]
    out["n"] = table["n"].astype(str)
    for name, header in (("clean", "Clean (%)"), ("adv", "Robust (%)")):
        out[header] = [format_percent(v) for v in table[f"{name}_top1"]]
        if f"{name}_lo" in table:  # the same n images for both: the interval says how far that carries
            out[f"{header[:-4]} 95% CI"] = [format_interval(lo, hi) or MISSING
                                            for lo, hi in zip(table[f"{name}_lo"], table[f"{name}_hi"])]
    out["GBR"] = [format_number(v) for v in table["gbr"]]
    out["Checkpoint"] = [h or MISSING for h in table["checkpoint_hash"]]
    out["Checkpoint file"] = [p or MISSING for p in table.get("checkpoint", pd.Series("", index=table.index))]
    out["Card"] = [_link(p, fmt) for p in table["model_card"]]
    return out.reset_index(drop=True)


def _target_label(y: str, attack: str, norm: str, eps: float) -> str:
    names = {"clean_top1": "clean top-1", "gen_gap": "generalization gap (train - clean top-1)",
             "weight_sq_norm": WEIGHT_NORM}
    return names.get(y) or f"{threat_label(attack, norm, eps)} top-1"


@VIEWS.register("correlation", help="Pearson / Spearman correlation of GBR with accuracy and the generalization gap")
def view_correlation(table: pd.DataFrame, fmt: str = "md") -> pd.DataFrame:
    out = pd.DataFrame(index=table.index)
    if table["dataset"].nunique() > 1:
        out["Data set"] = table["dataset"]
    if "x" in table and table["x"].nunique() > 1:  # the scale-free companions too
        out["Measure"] = [{"gbr": "GBR", **COMPANIONS}.get(x, x) for x in table["x"]]
    out["GBR vs" if "Measure" not in out else "vs"] = [_target_label(y, a, n, e) for y, a, n, e in
                     zip(table["y"], table["attack"], table["norm"], table["eps"])]
    out["n"] = table["n"].astype(str)
    out["Pearson r"] = [format_r(v) for v in table["pearson_r"]]
    out["Pearson p"] = [format_p(v, n) for v, n in zip(table["pearson_p"], table["note"])]
    out["Spearman ρ"] = [format_r(v) for v in table["spearman_rho"]]
    out["Spearman p"] = [format_p(v, n) for v, n in zip(table["spearman_p"], table["note"])]
    out["Note"] = ["" if not n or n == NO_P_VALUE else n for n in table["note"]]
    return out.reset_index(drop=True)


def display_table(table: pd.DataFrame, kind: str, fmt: str = "md") -> pd.DataFrame:
    """The string view of a numeric report table."""
    return VIEWS.get(kind)(table, fmt)


# ------------------------------------------------------------------ formats
_NUMERIC_CELL = re.compile(r"^[+-]?\.?\d")  # "29.87", "+0.12", ".5"; not a path like "../runs"


def _right_aligned(view: pd.DataFrame) -> list[bool]:
    return [bool(len(cells := [c for c in view[col] if c not in (MISSING, "")]))
            and all(_NUMERIC_CELL.match(c) for c in cells) for col in view.columns]


def escape_markdown(text: Any) -> str:
    """Text for a Markdown file: HTML escaped (GitHub renders raw HTML: a run id "<script>" must stay text)."""
    return html.escape(str(text), quote=False)


def markdown_table(view: pd.DataFrame) -> str:
    """A GitHub table; numeric columns right-aligned; cells HTML-escaped (a link cell's text and target too)."""
    def escape(text: Any) -> str:
        return escape_markdown(text).replace("|", r"\|").replace("\n", " ")

    lines = ["| " + " | ".join(escape(c) for c in view.columns) + " |",
             "|" + "|".join("---:" if right else "---" for right in _right_aligned(view)) + "|"]
    lines += ["| " + " | ".join(escape(c) for c in row) + " |" for row in view.itertuples(index=False)]
    return "\n".join(lines) + "\n"


@FORMATS.register("md", help="GitHub Markdown table", suffix="md")
def render_markdown(table: pd.DataFrame, kind: str, title: str = "") -> str:
    if table.empty:
        return "_(no rows)_\n"
    return markdown_table(display_table(table, kind, "md"))


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy scalars
        value = value.item()
    # JSON has no NaN or inf (json.dumps(allow_nan=False) raises): a diverged GBR of inf is written as null too.
    return None if _missing(value) or (isinstance(value, float) and not math.isfinite(value)) else value


_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def neutralize_formula(value: Any) -> Any:
    """A text cell a spreadsheet would run as a formula ("=HYPERLINK(...)", "-2+3", "@SUM") gets a leading single
    quote (OWASP's CSV-injection advice); numbers, and text that starts otherwise, pass unchanged."""
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value


@FORMATS.register("csv", help="numeric table: fractions, pixel-unit eps (for pandas, spreadsheets)", suffix="csv")
def render_csv(table: pd.DataFrame, kind: str, title: str = "") -> str:
    text_columns = [c for c in table.columns if table[c].dtype == object or pd.api.types.is_string_dtype(table[c])]
    safe = table.assign(**{str(c): table[c].map(neutralize_formula) for c in text_columns})
    return safe.to_csv(index=False, lineterminator="\n")


@FORMATS.register("json", help="numeric table with its notes; NaN as null", suffix="json")
def render_json(table: pd.DataFrame, kind: str, title: str = "") -> str:
    payload = {"schema": "robust-enc/report", "version": 1, "table": kind,
               "notes": list(table.attrs.get("notes", [])),
               "rows": [{str(k): _jsonable(v) for k, v in record.items()} for record in table.to_dict("records")]}
    if "threat" in table.attrs:
        payload["threat"] = {k: _jsonable(v) for k, v in table.attrs["threat"].items()}
    return json.dumps(payload, indent=1, allow_nan=False) + "\n"


@FORMATS.register("latex", help="booktabs tabular (pandas Styler.to_latex)", suffix="tex")
def render_latex(table: pd.DataFrame, kind: str, title: str = "") -> str:
    view = display_table(table, kind, "latex")
    styler = view.style.hide(axis="index").format(escape="latex").format_index(escape="latex", axis=1)
    align = "".join("r" if right else "l" for right in _right_aligned(view)) or "l"
    text = styler.to_latex(hrules=True, column_format=align)
    for symbol, latex in LATEX_SYMBOLS.items():
        text = text.replace(symbol, latex)
    return text


@FORMATS.register("html", help="standalone HTML page with the table", suffix="html")
def render_html(table: pd.DataFrame, kind: str, title: str = "") -> str:
    view = display_table(table, kind, "html")
    view = view.map(lambda c: c if isinstance(c, RawHtml) else html.escape(str(c)))
    view.columns = [html.escape(str(c)) for c in view.columns]
    body = view.to_html(index=False, border=0, escape=False)
    return (f"<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title or kind)}</title>"
            "<style>table{border-collapse:collapse}td,th{padding:2px 8px;text-align:right}</style></head>\n"
            f"<body>\n<h2>{html.escape(title or kind)}</h2>\n{body}\n</body></html>\n")


def render_table(table: pd.DataFrame, kind: str, fmt: str, title: str = "") -> str:
    return FORMATS.get(fmt)(table, kind, title)


def format_suffix(fmt: str) -> str:
    return FORMATS.lookup(fmt)[0].meta["suffix"]


def rich_table(table: pd.DataFrame, kind: str, title: str = "") -> "rich.table.Table":  # noqa: F821
    """The display view as one rich Table (``terminal.table3_tables`` fits Table 3 to a width). Every text is a
    ``rich.text.Text``: a run id such as "[/red]" is shown, never parsed as markup."""
    from rich.table import Table
    from rich.text import Text

    view = display_table(table, kind, "rich") if not table.empty else pd.DataFrame()
    out = Table(title=Text(title or kind))
    for name, right in zip(view.columns, _right_aligned(view)):
        out.add_column(Text(str(name)), justify="right" if right else "left", overflow="fold")
    for row in view.itertuples(index=False):
        out.add_row(*(Text(str(c)) for c in row))
    return out

