"""``robust-enc attack``: FGSM/PGD/... through ART over a data set, with an eps sweep and built-in sanity checks."""

from __future__ import annotations

import argparse

from robust_enc.attacks.checks import flag_lines
from robust_enc.attacks.config import AttackConfig, BatchReport
from robust_enc.attacks.evaluation import evaluate, results_path
from robust_enc.attacks.registry import ATTACKS, parse_attacks
from robust_enc.cli.common import (
    EXIT_OK,
    add_allow_flags_argument,
    add_channels_last_argument,
    add_data_arguments,
    add_device_argument,
    add_file_data_arguments,
    add_model_arguments,
    preprocessing_overrides,
    print_flags,
)
from robust_enc.results import ResultRow, parse_eps
from robust_enc.runtime.progress import format_eps


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    add_data_arguments(parser, default_dataset=None)  # None: the checkpoint's data set
    parser.add_argument("--split", default="", help="data split (default: test, or val where there is no test)")
    add_file_data_arguments(parser)
    add_device_argument(parser)
    add_channels_last_argument(parser, "attacking and measuring GBR")
    threat = parser.add_argument_group("threat model")
    threat.add_argument("--attack", default="fgsm",
                        help=f"comma-separated attacks: {', '.join(ATTACKS.names())} (aa = autoattack; default fgsm)")
    threat.add_argument("--eps", default="1/255,2/255,4/255",
                        help="comma-separated eps in pixel units of [0, 1] images: floats or k/255; L-inf in [0, 1], "
                        "L2 up to sqrt(C*H*W)")
    threat.add_argument("--norm", default="linf", choices=("linf", "l2"))
    threat.add_argument("--steps", type=int, default=None,
                        help="iterations (square: queries); default per attack: pgd 10, apgd and autoattack's APGD "
                        "100, square 1000")
    threat.add_argument("--step-size", type=float, default=None,
                        help="pixel units; default 2.5*eps/steps for pgd (Madry/RobustBench), 2*eps for apgd")
    threat.add_argument("--random-start", action=argparse.BooleanOptionalAction, default=True,
                        help="PGD starts at a random point of the eps ball (default on)")
    threat.add_argument("--restarts", type=int, default=1, help="random starts; the per-example best is kept")
    threat.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="", help="results file .csv/.json (default <run>/results.csv)")
    parser.add_argument("--gbr", action="store_true", help="attach the model's GBR measured on the same examples")
    add_allow_flags_argument(parser)


def config_from_args(args: argparse.Namespace) -> AttackConfig:
    return AttackConfig(
        checkpoint=args.checkpoint, model=args.model, weights=args.weights, dataset=args.dataset or "",
        data_dir=args.data_dir, download=args.download, split=args.split, subset=args.subset,
        subset_list=args.subset_list or "", cache=args.cache or "",
        batch_size=args.batch_size, workers=args.workers, device=args.device, attacks=parse_attacks(args.attack),
        eps=parse_eps(args.eps, args.norm), norm=args.norm, steps=args.steps, step_size=args.step_size,
        random_start=args.random_start, restarts=args.restarts, seed=args.seed, out=args.out, gbr=args.gbr,
        channels_last=args.channels_last,
        **preprocessing_overrides(args))


def _show(rows: list[ResultRow], out: str, timing: BatchReport | None = None, *, allow_flags: bool = False) -> int:
    """The rows as a table, the flag panel and where the rows went; returns the exit code (``print_flags``)."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console()
    names = max(len(r.attack) for r in rows)
    table = Table(title=escape(f"{rows[0].run_id} on {rows[0].dataset} ({rows[0].split}, n={rows[0].n})"))
    for column in ("attack", "norm", "eps", "steps", "clean top-1", "adv top-1", "img/s", "checks"):
        # attack names whole: a narrow terminal would otherwise cut apgd-ce and apgd-dlr both to "apgd-…"
        table.add_column(column, justify="left" if column in ("attack", "norm", "checks") else "right",
                         no_wrap=column == "attack", min_width=names if column == "attack" else None)
    for r in rows:
        eps = format_eps(r.eps, r.norm)
        table.add_row(escape(r.attack), r.norm, eps, str(r.steps or ""), f"{r.clean_top1:.2%}", f"{r.adv_top1:.2%}",
                      f"{r.images_per_s:,.0f}", "[red]FAIL[/red]" if r.flags else "ok")
    console.print(table)
    code = print_flags(flag_lines(rows), allow=allow_flags)
    if timing is not None:
        console.print(timing.time_split(), markup=False)
    console.print(f"results appended to {out}", markup=False)
    return code


def run(args: argparse.Namespace) -> int:
    from robust_enc.runtime.distributed import is_main_process

    config = config_from_args(args)
    args.kept_in = str(results_path(config))
    last: dict[str, BatchReport] = {}  # the last batch's report says where the time went
    rows = evaluate(config, on_batch=lambda report: last.update(report=report))
    if rows and is_main_process():
        return _show(rows, args.kept_in, last.get("report"), allow_flags=args.allow_flags)
    return EXIT_OK
