"""Plots a person would rather look at than read (matplotlib, written as PNG)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_clusters(table, path: str | Path, title: str) -> Path:
    """The DBP paper's view of a run: per cluster, kept examples and kept fraction against
    complexity (d_inter * d_intra); marker area ~ cluster size."""
    plt = _plt()
    t = table[table["size"] > 0]
    size = t["size"].to_numpy(float)
    kept = t["kept"].to_numpy(float)
    cx = t["complexity"].to_numpy(float)
    area = 15 + 285 * size / max(size.max(), 1)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    ax = axes[0]
    ax.scatter(cx, kept, s=area, alpha=0.6, c="tab:blue", edgecolors="k", linewidths=0.3)
    if "budget_target" in t:
        order = np.argsort(cx)
        ax.plot(cx[order], t["budget_target"].to_numpy(float)[order], "-", c="tab:red", lw=1,
                label="P_j * N (before bounds)")
        ax.legend(loc="upper left", fontsize=8)
    ax.set_xlabel("complexity  d_inter x d_intra")
    ax.set_ylabel("examples kept")
    ax.set_title("kept per cluster")
    ax = axes[1]
    ax.scatter(cx, kept / np.maximum(size, 1), s=area, alpha=0.6, c="tab:green", edgecolors="k", linewidths=0.3)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("complexity  d_inter x d_intra")
    ax.set_ylabel("fraction of the cluster kept")
    ax.set_title("kept fraction (marker area ~ cluster size)")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
