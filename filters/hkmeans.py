"""Hierarchical k-means with resampling and balanced sampling (Vo et al. 2024, arXiv 2405.15613),
as facebookresearch/ssl-data-curation computes it, on this toolkit's clustering engine.

Clustering (``hierarchical_kmeans_with_resampling``): level 1 clusters the candidates'
embeddings into k_1 clusters; level l > 1 clusters the k_{l-1} centroids of level l - 1. At every
level, after the first k-means, each of ``steps_l - 1`` resampling steps takes the
``sample_l`` points of every cluster closest to its centroid, runs k-means on that sample and
reassigns all of the level's inputs to the new centroids (the authors' distributed runner:
``n_resampling_steps`` counts every k-means run; none when ``sample_size <= 1``).

- Level 1 uses the engine (``filters/clustering.py``): spherical faiss k-means on its seeded
  training sample, then the exact, worker-count-independent assignment of every row as parts
  on the executor; each resampling step is another k-means (on the closest points) and another
  assignment pass. Levels > 1 (a few thousand centroids) run in this process.
- Deviations from the authors' engine: spherical k-means (cosine; theirs is L2 on raw vectors,
  the same order for unit vectors), faiss's random initialisation instead of k-means++, the
  engine's iteration count (``--niter``, default 100; theirs 50), and every random choice
  seeded (theirs: numpy's unseeded global RNG).

Balanced sampling (``hierarchical_sampling``) down the tree to exactly min(keep_count, N)
rows: a cluster's quota q is split among its children of sizes n_c (candidates under them)
by the largest integer t with sum_c min(t, n_c) <= q; each child gets min(t, n_c) and the
remainder q - sum_c min(t, n_c) goes one each to that many children with n_c > t, chosen by
``numpy.random.default_rng([seed, level, parent]).choice(those, remainder, replace=False)``
(``level`` = the parent's level; the root is level L + 1, id 0; children in id order). A
level-1 cluster with quota q < its size keeps q members: ``--leaf random``
(``default_rng([seed, 0, cluster]).choice(members in row order, q, replace=False)``) or
``--leaf closest`` (the q nearest its centroid, ties to the earlier row).

Memory: 16 bytes a candidate in the launcher (row, cluster, distance) plus the engine's.
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import replace
from pathlib import Path

import numpy as np

from conceptprune import uids as U
from conceptprune.atomic import atomic_open, write_json
from conceptprune.checks import check_int
from conceptprune.errors import ConfigError
from conceptprune.keeplist import UidCollector
from conceptprune.pool import Pool

from .base import FilterResult, as_within
from .clustering import AssignStage, Clustering, PoolSpec, _faiss, clustering_for, use_gpu
from .clustering_config import DEFAULT_NITER, DEFAULT_SEED, ClusteringConfig
from .common import cluster_table, table_writer
from .scores import as_executor, resolve_count

log = logging.getLogger(__name__)

DEFAULT_LEVELS = (5000, 1000)  # the authors' 2-level config (configs/2levels_random_embeddings.yaml)
DEFAULT_STEPS = (10, 10)
DEFAULT_SAMPLES = (10, 3)
WEB_CONFIG = {"levels": (10_000_000, 500_000, 50_000, 10_000), "steps": (1, 10, 10, 10),
              "samples": (1, 10, 5, 3)}  # configs/4levels_web_based_images.yaml (level 1: 100k x 100 splits)
LEAVES = ("random", "closest")


# -- balanced sampling (pure functions; the tests check them against their own) -----------------

def best_cut(sizes: np.ndarray, target: int) -> int:
    """The largest integer t with sum(min(t, sizes)) <= target (sizes.max() if all fit)."""
    sizes = np.asarray(sizes, np.int64)
    if len(sizes) == 0 or sizes.sum() <= target:
        return int(sizes.max()) if len(sizes) else 0
    lo, hi = 0, int(sizes.max())  # sum at lo <= target < sum at hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if int(np.minimum(mid, sizes).sum()) <= target:
            lo = mid
        else:
            hi = mid
    return lo


def water_fill(sizes: np.ndarray, target: int, rng: np.random.Generator) -> np.ndarray:
    """Split ``target`` among groups of ``sizes``: min(t, n) each, the remainder +1 to as many
    groups larger than t, chosen by ``rng`` (exactly min(target, sum) in all)."""
    sizes = np.asarray(sizes, np.int64)
    if int(sizes.sum()) <= target:
        return sizes.copy()
    t = best_cut(sizes, target)
    q = np.minimum(t, sizes)
    rest = int(target - q.sum())
    if rest:
        q[rng.choice(np.flatnonzero(sizes > t), rest, replace=False)] += 1
    return q


def tree_quotas(sizes1: np.ndarray, parents: list[np.ndarray], target: int, seed: int) -> list[np.ndarray]:
    """Per level (1..L) the quota of every cluster. ``parents[i]`` maps the clusters of level
    i + 1 to their parent at level i + 2 (so ``len(parents[i])`` is level i + 1's k); level L's
    clusters are the root's children."""
    L = len(parents) + 1
    sizes = [np.asarray(sizes1, np.int64)]
    for i, p in enumerate(parents):
        if len(p) != len(sizes[-1]):
            raise ValueError(f"level {i + 1} has {len(sizes[-1])} clusters but {len(p)} parents")
        k_up = len(parents[i + 1]) if i + 1 < len(parents) else (int(p.max()) + 1 if len(p) else 0)
        sizes.append(np.bincount(p, weights=sizes[-1], minlength=k_up).astype(np.int64))
    quotas = [np.zeros(len(s), np.int64) for s in sizes]
    quotas[L - 1] = water_fill(sizes[L - 1], target, np.random.default_rng([seed, L + 1, 0]))
    for lev in range(L - 1, 0, -1):  # split level lev+1's quotas (list index lev) among their children
        p = parents[lev - 1]
        order = np.argsort(p, kind="stable")  # children grouped by parent, in id order
        bounds = np.searchsorted(p[order], np.arange(len(sizes[lev]) + 1))
        for c in np.flatnonzero(quotas[lev]):
            kids = order[bounds[c]:bounds[c + 1]]
            quotas[lev - 1][kids] = water_fill(sizes[lev - 1][kids], int(quotas[lev][c]),
                                               np.random.default_rng([seed, lev + 1, int(c)]))
    return quotas


def leaf_pick(rows: np.ndarray, cluster: np.ndarray, dist: np.ndarray, quotas1: np.ndarray, leaf: str,
              seed: int) -> np.ndarray:
    """The kept rows (sorted): each level-1 cluster's quota of its members (rows in row order)."""
    order = np.lexsort((rows, cluster)) if leaf == "random" else np.lexsort((rows, dist, cluster))
    cs = cluster[order]
    k = len(quotas1)
    bounds = np.searchsorted(cs, np.arange(k + 1))
    out = []
    for c in np.flatnonzero(quotas1):
        members = order[bounds[c]:bounds[c + 1]]
        q = int(quotas1[c])
        if q >= len(members):
            out.append(rows[members])
        elif leaf == "closest":
            out.append(rows[members[:q]])
        else:
            out.append(np.random.default_rng([seed, 0, int(c)]).choice(rows[members], q, replace=False))
    return np.sort(np.concatenate(out)) if out else np.zeros(0, np.int64)


# -- the clustering -------------------------------------------------------------------------------

def _kmeans(x: np.ndarray, k: int, niter: int, seed: int, gpu: bool) -> np.ndarray:
    """Spherical k-means centroids (unit rows, float32) of ``x``, k = min(k, len(x))."""
    faiss = _faiss()
    x = np.ascontiguousarray(x, dtype=np.float32)
    k = min(k, len(x))
    km = faiss.Kmeans(x.shape[1], k, niter=niter, seed=seed, spherical=True, gpu=gpu,
                      max_points_per_centroid=math.ceil(len(x) / k) + 1, min_points_per_centroid=1, verbose=False)
    km.train(x)
    c = km.centroids.astype(np.float32)
    return c / np.linalg.norm(c, axis=1, keepdims=True)


def _closest(cluster: np.ndarray, dist: np.ndarray, index: np.ndarray, per: int) -> np.ndarray:
    """``index`` entries of the ``per`` members of every cluster nearest its centroid (ties: the
    earlier entry), sorted."""
    order = np.lexsort((index, dist, cluster))
    cs = cluster[order]
    first = np.searchsorted(cs, cs, side="left")
    pos = np.arange(len(cs)) - first
    return np.sort(index[order[pos < per]])


def _assign_small(x: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact (float64) nearest centroid by cosine, ties to the lowest id, and the distance."""
    x64 = x.astype(np.float64)
    x64 /= np.linalg.norm(x64, axis=1, keepdims=True)
    s = x64 @ centroids.astype(np.float64).T
    a = s.argmax(axis=1)
    return a.astype(np.int64), 1.0 - s[np.arange(len(x)), a]


def _candidates(cl: Clustering, within) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rows, cluster, dist = [], [], []
    for r, _, c, d in cl.candidates(within):
        rows.append(r)
        cluster.append(c.astype(np.int64))
        dist.append(d)
    cat = lambda xs, t: np.concatenate(xs).astype(t) if xs else np.zeros(0, t)  # noqa: E731
    return cat(rows, np.int64), cat(cluster, np.int64), cat(dist, np.float32)


def _resample_level1(pool: Pool, cl: Clustering, within, steps: int, sample: int, niter: int, seed: int,
                     gpu: str, executor) -> Clustering:
    """Level 1's resampling steps: k-means on each cluster's ``sample`` closest candidates, then
    every row reassigned (an assignment stage in ``cl.dir/resample-r``)."""
    rows, cluster, dist = _candidates(cl, within)
    base = cl.dir
    for r in range(1, steps):
        picked = _closest(cluster, dist, rows, sample)
        x, valid = pool.read_embedding_rows(picked)
        centroids = _kmeans(x[valid], cl.k, niter, seed + r, use_gpu(gpu))
        # named by its centroids: a rerun with the same inputs resumes it, another never reuses it
        digest = hashlib.sha256(centroids.tobytes()).hexdigest()[:12]
        step_dir = base / f"resample-{r}-{digest}"
        step_dir.mkdir(parents=True, exist_ok=True)
        if not (step_dir / "centroids.npy").exists():
            with atomic_open(step_dir / "centroids.npy", "wb") as f:
                np.save(f, centroids)
        world = executor.parts(max(1, pool.rows))
        meta = dict(cl.meta, k=int(len(centroids)), assignment={"world_size": world},
                    resample={"step": r, "sample": sample, "trained_on": int(valid.sum()), "seed": seed + r})
        write_json(step_dir / "clustering.json", meta)
        executor.run(AssignStage(str(step_dir), PoolSpec.of(pool), gpu=gpu), world)
        cl = Clustering(step_dir)
        rows, cluster, dist = _candidates(cl, within)
        log.info("hkmeans level 1: resampling step %d/%d on %d points", r, steps - 1, int(valid.sum()))
    return cl


def _upper_level(x: np.ndarray, k: int, steps: int, sample: int, niter: int, seed: int,
                 gpu: bool) -> tuple[np.ndarray, np.ndarray]:
    """Level l > 1: k-means (with resampling) of the level below's centroids: (each input's
    parent, the level's centroids, the next level's input as in the authors' code)."""
    centroids = _kmeans(x, k, niter, seed, gpu)
    parent, dist = _assign_small(x, centroids)
    if sample > 1:
        for r in range(1, steps):
            picked = _closest(parent, dist, np.arange(len(x)), sample)
            centroids = _kmeans(x[picked], k, niter, seed + r, gpu)
            parent, dist = _assign_small(x, centroids)
    return parent, centroids


def _int_list(name: str, values, n: int | None = None) -> tuple[int, ...]:
    if isinstance(values, str):
        values = [v for v in values.replace(" ", "").split(",") if v]
    try:
        out = tuple(check_int(name, int(v) if not isinstance(v, int) else v, min=1) for v in values)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: expected comma-separated integers >= 1, got {values!r}") from None
    if not out:
        raise ConfigError(f"{name}: give at least one level")
    if n is not None and len(out) != n:
        raise ConfigError(f"{name} has {len(out)} values but --levels has {n}")
    return out


def hkmeans(pool: Pool, *, keep_count: int | None = None, fraction: float | None = None,
            levels=DEFAULT_LEVELS, resampling_steps=DEFAULT_STEPS, sample_sizes=DEFAULT_SAMPLES,
            leaf: str = "random", clusters_out=None, within=None, clustering: ClusteringConfig | None = None,
            executor=None, out=None) -> FilterResult | None:
    """Keep exactly min(keep_count, N) (or int(N * fraction)) candidates, balanced down the
    cluster tree. ``clustering``'s k (``--clusters``), if given, must equal ``levels[0]``."""
    levels = _int_list("--levels", levels)
    steps = _int_list("--resampling-steps", resampling_steps, len(levels))
    samples = _int_list("--sample-sizes", sample_sizes, len(levels))
    if leaf not in LEAVES:
        raise ConfigError(f"--leaf must be one of {LEAVES}, not {leaf!r}")
    if any(b > a for a, b in zip(levels, levels[1:])):
        raise ConfigError(f"--levels {','.join(map(str, levels))}: each level needs at most as many clusters "
                          "as the one below it")
    if clusters_out is not None and Path(clusters_out).suffix != ".parquet":
        raise ConfigError(f"--clusters-out {clusters_out}: write a .parquet file")
    config = clustering or ClusteringConfig()
    if config.clusters is not None and config.clusters != levels[0]:
        raise ConfigError(f"--clusters {config.clusters} differs from the first of --levels ({levels[0]})")
    config = replace(config, clusters=levels[0])
    executor = as_executor(executor)
    within = as_within(within)
    cl = clustering_for(pool, config, within, executor, out=out)
    if cl is None:
        return None
    seed = int(cl.meta.get("seed", DEFAULT_SEED))
    niter = int(cl.meta.get("niter", DEFAULT_NITER))
    if samples[0] > 1 and steps[0] > 1:
        cl = _resample_level1(pool, cl, within, steps[0], samples[0], niter, seed, config.gpu, executor)
    rows, cluster, dist = _candidates(cl, within)
    within.check()
    n = len(rows)
    if n == 0:
        raise ConfigError("no candidate rows to cluster")
    target = resolve_count(n, fraction=fraction, keep_count=keep_count)
    parents, x = [], cl.centroids
    gpu = use_gpu(config.gpu)
    for lev in range(1, len(levels)):
        p, x = _upper_level(x, levels[lev], steps[lev], samples[lev], niter, seed + 1000 * lev, gpu)
        parents.append(p)
    sizes1 = np.bincount(cluster, minlength=cl.k)
    quotas = tree_quotas(sizes1, parents, target, seed)
    kept_rows = leaf_pick(rows, cluster, dist, quotas[0], leaf, seed)
    assert len(kept_rows) == target, (len(kept_rows), target)
    kept = UidCollector()
    for start, uids, _, _ in cl.iter_assignment():
        a, b = np.searchsorted(kept_rows, [start, start + len(uids)])
        if a < b:
            kept.add(uids[kept_rows[a:b] - start])
    if clusters_out is not None:
        _write_clusters(clusters_out, cl, within, parents)
    counts = np.bincount(cluster[np.isin(rows, kept_rows, assume_unique=True)], minlength=cl.k)
    d_intra = np.bincount(cluster, weights=dist.astype(np.float64), minlength=cl.k) / np.maximum(sizes1, 1)
    nan = np.full(cl.k, np.nan)
    extra = {f"level{lev + 2}": p for lev, p in enumerate(_paths_up(parents, cl.k))}
    table = cluster_table(sizes1, d_intra, nan, nan, nan, counts, **extra)
    params = {"keep_count": keep_count, "fraction": fraction, "levels": list(levels), "resampling_steps": list(steps),
              "sample_sizes": list(samples), "leaf": leaf, "seed": seed, "niter": niter,
              "clustering": str(cl.dir), "clusters_out": str(clusters_out) if clusters_out else None}
    stats = {"target": int(target), "clusters_per_level": [int(len(q)) for q in quotas],
             "clusters_with_quota": [int((q > 0).sum()) for q in quotas]}
    return FilterResult("hkmeans", kept, params, {"pool": pool.rows, "candidates": n}, stats,
                        extras=table_writer(table, f"hierarchical k-means {'/'.join(map(str, levels))}: "
                                                   f"{target:,} of {n:,} balanced"))


def _paths_up(parents: list[np.ndarray], k1: int) -> list[np.ndarray]:
    """For every level-1 cluster, its cluster at levels 2..L."""
    out, cur = [], np.arange(k1)
    for p in parents:
        cur = p[cur]
        out.append(cur)
    return out


def _write_clusters(path, cl: Clustering, within, parents: list[np.ndarray]) -> None:
    """uid, the cluster at every level and the cosine distance to the level-1 centroid, one
    row a candidate, in pool order."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    up = _paths_up(parents, cl.k)
    names = ["uid"] + [f"level{i + 1}" for i in range(len(parents) + 1)]
    schema = pa.schema([("uid", pa.string())] + [(nm, pa.int32()) for nm in names[1:]]
                       + [("distance", pa.float32())])
    with atomic_open(path, "wb") as f:
        w = pq.ParquetWriter(f, schema)
        for _, uids, c, d in cl.candidates(within):
            cols = [U.arrow_from_array(uids).cast(pa.string()), pa.array(c.astype(np.int32))]
            cols += [pa.array(p[c].astype(np.int32)) for p in up] + [pa.array(d.astype(np.float32))]
            w.write_table(pa.Table.from_arrays(cols, schema=schema))
        w.close()


from conceptprune.checks import fraction_arg, int_arg  # noqa: E402

from .registry import FilterSpec, Param, register  # noqa: E402

register(FilterSpec(
    "hkmeans", "hierarchical k-means with resampling, then balanced sampling down the tree (Vo et al. 2024)",
    hkmeans, runs_as="clustering", embeddings=True, clustering=True, sweep=True,
    default_clusters="the first of --levels",
    params=(Param("--keep-count", int_arg("--keep-count", 1), group="keep", required=True, metavar="N",
                  help="keep exactly min(N, candidates) rows"),
            Param("--fraction", fraction_arg(), group="keep", required=True, help="keep exactly int(N*F) rows"),
            Param("--levels", default=",".join(map(str, DEFAULT_LEVELS)),
                  help="clusters per level, bottom up (default 5000,1000: the authors' 2-level config; their "
                       "web config: 10000000,500000,50000,10000)"),
            Param("--resampling-steps", default=",".join(map(str, DEFAULT_STEPS)),
                  help="k-means runs per level, the first included (default 10,10; web: 1,10,10,10)"),
            Param("--sample-sizes", default=",".join(map(str, DEFAULT_SAMPLES)),
                  help="closest points per cluster a resampling step clusters (default 10,3; web: 1,10,5,3)"),
            Param("--leaf", choices=LEAVES, default="random",
                  help="which members of a bottom cluster fill its quota: random (default; seeded) or closest"),
            Param("--clusters-out", metavar="CLUSTERS.parquet",
                  help="also write each candidate's cluster at every level and its distance"))))
