"""Webdataset shards for a generated pool (tests, benchmarks): the core's
``conceptprune.synthetic.write_shards`` (what ``make-pool --shards`` writes: one small JPEG, the
caption and DataComp's json per sample, ``_stats.json`` per shard), kept here under its old name."""

from __future__ import annotations

import numpy as np

from conceptprune.synthetic import write_shards as _write_shards


def write_shards(pool_dir, out, *, rows: np.ndarray | None = None, per_shard: int = 1000) -> int:
    """Shards for the pool rows ``rows`` (sorted global rows; default all); returns the sample count."""
    return _write_shards(pool_dir, out, rows=rows, per_shard=per_shard, image_size=24, progress=False)
