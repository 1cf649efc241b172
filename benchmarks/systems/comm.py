"""The ``comm`` part: bytes a site receives and sends per round with keyed aggregation, against the whole
model; checked against the bytes the overhead run's Flower strategy logged."""
from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch


log = logging.getLogger("benchmarks.systems")

from benchmarks.systems.runs import CONFIGS


def keyed_bytes(preset: str, datasets: Sequence[str], pretext: dict[str, float], mask_ratio: float
                ) -> dict[str, Any]:
    """Bytes of the keys each dataset's hospital holds (what it receives and sends) and of the global model."""
    from medformer.model import make_config
    from medformer.pretext import PretextObjective, build_pretext_model

    cfg = make_config(preset)
    objective = PretextObjective(pretext, mask_ratio=mask_ratio)

    def nbytes(model: torch.nn.Module) -> tuple[int, int]:
        sd = model.state_dict()
        return sum(v.numel() * v.element_size() for v in sd.values()), len(sd)

    with torch.device("meta"):
        whole, whole_keys = nbytes(build_pretext_model(cfg, [(d, 28) for d in datasets], objective))
        per = {d: nbytes(build_pretext_model(cfg, [(d, 28)], objective)) for d in datasets}
    return {"whole_model_bytes": whole, "whole_model_keys": whole_keys,
            "hospitals": {d: {"keyed_bytes": b, "keys": k, "fraction_of_whole": b / whole} for d, (b, k) in per.items()}}


def part_comm(overhead: dict[str, Any] | None) -> dict[str, Any]:
    from config import load_scenario

    sc = load_scenario(CONFIGS / "five-hospitals.yaml")
    names = {h.dataset: h.name for h in sc.hospitals}
    res = keyed_bytes(sc.model.preset, [d for d, _ in sc.datasets()], dict(sc.pretext), sc.mask_ratio)
    rows = {}
    for d, r in res["hospitals"].items():
        rows[names[d]] = {"dataset": d, "received_per_round": r["keyed_bytes"], "sent_per_round": r["keyed_bytes"],
                          "keys": r["keys"], "whole_model_bytes": res["whole_model_bytes"],
                          "fraction_of_whole": r["fraction_of_whole"]}
    total_keyed = sum(2 * r["received_per_round"] for r in rows.values())
    total_whole = 2 * res["whole_model_bytes"] * len(rows)
    out = {"scenario": "five-hospitals", "model": sc.model.preset, "dtype": "float32",
           "whole_model_bytes": res["whole_model_bytes"], "whole_model_keys": res["whole_model_keys"],
           "hospitals": rows, "round_total_keyed_bytes": total_keyed, "round_total_whole_bytes": total_whole,
           "round_saving": 1 - total_keyed / total_whole,
           "method": "computed from the keys a hospital's pretext model holds (the keys server.federation gives "
                     "each site and server.strategy sends); both directions carry the same keys"}
    # Cross-check: the bytes the overhead run's Flower strategy logged for the quickstart hospitals.
    if overhead and overhead.get("flower_bytes_sent"):
        qs = load_scenario(CONFIGS / "quickstart.yaml")
        computed = keyed_bytes(overhead["model"], [d for d, _ in qs.datasets()], dict(qs.pretext), qs.mask_ratio)
        qnames = {h.name: h.dataset for h in qs.hospitals}
        logged = overhead["flower_bytes_sent"]
        out["check_against_flower_run"] = {
            name: {"logged_bytes_sent": logged.get(name), "computed": computed["hospitals"][d]["keyed_bytes"],
                   "equal": logged.get(name) == computed["hospitals"][d]["keyed_bytes"]}
            for name, d in qnames.items()}
    return out
