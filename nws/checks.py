"""Checks of a value that end in one line naming the parameter (`ParameterError`): used by the
commands' validation, and by the few library functions that must refuse a value themselves
(an Optuna journal file that cannot be written, `nws.campaign.storage`)."""

from __future__ import annotations

import os
from pathlib import Path

from nws.errors import ParameterError


def at_least(name: str, value: float, low: float) -> None:
    if value < low:
        raise ParameterError(name, f"{value} is below {low}")


def writable_directory(name: str, path: str | Path) -> Path:
    """A directory the entry point will write into (made if missing): refuse it now, in one line
    naming the parameter, when it or the nearest part of it that exists is not a directory or
    cannot be written, rather than fail with a traceback once the work is done."""
    path = Path(path).expanduser()
    existing = path
    while not os.path.lexists(existing) and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ParameterError(name, f"{existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ParameterError(name, f"{existing} is not writable")
    return path
