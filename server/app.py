"""The ServerApp: aggregates the hospitals' Medformer weights round by round.

Run by ``medfl run`` (in-process simulation, settings handed over in ``$MEDFL_RUN_SPEC``) or by
Flower's own tooling (``flwr run .`` / ``flwr run . <connection>``), which passes
``[tool.flwr.app.config]`` and ``--run-config`` as ``context.run_config``:

    scenario          YAML scenario, relative to the app folder (default: quickstart)
    num-server-rounds, fraction-train, min-train-nodes, local-epochs, local-steps, batch-size,
    lr, eval-every, model-preset, round-timeout   override the scenario's fields
    data-dir          MedMNIST folder for central evaluation (default: $MEDMNIST_DATA)
    out-dir           output folder (default: runs/<scenario>-<time> under the current folder)
    expected-nodes    wait for this many sites (0 = simulation: one per scenario client;
                      -1 = deployment: whoever is connected after discovery-wait seconds;
                      unset: 0 under the simulation engine, -1 in a deployment)
    discovery-wait    seconds to let sites connect when expected-nodes is -1 (default 10)

Every key is declared in ``[tool.flwr.app.config]`` (the SuperLink refuses undeclared keys); the
empty string there means "not set: keep the scenario's value / the default above".

In a deployment (SuperNodes started with ``--node-config 'dataset=... data-dir=...'``) the sites
are discovered, not listed: the global model and the central evaluation cover exactly the
(dataset, size) pairs of the sites that answered discovery; the scenario's hospital list is
replaced by them (the scenario still supplies model, pretext, training, strategy, evaluation).
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from server.federation import Federation, RunSettings
from simulations.scenario import load_scenario

log = logging.getLogger("medfl.server")

APP_DIR = Path(__file__).resolve().parent.parent
SPEC_ENV = "MEDFL_RUN_SPEC"

# run-config key -> scenario field it overrides
RUN_CONFIG_FIELDS = {
    "num-server-rounds": "training.rounds",
    "local-epochs": "training.local_epochs",
    "local-steps": "training.local_steps",
    "batch-size": "training.batch_size",
    "lr": "training.lr",
    "fraction-train": "strategy.fraction_train",
    "min-train-nodes": "strategy.min_train_nodes",
    "round-timeout": "strategy.round_timeout",
    "eval-every": "evaluation.eval_every",
    "model-preset": "model.preset",
}

app = ServerApp()


def settings_from_run_config(run_config: dict, *, deployment: bool = False) -> RunSettings:
    """RunSettings from Flower's run config (``flwr run``); ``""`` means "not set".

    ``deployment``: the ServerApp talks to real SuperNodes (not the simulation engine); it decides
    what an unset ``expected-nodes`` means.
    """
    run_config = {k: v for k, v in run_config.items() if v != ""}
    scenario_path = Path(str(run_config.get("scenario", "simulations/configs/quickstart.yaml")))
    if not scenario_path.is_absolute():
        scenario_path = APP_DIR / scenario_path
    overrides = [f"{field}={run_config[key]}" for key, field in RUN_CONFIG_FIELDS.items() if key in run_config]
    scenario = load_scenario(scenario_path, overrides)
    data_dir = str(run_config.get("data-dir", "")) or os.environ.get("MEDMNIST_DATA")
    out = str(run_config.get("out-dir", "")) or f"runs/{scenario.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    expected = int(run_config.get("expected-nodes", -1 if deployment else 0))
    return RunSettings(
        scenario=scenario, out_dir=Path(out).resolve(), data_dir=data_dir,
        expected_nodes=len(scenario.clients()) if expected == 0 else (None if expected < 0 else expected),
        discovery_wait=float(run_config.get("discovery-wait", 10.0)),
        progress=False,
    )


def is_simulation(grid: Grid) -> bool:
    """True under Flower's simulation engine (``medfl run``, ``flwr run .``), False against SuperNodes."""
    try:
        from flwr.superlink.grid import InMemoryGrid
    except ImportError:  # pragma: no cover - layout of another Flower version
        return type(grid).__name__ == "InMemoryGrid"
    return isinstance(grid, InMemoryGrid)


def settings_from_spec(path: str) -> RunSettings:
    """RunSettings written by ``medfl run`` (scenario already validated and saved as config.yaml)."""
    spec = json.loads(Path(path).read_text())
    scenario = load_scenario(spec["config"])
    return RunSettings(scenario=scenario, out_dir=Path(spec["out_dir"]), data_dir=spec["data_dir"],
                       resume=spec["resume"], fallback_checkpoint=spec.get("fallback_checkpoint", False),
                       expected_nodes=len(scenario.clients()), progress=spec.get("progress", True))


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Discover the sites, run the rounds, evaluate and checkpoint, write the report."""
    spec = os.environ.get(SPEC_ENV)
    deployment = not is_simulation(grid)
    settings = (settings_from_spec(spec) if spec
                else settings_from_run_config(dict(context.run_config), deployment=deployment))
    summary = Federation(settings).run(grid)
    log.info("finished %s: %d rounds, summary in %s", summary["scenario"], summary["rounds_completed"],
             settings.out_dir / "summary.json")
