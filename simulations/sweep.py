"""Privacy sweep: run one scenario at several privacy budgets and tabulate the privacy-accuracy tradeoff.

    medfl sweep-privacy CONFIG --epsilons inf,16,8,4,2,1 [--repeats N] [--data-dir DIR] [--out DIR]
                        [--set key=value]... [--no-audit]

Each (epsilon, repeat) is one ``medfl run`` in its own subprocess (Flower's simulation engine and Ray
hold process-wide state) with its own output folder under ``OUT/runs/``. ``inf`` runs without DP; a
finite epsilon sets ``privacy.target_epsilon`` for every hospital (scenario-wide and per hospital).
Repeat r uses seed ``seed + r`` at every budget, so budgets are compared on the same seeds. The
membership-inference audit (``evaluation.audit``) is on unless ``--no-audit``.

Output (each file written atomically, rewritten after every run so an interrupted sweep keeps its
results; rerunning the same command with the same ``--out`` reuses the finished runs):

* ``tradeoff.csv``: one row per (epsilon, repeat, dataset): downstream linear-probe AUC/ACC, the
  random-init reference, the epsilon actually spent, the audit's attack AUC and TPR at 1% FPR.
* ``tradeoff.json``: the plan, every run's status and time, those rows and their mean/std.
* ``tradeoff.md``: mean +- std per dataset and budget, and where AUC does not fall as epsilon shrinks.
* ``tradeoff.png``: AUC, ACC and attack AUC against epsilon per dataset, non-private as dashed lines.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medformer.files import write_text_atomic
from config import Scenario, ScenarioError, load_scenario
from tools.processes import stop_tree

log = logging.getLogger("medfl.sweep")

DEFAULT_EPSILONS = "inf,16,8,4,2,1"
PLAN_FILE = "sweep.json"
CSV_FIELDS = ["epsilon", "repeat", "seed", "dataset", "auc", "acc", "random_init_auc", "random_init_acc",
              "epsilon_spent", "audit_auc", "audit_loss_auc", "audit_tpr_at_1pct_fpr", "run_seconds", "run"]


class SweepError(ValueError):
    """Bad sweep arguments (exit code 2)."""


def parse_epsilons(text: str) -> list[float]:
    """``"inf,16,8"`` -> ``[inf, 16.0, 8.0]``: positive numbers or ``inf``, no duplicates, at least one."""
    values: list[float] = []
    for part in str(text).split(","):
        part = part.strip()
        try:
            value = float(part)
        except ValueError:
            raise SweepError(f"--epsilons: {part!r} is not a number or 'inf' (e.g. --epsilons inf,8,2)") from None
        if math.isnan(value) or value <= 0:
            raise SweepError(f"--epsilons: {part!r} must be > 0 (or 'inf' for no DP)")
        if value in values:
            raise SweepError(f"--epsilons: {part!r} is listed twice")
        values.append(value)
    if not values:
        raise SweepError("--epsilons: give at least one budget, e.g. inf,8,2")
    return values


def eps_label(eps: float) -> str:
    return "inf" if math.isinf(eps) else f"{eps:g}"


def budget_overrides(scenario: Scenario, eps: float) -> list[str]:
    """``--set`` items that put every hospital at budget ``eps`` (``inf``: no DP-SGD anywhere)."""
    if math.isinf(eps):
        sets = ["privacy=null"]
        sets += [f"hospitals.{i}.privacy=null" for i, h in enumerate(scenario.hospitals) if h.privacy is not None]
        return sets
    sets = [f"privacy.target_epsilon={eps!r}", "privacy.noise_multiplier=null"]
    for i, h in enumerate(scenario.hospitals):
        if h.privacy is not None:
            sets += [f"hospitals.{i}.privacy.target_epsilon={eps!r}", f"hospitals.{i}.privacy.noise_multiplier=null"]
    return sets


@dataclass(frozen=True)
class RunPlan:
    epsilon: float
    repeat: int
    seed: int
    sets: tuple[str, ...]

    @property
    def name(self) -> str:
        return f"eps-{eps_label(self.epsilon)}-rep-{self.repeat}"


def plan_runs(config: str | os.PathLike, epsilons: list[float], repeats: int, sets: list[str], *,
              audit: bool) -> tuple[Scenario, list[RunPlan]]:
    """Validate every run's scenario before any starts (ScenarioError names the bad field)."""
    if repeats < 1:
        raise SweepError(f"--repeats must be >= 1, got {repeats}")
    base = load_scenario(config, sets)
    plans = []
    for eps in epsilons:
        for r in range(repeats):
            run_sets = [*sets, *budget_overrides(base, eps), f"seed={base.seed + r}"]
            if audit:
                run_sets.append("evaluation.audit=true")
            try:
                load_scenario(config, run_sets)
            except ScenarioError as e:
                raise ScenarioError(f"at epsilon {eps_label(eps)}: {e}") from None
            plans.append(RunPlan(eps, r, base.seed + r, tuple(run_sets)))
    return base, plans


# ---- results -------------------------------------------------------------------------------------
def rows_from_summary(plan: RunPlan, summary: dict, run_dir: str) -> list[dict]:
    """One row per dataset of a finished run."""
    by_dataset: dict[str, list[dict]] = {}
    for c in summary.get("clients", {}).values():
        label = c["dataset"] if c.get("size", 28) == 28 else f"{c['dataset']}_{c['size']}"
        by_dataset.setdefault(label, []).append(c)
    rows = []
    for dataset, methods in summary.get("downstream", {}).items():
        clients = by_dataset.get(dataset, [])
        spent = [c["epsilon"] for c in clients if c.get("epsilon") is not None]
        audits = [c["audit"] for c in clients if c.get("audit")]
        lp, ri = methods.get("linear_probe", {}), methods.get("random_init", {})
        rows.append({
            "epsilon": eps_label(plan.epsilon), "repeat": plan.repeat, "seed": plan.seed, "dataset": dataset,
            "auc": lp.get("auc"), "acc": lp.get("acc"), "random_init_auc": ri.get("auc"),
            "random_init_acc": ri.get("acc"), "epsilon_spent": max(spent) if spent else None,
            "audit_auc": _mean([a["auc"] for a in audits]), "audit_loss_auc": _mean([a["loss_auc"] for a in audits]),
            "audit_tpr_at_1pct_fpr": _mean([a["tpr_at_1pct_fpr"] for a in audits]),
            "run_seconds": summary.get("wall_seconds"), "run": run_dir,
        })
    return rows


def _mean(xs: list[float]) -> float | None:
    return float(np.mean(xs)) if xs else None


def _stats(xs: list) -> tuple[float | None, float | None]:
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    if not xs:
        return None, None
    return float(np.mean(xs)), float(np.std(xs, ddof=1)) if len(xs) > 1 else 0.0


def aggregate(rows: list[dict], epsilons: list[float]) -> list[dict]:
    """Mean and std over repeats, per (dataset, epsilon), in dataset order then the sweep's budget order."""
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    out = []
    for d in datasets:
        for eps in epsilons:
            sel = [r for r in rows if r["dataset"] == d and r["epsilon"] == eps_label(eps)]
            if not sel:
                continue
            item = {"dataset": d, "epsilon": eps_label(eps), "repeats": len(sel)}
            for key in ("auc", "acc", "random_init_auc", "audit_auc", "audit_tpr_at_1pct_fpr", "epsilon_spent"):
                item[f"{key}_mean"], item[f"{key}_std"] = _stats([r[key] for r in sel])
            out.append(item)
    return out


def tradeoff_notes(agg: list[dict], epsilons: list[float]) -> list[str]:
    """Plain-language notes: where AUC does not fall as epsilon shrinks, and the likely reason."""
    notes = []
    order = sorted(epsilons, reverse=True)  # inf first, then shrinking budgets
    for d in dict.fromkeys(a["dataset"] for a in agg):
        pts = {a["epsilon"]: a for a in agg if a["dataset"] == d}
        seq = [pts[eps_label(e)] for e in order if eps_label(e) in pts]
        ref = pts.get("inf")
        if ref and ref["auc_mean"] is not None and ref["random_init_auc_mean"] is not None:
            gain = ref["auc_mean"] - ref["random_init_auc_mean"]
            if gain < 0.01:
                notes.append(f"{d}: without DP the pretrained encoder's probe AUC ({ref['auc_mean']:.3f}) is not above "
                             f"a random encoder's ({ref['random_init_auc_mean']:.3f}); pretraining adds little here, "
                             "so DP has little to take away and the curve is flat or noisy")
        for a, b in zip(seq, seq[1:]):
            if a["auc_mean"] is None or b["auc_mean"] is None or b["auc_mean"] <= a["auc_mean"]:
                continue
            rise = b["auc_mean"] - a["auc_mean"]
            spread = max(a["auc_std"] or 0.0, b["auc_std"] or 0.0)
            why = (f"within the run-to-run spread (std {spread:.3f})" if spread and rise <= 2 * spread else
                   "one repeat cannot separate this from run-to-run noise; rerun with --repeats 3"
                   if a["repeats"] < 2 else f"larger than the spread (std {spread:.3f}): worth a closer look")
            notes.append(f"{d}: AUC rises from {a['auc_mean']:.3f} at epsilon {a['epsilon']} to {b['auc_mean']:.3f} "
                         f"at epsilon {b['epsilon']} (+{rise:.3f}); {why}")
    return notes


def _fmt(mean: float | None, std: float | None, repeats: int) -> str:
    if mean is None:
        return "-"
    return f"{mean:.3f} ± {std:.3f}" if repeats > 1 else f"{mean:.3f}"


def _run_time(meta: dict) -> str:
    """The finished runs' own wall clock (a continued sweep reuses earlier runs), and this invocation's."""
    own = meta.get("run_seconds") or 0.0
    return f"{own / 60:.1f} min of run time (this invocation {meta['total_seconds'] / 60:.1f} min)"


def render_markdown(meta: dict, agg: list[dict], notes: list[str]) -> str:
    lines = [f"# Privacy-accuracy tradeoff: {meta['scenario']}", "",
             f"Budgets {', '.join(meta['epsilons'])}; {meta['repeats']} repeat(s) each (seeds {meta['seeds']}); "
             f"{meta['runs_done']} of {meta['runs_planned']} runs finished, {_run_time(meta)}.",
             f"Overrides: {' '.join(meta['overrides']) or 'none'}.", "",
             "Downstream: linear probe of the aggregated encoder on the official test split (MedMNIST AUC/ACC); "
             "`inf` = no DP (the non-private reference); random init = the same probe on an untrained encoder. "
             "Attack AUC: membership inference on the final model (0.5 = chance). "
             "Epsilon spent: the largest reported by that dataset's hospitals.", "",
             "| dataset | epsilon | AUC | ACC | random init AUC | epsilon spent | attack AUC | attack TPR@1%FPR |",
             "|---|---|---|---|---|---|---|---|"]
    for a in agg:
        n = a["repeats"]
        lines.append(f"| {a['dataset']} | {a['epsilon']} | {_fmt(a['auc_mean'], a['auc_std'], n)} | "
                     f"{_fmt(a['acc_mean'], a['acc_std'], n)} | {_fmt(a['random_init_auc_mean'], None, 1)} | "
                     f"{_fmt(a['epsilon_spent_mean'], None, 1)} | {_fmt(a['audit_auc_mean'], a['audit_auc_std'], n)} | "
                     f"{_fmt(a['audit_tpr_at_1pct_fpr_mean'], None, 1)} |")
    lines += ["", "![tradeoff](tradeoff.png)", ""]
    if notes:
        lines += ["## Where AUC does not fall as epsilon shrinks, and why", ""] + [f"- {n}" for n in notes] + [""]
    failed = [r for r in meta["runs"] if r["status"] != "done"]
    if failed:
        lines += ["## Runs that did not finish", ""]
        lines += [f"- {r['name']}: {r['status']} (log: {r['log']})" for r in failed] + [""]
    return "\n".join(lines)


def plot_tradeoff(agg: list[dict], epsilons: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    finite = sorted(e for e in epsilons if math.isfinite(e))
    panels = [("auc", "downstream AUC (linear probe)"), ("acc", "downstream ACC (linear probe)"),
              ("audit_auc", "membership attack AUC")]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, (key, title) in zip(axes, panels):
        for i, d in enumerate(dict.fromkeys(a["dataset"] for a in agg)):
            color = f"C{i}"
            pts = {a["epsilon"]: a for a in agg if a["dataset"] == d}
            xs = [e for e in finite if eps_label(e) in pts and pts[eps_label(e)][f"{key}_mean"] is not None]
            if xs:
                ys = [pts[eps_label(e)][f"{key}_mean"] for e in xs]
                es = [pts[eps_label(e)][f"{key}_std"] or 0.0 for e in xs]
                ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, color=color, label=d)
            ref = pts.get("inf")
            if ref and ref[f"{key}_mean"] is not None:
                ax.axhline(ref[f"{key}_mean"], color=color, ls="--", lw=1.2,
                           label=f"{d} no DP" if not xs else f"{d} no DP (ε=∞)")
            if key == "auc" and ref and ref["random_init_auc_mean"] is not None:
                ax.axhline(ref["random_init_auc_mean"], color=color, ls=":", lw=1, alpha=0.7)
        if key == "audit_auc":
            ax.axhline(0.5, color="gray", lw=1, ls="-.", label="chance")
            seen = [a[f"{key}_mean"] for a in agg if a[f"{key}_mean"] is not None]
            ax.set_ylim(min([0.45, *(v - 0.02 for v in seen)]), max([0.6, *(v + 0.02 for v in seen)]))
        if finite:
            ax.set_xscale("log")
            ax.set_xticks(finite)
            ax.set_xticklabels([f"{e:g}" for e in finite])
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("target epsilon (log scale)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("dashed: no DP (epsilon = inf); dotted: random-init encoder; error bars: std over repeats",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(out: Path, meta: dict, rows: list[dict], epsilons: list[float]) -> None:
    """tradeoff.{csv,json,md,png}, each written to a temporary name and renamed."""
    agg = aggregate(rows, epsilons)
    notes = tradeoff_notes(agg, epsilons)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: ("" if r.get(k) is None else r[k]) for k in CSV_FIELDS})
    write_text_atomic(out / "tradeoff.csv", buf.getvalue())
    write_text_atomic(out / "tradeoff.json", json.dumps({**meta, "rows": rows, "aggregate": agg, "notes": notes}, indent=2))
    write_text_atomic(out / "tradeoff.md", render_markdown(meta, agg, notes))
    tmp = out / ".tradeoff.png.tmp.png"
    plot_tradeoff(agg, epsilons, tmp)
    os.replace(tmp, out / "tradeoff.png")


# ---- running ---------------------------------------------------------------------------------------
def _run_one(config: Path, plan: RunPlan, run_dir: Path, log_path: Path, data_dir: str | None,
             verbose: bool) -> int:
    """One ``medfl run`` in a subprocess (own session, so an interrupt stops its whole Ray tree)."""
    cmd = [sys.executable, "-m", "simulations.cli", "run", str(config), "--out", str(run_dir), "--no-progress"]
    if (run_dir / "config.yaml").exists():
        cmd.append("--resume")  # an earlier sweep was interrupted inside this run
    if data_dir:
        cmd += ["--data-dir", data_dir]
    if verbose:
        cmd.append("-v")
    for s in plan.sets:
        cmd += ["--set", s]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(log_path, "a") as logf:
        logf.write("$ " + " ".join(cmd) + "\n")
        logf.flush()
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            return proc.wait()
        except BaseException:
            stop_tree(proc.pid, timeout=30)  # the tree this call started (its session), and nothing else
            proc.wait()
            raise


def _finished(run_dir: Path) -> dict | None:
    path = run_dir / "summary.json"
    if not path.exists():
        return None
    summary = json.loads(path.read_text())
    return summary if summary.get("rounds_completed") == summary.get("rounds_planned") else None


def _extends(saved: dict, plan: dict) -> bool:
    """The plan is the saved sweep, or the same sweep with more repeats: its finished runs are kept
    (repeat r is seed + r either way) and only the new repeats run."""
    same = {k: v for k, v in saved.items() if k != "repeats"} == {k: v for k, v in plan.items() if k != "repeats"}
    return same and plan["repeats"] >= saved.get("repeats", 0)


def run_sweep(config: str | os.PathLike, *, epsilons: list[float], repeats: int = 1, data_dir: str | None = None,
              out: str | os.PathLike | None = None, sets: list[str] | None = None, audit: bool = True,
              progress: bool = True, verbose: bool = False) -> int:
    """Run the sweep; returns the exit code (0 all runs done, 1 some failed)."""
    config = Path(config).resolve()
    sets = list(sets or [])
    base, plans = plan_runs(config, epsilons, repeats, sets, audit=audit)
    out_dir = Path(out) if out else Path("runs") / f"{base.name}-sweep-{time.strftime('%Y%m%d-%H%M%S')}"
    plan_record = {"config": str(config), "epsilons": [eps_label(e) for e in epsilons], "repeats": repeats,
                   "overrides": sets, "audit": audit}
    if out_dir.exists() and any(out_dir.iterdir()):
        saved = out_dir / PLAN_FILE
        if not saved.exists() or not _extends(json.loads(saved.read_text()), plan_record):
            raise SweepError(f"--out {out_dir} is not empty and holds no sweep with these settings; "
                             "choose another folder (more --repeats of the same sweep continue it)")
    # --- inputs are valid: from here on we write ---
    (out_dir / "runs").mkdir(parents=True, exist_ok=True)
    (out_dir / "logs").mkdir(exist_ok=True)
    write_text_atomic(out_dir / PLAN_FILE, json.dumps(plan_record, indent=2))
    print(f"medfl: sweep {base.name}: budgets {', '.join(plan_record['epsilons'])} x {repeats} repeat(s) = "
          f"{len(plans)} runs -> {out_dir}", file=sys.stderr)

    from tqdm import tqdm

    rows: list[dict] = []
    runs: list[dict] = []
    started = time.monotonic()
    meta = {"scenario": base.name, **plan_record, "seeds": [base.seed + r for r in range(repeats)],
            "runs_planned": len(plans)}
    bar = tqdm(total=len(plans), desc="sweep", unit="run", file=sys.stderr, disable=not progress, dynamic_ncols=True)
    try:
        for plan in plans:
            run_dir, log_path = out_dir / "runs" / plan.name, out_dir / "logs" / f"{plan.name}.log"
            bar.set_postfix_str(f"epsilon {eps_label(plan.epsilon)}, repeat {plan.repeat}")
            t0 = time.monotonic()
            summary = _finished(run_dir)
            if summary is None:
                code = _run_one(config, plan, run_dir, log_path, data_dir, verbose)
                summary = _finished(run_dir) if code == 0 else None
                status = "done" if summary is not None else f"failed (exit code {code})"
            else:
                status = "done"
            seconds = time.monotonic() - t0
            runs.append({"name": plan.name, "epsilon": eps_label(plan.epsilon), "repeat": plan.repeat,
                         "seed": plan.seed, "status": status, "seconds": round(seconds, 1),
                         "run_seconds": summary.get("wall_seconds") if summary else None, "out": str(run_dir),
                         "log": str(log_path)})
            if summary is not None:
                rows += rows_from_summary(plan, summary, str(run_dir))
            else:
                bar.write(f"medfl: run {plan.name} {status}; see {log_path}")
            bar.update(1)
            meta.update(runs=runs, runs_done=sum(r["status"] == "done" for r in runs),
                        total_seconds=round(time.monotonic() - started, 1),
                        run_seconds=round(sum(r["run_seconds"] or 0.0 for r in runs), 1))
            write_outputs(out_dir, meta, rows, epsilons)
    except KeyboardInterrupt:
        bar.close()
        print(f"medfl: sweep interrupted; rerun the same command (same --out {out_dir}) to continue: finished runs "
              "are kept and an interrupted run resumes from its last checkpoint", file=sys.stderr)
        return 130
    finally:
        bar.close()
    minutes = (time.monotonic() - started) / 60
    print(f"medfl: sweep done in {minutes:.1f} min; {out_dir / 'tradeoff.md'}", file=sys.stderr)
    print((out_dir / "tradeoff.md").read_text())
    return 0 if all(r["status"] == "done" for r in runs) else 1
