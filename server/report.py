"""Human-readable results of a run: report.md with tables, loss.png and downstream_auc.png."""
from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from medformer.files import write_text_atomic  # noqa: E402


def _fmt(v) -> str:
    if v is None:
        return "-"
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def _loss_series(metrics: list[dict]) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """site -> task -> [(round, loss)]."""
    out: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for line in metrics:
        for site, m in line.get("trained", {}).items():
            for k, v in m.items():
                if k.startswith("loss-"):
                    out.setdefault(site, {}).setdefault(k[5:], []).append((line["round"], v))
    return out


def plot_losses(metrics: list[dict], path: Path) -> None:
    series = _loss_series(metrics)
    tasks = sorted({t for s in series.values() for t in s})
    fig, axes = plt.subplots(1, max(1, len(tasks)), figsize=(5 * max(1, len(tasks)), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for site, s in sorted(series.items()):
            if task in s:
                r, v = zip(*s[task])
                ax.plot(r, v, marker="o", label=site)
        ax.set_title(f"pretext loss: {task}")
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
    if tasks:
        axes[0][0].legend(fontsize=7)
    else:  # DP-SGD sites report no loss (it is an unnoised function of their data)
        axes[0][0].text(0.5, 0.5, "no pretext losses reported\n(sites under DP-SGD send none)", ha="center",
                        va="center", transform=axes[0][0].transAxes)
        axes[0][0].set_axis_off()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_downstream(metrics: list[dict], path: Path) -> None:
    rows = [(m["round"], d, ms) for m in metrics if "downstream" in m for d, ms in m["downstream"].items()]
    datasets = sorted({d for _, d, _ in rows})
    if len({r for r, _, _ in rows}) <= 1:  # one evaluation: a curve would be a dot, show bars instead
        _bars(rows, datasets, path)
        return
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for i, d in enumerate(datasets):
        pts = [(r, ms["linear_probe"]["auc"], ms.get("random_init", {}).get("auc")) for r, dd, ms in rows
               if dd == d and "linear_probe" in ms]
        if not pts:
            continue
        r, auc, rnd = zip(*pts)
        color = f"C{i}"
        ax.plot(r, auc, marker="o", color=color, label=f"{d} linear probe")
        if rnd[-1] is not None:
            ax.axhline(rnd[-1], color=color, ls="--", lw=1, label=f"{d} random init")
    ax.set_xlabel("round")
    ax.set_ylabel("test AUC")
    ax.set_title("downstream linear-probe AUC")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _bars(rows: list, datasets: list[str], path: Path) -> None:
    methods = sorted({m for _, _, ms in rows for m in ms})
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(datasets) + 2), 3.8))
    width = 0.8 / max(1, len(methods))
    for j, method in enumerate(methods):
        vals = [next((ms[method]["auc"] for _, dd, ms in rows if dd == d and method in ms), float("nan"))
                for d in datasets]
        xs = [i + (j - (len(methods) - 1) / 2) * width for i in range(len(datasets))]
        ax.bar(xs, vals, width, label=method)
        for x, v in zip(xs, vals):
            ax.text(x, v, f"{v:.3f}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(datasets)), datasets, fontsize=8)
    ax.set_ylabel("test AUC")
    ax.set_ylim(0.5, 1.0)
    ax.set_title(f"downstream AUC (round {rows[0][0] if rows else '-'})")
    if methods:  # a run evaluated nowhere has no bars to label
        ax.legend(fontsize=7)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def render_markdown(summary: dict, metrics: list[dict]) -> str:
    lines = [f"# Run report: {summary['scenario']}", "",
             f"Rounds completed: {summary['rounds_completed']} of {summary.get('rounds_planned', '?')}; "
             f"wall time {summary['wall_seconds']:.1f} s.", ""]
    if summary.get("downstream"):
        methods = sorted({m for ms in summary["downstream"].values() for m in ms})
        lines += [f"## Downstream test AUC / ACC (round {summary.get('downstream_round')})", "",
                  "| dataset | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
        for d, ms in summary["downstream"].items():
            cells = [f"{ms[m]['auc']:.3f} / {ms[m]['acc']:.3f}" if m in ms else "-" for m in methods]
            lines.append(f"| {d} | " + " | ".join(cells) + " |")
        lines += ["", "![downstream AUC](downstream_auc.png)", ""]
    lines += ["## Hospitals", "", "| site | dataset | examples | rounds trained | bytes/round | epsilon | delta |",
              "|---|---|---|---|---|---|---|"]
    for name, c in summary["clients"].items():
        lines.append(f"| {name} | {c.get('dataset')} | {c.get('num_examples')} | {c.get('rounds_trained', 0)} | "
                     f"{c.get('bytes_sent_per_round') or '-'} | {_fmt(c.get('epsilon'))} | {_fmt(c.get('delta'))} |")
    lines += ["", f"Whole global model: {summary['model']['global_bytes']} bytes.", ""]
    lines += ["## Pretext loss per round", "", "| round | site | " + "losses | seconds |", "|---|---|---|---|"]
    for m in metrics:
        for site, t in m.get("trained", {}).items():
            losses = ", ".join(f"{k[5:]} {v:.3f}" for k, v in t.items() if k.startswith("loss-"))
            lines.append(f"| {m['round']} | {site} | {losses} | {t.get('seconds', 0):.1f} |")
    lines += ["", "![pretext loss](loss.png)", ""]
    if summary.get("dropouts"):
        lines += ["## Dropped sites", "", "| round | site | reason |", "|---|---|---|"]
        lines += [f"| {d['round']} | {d['site']} | {d['reason']} |" for d in summary["dropouts"]]
    return "\n".join(lines) + "\n"


def write_report(out: Path, summary: dict, metrics: list[dict]) -> None:
    """report.md plus its two plots, each written atomically."""
    out = Path(out)
    for name, fn in (("loss.png", plot_losses), ("downstream_auc.png", plot_downstream)):
        tmp = out / f".{name}"
        fn(metrics, tmp)
        os.replace(tmp, out / name)
    write_text_atomic(out / "report.md", render_markdown(summary, metrics))
