"""The ClientApp: one hospital. Pretrains its part of the Medformer on its own images.

``query``: says who this site is (dataset, size, examples; for a dataset of its own images the
card's public part), so the server can build the model for exactly the sites that are connected.
``train``: loads the received keys, runs the round's pretext training under the site's own privacy
policy (node-config, ``client.policy``), replies with the trained keys and scalar metrics only.

This ``app`` is what a deployed SuperNode runs: it has no fault-injection mod (that one lives in
``client.faults.chaos_app``, which only ``medfl run`` uses, and only for scenarios that declare faults).
"""
from __future__ import annotations

import dataclasses
import io
import json
import logging

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.policy import LedgerStore, PolicyError, SitePolicy, trusted_history
from client.round import RoundOutcome, train_round
from client.site import SiteConfigError, local_data, site_device, site_for_round, site_from_node_config
from medformer.data import get_info, public_card
from protocol import (ARRAYS, CONFIG, DATASET_CARD, INSTRUCTIONS, METRICS, NUM_EXAMPLES, PRIVACY, REASON, REFUSAL,
                      ROSTER, SITE, STEPS, RoundInstructions)

log = logging.getLogger("medfl.client")

app = ClientApp()

_LEDGER = "privacy-ledger"        # context.state ConfigRecord: the accountant history (JSON)
_OPTIMIZER = "optimizer-state"    # context.state ConfigRecord: torch-serialised optimizer state


def site_policy(context: Context) -> SitePolicy:
    """The site's own privacy policy from its node-config (SiteConfigError names a bad key)."""
    try:
        return SitePolicy.from_node_config(dict(context.node_config))
    except PolicyError as e:
        raise SiteConfigError(str(e)) from None


def query(msg: Message, context: Context) -> Message:
    """Report this site's identity and size."""
    roster = json.loads(str(msg.content[CONFIG][ROSTER]))
    site = site_from_node_config(dict(context.node_config), roster=roster)
    site_policy(context)  # a malformed policy is reported at discovery, before any round
    n = len(local_data(site, int(roster.get("seed", 0))))
    public = dataclasses.replace(site, data_dir=None)  # the server learns who the site is, not its paths
    info = ConfigRecord({SITE: json.dumps(dataclasses.asdict(public)), NUM_EXAMPLES: n})
    if get_info(site.dataset).imported:  # the server may have no card of it: its public facts travel
        info[DATASET_CARD] = json.dumps(public_card(get_info(site.dataset)))
    return Message(content=RecordDict({SITE: info}), reply_to=msg)


def train(msg: Message, context: Context) -> Message:
    """Train this hospital's keys for one round."""
    ins = RoundInstructions.from_json(str(msg.content[CONFIG][INSTRUCTIONS]))
    site = site_for_round(ins, dict(context.node_config))
    policy = site_policy(context)
    store = LedgerStore(policy.state_dir, site.name) if policy.state_dir is not None else None
    received = msg.content[ARRAYS].to_torch_state_dict()
    state = context.state
    remembered = str(state[_LEDGER]["json"]) if _LEDGER in state.config_records else None
    opt_state = None
    if _OPTIMIZER in state.config_records:
        opt_state = torch.load(io.BytesIO(state[_OPTIMIZER]["bytes"]), weights_only=True)
    # The site's own copies first: the server's copy can only ever add steps, never remove any.
    out = train_round(ins, site, received, ledger_state=trusted_history(remembered, ins.privacy_state),
                      optimizer_state=opt_state, policy=policy, store=store, run_id=context.run_id,
                      device=site_device(ins, dict(context.node_config)))

    content = RecordDict()
    if out.ledger is not None:
        state[_LEDGER] = ConfigRecord({"json": out.ledger.to_json()})
        content[PRIVACY] = privacy_record(out)
    if out.refusal is not None:  # the site will not train this round: say why, send nothing to average
        log.warning("%s refuses round %d: %s", site.name, ins.round, out.refusal)
        content[ARRAYS] = ArrayRecord()
        content[METRICS] = MetricRecord({NUM_EXAMPLES: 0})
        content[REFUSAL] = ConfigRecord({REASON: out.refusal})
        return Message(content=content, reply_to=msg)
    if ins.training.keep_optimizer_state:
        buf = io.BytesIO()
        torch.save(out.optimizer_state, buf)
        state[_OPTIMIZER] = ConfigRecord({"bytes": buf.getvalue()})
    result = out.result
    metrics = {NUM_EXAMPLES: result.num_examples, STEPS: result.steps}
    if out.ledger is None:  # without DP, losses and throughput are the round's public diagnostics
        metrics.update({"loss": result.loss, "images-per-second": result.images_per_second,
                        "seconds": result.seconds})
        metrics.update({f"loss-{k}": v for k, v in result.task_losses.items()})
    # Under DP-SGD a reply carries no unnoised function of the data besides the noised weights:
    # losses and throughput (images/s x seconds = the sum of the Poisson batch sizes) stay here.
    content[ARRAYS] = ArrayRecord(torch_state_dict=out.trained)
    content[METRICS] = MetricRecord(metrics)
    return Message(content=content, reply_to=msg)


def privacy_record(out: RoundOutcome) -> ConfigRecord:
    """The privacy figures of a DP round, all public: the history (noise, rate, steps) and the
    epsilon it gives at the site's delta, plus where the site's policy overrode the request."""
    plan, ledger = out.plan, out.ledger
    return ConfigRecord({"state": ledger.to_json(), "epsilon": ledger.epsilon(), "delta": plan.delta,
                         "noise-multiplier": plan.noise_multiplier, "sample-rate": plan.sample_rate,
                         "steps": ledger.steps, "max-grad-norm": plan.max_grad_norm, "accountant": plan.accountant,
                         "site-policy": "; ".join(out.notes)})


app.query()(query)
app.train()(train)
