"""The federation run: discover sites, loop over rounds, evaluate, checkpoint, report.

We drive the rounds ourselves (rather than ``Strategy.start``) because a hospital consortium needs
what ``start`` lacks: a checkpoint after every round, resuming from the last one, a record of which
site dropped out when, and evaluation every ``eval_every`` rounds. The strategy is still a Flower
strategy (``KeyedFedAvg``) and its ``configure_train`` / ``aggregate_train`` do the round's work.
"""
from __future__ import annotations

import json
import logging
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from medformer.audit import membership_audit
from medformer.files import write_text_atomic
from medformer.model import make_config
from medformer.pretext import PretextObjective, build_pretext_model
from medformer.privacy import history_steps
from medformer.wire import CONFIG, PRIVACY, RoundInstructions
from server.aggregation import ServerOptimizer
from server.checkpoint import load_latest, save_checkpoint
from server.client_dp import KeyedServerSideFixedClipping, client_level_epsilon, default_client_delta
from server.evaluator import DownstreamEvaluator
from server.report import write_report
from server.strategy import KeyedFedAvg, RoundFailed, Site
from simulations.scenario import Scenario, partition_indices

log = logging.getLogger("medfl.server")

SITE = "site"  # ConfigRecord key of a query reply


class SetupError(RuntimeError):
    """The federation cannot start (no sites, a site refused, inconsistent scenario)."""


@dataclass
class RunSettings:
    """Everything the ServerApp needs besides the grid.

    Attributes:
        scenario: the validated scenario.
        out_dir: output folder (config.yaml, metrics.jsonl, summary.json, checkpoints/, report).
        data_dir: MedMNIST folder for central evaluation (and simulated hospitals).
        resume: continue from the newest checkpoint in out_dir.
        fallback_checkpoint: on a damaged newest checkpoint, use the previous good one.
        expected_nodes: wait for this many nodes before round 1 (simulation: one per client);
            None = take whoever is connected after ``discovery_wait`` seconds (deployment).
        discovery_timeout: give up waiting for nodes after this many seconds.
        discovery_wait: seconds to let sites connect when expected_nodes is None.
        progress: show a progress bar on stderr.
    """

    scenario: Scenario
    out_dir: Path
    data_dir: str | None = None
    resume: bool = False
    fallback_checkpoint: bool = False
    expected_nodes: int | None = None
    discovery_timeout: float = 300.0
    discovery_wait: float = 10.0
    progress: bool = True


@dataclass
class RunState:
    """What a checkpoint restores."""

    round: int = 0
    wall_seconds: float = 0.0
    privacy_states: dict[str, str] = field(default_factory=dict)
    clients: dict[str, dict] = field(default_factory=dict)      # name -> latest per-client facts
    dropouts: list[dict] = field(default_factory=list)          # {round, site, reason}
    downstream: dict[int, dict] = field(default_factory=dict)   # round -> results


def _query(grid: Grid, node_ids: list[int], payload: dict, timeout: float) -> dict[int, Message]:
    msgs = [Message(content=RecordDict({CONFIG: ConfigRecord({"roster": json.dumps(payload)})}),
                    message_type=MessageType.QUERY, dst_node_id=n) for n in node_ids]
    return {m.metadata.src_node_id: m for m in grid.send_and_receive(msgs, timeout=timeout)}


class Federation:
    def __init__(self, settings: RunSettings):
        self.s = settings
        sc = settings.scenario
        self.scenario = sc
        self.cfg = make_config(sc.model.preset, **sc.model.overrides)
        self.objective = PretextObjective(sc.pretext, mask_ratio=sc.mask_ratio)
        self.out = Path(settings.out_dir)
        self.state = RunState()
        self._clients = {c.name: c for c in sc.clients()}
        self.client_dp: dict | None = None
        self.outstanding: dict[str, str] = {}  # message id -> site: train messages not answered in time

    # ---- discovery ------------------------------------------------------------------------------
    def discover(self, grid: Grid) -> dict[int, Site]:
        """Ask every connected node who it is; build the roster of sites."""
        deadline = time.monotonic() + self.s.discovery_timeout
        want = self.s.expected_nodes
        if want is None:
            time.sleep(self.s.discovery_wait)
        while True:
            nodes = sorted(grid.get_node_ids())
            if (want is None and nodes) or (want is not None and len(nodes) >= want):
                break
            if time.monotonic() > deadline:
                raise SetupError(f"only {len(nodes)} of {want or 'any'} nodes connected after "
                                 f"{self.s.discovery_timeout:.0f} s")
            time.sleep(0.5)
        roster = {"clients": [asdict(c) for c in self.scenario.clients()], "seed": self.scenario.seed,
                  "data_dir": self.s.data_dir}
        replies = _query(grid, nodes, roster, timeout=self.s.discovery_timeout)
        sites: dict[int, Site] = {}
        for node_id in nodes:
            msg = replies.get(node_id)
            if msg is None or msg.has_error():
                reason = "no reply" if msg is None else msg.error.reason
                log.warning("node %d cannot join: %s", node_id, reason)
                self.state.dropouts.append({"round": 0, "site": f"node-{node_id}", "reason": reason})
                continue
            info = dict(msg.content.config_records[SITE])
            client = json.loads(str(info["client"]))
            keys = list(build_pretext_model(self.cfg, [(client["dataset"], client["size"])], self.objective)
                        .state_dict())
            sites[node_id] = Site(node_id, client["name"], client["dataset"], int(client["size"]), keys,
                                  int(info["num-examples"]), client)
        names = [s.name for s in sites.values()]
        if not sites:
            raise SetupError("no site could join the federation")
        if len(set(names)) != len(names):
            raise SetupError(f"two nodes claim the same site name: {sorted(names)}")
        return sites

    # ---- one hospital's orders --------------------------------------------------------------------
    def instructions(self, site: Site, rnd: int) -> RoundInstructions:
        sc = self.scenario
        training = asdict(sc.training)
        training["proximal_mu"] = sc.strategy.proximal_mu if sc.strategy.name == "fedprox" else 0.0
        training["threads"] = sc.simulation.threads_per_client
        return RoundInstructions(
            round=rnd, rounds=sc.training.rounds, seed=sc.seed, hospital=site.client,
            model={"preset": sc.model.preset, "overrides": dict(sc.model.overrides)},
            pretext=dict(sc.pretext), mask_ratio=sc.mask_ratio, training=training,
            privacy=self.privacy_of(site), privacy_state=self.state.privacy_states.get(site.name),
            data_dir=self.s.data_dir, extra=self.fault_for(site.name, rnd),
        )

    def fault_for(self, name: str, rnd: int) -> dict:
        """The injected fault (chaos tests) this client suffers in this round, as instructions extra."""
        for f in self.scenario.faults:
            if f.hospital == name and (not f.rounds or rnd in f.rounds):
                return {"fault": asdict(f)}
        return {}

    def privacy_of(self, site: Site) -> dict | None:
        """DP-SGD settings for a site: its scenario client's own, else the scenario's (deployment sites
        whose name the scenario does not list get the scenario-wide setting)."""
        spec = self._clients.get(site.name)
        privacy = spec.privacy if spec is not None else self.scenario.privacy
        return asdict(privacy) if privacy is not None else None

    def make_strategy(self, sites: dict[int, Site]) -> KeyedFedAvg | KeyedServerSideFixedClipping:
        """The keyed strategy, wrapped for client-level DP when the scenario asks for it."""
        st = self.scenario.strategy
        rule = {"median": "median", "trimmed-mean": "trimmed-mean"}.get(st.name, "mean")
        opt = {"fedadam": "fedadam", "fedavgm": "fedavgm"}.get(st.name, "fedavg")
        lr = st.server_lr if opt != "fedadam" or st.server_lr != 1.0 else 1e-2
        strategy = KeyedFedAvg(sites=sites, instructions=self.instructions, rule=rule, trim_fraction=st.trim_fraction,
                               server_optimizer=ServerOptimizer(opt, lr=lr, momentum=st.server_momentum),
                               fraction_train=st.fraction_train, min_train_nodes=st.min_train_nodes,
                               seed=self.scenario.seed, update_clip_norm=st.update_clip_norm)
        cdp = self.scenario.client_dp
        if cdp is None:
            return strategy
        # mode 'server' (the scenario refuses 'client' until the ClientApp can clip its own update)
        return KeyedServerSideFixedClipping(strategy, noise_multiplier=cdp.noise_multiplier,
                                            clipping_norm=cdp.clipping_norm,
                                            num_sampled_clients=len(strategy.sample(1, sites)))

    def client_dp_summary(self, sites: dict[int, Site]) -> dict | None:
        """Client-level epsilon after the rounds completed so far (one sampled Gaussian release each)."""
        cdp = self.scenario.client_dp
        if cdp is None:
            return None
        n = len(sites)
        q = 1.0  # no amplification claimed: hospitals are not sampled by secret Poisson sampling (server.client_dp)
        delta = cdp.target_delta if cdp.target_delta is not None else default_client_delta(n)
        eps = client_level_epsilon(noise_multiplier=cdp.noise_multiplier, sample_rate=q, rounds=self.state.round,
                                   delta=delta)
        return {"epsilon": eps if math.isfinite(eps) else None, "delta": delta,
                "noise_multiplier": cdp.noise_multiplier, "clipping_norm": cdp.clipping_norm, "sample_rate": q,
                "rounds": self.state.round, "clients": n, "accountant": "rdp", "mode": cdp.mode}

    def audit(self, sites: dict[int, Site], record: ArrayRecord, evaluator: DownstreamEvaluator) -> None:
        """Membership-inference audit of the final global model, per site (``evaluation.audit``)."""
        sc = self.scenario
        threads = torch.get_num_threads()
        # A few threads at most: on a shared CPU, more OpenMP threads than free cores make these small
        # forward passes many times slower, not faster.
        torch.set_num_threads(max(1, min(threads, sc.simulation.threads_per_client)))
        try:
            self._audit(sites, record, evaluator)
        finally:
            torch.set_num_threads(threads)

    def _audit(self, sites: dict[int, Site], record: ArrayRecord, evaluator: DownstreamEvaluator) -> None:
        sc = self.scenario
        state = {k: torch.from_numpy(np.array(v.numpy())) for k, v in record.items()}
        initial = self.initial_arrays(self.site_datasets(sites))  # the reference: the untrained model saw no image
        for site in sorted(sites.values(), key=lambda s: s.name):
            t0 = time.monotonic()
            model = build_pretext_model(self.cfg, [(site.dataset, site.size)], self.objective)
            reference = build_pretext_model(self.cfg, [(site.dataset, site.size)], self.objective)
            keys = list(model.state_dict())
            model.load_state_dict({k: state[k] for k in keys})
            reference.load_state_dict({k: torch.from_numpy(initial[k]) for k in keys})
            splits = evaluator.splits(site.dataset, site.size)
            members = splits["train"]
            c = site.client
            if c.get("partition_parts"):
                parts = partition_indices(members.labels, c["partition_parts"], c.get("partition_method") or "iid",
                                          c.get("partition_alpha") or 0.5, sc.seed)
                members = members.subset(parts[c["partition_index"]])
            # Non-members: the validation split, carved from the same source as the training split. A test
            # split can come from elsewhere (PneumoniaMNIST's does): on one non-private quickstart model the
            # attack scored AUC 0.40 against test images but 0.49 against validation images, i.e. it
            # measured the shift between splits, not membership.
            result = membership_audit(model, self.objective, members=members, non_members=splits["val"],
                                      dataset=site.dataset, reference=reference,
                                      max_examples=sc.evaluation.audit_examples, seed=sc.seed)
            self.state.clients.setdefault(site.name, {})["audit"] = result.to_dict()
            log.info("audit %s: membership attack AUC %.3f (loss only %.3f), TPR@1%%FPR %.3f, %d+%d images, %.1f s",
                     site.name, result.auc, result.loss_auc, result.tpr_at_1pct_fpr, result.members,
                     result.non_members, time.monotonic() - t0)

    # ---- the run ----------------------------------------------------------------------------------
    def site_datasets(self, sites: dict[int, Site]) -> list[tuple[str, int]]:
        """The (flag, size) pairs the connected sites hold: the scenario's order first (so a
        simulation's model is the same whoever connects first), then any a deployment adds."""
        found = {(s.dataset, s.size) for s in sites.values()}
        ordered = [d for d in self.scenario.datasets() if d in found]
        return ordered + sorted(found - set(ordered))

    def initial_arrays(self, datasets: list[tuple[str, int]]) -> dict[str, np.ndarray]:
        torch.manual_seed(self.scenario.seed)
        model = build_pretext_model(self.cfg, datasets, self.objective)
        return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}

    def run(self, grid: Grid) -> dict:
        sc = self.scenario
        self.out.mkdir(parents=True, exist_ok=True)
        # The sites that answer define the model and the evaluation: in a deployment nobody lists them.
        sites = self.discover(grid)
        datasets = self.site_datasets(sites)
        log.info("sites: %s", ", ".join(f"{s.name} ({s.dataset}@{s.size}, {s.num_examples} examples)"
                                        for s in sorted(sites.values(), key=lambda s: s.name)))
        arrays = self.initial_arrays(datasets)
        server_opt_state = None
        if self.s.resume:
            ckpt = load_latest(self.out / "checkpoints", fallback=self.s.fallback_checkpoint)
            if ckpt is not None:
                arrays = ckpt["arrays"]
                server_opt_state = ckpt["server_optimizer"]
                refused_now = self.state.dropouts  # sites that failed this session's discovery
                self.state = RunState(**ckpt["state"])
                self.state.dropouts += refused_now
                log.info("resuming %s after round %d", sc.name, self.state.round)
        _truncate_metrics(self.out / "metrics.jsonl", self.state.round)

        for site in sites.values():
            self.state.clients.setdefault(site.name, {"dataset": site.dataset, "size": site.size,
                                                      "num_examples": site.num_examples,
                                                      "epsilon": None, "delta": None})
        strategy = self.make_strategy(sites)
        if server_opt_state is not None:
            strategy.server_optimizer.load_state_dict(server_opt_state)
        strategy.summary()
        ev = sc.evaluation
        evaluator = DownstreamEvaluator(
            self.cfg, datasets, data_dir=self.s.data_dir, linear_probe=ev.linear_probe, fine_tune=ev.fine_tune,
            fine_tune_epochs=ev.fine_tune_epochs, label_fraction=ev.label_fraction,
            max_train_examples=ev.max_train_examples, seed=sc.seed)

        rounds = sc.training.rounds
        bar = _progress(rounds, self.state.round, enabled=self.s.progress)
        started = time.monotonic() - self.state.wall_seconds
        record = ArrayRecord(array_dict={k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})
        for rnd in range(self.state.round + 1, rounds + 1):
            t0 = time.monotonic()
            messages = list(strategy.configure_train(rnd, record, ConfigRecord(), grid))
            replies = self.exchange(grid, messages, timeout=sc.strategy.round_timeout,
                                    names={m.metadata.dst_node_id: sites[m.metadata.dst_node_id].name
                                           for m in messages})
            try:
                new_record, agg = strategy.aggregate_train(rnd, replies)
            except RoundFailed as e:
                self._note_round(rnd, strategy, None, time.monotonic() - t0)
                raise SetupError(f"{e}; the last good checkpoint (round {self.state.round}) is intact: "
                                 "fix the sites and rerun with --resume") from None
            record = new_record
            downstream = None
            if rnd == rounds or (ev.eval_every and rnd % ev.eval_every == 0):
                downstream = evaluator.evaluate_round(rnd, record.to_torch_state_dict())
                self.state.downstream[rnd] = downstream
            self._note_round(rnd, strategy, downstream, time.monotonic() - t0)
            self.state.round = rnd
            self.state.wall_seconds = time.monotonic() - started
            save_checkpoint(self.out / "checkpoints", rnd, {
                "arrays": {k: v.numpy() for k, v in record.items()},
                "server_optimizer": strategy.server_optimizer.state_dict(),
                "state": asdict(self.state), "scenario": sc.to_dict(),
            })
            bar.update(1)
            bar.write(_round_line(rnd, rounds, agg, downstream, strategy.report.dropped))
        bar.close()
        self.collect_late(grid, grace=min(30.0, sc.strategy.round_timeout))
        if ev.audit:
            self.audit(sites, record, evaluator)
            self.state.wall_seconds = time.monotonic() - started
        self.client_dp = self.client_dp_summary(sites)
        summary = self.summary(arrays_bytes=sum(v.numpy().nbytes for v in record.values()))
        write_report(self.out, summary, _read_metrics(self.out / "metrics.jsonl"))
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
        previous = self.state.privacy_states.get(name)
        if history_steps(str(record["state"])) >= history_steps(previous):
            self.state.privacy_states[name] = str(record["state"])
            self.state.clients.setdefault(name, {}).update(privacy_figures(record))
            log.info("late reply from %s: its privacy spend (%d steps, epsilon %.3g) is recorded; its weights are "
                     "not used", name, int(record["steps"]), float(record["epsilon"]))

    def _note_round(self, rnd: int, strategy: KeyedFedAvg, downstream: dict | None, seconds: float) -> None:
        rep = strategy.report
        for name, reason in rep.dropped.items():
            self.state.dropouts.append({"round": rnd, "site": name, "reason": reason})
        for name, rec in rep.privacy.items():  # DP-SGD figures, refusals included: a refusal spent nothing new
            self.state.privacy_states[name] = str(rec["state"])
            c = self.state.clients.setdefault(name, {})
            c.update(privacy_figures(rec))
        for name, m in rep.trained.items():
            c = self.state.clients.setdefault(name, {})
            c["rounds_trained"] = c.get("rounds_trained", 0) + 1
            c["bytes_sent_per_round"] = rep.bytes_sent.get(name)
            c["bytes_received_per_round"] = rep.bytes_received.get(name)
        line = {"round": rnd, "seconds": round(seconds, 3), "sampled": rep.sampled,
                "trained": {n: dict(m) for n, m in rep.trained.items()}, "dropped": rep.dropped,
                "bytes_sent": rep.bytes_sent, "bytes_received": rep.bytes_received}
        if downstream is not None:
            line["downstream"] = downstream
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(line) + "\n")

    def summary(self, *, arrays_bytes: int) -> dict:
        sc = self.scenario
        last = max(self.state.downstream) if self.state.downstream else None
        summary = {
            "scenario": sc.name,
            "rounds_completed": self.state.round,
            "rounds_planned": sc.training.rounds,
            "wall_seconds": round(self.state.wall_seconds, 2),
            "model": {"preset": sc.model.preset, "global_bytes": arrays_bytes},
            "clients": self.state.clients,
            "downstream": {d: {m: {"auc": r["auc"], "acc": r["acc"]} for m, r in ms.items()}
                           for d, ms in (self.state.downstream.get(last) or {}).items()},
            "downstream_round": last,
            "dropouts": self.state.dropouts,
            "client_dp": self.client_dp,
        }
        write_text_atomic(self.out / "summary.json", json.dumps(summary, indent=2))
        return summary


def privacy_figures(record: dict) -> dict:
    """summary.json's privacy fields of a site from its reply's privacy record (the site's own figures:
    its epsilon at its delta; ``steps`` = every DP step it has taken in this run)."""
    out = {"epsilon": float(record["epsilon"]), "delta": float(record["delta"]),
           "noise_multiplier": float(record["noise-multiplier"]), "sample_rate": float(record["sample-rate"]),
           "steps": int(record["steps"]), "max_grad_norm": float(record["max-grad-norm"]),
           "accountant": str(record["accountant"])}
    if record.get("site-policy"):
        out["site_policy"] = str(record["site-policy"])
    return out


def _truncate_metrics(path: Path, last_round: int) -> None:
    """Drop metrics lines of rounds after the checkpoint we resume from (they will be redone)."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["round"] <= last_round]
    write_text_atomic(path, "".join(line + "\n" for line in keep))


def _read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _round_line(rnd: int, rounds: int, agg, downstream: dict | None, dropped: dict) -> str:
    parts = [f"round {rnd}/{rounds}"]
    if agg is not None:
        losses = " ".join(f"{k[5:]} {v:.3f}" for k, v in agg.items() if k.startswith("loss-"))
        parts.append(f"loss {losses}")
        if "images-per-second" in agg:
            parts.append(f"{agg['images-per-second']:.0f} img/s")
    if dropped:
        parts.append("dropped " + ", ".join(dropped))
    if downstream:
        parts.append(" ".join(f"{d} AUC {ms['linear_probe']['auc']:.3f} (rand {ms['random_init']['auc']:.3f})"
                              for d, ms in downstream.items() if "linear_probe" in ms))
    return " | ".join(parts)


class _NoBar:
    def update(self, n): ...
    def write(self, s): log.info(s)
    def close(self): ...


def _progress(total: int, done: int, *, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm import tqdm
    return tqdm(total=total, initial=done, desc="rounds", unit="round", file=sys.stderr, dynamic_ncols=True)
