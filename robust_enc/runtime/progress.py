"""Logging and the one progress display every stage reports to.

A stage opens a ``task`` per unit of work it counts (the study's models, a run's epochs, an epoch's batches, an
evaluation's images) and advances it; tasks opened inside another nest under it. Where the progress shows:

- on a terminal, inside ``display()`` (the CLI opens it around every command), and only on rank 0: nested rich bars
  on stderr (count, elapsed time, ETA and the task's own text, e.g. the loss or the running robust accuracy); log
  records print above the bars;
- otherwise (a pipe, a log file, library calls): a timestamped INFO line per running task every ``LINE_EVERY_S``
  seconds. What a stage finishes (an epoch's metrics, an evaluation's time split) it logs at INFO itself: shown with
  ``-v``.

``setup_logging`` gives every line a timestamp, shows these progress lines and robust-enc's warnings (its INFO lines
with ``-v``), keeps third-party loggers (ART, timm, matplotlib) at WARNING even with ``-v``, and lets only rank 0 of a
``torchrun`` job log below WARNING.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Iterator
from typing import Any

log = logging.getLogger(__name__)

LINE_EVERY_S = 60.0  # seconds between a running task's lines when there are no bars
EPS_K_TOL = 1e-9  # eps * 255 this close to an integer k >= 1 is shown as "k/255"
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
DATE_FORMAT = "%Y-%m-%d %H:%M:%S"

_bars: Any = None  # the rich Progress while ``display()`` shows bars
_open: list[Task] = []  # open tasks, outermost first: a new task nests under the last


def format_eps(eps: float, norm: str = "linf") -> str:
    """An eps as every rendered place shows it: Linf multiples of 1/255 (within ``EPS_K_TOL``) as "16/255", anything
    else as the float with the digits it needs ("0.03", "1e-30", "0.123457"; never rounded to "0")."""
    eps = float(eps)
    k = eps * 255
    if norm == "linf" and k >= 0.5 and abs(k - round(k)) <= EPS_K_TOL:
        return f"{round(k)}/255"
    if eps != eps or eps in (float("inf"), float("-inf")):
        return str(eps)
    for digits in (4, 6, 9):  # the shortest of these that reads back as eps (to 1e-9 relative), else repr's digits
        text = f"{eps:.{digits}g}"
        if abs(float(text) - eps) <= 1e-9 * abs(eps):
            return text
    return repr(eps)


class _Handler(logging.Handler):
    """Writes to the current ``sys.stderr`` (resolved per record), or above the bars while they show."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
            if _bars is not None:
                _bars.console.print(text, markup=False, highlight=False, soft_wrap=True)
            else:
                sys.stderr.write(text + "\n")
                sys.stderr.flush()
        except Exception:  # a logging failure must not end the run (logging.Handler's own convention)
            self.handleError(record)


def setup_logging(*, verbose: bool = False, main_process: bool = True) -> None:
    """On rank 0 the progress lines at INFO and robust-enc's other loggers at WARNING (INFO with ``verbose``); WARNING
    on the other ranks and for every other logger. Like ``logging.basicConfig``, the handler is added only where the
    application has none on the root logger yet (a program that configured logging, or pytest, keeps its own)."""
    root = logging.getLogger()
    if not root.handlers:
        handler = _Handler()
        handler.setFormatter(logging.Formatter(FORMAT, DATE_FORMAT))
        root.addHandler(handler)
        root.setLevel(logging.WARNING)
    logging.getLogger("robust_enc").setLevel(logging.INFO if verbose and main_process else logging.WARNING)
    log.setLevel(logging.INFO if main_process else logging.WARNING)


@contextlib.contextmanager
def display(*, show: bool) -> Iterator[None]:
    """Nested bars for the block when ``show`` (the CLI passes: stderr is a terminal and this is rank 0)."""
    global _bars
    if not show or _bars is not None:
        yield
        return
    from rich.console import Console

    _bars = _progress(Console(stderr=True))
    _bars.start()
    try:
        yield
    finally:
        _bars.stop()
        _bars = None


def _progress(console: Any) -> Any:
    """The bars' columns, laid out for the console's width: the count, times and ETA never wrap or shrink (they are
    what a reader looks for); the description and the task's text give way first, cut with "…" at the end, and the
    bar takes what is left (at least 10 characters)."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.table import Column

    def fixed() -> Column:
        return Column(no_wrap=True)

    def flexible(ratio: int) -> Column:
        return Column(no_wrap=True, overflow="ellipsis", ratio=ratio, min_width=8)

    return Progress(TextColumn("{task.description}", table_column=flexible(2)),
                    BarColumn(bar_width=None, table_column=Column(ratio=1, min_width=10)),
                    MofNCompleteColumn(table_column=fixed()), TimeElapsedColumn(table_column=fixed()),
                    TextColumn("eta", table_column=fixed()), TimeRemainingColumn(table_column=fixed()),
                    TextColumn("{task.fields[info]}", table_column=flexible(2)),
                    console=console, transient=True, expand=True)


class Task:
    """One counted unit of work: a bar while ``display`` shows, else a log line every ``LINE_EVERY_S`` seconds."""

    def __init__(self, description: str, total: int, completed: int = 0) -> None:
        self.description, self.total, self.completed, self.info = description, total, completed, ""
        self.depth = len(_open)
        self.started = self.last_line = time.monotonic()
        self.done_before = completed  # resumed work: not counted in the rate
        self._bar = None
        if _bars is not None:
            from rich.markup import escape  # descriptions hold run ids: the user's text, not markup

            self._bar = _bars.add_task("  " * self.depth + escape(description), total=total, completed=completed,
                                       info="")

    def update(self, *, advance: int = 0, completed: int | None = None, info: str | None = None) -> None:
        """Count ``advance`` more (or set ``completed``) and replace the task's text (``info``)."""
        self.completed = completed if completed is not None else self.completed + advance
        if info is not None:
            self.info = info
        if self._bar is not None and _bars is not None:
            from rich.markup import escape

            _bars.update(self._bar, completed=self.completed, info=escape(self.info))
            return
        now = time.monotonic()
        if now - self.last_line >= LINE_EVERY_S:
            self.last_line = now
            log.info("%s", self.line(now))

    def line(self, now: float) -> str:
        """"<description>: done/total, rate, eta, info" for the log."""
        elapsed = now - self.started
        rate = (self.completed - self.done_before) / elapsed if elapsed > 0 else 0.0
        eta = f", eta {(self.total - self.completed) / rate:.0f} s" if rate > 0 and self.total else ""
        info = f", {self.info}" if self.info else ""
        return f"{self.description}: {self.completed}/{self.total}{eta}{info}"

    def close(self) -> None:
        if self._bar is not None and _bars is not None:
            _bars.remove_task(self._bar)
        self._bar = None


@contextlib.contextmanager
def task(description: str, total: int, *, completed: int = 0, show: bool = True) -> Iterator[Task]:
    """A ``Task`` for the block, nested under the tasks already open; ``show=False`` (other ranks) counts silently."""
    current = Task(description, total, completed) if show else _Silent(description, total, completed)
    _open.append(current)
    try:
        yield current
    finally:
        _open.remove(current)
        current.close()


class _Silent(Task):
    """A task that shows nothing (ranks other than 0)."""

    def __init__(self, description: str, total: int, completed: int = 0) -> None:
        self.description, self.total, self.completed, self.info, self._bar = description, total, completed, "", None

    def update(self, *, advance: int = 0, completed: int | None = None, info: str | None = None) -> None:
        self.completed = completed if completed is not None else self.completed + advance
