"""``none`` (keep everything) and ``random`` (exactly round(F * N) uids, seeded)."""

from __future__ import annotations

import numpy as np

from conceptprune import uids as U
from conceptprune.keeplist import UidCollector
from conceptprune.pool import Pool

from .base import FilterResult, as_within, target_count
from .rows import RowRule, run_rows, work_dir_for


class KeepAllRule(RowRule):
    def judge(self, chunk, cand):
        return np.ones(len(cand), bool), {}


def keep_all(pool: Pool, *, within=None, executor=None, out=None) -> FilterResult:
    res = run_rows(pool, KeepAllRule(), within, executor, work_dir_for(out, pool, "none"))
    return FilterResult("none", res.kept, {}, {"pool": pool.rows, "candidates": res.candidates})


keep_all.uses_rows = True


def random_subset(pool: Pool, *, fraction: float, seed: int = 0, within=None) -> FilterResult:
    """Keep exactly ``round(fraction * N)`` of the N candidates.

    Each uid gets a seeded 64-bit hash key and the smallest keys are kept, so the choice
    depends only on the uids and the seed: not on file order, chunking or workers. Two
    streaming passes (a histogram of the keys' top 16 bits, then the boundary bin) find
    the cut without holding a key per row.
    """
    within = as_within(within)
    hist = np.zeros(1 << 16, dtype=np.int64)
    for chunk in pool.iter_chunks(progress="random (pass 1/2)"):
        keys = U.hash_uids(chunk.uids[within.mask(chunk.uids)], seed)
        hist += np.bincount((keys >> np.uint64(48)).astype(np.intp), minlength=1 << 16)
    within.check()
    n = int(hist.sum())
    k = target_count(fraction, n)
    cum = np.cumsum(hist)
    boundary = int(np.searchsorted(cum, k, side="left"))  # first bin reaching k
    need = k - (int(cum[boundary - 1]) if boundary else 0)
    kept, edge_uids, edge_keys = UidCollector(), [], []
    for chunk in pool.iter_chunks(progress="random (pass 2/2)"):
        cand = chunk.uids[within.mask(chunk.uids)]
        keys = U.hash_uids(cand, seed)
        top = (keys >> np.uint64(48)).astype(np.int64)
        kept.add(cand[top < boundary])
        edge_uids.append(cand[top == boundary])
        edge_keys.append(keys[top == boundary])
    edge, ekeys = np.concatenate(edge_uids), np.concatenate(edge_keys)
    hi, lo = U.split(edge)
    kept.add(edge[np.lexsort((lo, hi, ekeys))[:need]])  # smallest keys; a tie goes by uid
    return FilterResult("random", kept, {"fraction": fraction, "seed": seed},
                        {"pool": pool.rows, "candidates": n})
