"""The ``medfl`` command line.

    medfl run CONFIG.yaml [--data-dir DIR] [--out DIR] [--set key=value]... [--resume]
    medfl data [--data-dir DIR] [--download FLAG[@SIZE]]
    medfl sweep-privacy CONFIG.yaml [--epsilons inf,16,8,4,2,1] [--repeats N] [--data-dir DIR] [--out DIR]
                        [--set key=value]... [--no-audit]

Exit codes: 0 done; 2 bad input (config, data, arguments: one line on stderr naming the field or
file, nothing written); 1 anything else.
"""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
import time
from pathlib import Path

from medformer.data import DataError, resolve_data_dir
from medformer.files import write_text_atomic
from config import Scenario, ScenarioError, check_data_files, load_scenario

log = logging.getLogger("medfl")

CLIENT_APP = "client.app:app"
CHAOS_CLIENT_APP = "client.faults:chaos_app"  # only for scenarios that declare faults


class UsageError(Exception):
    """Bad command-line input (exit code 2)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2, like every other bad input
        raise UsageError(f"{self.prog}: {message}")


def load_component(ref: str):
    """Import ``module:attribute`` (the app references of [tool.flwr.app.components])."""
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


def _quiet_flower(verbose: bool) -> None:
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    level = logging.INFO if verbose else logging.WARNING
    logging.getLogger("flwr").setLevel(level)


def prepare_out_dir(scenario: Scenario, config_path: Path, out: str | None, resume: bool) -> Path:
    """Check (nothing written yet) that the output folder suits a fresh run or a resume."""
    if resume:
        if not out:
            raise UsageError("--resume needs --out DIR: the folder of the run to continue")
        out_dir = Path(out)
        saved = out_dir / "config.yaml"
        if not saved.exists():
            raise UsageError(f"--resume: {out_dir} holds no run (no config.yaml)")
        previous = load_scenario(saved)
        if previous.to_dict() != scenario.to_dict():
            diff = sorted(k for k in scenario.to_dict() if scenario.to_dict()[k] != previous.to_dict().get(k))
            raise UsageError(f"--resume: the scenario differs from the run in {out_dir} (fields: {', '.join(diff)})")
        return out_dir
    out_dir = Path(out) if out else Path("runs") / f"{scenario.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    if out_dir.exists() and any(out_dir.iterdir()):
        raise UsageError(f"--out {out_dir} is not empty; pass --resume to continue that run or choose another folder")
    return out_dir


def cmd_run(args: argparse.Namespace) -> int:
    scenario = load_scenario(args.config, args.set)
    out_dir = prepare_out_dir(scenario, Path(args.config), args.out, args.resume)
    data_dir = str(resolve_data_dir(args.data_dir))
    check_data_files(scenario, data_dir)
    # --- inputs are valid: from here on we write ---
    out_dir.mkdir(parents=True, exist_ok=True)
    if not args.resume:
        write_text_atomic(out_dir / "config.yaml", scenario.to_yaml())
    _quiet_flower(args.verbose)
    # The ServerApp's one configuration path: run-config keys, as `flwr run --run-config` would set them.
    run_config = {"scenario": str((out_dir / "config.yaml").resolve()), "out-dir": str(out_dir.resolve()),
                  "data-dir": data_dir, "resume": args.resume, "fallback-checkpoint": args.fallback_checkpoint,
                  "progress": not args.no_progress}
    os.environ["MEDMNIST_DATA"] = data_dir
    n = len(scenario.clients())
    print(f"medfl: {scenario.name}: {n} hospitals, {scenario.training.rounds} rounds -> {out_dir}", file=sys.stderr)
    from flwr.simulation import run_simulation

    from server.app import with_run_config

    sim = scenario.simulation
    run_simulation(
        server_app=with_run_config(run_config),
        client_app=load_component(CHAOS_CLIENT_APP if scenario.faults else CLIENT_APP), num_supernodes=n,
        backend_config={"client_resources": {"num_cpus": sim.cpus_per_client, "num_gpus": 0.0},
                        "init_args": {"num_cpus": max(sim.cpus_per_client, os.cpu_count() or 1),
                                      "include_dashboard": False, "log_to_driver": args.verbose}},
        verbose_logging=args.verbose,
    )
    summary_path = out_dir / "summary.json"
    if not summary_path.exists():
        print(f"medfl: the run ended without a summary; see the log above (output in {out_dir})", file=sys.stderr)
        return 1
    summary = json.loads(summary_path.read_text())
    if summary["rounds_completed"] < scenario.training.rounds:
        print(f"medfl: only {summary['rounds_completed']} of {scenario.training.rounds} rounds completed", file=sys.stderr)
        return 1
    print(f"medfl: done in {summary['wall_seconds']:.0f} s; report: {out_dir / 'report.md'}", file=sys.stderr)
    for d, ms in summary["downstream"].items():
        cells = ", ".join(f"{m} AUC {r['auc']:.3f} ACC {r['acc']:.3f}" for m, r in ms.items())
        print(f"  {d}: {cells}")
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from simulations.data_cmd import run_data_command

    return run_data_command(args.data_dir, args.download)


def cmd_sweep(args: argparse.Namespace) -> int:
    from simulations.sweep import SweepError, parse_epsilons, plan_runs, run_sweep

    try:
        epsilons = parse_epsilons(args.epsilons)
        data_dir = str(resolve_data_dir(args.data_dir))
        base, _ = plan_runs(args.config, epsilons, args.repeats, args.set, audit=not args.no_audit)
        check_data_files(base, data_dir)
        _quiet_flower(args.verbose)
        return run_sweep(args.config, epsilons=epsilons, repeats=args.repeats, data_dir=data_dir, out=args.out,
                         sets=args.set, audit=not args.no_audit, progress=not args.no_progress, verbose=args.verbose)
    except SweepError as e:
        raise UsageError(str(e)) from None


BENCHMARKS = ("throughput", "quality", "systems", "report")


def cmd_bench(args: argparse.Namespace) -> int:
    """``medfl bench NAME ARGS...`` = ``python -m benchmarks.NAME ARGS...`` (same options, same results)."""
    import importlib

    module = importlib.import_module(f"benchmarks.{args.name}")
    return module.main(list(args.args)) or 0


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="medfl", description="Federated self-supervised pretraining of the Medformer on MedMNIST.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    r = sub.add_parser("run", help="run a scenario as a local Flower simulation")
    r.add_argument("config", help="scenario YAML, e.g. simulations/configs/quickstart.yaml")
    r.add_argument("--data-dir", help="MedMNIST folder (default: $MEDMNIST_DATA, else ~/.medmnist)")
    r.add_argument("--out", help="output folder (default: runs/<scenario>-<time>)")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a scenario field, e.g. --set training.rounds=2 (repeatable)")
    r.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    r.add_argument("--fallback-checkpoint", action="store_true",
                   help="with --resume: if the newest checkpoint is damaged, use the previous good one")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    r.add_argument("-v", "--verbose", action="store_true", help="show Flower's and Ray's logs")
    r.set_defaults(func=cmd_run)
    d = sub.add_parser("data", help="list the MedMNIST subsets and the state of their files")
    d.add_argument("--data-dir", help="MedMNIST folder (default: $MEDMNIST_DATA, else ~/.medmnist)")
    d.add_argument("--download", action="append", metavar="FLAG[@SIZE]", help="download a file (needs internet)")
    d.set_defaults(func=cmd_data)
    s = sub.add_parser("sweep-privacy", help="run a scenario at several privacy budgets; tabulate accuracy and leakage")
    s.add_argument("config", help="scenario YAML, e.g. simulations/configs/quickstart.yaml")
    s.add_argument("--epsilons", default="inf,16,8,4,2,1",
                   help="comma-separated target epsilons; inf = no DP (default: %(default)s)")
    s.add_argument("--repeats", type=int, default=1, help="runs per budget, seeds seed..seed+N-1 (default: 1)")
    s.add_argument("--data-dir", help="MedMNIST folder (default: $MEDMNIST_DATA, else ~/.medmnist)")
    s.add_argument("--out", help="output folder (default: runs/<scenario>-sweep-<time>); rerun with the same "
                                 "folder to continue an interrupted sweep")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a scenario field in every run (repeatable)")
    s.add_argument("--no-audit", action="store_true", help="skip the membership-inference audit")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.add_argument("-v", "--verbose", action="store_true", help="show Flower's and Ray's logs in the run logs")
    s.set_defaults(func=cmd_sweep)
    b = sub.add_parser("bench", help="run a benchmark (benchmarks/<name>.py); options after the name go to it",
                       description="Run a benchmark; `medfl bench NAME --help` lists its options.")
    b.add_argument("name", choices=BENCHMARKS, help="which benchmark")
    b.add_argument("args", nargs=argparse.REMAINDER, help="options of that benchmark")
    b.set_defaults(func=cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except (UsageError, ScenarioError, DataError) as e:
        print(f"medfl: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("medfl: interrupted; rerun with --resume --out DIR to continue from the last checkpoint", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
