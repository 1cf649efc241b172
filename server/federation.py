"""The federation's loop: discover the sites, then round after round send, collect, aggregate,
evaluate and checkpoint; at the end audit and report.

We drive the rounds ourselves (rather than ``Strategy.start``) because a hospital consortium needs
what ``start`` lacks: a checkpoint after every round, resuming from the last one, a record of which
site dropped out when (and what a late site still spent), and evaluation every ``eval_every``
rounds. The strategy is still a Flower strategy (``server.strategy.KeyedFedAvg``) and its
``configure_train`` / ``aggregate_train`` do the round's work.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid

from medformer.data import get_info, public_card
from medformer.device import resolve_device
from medformer.dp.accounting import history_steps
from medformer.model import make_config
from medformer.pretext import PretextObjective, build_pretext_model
from protocol import PRIVACY
from server.client_dp import client_dp_summary
from server.discovery import SetupError, discover, site_datasets
from server.evaluator import DownstreamEvaluator
from server.instructions import Instructor
from server.privacy_audit import audit_sites
from server.report import write_report
from server.runlog import RunLog, RunState, progress, round_line
from server.settings import RunSettings
from server.strategy import RoundFailed, make_strategy

log = logging.getLogger("medfl.server")

__all__ = ["Federation", "RunSettings", "SetupError"]


class Federation:
    def __init__(self, settings: RunSettings):
        self.s = settings
        sc = settings.scenario
        self.scenario = sc
        self.cfg = make_config(sc.model.preset, **sc.model.overrides)
        self.objective = PretextObjective(sc.pretext, mask_ratio=sc.mask_ratio)
        self.log = RunLog(Path(settings.out_dir))
        self.state = RunState()
        self.outstanding: dict[str, str] = {}  # message id -> site: train messages not answered in time

    def initial_arrays(self, datasets: list[tuple[str, int]]) -> dict[str, np.ndarray]:
        """The round-0 global model for these datasets (seeded: every run of a scenario starts the same)."""
        torch.manual_seed(self.scenario.seed)
        model = build_pretext_model(self.cfg, datasets, self.objective)
        return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}

    def run(self, grid: Grid) -> dict:
        sc, s = self.scenario, self.s
        self.log.out.mkdir(parents=True, exist_ok=True)
        # The sites that answer define the model and the evaluation: in a deployment nobody lists them.
        sites, refused = discover(grid, sc, data_dir=s.data_dir, expected=s.expected_nodes, wait=s.discovery_wait,
                                  timeout=s.discovery_timeout)
        self.state.dropouts += refused
        datasets = site_datasets(sc, sites)
        log.info("sites: %s", ", ".join(f"{x.name} ({x.dataset}@{x.size}, {x.num_examples} examples)"
                                        for x in sorted(sites.values(), key=lambda x: x.name)))
        keys = {n: list(build_pretext_model(self.cfg, [(x.dataset, x.size)], self.objective).state_dict())
                for n, x in sites.items()}
        arrays = initial = self.initial_arrays(datasets)
        ckpt = self.log.resume(fallback=s.fallback_checkpoint) if s.resume else None
        if not s.resume:
            self.log.truncate(0)
        if ckpt is not None:
            arrays = ckpt["arrays"]
            self.state = RunState(**ckpt["state"])
            self.state.dropouts += refused
            log.info("resuming %s after round %d", sc.name, self.state.round)
        for flag, _ in datasets:  # what an export needs to rebuild a model for a site's own dataset
            if get_info(flag).imported:
                self.state.datasets[flag] = public_card(get_info(flag))
        for site in sites.values():
            self.state.clients.setdefault(site.name, {"dataset": site.dataset, "size": site.size,
                                                      "num_examples": site.num_examples,
                                                      "epsilon": None, "delta": None})
        instructor = Instructor(sc, data_dir=s.data_dir, privacy_states=self.state.privacy_states,
                                faults=s.simulation)
        strategy = make_strategy(sc, sites, keys, instructor)
        if ckpt is not None:
            strategy.server_optimizer.load_state_dict(ckpt["server_optimizer"])
        strategy.summary()
        ev = sc.evaluation
        evaluator = DownstreamEvaluator(
            self.cfg, datasets, data_dir=s.data_dir, linear_probe=ev.linear_probe, fine_tune=ev.fine_tune,
            fine_tune_epochs=ev.fine_tune_epochs, label_fraction=ev.label_fraction,
            max_train_examples=ev.max_train_examples, seed=sc.seed, device=resolve_device(sc.device))

        rounds = sc.training.rounds
        bar = progress(rounds, self.state.round, enabled=s.progress)
        started = time.monotonic() - self.state.wall_seconds
        record = ArrayRecord(array_dict={k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})
        for rnd in range(self.state.round + 1, rounds + 1):
            t0 = time.monotonic()
            messages = list(strategy.configure_train(rnd, record, ConfigRecord(), grid))
            replies = self.exchange(grid, messages, timeout=sc.strategy.round_timeout,
                                    names={m.metadata.dst_node_id: sites[m.metadata.dst_node_id].name
                                           for m in messages})
            try:
                record, agg = strategy.aggregate_train(rnd, replies)
            except RoundFailed as e:
                self.state.note_round(rnd, strategy.report)
                self.log.append_round(rnd, strategy.report, time.monotonic() - t0, None)
                raise SetupError(f"{e}; the last good checkpoint (round {self.state.round}) is intact: "
                                 "fix the sites and rerun with --resume") from None
            downstream = None
            if rnd == rounds or (ev.eval_every and rnd % ev.eval_every == 0):
                downstream = evaluator.evaluate_round(rnd, record.to_torch_state_dict())
                self.state.downstream[rnd] = downstream
            self.state.note_round(rnd, strategy.report)
            self.log.append_round(rnd, strategy.report, time.monotonic() - t0, downstream)
            self.state.round = rnd
            self.state.wall_seconds = time.monotonic() - started
            self.log.checkpoint(rnd, {k: v.numpy() for k, v in record.items()},
                                strategy.server_optimizer.state_dict(), self.state, sc)
            bar.update(1)
            bar.write(round_line(rnd, rounds, agg, downstream, strategy.report.dropped))
        bar.close()
        self.collect_late(grid, grace=min(30.0, sc.strategy.round_timeout))
        if ev.audit:
            final = {k: v.numpy() for k, v in record.items()}
            for name, result in audit_sites(sc, self.cfg, self.objective, list(sites.values()), final=final,
                                            initial=initial, splits=evaluator.splits).items():
                self.state.clients.setdefault(name, {})["audit"] = result
            self.state.wall_seconds = time.monotonic() - started
        client_dp = (client_dp_summary(sc.client_dp, clients=len(sites), rounds=self.state.round)
                     if sc.client_dp is not None else None)
        summary = self.log.write_summary(sc, self.state, global_bytes=sum(v.numpy().nbytes for v in record.values()),
                                         client_dp=client_dp)
        write_report(self.log.out, summary, self.log.metrics())
        return summary

    # ---- messages -----------------------------------------------------------------------------
    def exchange(self, grid: Grid, messages: list[Message], *, timeout: float, names: dict[int, str]) -> list[Message]:
        """Push a round's messages and pull replies until all are in or ``timeout`` passes.

        Messages still unanswered stay outstanding: a site that replies late has still spent privacy
        budget, so later pulls (every round, and once after the last) record the privacy figures of
        late replies, though their weights are never averaged into a later round.
        """
        ids = {str(i) for i in grid.push_messages(messages)}
        by_id = {m.metadata.message_id: names[m.metadata.dst_node_id] for m in messages}
        deadline = time.monotonic() + timeout
        replies: list[Message] = []
        while True:
            for m in grid.pull_messages(ids | set(self.outstanding)):
                rid = m.metadata.reply_to_message_id
                if rid in ids:
                    replies.append(m)
                    ids.discard(rid)
                elif rid in self.outstanding:
                    self._note_late(self.outstanding.pop(rid), m)
            if not ids or time.monotonic() >= deadline:
                break
            time.sleep(0.1)
        self.outstanding.update({i: by_id[i] for i in ids})
        return replies

    def collect_late(self, grid: Grid, *, grace: float) -> None:
        """After the last round: wait up to ``grace`` seconds for outstanding replies' privacy figures."""
        deadline = time.monotonic() + grace
        while self.outstanding:
            for m in grid.pull_messages(set(self.outstanding)):
                if m.metadata.reply_to_message_id in self.outstanding:
                    self._note_late(self.outstanding.pop(m.metadata.reply_to_message_id), m)
            if not self.outstanding or time.monotonic() >= deadline:
                break
            time.sleep(0.2)
        for name in sorted(set(self.outstanding.values())):
            log.warning("%s never answered a train message: whatever privacy it spent on it is in its own "
                        "ledger, not in this summary", name)

    def _note_late(self, name: str, msg: Message) -> None:
        if msg.has_error() or PRIVACY not in msg.content.config_records:
            return
        record = dict(msg.content.config_records[PRIVACY])
        if history_steps(str(record["state"])) >= history_steps(self.state.privacy_states.get(name)):
            self.state.note_privacy(name, record)
            log.info("late reply from %s: its privacy spend (%d steps, epsilon %.3g) is recorded; its weights are "
                     "not used", name, int(record["steps"]), float(record["epsilon"]))
