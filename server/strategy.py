"""KeyedFedAvg: Flower's FedAvg, with keyed aggregation and per-hospital messages.

Each sampled hospital is sent only the keys it uses and its own round instructions; its reply is
validated (keys in its scope only, shapes and dtypes as sent, finite values, a plausible example
count) before the keys are combined over the hospitals that hold them (``server.aggregation``). A
reply that fails is dropped, and the round's report names it with the reason.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from medformer.wire import ARRAYS, CONFIG, INSTRUCTIONS, METRICS, NUM_EXAMPLES, PRIVACY, REFUSAL, RoundInstructions
from server.aggregation import ServerOptimizer, Update, clip_update, keyed_mean, keyed_median, keyed_trimmed_mean

log = logging.getLogger(__name__)


@dataclass
class Site:
    """A connected hospital: its node, its scenario entry and the keys it holds."""

    node_id: int
    name: str
    dataset: str
    size: int
    keys: list[str]
    num_examples: int
    client: dict = field(default_factory=dict)  # ClientSpec fields (partition, privacy)


@dataclass
class RoundReport:
    """What happened to each hospital in one round."""

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
    """FedAvg over hospitals that hold different subsets of the global model.

    Args:
        sites: connected hospitals by node id.
        instructions: builds a hospital's RoundInstructions for a round.
        rule: ``mean`` (weighted by examples), ``median`` or ``trimmed-mean``.
        trim_fraction: for ``trimmed-mean``.
        server_optimizer: applied to the aggregate (FedAvg, FedAvgM, FedAdam).
        fraction_train, min_train_nodes: sampling, as in FedAvg.
        seed: sampling seed (round r samples with seed (seed, r): reproducible and resumable).
        update_clip_norm: clip each hospital's update (reply - sent, over its keys) to this L2
            norm before aggregation; None = no clipping.
    """

    def __init__(self, *, sites: dict[int, Site], instructions: Callable[[Site, int], RoundInstructions],
                 rule: str = "mean", trim_fraction: float = 0.2, server_optimizer: ServerOptimizer | None = None,
                 fraction_train: float = 1.0, min_train_nodes: int = 1, seed: int = 0,
                 update_clip_norm: float | None = None):
        super().__init__(fraction_train=fraction_train, min_train_nodes=min_train_nodes,
                         min_available_nodes=min_train_nodes)  # evaluation is central: configure_evaluate is never called
        if rule not in ("mean", "median", "trimmed-mean"):
            raise ValueError(f"unknown aggregation rule {rule!r}; choose from mean, median, trimmed-mean")
        self.sites = sites
        self.instructions = instructions
        self.rule, self.trim_fraction = rule, trim_fraction
        self.server_optimizer = server_optimizer or ServerOptimizer("fedavg")
        self.seed = seed
        self.update_clip_norm = update_clip_norm
        self.report = RoundReport()
        self._current: ArrayRecord | None = None
        self._sent: dict[int, ArrayRecord] = {}
        self._messages: dict[int, Message] = {}

    def summary(self) -> None:
        log.info("KeyedFedAvg: %d sites, rule=%s, server optimizer=%s, fraction_train=%.2f, min_train_nodes=%d",
                 len(self.sites), self.rule, self.server_optimizer.name, self.fraction_train, self.min_train_nodes)

    # ---- sampling and messages -----------------------------------------------------------------
    def sample(self, server_round: int, available: Iterable[int]) -> list[int]:
        """Sorted node ids sampled for a round: deterministic in (seed, round)."""
        nodes = sorted(n for n in available if n in self.sites)
        k = min(len(nodes), max(math.ceil(self.fraction_train * len(nodes)), self.min_train_nodes))
        rng = np.random.default_rng([self.seed, server_round])
        return sorted(nodes[i] for i in rng.permutation(len(nodes))[:k])

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._current = arrays
        self.report = RoundReport()
        self._sent, self._messages = {}, {}
        messages = []
        for node_id in self.sample(server_round, grid.get_node_ids()):
            site = self.sites[node_id]
            sent = ArrayRecord(array_dict={k: arrays[k] for k in site.keys})
            cfg = ConfigRecord(dict(config))
            cfg["server-round"] = server_round
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
    def _check_reply(self, site: Site, msg: Message) -> tuple[Update | None, str | None]:
        """A valid reply as an Update, or the reason it is refused."""
        if msg.has_error():
            return None, f"client error: {msg.error.reason}"
        content = msg.content
        if REFUSAL in content.config_records:
            return None, f"refused by the site: {content.config_records[REFUSAL].get('reason', 'no reason given')}"
        if ARRAYS not in content.array_records or METRICS not in content.metric_records:
            return None, "reply lacks 'arrays' or 'metrics'"
        metrics = content.metric_records[METRICS]
        n = metrics.get(NUM_EXAMPLES)
        if not isinstance(n, (int, float)) or not n > 0 or n > 10 * max(1, site.num_examples):
            return None, f"implausible num-examples {n!r} (site has {site.num_examples})"
        record = content.array_records[ARRAYS]
        sent = self._sent[site.node_id]
        extra = sorted(set(record.keys()) - set(sent.keys()))
        if extra:
            return None, f"sent keys outside its scope: {', '.join(extra[:3])}"
        arrays = {}
        for k, arr in record.items():
            a = arr.numpy()
            ref = sent[k]
            if list(a.shape) != list(ref.shape) or str(a.dtype) != str(ref.dtype):
                return None, f"key {k}: got {a.dtype}{list(a.shape)}, expected {ref.dtype}{list(ref.shape)}"
            if not np.all(np.isfinite(a)):
                return None, f"key {k}: non-finite values"
            arrays[k] = a
        if self.update_clip_norm is not None:
            arrays, _ = clip_update({k: sent[k].numpy() for k in arrays}, arrays, self.update_clip_norm)
        return Update(site.name, arrays, int(n)), None

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        updates: list[Update] = []
        by_node = self._match_replies(replies)
        for node_id in self._sent:
            site = self.sites[node_id]
            msg = by_node.get(node_id)
            if msg is None:
                self.report.dropped[site.name] = "no reply before the round timeout"
                continue
            if not msg.has_error() and PRIVACY in msg.content.config_records:
                self.report.privacy[site.name] = dict(msg.content.config_records[PRIVACY])
            update, reason = self._check_reply(site, msg)
            if update is None:
                self.report.dropped[site.name] = reason
                log.warning("round %d: dropped %s: %s", server_round, site.name, reason)
                continue
            updates.append(update)
            self.report.trained[site.name] = {k: v for k, v in msg.content.metric_records[METRICS].items()}
            self.report.bytes_received[site.name] = _nbytes(msg.content.array_records[ARRAYS])
        if len(updates) < self.min_train_nodes:
            raise RoundFailed(
                f"round {server_round}: {len(updates)} valid replies, fewer than min_train_nodes="
                f"{self.min_train_nodes}; dropped: {self.report.dropped}"
            )
        updates.sort(key=lambda u: u.name)  # aggregation order fixed: reproducible sums
        if self.rule == "median":
            agg = keyed_median(updates)
        elif self.rule == "trimmed-mean":
            agg = keyed_trimmed_mean(updates, self.trim_fraction)
        else:
            agg = keyed_mean(updates)
        current = {k: v.numpy() for k, v in self._current.items()}
        new = self.server_optimizer.apply(current, agg)
        arrays = ArrayRecord(array_dict={k: Array(np.ascontiguousarray(new[k])) for k in current})
        return arrays, MetricRecord(_weighted_metrics(self.report.trained))


def _weighted_metrics(trained: dict[str, dict]) -> dict[str, float]:
    """Example-weighted mean of every numeric metric the hospitals reported."""
    total = sum(float(m.get(NUM_EXAMPLES, 0)) for m in trained.values())
    out: dict[str, float] = {NUM_EXAMPLES: total}
    for m in trained.values():
        w = float(m.get(NUM_EXAMPLES, 0)) / total if total else 0.0
        for k, v in m.items():
            if k != NUM_EXAMPLES and isinstance(v, (int, float)):
                out[k] = out.get(k, 0.0) + w * float(v)
    return out
