"""One table of every per-sample score the toolkit computes on a pool, and how they agree.

``score_table`` writes one row a pool row (pool order), one column a score:

- ``clip_l14``, ``clip_b32``: DataComp's stored CLIP scores (parquet columns);
- ``negcliploss``: negCLIPLoss from ``l14_img`` / ``l14_txt`` (``negcliploss.py``);
- ``normsim_inf``, ``normsim_2``: NormSim against ``--target`` (only when one is given);
- ``ssl_distance``: cosine distance to the nearest of k centroids (SSL prototypes), with
  ``cluster``; ``dbp_complexity``: the DBP complexity d_inter x d_intra of the row's cluster;
  ``dbp_rank``: the row's rank inside its cluster, hardest (furthest) first, ties to the earlier
  row (DBP's ``--prefer hard`` keeps a prefix of it);
- ``semdedup_m``: SemDeDup's M_j (max similarity to an earlier, further-from-centroid member of
  its cluster; float32 GEMMs, exact), on its own clustering (its default k unless given).

Memory: about 40 bytes a pool row in this process (the columns), plus the filters' own.

``correlate`` reads a table and gives, for every pair of scores oriented so that larger means
"kept by that filter", the Spearman rank correlation and the overlap of their top-F lists
(|top_F(a) & top_F(b)| / |top_F|), as Sorscher et al. ("Beyond neural scaling laws") compare
pruning metrics.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import numpy as np

from conceptprune import uids as U
from conceptprune.atomic import atomic_open
from conceptprune.errors import ConfigError
from conceptprune.pool import Pool

from .clustering_config import ClusteringConfig

log = logging.getLogger(__name__)

# +1: larger is kept by that filter; -1: smaller is kept
ORIENTATION = {"clip_l14": 1, "clip_b32": 1, "negcliploss": 1, "normsim_inf": 1, "normsim_2": 1,
               "ssl_distance": 1, "dbp_complexity": 1, "dbp_rank": -1, "semdedup_m": -1}
PARTS = ("clip", "negcliploss", "normsim", "ssl", "dbp", "semdedup")


def score_table(pool, out, *, target=None, clustering: ClusteringConfig | None = None,
                semdedup_clusters: int | None = None, skip=(), executor=None, overwrite: bool = False,
                negcliploss_args: dict | None = None) -> Path:
    """Write ``out`` (.parquet): uid and every score the toolkit can compute on ``pool``."""
    import pandas as pd

    from .scores import as_executor

    out = Path(out)
    if out.suffix != ".parquet":
        raise ConfigError(f"--out {out}: write a .parquet file")
    if out.exists() and not overwrite:
        raise ConfigError(f"--out {out} exists; pass --overwrite to replace it")
    skip = set(skip or ())
    unknown = skip - set(PARTS)
    if unknown:
        raise ConfigError(f"--skip: unknown part {sorted(unknown)[0]!r} (parts: {', '.join(PARTS)})")
    executor = as_executor(executor)
    pool = pool if isinstance(pool, Pool) else Pool(pool)
    keys = set(pool.embedding_keys())
    cols: dict[str, np.ndarray] = {}
    work = out.with_suffix(".work")
    uids = None

    if "negcliploss" not in skip and {"l14_img", "l14_txt"} <= keys:
        from .negcliploss import make_scorer
        from .scores import compute_scores

        res = compute_scores(pool, make_scorer(**(negcliploss_args or {})), None, executor, work / "negcliploss")
        cols["negcliploss"] = res.scores
        uids = res.uids()
        res.cleanup()
    if uids is None:
        uids = pool.read_uids()
    if "clip" not in skip:
        names = set(pool.schema().names)
        for model in ("l14", "b32"):
            column = f"clip_{model}_similarity_score"
            if column in names:
                vals = np.empty(pool.rows, np.float32)
                for chunk in pool.iter_chunks([column], uids=False):
                    vals[chunk.start: chunk.start + len(chunk)] = chunk.column(column)
                cols[f"clip_{model}"] = vals
    if target is not None and "normsim" not in skip:
        from .normsim import make_scorer as normsim_scorer
        from .scores import compute_scores

        for p in ("inf", "2"):
            res = compute_scores(pool, normsim_scorer(target, p), None, executor, work / f"normsim-{p}")
            cols[f"normsim_{p}"] = res.scores
            res.cleanup()
    if "l14_img" in keys and not {"ssl", "dbp"} <= skip:
        cols.update(_cluster_columns(pool, clustering or ClusteringConfig(), executor, out, skip))
    if "l14_img" in keys and "semdedup" not in skip:
        cols["semdedup_m"] = _semdedup_m(pool, uids, clustering or ClusteringConfig(), semdedup_clusters,
                                         executor, out)
    frame = pd.DataFrame({"uid": U.arrow_from_array(uids).to_numpy(zero_copy_only=False), **cols})
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(out, "wb") as f:
        frame.to_parquet(f, index=False, row_group_size=1 << 20)
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    log.info("scores: %d rows x %d scores -> %s", len(frame), len(cols), out)
    return out


def _cluster_columns(pool: Pool, config: ClusteringConfig, executor, out: Path, skip) -> dict:
    from .base import Within
    from .clustering import clustering_for
    from .dbp import complexity

    epool = Pool(pool.root if pool.root is not None else [str(f.parquet) for f in pool.files],
                 embedding_key="l14_img")
    if config.dir is None:
        config = replace(config, dir=out.with_suffix(".clustering"))
    cl = clustering_for(epool, config, Within(None), executor)
    cluster = np.empty(pool.rows, np.int64)
    dist = np.empty(pool.rows, np.float32)
    for start, uids, c, d in cl.iter_assignment():
        cluster[start: start + len(c)] = c
        dist[start: start + len(d)] = d
    out_cols = {"cluster": cluster.astype(np.int32)}
    if "ssl" not in skip:
        out_cols["ssl_distance"] = dist
    if "dbp" not in skip:
        size, d_intra = cl.cluster_stats(Within(None))
        _, cx = complexity(cl, size, d_intra, 20)
        out_cols["dbp_complexity"] = cx[cluster].astype(np.float32)
        rows = np.arange(pool.rows)
        order = np.lexsort((rows, -dist.astype(np.float64), cluster))  # by cluster, hardest first, earlier row
        first = np.searchsorted(cluster[order], cluster[order], side="left")
        rank = np.empty(pool.rows, np.int64)
        rank[order] = np.arange(pool.rows) - first
        out_cols["dbp_rank"] = rank
    return out_cols


def _semdedup_m(pool: Pool, uids: np.ndarray, config: ClusteringConfig, k: int | None, executor,
                out: Path) -> np.ndarray:
    """M_j of every row (NaN for rows SemDeDup did not see: bad embeddings)."""
    from .clustering import within_id
    from .base import Within
    from .semdedup import iter_results, semdedup

    epool = Pool(pool.root if pool.root is not None else [str(f.parquet) for f in pool.files],
                 embedding_key="l14_img")
    sd_config = replace(config, clusters=k, dir=out.with_suffix(".semdedup-clustering"))
    res = semdedup(epool, eps=0.0, clustering=sd_config, executor=executor, pairwise="fp32")
    work = Path(res.params["clustering"]) / "semdedup" / within_id(Within(None))
    from conceptprune import keeplist as K

    hi, lo = U.split(uids)
    order = np.lexsort((lo, hi))
    index = K.UidIndex(np.ascontiguousarray(uids[order]))
    m = np.full(len(uids), np.nan, np.float32)
    for part in iter_results(work, res.params["clusters"]):
        found, idx = K.member(index, U.make_array(part["hi"], part["lo"]))
        m[order[idx[found]]] = part["M"][found]
    return m


def correlate(table, *, fraction: float = 0.2, plot=None) -> dict:
    """{"spearman": DataFrame, "overlap": DataFrame, "n": rows} over the table's score columns,
    each oriented so that larger means kept; ``plot`` writes both as heatmaps (PNG)."""
    import pandas as pd

    from .base import check_fraction

    fraction = check_fraction(fraction)
    df = pd.read_parquet(table)
    names = [c for c in ORIENTATION if c in df.columns]
    if len(names) < 2:
        raise ConfigError(f"{table}: fewer than two score columns ({', '.join(names) or 'none'})")
    x = pd.DataFrame({c: df[c].astype(np.float64) * ORIENTATION[c] for c in names})
    ranks = x.rank(method="average")
    spearman = ranks.corr(method="pearson")
    n = len(x)
    k = max(1, int(n * fraction))
    tops = {}
    for c in names:
        v = x[c].to_numpy()
        order = np.lexsort((np.arange(n), -np.nan_to_num(v, nan=-np.inf)))  # largest first, ties earlier
        tops[c] = set(order[:k].tolist())
    overlap = pd.DataFrame([[len(tops[a] & tops[b]) / k for b in names] for a in names], index=names, columns=names)
    if plot is not None:
        _plot(spearman, overlap, fraction, plot)
    return {"spearman": spearman, "overlap": overlap, "n": n, "top": k}


def _plot(spearman, overlap, fraction: float, path) -> Path:
    from .plots import _plt

    plt = _plt()
    names = list(spearman.index)
    fig, axes = plt.subplots(1, 2, figsize=(5 + 1.1 * len(names), 0.6 * len(names) + 3))
    for ax, mat, title, lo in ((axes[0], spearman, "Spearman rank correlation", -1),
                               (axes[1], overlap, f"overlap of the top {fraction:g}", 0)):
        im = ax.imshow(mat.to_numpy(), vmin=lo, vmax=1, cmap="RdBu_r" if lo < 0 else "viridis")
        ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=8)
        ax.set_yticks(range(len(names)), names, fontsize=8)
        for i in range(len(names)):
            for j in range(len(names)):
                ax.text(j, i, f"{mat.iloc[i, j]:.2f}", ha="center", va="center", fontsize=7,
                        color="w" if abs(mat.iloc[i, j]) > 0.6 else "k")
        ax.set_title(title, fontsize=10)
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    path = Path(path)
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)
    return path
