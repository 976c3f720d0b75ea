"""``robust-enc reproduce``: the paper's Table 3 study in one command (train, gbr, attack, report)."""

from __future__ import annotations

import argparse
from pathlib import Path

from robust_enc.cli.common import EXIT_OK, add_allow_flags_argument, print_flags
from robust_enc.errors import UserError
from robust_enc.reproduce import PRESET_NAMES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="quick",
                        help=f"{', '.join(PRESET_NAMES)} or a preset .json file (default: quick, on embedded data)")
    parser.add_argument("--out", type=Path, default=None, help="study folder (default: reports/<preset>)")
    parser.add_argument("--seeds", default=None, help="comma-separated seeds, overriding the preset's (e.g. 0,1,2)")
    parser.add_argument("--rows", default=None,
                        help="only these rows of the preset, separated by commas (e.g. baseline,enc)")
    parser.add_argument("--epochs", type=int, default=None, help="override the preset's training epochs")
    parser.add_argument("--data-dir", default=None, help="folder holding the data set files")
    parser.add_argument("--workers", type=int, default=None, help="DataLoader worker processes")
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:N")
    add_allow_flags_argument(parser)


def run(args: argparse.Namespace) -> int:
    import dataclasses

    from rich.console import Console
    from rich.markup import escape

    from robust_enc.reports.terminal import print_table3
    from robust_enc.reports.threats import select_threats, threat_columns
    from robust_enc.reproduce import load_preset, plan, reproduce, sanity_flags, sweep_plan
    from robust_enc.runtime.distributed import is_main_process

    preset = load_preset(args.preset)
    if args.seeds:
        try:
            preset = dataclasses.replace(preset, seeds=tuple(int(s) for s in args.seeds.split(",")))
        except ValueError:
            raise UserError(f"--seeds {args.seeds!r}: give integers separated by commas, e.g. 0,1,2") from None
    if args.rows:
        rows = tuple(r.strip() for r in args.rows.split(",") if r.strip())
        missing = [r for r in rows if r not in preset.rows]
        if missing:
            raise UserError(f"--rows {missing} are not rows of preset {preset.name}: {', '.join(preset.rows)}")
        preset = dataclasses.replace(preset, rows=rows)
    out = args.out or Path("reports") / preset.name
    args.kept_in = str(out)
    pairs = plan(preset, out, device=args.device, data_dir=args.data_dir, epochs=args.epochs)  # bad settings fail first
    sweep_plan(preset, out, device=args.device, data_dir=args.data_dir, epochs=args.epochs)
    if is_main_process():
        Console(stderr=True).print(f"[bold]robust-enc reproduce[/] preset [cyan]{escape(preset.name)}[/]: "
                                   f"{escape(preset.description)}")
    report, written = reproduce(preset, out, device=args.device, data_dir=args.data_dir, epochs=args.epochs,
                                workers=args.workers)
    if report is None:  # not rank 0: that one prints
        return EXIT_OK
    # The terminal gets the paper's view: FGSM (Table 3's attack) at every eps; the report has every attack.
    fgsm = any(t.attack == "fgsm" for _, t in threat_columns(report.full_table3))
    view = select_threats(report.full_table3, attack="fgsm") if fgsm else report.tables["table3"]
    print_table3(view, f"Table 3 view: clean and {'FGSM' if fgsm else 'adversarial'} top-1 (%), difference to the "
                       "baseline, GBR")  # fits the terminal (COLUMNS); the files hold the whole table
    print(f"report: {written['index.html']}, {written['index.md']}  (tables: {out / 'report' / 'table3.md'}, "
          f"plots: {out / 'report' / 'plots'})")
    return print_flags(sanity_flags(pairs), allow=args.allow_flags)  # one panel for the whole study
