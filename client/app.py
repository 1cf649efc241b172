"""The ClientApp: one hospital. Pretrains its part of the Medformer on its own images.

``query``: says who this site is (dataset, size, examples), so the server can build the model for
exactly the sites that are connected. ``train``: loads the received keys, runs the round's pretext
training (optionally DP-SGD), replies with the trained keys and scalar metrics only.
"""
from __future__ import annotations

import io
import json

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.faults import fault_injection_mod
from client.hospital import identity_from_instructions, identity_from_node_config, local_data, longer_history, train_round
from medformer.wire import ARRAYS, CONFIG, INSTRUCTIONS, METRICS, NUM_EXAMPLES, PRIVACY, RoundInstructions

# The fault-injection mod does nothing unless a (test) scenario declares faults.
app = ClientApp(mods=[fault_injection_mod])

_LEDGER = "privacy-ledger"        # context.state ConfigRecord: the accountant history (JSON)
_OPTIMIZER = "optimizer-state"    # context.state ConfigRecord: torch-serialised optimizer state


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Report this site's identity and size."""
    roster = json.loads(str(msg.content[CONFIG]["roster"]))
    site = identity_from_node_config(dict(context.node_config), roster=roster)
    n = len(local_data(site, int(roster.get("seed", 0))))
    info = ConfigRecord({"client": json.dumps(site.client_fields()), "num-examples": n})
    return Message(content=RecordDict({"site": info}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train this hospital's keys for one round."""
    ins = RoundInstructions.from_json(str(msg.content[CONFIG][INSTRUCTIONS]))
    site = identity_from_instructions(ins, dict(context.node_config))
    received = msg.content[ARRAYS].to_torch_state_dict()
    state = context.state
    own_ledger = str(state[_LEDGER]["json"]) if _LEDGER in state.config_records else None
    opt_state = None
    if _OPTIMIZER in state.config_records:
        opt_state = torch.load(io.BytesIO(state[_OPTIMIZER]["bytes"]), weights_only=False)
    trained, result, ledger, new_opt, plan = train_round(
        ins, site, received, ledger_state=longer_history(own_ledger, ins.privacy_state), optimizer_state=opt_state)

    content = RecordDict()
    if ledger is not None:
        state[_LEDGER] = ConfigRecord({"json": ledger.to_json()})
        content[PRIVACY] = ConfigRecord({"state": ledger.to_json()})
    if result is None:  # privacy budget spent: say so, send nothing to average
        content[ARRAYS] = ArrayRecord()
        content[METRICS] = MetricRecord({NUM_EXAMPLES: 0, "budget-exhausted": 1, "epsilon": ledger.epsilon()})
        return Message(content=content, reply_to=msg)
    if ins.training.get("keep_optimizer_state"):
        buf = io.BytesIO()
        torch.save(new_opt, buf)
        state[_OPTIMIZER] = ConfigRecord({"bytes": buf.getvalue()})
    metrics = {NUM_EXAMPLES: result.num_examples, "loss": result.loss, "images-per-second": result.images_per_second,
               "seconds": result.seconds, "steps": result.steps}
    metrics.update({f"loss-{k}": v for k, v in result.task_losses.items()})
    if plan is not None:
        metrics.update({"epsilon": result.epsilon, "delta": plan.delta, "noise-multiplier": plan.noise_multiplier,
                        "sample-rate": plan.sample_rate, "steps-total": ledger.steps,
                        "max-grad-norm": plan.max_grad_norm, "accountant": 0 if plan.accountant == "rdp" else 1})
    content[ARRAYS] = ArrayRecord(torch_state_dict=trained)
    content[METRICS] = MetricRecord(metrics)
    return Message(content=content, reply_to=msg)
