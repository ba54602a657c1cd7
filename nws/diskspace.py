"""A full disk, told as a full disk: from whatever error a write that found no space ended in
(an OSError deep in a chain, SQLite's "database or disk is full", numpy's short write, Optuna's
"Should not reach" on the way out), one line that names the full filesystem by a path the user
gave, and the traceback in a file instead of on the terminal.
"""

from __future__ import annotations

import errno
import os
import re
import tempfile
import traceback
from collections.abc import Iterable, Iterator
from pathlib import Path

FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
FULL_MESSAGES = re.compile(
    r"no space left on device|database or disk is full|disk quota exceeded|\d+ requested and \d+ written",
    re.IGNORECASE,
)
NEARLY_FULL_BYTES = 1 << 20
"""A filesystem with less free than this is the one that filled (a write that failed needed more)."""


def _chain(error: BaseException) -> Iterator[BaseException]:
    """The error and every error it was raised from or during, each once."""
    seen: set[int] = set()
    todo = [error]
    while todo:
        e = todo.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [c for c in (e.__cause__, e.__context__, getattr(e, "orig", None)) if c is not None]


def is_disk_full(error: BaseException) -> bool:
    """Whether a write that found no space is somewhere in the error's chain."""
    for e in _chain(error):
        if isinstance(e, OSError) and e.errno in FULL_ERRNOS:
            return True
        if FULL_MESSAGES.search(str(e)):
            return True
    return False


def full_path(error: BaseException, candidates: Iterable[str]) -> str:
    """The path (a file named in the error, else one of `candidates`: the paths the command was
    given) whose filesystem has (almost) no space left; "" when none is found."""
    named = [str(e.filename) for e in _chain(error) if isinstance(e, OSError) and e.filename]
    for path in [*named, *candidates]:
        free = _free_bytes(path)
        if free is not None and free < NEARLY_FULL_BYTES:
            return path
    return named[0] if named else ""


def _free_bytes(path: str) -> int | None:
    """Free bytes (for an unprivileged writer) on the filesystem of `path` or its nearest
    existing parent; None when there is no such path."""
    p = Path(path).expanduser()
    while not p.exists():
        if p.parent == p:
            return None
        p = p.parent
    try:
        stats = os.statvfs(p)
    except OSError:
        return None
    return stats.f_bavail * stats.f_frsize


def saved_traceback(prog: str, error: BaseException) -> str:
    """The error's traceback in a log file of its own (on the first filesystem with room);
    the file's path, or "" when nothing could be written anywhere."""
    text = "".join(traceback.format_exception(error))
    name = f"{prog.replace(' ', '-')}-{os.getpid()}.log"
    for folder in (tempfile.gettempdir(), os.getcwd(), str(Path.home())):
        path = Path(folder) / name
        try:
            path.write_text(text)
            return str(path)
        except OSError:
            continue
    return ""


def message(prog: str, error: BaseException, candidates: Iterable[str]) -> str:
    """The one line for a full disk, the traceback kept in a file that the line names."""
    where = full_path(error, candidates)
    line = f"no space left on device while writing {where}" if where else "no space left on device"
    log = saved_traceback(prog, error) or "no file: no room for one"
    return f"{line} (free some space and run the same command again; traceback in {log})"
