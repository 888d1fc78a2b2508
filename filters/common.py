"""Glue shared by the cluster-based filters: get a clustering, build the per-cluster table."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .clustering import Clustering, ClusteringSpec, build_clustering, parse_bytes


def clustering_for(pool, clusters: int | None, seed: int | None, within, *, default_k: int = 100,
                   clustering_dir=None, niter: int | None = None, train_sample: int | None = None,
                   executor=None, gpu: str = "auto", out=None, kmeans_memory="8G") -> Clustering:
    """Build or reuse the clustering: in ``clustering_dir``, else next to the output
    (``KEEP.clustering/``), else in a folder named after the pool and the spec."""
    from conceptprune.checks import check_int, check_optional, check_seed

    # every numeric option of the clustering, before any work (0 must not mean "default")
    clusters = check_optional(check_int, "--clusters", clusters, min=1)
    niter = check_optional(check_int, "--niter", niter, min=1)
    train_sample = check_optional(check_int, "--train-sample", train_sample, min=1)
    seed = check_optional(check_seed, "--seed", seed)
    if clustering_dir is None:
        if out is not None:
            clustering_dir = Path(out).with_suffix(".clustering")
        else:  # a Python call without an output: a cache folder (the pool may be read-only)
            import hashlib
            import os

            key = hashlib.sha1(repr((str(Path(pool.root).resolve()), pool.rows, pool.embedding_key,
                                     clusters or default_k, seed, niter, train_sample)).encode()).hexdigest()[:16]
            cache = Path(os.environ.get("CONCEPTPRUNE_CACHE", Path.home() / ".cache" / "conceptprune"))
            clustering_dir = cache / "clusterings" / key
    spec = ClusteringSpec(k=clusters, seed=seed, niter=niter, train_sample=train_sample, gpu=gpu, default_k=default_k,
                          kmeans_memory=parse_bytes(kmeans_memory))
    return build_clustering(clustering_dir, pool, spec, within, executor=executor)


def cluster_table(size, d_intra, d_inter, cx, p, kept, **extra):
    import pandas as pd

    data = {"cluster": np.arange(len(size), dtype=np.int32), "size": size.astype(np.int64),
            "d_intra": d_intra, "d_inter": d_inter, "complexity": cx, "P": p, "kept": kept.astype(np.int64)}
    data.update(extra)
    return pd.DataFrame(data)


def table_writer(table, title: str) -> dict:
    """Extras for FilterResult: KEEP.clusters.parquet and KEEP.clusters.png."""
    from conceptprune.atomic import atomic_open

    from .plots import plot_clusters

    def write_table(path):
        with atomic_open(path, "wb") as f:
            table.to_parquet(f, index=False)

    def write_plot(path):
        plot_clusters(table, path, title)

    return {".clusters.parquet": write_table, ".clusters.png": write_plot}
