"""``none`` (keep everything) and ``random`` (exactly round(F * N) uids, seeded)."""

from __future__ import annotations

import numpy as np

from conceptprune import uids as U
from conceptprune.pool import Pool

from .base import FilterResult, as_within, target_count
from .rows import RowRule, run_rows, work_dir_for

BINS = 1 << 16
SHIFT = np.uint64(48)  # a key's top 16 bits: its histogram bin


class KeepAllRule(RowRule):
    def judge(self, chunk, cand):
        return np.ones(len(cand), bool), {}


def keep_all(pool: Pool, *, within=None, executor=None, out=None) -> FilterResult:
    res = run_rows(pool, KeepAllRule(), within, executor, work_dir_for(out, pool, "none"), name="none")
    return FilterResult("none", res.kept, {}, {"pool": pool.rows, "candidates": res.candidates})


class HashHistogram(RowRule):
    """random's first scan: the histogram of the candidates' seeded uid hashes' top 16 bits."""

    def __init__(self, seed: int):
        self.seed = seed

    def judge(self, chunk, cand):
        keys = U.hash_uids(chunk.uids[cand], self.seed)
        return None, {"hist": np.bincount((keys >> SHIFT).astype(np.intp), minlength=BINS)}


class HashBelow(RowRule):
    """random's second scan: keep the candidates whose hash bin is below ``boundary``; the
    boundary bin's (uid, key) pairs go to the launcher, which resolves them exactly."""

    concat = ("edge_uids", "edge_keys")

    def __init__(self, seed: int, boundary: int):
        self.seed, self.boundary = seed, boundary

    def judge(self, chunk, cand):
        keys = U.hash_uids(chunk.uids, self.seed)
        top = (keys >> SHIFT).astype(np.int64)
        edge = cand & (top == self.boundary)
        return top < self.boundary, {"edge_uids": chunk.uids[edge], "edge_keys": keys[edge]}


def random_subset(pool: Pool, *, fraction: float | None = None, seed: int = 0, within=None, executor=None,
                  out=None, keep_count: int | None = None) -> FilterResult:
    """Keep exactly ``round(fraction * N)`` (or ``min(keep_count, N)``) of the N candidates.

    Each uid gets a seeded 64-bit hash key and the smallest keys are kept, so the choice
    depends only on the uids and the seed: not on file order, chunking or workers. Two
    streaming scans, each as row-range parts on ``executor`` (a histogram of the keys' top
    16 bits, summed over the parts; then the rows below the boundary bin, and the boundary
    bin's rows, resolved here by (key, uid)) find the cut without holding a key per row.
    """
    within = as_within(within)
    work = work_dir_for(out, pool, "random")
    first = run_rows(pool, HashHistogram(seed), within, executor, work, name="random-hist")
    n = first.candidates
    k = target_count(fraction, n, keep_count=keep_count)
    cum = np.cumsum(first.arrays.get("hist", np.zeros(BINS, np.int64)))
    boundary = int(np.searchsorted(cum, k, side="left"))  # first bin reaching k
    need = k - (int(cum[boundary - 1]) if boundary else 0)
    res = run_rows(pool, HashBelow(seed, boundary), within, executor, work, name="random-select")
    edge = res.arrays.get("edge_uids", np.empty(0, U.UID_DTYPE))
    ekeys = res.arrays.get("edge_keys", np.empty(0, np.uint64))
    hi, lo = U.split(edge)
    res.kept.add(edge[np.lexsort((lo, hi, ekeys))[:need]])  # smallest keys; a tie goes by uid
    return FilterResult("random", res.kept, {"fraction": fraction, "seed": seed} | _given(keep_count=keep_count),
                        {"pool": pool.rows, "candidates": n})


def _given(**kw) -> dict:
    """The keywords that were given (--keep-count appears in a manifest only when used)."""
    return {k: v for k, v in kw.items() if v is not None}


from conceptprune.checks import fraction_arg, int_arg, seed_arg  # noqa: E402

from .base import KEEP_COUNT_HELP  # noqa: E402

from .registry import FilterSpec, Param, register  # noqa: E402

register(FilterSpec("none", "keep every uid of the pool (or of --within)", keep_all, runs_as="rows"))
register(FilterSpec(
    "random", "keep exactly round(F * N) uids chosen at random (seeded)", random_subset, runs_as="rows", sweep=True,
    params=(Param("--fraction", fraction_arg(), group="keep", required=True,
                  help="fraction of candidates to keep, in (0, 1]"),
            Param("--keep-count", int_arg("--keep-count", 1), group="keep", required=True, metavar="N",
                  help=KEEP_COUNT_HELP),
            Param("--seed", seed_arg(), default=0, help="random seed (default 0)"))))
