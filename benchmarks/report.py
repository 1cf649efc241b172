"""Regenerate ``benchmarks/README.md`` from the result JSONs (never typed by hand).

    python -m benchmarks.report

Reads ``results/quality-full.json`` (or, while no full run exists, ``results/quality-quick.json``,
labelled as such), ``results/throughput.json`` and ``results/systems.json``; the quality and systems
scripts call this at the end. Every benchmark also runs as ``medfl bench NAME``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from benchmarks.common import (ANCHOR_SOURCE, ANCHORS, REPO, RESULTS, fmt_bytes, fmt_ms, fmt_seconds, md_table,
                               read_json, write_atomic)
from benchmarks.quality.summary import COLUMN_NAMES, cost_table, rows_on_text, target_margin

README = REPO / "benchmarks" / "README.md"

FULL_COMMAND = "nohup python -m benchmarks.quality --data-dir ../shared/data/medmnist > quality-full.log 2>&1 &"
QUICK_COMMAND = "python -m benchmarks.quality --quick --data-dir ../shared/data/medmnist"
SYSTEMS_COMMAND = "python -m benchmarks.systems --data-dir ../shared/data/medmnist"


def _machine(m: dict[str, Any]) -> str:
    v = m["versions"]
    return (f"{m['cores_usable']} cores, {m['cpu_model']}, torch {v['torch']}, flwr {v['flwr']}, "
            f"opacus {v['opacus']}")


def _row_cpus(q: dict[str, Any]) -> str:
    """Where the summary's rows ran, when that is not only the machine that wrote the summary."""
    counts = q.get("rows_measured_on") or {}
    if list(counts) in ([], [q["machine"]["cpu_model"]]):
        return ""
    return f" (the summary was written there; its rows ran on: {rows_on_text(counts)})"


def _machines_by_part(sy: dict[str, Any]) -> str:
    """The machine of each systems part (parts are rerun one at a time, possibly on another box)."""
    parts: dict[str, list[str]] = {}
    for name, part in sy["parts"].items():
        parts.setdefault(_machine(part.get("machine", sy["machine"])), []).append(name)
    if len(parts) == 1:
        return next(iter(parts))
    return "; ".join(f"{', '.join(names)}: {m}" for m, names in parts.items())


def quality_section(q: dict[str, Any] | None, results: Path) -> list[str]:
    if q is None:
        return ["## Learning quality", "", f"No result yet: run `{QUICK_COMMAND}` (minutes) or the full benchmark "
                f"(`{FULL_COMMAND}`, hours).", ""]
    s = q["summary"]
    quick = q["quick"]
    lines = ["## Learning quality" + (" — QUICK MODE, NOT FOR THE NUMBERS" if quick else ""), ""]
    if quick:
        lines += [f"> **{q['label']}.** The full benchmark has not been run yet; these cells only show that every "
                  f"row runs. Full run: `{FULL_COMMAND}`.", ""]
    seeds = ", ".join(map(str, q["seeds"]))
    lines += [f"Test AUC (official MedMNIST metric), mean ± std over seeds {seeds}; "
              f"{q['rows_done']} of {q['rows_expected']} rows"
              + ("" if q["complete"] else " (**incomplete**)") + f"; {_machine(q['machine'])}{_row_cpus(q)}; "
              f"details in [results/quality-{q['preset']}.md](results/quality-{q['preset']}.md).", ""]
    earlier = sorted(results.glob("*/quality-full.md"))  # full benchmarks of earlier configurations, kept whole
    if earlier:
        lines += ["Full benchmarks of earlier configurations: "
                  + ", ".join(f"[{p.parent.name}](results/{p.parent.name}/{p.name})" for p in earlier)
                  + " (each folder's README says what changed).", ""]
    if q.get("plot") and (results / q["plot"]).exists():
        lines += [f"![Test AUC per method and dataset](results/{q['plot']})", ""]
    cols = [(c, f"**{n}**" if c in ("federated_probe", "federated_finetune") else n) for c, n in COLUMN_NAMES.items()]
    rows = []
    for d in q["datasets"]:
        t = s["table"][d]
        fl = s["pairs"]["federated_minus_local_only_probe"][d]
        rows.append([d] + [fmt_ms(t[c]["auc"]) if c in t else "—" for c, _ in cols]
                    + [f"{ANCHORS[d]['auc']:.3f}", fmt_ms(fl, signed=True),
                       fmt_ms(s["label_efficiency"][d].get("federated@0.1")) + " vs "
                       + fmt_ms(s["label_efficiency"][d].get("random@0.1"))])
    lines += [md_table(["dataset"] + [n for _, n in cols] + ["ResNet-18 (MedMNIST v2)", "fed − local (LP)",
                                                             "10% labels: fed vs random (FT)"], rows), ""]
    lines += [f"LP = linear probe on the frozen encoder (every body block's pooled patch tokens, "
              f"`Medformer.probe_features`), FT = fine-tune. ResNet-18 = ResNet-18 (28) in 2D, "
              f"ResNet-18+3D in 3D ({ANCHOR_SOURCE}). Federated = keyed FedAvg over the five hospitals, run "
              "in-process on the product's own code: every round each site runs `client.round.train_round` (what "
              "its ClientApp runs) and the server combines the replies with `server.rounds.Aggregator` (what "
              "`KeyedFedAvg` runs); local-only skips the averaging; centralized is `medformer.train.train_pooled`; "
              "probes and fine-tunes are `medformer.eval` (`tests/test_house.py` checks the calls).", ""]
    if q.get("costs") and not quick:
        lines += ["What each method costs against what it buys:", ""] + cost_table(q["costs"])
    met = [t for t in q["targets"] if t["status"] == "met"]
    missed = [t for t in q["targets"] if t["status"] == "missed"]
    lines += [f"Targets{' (quick mode: meaningless)' if quick else ''}: {len(met)} met, {len(missed)} missed, "
              f"{len(q['targets']) - len(met) - len(missed)} not assessable"
              + ("; missed: " + "; ".join(f"{t['target']}{target_margin(t)}" for t in missed
                                          if t["kind"] != "seconds") if missed and not quick else "") + ".", ""]
    return lines


PEAK_FRACTION_TARGET = 0.5  # issue 12: the pretext step at >= 50% of the measured matmul peak


def systems_section(sy: dict[str, Any] | None) -> list[str]:
    lines = ["## Systems", ""]
    if sy is None:
        return lines + [f"No result yet: run `{SYSTEMS_COMMAND}`.", ""]
    p = sy["parts"]
    rows = []
    if "flops" in p:
        f = p["flops"]
        for k in ("2d", "3d"):
            cells = []
            for t, r in f["by_threads"].items():
                c = r["cases"][k]
                cells.append(f"{t} thread{'s' if t != '1' else ''}: {c['images_per_second_best']:.0f} images/s, "
                             f"{c['gflops_best']:.1f} GFLOP/s = **{c['fraction_of_peak_best']:.0%}** of "
                             f"{r['matmul_peak']['gflops']:.0f} GFLOP/s matmul peak")
            best = max(r["cases"][k]["fraction_of_peak_best"] for r in f["by_threads"].values())
            rows.append([f"pretext step (MAE + rotation), model `{f['model']}`, {k.upper()}, batch {f['batch']}: "
                         f"least-disturbed of {f['trials']} trials", "; ".join(cells),
                         f"≥ {PEAK_FRACTION_TARGET:.0%} of peak: {'met' if best >= PEAK_FRACTION_TARGET else 'missed'}",
                         str(f["load_average_before"])])
    if "overhead" in p:
        o = p["overhead"]
        r, raw = o["normalised_ratio_vs_bare_parallel"], o["raw_ratio_vs_bare_parallel"]
        rows.append(["federation overhead, quickstart round: `medfl run` / bare PyTorch loops "
                     f"({o['workers']} processes x 1 thread, same training and aggregation)",
                     f"**{r:.2f}x** normalised to each round's train_local floor; raw {raw:.2f}x "
                     f"({o['flower_mean_round_seconds']:.1f} s vs {o['bare_parallel_mean_round_seconds']:.1f} s per "
                     f"round; medians of {o['repeats']} alternations)",
                     f"≤ 1.15x: {'met' if r <= 1.15 else 'missed'}", str(o["runs"][0]["flower"]["load_average_before"])])
    if "scale" in p:
        s = p["scale"]
        ok = s["run"]["exit_code"] == 0 and s["peak_pss_bytes"] is not None
        pss = s["peak_pss_bytes"] or 0
        med = s["median_round_seconds"]
        rows.append([f"{s['clients']} simulated hospitals, {max(s['sampled_per_round'] or [0])} per round, "
                     f"{len(s['round_seconds'])} rounds",
                     (f"{med:.1f} s / round (median); " if med is not None else "")
                     + f"peak memory {fmt_bytes(pss)} PSS ({fmt_bytes(s['peak_rss_bytes'])} RSS sum)",
                     f"≤ 8 GB: {'met' if ok and pss <= 8e9 else 'missed'}", str(s["run"]["load_average_before"])])
    if "comm" in p:
        c = p["comm"]
        per = ", ".join(f"{n} {fmt_bytes(h['received_per_round'])} ({h['fraction_of_whole']:.0%})"
                        for n, h in c["hospitals"].items())
        rows.append(["bytes each way per hospital per round, keyed vs whole model "
                     f"({fmt_bytes(c['whole_model_bytes'])})", per + f"; {c['round_saving']:.0%} less in total",
                     "—", "—"])
    lines += [md_table(["measure", "result", "target", "load average"], rows), "",
              f"Measured on {_machines_by_part(sy)}, a CPU shared with other jobs: the load-average column says how "
              "busy it was (2.0 = both cores fully used by someone). Details: [results/systems.md](results/systems.md).",
              ""]
    return lines


THROUGHPUT_COMMAND = "python -m benchmarks.throughput"


def throughput_section(tp: dict[str, Any] | None, more: list[tuple[str, dict[str, Any]]] = ()) -> list[str]:
    """The throughput table of ``results/throughput.json`` (``tp``), then one per further result
    (``more``: its file stem and its JSON, e.g. another model preset)."""
    lines = ["## Training throughput and the cost of DP-SGD", ""]
    if tp is None:
        return lines + [f"No result yet: run `{THROUGHPUT_COMMAND}`.", ""]
    for stem, result in [("throughput", tp), *more]:
        lines += _throughput_table(result, stem)
    return lines


def _throughput_table(tp: dict[str, Any], stem: str) -> list[str]:
    fig = {(f["case"], f["objective"], f["dp"]): f for f in tp["figures"]}
    sm = tp["summary"]
    rows = []
    for (case, objective, dp), f in fig.items():
        if dp:
            continue
        key = f"{case}/{objective}"
        d = fig.get((case, objective, True))
        ok = sm["meets_dp_slowdown_target"].get(key)
        rows.append([case, objective, str(f["batch"]), f"{f['images_per_s_best']:,.0f} / {f['images_per_s']:,.0f}",
                     f"{d['images_per_s_best']:,.0f} / {d['images_per_s']:,.0f}" if d else "—",
                     f"**{sm['dp_slowdown_best'][key]:.2f}x** / {sm['dp_slowdown'][key]:.2f}x",
                     ("met" if ok else "missed") + (" (noisy row)" if sm["noisy_rows"].get(key) else "")])
    dp = tp["dp"]
    return [md_table(["case", "objective", "batch", "plain img/s (best / median)", "DP-SGD img/s (best / median)",
                      "DP cost (best / median)", f"≤ {sm['target_dp_slowdown']:g}x"], rows), "",
            f"Model `{tp.get('preset', 'default')}`, {tp['threads']} torch thread(s), plain and DP steps interleaved; DP-SGD = "
            f"{dp.get('clipping', 'hooks')} clipping, noise {dp['noise_multiplier']}, clip {dp['max_grad_norm']}. "
            f"2D masked reconstruction without DP: {fig[('2d-28', 'mae', False)]['images_per_s_best']:,.0f} img/s "
            f"best (target ≥ 1,000: {'met' if sm['meets_2d_mae_target'] else 'missed'}). Load average at the end "
            f"{tp['load_average_at_end']}; {_machine(tp['machine'])}. Details: "
            f"[results/{stem}.md](results/{stem}.md).", ""]


def build(results: Path = RESULTS) -> str:
    full = read_json(results / "quality-full.json")
    quick = read_json(results / "quality-quick.json")
    sy = read_json(results / "systems.json")
    lines = ["# Benchmarks", "",
             "<!-- Generated by `python -m benchmarks.report` from benchmarks/results/*.json. Do not edit. -->", ""]
    lines += quality_section(full or quick, results)
    tp = read_json(results / "throughput.json")
    # Further throughput results, where present: the scenarios' default preset (where it differs from
    # the benchmark's model: its 3D stem), and the benchmark's model on both cores (the 2D target's
    # own condition; the main table uses 1 thread, steadier on a shared machine).
    more = [(stem, r) for stem in ("throughput-default", "throughput-2threads")
            if (r := read_json(results / f"{stem}.json"))]
    lines += throughput_section(tp, more)
    lines += systems_section(sy)
    plan = read_json(results / "quality-full-plan.json")
    if plan and plan.get("estimated_seconds_by_threads"):
        floors = "; ".join(f"{fmt_seconds(e['best'])} at {t} thread{'s' if t != '1' else ''}"
                           for t, e in sorted(plan["estimated_seconds_by_threads"].items(), reverse=True))
        full_time = (f"estimated {floors} ({sum(plan['tflop'].values()):.0f} TFLOP counted by `--plan`, at the "
                     "pretext step's best measured FLOP/s); convolutions faster than that step (the small CNN's) "
                     "shorten a real run, Python overhead lengthens it, and on a busy CPU `--threads 1` "
                     "avoids the 2-thread stalls seen in the systems benchmark")
    else:
        full_time = "run `python -m benchmarks.quality --plan` for an estimate"
    size = (f"{plan['rows']} rows: 5 datasets x {len(plan['methods'])} methods x {len(plan['seeds'])} seeds"
            if plan and plan.get("methods") else "5 datasets x every method x 3 seeds")
    lines += ["## Rerun", "", md_table(["what", "command", "time"], [
        ["quality, quick (every row, tiny settings)", f"`{QUICK_COMMAND}`",
         fmt_seconds(quick["compute"]["this invocation"]) + " here" if quick else "minutes"],
        [f"quality, full ({size}; resumable: rerun the same command)",
         f"`{FULL_COMMAND}`", full_time],
        ["throughput, plain and DP-SGD (`--dp-clipping hooks` for Opacus's materialised per-sample gradients)",
         f"`{tp['command'] if tp else THROUGHPUT_COMMAND}`", "about 2 min"],
        ["systems (all parts; `--parts flops,overhead,scale,comm` for some)", f"`{SYSTEMS_COMMAND}`",
         fmt_seconds(sy["wall_seconds"]) + " here" if sy else "minutes"],
        ["this page", "`python -m benchmarks.report`", "instant"],
    ]), "",
        "Quality rows are appended to `results/quality-<preset>.jsonl` as they finish; pretrained weights are "
        "cached in `results/cache/` (not committed). Rows that read no pretraining (random init, the two "
        "from-scratch rows) are kept when only the pretext or the federation changes. Every result file states "
        "the machine, the command, the seeds and the wall time.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.split("\n\n")[0])
    p.add_argument("--results", default=str(RESULTS), help="results folder (default: benchmarks/results)")
    p.add_argument("--out", default=str(README), help="README to write (default: benchmarks/README.md)")
    args = p.parse_args(argv)
    write_atomic(Path(args.out), build(Path(args.results)))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
