"""The ServerApp: aggregates the hospitals' Medformer weights round by round.

Run by ``medfl run`` (in-process simulation, settings handed over in ``$MEDFL_RUN_SPEC``) or by
Flower's own tooling (``flwr run .`` / ``flwr run . <connection>``), which passes
``[tool.flwr.app.config]`` and ``--run-config`` as ``context.run_config``:

    scenario          YAML scenario, relative to the app folder (default: quickstart)
    num-server-rounds, fraction-train, min-train-nodes, local-epochs, local-steps, batch-size,
    lr, eval-every, model-preset, round-timeout   override the scenario's fields
    data-dir          MedMNIST folder for central evaluation (default: $MEDMNIST_DATA)
    out-dir           output folder (default: runs/<scenario>-<time> under the runs folder)
    expected-nodes    wait for this many sites (0 = simulation: one per scenario client;
                      -1 = deployment: whoever is connected after discovery-wait seconds;
                      unset: 0 under the simulation engine, -1 in a deployment)
    discovery-wait    seconds to let sites connect when expected-nodes is -1 (default 10)

Every key is declared in ``[tool.flwr.app.config]`` (the SuperLink refuses undeclared keys); the
empty string there means "not set: keep the scenario's value / the default above".

In a deployment the paths a run config names are confined to folders the coordinator configured in
the SuperLink's environment (whoever may submit a run must not read or write elsewhere on it):

    scenario   inside the app bundle (a relative path that stays in it), or under $MEDFL_SCENARIO_DIRS
    out-dir    under $MEDFL_RUNS_DIR (default: ./runs of the SuperLink's working folder)
    data-dir   under $MEDFL_DATA_DIRS (default: $MEDMNIST_DATA)

(``$MEDFL_*_DIRS`` hold one or more folders separated by ``:``.) Anything else is refused with a
:class:`RunConfigError` naming the key, the path and the allowed folders.

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


class RunConfigError(ValueError):
    """A run-config value the coordinator does not allow (a path outside its configured folders)."""


def _roots(env: str, default: list[str]) -> list[Path]:
    value = os.environ.get(env, "")
    return [Path(p).expanduser().resolve() for p in (value.split(os.pathsep) if value else default) if p]


def confined(key: str, value: str, *, base: Path, roots: list[Path], env: str) -> Path:
    """``value`` (relative to ``base``) resolved, symlinks included; RunConfigError unless it lies in ``roots``."""
    path = Path(value).expanduser()
    path = (path if path.is_absolute() else base / path).resolve()
    if any(path == r or path.is_relative_to(r) for r in roots):
        return path
    allowed = ", ".join(map(str, roots)) or "none configured"
    raise RunConfigError(f"run-config {key}={value!r} resolves to {path}, outside the folders the coordinator allows "
                         f"({allowed}); the coordinator sets them in ${env} on the SuperLink")


def settings_from_run_config(run_config: dict, *, deployment: bool = False) -> RunSettings:
    """RunSettings from Flower's run config (``flwr run``); ``""`` means "not set".

    ``deployment``: the ServerApp talks to real SuperNodes (not the simulation engine); it decides
    what an unset ``expected-nodes`` means.
    """
    run_config = {k: v for k, v in run_config.items() if v != ""}
    scenario_value = str(run_config.get("scenario", "simulations/configs/quickstart.yaml"))
    data_value = str(run_config.get("data-dir", "")) or os.environ.get("MEDMNIST_DATA")
    runs = Path(os.environ.get("MEDFL_RUNS_DIR", "runs")).expanduser().resolve()
    if deployment:  # whoever submits the run does not choose where the coordinator reads and writes
        scenario_path = confined("scenario", scenario_value, base=APP_DIR,
                                 roots=[APP_DIR.resolve(), *_roots("MEDFL_SCENARIO_DIRS", [])], env="MEDFL_SCENARIO_DIRS")
    else:
        scenario_path = Path(scenario_value) if Path(scenario_value).is_absolute() else APP_DIR / scenario_value
    overrides = [f"{field}={run_config[key]}" for key, field in RUN_CONFIG_FIELDS.items() if key in run_config]
    scenario = load_scenario(scenario_path, overrides)
    if deployment and scenario.faults:
        raise RunConfigError(f"scenario {scenario_value!r} declares faults: fault injection is a simulation-only "
                             "testing aid, and deployed sites obey no fault orders")
    out_value = str(run_config.get("out-dir", "")) or str(runs / f"{scenario.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    if deployment:
        out_dir = confined("out-dir", out_value, base=runs, roots=[runs], env="MEDFL_RUNS_DIR")
        if data_value:
            data_value = str(confined("data-dir", data_value, base=Path.cwd(),
                                      roots=_roots("MEDFL_DATA_DIRS", [os.environ.get("MEDMNIST_DATA", "")]),
                                      env="MEDFL_DATA_DIRS"))
    else:
        out_dir = Path(out_value).resolve()
    expected = int(run_config.get("expected-nodes", -1 if deployment else 0))
    return RunSettings(
        scenario=scenario, out_dir=out_dir, data_dir=data_value,
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
