"""The quality benchmark's figure: AUC per method and dataset (mean ± std over seeds), MedMNIST v2's
ResNet-18 as a dashed line, so the table's story reads at a glance."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from benchmarks.quality.summary import COLUMN_NAMES, SCORED_ON


def plot_quality(payload: dict[str, Any], path: Path) -> None:
    """Write one panel per dataset (horizontal bars, one per column that has a value) to ``path`` (PNG,
    written to a temporary name and renamed, so a reader never sees half a file)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table, datasets = payload["summary"]["table"], payload["datasets"]
    names = list(COLUMN_NAMES)
    fig, axes = plt.subplots(1, len(datasets), figsize=(3.2 * len(datasets) + 1.8, 3.8), sharey=True, squeeze=False)
    for ax, d in zip(axes[0], datasets):
        cells = [table[d][c]["auc"] for c in names]
        ys = [i for i, c in enumerate(cells) if c["mean"] is not None]
        means = [cells[i]["mean"] for i in ys]
        ax.barh(ys, means, xerr=[cells[i]["std"] or 0.0 for i in ys], color=[f"C{i}" for i in ys], capsize=3)
        for y, m in zip(ys, means):
            ax.text(m, y, f" {m:.3f}", va="center", fontsize=7)
        anchor = payload.get("anchors", {}).get(d, {}).get("auc")
        if anchor is not None:
            ax.axvline(anchor, color="black", ls="--", lw=1)
        lo = min([*means, *([anchor] if anchor is not None else [])], default=0.5)
        ax.set_xlim(max(0.0, lo - 0.08), 1.0)
        ax.set_title(d, fontsize=9)
        ax.set_xlabel("AUC", fontsize=8)
        ax.grid(axis="x", alpha=0.3)
    axes[0][0].set_yticks(range(len(names)), [COLUMN_NAMES[c] for c in names], fontsize=8)
    axes[0][0].invert_yaxis()
    seeds = ", ".join(map(str, payload["summary"]["seeds"]))
    where = SCORED_ON[payload.get("split", "test")].lower()
    fig.suptitle(f"{where} AUC, mean ± std over seeds {seeds}; dashed: MedMNIST v2 ResNet-18 (test)", fontsize=9)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
