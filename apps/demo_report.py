"""The demo's report: the arms' accuracy over training seeds (mean and spread), pipeline counts,
the chain's own report inline, the DBP cluster view, prototypical and unusual members of a few
clusters (report.html, report.md and PNG plots)."""

from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np

from conceptprune.atomic import save_figure, write_text


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _accuracy_plot(summary: dict, labels: dict, path: Path) -> None:
    """Per arm and metric: the mean over the training seeds (bar), each seed (point), min-max (whisker)."""
    plt = _plt()
    names = list(summary)
    metrics = [("demo/digits", "held-out digits, zero-shot acc1"),
               ("demo/digit-captions", "held-out caption retrieval, mean R@5 (100 images)")]
    fig, ax = plt.subplots(figsize=(8, 4.2))
    x = np.arange(len(names))
    top = 0.0
    for k, (key, label) in enumerate(metrics):
        off = (k - 0.5) * 0.4
        m = [summary[n][key] for n in names]
        mean = np.array([s["mean"] for s in m])
        err = np.array([[s["mean"] - s["min"] for s in m], [s["max"] - s["mean"] for s in m]])
        ax.bar(x + off, mean, 0.38, color=f"C{k}", label=f"{label}: mean", yerr=err, capsize=3,
               error_kw={"elinewidth": 1, "ecolor": "#444"})
        for i, s in enumerate(m):
            ax.scatter(np.full(len(s["values"]), x[i] + off), s["values"], s=14, color="black", zorder=3,
                       label="one training seed" if (k, i) == (0, 0) else None)
            top = max(top, s["max"])
        if key == "demo/digits":
            for i, v in enumerate(mean):
                ax.text(x[i] + off, m[i]["max"] + 0.012, f"{v:.3f}", ha="center", fontsize=8)
    ax.axhline(0.1, color="gray", ls="--", lw=1, label="chance (digits)")
    ax.set_xticks(x)
    ax.set_xticklabels([labels[n].replace(" -> ", "\n-> ") for n in names], fontsize=8)
    ax.set_ylim(0, min(1.0, max(0.5, 1.3 * top)))
    ax.set_ylabel("score")
    ax.legend(fontsize=7, loc="upper left")
    ax.set_title("same kept size and samples seen; mean over training seeds, points = seeds, whiskers = min-max",
                 fontsize=9)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)


def _prototypes_plot(out: Path, path: Path, n_clusters: int = 4, n: int = 6) -> None:
    """For the largest clusters: the members closest to the centroid and the furthest."""
    from PIL import Image

    from conceptprune.tars import iter_samples
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
    save_figure(fig, path, dpi=120)
    plt.close(fig)


def write_report(out: Path, cfg, counts: dict, timings: dict, results: dict, kinds: dict, *, summary: dict,
                 seeds: list, kept: dict, table: list[str], answer: str, fingerprints: dict,
                 arms: dict, metrics: tuple, more: list[str] = ()) -> Path:
    """``arms``: arm -> its label; ``metrics``: (task key, metric, label) (the demo's ARMS, METRICS);
    ``more``: further verdicts (one paragraph each), e.g. negCLIPLoss -> NormSim against the others."""
    import shutil

    ARMS, METRICS = arms, metrics

    out = Path(out)
    _accuracy_plot(summary, ARMS, out / "accuracy.png")
    shutil.copyfile(out / "filters" / "dbp.clusters.png", out / "dbp_clusters.png")
    _prototypes_plot(out, out / "prototypes.png")
    labels = {"pool": "web-like pool built from scikit-learn digits",
              "downloaded": "downloaded with img2dataset from a loopback server",
              "after semdedup": "after SemDeDup (near-duplicates removed)",
              "after clip score": "after CLIP score (image-caption similarity, full-pool model)",
              "semdedup -> clip score -> dbp": "after DBP (the 'dbp' arm's data)",
              "random": "random subset of the same size (the 'random' arm)",
              "clip score alone": "CLIP score alone on the pool, same size (the 'clip-score' arm)",
              "semdedup -> clip score -> ssl prototypes": "SSL prototypes instead of DBP, same size (the 'ssl' arm)",
              "negcliploss": "negCLIPLoss on the pool (top 1.5 x the arms' size, own image/text embeddings)",
              "negcliploss -> normsim": "then NormSim-inf to a printed-digit target, same size (the 'negclip' arm)"}
    md = ["# conceptprune demo", "",
          "The whole loop, on real images, on this machine: pool -> download -> train -> embed -> filter -> "
          "reshard -> train -> evaluate. Every run sees the same number of training samples "
          f"({cfg.samples_seen:,}); every subset has the same size; only the data differs. Each arm is trained "
          f"with the training seeds {', '.join(map(str, seeds))}; the pool and the filters use seed {cfg.seed}.", "",
          "## Does DBP add anything over CLIP score?", "", answer or "(not measured: an arm is missing)", "",
          *[x for line in more for x in (line, "")],
          "## Accuracy (mean and spread over training seeds)", "",
          "| arm | kept | metric | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | std | min-max |",
          "|---|---|---|" + "---|" * len(seeds) + "---|---|---|"]
    for arm, per in summary.items():
        for key, _, label in METRICS:
            m = per[key]
            md.append(f"| {ARMS[arm]} | {kept[arm]:,} | {label} | " + " | ".join(f"{v:.3f}" for v in m["values"])
                      + f" | {m['mean']:.3f} | {m['std']:.3f} | {m['min']:.3f}-{m['max']:.3f} |")
    md += ["", "Chance is 0.100 on the digits. 'digits acc1': zero-shot top-1 on held-out digits; "
           "'caption R@5': mean of image and text recall@5 on 100 held-out images.", "",
           "![accuracy](accuracy.png)", "", "## Pipeline", "", "| step | examples |", "|---|---|"]
    md += [f"| {labels.get(k, k)} | {v:,} |" for k, v in counts.items()]
    md += ["", "Pool composition: " + ", ".join(f"{k} {v:,}" for k, v in kinds.items()), "",
           "The chain's own report (funnel, per-cluster budgets, thumbnails, SemDeDup groups, and the diff of the "
           "DBP chain against CLIP score alone at the same size):", "",
           "[chain report](chain_report/index.html)", ""]
    md += ["## DBP: kept per cluster against complexity", "", "![dbp](dbp_clusters.png)", "",
           "## Most and least prototypical members of the largest clusters", "", "![prototypes](prototypes.png)", "",
           "## Time (seconds)", "", "| step | s |", "|---|---|"]
    md += [f"| {k} | {v} |" for k, v in timings.items()]
    md += ["", "## Fingerprints (sha256; two runs with the same seed give the same)", "", "| file | sha256 |",
           "|---|---|"]
    md += [f"| {k} | {v} |" for k, v in fingerprints.items()]
    write_text(out / "report.md", "\n".join(md) + "\n")
    write_text(out / "report.html", _html(md))
    write_text(out / "report.json", json.dumps({"counts": counts, "kept": kept, "seeds": seeds, "timings": timings,
                                                 "results": results, "summary": summary, "table": table,
                                                 "answer": answer, "fingerprints": fingerprints,
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
        elif line.startswith("[") and line.endswith(")"):  # a link to a report: the link and the report inline
            text, src = line[1:-1].split("](")
            body.append(f'<p><a href="{html.escape(src)}">{html.escape(text)}</a> (opens on its own)</p>'
                        f'<iframe src="{html.escape(src)}" title="{html.escape(text)}"></iframe>')
        elif line.startswith("!["):
            alt, src = line[2:].split("](")
            body.append(f'<img alt="{html.escape(alt)}" src="{html.escape(src.rstrip(")"))}">')
        elif line.strip():
            body.append(f"<p>{html.escape(line)}</p>")
    flush_table()
    style = ("body{font-family:system-ui,sans-serif;max-width:980px;margin:2em auto;color:#222}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 10px;text-align:left}"
             "th{background:#f3f3f3}img{max-width:100%;border:1px solid #eee;margin:0.5em 0}"
             "iframe{width:100%;height:900px;border:1px solid #ccc}")
    return ("<!doctype html><html><head><meta charset='utf-8'><title>conceptprune demo</title>"
            f"<style>{style}</style></head><body>" + "\n".join(body) + "</body></html>\n")
