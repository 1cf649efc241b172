"""Reading a scenario: YAML file -> ``--set`` overrides -> validated :class:`~config.schema.Scenario`,
and the check that its data files are present and genuine."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from config.build import from_plain
from config.errors import ScenarioError, show
from config.overrides import apply_overrides
from config.schema import Scenario
from medformer import data as mdata


def scenario_from_dict(d: Mapping[str, Any]) -> Scenario:
    """Validate a plain dict (as from YAML) into a :class:`Scenario`.

    Raises:
        ScenarioError: listing every problem found, each naming its field path.
    """
    return from_plain(Scenario, d)


def load_scenario(path: str | os.PathLike, overrides: Iterable[str] = ()) -> Scenario:
    """Read a scenario YAML file, apply ``--set`` overrides, and validate it.

    Args:
        path: the YAML file.
        overrides: ``dotted.key=value`` strings applied after reading, before validation.

    Raises:
        ScenarioError: unreadable file, YAML syntax error, a top level that is not a mapping,
            a bad override, or any schema problem (all reported at once).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ScenarioError(f"{path}: cannot read scenario file ({e})") from e
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        what = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ScenarioError(f"{path}: invalid YAML{where}: {what}") from e
    if not isinstance(raw, dict):
        got = "an empty file" if raw is None else show(raw)
        raise ScenarioError(f"{path}: expected a mapping of scenario fields at top level, "
                            f"got {got}")
    return scenario_from_dict(apply_overrides(raw, overrides))


def check_data_files(scenario: Scenario, data_dir: str | os.PathLike | None = None) -> None:
    """Check that every ``(dataset, size)`` file of the scenario exists and matches its MD5.

    Every file is checked before raising; the first failure is raised (its message names the
    file) with the other failures attached as notes.

    Raises:
        medformer.data.DataError: a file is missing or fails its checksum.
    """
    root = mdata.resolve_data_dir(data_dir)
    errors = []
    for flag, size in scenario.datasets():
        try:
            mdata.dataset_path(flag, size, root, download=False, verify=True)
        except mdata.DataError as e:
            errors.append(e)
    if errors:
        for other in errors[1:]:
            errors[0].add_note(f"also: {other}")
        raise errors[0]
