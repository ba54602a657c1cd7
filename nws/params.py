"""Entry-point parameters declared once, as dataclass fields with help text; the CLI, the
MLproject file (checked by a test) and the MLflow params all follow these declarations."""

from __future__ import annotations

import os
from dataclasses import field
from pathlib import Path
from typing import Any

from nws.errors import ParameterError

TRUE_WORDS = {"1", "true", "yes", "on"}
FALSE_WORDS = {"0", "false", "no", "off"}


def param(default: Any, help: str) -> Any:
    """A dataclass field whose help text the CLI shows."""
    return field(default=default, metadata={"help": help})


def parse_bool(name: str, text: str | bool) -> bool:
    if isinstance(text, bool):
        return text
    word = str(text).strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise ParameterError(name, f"{text!r} is not a boolean (true/false)")


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
