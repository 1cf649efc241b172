"""The hospital's round, written once: load the received keys, settle the round's privacy with the
site's own policy, train its pretext tasks locally (``medformer.train``), return what it trained.

The ClientApp calls it for every train message, and the quality and systems benchmarks call it for
their federations, so a benchmark number is a number about the product.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

import torch

from client.policy import LedgerStore, PolicyRefusal, SitePolicy, settle_privacy, trusted_history
from client.site import local_data
from config import Site
from medformer.device import resolve_device, to_cpu
from medformer.dp.accounting import DPPlan, PrivacyLedger
from medformer.model import make_config
from medformer.pretext import PretextObjective, build_pretext_model
from medformer.seeding import round_seed
from medformer.train import TrainResult, train_local
from protocol import RoundInstructions


def dp_plan(ins: RoundInstructions, num_examples: int, policy: SitePolicy) -> tuple[DPPlan | None, list[str]]:
    """This round's DP-SGD plan: the server's request, tightened by the site's own policy."""
    spec = ins.training
    requested = dataclasses.asdict(ins.privacy) if ins.privacy is not None else None
    return settle_privacy(requested, policy, num_examples=num_examples, batch_size=spec.batch_size,
                          steps_per_round=spec.steps(num_examples), rounds=spec.rounds)


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
    result: TrainResult | None
    ledger: PrivacyLedger | None = None
    plan: DPPlan | None = None
    optimizer_state: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    refusal: str | None = None


def train_round(ins: RoundInstructions, site: Site, received: dict[str, torch.Tensor], *,
                ledger_state: str | None, optimizer_state: dict | None, policy: SitePolicy = SitePolicy(),
                store: LedgerStore | None = None, run_id: int | str = 0,
                device: str | torch.device | None = None) -> RoundOutcome:
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
        device: where to train (default: the instructions' ``device``); the trained keys and the
            optimizer state come back on the CPU.
    """
    torch.set_num_threads(ins.threads)
    cfg = make_config(ins.model.preset, **ins.model.overrides)
    objective = PretextObjective(ins.pretext, mask_ratio=ins.mask_ratio)
    data = local_data(site, ins.seed)
    model = build_pretext_model(cfg, [(site.dataset, site.size)], objective)
    expected = set(model.state_dict())
    if set(received) != expected:
        missing, extra = sorted(expected - set(received)), sorted(set(received) - expected)
        raise ValueError(f"server sent the wrong keys for {site.dataset}: missing {missing[:3]}, unexpected {extra[:3]}")
    model.load_state_dict(received, strict=True)
    model.to(resolve_device(ins.device if device is None else device))  # before any budget is reserved
    spec = ins.training
    try:
        plan, notes = dp_plan(ins, len(data), policy)
    except PolicyRefusal as e:
        return RoundOutcome({}, None, refusal=str(e))
    if plan is not None and objective.dp_objection():  # e.g. the site's policy imposes DP on a contrastive recipe
        return RoundOutcome({}, None, plan=plan, notes=notes, refusal=(
            f"{objective.dp_objection()}; this site trains only under DP (its policy or the server's request)"))
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
                                    proximal_mu=ins.proximal_mu,
                                    optimizer_state=optimizer_state if spec.keep_optimizer_state else None,
                                    ledger=ledger)
    if store is not None and ledger is not None:
        store.save(run_id, ledger.history, delta=plan.delta, accountant=plan.accountant)
    return RoundOutcome(to_cpu(model.state_dict()), result, ledger, plan, to_cpu(opt_state), notes)
