"""``conceptprune report``: one static HTML folder (index.html, PNG plots, thumbnails, report.json).

No server and no network resource: the page opens from disk; plots are matplotlib PNGs;
thumbnails are the samples' own image bytes copied from the shards (found through the uid
index, never by unpacking a tar); a few lines of vanilla JS sort the tables.
"""

from __future__ import annotations

import html
import logging
import math
import time
from pathlib import Path

import numpy as np

from conceptprune import keeplist as K
from conceptprune import uids as U
from conceptprune.atomic import atomic_open, write_json
from conceptprune.errors import ConfigError

from .chain import (Chain, cluster_examples, kept_per_cluster, load_chain, near_duplicates, same_pool,
                    semdedup_results)

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
CSS = """body{font-family:sans-serif;margin:24px;max-width:1400px;color:#222}
table{border-collapse:collapse;font-size:13px;margin:8px 0}th,td{border:1px solid #ccc;padding:3px 6px;text-align:right}
th{background:#eee;cursor:pointer}td.l,th.l{text-align:left}.thumbs img{width:64px;height:64px;object-fit:cover;margin:1px}
.kept{border:3px solid #2a2}.dropped{border:3px solid #c22}.plots img{max-width:460px;margin:4px}
.grp{display:inline-block;border:1px solid #ccc;margin:4px;padding:4px;font-size:12px;vertical-align:top}
.grp img{width:72px;height:72px;object-fit:cover}.scroll{max-height:520px;overflow:auto;display:inline-block}
code{font-size:12px}"""
JS = """function sortTable(th){const t=th.closest('table'),i=[...th.parentNode.children].indexOf(th),
b=t.tBodies[0],asc=th.dataset.asc!=='1';th.dataset.asc=asc?'1':'0';
const v=r=>{const c=r.children[i],x=c.dataset.v!==undefined?c.dataset.v:c.textContent;const n=parseFloat(x);return isNaN(n)?x:n};
[...b.rows].sort((r,s)=>{const a=v(r),c=v(s);return (a>c?1:a<c?-1:0)*(asc?1:-1)}).forEach(r=>b.appendChild(r))}
document.querySelectorAll('th').forEach(th=>th.onclick=()=>sortTable(th));"""


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plain(text: str) -> str:
    """A file name as a matplotlib label: its '$' are not mathtext delimiters."""
    return str(text).replace("$", r"\$")


def _save(fig, path: Path) -> None:
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=80, bbox_inches="tight")
    _plt().close(fig)


def _e(x) -> str:
    return html.escape(str(x))


def _num(v) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "" if v is None else str(v)
    if isinstance(v, (int, np.integer)):
        return f"{int(v):,}"
    return f"{float(v):.4g}"


def _td(v, cls: str = "") -> str:
    """A cell holding the exact value (data-v, for sorting and checking) and a short display."""
    if isinstance(v, (float, np.floating)):
        return f'<td data-v="{float(v)!r}">{_num(float(v))}</td>'
    if isinstance(v, (int, np.integer)):
        return f'<td data-v="{int(v)}">{_num(int(v))}</td>'
    return f'<td class="l{(" " + cls) if cls else ""}">{_e(v)}</td>'


def _table(tid: str, header: list[str], rows: list[list]) -> str:
    h = "".join(f"<th>{_e(c)}</th>" for c in header)
    body = "".join("<tr>" + "".join(_td(v) for v in r) + "</tr>" for r in rows)
    return f'<table id="{tid}"><thead><tr>{h}</tr></thead><tbody>{body}</tbody></table>'


def _short_params(params: dict) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items()
                     if v is not None and k not in ("clustering",))


class Thumbs:
    """Copies samples' images into ``thumbs/`` (their exact bytes) through the uid index."""

    def __init__(self, index, out: Path):
        self.index, self.dir, self.done = index, out / "thumbs", {}
        self.dir.mkdir(parents=True, exist_ok=True)

    def available(self, uids: np.ndarray) -> np.ndarray:
        return self.index.contains(uids) if self.index is not None else np.zeros(len(uids), bool)

    def get(self, uid: str) -> tuple[str | None, str]:
        """(relative image path or None, caption)."""
        if uid in self.done:
            return self.done[uid]
        res = (None, "")
        if self.index is not None:
            s = self.index.read(uid)
            if s is not None:
                ext = next((e for e in s.parts if e.lower() in IMAGE_EXTS), None)
                cap = s.parts.get("txt", b"").decode("utf-8", "replace")
                if ext:
                    p = self.dir / f"{uid}.{ext.lower()}"
                    p.write_bytes(s.parts[ext])  # index.html, written last and atomically, links it
                    res = (f"thumbs/{p.name}", cap)
                else:
                    res = (None, cap)
        self.done[uid] = res
        return res

    def img(self, uid: str, cls: str, extra: str = "") -> str:
        rel, cap = self.get(uid)
        title = _e(f"{uid} {extra} {cap}".strip())
        if rel is None:
            return f'<span class="{cls}" title="{title}"><code>{uid[:8]}</code></span>'
        return f'<img class="{cls}" src="{rel}" title="{title}" alt="{uid}" data-uid="{uid}">'


# -- sections -----------------------------------------------------------------------------


def funnel(chain: Chain) -> list[dict]:
    rows = [{"step": "pool", "file": str(chain.pool_dir or ""), "candidates": chain.pool_rows,
             "kept": chain.pool_rows, "of_previous": 1.0, "of_pool": 1.0, "params": ""}]
    prev = chain.pool_rows
    for i, s in enumerate(chain.steps):
        kept = int(len(s.keep))
        cand = int(s.counts.get("candidates") or (len(chain.candidates(i)) if chain.candidates(i) is not None
                                                   else chain.pool_rows))
        rows.append({"step": s.method, "file": s.path.name, "candidates": cand, "kept": kept,
                     "entries": s.entries or kept,  # an upsampled list: more entries than distinct uids
                     "of_previous": kept / prev if prev else float("nan"),
                     "of_pool": kept / chain.pool_rows if chain.pool_rows else float("nan"),
                     "params": _short_params(s.params)})
        prev = kept
    return rows


def _funnel_plot(rows: list[dict], path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 0.5 + 0.45 * len(rows)))
    labels = [f"{r['step']}" for r in rows][::-1]
    vals = [r["kept"] for r in rows][::-1]
    ax.barh(labels, vals, color="#1f77b4")
    for y, v in enumerate(vals):
        ax.text(v, y, f" {v:,} ({v / max(rows[0]['kept'], 1):.1%})", va="center", fontsize=8)
    ax.set_xlabel("samples")
    ax.set_xlim(0, max(vals) * 1.35 if vals and max(vals) else 1)
    _save(fig, path)


def pca2(x: np.ndarray) -> tuple[np.ndarray, float]:
    """The rows of ``x`` projected on their first two principal axes, and the share of the
    variance kept (eigen-decomposition of the smaller of the Gram and covariance matrices)."""
    xc = x - x.mean(axis=0)
    small = xc @ xc.T if len(xc) <= xc.shape[1] else xc.T @ xc
    w, v = np.linalg.eigh(small)
    w, v = w[::-1], v[:, ::-1]
    xy = v[:, :2] * np.sqrt(np.maximum(w[:2], 0)) if len(xc) <= xc.shape[1] else xc @ v[:, :2]
    return xy, float(w[:2].sum() / max(w.sum(), 1e-30))


def _cluster_plots(step, table, tag: str, out: Path) -> list[str]:
    plt = _plt()
    size = table["size"].to_numpy(float)
    frac = np.where(size > 0, table["kept"].to_numpy(float) / np.maximum(size, 1), np.nan)
    names = []
    fig, ax = plt.subplots(figsize=(5, 3.6))
    sc = ax.scatter(table["complexity"], frac, c=np.log10(np.maximum(size, 1)), s=18, cmap="viridis")
    fig.colorbar(sc, ax=ax, label="log10 cluster size")
    ax.set_xlabel("complexity C_j = d_intra * d_inter")
    ax.set_ylabel("kept fraction")
    ax.set_title(f"{step.method}: kept fraction vs complexity", fontsize=10)
    _save(fig, out / f"{tag}_frac_vs_complexity.png")
    names.append(f"{tag}_frac_vs_complexity.png")
    fig, ax = plt.subplots(figsize=(5, 3.6))
    ax.scatter(size, table["kept"], s=18, color="#1f77b4", label="budget N_j (kept)")
    if "budget_target" in table:
        ax.scatter(size, table["budget_target"], s=10, color="#ff7f0e", marker="x", label="P_j N (continuous)")
    lim = max(size.max(), 1)
    ax.plot([0, lim], [0, lim], color="#999", lw=0.8, label="N_j = n_j")
    ax.set_xlabel("cluster size n_j (candidates)")
    ax.set_ylabel("budget / kept")
    ax.legend(fontsize=7)
    ax.set_title(f"{step.method}: budget vs size", fontsize=10)
    _save(fig, out / f"{tag}_budget_vs_size.png")
    names.append(f"{tag}_budget_vs_size.png")
    if step.clustering_dir is not None:
        c = step.clustering().centroids.astype(np.float64)
        if len(c) >= 2:
            xy, var = pca2(c)
            fig, ax = plt.subplots(figsize=(5, 4.2))
            sc = ax.scatter(xy[:, 0], xy[:, 1], c=frac, cmap="RdYlGn", vmin=0, vmax=1,
                            s=12 + 200 * np.sqrt(size / lim), edgecolors="k", linewidths=0.3)
            fig.colorbar(sc, ax=ax, label="kept fraction")
            if len(c) <= 60:
                for j, (x, y) in enumerate(xy):
                    ax.annotate(str(j), (x, y), fontsize=6, ha="center", va="center")
            ax.set_title(f"centroids, PCA ({var:.0%} of variance); area ~ size", fontsize=10)
            _save(fig, out / f"{tag}_centroid_map.png")
            names.append(f"{tag}_centroid_map.png")
    return names


def _cluster_section(chain: Chain, i: int, out: Path, thumbs: Thumbs | None, per: int, max_clusters: int,
                     data: dict) -> str:
    step = chain.steps[i]
    table = step.table
    tag = f"step{i + 1}"
    parts = [f"<h3>Clusters of step {i + 1}: {_e(step.name)}</h3>"]
    cols = [c for c in ("cluster", "size", "d_intra", "d_inter", "complexity", "P", "budget_target", "kept")
            if c in table]
    header = cols[:] + ["kept_fraction"]
    rows = []
    for r in table[cols].itertuples(index=False):
        r = list(r)
        size, kept = int(r[cols.index("size")]), int(r[cols.index("kept")])
        rows.append([int(r[0])] + [x.item() if hasattr(x, "item") else x for x in r[1:]]
                    + [kept / size if size else float("nan")])
    data["clusters"][tag] = {"columns": header, "rows": rows}
    plots = _cluster_plots(step, table, tag, out)
    parts.append('<div class="plots">' + "".join(f'<img src="{p}" alt="{p}">' for p in plots) + "</div>")
    parts.append('<p>Budget N_j = the number kept in cluster j (DBP: the integer optimum around P_j N); '
                 'click a column to sort.</p>')
    parts.append('<div class="scroll">' + _table(f"clusters-{tag}", header, rows) + "</div>")
    if thumbs is not None and thumbs.index is not None and step.clustering_dir is not None:
        ex = cluster_examples(step, chain.candidates(i), per, thumbs.available)
        parts.append(_thumb_grid(ex, table, thumbs, per, max_clusters, tag, data))
    return "\n".join(parts)


def _thumb_grid(ex, table, thumbs: Thumbs, per: int, max_clusters: int, tag: str, data: dict) -> str:
    if ex is None:
        return "<p>No member of these clusters is in the shards.</p>"
    cluster, kept, dist, uids = ex
    hexes = [U.pair_to_uid(h, l) for h, l in zip(*U.split(uids))]
    order = table.sort_values("size", ascending=False)["cluster"].to_numpy()[:max_clusters]
    out = [f"<h4>Members per cluster (largest {len(order)} clusters; green: kept, red: dropped; "
           f"the {per} nearest to and furthest from the centroid of each, among samples in the shards)</h4>",
           f'<table id="thumbs-{tag}"><thead><tr><th>cluster</th><th>size</th><th>kept</th>'
           f'<th class="l">kept: nearest ... furthest</th><th class="l">dropped: nearest ... furthest</th>'
           f'</tr></thead><tbody>']
    shown = {}
    for c in order:
        row = table[table["cluster"] == c].iloc[0]
        cells = []
        for flag, cls in ((True, "kept"), (False, "dropped")):
            m = np.flatnonzero((cluster == c) & (kept == flag))
            m = m[np.argsort(dist[m], kind="stable")]
            cells.append("".join(thumbs.img(hexes[j], cls, f"d={dist[j]:.4f}") for j in m))
            shown.setdefault(int(c), {})[cls] = [hexes[j] for j in m]
        out.append(f'<tr><td data-v="{int(c)}">{int(c)}</td>{_td(int(row["size"]))}{_td(int(row["kept"]))}'
                   f'<td class="l thumbs">{cells[0]}</td><td class="l thumbs">{cells[1]}</td></tr>')
    out.append("</tbody></table>")
    data["thumbnails"][tag] = shown
    return "\n".join(out)


def _semdedup_section(chain: Chain, i: int, thumbs: Thumbs | None, groups: int, data: dict) -> str:
    step = chain.steps[i]
    cand = chain.candidates(i)
    eps = step.eps()
    parts = [f"<h3>SemDeDup near-duplicates of step {i + 1}: {_e(step.name)}</h3>",
             f"<p>eps = {_num(eps)}: a member j is removed when M_j = max over earlier members i of "
             f"cos(e_i, e_j) exceeds 1 - eps.</p>"]
    best = None
    for res in semdedup_results(step, cand):
        u = U.make_array(res["hi"], res["lo"])
        rem = ~K.member(step.keep, u)[0]
        if thumbs is not None and thumbs.index is not None:
            rem &= thumbs.available(u)
        if not rem.any():
            continue
        cand_rows = np.concatenate([best, res[rem]]) if best is not None else res[rem]
        best = cand_rows[np.argsort(-cand_rows["M"], kind="stable")][:groups * 4]
    if best is None:
        parts.append("<p>(no stored SemDeDup results found, or nothing removed)</p>")
        return "\n".join(parts)
    # spread the examples over clusters: the most similar removed member of distinct clusters first
    _, first = np.unique(best["cluster"], return_index=True)
    pick = np.r_[np.sort(first), np.setdiff1d(np.arange(len(best)), first)][:groups]
    removed = U.make_array(best["hi"][pick], best["lo"][pick])
    nd = near_duplicates(chain, step, cand, removed)
    if nd is None:
        return "\n".join(parts)
    partner, sim, _ = nd
    groups_data = []
    for r, p, s, m in zip(removed, partner, sim, best["M"][pick]):
        ru, pu = U.pair_to_uid(*r), U.pair_to_uid(*p)
        pkept = bool(K.member(step.keep, p.reshape(1))[0][0])
        groups_data.append({"removed": ru, "by": pu, "by_kept": pkept, "similarity": float(s), "M": float(m)})
        pimg = thumbs.img(pu, "kept" if pkept else "dropped") if thumbs else f"<code>{pu}</code>"
        rimg = thumbs.img(ru, "dropped") if thumbs else f"<code>{ru}</code>"
        parts.append(f'<div class="grp">{pimg} &rarr; removes {rimg}<br>cos = {s:.5f} (M_j = {m:.5f})<br>'
                     f'<code>{pu[:12]}</code> {"kept" if pkept else "also removed"}</div>')
    data["semdedup"][f"step{i + 1}"] = groups_data
    return "\n".join(parts)


def _diff_section(chain: Chain, other: Chain, out: Path, data: dict) -> str:
    a, b = chain.final(), other.final()
    both = int(len(K.intersect(a, b)))
    parts = ["<h2>Diff of two chains</h2>",
             f"<p>A = {_e(chain.steps[-1].path)} ({len(a):,}), B = {_e(other.steps[-1].path)} ({len(b):,}); "
             f"in both {both:,}, only A {len(a) - both:,}, only B {len(b) - both:,}.</p>"]
    d = {"a": int(len(a)), "b": int(len(b)), "both": both}
    ref = next((s for s in chain.steps + other.steps if s.clustering_dir is not None), None)
    if ref is not None:
        counts = kept_per_cluster(ref, [a, b])
        size = np.zeros(len(counts), np.int64) if ref.table is None else ref.table["size"].to_numpy()
        delta = counts[:, 0] - counts[:, 1]
        rows = [[j, int(size[j]) if j < len(size) else 0, int(counts[j, 0]), int(counts[j, 1]), int(delta[j])]
                for j in np.argsort(-np.abs(delta), kind="stable")]
        d["per_cluster"] = {"clustering": str(ref.clustering_dir), "rows": rows}
        plt = _plt()
        fig, ax = plt.subplots(figsize=(6, 3))
        ax.bar(np.arange(len(delta)), delta, color=np.where(delta >= 0, "#2a2", "#c22"))
        ax.set_xlabel(f"cluster (clustering of {_plain(ref.path.name)})")
        ax.set_ylabel("kept by A - kept by B")
        _save(fig, out / "diff.png")
        parts.append('<div class="plots"><img src="diff.png" alt="diff"></div>')
        parts.append(f"<p>Per cluster of {_e(ref.clustering_dir)}: positive = A keeps more (gained), "
                     "negative = A keeps fewer (lost).</p>")
        parts.append('<div class="scroll">' + _table("diff", ["cluster", "size", "A", "B", "A - B"], rows) + "</div>")
    data["diff"] = d
    return "\n".join(parts)


def write_report(keep_lists, out, *, pool=None, shards=None, compare=None, thumbs_per: int = 3,
                 max_clusters: int = 30, groups: int = 8, index_dir=None, index_memory=None,
                 overwrite: bool = True) -> dict:
    """Write the report folder; returns its summary (also ``report.json``). Without ``overwrite``
    (the CLI without --overwrite) an existing non-empty ``out`` is refused before any work."""
    t0 = time.time()
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"--out {out} already exists and is not empty; pass --overwrite to replace the report")
    out.mkdir(parents=True, exist_ok=True)
    chain = load_chain(keep_lists, pool)
    other = load_chain(compare, pool) if compare else None
    if other is not None and not same_pool(chain.steps[0], other.steps[0]):
        raise ConfigError(f"--compare {other.steps[-1].path} was made from another pool than {chain.steps[0].path}; "
                          "a diff of lists from two pools would show nothing in common")
    index = None
    if shards:
        from .index import build_index

        index = build_index(shards, index_dir or out / "uid_index", memory=index_memory)  # never into the shards
    thumbs = Thumbs(index, out) if index is not None else None
    data = {"funnel": funnel(chain), "clusters": {}, "thumbnails": {}, "semdedup": {},
            "index": None if index is None else {"folder": str(index.folder), "samples": len(index),
                                                 "build_s": round(index.build_s, 3), "build": index.stats}}
    _funnel_plot(data["funnel"], out / "funnel.png")
    body = ["<h1>Filter chain report</h1>",
            f"<p>{len(chain.steps)} step(s) over a pool of {chain.pool_rows:,} rows "
            f"({_e(chain.pool_dir or 'pool folder not found')}).</p>",
            "<h2>Funnel</h2>", '<div class="plots"><img src="funnel.png" alt="funnel"></div>',
            _table("funnel", ["step", "file", "candidates", "kept (distinct uids)", "entries", "of previous",
                              "of pool", "parameters"],
                   [[r["step"], r["file"], r["candidates"], r["kept"], r.get("entries", r["kept"]), r["of_previous"],
                     r["of_pool"], r["params"]] for r in data["funnel"]])]
    for i, s in enumerate(chain.steps):
        if s.table is not None and {"size", "kept", "complexity"} <= set(s.table.columns):
            body.append(_cluster_section(chain, i, out, thumbs, thumbs_per, max_clusters, data))
        if s.method == "semdedup" and s.clustering_dir is not None and chain.pool_dir is not None:
            body.append(_semdedup_section(chain, i, thumbs, groups, data))
    if other is not None:
        body.append(_diff_section(chain, other, out, data))
    page = (f'<!doctype html><html><head><meta charset="utf-8"><title>conceptprune report</title>'
            f"<style>{CSS}</style></head><body>{''.join(body)}<script>{JS}</script></body></html>")
    with atomic_open(out / "index.html", "w") as f:
        f.write(page)
    data["build_s"] = round(time.time() - t0, 3)
    data["bytes"] = sum(p.stat().st_size for p in out.rglob("*") if p.is_file() and "uid_index" not in p.parts)
    write_json(out / "report.json", data)
    return data
