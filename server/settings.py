"""What a run is told: Flower's run config -> :class:`RunSettings`, the one way settings reach the
ServerApp (``flwr run`` passes ``[tool.flwr.app.config]`` and ``--run-config``; ``medfl run`` passes the
same keys, see ``server.app.with_run_config``).

    scenario          YAML scenario, relative to the app folder (default: quickstart)
    num-server-rounds, fraction-train, min-train-nodes, local-epochs, local-steps, batch-size,
    lr, eval-every, model-preset, round-timeout, device   override the scenario's fields
    data-dir          MedMNIST folder for central evaluation (default: $MEDMNIST_DATA)
    out-dir           output folder (default: <runs folder>/<scenario>-<time>)
    expected-nodes    wait for this many sites (0 = simulation: one per scenario site;
                      -1 = deployment: whoever is connected after discovery-wait seconds;
                      unset: 0 under the simulation engine, -1 in a deployment)
    discovery-wait    seconds to let sites connect when expected-nodes is -1 (default 10)
    resume            continue the run in out-dir from its newest checkpoint (default false)
    fallback-checkpoint  with resume: a damaged newest checkpoint falls back to the previous one
    progress          show a progress bar on stderr (default false; ``medfl run`` sets it)

Every key is declared in ``[tool.flwr.app.config]`` (the SuperLink refuses undeclared keys); the
empty string there means "not set: keep the scenario's value / the default above".

In a deployment the paths a run config names are confined to folders the coordinator configured in
the SuperLink's environment (whoever may submit a run must not read or write elsewhere on it):

    scenario   inside the app bundle (a relative path that stays in it), or under $MEDFL_SCENARIO_DIRS
    out-dir    under $MEDFL_RUNS_DIR (default: ./runs of the SuperLink's working folder)
    data-dir   under $MEDFL_DATA_DIRS (default: $MEDMNIST_DATA)

(``$MEDFL_*_DIRS`` hold one or more folders separated by ``:``.) Anything else is refused with a
:class:`RunConfigError` naming the key, the path and the allowed folders.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from config import Scenario, load_scenario
from medformer.data import register_data_dir

APP_DIR = Path(__file__).resolve().parent.parent


@dataclass
class RunSettings:
    """Everything the ServerApp needs besides the grid.

    Attributes:
        scenario: the validated scenario.
        out_dir: output folder (config.yaml, metrics.jsonl, summary.json, checkpoints/, report).
        data_dir: MedMNIST folder for central evaluation (and simulated sites).
        resume: continue from the newest checkpoint in out_dir.
        fallback_checkpoint: on a damaged newest checkpoint, use the previous good one.
        expected_nodes: wait for this many nodes before round 1 (simulation: one per site);
            None = take whoever is connected after ``discovery_wait`` seconds (deployment).
        discovery_timeout: give up waiting for nodes after this many seconds.
        discovery_wait: seconds to let sites connect when expected_nodes is None.
        progress: show a progress bar on stderr.
        simulation: the sites are the simulation engine's (injected faults are sent only then).
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
    simulation: bool = True


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
    "device": "device",
}

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
    """RunSettings from Flower's run config (``flwr run``, or ``medfl run``); ``""`` means "not set".

    ``deployment``: the ServerApp talks to real SuperNodes (not the simulation engine); it decides
    what an unset ``expected-nodes`` means, confines paths and refuses injected faults.
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
    if data_value and not deployment:  # a site's imported datasets, named by the scenario (cards in data-dir)
        register_data_dir(data_value)
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
            register_data_dir(data_value)  # imported datasets the coordinator holds files of (central evaluation)
    else:
        out_dir = Path(out_value).resolve()
    expected = int(run_config.get("expected-nodes", -1 if deployment else 0))
    return RunSettings(
        scenario=scenario, out_dir=out_dir, data_dir=data_value,
        resume=_flag(run_config, "resume"), fallback_checkpoint=_flag(run_config, "fallback-checkpoint"),
        expected_nodes=len(scenario.clients()) if expected == 0 else (None if expected < 0 else expected),
        discovery_wait=float(run_config.get("discovery-wait", 10.0)),
        progress=_flag(run_config, "progress"), simulation=not deployment,
    )


def _flag(run_config: dict, key: str) -> bool:
    """A boolean run-config value (TOML booleans, or the strings of ``--run-config``)."""
    value = run_config.get(key, False)
    return value if isinstance(value, bool) else str(value).lower() in ("true", "1", "yes")
