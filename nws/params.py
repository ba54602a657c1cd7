"""Entry-point parameters declared once, as dataclass fields with help text; the CLI, the
MLproject file (checked by a test) and the MLflow params all follow these declarations."""

from __future__ import annotations

from dataclasses import field
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
