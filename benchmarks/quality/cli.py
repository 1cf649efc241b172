"""Learning quality: does federated self-supervision pay off, and how close does it get to centralized?

    python -m benchmarks.quality --data-dir ../shared/data/medmnist            # full (hours; resumable)
    python -m benchmarks.quality --quick --data-dir ../shared/data/medmnist    # every row, tiny settings

One row per (method, dataset, seed), test AUC / ACC with MedMNIST's official metrics
(``medformer.eval``), appended to ``results/quality-<preset>.jsonl`` as soon as it is done, so
a long run can be stopped (Ctrl-C, kill) and continued by rerunning the same command. Pretrained
weights are cached under ``results/cache/`` (``*.pt``, not committed) for the same reason. A row is
found again by its fingerprint: the whole experiment's, or for the rows that read no pretraining
(random init and the two from-scratch rows) only the recipe and model they use, so a new pretext
reruns the pretrained rows alone; the DP row's adds its resolved privacy settings. Several runs may
append to one file at once (each skips a row another has written meanwhile); the summary is always
the whole experiment's, read from the file at the end.

Methods:
  random_init         linear probe of an untrained Medformer (same architecture and seed)
  local_only          each hospital pretrains alone: the federation's rounds with the averaging
                      step removed (same local steps, same batches, same round seeds)
  federated           keyed FedAvg over the hospitals of the five-hospitals scenario, then linear
                      probe and fine-tune (all labels)
  centralized         one model, one optimizer, the pooled data: the federation's batches (the same
                      number of steps per dataset) interleaved round-robin in one process
  dp_federated        the federation with DP-SGD at every hospital (epsilon 8, a per-sample pretext)
  supervised_scratch  the same model fine-tuned from random init on all labels
  cnn_scratch         a small GroupNorm CNN of about the same size, the same fine-tune recipe
  label_efficiency    fine-tune on 1% and 10% of the labels, federated init vs random init (the
                      100% points are the ``federated`` fine-tune and ``supervised_scratch`` rows)

The federation runs in-process, without Flower's messages but with the product's round: each round
every site runs ``client.round.train_round`` (what its ClientApp runs) on the instructions
``server.instructions.Instructor`` builds, and the server combines the replies with
``server.rounds.Aggregator`` (what ``server.strategy.KeyedFedAvg`` runs). See ``experiment.py``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import (ANCHOR_SOURCE, ANCHORS, DATASETS, RESULTS, command_line, fmt_seconds, load_average,
                               machine_info, now, write_atomic, write_result)
from benchmarks.quality.experiment import (HOLDOUT_SHARE, METHODS, PRESETS, PRETRAINED, PROBED, QUICK_LABEL, SPLITS,
                                           Experiment, append_row, read_rows, with_overrides)
from benchmarks.quality.plan import plan
from benchmarks.quality.plot import plot_quality
from benchmarks.quality.summary import evaluate_targets, method_costs, render_markdown, rows_measured_on, summarize
from config import ScenarioError
from medformer.data import DataError, resolve_data_dir

log = logging.getLogger("benchmarks.quality")

DEFAULT_SEEDS = {"full": (0, 1, 2), "quick": (0,)}
SPLIT_LABELS = {"test": "full benchmark", "val": "VALIDATION: choosing settings; the test split was not read",
                "holdout": f"HOLD-OUT: scored on a held-out {HOLDOUT_SHARE:.0%} of train, settings chosen on "
                           "validation; the test split was not read"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.quality", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny model, a few steps, 1 seed: exercises every row fast")
    p.add_argument("--seeds", default=None, help="comma-separated seeds (default: 0,1,2; quick: 0)")
    p.add_argument("--datasets", default=",".join(DATASETS),
                   help="hospitals of the federation and datasets evaluated (default: %(default)s)")
    p.add_argument("--evaluate", default=None, metavar="DATASETS",
                   help="score only these of --datasets (the federation keeps all of them); e.g. to choose a "
                        "fine-tune recipe on the small sites")
    p.add_argument("--methods", default=",".join(METHODS), help="rows to run (default: %(default)s)")
    p.add_argument("--rounds", type=int, help="override the preset's federated rounds")
    p.add_argument("--split", choices=SPLITS, default="test",
                   help="test: score the configuration (once); val: choose settings, every row scored on "
                        "validation and the test split never read; rows go to quality-<preset>-val.jsonl; "
                        f"holdout: judge how settings are chosen, rows learn from train less a stratified "
                        f"{HOLDOUT_SHARE * 100:.0f}%%, choose on validation and are scored on that held-out part (test "
                        "never read); rows go to quality-<preset>-holdout.jsonl")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="scenario override on top of the preset's (e.g. pretext={mae: 1}; repeatable)")
    p.add_argument("--dp-set", action="append", default=[], metavar="KEY=VALUE",
                   help="scenario override for the dp_federated row only (repeatable)")
    p.add_argument("--ft", action="append", default=[], metavar="FIELD=VALUE",
                   help="fine-tune / preset field override, YAML value (e.g. min_steps=300; repeatable)")
    p.add_argument("--data-dir", help="MedMNIST folder (default: $MEDMNIST_DATA, else ~/.medmnist)")
    p.add_argument("--out", default=str(RESULTS), help="results folder (default: benchmarks/results)")
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="torch threads (default: %(default)s)")
    p.add_argument("--summary-only", action="store_true", help="rewrite the summary from the JSONL; run nothing")
    p.add_argument("--plan", action="store_true",
                   help="print the work of the requested rows and an estimated wall time; run nothing")
    p.add_argument("--no-report", action="store_true", help="do not regenerate benchmarks/README.md")
    p.add_argument("-v", "--verbose", action="store_true", help="log every fine-tune epoch and pretraining round")
    return p.parse_args(argv)


def _csv(text: str, valid: Sequence[str] | None, what: str) -> list[str]:
    items = [x.strip() for x in text.split(",") if x.strip()]
    problem = None
    bad = [x for x in items if x not in valid] if valid is not None else []
    if not items:
        problem = f"--{what} is empty"
    elif bad:
        problem = f"unknown --{what} {', '.join(bad)}; choose from {', '.join(valid)}"
    elif valid is None and not all(x.lstrip("-").isdigit() for x in items):
        problem = f"--{what} must be comma-separated integers, got {text!r}"
    if problem:
        print(f"quality: error: {problem}", file=sys.stderr)
        raise SystemExit(2)
    return list(dict.fromkeys(items))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr, force=True)
    for name in ("medformer.eval.probe", "medformer.eval.finetune", "medformer.train"):
        logging.getLogger(name).setLevel(logging.INFO if args.verbose else logging.WARNING)
    t_start = time.perf_counter()
    preset_name = "quick" if args.quick else "full"
    preset = PRESETS[preset_name]
    if args.rounds is not None:
        preset = dataclasses.replace(preset, sets=tuple(s for s in preset.sets if not s.startswith("training.rounds="))
                                     + (f"training.rounds={args.rounds}",))
    try:
        preset = with_overrides(preset, sets=args.set, dp_sets=args.dp_set, fields=args.ft)
    except ValueError as e:
        print(f"quality: error: {e}", file=sys.stderr)
        return 2
    seeds = [int(x) for x in _csv(args.seeds or ",".join(map(str, DEFAULT_SEEDS[preset_name])), None, "seeds")]
    datasets = _csv(args.datasets, DATASETS, "datasets")
    methods = _csv(args.methods, METHODS, "methods")
    scored = _csv(args.evaluate, datasets, "evaluate") if args.evaluate else datasets
    torch.set_num_threads(max(1, args.threads))
    out = Path(args.out)
    try:
        data_dir = str(resolve_data_dir(args.data_dir))
        exp = Experiment(preset_name, preset, datasets, data_dir, out, split=args.split)
        for d in datasets:  # every file found and MD5-checked before hours of work, not midway
            exp.splits(d)
    except (DataError, ScenarioError) as e:
        print(f"quality: error: {e}", file=sys.stderr)
        return 2
    if args.plan:
        pl = plan(exp, seeds, methods, out / "systems.json")
        pl.update({"preset": preset_name, "fingerprint": exp.fingerprint, "threads": torch.get_num_threads(),
                   "command": command_line(), "machine": machine_info(), "finished_at": now()})
        print(json.dumps(pl, indent=2))
        if set(datasets) == set(DATASETS) and set(methods) == set(METHODS):  # the plan the README quotes
            path = out / f"quality-{preset_name}-plan.json"
            write_atomic(path, json.dumps(pl, indent=2) + "\n")
            print(f"wrote {path}", file=sys.stderr)
        for which in ("best", "median"):
            if f"estimated_seconds_{which}" in pl:
                print(f"estimated wall time at the {which} measured FLOP rate: "
                      f"{fmt_seconds(pl[f'estimated_seconds_{which}'])}", file=sys.stderr)
        return 0
    name = f"quality-{preset_name}" + ("" if args.split == "test" else f"-{args.split}")
    jsonl = out / f"{name}.jsonl"
    fingerprints = {m: exp.row_fingerprint(m) for m in METHODS}  # once: the CNN's builds two models
    # What a new probe (read-out or C grid) leaves alone (the same as ``fingerprints`` for rows without one).
    bases = {m: exp.row_fingerprint(m, probe=False) if m in PROBED else fingerprints[m] for m in METHODS}
    mine = stored_rows(jsonl, exp, fingerprints, restamp=not args.summary_only, report=True)
    todo = [(m, d, s) for s in seeds for m in methods for d in scored if (m, d, s) not in mine]
    log.info("quality (%s, fingerprint %s): %d rows done, %d to run; %d threads; data %s", preset_name,
             exp.fingerprint, len(mine), 0 if args.summary_only else len(todo), torch.get_num_threads(), data_dir)
    interrupted = False
    # each row says where it ran: a summary may gather several machines, and the SIMD flags matter too:
    # the same seed trains bitwise alike on one CPU but not across generations (avx2 vs avx512 kernels)
    machine = machine_info()
    if not args.summary_only:
        for i, (method, dataset, seed) in enumerate(todo, 1):
            if (method, dataset, seed) in stored_rows(jsonl, exp, fingerprints):
                log.info("[%d/%d] %s %s seed %d: written meanwhile by another run; skipped", i, len(todo),
                         method, dataset, seed)
                continue
            t0 = time.perf_counter()
            earlier = earlier_probe_row(jsonl, (method, dataset, seed), fingerprints[method], bases[method])
            try:
                metrics = exp.run_row(method, dataset, seed,
                                      earlier_fine_tune=earlier["metrics"].get("fine_tune") if earlier else None)
            except KeyboardInterrupt:
                interrupted = True
                log.warning("interrupted; the rows done are saved in %s; rerun the same command to continue", jsonl)
                break
            row = {"fingerprint": fingerprints[method], "base_fingerprint": bases[method],
                   "preset": preset_name, "split": args.split, "method": method, "dataset": dataset, "seed": seed,
                   "overrides": {"set": args.set, "dp_set": args.dp_set, "ft": args.ft, "rounds": args.rounds},
                   "metrics": metrics, "seconds": round(time.perf_counter() - t0, 3),
                   "threads": torch.get_num_threads(), "load_average": load_average(),
                   "cpu_model": machine["cpu_model"], "cpu_flags": machine["cpu_flags"], "finished_at": now()}
            if earlier:
                carried = earlier["seconds"] - earlier["metrics"]["linear_probe"].get("seconds", 0.0)
                row["seconds"] = round(row["seconds"] + carried, 3)
                row["reprobed"] = {"fingerprint": earlier["fingerprint"], "finished_at": earlier.get("finished_at"),
                                   "seconds_carried": round(carried, 3)}
            append_row(jsonl, row)
            cells = " ".join(f"{k} auc {v['auc']:.3f}" for k, v in metrics.items() if isinstance(v, dict) and "auc" in v)
            log.info("[%d/%d] %s %s seed %d: %s (%s)", i, len(todo), method, dataset, seed, cells,
                     fmt_seconds(row["seconds"]))

    # The summary is the whole experiment's, read again now: another run may have added rows meanwhile.
    mine = {k: r for k, r in stored_rows(jsonl, exp, fingerprints).items() if k[1] in datasets}
    rows = list(mine.values())
    all_seeds = sorted(set(DEFAULT_SEEDS[preset_name]) | set(seeds) | {k[2] for k in mine})
    expected = {(m, d, s) for s in all_seeds for m in METHODS for d in datasets}
    complete = expected <= mine.keys()
    summary = summarize(rows, datasets)
    compute = {"rows (sum of row wall times)": sum(r["seconds"] for r in rows)}
    cache = exp.pretrained_cache
    for method in PRETRAINED:
        secs = [json.loads(torch.load(f, weights_only=True)["log"]).get("seconds", 0.0)
                for f in sorted(cache.glob(f"{method}-seed*.pt"))]
        if secs:
            compute[f"{method} pretraining, per seed"] = sum(secs) / len(secs)
    compute["this invocation"] = time.perf_counter() - t_start
    payload = {
        "benchmark": "quality", "preset": preset_name, "quick": args.quick, "split": args.split,
        "label": QUICK_LABEL if args.quick else SPLIT_LABELS[args.split],
        "machine": machine_info(), "command": command_line(), "seeds": summary["seeds"], "datasets": datasets,
        "methods": list(METHODS), "fingerprint": exp.fingerprint, "settings": exp.describe(),
        "federation_note": "in-process, without Flower's messages: per round every site runs the product's "
                           "client.round.train_round and the server the product's server.rounds.Aggregator "
                           "(what KeyedFedAvg runs in `medfl run`)",
        "rows_done": len(expected & mine.keys()), "rows_expected": len(expected),
        "complete": complete, "interrupted": interrupted,
        "wall_seconds": compute["rows (sum of row wall times)"], "compute": compute, "finished_at": now(),
        "anchors": {d: ANCHORS[d] for d in datasets}, "anchor_source": ANCHOR_SOURCE,
        "summary": summary, "rows_file": jsonl.name, "rows_measured_on": rows_measured_on(rows),
    }
    payload["costs"] = method_costs(rows, summary, datasets)
    # Judged only on the test split of the full preset, and the time target only on the whole benchmark.
    payload["targets"] = evaluate_targets(summary, datasets, compute["rows (sum of row wall times)"],
                                          complete=complete and set(datasets) == set(DATASETS),
                                          seeds=len(all_seeds), judge=not args.quick and args.split == "test")
    payload["plot"] = f"{name}.png"
    plot_quality(payload, out / payload["plot"])
    js, md = write_result(out, name, payload, render_markdown(payload))
    log.info("wrote %s and %s (%s this invocation)", js, md, fmt_seconds(compute["this invocation"]))
    if not args.no_report and args.split == "test" and out.resolve() == RESULTS.resolve():
        from benchmarks import report
        try:
            report.main([])
        except Exception as e:  # the result files above are written; only the README's summary is stale
            log.warning("benchmarks/README.md not regenerated (%s: %s); run python -m benchmarks.report",
                        type(e).__name__, e)
    return 130 if interrupted else 0


def earlier_probe_row(jsonl: Path, key: tuple[str, str, int], fingerprint: str, base: str) -> dict[str, Any] | None:
    """The latest row of ``key`` (method, dataset, seed) of the same experiment (``base``, its
    fingerprint without the probe) whose linear probe had another read-out or C grid (not ``fingerprint``).

    A new probe re-fits the probe only: the row takes that row's federated fine-tune (which no
    probe touches) and carries its compute other than the probe (pretraining, fine-tune) in its
    ``seconds``, so the summed row time stays what the results cost. A row without a probe has
    ``base == fingerprint`` and never finds one.
    """
    if base == fingerprint:
        return None
    found = [r for r in read_rows(jsonl)
             if (r.get("method"), r.get("dataset"), r.get("seed")) == key
             and r.get("base_fingerprint", r.get("fingerprint")) == base
             and r.get("fingerprint") != fingerprint and "linear_probe" in r.get("metrics", {})]
    return found[-1] if found else None


def stored_rows(jsonl: Path, exp: Experiment, fingerprints: dict[str, str], *, restamp: bool = False,
                report: bool = False) -> dict[tuple[str, str, int], dict[str, Any]]:
    """This experiment's rows in ``jsonl``, by (method, dataset, seed). Read again before every row
    and before the summary: another run may be appending rows to the same file.

    A row written under the whole experiment's fingerprint by a method that now has its own
    (``Experiment.row_fingerprint``) counts as that method's; ``restamp`` appends it again under its
    own fingerprint, with ``restamped_from`` (appending is safe beside another run writing rows).
    """
    rows_all = read_rows(jsonl)
    mine = {(r["method"], r["dataset"], r["seed"]): r for r in rows_all
            if r.get("method") in fingerprints and r.get("fingerprint") == fingerprints[r["method"]]}
    for r in rows_all:
        key = (r.get("method"), r.get("dataset"), r.get("seed"))
        if (r.get("fingerprint") == exp.fingerprint and key[0] in fingerprints and key[0] not in PROBED
                and fingerprints[key[0]] != exp.fingerprint and key not in mine):
            mine[key] = {**r, "fingerprint": fingerprints[key[0]], "restamped_from": exp.fingerprint}
            if restamp:
                append_row(jsonl, mine[key])
    if report and len(rows_all) > len(mine):
        log.info("%s: %d rows of other settings (fingerprints) are kept but not used", jsonl.name,
                 len(rows_all) - len(mine))
    return mine


if __name__ == "__main__":
    sys.exit(main())
