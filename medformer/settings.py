"""Settings dataclass fields that carry their own bounds and choices.

A field made with :func:`setting` keeps its numeric bounds (``ge``, ``gt``, ``le``, ``lt``) and,
for a string, the registry its value must come from (``choices``: a callable returning the valid
names, read when checked, so the registry stays the one source). The scenario schema (``config``)
checks both, with one-line errors naming the field; the library itself only reads the values.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import MISSING, field
from typing import Any


def setting(default: Any = MISSING, *, factory: Any = MISSING, ge: float | None = None, gt: float | None = None,
            le: float | None = None, lt: float | None = None,
            choices: Callable[[], Iterable[str]] | None = None) -> Any:
    """A dataclass field with bounds and/or a registry of valid names in its metadata."""
    metadata: dict[str, Any] = {"bounds": (ge, gt, le, lt)}
    if choices is not None:
        metadata["choices"] = choices
    return field(default=default, default_factory=factory, metadata=metadata)
