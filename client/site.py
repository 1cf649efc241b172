"""Who this hospital is, and its training records, free of Flower types.

The identity comes from the node's own configuration in a deployment (``dataset``, ``data-dir``,
optional ``size``, ``name`` and ``device``, plus the privacy-policy keys of ``client.policy``), or, in
simulation, from the scenario's site list picked by the node's ``partition-id``. A site's own
configuration always wins over what the server suggests: its data and dataset are its own to say.

A ``dataset`` may be one of the site's own imported datasets (``medfl data import``): the dataset
cards in its data folder are registered before the name is looked up.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
from functools import lru_cache

from client.policy import POLICY_KEYS
from config import Site, from_plain
from medformer.data import DataError, MedMNISTSplit, get_info, load_split, partition_indices, register_data_dir
from medformer.device import is_device_spec
from protocol import RoundInstructions

#: node-config keys a deployed site may set (identity, then its privacy policy: client.policy).
SITE_KEYS = ("name", "dataset", "size", "data-dir", "device") + POLICY_KEYS
#: keys Flower's simulation engine sets.
SIMULATION_KEYS = ("partition-id", "num-partitions")


class SiteConfigError(ValueError):
    """The node's configuration does not name a usable site (bad dataset, size, data dir or key)."""


def site_from_node_config(node_config: dict, *, roster: dict | None = None) -> Site:
    """Deployment: the node's --node-config names the site. Simulation: partition-id picks one of
    the roster's sites (``{"sites": [...], "seed": ..., "data_dir": ...}``, from discovery)."""
    unknown = sorted(set(node_config) - set(SITE_KEYS) - set(SIMULATION_KEYS))
    if unknown:  # a misspelt privacy key must not silently leave a site unprotected
        close = difflib.get_close_matches(unknown[0], SITE_KEYS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise SiteConfigError(f"unknown node-config key {unknown[0]!r}{hint}; a site's keys are {', '.join(SITE_KEYS)}")
    if "device" in node_config and not is_device_spec(node_config["device"]):
        raise SiteConfigError(f"node-config device={node_config['device']!r} is not auto, cpu, cuda or cuda:N")
    if "dataset" in node_config:
        flag = str(node_config["dataset"])
        data_dir = node_config.get("data-dir")
        if data_dir is not None and not os.path.isdir(str(data_dir)):
            raise SiteConfigError(f"node-config data-dir={data_dir!r} is not a folder")
        try:
            register_data_dir(data_dir)
            info = get_info(flag)
        except DataError as e:
            raise SiteConfigError(f"node-config dataset: {e}") from None
        size = node_config.get("size", 28)
        if not isinstance(size, int) or size not in info.sizes:
            raise SiteConfigError(f"node-config size={size!r} is not available for {flag}; choose from {info.sizes}")
        name = str(node_config.get("name", f"{flag}-{size}" if size != 28 else flag))
        return Site(name, flag, size, data_dir=str(data_dir) if data_dir is not None else None)
    if "partition-id" in node_config and roster is not None:
        pid = int(node_config["partition-id"])
        sites = roster["sites"]
        if not 0 <= pid < len(sites):
            raise SiteConfigError(f"partition-id {pid} but the scenario has {len(sites)} sites")
        site = from_plain(Site, sites[pid], f"roster.sites[{pid}]")
        register_data_dir(roster.get("data_dir"))
        return dataclasses.replace(site, privacy=None, data_dir=roster.get("data_dir"))
    raise SiteConfigError("node-config names no site: start the SuperNode with "
                          '--node-config \'dataset="<flag>" data-dir="<folder>"\'')


def site_for_round(ins: RoundInstructions, node_config: dict) -> Site:
    """This round's site: the node's own config if it names a dataset, else the server's entry."""
    if "dataset" in node_config:
        return site_from_node_config(node_config)
    register_data_dir(ins.data_dir)
    return dataclasses.replace(ins.site, privacy=None, data_dir=ins.data_dir)


def site_device(ins: RoundInstructions, node_config: dict) -> str:
    """Where this site computes: its node-config ``device`` if set, else the server's request."""
    return str(node_config.get("device", ins.device))


@lru_cache(maxsize=4)
def _train_split(dataset: str, size: int, data_dir: str | None) -> MedMNISTSplit:
    return load_split(dataset, "train", size=size, data_dir=data_dir)


def local_data(site: Site, seed: int) -> MedMNISTSplit:
    """The site's training records: its whole train split, or its partition of it."""
    split = _train_split(site.dataset, site.size, site.data_dir)
    if not site.partitioned:
        return split
    parts = partition_indices(split.labels, site.partition_parts, site.partition_method or "iid",
                              site.partition_alpha or 0.5, seed)
    return split.subset(parts[site.partition_index])
