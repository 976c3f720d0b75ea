"""``robust-enc models`` and ``robust-enc datasets``: the model zoo and the data sets, one table each."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """No options: the command's name says which registry to list."""


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    if args._command == "models":
        from robust_enc.models import MODELS as registry
    else:
        from robust_enc.data import DATASETS as registry
    table = Table(title=f"robust-enc {args._command}")
    table.add_column("name")
    table.add_column("description")
    for entry in registry.entries():
        table.add_row(entry.name + (":<arg>" if entry.takes_argument else ""), entry.help)
    Console().print(table)
    return 0
