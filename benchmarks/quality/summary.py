"""The quality benchmark's summary: mean ± std over seeds, paired per-seed differences, the targets and
the Markdown report."""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from benchmarks.common import ANCHOR_SOURCE, ANCHORS, fmt_ms, fmt_seconds, header_lines, md_table, mean_std
from benchmarks.quality.experiment import QUICK_LABEL


def summarize(rows: list[dict[str, Any]], datasets: Sequence[str]) -> dict[str, Any]:
    """Mean ± std over seeds per (dataset, method, evaluation), label efficiency, per-site differences."""
    by = {(r["method"], r["dataset"], r["seed"]): r["metrics"] for r in rows}
    seeds = sorted({r["seed"] for r in rows})

    def stat(method: str, dataset: str, evaluation: str, metric: str) -> dict[str, Any]:
        return mean_std(by[(method, dataset, s)].get(evaluation, {}).get(metric)
                        for s in seeds if (method, dataset, s) in by)

    columns = {"random_init": ("random_init", "linear_probe"), "local_only": ("local_only", "linear_probe"),
               "federated_probe": ("federated", "linear_probe"), "centralized": ("centralized", "linear_probe"),
               "federated_finetune": ("federated", "fine_tune"),
               "supervised_scratch": ("supervised_scratch", "fine_tune")}
    table = {d: {c: {m: stat(meth, d, ev, m) for m in ("auc", "acc")} for c, (meth, ev) in columns.items()}
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

    def paired(a: tuple[str, str, str], b: tuple[str, str, str], d: str) -> dict[str, Any]:
        diffs = []
        for s in seeds:
            ra, rb = by.get((a[0], d, s)), by.get((b[0], d, s))
            if ra and rb and a[1] in ra and b[1] in rb:
                diffs.append(ra[a[1]][a[2]] - rb[b[1]][b[2]])
        return {**mean_std(diffs), "values": diffs}

    fed_vs_local = {d: paired(("federated", "linear_probe", "auc"), ("local_only", "linear_probe", "auc"), d)
                    for d in datasets}
    fed_vs_central = {d: paired(("federated", "linear_probe", "auc"), ("centralized", "linear_probe", "auc"), d)
                      for d in datasets}
    le10 = {d: paired(("label_efficiency", "federated@0.1", "auc"), ("label_efficiency", "random@0.1", "auc"), d)
            for d in datasets}
    return {"seeds": seeds, "table": table, "label_efficiency": label_eff, "fractions": fractions + [1.0],
            "federated_minus_local_only_probe_auc": fed_vs_local,
            "federated_minus_centralized_probe_auc": fed_vs_central,
            "federated_minus_random_10pct_finetune_auc": le10}


def evaluate_targets(s: dict[str, Any], datasets: Sequence[str], compute_seconds: float, complete: bool,
                     quick: bool) -> list[dict[str, Any]]:
    """The issue's targets: value, status (met / missed / n/a) and the margin (positive = met by)."""
    out: list[dict[str, Any]] = []

    def add(name: str, value: Any, margin: float | None, note: str = "") -> None:
        status = "n/a" if margin is None else ("met" if margin >= 0 else "missed")
        out.append({"target": name, "value": value, "margin": margin, "status": status, "note": note})

    t = s["table"]
    for d in datasets:
        m = t[d]["federated_finetune"]["auc"]["mean"]
        a = ANCHORS[d]["auc"]
        add(f"{d}: federated SSL + fine-tune AUC >= {ANCHORS[d]['model']} {a:.3f}", m,
            None if m is None else m - a)
    for d in datasets:
        diff = s["federated_minus_centralized_probe_auc"][d]["mean"]
        add(f"{d}: federated probe AUC within 0.02 of centralized", diff, None if diff is None else diff + 0.02,
            "value = federated - centralized")
    for d in ("breastmnist", "retinamnist"):
        if d in datasets:
            diff = s["federated_minus_local_only_probe_auc"][d]["mean"]
            add(f"{d}: federated probe AUC above local-only (small site)", diff, diff,
                "value = federated - local_only")
    gains = {d: s["federated_minus_random_10pct_finetune_auc"][d]["mean"] for d in datasets}
    known = [g for g in gains.values() if g is not None]
    wins = sum(g >= 0.03 for g in known)
    add(">= 3 datasets where federated init beats random init by >= 0.03 AUC at 10% labels",
        {d: g for d, g in gains.items()}, None if not known else float(wins - 3), f"{wins} of {len(known)} datasets")
    for d in datasets:
        p = s["federated_minus_local_only_probe_auc"][d]
        mean, std, n = p["mean"], p["std"], p["n"]
        if mean is None:
            add(f"{d}: federated not worse than local-only beyond noise", None, None)
            continue
        if n < 2 or std is None:
            add(f"{d}: federated not worse than local-only beyond noise", mean, None,
                f"one seed: difference {mean:+.3f}, no spread to judge noise")
            continue
        noise = 2 * std / math.sqrt(n)  # ~95% half-width of the mean difference
        add(f"{d}: federated not worse than local-only beyond noise", mean, mean + noise,
            f"difference {mean:+.3f} ± {std:.3f} (std over {n} seeds); noise band 2·std/sqrt(n) = {noise:.3f}")
    add("whole quality benchmark under 3 h on 2 cores", compute_seconds,
        (3 * 3600 - compute_seconds) if complete and not quick else None,
        "sum of the rows' wall times" + ("" if complete else "; the run is not complete"))
    return out


def render_markdown(payload: dict[str, Any]) -> str:
    quick = payload["quick"]
    s = payload["summary"]
    ds = payload["datasets"]
    lines = [f"# Learning quality{' — QUICK MODE' if quick else ''}", ""]
    if quick:
        lines += [f"> **{QUICK_LABEL}.**", ""]
    lines += header_lines(payload)
    lines += [f"- preset: `{payload['preset']}` (fingerprint `{payload['fingerprint']}`); "
              f"{payload['rows_done']} of {payload['rows_expected']} rows done"
              + ("" if payload["complete"] else " — INCOMPLETE: rerun the command to continue"),
              f"- federation: {payload['federation_note']}", ""]
    st = payload["settings"]
    fed = st["federation"]
    lines += [f"Model `{st['model']['preset']}` (dim {st['model']['dim']}, depth {st['model']['depth']}), pretext "
              f"{st['pretext']}, {fed['rounds']} rounds x "
              + (f"{fed['local_steps']} local steps" if fed["local_steps"] else f"{fed['local_epochs']:g} local epoch(s)")
              + f" (batch {fed['batch_size']}, lr {fed['lr']:g}); fine-tune >= {st['fine_tune_epochs']} epochs and "
              f">= {st.get('min_steps', 0)} steps (batch {st['fine_tune_batch']}, lr {st['fine_tune_lr']:g}, "
              f"encoder lr {st.get('fine_tune_encoder_lr') or st['fine_tune_lr'] / 3:g}, "
              f"{'augmented' if st.get('fine_tune_augment') else 'no augmentation'}); "
              f"label cap {st['max_train_examples'] or 'none'}. Test metrics, official MedMNIST definitions; "
              "mean ± std over seeds.", ""]
    cols = [("random_init", "random init + LP"), ("local_only", "local-only SSL + LP"),
            ("federated_probe", "federated SSL + LP"), ("centralized", "centralized SSL + LP"),
            ("federated_finetune", "federated SSL + FT"), ("supervised_scratch", "supervised scratch")]
    for metric in ("auc", "acc"):
        lines += [f"## Test {metric.upper()}", ""]
        rows = [[d] + [fmt_ms(s["table"][d][c][metric]) for c, _ in cols] + [f"{ANCHORS[d][metric]:.3f}"] for d in ds]
        lines += [md_table(["dataset"] + [n for _, n in cols] + ["MedMNIST v2 ResNet-18"], rows), ""]
    lines += [f"ResNet-18 = ResNet-18 (28) in 2D, ResNet-18+3D in 3D; {ANCHOR_SOURCE}. LP = linear probe, "
              "FT = fine-tune.", ""]
    fr = s["fractions"]
    lines += ["## Label efficiency (fine-tune test AUC)", ""]
    head = ["dataset"] + [f"{init} {f:.0%}" for f in fr for init in ("federated", "random")]
    rows = [[d] + [fmt_ms(s["label_efficiency"][d].get(f"{init}@{f:g}")) for f in fr for init in ("federated", "random")]
            for d in ds]
    lines += [md_table(head, rows), "",
              "100% = the federated fine-tune and supervised-scratch rows above.", ""]
    lines += ["## Per site: federated minus local-only (linear-probe test AUC)", ""]
    rows = [[d, fmt_ms(s["federated_minus_local_only_probe_auc"][d], signed=True),
             ", ".join(f"{v:+.3f}" for v in s["federated_minus_local_only_probe_auc"][d]["values"]),
             fmt_ms(s["federated_minus_centralized_probe_auc"][d], signed=True)] for d in ds]
    lines += [md_table(["dataset", "fed - local (mean ± std)", "per seed", "fed - centralized"], rows), ""]
    lines += ["## Targets", ""]
    rows = []
    for t in payload["targets"]:
        v = t["value"]
        vs = (", ".join(f"{k}: {x:+.3f}" for k, x in v.items() if x is not None) if isinstance(v, dict)
              else "—" if v is None else fmt_seconds(v) if "3 h" in t["target"] else f"{v:.3f}")
        rows.append([t["target"], vs, t["status"] + ("" if t["margin"] is None or t["status"] == "n/a" else
                                                     f" ({t['margin']:+.3f})" if "3 h" not in t["target"]
                                                     else f" ({fmt_seconds(abs(t['margin']))} "
                                                     f"{'to spare' if t['margin'] >= 0 else 'over'})"),
                     t["note"]])
    lines += [md_table(["target", "value", "status (margin)", "note"], rows), ""]
    if quick:
        lines += [f"> {QUICK_LABEL}.", ""]
    c = payload["compute"]
    lines += ["## Compute", "", md_table(["part", "wall time"],
                                          [[k, fmt_seconds(v)] for k, v in c.items()]), ""]
    return "\n".join(lines)
