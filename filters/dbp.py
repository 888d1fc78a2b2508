"""Density-Based Pruning (Abbas, Rusak et al., ICLR 2024), exactly as the paper defines it.

Per cluster j (over the candidates): d_intra_j = mean cosine distance of members to c_j;
d_inter_j = mean cosine distance from c_j to its ``neighbors`` nearest other (non-empty)
centroids; complexity C_j = d_inter_j * d_intra_j; P = softmax(C / temperature).
Budgets N_j: the integer optimum of sum (N_j - P_j N)^2 with sum N_j = N = round(F * M)
and min(floor(balance * N / k), n_j) <= N_j <= n_j (see budget.py). Inside each cluster the
N_j hardest (largest distance), easiest or random members are kept; ties go to the smaller
uid. Defaults are the paper's: temperature 0.1 (the reference code's 0.5 makes P nearly
uniform), 20 neighbours, balance 0, keep hard.
"""

from __future__ import annotations

import logging

import numpy as np

from conceptprune import uids as U
from conceptprune.checks import check_float, check_int
from conceptprune.errors import ConfigError
from conceptprune.slurm.stage import Executor

from .base import FilterResult, as_within, check_fraction, target_count
from .budget import allocate
from .select import grouped_select
from .clustering import clustering_for
from .clustering_config import ClusteringConfig
from .common import cluster_table, table_writer

log = logging.getLogger(__name__)

KEEP_ORDERS = {"hard": "largest", "easy": "smallest", "random": "hash"}


def complexity(clustering, size: np.ndarray, d_intra: np.ndarray, neighbors: int) -> tuple[np.ndarray, np.ndarray]:
    """(d_inter, complexity) per cluster; NaN for empty clusters, which are left out of
    everyone's neighbourhood (an empty centroid is no concept of this data)."""
    live = np.flatnonzero(size > 0)
    d = clustering.centroid_distances()[np.ix_(live, live)]
    np.fill_diagonal(d, np.inf)
    l_eff = min(neighbors, len(live) - 1)
    if l_eff < neighbors:
        log.warning("only %d other non-empty clusters: d_inter uses %d neighbours, not %d",
                    len(live) - 1, l_eff, neighbors)
    d_inter = np.full(len(size), np.nan)
    if l_eff > 0:
        d_inter[live] = np.sort(d, axis=1)[:, :l_eff].mean(axis=1)
    else:
        d_inter[live] = 1.0  # a single cluster: nothing to be isolated from
    return d_inter, d_inter * d_intra


def softmax(x: np.ndarray, temperature: float) -> np.ndarray:
    z = np.where(np.isfinite(x), x / temperature, -np.inf)
    z = z - np.max(z[np.isfinite(z)])
    e = np.where(np.isfinite(z), np.exp(z), 0.0)
    return e / e.sum()


def dbp(pool, *, fraction: float | None = None, temperature: float = 0.1, neighbors: int = 20, balance: float = 0.0,
        keep: str = "hard", within=None, clustering: ClusteringConfig | None = None,
        executor: "Executor | None" = None, out=None, keep_count: int | None = None) -> FilterResult | None:
    """None when the executor detaches before the clustering's jobs are done (rerun to collect).
    ``keep_count``: keep exactly min(keep_count, M) instead of round(fraction * M)."""
    fraction = check_fraction(fraction) if fraction is not None else None
    if keep not in KEEP_ORDERS:
        raise ConfigError(f"--keep must be one of {sorted(KEEP_ORDERS)}")
    temperature = check_float("--temperature", temperature, min=0.0, min_open=True)
    balance = check_float("--balance", balance, min=0.0, max=1.0)
    neighbors = check_int("--neighbors", neighbors, min=1)
    within = as_within(within)
    cl = clustering_for(pool, clustering, within, executor, out=out)
    if cl is None:
        return None
    seed = cl.meta["seed"]
    size, d_intra = cl.cluster_stats(within)
    empty = int((size == 0).sum())
    if empty:
        log.warning("%d of %d clusters have no candidates; they get no budget", empty, cl.k)
    m = int(size.sum())
    n_keep = target_count(fraction, m, keep_count=keep_count)
    d_inter, cx = complexity(cl, size, d_intra, neighbors)
    p = softmax(cx, temperature)
    lower = np.minimum(np.floor(balance * n_keep / cl.k), size).astype(np.int64)
    budgets = allocate(p, n_keep, size, lower)

    def batches():
        for _, uids, cluster, dist in cl.candidates(within):
            key = U.hash_uids(uids, seed) if keep == "random" else dist
            yield cluster.astype(np.int64), key, uids

    kept, counts = grouped_select(batches, budgets, KEEP_ORDERS[keep])
    assert int(counts.sum()) == n_keep and (counts == budgets).all()
    table = cluster_table(size, d_intra, d_inter, cx, p, counts, budget_target=p * n_keep)
    params = {"fraction": fraction, **({"keep_count": keep_count} if keep_count is not None else {}),
              "clusters": cl.k, "temperature": temperature, "neighbors": neighbors,
              "balance": balance, "keep": keep, "seed": seed, "clustering": str(cl.dir),
              "train_sample": cl.meta["train_sample"], "niter": cl.meta["niter"]}
    stats = {"empty_clusters": empty, "target": n_keep,
             "effective_clusters": float(1.0 / np.sum(p ** 2)),  # how spread P is
             "budget_objective": float(((budgets - p * n_keep) ** 2).sum())}
    return FilterResult("dbp", kept, params, {"pool": cl.rows, "candidates": m}, stats,
                        extras=table_writer(table, f"DBP: keep {n_keep:,} of {m:,} (F={n_keep / max(m, 1):.3g}, "
                                                   f"k={cl.k}, tau={temperature}, keep {keep})"))


from conceptprune.checks import float_arg, fraction_arg, int_arg  # noqa: E402

from .base import KEEP_COUNT_HELP  # noqa: E402

from .registry import FilterSpec, Param, register  # noqa: E402


def _cluster_rank(view, cluster: int, dist: float, q) -> tuple[int, int]:
    """(1-based rank of the sample in its cluster in the step's keep order, candidates in the cluster)."""
    from conceptprune import keeplist as K

    cand = view.candidates()
    keep_order = view.params.get("keep", "hard")
    hi, lo = (int(x) for x in q[0])
    before = n = 0
    for _s, uids, c, d in view.clustering().iter_assignment():
        m = c == cluster
        if cand is not None:
            m &= K.member(cand, uids)[0]
        if not m.any():
            continue
        dd, uu = d[m], uids[m]
        n += int(m.sum())
        uh, ul = U.split(uu)
        smaller_uid = (uh < hi) | ((uh == hi) & (ul < lo))
        if keep_order == "easy":
            before += int(((dd < dist) | ((dd == dist) & smaller_uid)).sum())
        else:  # hard (random: the rank by distance is still shown)
            before += int(((dd > dist) | ((dd == dist) & smaller_uid)).sum())
    return before + 1, n


def _explain(view, q, kept: bool) -> dict:
    """The sample's cluster, its distance rank there and the cluster's budget."""
    if view.clustering_dir is None:
        return {"why": "clustering folder not found"}
    _, cl, dist = view.locate(q)
    c, d = int(cl[0]), float(dist[0])
    out = {"cluster": c, "distance": d}
    if c < 0:
        out["why"] = "invalid embedding: never a candidate of a cluster"
        return out
    rank, n = _cluster_rank(view, c, d, q)
    out.update(rank=rank, cluster_candidates=n, keep=view.params.get("keep", "hard"))
    if view.table is not None:
        row = view.table[view.table["cluster"] == c].iloc[0]
        out.update(budget=int(row["kept"]), P=float(row["P"]), complexity=float(row["complexity"]),
                   d_intra=float(row["d_intra"]), d_inter=float(row["d_inter"]))
        if out["keep"] == "random":
            out["why"] = f"cluster {c}: budget {out['budget']} of {n}, members chosen by seeded hash"
        else:
            order = "furthest" if out["keep"] == "hard" else "nearest"
            out["why"] = (f"cluster {c} (P_j {out['P']:.4g}, complexity {out['complexity']:.4g}): "
                          f"distance {d:.5f} ranks {rank} of {n} ({order} first); budget N_j = {out['budget']}"
                          f" -> {'kept' if kept else 'dropped'}")
    return out


register(FilterSpec(
    "dbp", "Density-Based Pruning: cluster budgets from softmax(d_inter * d_intra / T), keep the hardest", dbp,
    runs_as="clustering", embeddings=True, clustering=True, sweep=True, explain=_explain,
    params=(Param("--fraction", fraction_arg(), group="keep", required=True,
                  help="fraction of the candidates to keep, in (0, 1]"),
            Param("--keep-count", int_arg("--keep-count", 1), group="keep", required=True, metavar="N",
                  help=KEEP_COUNT_HELP),
            Param("--temperature", float_arg("--temperature", 0.0, min_open=True), default=0.1,
                  help="softmax temperature, > 0 (default 0.1, the paper's)"),
            Param("--neighbors", int_arg("--neighbors", 1), default=20,
                  help="nearest other centroids for d_inter (default 20)"),
            Param("--balance", float_arg("--balance", 0.0, 1.0), default=0.0,
                  help="per-cluster floor r: at least min(r*N/k, n_j) kept (default 0, the paper's best)"),
            Param("--prefer", choices=("hard", "easy", "random"), default="hard", keyword="keep",
                  help="which members of a cluster to keep (default hard: furthest from the centroid)")),
    renamed=(("--keep", "--prefer", "--keep names a keep-list elsewhere"),)))
