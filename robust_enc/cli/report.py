"""``robust-enc report RESULTS... [--out DIR] [--format md,csv,json,latex,html] [--baseline NAME] [--order NAMES]
[--attack NAME] [--eps EPS ...]``: the Table 3 view, leaderboard, GBR correlation and plots from results files and
run folders."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from robust_enc.errors import UserError
from robust_enc.reports import DEFAULT_FORMATS, TABLES, check_formats, check_out_dir, make_report, write_report

if TYPE_CHECKING:
    import pandas as pd


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("results", nargs="+", type=Path, metavar="RESULTS",
                        help="results files (.csv/.json) and/or run folders; a folder of run folders is searched "
                             "recursively; files from several machines are merged (exact duplicates collapse)")
    parser.add_argument("--out", type=Path, default=Path("report"), help="output folder (default: ./report)")
    parser.add_argument("--format", default=",".join(DEFAULT_FORMATS),
                        help="comma-separated table formats: md, csv, json, latex, html (default: %(default)s)")
    parser.add_argument("--baseline", default=None,
                        help="run id or regularizer of the row the differences refer to (default: the row whose "
                             "regularizer is 'baseline')")
    parser.add_argument("--order", default=None,
                        help="Table 3 row order after the baseline: comma-separated regularizers or run ids (e.g. "
                             "enc,cutmix,ls); rows not named follow sorted (default: sorted); a name that matches "
                             "no row is an error")
    parser.add_argument("--attack", default=None,
                        help="only this attack in the tables, and the leaderboard's attack (default: worst, else "
                             "pgd, else fgsm)")
    parser.add_argument("--eps", nargs="+", default=None, metavar="EPS",
                        help="only these eps, floats in pixel units or k/255 (e.g. 2/255 8/255); the leaderboard "
                             "uses the largest")


def check_order(table3: pd.DataFrame, order: Sequence[str]) -> None:
    """Every ``--order`` name matches a Table 3 row (the way ``tables.table3`` orders them), else a UserError: a
    typo would otherwise leave the order silently unchanged."""
    from robust_enc.reports.tables import _matches

    rows = [table3.iloc[i] for i in range(len(table3))]
    unknown = [name for name in order if not any(_matches(row, name) for row in rows)]
    if rows and unknown:
        raise UserError(f"--order {', '.join(unknown)}: names no Table 3 row; give run ids or regularizers of the "
                        f"results: {', '.join(dict.fromkeys(str(r['regularizer']) for r in rows))}")


def run(args: argparse.Namespace) -> int:
    from rich.text import Text

    from robust_enc.reports.terminal import make_console, print_table3

    formats = check_formats(args.format.split(","))  # a typo or a bad --out fails before anything is read
    check_out_dir(args.out)
    args.kept_in = str(args.out)
    eps = [part for item in args.eps for part in item.split(",") if part.strip()] if args.eps else None
    order = [part.strip() for part in args.order.split(",") if part.strip()] if args.order else ()
    report = make_report(args.results, baseline=args.baseline, attack=args.attack, eps=eps, link_base=args.out,
                         order=order)
    check_order(report.full_table3, order)  # before anything is written
    written = write_report(report, args.out, formats)
    console = make_console()  # COLUMNS, else the terminal's width; the tables fit it, the files hold them whole
    print_table3(report.tables["table3"], TABLES["table3"], console)
    console.print(Text(f"report written to {args.out} ({len(written)} files): {written['index.md']}, "
                       f"{written['index.html']}"), soft_wrap=True)
    return 0
