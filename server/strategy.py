"""KeyedFedAvg: Flower's FedAvg, with keyed aggregation and per-site messages.

Each sampled site is sent only the keys it uses and its own round instructions; its reply is
validated (:meth:`KeyedFedAvg.validate`: keys in its scope only, shapes and dtypes as sent, finite
values, a plausible example count) before the keys are combined over the sites that hold them
(``server.rounds.Aggregator``: the rule, update clipping, client-level DP, the server optimizer). A
reply that fails is dropped, and the round's report names it with the reason.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from config import Scenario, Site
from protocol import (ARRAYS, CONFIG, INSTRUCTIONS, METRICS, NUM_EXAMPLES, PRIVACY, REASON, REFUSAL, SERVER_ROUND,
                      RoundInstructions)
from server.aggregation import ServerOptimizer, Update
from server.client_dp import ClientLevelDP
from server.rounds import Aggregator, check_reply, sample_nodes

log = logging.getLogger(__name__)


@dataclass
class RoundReport:
    """What happened to each site in one round."""

    sampled: list[str] = field(default_factory=list)
    trained: dict[str, dict] = field(default_factory=dict)     # name -> metrics
    dropped: dict[str, str] = field(default_factory=dict)      # name -> reason
    privacy: dict[str, dict] = field(default_factory=dict)     # name -> the reply's privacy record (DP-SGD)
    bytes_sent: dict[str, int] = field(default_factory=dict)   # name -> bytes of arrays sent to it
    bytes_received: dict[str, int] = field(default_factory=dict)


class RoundFailed(RuntimeError):
    """Too few valid replies to aggregate a round."""


def _nbytes(record: ArrayRecord) -> int:
    return sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize for a in record.values())


class KeyedFedAvg(FedAvg):
    """FedAvg over sites that hold different subsets of the global model.

    Args:
        sites: connected sites by node id (``num_examples`` known from discovery).
        keys: the state keys each node's site holds.
        instructions: builds a site's RoundInstructions for a round.
        aggregator: how valid updates combine (rule, clipping, client-level DP, server optimizer).
        fraction_train, min_train_nodes: sampling, as in FedAvg.
        seed: sampling seed (round r samples with seed (seed, r): reproducible and resumable).
    """

    def __init__(self, *, sites: dict[int, Site], keys: dict[int, list[str]],
                 instructions: Callable[[Site, int], RoundInstructions], aggregator: Aggregator | None = None,
                 fraction_train: float = 1.0, min_train_nodes: int = 1, seed: int = 0):
        super().__init__(fraction_train=fraction_train, min_train_nodes=min_train_nodes,
                         min_available_nodes=min_train_nodes)  # evaluation is central: configure_evaluate is never called
        self.sites, self.keys = sites, keys
        self.instructions = instructions
        self.aggregator = aggregator or Aggregator()
        self.seed = seed
        self.report = RoundReport()
        self._current: ArrayRecord | None = None
        self._sent: dict[int, ArrayRecord] = {}
        self._messages: dict[int, Message] = {}

    @property
    def server_optimizer(self) -> ServerOptimizer:
        return self.aggregator.server_optimizer

    @property
    def client_dp(self) -> ClientLevelDP | None:
        return self.aggregator.client_dp

    def summary(self) -> None:
        a = self.aggregator
        log.info("KeyedFedAvg: %d sites, rule=%s, server optimizer=%s, fraction_train=%.2f, min_train_nodes=%d%s",
                 len(self.sites), a.rule, a.server_optimizer.name, self.fraction_train, self.min_train_nodes,
                 f", client-level DP sigma={a.client_dp.noise_multiplier} C={a.client_dp.clipping_norm}"
                 if a.client_dp else "")

    # ---- sampling and messages -----------------------------------------------------------------
    def sample(self, server_round: int, available: Iterable[int]) -> list[int]:
        """Sorted node ids sampled for a round (``server.rounds.sample_nodes``)."""
        return sample_nodes([n for n in available if n in self.sites], server_round, fraction=self.fraction_train,
                            min_nodes=self.min_train_nodes, seed=self.seed)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._current = arrays
        self.report = RoundReport()
        self._sent, self._messages = {}, {}
        messages = []
        for node_id in self.sample(server_round, grid.get_node_ids()):
            site = self.sites[node_id]
            sent = ArrayRecord(array_dict={k: arrays[k] for k in self.keys[node_id]})
            cfg = ConfigRecord(dict(config))
            cfg[SERVER_ROUND] = server_round
            cfg[INSTRUCTIONS] = self.instructions(site, server_round).to_json()
            self._sent[node_id] = sent
            self.report.sampled.append(site.name)
            self.report.bytes_sent[site.name] = _nbytes(sent)
            self._messages[node_id] = Message(content=RecordDict({ARRAYS: sent, CONFIG: cfg}),
                                              message_type=MessageType.TRAIN, dst_node_id=node_id)
            messages.append(self._messages[node_id])
        return messages

    def _match_replies(self, replies: Iterable[Message]) -> dict[int, Message]:
        """node id -> its reply. Matched by the message replied to: a SuperLink's own error reply
        for a node that died carries no source node id, but still names the message."""
        replies = list(replies)
        by_message = {m.metadata.reply_to_message_id: m for m in replies if m.metadata.reply_to_message_id}
        out = {}
        for node_id, sent in self._messages.items():
            reply = by_message.get(sent.metadata.message_id) if sent.metadata.message_id else None
            if reply is None:
                reply = next((m for m in replies if m.metadata.src_node_id == node_id), None)
            if reply is not None:
                out[node_id] = reply
        return out

    # ---- validation and aggregation -------------------------------------------------------------
    def validate(self, node_id: int, msg: Message) -> tuple[Update | None, str | None]:
        """A reply to this round's message for ``node_id`` as an Update, or the reason it is refused."""
        site = self.sites[node_id]
        if msg.has_error():
            return None, f"client error: {msg.error.reason}"
        content = msg.content
        if REFUSAL in content.config_records:
            return None, f"refused by the site: {content.config_records[REFUSAL].get(REASON, 'no reason given')}"
        if ARRAYS not in content.array_records or METRICS not in content.metric_records:
            return None, "reply lacks 'arrays' or 'metrics'"
        n = content.metric_records[METRICS].get(NUM_EXAMPLES)
        arrays = {k: arr.numpy() for k, arr in content.array_records[ARRAYS].items()}
        sent = {k: v.numpy() for k, v in self._sent[node_id].items()}
        reason = check_reply(arrays, sent, n, site_examples=site.num_examples or 0)
        if reason is not None:
            return None, reason
        return Update(site.name, arrays, int(n)), None

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        updates: list[Update] = []
        sent: dict[str, dict[str, np.ndarray]] = {}
        by_node = self._match_replies(replies)
        for node_id in self._sent:
            site = self.sites[node_id]
            msg = by_node.get(node_id)
            if msg is None:
                self.report.dropped[site.name] = "no reply before the round timeout"
                continue
            if not msg.has_error() and PRIVACY in msg.content.config_records:
                self.report.privacy[site.name] = dict(msg.content.config_records[PRIVACY])
            update, reason = self.validate(node_id, msg)
            if update is None:
                self.report.dropped[site.name] = reason
                log.warning("round %d: dropped %s: %s", server_round, site.name, reason)
                continue
            updates.append(update)
            sent[site.name] = {k: v.numpy() for k, v in self._sent[node_id].items()}
            self.report.trained[site.name] = {k: v for k, v in msg.content.metric_records[METRICS].items()}
            self.report.bytes_received[site.name] = _nbytes(msg.content.array_records[ARRAYS])
        if len(updates) < self.min_train_nodes:
            raise RoundFailed(
                f"round {server_round}: {len(updates)} valid replies, fewer than min_train_nodes="
                f"{self.min_train_nodes}; dropped: {self.report.dropped}"
            )
        current = {k: v.numpy() for k, v in self._current.items()}
        new = self.aggregator.combine(current, sent, updates)
        arrays = ArrayRecord(array_dict={k: Array(np.ascontiguousarray(new[k])) for k in current})
        return arrays, MetricRecord(weighted_metrics(self.report.trained))


def weighted_metrics(trained: dict[str, dict]) -> dict[str, float]:
    """Example-weighted mean of every numeric metric the sites reported."""
    total = sum(float(m.get(NUM_EXAMPLES, 0)) for m in trained.values())
    out: dict[str, float] = {NUM_EXAMPLES: total}
    for m in trained.values():
        w = float(m.get(NUM_EXAMPLES, 0)) / total if total else 0.0
        for k, v in m.items():
            if k != NUM_EXAMPLES and isinstance(v, (int, float)):
                out[k] = out.get(k, 0.0) + w * float(v)
    return out


def make_aggregator(scenario: Scenario) -> Aggregator:
    """The scenario's aggregation: rule, server optimizer, update clipping, client-level DP."""
    st = scenario.strategy
    rule = {"median": "median", "trimmed-mean": "trimmed-mean"}.get(st.name, "mean")
    opt = {"fedadam": "fedadam", "fedavgm": "fedavgm"}.get(st.name, "fedavg")
    lr = st.server_lr if opt != "fedadam" or st.server_lr != 1.0 else 1e-2
    cdp = scenario.client_dp  # mode 'server' (the scenario refuses 'client' until the ClientApp clips itself)
    return Aggregator(rule=rule, weighting=st.weighting, trim_fraction=st.trim_fraction,
                      server_optimizer=ServerOptimizer(opt, lr=lr, momentum=st.server_momentum),
                      update_clip_norm=st.update_clip_norm,
                      client_dp=ClientLevelDP(noise_multiplier=cdp.noise_multiplier, clipping_norm=cdp.clipping_norm)
                      if cdp is not None else None)


def make_strategy(scenario: Scenario, sites: dict[int, Site], keys: dict[int, list[str]],
                  instructions: Callable[[Site, int], RoundInstructions]) -> KeyedFedAvg:
    """The keyed strategy for a scenario and the connected sites."""
    st = scenario.strategy
    return KeyedFedAvg(sites=sites, keys=keys, instructions=instructions, aggregator=make_aggregator(scenario),
                       fraction_train=st.fraction_train, min_train_nodes=st.min_train_nodes, seed=scenario.seed)
