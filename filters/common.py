"""Glue shared by the cluster-based filters: the per-cluster table."""

from __future__ import annotations

import numpy as np


def cluster_table(size, d_intra, d_inter, cx, p, kept, **extra):
    import pandas as pd

    data = {"cluster": np.arange(len(size), dtype=np.int32), "size": size.astype(np.int64),
            "d_intra": d_intra, "d_inter": d_inter, "complexity": cx, "P": p, "kept": kept.astype(np.int64)}
    data.update(extra)
    return pd.DataFrame(data)


def table_writer(table, title: str):
    """Extras for FilterResult, as data: KEEP.clusters.parquet and KEEP.clusters.png."""
    from .base import ClusterTable

    return ClusterTable(table, title)
