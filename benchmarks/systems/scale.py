"""The ``scale`` part: ``medfl run`` over 100 simulated sites, 10 sampled per round: seconds per round
and the peak memory of the process tree."""
from __future__ import annotations

import logging
import statistics
from pathlib import Path
from typing import Any



log = logging.getLogger("benchmarks.systems")

from benchmarks.systems.runs import CONFIGS, run_medfl


def part_scale(data_dir: str, work: Path, *, parts: int, fraction: float, rounds: int, timeout: float
               ) -> dict[str, Any]:
    sets = [f"hospitals.0.partition.parts={parts}", f"strategy.fraction_train={fraction}", f"training.rounds={rounds}"]
    run = run_medfl(CONFIGS / "non-iid.yaml", sets, data_dir, work / "scale-medfl", timeout=timeout,
                    sample_memory=True)
    secs = [r["seconds"] for r in run["rounds"]]
    training_rounds = [r["seconds"] for r in run["rounds"] if not r["evaluated"]]
    return {"scenario": "non-iid", "clients": parts, "fraction_train": fraction, "sampled_per_round": [
        r["sampled"] for r in run["rounds"]], "rounds_planned": rounds, "sets": sets, "run": run,
        "round_seconds": secs, "median_round_seconds": statistics.median(secs) if secs else None,
        "median_training_round_seconds": statistics.median(training_rounds) if training_rounds else None,
        "peak_rss_bytes": run.get("memory", {}).get("peak_rss_bytes"),
        "peak_pss_bytes": run.get("memory", {}).get("peak_pss_bytes"),
        "note": "memory: summed over the medfl process, its descendants and its session (Ray's raylet, GCS, "
                "workers), sampled every 0.5 s; RSS counts shared pages once per process (upper bound), PSS "
                "splits them (closer to real use). The last round includes the central linear probe."}
