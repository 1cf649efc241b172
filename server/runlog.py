"""What a run writes and remembers: its state, ``metrics.jsonl`` (one line per round), ``summary.json``,
the round checkpoints (``server.checkpoint``) and the progress shown on the terminal.

:class:`RunState` is exactly what a checkpoint restores; everything in ``summary.json`` is derived
from it, so a resumed run's summary is the same as an uninterrupted one's.
"""
from __future__ import annotations

import json
import logging
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from config import Scenario
from medformer.files import write_text_atomic
from server.checkpoint import load_latest, save_checkpoint
from server.strategy import RoundReport

log = logging.getLogger("medfl.server")


@dataclass
class RunState:
    """What a checkpoint restores."""

    round: int = 0
    wall_seconds: float = 0.0
    privacy_states: dict[str, str] = field(default_factory=dict)
    clients: dict[str, dict] = field(default_factory=dict)      # name -> latest per-site facts
    dropouts: list[dict] = field(default_factory=list)          # {round, site, reason}
    downstream: dict[int, dict] = field(default_factory=dict)   # round -> results
    datasets: dict[str, dict] = field(default_factory=dict)     # imported dataset -> its public card

    def note_privacy(self, name: str, record: dict) -> None:
        """A site's DP-SGD figures from its reply's privacy record (refusals and late replies included)."""
        self.privacy_states[name] = str(record["state"])
        self.clients.setdefault(name, {}).update(privacy_figures(record))

    def note_round(self, rnd: int, report: RoundReport) -> None:
        for name, reason in report.dropped.items():
            self.dropouts.append({"round": rnd, "site": name, "reason": reason})
        for name, record in report.privacy.items():
            self.note_privacy(name, record)
        for name in report.trained:
            c = self.clients.setdefault(name, {})
            c["rounds_trained"] = c.get("rounds_trained", 0) + 1
            c["bytes_sent_per_round"] = report.bytes_sent.get(name)
            c["bytes_received_per_round"] = report.bytes_received.get(name)


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


class RunLog:
    """The output folder of a run: ``metrics.jsonl``, ``summary.json``, ``checkpoints/``."""

    def __init__(self, out: Path):
        self.out = Path(out)
        self.metrics_path = self.out / "metrics.jsonl"
        self.checkpoints = self.out / "checkpoints"

    def resume(self, *, fallback: bool) -> dict | None:
        """The newest intact checkpoint (None when there is none); ``metrics.jsonl`` is cut back to it."""
        ckpt = load_latest(self.checkpoints, fallback=fallback)
        self.truncate(ckpt["state"]["round"] if ckpt is not None else 0)
        return ckpt

    def truncate(self, last_round: int) -> None:
        """Drop metrics lines of rounds after ``last_round`` (they will be redone)."""
        if not self.metrics_path.exists():
            return
        keep = [line for line in self.metrics_path.read_text().splitlines()
                if line.strip() and json.loads(line)["round"] <= last_round]
        write_text_atomic(self.metrics_path, "".join(line + "\n" for line in keep))

    def append_round(self, rnd: int, report: RoundReport, seconds: float, downstream: dict | None) -> None:
        line = {"round": rnd, "seconds": round(seconds, 3), "sampled": report.sampled,
                "trained": {n: dict(m) for n, m in report.trained.items()}, "dropped": report.dropped,
                "bytes_sent": report.bytes_sent, "bytes_received": report.bytes_received}
        if downstream is not None:
            line["downstream"] = downstream
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(line) + "\n")

    def metrics(self) -> list[dict]:
        return [json.loads(x) for x in self.metrics_path.read_text().splitlines() if x.strip()] \
            if self.metrics_path.exists() else []

    def checkpoint(self, rnd: int, arrays: dict[str, np.ndarray], server_optimizer: dict, state: RunState,
                   scenario: Scenario) -> None:
        save_checkpoint(self.checkpoints, rnd, {"arrays": arrays, "server_optimizer": server_optimizer,
                                                "state": asdict(state), "scenario": scenario.to_dict()})

    def write_summary(self, scenario: Scenario, state: RunState, *, global_bytes: int,
                      client_dp: dict | None) -> dict[str, Any]:
        last = max(state.downstream) if state.downstream else None
        summary = {
            "scenario": scenario.name,
            "rounds_completed": state.round,
            "rounds_planned": scenario.training.rounds,
            "wall_seconds": round(state.wall_seconds, 2),
            "model": {"preset": scenario.model.preset, "global_bytes": global_bytes},
            "clients": state.clients,
            "downstream": {d: {m: {"auc": r["auc"], "acc": r["acc"]} for m, r in ms.items()}
                           for d, ms in (state.downstream.get(last) or {}).items()},
            "downstream_round": last,
            "dropouts": state.dropouts,
            "client_dp": client_dp,
            "imported_datasets": state.datasets,
        }
        write_text_atomic(self.out / "summary.json", json.dumps(summary, indent=2))
        return summary


def round_line(rnd: int, rounds: int, agg: dict | None, downstream: dict | None, dropped: dict) -> str:
    """The one line printed after each round."""
    parts = [f"round {rnd}/{rounds}"]
    if agg is not None:
        losses = " ".join(f"{k[5:]} {v:.3f}" for k, v in agg.items() if k.startswith("loss-"))
        if losses:  # sites under DP-SGD report none
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


def progress(total: int, done: int, *, enabled: bool):
    """A tqdm bar over rounds on stderr (or log lines when disabled)."""
    if not enabled:
        return _NoBar()
    from tqdm import tqdm
    return tqdm(total=total, initial=done, desc="rounds", unit="round", file=sys.stderr, dynamic_ncols=True)
