"""``robust-enc checkpoint convert PATH...``: rewrite trusted checkpoints of robust-enc's first format in the safe
one."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    convert = sub.add_parser("convert", help="rewrite trusted checkpoints of robust-enc format 1 in the safe format "
                                             "(reading them unpickles them: only files you trust)")
    convert.add_argument("paths", nargs="+", metavar="PATH", help="checkpoint files or run folders")


def run(args: argparse.Namespace) -> int:
    from robust_enc.checkpoint import CHECKPOINT_NAME, checkpoint_file, convert_checkpoint
    from robust_enc.train.run_folder import EXPORT_NAME

    for given in args.paths:
        folder = Path(given)
        # A run folder's two checkpoint files: the training checkpoint and the exported (baked) model.
        paths = [p for p in (folder / CHECKPOINT_NAME, folder / EXPORT_NAME) if p.is_file()] if folder.is_dir() \
            else [checkpoint_file(folder)]
        if not paths:
            checkpoint_file(folder)  # raises the usual "no checkpoint" line
        for path in paths:
            print(f"{path}: {'converted' if convert_checkpoint(path) else 'already in the safe format'}")
    return 0
