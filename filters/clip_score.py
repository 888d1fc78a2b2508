"""DataComp's CLIP-score filter, exactly, streamed.

With ``fraction`` f over N candidates the threshold is the score at index ``int(N * f)``
of the scores sorted descending, and every row with ``score >= threshold`` is kept (ties
included, so slightly more than f * N rows can survive). DataComp's own code loads the
whole column and sorts it; here an exact two-level radix select over the float32 bit
patterns finds that order statistic with 2 x 65536 counters, so memory does not grow with
the pool. ``f = 1`` keeps every candidate (DataComp's index would be out of range).
"""

from __future__ import annotations

import numpy as np

from conceptprune.checks import check_float
from conceptprune.errors import ConfigError, PoolError
from conceptprune.keeplist import UidCollector
from conceptprune.pool import Pool

from .base import FilterResult, as_within, check_fraction
from .select import from_sortable_f32, sortable_f32

SCORE_COLUMNS = {"l14": "clip_l14_similarity_score", "b32": "clip_b32_similarity_score"}


def _scores(chunk, column, within):
    s = chunk.column(column).astype(np.float32, copy=False)
    bad = ~np.isfinite(s)
    if bad.any():
        raise PoolError(f"{chunk.where(int(np.flatnonzero(bad)[0]))}: {column} is {s[bad][0]}; "
                        "CLIP scores must be finite")
    if within:
        return s[within.mask(chunk.uids)]
    return s


def score_threshold(pool: Pool, column: str, fraction: float, within) -> tuple[float, int]:
    """(threshold, number of candidates) for DataComp's fraction rule, in two passes."""
    uids_needed = bool(within)
    hist = np.zeros(1 << 16, dtype=np.int64)
    n = 0
    for chunk in pool.iter_chunks([column], uids=uids_needed, progress="scores (pass 1/2)"):
        key = sortable_f32(_scores(chunk, column, within))
        hist += np.bincount((key >> np.uint32(16)).astype(np.intp), minlength=1 << 16)
        n += len(key)
    within.check()
    if n == 0:
        raise ConfigError("no candidate rows to filter")
    r = int(n * fraction)  # rank in descending order, 0-based
    if r >= n:
        return -np.inf, n
    desc = np.cumsum(hist[::-1])  # desc[i]: rows in the top i+1 high-bit bins
    top_bin = int(np.searchsorted(desc, r, side="right"))
    high = (1 << 16) - 1 - top_bin
    r_in_bin = r - (int(desc[top_bin - 1]) if top_bin else 0)
    low_hist = np.zeros(1 << 16, dtype=np.int64)
    for chunk in pool.iter_chunks([column], uids=uids_needed, progress="scores (pass 2/2)"):
        key = sortable_f32(_scores(chunk, column, within))
        sel = key[(key >> np.uint32(16)) == high]
        low_hist += np.bincount((sel & np.uint32(0xFFFF)).astype(np.intp), minlength=1 << 16)
    low_desc = np.cumsum(low_hist[::-1])
    low = (1 << 16) - 1 - int(np.searchsorted(low_desc, r_in_bin, side="right"))
    return from_sortable_f32((high << 16) | low), n


def clip_score(pool: Pool, *, fraction: float | None = None, threshold: float | None = None,
               model: str = "l14", column: str | None = None, within=None) -> FilterResult:
    """``column`` overrides the model's score column (e.g. ``similarity_score`` written by
    ``conceptprune embed --text`` for your own encoder)."""
    if (fraction is None) == (threshold is None):
        raise ConfigError("clip-score needs exactly one of --fraction or --threshold")
    if column is None and model not in SCORE_COLUMNS:
        raise ConfigError(f"--model must be one of {sorted(SCORE_COLUMNS)}, got {model!r}")
    column = column or SCORE_COLUMNS[model]
    if threshold is not None:
        threshold = check_float("--threshold", threshold)
    within = as_within(within)
    n_cand = None
    if fraction is not None:
        fraction = check_fraction(fraction)
        threshold, n_cand = score_threshold(pool, column, fraction, within)
    kept, n = UidCollector(), 0
    for chunk in pool.iter_chunks([column], progress="selecting"):
        s = chunk.column(column).astype(np.float32, copy=False)
        cand = within.mask(chunk.uids) if within else np.ones(len(chunk), bool)
        n += int(cand.sum())
        kept.add(chunk.uids[cand & (s >= np.float32(threshold))])
    within.check()
    params = {"model": model, "fraction": fraction, "threshold": float(threshold), "column": column}
    return FilterResult("clip-score", kept, params, {"pool": pool.rows, "candidates": n_cand or n})
