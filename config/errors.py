"""Scenario errors: every problem names its field path, all of them are reported at once, in one line."""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Sequence
from typing import Any

_KEY_RE = re.compile(r"[A-Za-z0-9_-]+")


class ScenarioError(ValueError):
    """Raised when a scenario (file, dict or ``--set`` override) is invalid.

    ``str(err)`` is one line: the first problem (``field.path: what is wrong``), followed by
    ``(and N more: ...)`` when there are several. All problems are in ``err.problems``.
    """

    def __init__(self, problems: Sequence[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        if not self.problems:
            raise ValueError("ScenarioError needs at least one problem")
        message = self.problems[0]
        if len(self.problems) > 1:
            rest = self.problems[1:]
            message += f" (and {len(rest)} more: {'; '.join(rest)})"
        super().__init__(message)


def show(value: Any, limit: int = 60) -> str:
    """Short one-line rendering of a YAML value for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def type_name(tp: Any) -> str:
    """How an error message names a schema type: ``int`` -> "an integer"."""
    return {int: "an integer", float: "a number", bool: "a boolean (true/false)",
            str: "a string"}.get(tp, getattr(tp, "__name__", str(tp)))


def join(path: str, key: Any) -> str:
    """Append one key (dict key, field name or list index) to a field path."""
    if isinstance(key, int) and not isinstance(key, bool):
        return f"{path}[{key}]"
    if isinstance(key, str) and _KEY_RE.fullmatch(key):
        return f"{path}.{key}" if path else key
    return f"{path}[{show(key)}]"


def did_you_mean(word: Any, choices: Iterable[str]) -> str:
    if not isinstance(word, str):
        return ""
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""
