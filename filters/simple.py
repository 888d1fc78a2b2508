"""``none`` (keep everything) and ``random`` (exactly round(F * N) uids, seeded)."""

from __future__ import annotations

import numpy as np

from conceptprune import uids as U
from conceptprune.pool import Pool

from .base import FilterResult, Within, as_within, target_count


def candidates(pool: Pool, within: Within, progress: str = "reading uids") -> np.ndarray:
    """All candidate uids (pool rows that pass --within), in row order."""
    parts = []
    for chunk in pool.iter_chunks(progress=progress):
        parts.append(chunk.uids[within.mask(chunk.uids)])
    within.check()
    return np.concatenate(parts) if parts else np.empty(0, U.UID_DTYPE)


def keep_all(pool: Pool, *, within=None) -> FilterResult:
    within = as_within(within)
    kept = candidates(pool, within)
    return FilterResult("none", kept, {}, {"pool": pool.rows, "candidates": len(kept)})


def random_subset(pool: Pool, *, fraction: float, seed: int = 0, within=None) -> FilterResult:
    """Keep exactly ``round(fraction * N)`` of the N candidates.

    Each uid gets a seeded 64-bit hash key and the smallest keys are kept, so the choice
    depends only on the uids and the seed: not on file order, chunking or workers.
    """
    within = as_within(within)
    cand = candidates(pool, within)
    k = target_count(fraction, len(cand))
    keys = U.hash_uids(cand, seed)
    if k < len(cand):
        kth = np.partition(keys, k - 1)[k - 1]
        below = keys < kth
        tied = np.flatnonzero(keys == kth)
        if len(tied) > k - below.sum():  # a 64-bit tie: break it by uid order
            hi, lo = U.split(cand[tied])
            tied = tied[np.lexsort((lo, hi))][: k - below.sum()]
        sel = np.concatenate([np.flatnonzero(below), tied])
        kept = cand[sel]
    else:
        kept = cand
    return FilterResult("random", kept, {"fraction": fraction, "seed": seed},
                        {"pool": pool.rows, "candidates": len(cand)})
