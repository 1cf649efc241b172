"""``medfl export RUN_DIR --out MODEL_DIR [--round N]``: a federation's aggregated encoder (and the
pretext heads it has) as an exported model: ``model.safetensors`` + ``config.json`` + a model card.

Everything comes from the run's checkpoint of that round (SHA-256 checked): the global weights, the
resolved scenario, the sites (datasets, sizes, privacy figures) and the downstream results of that
round, which are the run's ``summary.json`` table when it is the last round.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from config import Scenario, dataset_label, scenario_from_dict
from medformer.data import DataError, register_public
from medformer.model import make_config
from medformer.pretext import PretextObjective, build_pretext_model
from medformer.pretrained import save_pretrained
from server.checkpoint import CheckpointError, list_checkpoints, load_checkpoint
from server.client_dp import client_dp_summary
from simulations.model_card import federation_card

log = logging.getLogger("medfl")


def pick_checkpoint(run_dir: Path, round_: int | None) -> tuple[int, Path]:
    """The checkpoint of ``round_`` (default: the last) in ``run_dir/checkpoints``."""
    if not run_dir.is_dir():
        raise DataError(f"{run_dir} is not a folder (give the output folder of `medfl run`)")
    found = list_checkpoints(run_dir / "checkpoints")
    if not found:
        raise DataError(f"{run_dir} holds no checkpoints (checkpoints/round-NNNN.pt): not the output folder of "
                        "`medfl run`, or the run stopped before its first round")
    if round_ is None:
        return found[-1]
    for r, path in found:
        if r == round_:
            return r, path
    raise DataError(f"--round {round_}: {run_dir} has checkpoints of rounds {', '.join(str(r) for r, _ in found)}")


def run_datasets(scenario: Scenario, state: dict) -> list[tuple[str, int]]:
    """The (flag, size) pairs of the sites that took part (scenario order first, then the others)."""
    found = {(c["dataset"], int(c.get("size", 28))) for c in state.get("clients", {}).values() if "dataset" in c}
    if not found:
        return scenario.datasets()
    ordered = [d for d in scenario.datasets() if d in found]
    return ordered + sorted(found - set(ordered))


def export_run(run_dir: str, out: str, round_: int | None = None) -> Path:
    """Export the global model of ``run_dir`` at ``round_`` to ``out``; returns the model folder."""
    run, out_dir = Path(run_dir), Path(out)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise DataError(f"--out {out_dir} exists and is not an empty folder; choose another")
    rnd, path = pick_checkpoint(run, round_)
    try:
        ckpt = load_checkpoint(path)
    except CheckpointError as e:
        raise DataError(str(e)) from None
    state = ckpt["state"]
    for flag, card in (state.get("datasets") or {}).items():  # a site's own datasets: known from discovery
        register_public(card, f"{path} (dataset {flag})")
    scenario = scenario_from_dict(ckpt["scenario"])
    cfg = make_config(scenario.model.preset, **scenario.model.overrides)
    objective = PretextObjective(scenario.pretext, mask_ratio=scenario.mask_ratio)
    datasets = run_datasets(scenario, state)
    with torch.random.fork_rng(devices=[]):
        model = build_pretext_model(cfg, datasets, objective)
    arrays = ckpt["arrays"]
    expected = set(model.state_dict())
    if set(arrays) != expected:
        missing, extra = sorted(expected - set(arrays)), sorted(set(arrays) - expected)
        raise DataError(f"{path}: its weights do not match the model of its scenario (missing {missing[:3]}, "
                        f"unexpected {extra[:3]})")
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in arrays.items()}, strict=True)

    downstream_by_round = state.get("downstream") or {}
    downstream = downstream_by_round.get(rnd)
    downstream = ({d: {m: {"auc": r["auc"], "acc": r["acc"]} for m, r in ms.items()} for d, ms in downstream.items()}
                  if downstream else None)
    client_dp = (client_dp_summary(scenario.client_dp, clients=len(state.get("clients", {})), rounds=rnd)
                 if scenario.client_dp is not None else None)
    pretext = {"weights": dict(scenario.pretext), "mask_ratio": scenario.mask_ratio}
    source = {"kind": "federation", "scenario": scenario.name, "run_dir": str(run.resolve()), "checkpoint": path.name,
              "round": rnd, "rounds_planned": scenario.training.rounds, "sites": state.get("clients", {}),
              "dropouts": state.get("dropouts", []), "downstream_round": rnd if downstream else None,
              "downstream": downstream, "client_dp": client_dp,
              "datasets": [dataset_label(f, s) for f, s in datasets]}

    def card(config: dict) -> str:
        return federation_card(config=config, scenario=scenario.to_dict(), state=state, round_=rnd,
                               downstream=downstream, downstream_round=rnd if downstream else None,
                               client_dp=client_dp, run_dir=str(run), checkpoint=path.name)

    saved = save_pretrained(model, out_dir, preset=scenario.model.preset, pretext=pretext, card=card, source=source)
    log.info("exported %s round %d (%d tensors) to %s", scenario.name, rnd, len(arrays), saved)
    return saved
