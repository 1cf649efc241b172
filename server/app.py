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
                      -1 = deployment: whoever is connected after discovery-wait seconds)
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


def settings_from_run_config(run_config: dict) -> RunSettings:
    """RunSettings from Flower's run config (``flwr run``)."""
    scenario_path = Path(str(run_config.get("scenario", "simulations/configs/quickstart.yaml")))
    if not scenario_path.is_absolute():
        scenario_path = APP_DIR / scenario_path
    overrides = [f"{field}={run_config[key]}" for key, field in RUN_CONFIG_FIELDS.items() if key in run_config]
    scenario = load_scenario(scenario_path, overrides)
    data_dir = str(run_config.get("data-dir", "")) or os.environ.get("MEDMNIST_DATA")
    out = str(run_config.get("out-dir", "")) or f"runs/{scenario.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    expected = int(run_config.get("expected-nodes", 0))
    return RunSettings(
        scenario=scenario, out_dir=Path(out).resolve(), data_dir=data_dir,
        expected_nodes=len(scenario.clients()) if expected == 0 else (None if expected < 0 else expected),
        discovery_wait=float(run_config.get("discovery-wait", 10.0)),
        progress=False,
    )


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
    settings = settings_from_spec(spec) if spec else settings_from_run_config(dict(context.run_config))
    summary = Federation(settings).run(grid)
    log.info("finished %s: %d rounds, summary in %s", summary["scenario"], summary["rounds_completed"],
             settings.out_dir / "summary.json")
