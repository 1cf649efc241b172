"""The ``medfl`` command line.

    medfl run CONFIG.yaml [--data-dir DIR] [--out DIR] [--set key=value]... [--resume] [--device D]
    medfl data [--data-dir DIR] [--download FLAG[@SIZE]]
    medfl data import SRC --name NAME --task TASK [--labels labels.csv] --size 28|64 --out DIR
    medfl export RUN_DIR --out MODEL_DIR [--round N]
    medfl finetune MODEL_DIR --dataset FLAG [--data-dir DIR] [--label-fraction F] [--epochs E] [--linear-probe]
                   [--device D] [--out DIR]
    medfl predict MODEL_DIR --dataset FLAG (--split test|val|train [--data-dir DIR] | --images FILE.npz)
                  --out preds.csv [--device D]
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

from medformer.data import AUGMENTATIONS, DataError, register_data_dir, resolve_data_dir
from medformer.device import DeviceError, resolve_device
from medformer.eval.finetune import RECIPE
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


def gpus_per_client(scenario: Scenario, device, n_clients: int) -> float:
    """Flower's ``client-resources-num-gpus`` for each ClientApp: 0 on a CPU device; else the scenario's
    ``simulation.gpus_per_client``, or one GPU shared by the ClientApps that run at once."""
    if device.type != "cuda":
        return 0.0
    sim = scenario.simulation
    if sim.gpus_per_client is not None:
        return float(sim.gpus_per_client)
    at_once = max(1, min(n_clients, (os.cpu_count() or 1) // sim.cpus_per_client))
    return 1.0 / at_once


def cmd_run(args: argparse.Namespace) -> int:
    data_dir = str(resolve_data_dir(args.data_dir))
    register_data_dir(data_dir)  # a site's imported datasets (their cards) are names the scenario may use
    scenario = load_scenario(args.config, [*args.set, *([f"device={args.device}"] if args.device else [])])
    out_dir = prepare_out_dir(scenario, Path(args.config), args.out, args.resume)
    device = resolve_device(scenario.device)
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
    gpus = gpus_per_client(scenario, device, n)
    print(f"medfl: {scenario.name}: {n} hospitals, {scenario.training.rounds} rounds on {device}"
          f"{f' ({gpus:g} GPU per ClientApp)' if gpus else ''} -> {out_dir}", file=sys.stderr)
    from flwr.simulation import run_simulation

    from server.app import with_run_config

    sim = scenario.simulation
    run_simulation(
        server_app=with_run_config(run_config),
        client_app=load_component(CHAOS_CLIENT_APP if scenario.faults else CLIENT_APP), num_supernodes=n,
        backend_config={"client_resources": {"num_cpus": sim.cpus_per_client, "num_gpus": gpus},
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
    if getattr(args, "data_command", None) == "import":
        from simulations.import_cmd import run_import

        return run_import(args.src, name=args.name, task=args.task, labels=args.labels, size=args.size, out=args.out,
                          classes=args.classes, seed=args.seed, fractions=args.split_fractions, modality=args.modality,
                          license=args.license, progress=not args.no_progress)
    from simulations.data_cmd import run_data_command

    return run_data_command(args.data_dir, args.download)


def cmd_export(args: argparse.Namespace) -> int:
    from simulations.export_cmd import export_run

    out = export_run(args.run_dir, args.out, args.round)
    print(f"medfl export: {out} (model.safetensors, config.json, README.md); load it with "
          f"medformer.load_pretrained({str(out)!r}) or `medfl finetune {out} --dataset FLAG`", file=sys.stderr)
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from simulations.finetune_cmd import run_finetune

    m = run_finetune(args.model_dir, dataset=args.dataset, size=args.size, data_dir=args.data_dir,
                     label_fraction=args.label_fraction, epochs=args.epochs, lr=args.lr, encoder_lr=args.encoder_lr,
                     batch_size=args.batch_size, warmup=args.warmup, ema=args.ema, head_first=args.head_first,
                     seed=args.seed, augment=args.augment, probe=args.linear_probe,
                     max_train_examples=args.max_train_examples, device=args.device, out=args.out,
                     progress=not args.no_progress)
    print(f"{m['dataset']}: {m['method']} test AUC {m['auc']:.4f} ACC {m['acc']:.4f} (val AUC {m['val_auc']:.4f}, "
          f"{m['n_train']} labelled images, {m['device']}) -> {m['out']}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from simulations.predict_cmd import run_predict

    done = run_predict(args.model_dir, dataset=args.dataset, out=args.out, split=args.split, images=args.images,
                       size=args.size, data_dir=args.data_dir, device=args.device)
    if "auc" in done:
        print(f"{done['dataset']} {done['split']}: AUC {done['auc']:.4f} ACC {done['acc']:.4f} "
              f"({done['images']} images, official metrics)")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from simulations.sweep import SweepError, parse_epsilons, plan_runs, run_sweep

    try:
        epsilons = parse_epsilons(args.epsilons)
        data_dir = str(resolve_data_dir(args.data_dir))
        register_data_dir(data_dir)
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
    r.add_argument("--device", help="override the scenario's device: auto, cpu, cuda or cuda:N")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    r.add_argument("-v", "--verbose", action="store_true", help="show Flower's and Ray's logs")
    r.set_defaults(func=cmd_run)
    d = sub.add_parser("data", help="list the MedMNIST subsets and the state of their files; import a site's images")
    d.add_argument("--data-dir", help="MedMNIST folder (default: $MEDMNIST_DATA, else ~/.medmnist)")
    d.add_argument("--download", action="append", metavar="FLAG[@SIZE]", help="download a file (needs internet)")
    d.set_defaults(func=cmd_data)
    dsub = d.add_subparsers(dest="data_command", parser_class=_Parser)
    i = dsub.add_parser("import", help="a folder of PNG/JPEG images, NIfTI volumes or DICOM series as a dataset",
                        description="Read a site's own images (MONAI), resize them like MedMNIST, split them, and "
                                    "write an official-format npz plus a dataset card into --out.")
    i.add_argument("src", help="folder of the images (the label file's paths are relative to it)")
    i.add_argument("--name", required=True, help="the new dataset's name (lower-case letters, digits, '_')")
    i.add_argument("--task", required=True,
                   choices=["binary-class", "multi-class", "multi-label", "multi-label, binary-class",
                            "ordinal-regression"], help="the labels' task")
    i.add_argument("--labels", help="CSV with columns image,label[,split] (default: SRC/labels.csv)")
    i.add_argument("--size", type=int, default=28, help="pixels per side: 28 or 64 (2D also 128, 224; default 28)")
    i.add_argument("--out", required=True, help="data folder to write the npz and its card into")
    i.add_argument("--classes", help="label names in class order, comma-separated (default: the labels found)")
    i.add_argument("--seed", type=int, default=0, help="seed of the stratified split (default 0)")
    i.add_argument("--split-fractions", default="0.7,0.1,0.2", help="train,val,test shares (default 0.7,0.1,0.2)")
    i.add_argument("--modality", default="", help="what the images are, for the card (e.g. 'breast ultrasound')")
    i.add_argument("--license", default="", help="the data's license or terms, for the card")
    i.add_argument("--no-progress", action="store_true", help="no progress bar")
    e = sub.add_parser("export", help="a run's aggregated encoder as model.safetensors + config.json + model card")
    e.add_argument("run_dir", help="the output folder of `medfl run` (or of a deployed ServerApp)")
    e.add_argument("--out", required=True, help="model folder to create (must not exist, or be empty)")
    e.add_argument("--round", type=int, help="export this round's checkpoint (default: the last)")
    e.set_defaults(func=cmd_export)
    f = sub.add_parser("finetune", help="fine-tune an exported encoder (or fit a linear probe) on a site's labels")
    f.add_argument("model_dir", help="an exported model folder (medfl export, or an earlier medfl finetune)")
    f.add_argument("--dataset", required=True, help="MedMNIST flag, or an imported dataset's name (see --data-dir)")
    f.add_argument("--size", type=int, help="image size (default: the model's size for it, else 28)")
    f.add_argument("--data-dir", help="data folder (default: $MEDMNIST_DATA, else ~/.medmnist)")
    f.add_argument("--label-fraction", type=float, default=1.0, help="share of the labels used (default 1)")
    f.add_argument("--epochs", type=int,
                   help=f"fine-tuning epochs (default: the recipe chosen on validation, at least "
                        f"{RECIPE['min_epochs']} epochs and {RECIPE['min_steps']} steps)")
    f.add_argument("--lr", type=float, default=RECIPE["lr"], help="peak learning rate of the head (default %(default)g)")
    f.add_argument("--encoder-lr", type=float, default=RECIPE["encoder_lr"],
                   help="peak learning rate of the encoder (default %(default)g)")
    f.add_argument("--batch-size", type=int, default=RECIPE["batch_size"],
                   help="training batch size (default %(default)s)")
    f.add_argument("--warmup", type=float, default=RECIPE["warmup"],
                   help="share of the steps over which the learning rates rise linearly (default %(default)g)")
    f.add_argument("--head-first", type=float, default=RECIPE["head_first"],
                   help="share of the first steps that train the head alone, the encoder frozen (LP-FT; "
                        "default %(default)g)")
    f.add_argument("--ema", type=float, default=RECIPE["ema"],
                   help="decay per step of a moving average of the weights, which is then what is validated, "
                        "chosen and saved (0: none; default %(default)g)")
    f.add_argument("--max-train-examples", type=int, help="cap on labelled training images (stratified)")
    f.add_argument("--augment", choices=list(AUGMENTATIONS), default="none",
                   help="training augmentation: mirror (left-right flips, small shifts), views (flips on every "
                        "axis, zoom, shift, contrast) or none (default)")
    f.add_argument("--linear-probe", action="store_true", help="freeze the encoder; fit a logistic regression")
    f.add_argument("--seed", type=int, default=0, help="seed of the label subset, head init and shuffling")
    f.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    f.add_argument("--out", help="output folder (default: runs/finetune-<dataset>-<time>)")
    f.add_argument("--no-progress", action="store_true", help="no progress bar")
    f.set_defaults(func=cmd_finetune)
    q = sub.add_parser("predict", help="score images with a fine-tuned model (medmnist.Evaluator's CSV format)")
    q.add_argument("model_dir", help="a model folder written by medfl finetune")
    q.add_argument("--dataset", required=True, help="MedMNIST flag, or an imported dataset's name")
    q.add_argument("--split", choices=["test", "val", "train"], help="score this split of --dataset in --data-dir")
    q.add_argument("--images", help="or score these: an npz with an 'images' array in the dataset's format")
    q.add_argument("--size", type=int, help="image size (default: the model's size for the dataset)")
    q.add_argument("--data-dir", help="data folder (default: $MEDMNIST_DATA, else ~/.medmnist)")
    q.add_argument("--out", required=True, help="CSV to write: index, then one score per column, no header")
    q.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    q.set_defaults(func=cmd_predict)
    s = sub.add_parser("sweep-privacy", help="run a scenario at several privacy budgets; tabulate accuracy and leakage")
    s.add_argument("config", help="scenario YAML, e.g. simulations/configs/quickstart.yaml")
    s.add_argument("--epsilons", default="inf,16,8,4,2,1",
                   help="comma-separated target epsilons; inf = no DP (default: %(default)s)")
    s.add_argument("--repeats", type=int, default=1, help="runs per budget, seeds seed..seed+N-1 (default: 1)")
    s.add_argument("--data-dir", help="MedMNIST folder (default: $MEDMNIST_DATA, else ~/.medmnist)")
    s.add_argument("--out", help="output folder (default: runs/<scenario>-sweep-<time>); rerun with the same "
                                 "folder to continue an interrupted sweep, or with more --repeats to add repeats")
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
    except (UsageError, ScenarioError, DataError, DeviceError) as e:
        print(f"medfl: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("medfl: interrupted; rerun with --resume --out DIR to continue from the last checkpoint", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
