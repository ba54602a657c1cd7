"""User-facing errors: one line, naming the parameter, turned into a non-zero exit by the CLI."""

from __future__ import annotations


class NWSError(Exception):
    """A problem with the user's input or data, reported as one line (no traceback)."""


class ParameterError(NWSError):
    """A parameter has a value outside what it accepts."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(f"{name}: {message}")
        self.name = name


class DataError(NWSError):
    """Data files are missing, unreadable or not in the expected format."""


def one_line(error: BaseException) -> str:
    """An error as one line of text (messages of file parsers may span several)."""
    return f"{type(error).__name__}: {' '.join(str(error).split())}"
