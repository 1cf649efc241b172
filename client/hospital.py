"""A hospital's side of a round, free of Flower types: who am I, my data, my training.

The site's identity comes from the node's own configuration in a deployment (``dataset``,
``data-dir``, optional ``size`` and ``name``), or, in simulation, from the scenario's client list
picked by the node's ``partition-id``. A site's own configuration always wins over what the server
suggests: the data dir and dataset are the hospital's to say.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from functools import lru_cache

import torch

from medformer.data import DataError, MedMNISTSplit, get_info, load_split
from medformer.model import make_config
from medformer.pretext import PretextObjective, build_pretext_model
from medformer.privacy import DPPlan, PrivacyLedger, plan_dp
from medformer.training import LocalTrainResult, LocalTrainSpec, train_local
from medformer.wire import RoundInstructions
from simulations.scenario import partition_indices


class SiteConfigError(ValueError):
    """The node's configuration does not name a usable site (bad dataset, size or data dir)."""


@dataclass(frozen=True)
class SiteIdentity:
    name: str
    dataset: str
    size: int
    data_dir: str | None
    partition_index: int | None = None
    partition_parts: int | None = None
    partition_method: str | None = None
    partition_alpha: float | None = None

    def client_fields(self) -> dict:
        return {"name": self.name, "dataset": self.dataset, "size": self.size,
                "partition_index": self.partition_index, "partition_parts": self.partition_parts,
                "partition_method": self.partition_method, "partition_alpha": self.partition_alpha}


def identity_from_node_config(node_config: dict, *, roster: dict | None = None) -> SiteIdentity:
    """Deployment: the node's --node-config names the site. Simulation: partition-id picks a client."""
    if "dataset" in node_config:
        flag = str(node_config["dataset"])
        try:
            info = get_info(flag)
        except DataError as e:
            raise SiteConfigError(f"node-config dataset: {e}") from None
        size = node_config.get("size", 28)
        if not isinstance(size, int) or size not in info.sizes:
            raise SiteConfigError(f"node-config size={size!r} is not available for {flag}; choose from {info.sizes}")
        data_dir = node_config.get("data-dir")
        if data_dir is not None and not os.path.isdir(str(data_dir)):
            raise SiteConfigError(f"node-config data-dir={data_dir!r} is not a folder")
        name = str(node_config.get("name", f"{flag}-{size}" if size != 28 else flag))
        return SiteIdentity(name, flag, size, str(data_dir) if data_dir is not None else None)
    if "partition-id" in node_config and roster is not None:
        pid = int(node_config["partition-id"])
        clients = roster["clients"]
        if not 0 <= pid < len(clients):
            raise SiteConfigError(f"partition-id {pid} but the scenario has {len(clients)} clients")
        c = clients[pid]
        return SiteIdentity(c["name"], c["dataset"], int(c["size"]), roster.get("data_dir"), c.get("partition_index"),
                            c.get("partition_parts"), c.get("partition_method"), c.get("partition_alpha"))
    raise SiteConfigError("node-config names no site: start the SuperNode with "
                          '--node-config \'dataset="<flag>" data-dir="<folder>"\'')


def identity_from_instructions(ins: RoundInstructions, node_config: dict) -> SiteIdentity:
    """This round's identity: the node's own config if it names a dataset, else the server's hospital entry."""
    if "dataset" in node_config:
        return identity_from_node_config(node_config)
    h = ins.hospital
    return SiteIdentity(h["name"], h["dataset"], int(h["size"]), ins.data_dir, h.get("partition_index"),
                        h.get("partition_parts"), h.get("partition_method"), h.get("partition_alpha"))


@lru_cache(maxsize=4)
def _train_split(dataset: str, size: int, data_dir: str | None) -> MedMNISTSplit:
    return load_split(dataset, "train", size=size, data_dir=data_dir)


def local_data(site: SiteIdentity, seed: int) -> MedMNISTSplit:
    """The site's training records: its whole train split, or its partition of it."""
    split = _train_split(site.dataset, site.size, site.data_dir)
    if site.partition_parts is None:
        return split
    parts = partition_indices(split.labels, site.partition_parts, site.partition_method or "iid",
                              site.partition_alpha or 0.5, seed)
    return split.subset(parts[site.partition_index])


def round_seed(seed: int, name: str, rnd: int) -> int:
    """A hospital's RNG seed for a round: fixed by (scenario seed, site, round), so a resumed run
    replays exactly what an uninterrupted one does."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{name}/{rnd}".encode()).digest()[:8], "little")


def dp_plan(ins: RoundInstructions, num_examples: int, spec: LocalTrainSpec) -> DPPlan | None:
    p = ins.privacy
    if not p:
        return None
    return plan_dp(num_examples=num_examples, batch_size=spec.batch_size, steps_per_round=spec.steps(num_examples),
                   rounds=ins.rounds, target_epsilon=p.get("target_epsilon"), noise_multiplier=p.get("noise_multiplier"),
                   delta=p.get("target_delta"), max_grad_norm=p.get("max_grad_norm", 1.0),
                   accountant=p.get("accountant", "rdp"))


def train_round(ins: RoundInstructions, site: SiteIdentity, received: dict[str, torch.Tensor], *,
                ledger_state: str | None, optimizer_state: dict | None
                ) -> tuple[dict[str, torch.Tensor], LocalTrainResult | None, PrivacyLedger | None, dict, DPPlan | None]:
    """Load the received keys, train one round, return (trained keys, result, ledger, optimizer state, plan).

    ``result`` is None when the privacy budget cannot pay for the round (nothing trained).
    """
    torch.set_num_threads(int(ins.training.get("threads", 1)))
    cfg = make_config(ins.model["preset"], **ins.model.get("overrides", {}))
    objective = PretextObjective(ins.pretext, mask_ratio=ins.mask_ratio)
    data = local_data(site, ins.seed)
    model = build_pretext_model(cfg, [(site.dataset, site.size)], objective)
    expected = set(model.state_dict())
    if set(received) != expected:
        missing, extra = sorted(expected - set(received)), sorted(set(received) - expected)
        raise ValueError(f"server sent the wrong keys for {site.dataset}: missing {missing[:3]}, unexpected {extra[:3]}")
    model.load_state_dict(received, strict=True)
    t = ins.training
    spec = LocalTrainSpec(batch_size=t["batch_size"], local_epochs=t["local_epochs"], local_steps=t.get("local_steps"),
                          lr=t["lr"], weight_decay=t["weight_decay"], optimizer=t["optimizer"],
                          proximal_mu=t.get("proximal_mu", 0.0))
    plan = dp_plan(ins, len(data), spec)
    ledger = None
    if plan is not None:
        ledger = PrivacyLedger.from_json(plan, ledger_state)
        if not ledger.can_afford(plan.steps_per_round):
            return {}, None, ledger, optimizer_state or {}, plan
    generator = torch.Generator().manual_seed(round_seed(ins.seed, site.name, ins.round))
    torch.manual_seed(round_seed(ins.seed, site.name, ins.round) ^ 1)
    result, opt_state = train_local(model, objective, data, site.dataset, spec, generator=generator,
                                    optimizer_state=optimizer_state if t.get("keep_optimizer_state") else None,
                                    ledger=ledger)
    return model.state_dict(), result, ledger, opt_state, plan


def longer_history(a: str | None, b: str | None) -> str | None:
    """Of two accountant states (JSON), the one with more steps: the site's own memory and the
    server's checkpointed copy can only differ by rounds one of them has not seen yet."""
    def steps(s: str | None) -> int:
        return sum(int(h[2]) for h in json.loads(s)["history"]) if s else -1
    return a if steps(a) >= steps(b) else b

