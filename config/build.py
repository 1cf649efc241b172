"""Typed dataclasses from plain data (YAML, JSON), collecting every problem with its field path.

The schema's dataclasses are filled field by field: types from their annotations (``int``,
``float``, ``bool``, ``str``, ``Literal``, optional, lists, ``dict[str, X]``, nested dataclasses),
numeric bounds and registry choices from field metadata (``medformer.settings.setting``), then each
dataclass's own ``_check`` for cross-field rules. Unknown keys are errors, with a suggestion.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
from collections.abc import Mapping
from dataclasses import MISSING
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

from config.errors import ScenarioError, did_you_mean, join, show, type_name

T = TypeVar("T")
# PyYAML follows YAML 1.1, where `1e-3` (no dot) is a string; accept it where a float is expected.
_EXP_FLOAT_RE = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+")


class _Bad:
    """Marker for a value that failed validation (its problem is already recorded)."""


_BAD = _Bad()


def _choose(value: Any, choices: tuple[str, ...], path: str, problems: list[str]) -> Any:
    """``value`` if it is one of ``choices`` (a Literal's or a registry's names), else a problem."""
    if isinstance(value, str) and value in choices:
        return value
    problems.append(f"{path}: expected one of {', '.join(map(repr, choices))}, got "
                    f"{show(value)}{did_you_mean(value, choices)}")
    return _BAD


def _check_bounds(value: float, bounds: tuple, path: str, problems: list[str]) -> bool:
    ge, gt, le, lt = bounds
    parts = []
    if ge is not None:
        parts.append(f">= {ge}")
    if gt is not None:
        parts.append(f"> {gt}")
    if le is not None:
        parts.append(f"<= {le}")
    if lt is not None:
        parts.append(f"< {lt}")
    ok = ((ge is None or value >= ge) and (gt is None or value > gt)
          and (le is None or value <= le) and (lt is None or value < lt))
    if not ok:
        problems.append(f"{path}: must be {' and '.join(parts)}, got {show(value)}")
    return ok


def _build(tp: Any, value: Any, path: str, problems: list[str]) -> Any:
    """Convert ``value`` to type ``tp``; on failure record a problem and return ``_BAD``."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        rest = tuple(a for a in args if a is not type(None))
        if set(rest) == {int, float}:
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            return _build(float, value, path, problems)
        if len(rest) == 1:
            return _build(rest[0], value, path, problems)
        if set(rest) <= {bool, int, float, str}:  # any scalar (``model.overrides``): kept as YAML typed it
            if type(value) in rest:
                return value
            problems.append(f"{path}: expected {' or '.join(map(type_name, rest))}, got {show(value)}")
            return _BAD
        raise TypeError(f"unsupported schema type {tp}")  # a bug in the schema, not the YAML
    if origin is Literal:
        return _choose(value, get_args(tp), path, problems)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, str) and _EXP_FLOAT_RE.fullmatch(value.strip()):
            value = float(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                number = float(value)
            except OverflowError:
                number = math.inf
            if math.isfinite(number):
                return number
            problems.append(f"{path}: expected a finite number, got {show(value)}")
            return _BAD
    elif tp is str:
        if isinstance(value, str):
            return value
    elif dataclasses.is_dataclass(tp):
        return _build_dataclass(tp, value, path, problems)
    elif origin is dict:
        return _build_dict(tp, value, path, problems)
    elif origin is list:
        if not isinstance(value, (list, tuple)):
            problems.append(f"{path}: expected a list, got {show(value)}")
            return _BAD
        items = [_build(get_args(tp)[0], v, join(path, i), problems) for i, v in enumerate(value)]
        return _BAD if any(x is _BAD for x in items) else items
    else:
        raise TypeError(f"unsupported schema type {tp}")
    problems.append(f"{path}: expected {type_name(tp)}, got {show(value)}")
    return _BAD


def _build_dict(tp: Any, value: Any, path: str, problems: list[str]) -> Any:
    if not isinstance(value, Mapping):
        problems.append(f"{path}: expected a mapping, got {show(value)}")
        return _BAD
    out, bad = {}, False
    for key, v in value.items():
        if not isinstance(key, str):
            problems.append(f"{join(path, key)}: keys must be strings, got {show(key)}")
            bad = True
            continue
        out[key] = _build(get_args(tp)[1], v, join(path, key), problems)
        bad |= out[key] is _BAD
    return _BAD if bad else out


def _build_dataclass(cls: type, value: Any, path: str, problems: list[str]) -> Any:
    where = path or "scenario"
    if not isinstance(value, Mapping):
        problems.append(f"{where}: expected a mapping, got {show(value)}")
        return _BAD
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    bad = False
    for key in value:
        if key not in fields:
            problems.append(f"{join(path, key)}: unknown key{did_you_mean(key, fields)}; "
                            f"{where} takes {', '.join(fields)}")
            bad = True
    kwargs = {}
    for name, f in fields.items():
        sub = join(path, name)
        if name not in value:
            if f.default is MISSING and f.default_factory is MISSING:
                problems.append(f"{sub}: missing required field")
                bad = True
            continue
        v = _build(hints[name], value[name], sub, problems)
        bounds, choices = f.metadata.get("bounds"), f.metadata.get("choices")
        if v is not _BAD and v is not None and choices:  # a registry's names (medformer.settings)
            v = _choose(v, tuple(choices()), sub, problems)
        if v is not _BAD and v is not None and bounds:
            v = v if _check_bounds(v, bounds, sub, problems) else _BAD
        kwargs[name] = v
        bad |= v is _BAD
    if bad:
        return _BAD
    obj = cls(**kwargs)
    check = getattr(obj, "_check", None)
    for keys, message in check() if check else ():
        sub = path
        for k in keys:
            sub = join(sub, k)
        problems.append(f"{sub or where}: {message}")
        bad = True
    return _BAD if bad else obj


def from_plain(cls: type[T], value: Any, path: str = "") -> T:
    """``value`` (plain dicts, lists, scalars) as an instance of dataclass ``cls``.

    Raises:
        ScenarioError: listing every problem found, each naming its field path.
    """
    problems: list[str] = []
    out = _build(cls, value, path, problems)
    if problems or out is _BAD:
        raise ScenarioError(problems or [f"{path or 'scenario'}: invalid"])
    return out
