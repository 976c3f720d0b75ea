"""``robust-enc`` command line. Each subcommand is a module of this package with ``add_arguments(parser)`` +
``run(args) -> int`` that parses arguments into a stage's config, calls the stage and renders what it returns; this
module only wires them up, sets up logging and turns user errors, Ctrl-C and SIGTERM into one line on stderr and the
exit codes of ``cli.common`` (0 ok, 2 user error, 3 sanity flags, 130 Ctrl-C, 143 SIGTERM). A command that writes
results sets ``args.kept_in`` (where they go) for that line."""

from __future__ import annotations

import argparse
import importlib
import re
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import NoReturn

from robust_enc.cli.common import EXIT_SIGINT, EXIT_SIGTERM, EXIT_USER_ERROR
from robust_enc.errors import UserError

# subcommand -> (module with add_arguments/run, one-line help). Modules are imported lazily: --help stays fast.
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("robust_enc.cli.train", "train a model with a regularizer spec (baseline, enc, cutmix, ...)"),
    "attack": ("robust_enc.cli.attack", "run FGSM/PGD/... through ART over a data set, with an eps sweep"),
    "gbr": ("robust_enc.cli.gbr", "measure the Generalization Bound Regularizer (paper eq. 18) of a model"),
    "report": ("robust_enc.cli.report", "Table 3-style leaderboard, correlation with GBR, plots"),
    "cache": ("robust_enc.cli.cache", "decode an image data set's evaluation images once into a memory-mapped cache"),
    "reproduce": ("robust_enc.cli.reproduce", "the whole Table 3 study in one command (train, gbr, attack, report)"),
    "checkpoint": ("robust_enc.cli.checkpoint", "convert trusted older robust-enc checkpoints to the safe format"),
    "models": ("robust_enc.cli.listing", "list the model zoo"),
    "datasets": ("robust_enc.cli.listing", "list the data sets"),
}


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad command line is one line (what was wrong, where the help is) and exit 2, like every other
    user error; subcommand parsers inherit it."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"robust-enc: error: {message} (see '{self.prog} --help')\n")


# "--eps -1/255": argparse reads a value that starts with "-" and is not a plain negative number as an option, and
# answers "expected one argument". Attached to its option ("--eps=-1/255"), the value reaches the option's own check,
# which says what is wrong with it.
_DASHED_VALUE = re.compile(r"^-[\d.]")


def _attach_dashed_values(argv: list[str]) -> list[str]:
    out: list[str] = []
    for item in argv:
        if out and _DASHED_VALUE.match(item) and out[-1].startswith("--") and "=" not in out[-1]:
            out[-1] = f"{out[-1]}={item}"
        else:
            out.append(item)
    return out


def build_parser() -> argparse.ArgumentParser:
    import robust_enc

    parser = _Parser(prog="robust-enc", description=robust_enc.__doc__)
    parser.add_argument("--version", action="version", version=f"robust-enc {robust_enc.__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="robust-enc's INFO lines too (epoch metrics, time splits, files written)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module_name, _command=name)
        importlib.import_module(module_name).add_arguments(p)
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised wherever the program is, as Ctrl-C is: the same clean-ups run (a temp file removed, a report
    folder swap undone), so nothing is left half-written."""


@contextmanager
def _sigterm_raises() -> Iterator[None]:
    def stop(signum: int, frame: object) -> NoReturn:
        raise Terminated

    if threading.current_thread() is not threading.main_thread():  # handlers can only be set there
        yield
        return
    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _stopped(err: KeyboardInterrupt, args: argparse.Namespace | None) -> int:
    kept_in = getattr(args, "kept_in", "")
    where = f" in {kept_in}" if kept_in else ""
    if isinstance(err, Terminated):
        print(f"robust-enc: stopped by SIGTERM; results written so far are kept{where}; rerun the command to resume",
              file=sys.stderr)
        return EXIT_SIGTERM
    print(f"robust-enc: interrupted; finished results are kept{where}, rerun to resume", file=sys.stderr)
    return EXIT_SIGINT


def main(argv: Sequence[str] | None = None) -> int:
    with _sigterm_raises():
        return _main(argv)


def _main(argv: Sequence[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    args = None
    try:
        parser = build_parser()
        args = parser.parse_args(_attach_dashed_values(argv))
        if not args.command:
            parser.print_help()
            return EXIT_USER_ERROR
        from robust_enc.runtime.distributed import is_main_process
        from robust_enc.runtime.progress import display, setup_logging

        main_process = is_main_process()
        setup_logging(verbose=args.verbose, main_process=main_process)
        _join_process_group(args)
        with display(show=main_process and sys.stderr.isatty()):
            return int(importlib.import_module(args._module).run(args) or 0)
    except UserError as err:
        if debug:
            raise
        print(f"robust-enc: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except OSError as err:  # a path the user gave that cannot be read or written (a file where a folder must be, ...)
        if debug:
            raise
        print(f"robust-enc: error: {err}; check the paths given (--debug shows where)", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt as err:  # Ctrl-C, or SIGTERM (Terminated)
        return _stopped(err, args)
    finally:
        if "torch.distributed" in sys.modules:  # never import torch just to find nothing to leave
            from robust_enc.runtime.distributed import cleanup

            cleanup()


def _join_process_group(args: argparse.Namespace) -> None:
    """Under torchrun (WORLD_SIZE > 1), join the process group once for the whole command: every stage (each
    training and evaluation of ``reproduce``) reuses it, and ``main`` leaves it at the end."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not hasattr(args, "device"):
        return
    from robust_enc.runtime.device import resolve_device
    from robust_enc.runtime.distributed import init_distributed

    init_distributed(resolve_device(args.device))

