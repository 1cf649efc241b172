"""Fault injection for chaos tests: a ClientApp mod that makes a named hospital misbehave.

A scenario may declare ``faults`` (a testing aid; production scenarios declare none). The server
puts a hospital's fault for the round into its instructions (``fault``), and this mod acts
on it around the real train handler. Only :data:`chaos_app` carries the mod, and only ``medfl run``
uses it, for a scenario that declares faults; the deployed ``client.app:app`` has no mod and ignores
such orders, so a server can never make a real site hang, fail or scale its update.

* ``raise``: the hospital fails with an exception (Flower replies with an error).
* ``hang``: it answers only after ``seconds`` (longer than the round timeout).
* ``scale``: its update (trained - received) is multiplied by ``factor`` (a poisoned hospital).
* ``sign-flip``: its update is multiplied by ``-factor``.
* ``nan``: one of its tensors is filled with NaN.
* ``extra-key``: it sends a key outside its scope.
"""
from __future__ import annotations

import time

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MessageType
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable

from client.app import query, train
from config import FAULT_KINDS
from protocol import ARRAYS, CONFIG, INSTRUCTIONS, RoundInstructions

#: The faults this mod implements: every kind a scenario may declare (config.FAULT_KINDS).
KINDS = FAULT_KINDS


class InjectedFault(RuntimeError):
    """Raised on purpose by a ``raise`` fault."""


def _poison(received: ArrayRecord, trained: ArrayRecord, kind: str, factor: float) -> ArrayRecord:
    out = {}
    for k, arr in trained.items():
        t = arr.numpy()
        if kind in ("scale", "sign-flip"):
            r = received[k].numpy()
            sign = -1.0 if kind == "sign-flip" else 1.0
            t = (r + sign * factor * (t - r)).astype(t.dtype)
        out[k] = t
    if kind == "nan":
        first = next(iter(out))
        out[first] = np.full_like(out[first], np.nan)
    if kind == "extra-key":
        out["inputs.not-mine.weight"] = np.zeros(3, np.float32)
    return ArrayRecord(array_dict={k: Array(np.ascontiguousarray(v)) for k, v in out.items()})


def fault_injection_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Apply this round's injected fault, if any, around the train handler."""
    if msg.metadata.message_type != MessageType.TRAIN or CONFIG not in msg.content.config_records:
        return call_next(msg, context)
    ins = RoundInstructions.from_json(str(msg.content[CONFIG][INSTRUCTIONS]))
    fault = ins.fault
    if fault is None:
        return call_next(msg, context)
    if fault.kind == "raise":
        raise InjectedFault(f"injected fault: {ins.site.name} fails in round {ins.round}")
    if fault.kind == "hang":
        time.sleep(fault.seconds)
        return call_next(msg, context)
    reply = call_next(msg, context)
    if reply.has_error() or ARRAYS not in reply.content.array_records:
        return reply
    reply.content[ARRAYS] = _poison(msg.content[ARRAYS], reply.content[ARRAYS], fault.kind, fault.factor)
    return reply


#: The simulation-only ClientApp of chaos scenarios: the real handlers behind the fault-injection mod.
chaos_app = ClientApp(mods=[fault_injection_mod])
chaos_app.query()(query)
chaos_app.train()(train)
