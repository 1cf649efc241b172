"""The hospital sites of a loopback deployment: parsed from ``dataset@size`` items or a scenario's
hospitals, and the ``--node-config`` each SuperNode is started with."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

from config import Site

_SITE_RE = re.compile(r"^(?:(?P<name>[A-Za-z0-9_-]+)=)?(?P<dataset>[a-z0-9]+)(?:@(?P<size>\d+))?$")


def node_config(site: Site, data_dir: str | os.PathLike) -> str:
    """A site's ``--node-config`` value: TOML values, strings quoted (Flower strips the quotes)."""
    return (f"name={json.dumps(site.name)} dataset={json.dumps(site.dataset)} size={site.size} "
            f"data-dir={json.dumps(str(data_dir))}")


def parse_site(text: str) -> Site:
    """``dataset``, ``dataset@size`` or ``name=dataset@size`` -> Site (checked against MedMNIST)."""
    m = _SITE_RE.match(text.strip())
    if not m:
        raise ValueError(f"bad site {text!r}: use dataset@size, e.g. breastmnist@28 or breast=breastmnist@28")
    from medformer.data import DataError, get_info  # the registry (medmnist.INFO); no Flower import

    dataset, size = m["dataset"], int(m["size"] or 28)
    try:
        info = get_info(dataset)
    except DataError as e:
        raise ValueError(f"site {text!r}: {e}") from None
    if size not in info.sizes:
        raise ValueError(f"site {text!r}: size {size} is not available for {dataset}; choose from {info.sizes}")
    name = m["name"] or (dataset if size == 28 else f"{dataset}-{size}")
    return Site(name, dataset, size)


def sites_from_scenario(path: str | os.PathLike) -> list[Site]:
    """The hospitals of a scenario file, one site each (partitioned hospitals are not sites)."""
    from config import load_scenario  # the schema reads medmnist.INFO; only when a scenario is given

    scenario = load_scenario(Path(path))
    partitioned = [h.name for h in scenario.hospitals if h.partition is not None]
    if partitioned:
        raise ValueError(f"{path}: hospitals {partitioned} are partitioned; a deployment runs one SuperNode "
                         "per site: list each site as its own hospital")
    return [Site(h.name, h.dataset, h.size) for h in scenario.hospitals]


def check_unique(sites: list[Site]) -> None:
    names = [s.name for s in sites]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"two sites share the name(s) {dup}: give them names with name=dataset@size")
