"""Glue shared by the cluster-based filters: the per-cluster table."""

from __future__ import annotations

import numpy as np


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
