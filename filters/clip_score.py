"""DataComp's CLIP-score filter, exactly, streamed, as parts on the executor.

With ``fraction`` f over N candidates the threshold is the score at index ``int(N * f)``
of the scores sorted descending, and every row with ``score >= threshold`` is kept (ties
included, so slightly more than f * N rows can survive). DataComp's own code loads the
whole column and sorts it; here an exact two-level radix select over the float32 bit
patterns finds that order statistic with 2 x 65536 counters, so memory does not grow with
the pool. ``f = 1`` keeps every candidate (DataComp's index would be out of range).

Each of the three scans (high-bit histogram, low-bit histogram of the boundary bin, the
rows at or above the threshold) runs as row-range parts (``rows.py``): the parts' histograms
are summed, so the threshold, and the kept uids, are the same for any number of parts.
"""

from __future__ import annotations

import numpy as np

from conceptprune.checks import check_float
from conceptprune.errors import ConfigError, PoolError
from conceptprune.pool import Pool

from .base import FilterResult, as_within, check_fraction
from .rows import RowRule, run_rows, work_dir_for
from .select import from_sortable_f32, sortable_f32

SCORE_COLUMNS = {"l14": "clip_l14_similarity_score", "b32": "clip_b32_similarity_score"}
BINS = 1 << 16


def _scores(chunk, column: str, cand: np.ndarray) -> np.ndarray:
    """The candidates' scores; every row's score of the chunk must be finite."""
    s = chunk.column(column).astype(np.float32, copy=False)
    bad = ~np.isfinite(s)
    if bad.any():
        raise PoolError(f"{chunk.where(int(np.flatnonzero(bad)[0]))}: {column} is {s[bad][0]}; "
                        "CLIP scores must be finite")
    return s[cand]


class ScoreHistogram(RowRule):
    """A scan of the fraction rule: the histogram of the candidates' score keys' high 16 bits,
    or (given ``high``) of the low 16 bits of the keys in high bin ``high``. Keeps nothing."""

    needs_uids = False

    def __init__(self, column: str, high: int | None = None):
        self.column, self.high, self.columns = column, high, (column,)

    def judge(self, chunk, cand):
        key = sortable_f32(_scores(chunk, self.column, cand))
        if self.high is None:
            return None, {"hist": np.bincount((key >> np.uint32(16)).astype(np.intp), minlength=BINS)}
        sel = key[(key >> np.uint32(16)) == np.uint32(self.high)]
        return None, {"hist": np.bincount((sel & np.uint32(0xFFFF)).astype(np.intp), minlength=BINS)}


class AtLeast(RowRule):
    """Keep the rows whose score is >= ``threshold`` (compared in float32)."""

    def __init__(self, column: str, threshold: float):
        self.column, self.threshold, self.columns = column, float(threshold), (column,)

    def judge(self, chunk, cand):
        return chunk.column(self.column).astype(np.float32, copy=False) >= np.float32(self.threshold), {}


def score_threshold(pool: Pool, column: str, fraction: float | None, within, executor=None,
                    work_dir=None, keep_count: int | None = None) -> tuple[float, int]:
    """(threshold, number of candidates) for DataComp's fraction rule, in two scans: the score
    at index int(N * fraction) (or the keep_count-th, index keep_count - 1) of the scores sorted
    descending."""
    work = work_dir_for(None, pool, "clip-score") if work_dir is None else work_dir
    first = run_rows(pool, ScoreHistogram(column), within, executor, work, name="clip-score-high")
    hist, n = first.arrays.get("hist", np.zeros(BINS, np.int64)), first.candidates
    if n == 0:
        raise ConfigError("no candidate rows to filter")
    # rank in descending order, 0-based (DataComp's index int(N F); the N-th score for keep_count N)
    r = int(n * fraction) if keep_count is None else int(keep_count) - 1
    if r >= n:
        return -np.inf, n
    desc = np.cumsum(hist[::-1])  # desc[i]: rows in the top i+1 high-bit bins
    top_bin = int(np.searchsorted(desc, r, side="right"))
    high = BINS - 1 - top_bin
    r_in_bin = r - (int(desc[top_bin - 1]) if top_bin else 0)
    second = run_rows(pool, ScoreHistogram(column, high), within, executor, work, name="clip-score-low")
    low_desc = np.cumsum(second.arrays["hist"][::-1])
    low = BINS - 1 - int(np.searchsorted(low_desc, r_in_bin, side="right"))
    return from_sortable_f32((high << 16) | low), n


def clip_score(pool: Pool, *, fraction: float | None = None, threshold: float | None = None,
               model: str = "l14", column: str | None = None, within=None, executor=None,
               out=None, keep_count: int | None = None) -> FilterResult:
    """``column`` overrides the model's score column (e.g. ``similarity_score`` written by
    ``conceptprune embed --text`` for your own encoder). ``executor``: where the scans run
    (``executor.workers`` row-range parts); the kept uids do not depend on it. ``keep_count``
    K: the threshold is the K-th largest score (ties kept, as with --fraction)."""
    if sum(x is not None for x in (fraction, threshold, keep_count)) != 1:
        raise ConfigError("clip-score needs exactly one of --fraction, --keep-count or --threshold")
    if column is None and model not in SCORE_COLUMNS:
        raise ConfigError(f"--model must be one of {sorted(SCORE_COLUMNS)}, got {model!r}")
    column = column or SCORE_COLUMNS[model]
    if threshold is not None:
        threshold = check_float("--threshold", threshold)
    within = as_within(within)
    work = work_dir_for(out, pool, "clip-score")
    n_cand = None
    if keep_count is not None:
        from conceptprune.checks import check_int

        threshold, n_cand = score_threshold(pool, column, None, within, executor, work,
                                            keep_count=check_int("--keep-count", keep_count, min=1))
    if fraction is not None:
        fraction = check_fraction(fraction)
        threshold, n_cand = score_threshold(pool, column, fraction, within, executor, work)
    res = run_rows(pool, AtLeast(column, threshold), within, executor, work, name="clip-score-select")
    params = {"model": model, "fraction": fraction, "threshold": float(threshold), "column": column}
    if keep_count is not None:
        params["keep_count"] = keep_count
    return FilterResult("clip-score", res.kept, params, {"pool": pool.rows, "candidates": n_cand or res.candidates})


from conceptprune.checks import float_arg, fraction_arg, int_arg  # noqa: E402

from .registry import FilterSpec, Param, register  # noqa: E402


def _explain(view, q, kept: bool) -> dict:
    col = view.params.get("column") or "clip_l14_similarity_score"
    thr = view.params.get("threshold")
    row = view.row(q, [col])
    score = None if row is None else row[col]
    d = {"score": score, "threshold": thr, "column": col}
    if score is not None and thr is not None:
        d["why"] = f"{col} {score:.5f} {'>=' if kept else '<'} threshold {thr:.5f}"
    return d


register(FilterSpec(
    "clip-score", "DataComp's CLIP-score filter (top fraction, or score >= threshold)", clip_score, runs_as="rows",
    params=(Param("--arch", choices=("l14", "b32"), default="l14", keyword="model",
                  help="which CLIP model's score column (DataComp's --arch; default l14)"),
            Param("--fraction", fraction_arg(), group="keep", required=True,
                  help="keep the top fraction (threshold at index int(N*F), ties kept)"),
            Param("--keep-count", int_arg("--keep-count", 1), group="keep", required=True, metavar="N",
                  help="keep the N highest scores (threshold: the N-th largest, ties kept)"),
            Param("--threshold", float_arg("--threshold"), group="keep", required=True,
                  help="keep score >= threshold (a finite number)"),
            Param("--score-column", keyword="column",
                  help="use this parquet column instead (e.g. similarity_score from 'conceptprune embed --text')")),
    renamed=(("--model", "--arch", "DataComp's name; --model names a trained model elsewhere"),),
    explain=_explain))
