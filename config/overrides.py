"""``--set dotted.key=value`` overrides, applied to the plain data of a scenario before validation.

Values are parsed as YAML; the key path is walked along the schema, so a typo is reported with the
keys that exist there.
"""

from __future__ import annotations

import copy
import dataclasses
import types
from collections.abc import Iterable, Mapping
from typing import Any, Union, get_args, get_origin, get_type_hints

import yaml

from config.errors import ScenarioError, did_you_mean, join, show
from config.schema import Scenario


def apply_overrides(d: Mapping[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Return a copy of ``d`` with ``dotted.key=value`` overrides applied.

    Values are parsed as YAML (``training.rounds=2``, ``privacy=null``, ``pretext={mae: 1}``).
    List items are addressed by index (``hospitals.0.size=64``); missing sections are created.

    Raises:
        ScenarioError: for a malformed override or a key path the schema does not have.
    """
    data = copy.deepcopy(dict(d))
    problems = []
    for item in overrides:
        key, sep, text = str(item).partition("=")
        key = key.strip()
        if not key.isprintable():  # keep the error one line: show control characters escaped
            problems.append(f"--set {show(key)}: key has control characters")
            continue
        if not sep or not key:
            problems.append(f"--set {show(item)}: expected dotted.key=value")
            continue
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as e:
            problems.append(f"--set {key}: value {show(text)} is not valid YAML "
                            f"({str(e).splitlines()[0]})")
            continue
        problem = _set_path(data, key.split("."), value)
        if problem:
            problems.append(f"--set {key}: {problem}")
    if problems:
        raise ScenarioError(problems)
    return data


def _unwrap_optional(tp: Any) -> Any:
    """``X | None`` -> ``X``; anything else unchanged."""
    args = [a for a in get_args(tp) if a is not type(None)]
    if get_origin(tp) in (Union, types.UnionType) and len(args) == 1:
        return args[0]
    return tp


def _set_path(data: dict, segments: list[str], value: Any) -> str | None:
    """Set ``value`` at ``segments`` in ``data``, walking the schema; return a problem or None."""
    tp: Any = Scenario
    node: Any = data
    path = ""
    for i, seg in enumerate(segments):
        tp = _unwrap_optional(tp)
        key: Any = seg
        if dataclasses.is_dataclass(tp):
            hints = get_type_hints(tp)
            if seg not in hints:
                return (f"unknown key {show(seg)} in {path or 'scenario'}"
                        f"{did_you_mean(seg, hints)}; choose from {', '.join(hints)}")
            child_tp = hints[seg]
        elif get_origin(tp) is dict:
            child_tp = get_args(tp)[1]
        elif get_origin(tp) is list:
            if not seg.isdigit():
                return f"{path} is a list; expected an index, got {show(seg)}"
            key, child_tp = int(seg), get_args(tp)[0]
            if not isinstance(node, list) or key >= len(node):
                count = len(node) if isinstance(node, list) else 0
                return f"index {key} out of range; {path} has {count} item(s)"
        else:  # unreachable: a scalar is refused before descending into it
            return f"{path} is a single value, not a section"
        if i == len(segments) - 1:
            node[key] = value
            return None
        inner = _unwrap_optional(child_tp)
        if get_origin(inner) is list:
            wants = list
        elif dataclasses.is_dataclass(inner) or get_origin(inner) is dict:
            wants = dict
        else:
            return f"{join(path, key)} is a single value, not a section"
        child = node[key] if isinstance(node, list) else node.get(key)
        if child is None and wants is dict:
            child = node[key] = {}
        if not isinstance(child, wants):
            kind = "a list" if wants is list else "a section"
            return f"{join(path, key)} is {show(child)}, not {kind}"
        node, tp, path = child, child_tp, join(path, key)
    return None
