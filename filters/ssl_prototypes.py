"""SSL prototypes (Sorscher et al. 2022): difficulty = cosine distance to the nearest centroid.

Keep the hardest (abundant data) or easiest (scarce data) fraction F of the candidates.
``balance`` R adds the per-cluster floor min(floor(R * N / k), n_j) that the DBP authors'
"SSP-Pruning" baseline uses (R = 0.5): each cluster first keeps its floor, the rest of the
budget goes to the globally hardest (easiest) remaining examples. Ties go to the smaller uid.
"""

from __future__ import annotations

import numpy as np

from conceptprune import keeplist as K
from conceptprune.errors import ConfigError
from conceptprune.keeplist import UidCollector
from conceptprune.slurm.stage import Executor

from .base import FilterResult, as_within, check_fraction, target_count
from .clustering import clustering_for
from .clustering_config import ClusteringConfig
from .common import cluster_table, table_writer
from .dbp import complexity
from .select import grouped_select

ORDERS = {"hard": "largest", "easy": "smallest"}


def ssl_prototypes(pool, *, fraction: float | None = None, keep: str = "hard", balance: float | None = None,
                   within=None, clustering: ClusteringConfig | None = None, executor: "Executor | None" = None,
                   out=None, keep_count: int | None = None) -> FilterResult | None:
    """None when the executor detaches before the clustering's jobs are done (rerun to collect).
    ``keep_count``: keep exactly min(keep_count, M) instead of round(fraction * M)."""
    fraction = check_fraction(fraction) if fraction is not None else None
    if keep not in ORDERS:
        raise ConfigError(f"--keep must be one of {sorted(ORDERS)}")
    if balance is not None and not 0 <= balance <= 1:
        raise ConfigError("--balance must be in [0, 1]")
    within = as_within(within)
    cl = clustering_for(pool, clustering, within, executor, out=out)
    if cl is None:
        return None
    seed = cl.meta["seed"]
    size, d_intra = cl.cluster_stats(within)
    m = int(size.sum())
    n_keep = target_count(fraction, m, keep_count=keep_count)
    order = ORDERS[keep]
    kept = UidCollector()
    counts = np.zeros(cl.k, dtype=np.int64)
    floors = np.zeros(cl.k, dtype=np.int64)
    if balance:
        floors = np.minimum(np.floor(balance * n_keep / cl.k), size).astype(np.int64)

        def per_cluster():
            for _, uids, cluster, dist in cl.candidates(within):
                yield cluster.astype(np.int64), dist, uids

        first, counts = grouped_select(per_cluster, floors, order)
        floor_uids = first.to_array()
        kept.add(floor_uids)
    else:
        floor_uids = None
    rest = n_keep - int(floors.sum())
    if rest > 0:
        def remaining():
            for _, uids, cluster, dist in cl.candidates(within):
                free = ~K.member(floor_uids, uids)[0] if floor_uids is not None else slice(None)
                yield np.zeros(len(uids[free]), np.int64), dist[free], uids[free]

        grouped_select(remaining, np.array([rest]), order, collector=kept)
        kept = kept.to_array()  # the output (N uids); needed once more to count per cluster
        counts = np.zeros(cl.k, dtype=np.int64)
        for _, uids, cluster, _ in cl.candidates(within):
            counts += np.bincount(cluster[K.member(kept, uids)[0]], minlength=cl.k)
    d_inter, cx = complexity(cl, size, d_intra, 20)
    table = cluster_table(size, d_intra, d_inter, cx, np.full(cl.k, np.nan), counts)
    params = {"fraction": fraction, **({"keep_count": keep_count} if keep_count is not None else {}),
              "clusters": cl.k, "keep": keep, "balance": balance, "seed": seed,
              "clustering": str(cl.dir), "train_sample": cl.meta["train_sample"]}
    return FilterResult("ssl-prototypes", kept, params, {"pool": cl.rows, "candidates": m},
                        {"target": n_keep, "from_floors": int(floors.sum())},
                        extras=table_writer(table, f"SSL prototypes: keep {keep} {n_keep:,} of {m:,} "
                                                   f"(k={cl.k}, balance={balance})"))


from conceptprune.checks import float_arg, fraction_arg, int_arg  # noqa: E402

from .base import KEEP_COUNT_HELP  # noqa: E402

from .registry import FilterSpec, Param, register  # noqa: E402

register(FilterSpec(
    "ssl-prototypes", "SSL prototypes (Sorscher et al.): keep the hardest/easiest by distance to the centroid",
    ssl_prototypes, runs_as="clustering", embeddings=True, clustering=True, sweep=True,
    params=(Param("--fraction", fraction_arg(), group="keep", required=True,
                  help="fraction of the candidates to keep, in (0, 1]"),
            Param("--keep-count", int_arg("--keep-count", 1), group="keep", required=True, metavar="N",
                  help=KEEP_COUNT_HELP),
            Param("--prefer", choices=("hard", "easy"), default="hard", keyword="keep",
                  help="hard (abundant data, default) or easy (scarce data)"),
            Param("--balance", float_arg("--balance", 0.0, 1.0), default=None,
                  help="per-cluster floor R: each cluster keeps at least min(R*N/k, n_j) (the DBP paper's "
                       "SSP baseline uses 0.5)")),
    renamed=(("--keep", "--prefer", "--keep names a keep-list elsewhere"),)))
