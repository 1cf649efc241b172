"""A hospital's side of a round, free of Flower types: who am I, my data, my training.

The site's identity comes from the node's own configuration in a deployment (``dataset``,
``data-dir``, optional ``size`` and ``name``), or, in simulation, from the scenario's client list
picked by the node's ``partition-id``. A site's own configuration always wins over what the server
suggests: the data dir and dataset are the hospital's to say.
"""
from __future__ import annotations

import difflib
import json
import os
from dataclasses import dataclass, field
from functools import lru_cache

import torch

from client.policy import POLICY_KEYS, LedgerStore, PolicyRefusal, SitePolicy, settle_privacy, trusted_history
from medformer.data import DataError, MedMNISTSplit, get_info, load_split
from medformer.model import make_config
from medformer.pretext import PretextObjective, build_pretext_model
from medformer.privacy import DPPlan, PrivacyLedger
from medformer.seeding import round_seed
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


#: node-config keys a deployed site may set (identity, then its privacy policy: client.policy).
SITE_KEYS = ("name", "dataset", "size", "data-dir") + POLICY_KEYS
#: keys Flower's simulation engine sets.
SIMULATION_KEYS = ("partition-id", "num-partitions")


def identity_from_node_config(node_config: dict, *, roster: dict | None = None) -> SiteIdentity:
    """Deployment: the node's --node-config names the site. Simulation: partition-id picks a client."""
    unknown = sorted(set(node_config) - set(SITE_KEYS) - set(SIMULATION_KEYS))
    if unknown:  # a misspelt privacy key must not silently leave a site unprotected
        close = difflib.get_close_matches(unknown[0], SITE_KEYS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise SiteConfigError(f"unknown node-config key {unknown[0]!r}{hint}; a site's keys are {', '.join(SITE_KEYS)}")
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


def dp_plan(ins: RoundInstructions, num_examples: int, spec: LocalTrainSpec, policy: SitePolicy
            ) -> tuple[DPPlan | None, list[str]]:
    """This round's DP-SGD plan: the server's request, tightened by the site's own policy."""
    return settle_privacy(ins.privacy, policy, num_examples=num_examples, batch_size=spec.batch_size,
                          steps_per_round=spec.steps(num_examples), rounds=ins.rounds)


@dataclass
class RoundOutcome:
    """What one round at a site produced.

    Attributes:
        trained: the trained keys; empty when the site refused the round.
        result: the local training's result; None when refused.
        ledger: the DP-SGD accountant (None without DP).
        plan: the DP-SGD plan the site trained with (None without DP).
        optimizer_state: the optimizer's state after the round (kept when asked for).
        notes: where the site's policy overrode the server's request.
        refusal: why the site did not train, or None.
    """

    trained: dict[str, torch.Tensor]
    result: LocalTrainResult | None
    ledger: PrivacyLedger | None = None
    plan: DPPlan | None = None
    optimizer_state: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    refusal: str | None = None


def train_round(ins: RoundInstructions, site: SiteIdentity, received: dict[str, torch.Tensor], *,
                ledger_state: str | None, optimizer_state: dict | None, policy: SitePolicy = SitePolicy(),
                store: LedgerStore | None = None, run_id: int | str = 0) -> RoundOutcome:
    """Load the received keys and train one round under the site's privacy policy.

    Args:
        ins: the server's instructions for this round.
        site: who this site is (its dataset, size, partition).
        received: the global values of the keys this site holds.
        ledger_state: the longest accountant history of this run the site knows (its memory, the
            server's copy); the site's own ``store``, when given, is consulted too.
        optimizer_state: the optimizer's state of the previous round, if kept.
        policy: the site's own privacy floor (node-config).
        store: the site's ledger on its own disk (node-config ``state-dir``).
        run_id: the Flower run this round belongs to (the ledger's key).
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
    try:
        plan, notes = dp_plan(ins, len(data), spec, policy)
    except PolicyRefusal as e:
        return RoundOutcome({}, None, refusal=str(e))
    ledger = None
    if plan is not None:
        own = json.dumps({"history": store.history(run_id)}) if store and store.history(run_id) else None
        ledger = PrivacyLedger.from_json(plan, trusted_history(own, ledger_state),
                                         prior=store.other_runs(run_id) if store else None, cap=policy.max_epsilon)
        steps = spec.steps(len(data))
        refusal = ledger.refusal(steps)
        if refusal is not None:
            return RoundOutcome({}, None, ledger, plan, optimizer_state or {}, notes, refusal)
        if store is not None:  # reserve the round's spend on the site's own disk before anything is released
            store.save(run_id, ledger.history + [(plan.noise_multiplier, plan.sample_rate, steps)],
                       delta=plan.delta, accountant=plan.accountant)
    # Masks, rotations, augmentations and (without DP) shuffling: seeded, reproducible. DP noise and
    # Poisson sampling: train_local draws them from a fresh secret generator (medformer.seeding).
    seed = round_seed(ins.seed, site.name, ins.round)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed ^ 1)
    result, opt_state = train_local(model, objective, data, site.dataset, spec, generator=generator,
                                    optimizer_state=optimizer_state if t.get("keep_optimizer_state") else None,
                                    ledger=ledger)
    if store is not None and ledger is not None:
        store.save(run_id, ledger.history, delta=plan.delta, accountant=plan.accountant)
    return RoundOutcome(model.state_dict(), result, ledger, plan, opt_state, notes)
