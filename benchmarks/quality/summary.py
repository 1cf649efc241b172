"""The quality benchmark's summary: mean ± std over seeds, paired per-seed differences, the targets and
the Markdown report."""
from __future__ import annotations

import collections
from collections.abc import Callable, Sequence
from typing import Any

from benchmarks.common import ANCHOR_SOURCE, ANCHORS, fmt_ms, fmt_seconds, header_lines, md_table, mean_std
from benchmarks.quality.experiment import HOLDOUT_SHARE, METHODS, QUICK_LABEL
from medformer.eval import PROBE_READOUT


#: The table's columns: name -> (method, evaluation).
COLUMNS: dict[str, tuple[str, str]] = {
    "random_init": ("random_init", "linear_probe"), "local_only": ("local_only", "linear_probe"),
    "federated_probe": ("federated", "linear_probe"), "centralized": ("centralized", "linear_probe"),
    "dp_federated_probe": ("dp_federated", "linear_probe"), "federated_finetune": ("federated", "fine_tune"),
    "supervised_scratch": ("supervised_scratch", "fine_tune"), "cnn_scratch": ("cnn_scratch", "fine_tune"),
}
#: The columns as people read them (tables and the plot).
COLUMN_NAMES: dict[str, str] = {
    "random_init": "random init + LP", "local_only": "local-only SSL + LP", "federated_probe": "federated SSL + LP",
    "centralized": "centralized SSL + LP", "dp_federated_probe": "federated SSL, DP eps 8 + LP",
    "federated_finetune": "federated SSL + FT", "supervised_scratch": "Medformer scratch FT",
    "cnn_scratch": "small CNN scratch FT",
}
#: Paired per-seed differences (a - b) of test AUC: name -> (a, b), each (method, evaluation).
PAIRS: dict[str, tuple[tuple[str, str], tuple[str, str]]] = {
    "federated_minus_random_init_probe": (("federated", "linear_probe"), ("random_init", "linear_probe")),
    "federated_minus_local_only_probe": (("federated", "linear_probe"), ("local_only", "linear_probe")),
    "federated_minus_centralized_probe": (("federated", "linear_probe"), ("centralized", "linear_probe")),
    "dp_minus_federated_probe": (("dp_federated", "linear_probe"), ("federated", "linear_probe")),
    "dp_minus_random_init_probe": (("dp_federated", "linear_probe"), ("random_init", "linear_probe")),
    "federated_finetune_minus_cnn": (("federated", "fine_tune"), ("cnn_scratch", "fine_tune")),
    "federated_finetune_minus_scratch": (("federated", "fine_tune"), ("supervised_scratch", "fine_tune")),
    "federated_minus_random_10pct_finetune": (("label_efficiency", "federated@0.1"),
                                              ("label_efficiency", "random@0.1")),
    "federated_minus_random_1pct_finetune": (("label_efficiency", "federated@0.01"),
                                             ("label_efficiency", "random@0.01")),
}


def summarize(rows: list[dict[str, Any]], datasets: Sequence[str]) -> dict[str, Any]:
    """Mean ± std over seeds per (dataset, column), label efficiency, paired per-seed differences."""
    by = {(r["method"], r["dataset"], r["seed"]): r["metrics"] for r in rows}
    seeds = sorted({r["seed"] for r in rows})

    def stat(method: str, dataset: str, evaluation: str, metric: str) -> dict[str, Any]:
        return mean_std(by[(method, dataset, s)].get(evaluation, {}).get(metric)
                        for s in seeds if (method, dataset, s) in by)

    table = {d: {c: {m: stat(meth, d, ev, m) for m in ("auc", "acc")} for c, (meth, ev) in COLUMNS.items()}
             for d in datasets}
    fractions = sorted({float(k.split("@")[1]) for r in rows if r["method"] == "label_efficiency" for k in r["metrics"]})
    label_eff: dict[str, dict[str, dict[str, Any]]] = {}
    for d in datasets:
        cells: dict[str, dict[str, Any]] = {}
        for f in fractions:
            for init in ("federated", "random"):
                cells[f"{init}@{f:g}"] = stat("label_efficiency", d, f"{init}@{f:g}", "auc")
        cells["federated@1"] = table[d]["federated_finetune"]["auc"]
        cells["random@1"] = table[d]["supervised_scratch"]["auc"]
        label_eff[d] = cells

    def paired(a: tuple[str, str], b: tuple[str, str], d: str) -> dict[str, Any]:
        diffs = []
        for s in seeds:
            ra, rb = by.get((a[0], d, s)), by.get((b[0], d, s))
            if ra and rb and a[1] in ra and b[1] in rb:
                diffs.append(ra[a[1]]["auc"] - rb[b[1]]["auc"])
        return {**mean_std(diffs), "values": diffs}

    pairs = {name: {d: paired(a, b, d) for d in datasets} for name, (a, b) in PAIRS.items()}
    epsilon = {d: mean_std(by[("dp_federated", d, s)].get("privacy", {}).get("epsilon")
                           for s in seeds if ("dp_federated", d, s) in by) for d in datasets}
    return {"seeds": seeds, "table": table, "label_efficiency": label_eff, "fractions": fractions + [1.0],
            "pairs": pairs, "dp_epsilon": epsilon}


def method_costs(rows: list[dict[str, Any]], summary: dict[str, Any], datasets: Sequence[str]) -> dict[str, Any]:
    """CPU-minutes per seed of each method (a row's wall time x its torch threads, averaged over the
    seeds each dataset has, summed over the datasets) next to its mean AUC over the datasets, per
    column: what a row costs against what it buys. ``partial`` when some dataset has no row yet."""
    costs: dict[str, Any] = {}
    for method in sorted({r["method"] for r in rows}, key=METHODS.index):
        mine = [r for r in rows if r["method"] == method]
        per_dataset = {d: [r["seconds"] * r.get("threads", 1) / 60 for r in mine if r["dataset"] == d]
                       for d in datasets}
        minutes = sum(sum(m) / len(m) for m in per_dataset.values() if m)
        cells = {COLUMN_NAMES[col]: [summary["table"][d][col]["auc"]["mean"] for d in datasets]
                 for col, (meth, _) in COLUMNS.items() if meth == method}
        if method == "label_efficiency":
            cells = {f"{init} init FT, {f:.0%} labels": [summary["label_efficiency"][d][f"{init}@{f:g}"]["mean"]
                                                          for d in datasets]
                     for f in summary["fractions"] if f < 1 for init in ("federated", "random")}
        auc = {name: sum(ms) / len(ms) for name, ms in cells.items() if all(m is not None for m in ms)}
        costs[method] = {"rows": len(mine), "seeds": sorted({r["seed"] for r in mine}),
                         "cpu_minutes_per_seed": minutes, "partial": not all(per_dataset.values()),
                         "mean_auc": auc}
    return costs


def evaluate_targets(s: dict[str, Any], datasets: Sequence[str], compute_seconds: float, *, complete: bool,
                     seeds: int, judge: bool) -> list[dict[str, Any]]:
    """The issue's targets: value, status (met / missed / n/a) and the margin (positive = met by).

    A target is judged (``judge``: the full preset on the test split) only on the mean of all
    ``seeds`` seeds; the 3-hour target only once the benchmark is ``complete``. ``kind`` says how
    to read the value: ``auc`` (an AUC or a difference of AUCs), ``count`` (datasets) or ``seconds``.
    """
    out: list[dict[str, Any]] = []

    def add(name: str, value: Any, margin: float | None, note: str = "", *, n: int | None = None,
            kind: str = "auc") -> None:
        short = n is not None and value is not None and n < seeds
        if short:
            note = (note + "; " if note else "") + f"{n} of {seeds} seeds so far"
        status = "n/a" if margin is None or short or not judge else ("met" if margin >= 0 else "missed")
        out.append({"target": name, "kind": kind, "value": value, "margin": margin, "status": status, "note": note})

    t, pairs = s["table"], s["pairs"]

    def cell(d: str, col: str) -> dict[str, Any]:
        return t[d][col]["auc"]

    def diff(name: str, d: str) -> dict[str, Any]:
        return pairs[name][d]

    def above(value: float | None, bound: float) -> float | None:  # the margin by which value clears bound
        return None if value is None else value - bound

    for d in datasets:
        c, a = cell(d, "federated_finetune"), ANCHORS[d]["auc"]
        add(f"{d}: federated SSL + fine-tune AUC >= {ANCHORS[d]['model']} {a:.3f}", c["mean"], above(c["mean"], a),
            n=c["n"])
    gains = {"breastmnist": 0.04, "adrenalmnist3d": 0.04, "vesselmnist3d": 0.04, "pneumoniamnist": 0.03}
    for d, g in gains.items():
        if d in datasets:
            p = diff("federated_minus_random_init_probe", d)
            add(f"{d}: federated SSL probe AUC >= random-init probe + {g:.2f}", p["mean"], above(p["mean"], g),
                "value = paired difference, federated - random init", n=p["n"])
    if "retinamnist" in datasets:
        c = cell("retinamnist", "federated_probe")
        add("retinamnist: federated SSL probe AUC >= 0.740", c["mean"], above(c["mean"], 0.740), n=c["n"])
    for d in datasets:
        p = diff("federated_minus_local_only_probe", d)
        add(f"{d}: federated probe AUC >= local-only", p["mean"], p["mean"], "value = paired difference", n=p["n"])
    for d in ("breastmnist", "retinamnist"):
        if d in datasets:
            p = diff("federated_minus_local_only_probe", d)
            std = t[d]["local_only"]["auc"]["std"]
            add(f"{d}: federated probe AUC above local-only by more than one std (small site)", p["mean"],
                None if std is None else above(p["mean"], std),
                f"one std = the local-only probe's std over seeds ({'—' if std is None else f'{std:.3f}'})", n=p["n"])

    def count(name: str, pair: str, passes: Callable[[float], bool], need: int = 3) -> None:
        values = {d: diff(pair, d)["mean"] for d in datasets}
        # A dataset counts once all its seeds are in; until then it is unknown, like one not run yet.
        known = [v for d, v in values.items() if v is not None and diff(pair, d)["n"] >= seeds]
        hits, unknown = sum(passes(v) for v in known), len(values) - len(known)
        # Settled only once the unknown datasets could not change the outcome.
        settled = len(values) >= need and (hits >= need or hits + unknown < need)
        add(name, values, float(hits - need) if settled else None,
            f"{hits} of {len(known)} datasets with all seeds" + (f"; {unknown} not complete yet" if unknown else ""),
            kind="count")

    count(">= 3 datasets where federated init beats random init by >= 0.03 AUC at 10% labels (validation "
          "subsampled too)", "federated_minus_random_10pct_finetune", lambda g: g >= 0.03)
    count("DP-SGD epsilon 8: federated probe within 0.03 of the non-private one on >= 3 of 5",
          "dp_minus_federated_probe", lambda c: c >= -0.03)
    for d in datasets:
        p = diff("dp_minus_random_init_probe", d)
        add(f"{d}: DP-SGD epsilon 8 federated probe above random init", p["mean"], p["mean"],
            "value = paired difference", n=p["n"])
    for d in datasets:
        p = diff("federated_finetune_minus_cnn", d)
        add(f"{d}: federated SSL + fine-tune >= the small supervised CNN", p["mean"], p["mean"],
            "value = paired difference", n=p["n"])
    add("whole quality benchmark within 3 h of summed row time on 2 cores", compute_seconds,
        (3 * 3600 - compute_seconds) if complete else None,
        "sum of the rows' wall times" + ("" if complete else "; the run is not complete"), kind="seconds")
    return out


PAIR_LABELS = {
    "federated_minus_random_init_probe": "fed - random init (LP)",
    "federated_minus_local_only_probe": "fed - local-only (LP)",
    "federated_minus_centralized_probe": "fed - centralized (LP)",
    "dp_minus_federated_probe": "DP eps 8 - non-private (LP)",
    "federated_finetune_minus_cnn": "fed FT - small CNN",
    "federated_minus_random_10pct_finetune": "10% labels: fed - random (FT)",
}


def target_value(t: dict[str, Any]) -> str:
    v = t["value"]
    if isinstance(v, dict):  # a count target: the per-dataset values it counts
        return ", ".join(f"{k}: {x:+.3f}" for k, x in v.items() if x is not None) or "—"
    if v is None:
        return "—"
    return fmt_seconds(v) if t["kind"] == "seconds" else f"{v:.3f}"


def target_margin(t: dict[str, Any]) -> str:
    m = t["margin"]
    if m is None or t["status"] == "n/a":
        return ""
    if t["kind"] == "seconds":
        return f" ({fmt_seconds(abs(m))} {'to spare' if m >= 0 else 'over'})"
    if t["kind"] == "count":
        n = abs(int(m))
        return f" ({n} dataset{'s' * (n != 1)} {'to spare' if m >= 0 else 'short'})"
    return f" ({m:+.3f})"


def paired_cell(pair: dict[str, Any]) -> str:
    """Mean ± std of a paired difference, then its per-seed values (just the value for one seed, — for none)."""
    if len(pair["values"]) < 2:
        return fmt_ms(pair, signed=True)
    return fmt_ms(pair, signed=True) + " (" + ", ".join(f"{v:+.3f}" for v in pair["values"]) + ")"


def cost_table(costs: dict[str, Any], where: str = "Test") -> list[str]:
    """``method_costs`` as Markdown: what each method costs per seed against its mean AUC."""
    rows = [[m, str(k["rows"]), ", ".join(map(str, k["seeds"])),
             f"{k['cpu_minutes_per_seed']:,.1f}" + (" (not every dataset yet)" if k.get("partial") else ""),
             "; ".join(f"{n} {a:.3f}" for n, a in k["mean_auc"].items()) or "— (not every dataset yet)"]
            for m, k in costs.items()]
    return [md_table(["method", "rows", "seeds", "CPU-minutes per seed (all datasets)",
                      f"mean {where.lower()} AUC over the datasets"], rows), "",
            "CPU-minutes = each row's wall time x its torch threads, averaged over the seeds each dataset has and "
            "summed over the datasets, on this shared machine. A pretraining is "
            "paid by the first row that needs it and cached for the rest (label efficiency and the federated "
            "rows share one).", ""]


#: What the numbers of each ``--split`` are scored on.
SCORED_ON = {"test": "Test", "val": "Validation", "holdout": "Held-out train"}


#: What ``rows_measured_on`` says of rows stored before rows recorded their CPU.
UNRECORDED_CPU = "not recorded"


def rows_measured_on(rows: list[dict[str, Any]]) -> dict[str, int]:
    """How many of ``rows`` ran on each CPU model (the summary's own machine may be another one)."""
    return dict(collections.Counter(r.get("cpu_model", UNRECORDED_CPU) for r in rows).most_common())


def rows_on_text(counts: dict[str, int]) -> str:
    """``rows_measured_on`` for a reader: ``Xeon (2 rows); not recorded (1 row)``."""
    return "; ".join(f"{cpu} ({n} row{'s' * (n != 1)})" for cpu, n in counts.items())


def measured_on_line(payload: dict[str, Any]) -> str | None:
    counts = payload.get("rows_measured_on")
    return f"- rows measured on: {rows_on_text(counts)}" if counts else None


def render_markdown(payload: dict[str, Any]) -> str:
    quick = payload["quick"]
    split = payload.get("split", "test")
    where = SCORED_ON[split]
    s = payload["summary"]
    ds = payload["datasets"]
    title = {"test": "", "val": " — VALIDATION (choosing settings)", "holdout": " — HOLD-OUT (judging the choice)"}
    lines = [f"# Learning quality{' — QUICK MODE' if quick else ''}{title[split]}", ""]
    if quick:
        lines += [f"> **{QUICK_LABEL}.**", ""]
    if split == "val":
        lines += ["> Every number here is on the validation splits; the test splits were not read.", ""]
    if split == "holdout":
        lines += [f"> Every number here is on a held-out {HOLDOUT_SHARE:.0%} of each train split (the rows "
                  "learnt from the rest and chose on validation); the test splits were not read.", ""]
    lines += header_lines(payload)
    measured_on = measured_on_line(payload)
    if measured_on:
        lines.append(measured_on)
    lines += [f"- preset: `{payload['preset']}` (fingerprint `{payload['fingerprint']}`); "
              f"{payload['rows_done']} of {payload['rows_expected']} rows done"
              + ("" if payload["complete"] else " — INCOMPLETE: rerun the command to continue"),
              f"- federation: {payload['federation_note']}", ""]
    st = payload["settings"]
    fed = st["federation"]
    lines += [f"Model `{st['model']['preset']}` (dim {st['model']['dim']}, depth {st['model']['depth']}, "
              f"{st['model'].get('stem', 'patch')} stem"
              + "".join(f", {st['model'][f'stem_depth_{d}']} convs a stage in {d.upper()}" for d in ("2d", "3d")
                        if st["model"].get(f"stem_depth_{d}", 1) > 1)
              + (", full resolution in 3D" if st["model"].get("stem_3d_full_res") else "")
              + f"), pretext {st['pretext']}, {fed['rounds']} rounds x "
              + (f"{fed['local_steps']} local steps" if fed["local_steps"] else f"{fed['local_epochs']:g} local epoch(s)")
              + f" (batch {fed['batch_size']}, lr {fed['lr']:g}); DP row: pretext {st['dp']['pretext']}, "
              f"{st['dp']['privacy']}; fine-tune >= {st['fine_tune_epochs']} epochs and "
              f">= {st.get('min_steps', 0)} steps (batch {st['fine_tune_batch']}, lr {st['fine_tune_lr']:g}, "
              f"encoder lr {st.get('fine_tune_encoder_lr') or st['fine_tune_lr'] / 3:g}, "
              f"augmentation {st.get('fine_tune_augment')}"
              + (f", warm-up {st['fine_tune_warmup']:g} of the steps" if st.get("fine_tune_warmup") else "")
              + (f", head alone for the first {st['fine_tune_head_first']:g} of the steps"
                 if st.get("fine_tune_head_first") else "")
              + (f", weights averaged (EMA {st['fine_tune_ema']:g})" if st.get("fine_tune_ema") else "") + "); "
              f"label cap {st['max_train_examples'] or 'none'}. {where} metrics, official MedMNIST definitions; "
              "mean ± std over seeds.", ""]
    cols = list(COLUMN_NAMES.items())
    if payload.get("plot"):
        lines += [f"![{where} AUC per method and dataset]({payload['plot']})", ""]
    for metric in ("auc", "acc"):
        lines += [f"## {where} {metric.upper()}", ""]
        rows = [[d] + [fmt_ms(s["table"][d][c][metric]) for c, _ in cols] + [f"{ANCHORS[d][metric]:.3f}"] for d in ds]
        lines += [md_table(["dataset"] + [n for _, n in cols] + ["MedMNIST v2 ResNet-18 (test)"], rows), ""]
    lines += [f"ResNet-18 = ResNet-18 (28) in 2D, ResNet-18+3D in 3D; {ANCHOR_SOURCE}. LP = linear probe (read-out: "
              f"{PROBE_READOUT}), FT = fine-tune. DP epsilon reached per site: "
              + ", ".join(f"{d} {fmt_ms(s['dp_epsilon'][d], 2)}" for d in ds) + ".", ""]
    fr = s["fractions"]
    lines += [f"## Label efficiency (fine-tune {where.lower()} AUC; validation subsampled like train)", ""]
    head = ["dataset"] + [f"{init} {f:.0%}" for f in fr for init in ("federated", "random")]
    rows = [[d] + [fmt_ms(s["label_efficiency"][d].get(f"{init}@{f:g}")) for f in fr for init in ("federated", "random")]
            for d in ds]
    lines += [md_table(head, rows), "",
              "100% = the federated fine-tune and Medformer-scratch rows above.", ""]
    lines += [f"## Paired per-seed differences ({where.lower()} AUC)", ""]
    rows = [[d] + [paired_cell(s["pairs"][k][d]) for k in PAIR_LABELS] for d in ds]
    lines += [md_table(["dataset"] + list(PAIR_LABELS.values()), rows), "",
              "Each cell: mean ± std of the per-seed differences, then the differences seed by seed.", ""]
    lines += ["## Targets", ""]
    rows = []
    for t in payload["targets"]:
        rows.append([t["target"], target_value(t), t["status"] + target_margin(t), t["note"]])
    lines += [md_table(["target", "value", "status (margin)", "note"], rows), ""]
    if quick:
        lines += [f"> {QUICK_LABEL}.", ""]
    c = payload["compute"]
    lines += ["## Compute", "", md_table(["part", "wall time"],
                                          [[k, fmt_seconds(v)] for k, v in c.items()]), ""]
    if payload.get("costs"):
        lines += [f"### {where} AUC against CPU-minutes", ""] + cost_table(payload["costs"], where)
    return "\n".join(lines)
