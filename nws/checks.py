"""Checks of a value that end in one line naming the parameter (`ParameterError`): used by the
commands' validation, and by the few library functions that must refuse a value themselves
(an Optuna journal file that cannot be written, `nws.campaign.storage`)."""

from __future__ import annotations

import math
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nws.errors import ParameterError


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
    try:  # tried for real: os.access says yes to root everywhere, /proc and read-only mounts too
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".nws-write-check-"):
            pass
    except OSError as e:
        raise ParameterError(name, f"{existing} is not writable ({e.strerror or e})") from None
    return path


class Check:
    """What one option accepts: called with the option's name and its parsed value, it returns
    the value or raises `ParameterError`. Declared with the option (`nws.commands.options.param`)
    and applied by the CLI when the value is parsed, so a bad value ends in one line and exit 2
    before anything (a run, an experiment, a trial, a folder) is made, for every entry point."""

    kind = "text"

    def describe(self) -> str:
        """What the option accepts, in words (the generated entry-point reference)."""
        return "text"

    def __call__(self, name: str, value: Any) -> Any:
        if isinstance(value, str) and "\0" in value:
            raise ParameterError(name, "holds a NUL character")
        return value


@dataclass(frozen=True)
class Count(Check):
    """A whole number from `low` (to `high`, when set)."""

    low: int
    high: int | None = None
    kind = "count"

    def describe(self) -> str:
        return f"integer ≥ {self.low}" if self.high is None else f"integer {self.low}..{self.high}"

    def __call__(self, name: str, value: Any) -> Any:
        if value < self.low:
            raise ParameterError(name, f"{value} is below {self.low}")
        if self.high is not None and value > self.high:
            raise ParameterError(name, f"{value} is above {self.high}")
        return value


SEED_MAX = 2**32 - 1
"""The largest seed numpy and scikit-learn take."""


@dataclass(frozen=True)
class Real(Check):
    """A finite number in [low, high] (an end left out when open; None: no bound)."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    kind = "real"

    def interval(self) -> str:
        left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
        low = "-inf" if self.low is None else f"{self.low:g}"
        high = "inf" if self.high is None else f"{self.high:g}"
        return f"{left}{low}, {high}{right}"

    def describe(self) -> str:
        return f"number in {self.interval()}"

    def __call__(self, name: str, value: Any) -> Any:
        if not math.isfinite(value):
            raise ParameterError(name, f"{value} is not a finite number")
        below = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        above = self.high is not None and (value >= self.high if self.high_open else value > self.high)
        if below or above:
            raise ParameterError(name, f"{value} is not in {self.interval()}")
        return value


@dataclass(frozen=True)
class Directory(Check):
    """A directory the entry point writes into (empty: its default), tried for real: it or its
    nearest existing parent must take a new file (`os.access` says yes to root everywhere,
    /proc included)."""

    kind = "directory"

    def describe(self) -> str:
        return "writable directory"

    def __call__(self, name: str, value: Any) -> Any:
        super().__call__(name, value)
        if str(value).strip():
            writable_directory(name, value)
        return value


@dataclass(frozen=True)
class RunId(Check):
    """An MLflow run id (32 hex digits), or empty; whether the run exists is checked where the
    tracking store is known."""

    kind = "run_id"

    def describe(self) -> str:
        return "MLflow run id"

    def __call__(self, name: str, value: Any) -> Any:
        text = str(value).strip()
        if text and not re.fullmatch(r"[0-9a-f]{32}", text):
            raise ParameterError(name, f"{text!r} is not an MLflow run id (32 hex digits)")
        return value


TEXT = Check()
SEED = Count(0, SEED_MAX)
