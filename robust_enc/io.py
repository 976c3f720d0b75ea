"""Atomic file writes: results, checkpoints and reports are never left half-written.

A write goes to ``.NAME.robust-enc-<pid>-<random>.tmp`` beside its target and is renamed into place. A writer killed
in between (kill -9, power loss) leaves that file behind; the first write of a later process into the folder removes
the temp files that carry this marker and whose writer is gone (its pid no longer runs on this machine). Nothing else
is ever removed: not a user's own ``.x.tmp`` folder, however old, nor a temp file whose pid runs again (pids get
reused: it stays until that process ends). The pid is judged on this machine: on a file system shared by several
machines, don't write into one folder from two of them at once (the file lock of ``locked`` is per machine too on
many network file systems)."""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, TypeVar

T = TypeVar("T")

TEMP_MARKER = "robust-enc"  # in every temp name this suite writes, with the writer's pid
_TEMP_NAME = re.compile(rf"^\..+\.{TEMP_MARKER}-(\d+)-[a-z0-9_]{{8}}\.tmp$")  # mkstemp's 8-character random part
_swept: set[Path] = set()  # folders this process has swept already


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()  # what open() would give; mkstemp's 0600 would hide results from other users
_DIR_MODE = 0o777 & ~_umask()


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def temp_prefix(name: str) -> str:
    """The start of a temp name for ``name`` (``mkstemp``/``mkdtemp`` add the random part and ``.tmp``): hidden, and
    marked as this suite's with this process's pid, so that ``sweep_stale_temps`` can tell it from anyone else's."""
    return f".{name}.{TEMP_MARKER}-{os.getpid()}-"


def sweep_stale_temps(folder: Path) -> list[Path]:
    """Remove the temp files (and temp report folders) of dead writers in ``folder``: names that carry this suite's
    marker (``temp_prefix``) and a pid that no longer runs. Returns what was removed."""
    removed = []
    try:
        entries = list(folder.iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = _TEMP_NAME.match(entry.name)
        if not match:
            continue
        pid = int(match.group(1))
        if pid == os.getpid() or _pid_running(pid):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def prepare_folder(folder: Path) -> None:
    """Create ``folder`` and, the first time this process writes there, sweep dead writers' temp files."""
    folder.mkdir(parents=True, exist_ok=True)
    resolved = folder.resolve()
    if resolved not in _swept:
        _swept.add(resolved)
        sweep_stale_temps(folder)


def write_atomic(path: str | Path, write: Callable[[IO], None], *, binary: bool = False) -> Path:
    """Call ``write(f)`` on a temporary file in the target folder, fsync, then rename over ``path``."""
    path = Path(path)
    prepare_folder(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path.name), suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8", "newline": ""})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    return write_atomic(path, lambda f: f.write(text))


def replace_folder_atomic(folder: str | Path, fill: Callable[[Path], T]) -> T:
    """Call ``fill(tmp)`` on a fresh temporary folder beside ``folder``, then put it in ``folder``'s place; an error
    (a full disk, ...) leaves the previous ``folder`` as it was and no temporary folder behind. The swap is two renames:
    an exception between them (SIGTERM) puts the previous folder back; a kill -9 leaves both under temp names."""
    folder = Path(folder)
    prepare_folder(folder.parent)
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(folder.name), suffix=".tmp", dir=folder.parent))
    try:
        os.chmod(tmp, _DIR_MODE)
        result = fill(tmp)
        if folder.exists():
            old = Path(tempfile.mkdtemp(prefix=temp_prefix(folder.name), suffix=".tmp", dir=folder.parent))
            try:
                os.replace(folder, old)  # an empty folder is replaced by rename
                os.replace(tmp, folder)
            except BaseException:
                if not folder.exists():  # stopped between the renames: the previous folder goes back
                    os.replace(old, folder)
                raise
            finally:
                shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return result


@contextmanager
def locked(path: str | Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``.NAME.lock`` beside ``path`` for a read-modify-write of ``path``: concurrent
    processes on this machine take turns (the lock file stays; it is empty)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
