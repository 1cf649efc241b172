"""Who takes part: wait for SuperNodes, ask each who it is (a ``query`` message), and build the roster.

In simulation the nodes are the scenario's sites (each picks its entry of the roster by its
``partition-id``); in a deployment nobody lists them: each SuperNode's own node-config says which
dataset it holds, and the federation is built for exactly the sites that answer. A site holding its
own imported images sends its dataset card's public part, which the server registers (it has no
files of it: central evaluation of that dataset is then skipped).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from config import Scenario, Site, from_plain
from medformer.data import DataError, register_public
from protocol import CONFIG, DATASET_CARD, NUM_EXAMPLES, ROSTER, SITE

log = logging.getLogger("medfl.server")


class SetupError(RuntimeError):
    """The federation cannot start (no sites, a site refused, inconsistent scenario)."""


def wait_for_nodes(grid: Grid, *, expected: int | None, wait: float, timeout: float) -> list[int]:
    """Node ids once ``expected`` nodes are connected (or, with None, whoever is after ``wait`` seconds)."""
    deadline = time.monotonic() + timeout
    if expected is None:
        time.sleep(wait)
    while True:
        nodes = sorted(grid.get_node_ids())
        if (expected is None and nodes) or (expected is not None and len(nodes) >= expected):
            return nodes
        if time.monotonic() > deadline:
            raise SetupError(f"only {len(nodes)} of {expected or 'any'} nodes connected after {timeout:.0f} s")
        time.sleep(0.5)


def discover(grid: Grid, scenario: Scenario, *, data_dir: str | None, expected: int | None, wait: float,
             timeout: float) -> tuple[dict[int, Site], list[dict]]:
    """Ask every connected node who it is.

    Returns the sites by node id (with ``num_examples``) and the nodes that could not join, as
    dropouts of round 0 (``{round, site, reason}``).
    """
    nodes = wait_for_nodes(grid, expected=expected, wait=wait, timeout=timeout)
    roster = {"sites": [dataclasses.asdict(c) for c in scenario.clients()], "seed": scenario.seed,
              "data_dir": data_dir}
    messages = [Message(content=RecordDict({CONFIG: ConfigRecord({ROSTER: json.dumps(roster)})}),
                        message_type=MessageType.QUERY, dst_node_id=n) for n in nodes]
    replies = {m.metadata.src_node_id: m for m in grid.send_and_receive(messages, timeout=timeout)}
    sites: dict[int, Site] = {}
    refused: list[dict] = []
    for node_id in nodes:
        msg = replies.get(node_id)
        if msg is None or msg.has_error():
            reason = "no reply" if msg is None else msg.error.reason
            log.warning("node %d cannot join: %s", node_id, reason)
            refused.append({"round": 0, "site": f"node-{node_id}", "reason": reason})
            continue
        info = msg.content.config_records[SITE]
        site = from_plain(Site, json.loads(str(info[SITE])), f"node {node_id}'s site")
        if DATASET_CARD in info:
            reason = learn_dataset(site, str(info[DATASET_CARD]))
            if reason is not None:
                log.warning("site %s cannot join: %s", site.name, reason)
                refused.append({"round": 0, "site": site.name, "reason": reason})
                continue
        sites[node_id] = dataclasses.replace(site, num_examples=int(info[NUM_EXAMPLES]), data_dir=None)
    names = [s.name for s in sites.values()]
    if not sites:
        raise SetupError("no site could join the federation")
    if len(set(names)) != len(names):
        raise SetupError(f"two nodes claim the same site name: {sorted(names)}")
    return sites, refused


def learn_dataset(site: Site, card_json: str) -> str | None:
    """Register the imported dataset a site describes; why it cannot be used, or None."""
    try:
        card = json.loads(card_json)
        if not isinstance(card, dict) or card.get("name") != site.dataset:
            return f"its dataset card names {card.get('name') if isinstance(card, dict) else card!r}, not {site.dataset!r}"
        info = register_public(card, f"site {site.name}'s dataset card")
    except (ValueError, DataError) as e:
        return f"its dataset card is not usable: {e}"
    if site.size not in info.sizes:
        return f"its dataset card has no size {site.size}"
    log.info("site %s holds its own dataset %s (%s, %d labels, %s): learnt from its card", site.name, info.flag,
             info.task, info.n_classes, info.input_kind)
    return None


def site_datasets(scenario: Scenario, sites: dict[int, Site]) -> list[tuple[str, int]]:
    """The (flag, size) pairs the connected sites hold: the scenario's order first (so a
    simulation's model is the same whoever connects first), then any a deployment adds."""
    found = {(s.dataset, s.size) for s in sites.values()}
    ordered = [d for d in scenario.datasets() if d in found]
    return ordered + sorted(found - set(ordered))
