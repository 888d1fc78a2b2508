"""The demo's report: pipeline counts, the DBP cluster view, prototypical and unusual members
of a few clusters, accuracy per run (report.html, report.md and PNG plots)."""

from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _accuracy_plot(results: dict, path: Path) -> None:
    plt = _plt()
    names = list(results)
    acc = [results[n]["demo/digits"]["acc1"] for n in names]
    rec = [results[n]["demo/digit-captions"]["mean_recall@5"] for n in names]
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    x = np.arange(len(names))
    ax.bar(x - 0.2, acc, 0.4, label="held-out digits, zero-shot acc1")
    ax.bar(x + 0.2, rec, 0.4, label="held-out caption retrieval, mean R@5 (100 images)")
    ax.axhline(0.1, color="gray", ls="--", lw=1, label="chance (digits)")
    for i, v in enumerate(acc):
        ax.text(i - 0.2, v + 0.01, f"{v:.2f}", ha="center", fontsize=8)
    ax.set_xticks(x)
    ax.set_xticklabels(names)
    ax.set_ylim(0, min(1.0, max(0.5, 1.25 * max(acc + rec))))
    ax.set_ylabel("score")
    ax.legend(fontsize=8, loc="upper left")
    ax.set_title("same samples seen, different data")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _prototypes_plot(out: Path, path: Path, n_clusters: int = 4, n: int = 6) -> None:
    """For the largest clusters: the members closest to the centroid and the furthest."""
    from PIL import Image

    from conceptprune.data.tars import iter_samples
    from conceptprune.filters.clustering import Clustering
    from conceptprune.uids import array_to_uids

    import io

    c = Clustering(out / "filters" / "semdedup.clustering")
    uids = np.concatenate([b[1] for b in c.iter_assignment()])
    cl = np.concatenate([b[2] for b in c.iter_assignment()])
    dist = np.concatenate([b[3] for b in c.iter_assignment()])
    big = np.argsort(-np.bincount(cl[cl >= 0], minlength=c.k))[:n_clusters]
    wanted = {}
    for j in big:
        idx = np.flatnonzero(cl == j)
        order = idx[np.argsort(dist[idx])]
        for u in array_to_uids(uids[order[:n]]):
            wanted[u] = None
        for u in array_to_uids(uids[order[-n:]]):
            wanted[u] = None
    for shard in sorted((out / "data" / "shards").glob("*.tar")):
        for s in iter_samples(shard):
            uid = json.loads(s.parts["json"]).get("uid")
            if uid in wanted:
                wanted[uid] = Image.open(io.BytesIO(s.parts["jpg"])).convert("RGB")
    plt = _plt()
    fig, axes = plt.subplots(n_clusters, 2 * n, figsize=(2 * n * 0.9, n_clusters * 1.1))
    for row, j in enumerate(big):
        idx = np.flatnonzero(cl == j)
        order = idx[np.argsort(dist[idx])]
        picks = array_to_uids(uids[order[:n]]) + array_to_uids(uids[order[-n:]])
        for col, u in enumerate(picks):
            ax = axes[row, col]
            if wanted.get(u) is not None:
                ax.imshow(wanted[u])
            ax.set_xticks([])
            ax.set_yticks([])
        axes[row, 0].set_ylabel(f"cluster {j}", fontsize=7)
    axes[0, 0].set_title("most prototypical (easy) ->", fontsize=8, loc="left")
    axes[0, n].set_title("least prototypical (hard) ->", fontsize=8, loc="left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(out: Path, cfg, counts: dict, timings: dict, results: dict, kinds: dict) -> Path:
    import shutil

    out = Path(out)
    _accuracy_plot(results, out / "accuracy.png")
    shutil.copyfile(out / "filters" / "dbp.clusters.png", out / "dbp_clusters.png")
    _prototypes_plot(out, out / "prototypes.png")
    steps = [("web-like pool built from scikit-learn digits", counts["pool"]),
             ("downloaded with img2dataset from a loopback server", counts["downloaded"]),
             ("after SemDeDup (near-duplicates removed)", counts["after semdedup"]),
             ("after CLIP score (image-caption similarity, full-pool model)", counts["after clip score"]),
             ("after DBP (the 'dbp' run's data)", counts["semdedup -> dbp"]),
             ("random subset of the same size", counts["random"])]
    runs = [(n, results[n]["demo/digits"]["acc1"], results[n]["demo/digits"].get("mean_per_class_recall"),
             results[n]["demo/digit-captions"]["mean_recall@5"]) for n in results]
    md = ["# conceptprune demo", "",
          "The whole loop, on real images, on this machine: pool -> download -> train -> embed -> filter -> "
          "reshard -> train -> evaluate. Every run sees the same number of training samples "
          f"({cfg.samples_seen:,}); only the data differs. Seed {cfg.seed}.", "",
          "## Pipeline", "", "| step | examples |", "|---|---|"]
    md += [f"| {s} | {n:,} |" for s, n in steps]
    md += ["", "Pool composition: " + ", ".join(f"{k} {v:,}" for k, v in kinds.items()), "",
           "## Accuracy", "", "| run | held-out digits acc1 | balanced acc | caption retrieval mean R@5 |",
           "|---|---|---|---|"]
    md += [f"| {n} | {a:.3f} | {b:.3f} | {c:.3f} |" for n, a, b, c in runs]
    md += ["", "Chance is 0.100 on the digits.", "", "![accuracy](accuracy.png)", "",
           "## DBP: kept per cluster against complexity", "", "![dbp](dbp_clusters.png)", "",
           "## Most and least prototypical members of the largest clusters", "", "![prototypes](prototypes.png)", "",
           "## Time (seconds)", "", "| step | s |", "|---|---|"]
    md += [f"| {k} | {v} |" for k, v in timings.items()]
    (out / "report.md").write_text("\n".join(md) + "\n")
    (out / "report.html").write_text(_html(md))
    (out / "report.json").write_text(json.dumps({"counts": counts, "timings": timings, "results": results,
                                                 "config": cfg.__dict__}, indent=2, default=str))
    return out / "report.html"


def _html(md_lines: list[str]) -> str:
    """A small Markdown subset (headings, tables, images, paragraphs) to self-contained HTML."""
    body, table = [], []

    def flush_table():
        if table:
            rows = [r for r in table if not set(r.replace("|", "").strip()) <= set("-")]
            cells = [[html.escape(c.strip()) for c in r.strip().strip("|").split("|")] for r in rows]
            body.append("<table><thead><tr>" + "".join(f"<th>{c}</th>" for c in cells[0]) + "</tr></thead><tbody>"
                        + "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in cells[1:])
                        + "</tbody></table>")
            table.clear()

    for line in md_lines:
        if line.startswith("|"):
            table.append(line)
            continue
        flush_table()
        if line.startswith("## "):
            body.append(f"<h2>{html.escape(line[3:])}</h2>")
        elif line.startswith("# "):
            body.append(f"<h1>{html.escape(line[2:])}</h1>")
        elif line.startswith("!["):
            alt, src = line[2:].split("](")
            body.append(f'<img alt="{html.escape(alt)}" src="{html.escape(src.rstrip(")"))}">')
        elif line.strip():
            body.append(f"<p>{html.escape(line)}</p>")
    flush_table()
    style = ("body{font-family:system-ui,sans-serif;max-width:980px;margin:2em auto;color:#222}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 10px;text-align:left}"
             "th{background:#f3f3f3}img{max-width:100%;border:1px solid #eee;margin:0.5em 0}")
    return ("<!doctype html><html><head><meta charset='utf-8'><title>conceptprune demo</title>"
            f"<style>{style}</style></head><body>" + "\n".join(body) + "</body></html>\n")
