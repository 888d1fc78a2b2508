"""Per-row scores on the executor, and the exact top-``count`` selection over them.

A score filter (negCLIPLoss, NormSim) gives every pool row one float32 number. The rows are
scored as parts on the executor (``ScoreStage``): a part takes a contiguous row range, or, for
a scorer whose rows depend on the rest of their file (``file_aligned``: negCLIPLoss's batches
never cross pool files), a contiguous range of whole files. Each part writes its scores (and,
with ``--within``, which of its rows are candidates); the launcher concatenates them into one
array of N float32 scores (4 bytes a row) and selects; the parts also wrote their rows' uids
(16 bytes a row, on disk), from which the kept ones are read back.

Selection (``top_rows``): exactly ``count`` candidates with the largest scores, ties to the
earlier row in pool order (files in sorted name order, then row), or every candidate with
``score >= threshold``. The result depends on the scores only, so on no part count.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from conceptprune import keeplist as K
from conceptprune import uids as U
from conceptprune.atomic import atomic_open
from conceptprune.checks import check_float
from conceptprune.errors import ConfigError, PoolError
from conceptprune.pool import Pool
from conceptprune.slurm.stage import Executor, Stage

from .base import Within, as_within, check_fraction
from .rows import RowRule

log = logging.getLogger(__name__)


class RowScorer:
    """What a score filter computes. ``score(pool, start, stop)`` returns the float32 scores of
    rows [start, stop); with ``file_aligned`` the range is always whole files; a
    ``per_row`` scorer is given the range's candidate mask and may leave other rows NaN. Heavy state is
    built lazily in the process that runs the part (attributes starting with ``_`` are not
    pickled)."""

    file_aligned: bool = False
    per_row: bool = False  # a row's score depends on that row alone: only candidates are scored
    name: str = "score"

    def score(self, pool: Pool, start: int, stop: int, cand: np.ndarray | None = None
              ) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}

    def describe(self) -> dict:
        return dict(self.__getstate__())


def part_range(pool: Pool, rank: int, world_size: int, file_aligned: bool) -> tuple[int, int]:
    """Rows [start, stop) of part ``rank``: a row split, or whole files (files cut as evenly
    as their count allows; a part may then be empty when there are fewer files than parts)."""
    if not file_aligned:
        return pool.split(rank, world_size)
    nf = len(pool.files)
    fa, fb = nf * rank // world_size, nf * (rank + 1) // world_size
    start = pool.files[fa].offset if fa < nf else pool.rows
    stop = pool.files[fb].offset if fb < nf else pool.rows
    return start, stop


@dataclass
class ScoreStage(Stage):
    work_dir: str
    pool_root: str | list[str]
    embedding_dir: str | None
    within: str | None
    scorer: RowScorer
    name: str = "scores"

    def part_path(self, rank: int, world_size: int, what: str) -> Path:
        return Path(self.work_dir) / "parts" / f"{rank:05d}-of-{world_size:05d}.{what}.npy"

    def run(self, rank: int, world_size: int) -> dict:
        pool = Pool(self.pool_root, embedding_dir=self.embedding_dir)
        start, stop = part_range(pool, rank, world_size, self.scorer.file_aligned)
        cand = None
        within = Within(self.within)
        if within:
            cand = np.zeros(stop - start, bool)
        uid_path = self.part_path(rank, world_size, "uids").with_suffix(".bin")
        uid_path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_open(uid_path, "wb") as f:  # the part's uids, raw u8,u8 in row order
            for chunk in pool.iter_chunks(start=start, stop=stop):
                f.write(np.ascontiguousarray(chunk.uids, dtype=U.UID_DTYPE).tobytes())
                if within:
                    cand[chunk.start - start: chunk.start - start + len(chunk)] = within.mask(chunk.uids)
        if within:
            self._save(self.part_path(rank, world_size, "cand"), np.packbits(cand))
            self._save(self.part_path(rank, world_size, "seen"), np.packbits(within.seen))
        if self.scorer.per_row and cand is not None:  # rows independent: score the candidates only
            scores = np.asarray(self.scorer.score(pool, start, stop, cand), dtype=np.float32)
        else:
            scores = np.asarray(self.scorer.score(pool, start, stop), dtype=np.float32)
        if scores.shape != (stop - start,):
            raise AssertionError(f"{self.scorer.name}: {scores.shape} scores for rows [{start}, {stop})")
        bad = ~np.isfinite(scores) if cand is None else ~np.isfinite(scores) & cand
        if bad.any():
            raise PoolError(f"{pool.locate(start + int(np.flatnonzero(bad)[0]))}: {self.scorer.name} score is "
                            f"{scores[bad][0]} ({int(bad.sum())} such rows); are the embeddings finite?")
        self._save(self.part_path(rank, world_size, "scores"), scores)
        return {"start": int(start), "stop": int(stop)}

    @staticmethod
    def _save(path: Path, arr: np.ndarray) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_open(path, "wb") as f:
            np.save(f, arr, allow_pickle=False)


def _digest(*parts) -> str:
    state = [sorted(p.__getstate__().items()) if isinstance(p, (RowScorer, RowRule)) else p for p in parts]
    return hashlib.sha256(repr([type(parts[-1]).__name__, *state]).encode()).hexdigest()[:10]


def _source(pool: Pool) -> tuple[str | list[str], str | None]:
    emb_dir = None
    if pool.files and pool.files[0].npz is not None and pool.files[0].npz.parent != pool.files[0].parquet.parent:
        emb_dir = str(pool.files[0].npz.parent)
    return (str(pool.root) if pool.root is not None else [str(f.parquet) for f in pool.files]), emb_dir


@dataclass
class ScoreSet:
    """The scores of every pool row, the candidate mask (None: every row), and the parts' uid
    files, from which ``kept(mask)`` reads the uids of the selected rows. ``cleanup()`` removes
    the parts."""

    scores: np.ndarray
    cand: np.ndarray | None
    uid_files: list  # (start, stop, path) a part
    work: Path

    @property
    def candidates(self) -> int:
        return int(self.cand.sum()) if self.cand is not None else len(self.scores)

    def kept(self, keep: np.ndarray) -> K.UidCollector:
        out = K.UidCollector()
        for a, b, path in self.uid_files:
            rows = np.flatnonzero(keep[a:b])
            if len(rows) == 0:
                continue
            part = np.memmap(path, dtype=U.UID_DTYPE, mode="r")
            for lo in range(0, len(rows), 1 << 20):
                out.add(np.array(part[rows[lo:lo + (1 << 20)]]))
            del part
        return out

    def uids(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """The uids of rows [start, stop) in pool order."""
        stop = len(self.scores) if stop is None else stop
        out = np.empty(stop - start, U.UID_DTYPE)
        for a, b, path in self.uid_files:
            lo, hi = max(a, start), min(b, stop)
            if lo < hi:
                part = np.memmap(path, dtype=U.UID_DTYPE, mode="r")
                out[lo - start: hi - start] = part[lo - a: hi - a]
                del part
        return out

    def cleanup(self) -> None:
        shutil.rmtree(self.work, ignore_errors=True)


def as_executor(executor) -> Executor:
    """The Executor given, or the default for None."""
    return Executor.given(executor)


def compute_scores(pool: Pool, scorer: RowScorer, within=None, executor=None,
                   work_dir: str | Path | None = None) -> ScoreSet:
    """Score every pool row (``executor.workers`` parts, at most one a file for a file-aligned
    scorer); the scores are the same for any number of parts. With ``--within`` the launcher
    checks that every listed uid is in the pool."""
    executor = as_executor(executor)
    within = as_within(within)
    work = Path(work_dir) if work_dir is not None else _tempdir(scorer.name)
    source, emb_dir = _source(pool)
    within_path = str(within.path) if within else None
    name = f"{scorer.name}-{_digest(source, emb_dir, within_path, scorer)}"
    stage = ScoreStage(str(work), source, emb_dir, within_path, scorer, name)
    world = executor.parts(max(1, len(pool.files) if scorer.file_aligned else pool.rows))
    res = executor.run(stage, world)
    scores = np.empty(pool.rows, np.float32)
    cand = np.zeros(pool.rows, bool) if within else None
    seen = np.zeros(len(within.uids), bool) if within else None
    uid_files = []
    for rank, summary in enumerate(res.summaries):
        a, b = summary["start"], summary["stop"]
        scores[a:b] = np.load(stage.part_path(rank, world, "scores"), allow_pickle=False)
        uid_files.append((a, b, stage.part_path(rank, world, "uids").with_suffix(".bin")))
        if within:
            bits = np.load(stage.part_path(rank, world, "cand"), allow_pickle=False)
            cand[a:b] = np.unpackbits(bits, count=b - a).astype(bool)
            seen |= np.unpackbits(np.load(stage.part_path(rank, world, "seen"), allow_pickle=False),
                                  count=len(seen)).astype(bool)
    if within:
        within.seen = seen
        within.check()
    return ScoreSet(scores, cand, uid_files, work)


def _tempdir(name: str) -> Path:
    import tempfile

    return Path(tempfile.mkdtemp(prefix=f"conceptprune-{name}-"))


def resolve_count(n: int, *, fraction: float | None = None, keep_count: int | None = None) -> int:
    """How many of ``n`` candidates to keep: ``int(n * fraction)`` (the negCLIPLoss/NormSim
    authors' rule, floor) or ``min(keep_count, n)``."""
    if (fraction is None) == (keep_count is None):
        raise ConfigError("give exactly one of --fraction or --keep-count")
    if keep_count is not None:
        from conceptprune.checks import check_int

        return min(check_int("--keep-count", keep_count, min=1), n)
    return int(n * check_fraction(fraction))


def top_rows(scores: np.ndarray, cand: np.ndarray | None, count: int) -> np.ndarray:
    """Bool mask of exactly ``min(count, candidates)`` candidate rows with the largest scores;
    among equal scores the earlier row wins. O(N) (a partition, no sort)."""
    idx = np.flatnonzero(cand) if cand is not None else None
    s = scores[idx] if idx is not None else scores
    n = len(s)
    keep_local = np.zeros(n, bool)
    count = min(int(count), n)
    if count >= n:
        keep_local[:] = True
    elif count > 0:
        kth = np.partition(s, n - count)[n - count]  # the count-th largest value
        keep_local = s > kth
        need = count - int(keep_local.sum())
        keep_local[np.flatnonzero(s == kth)[:need]] = True
    if idx is None:
        return keep_local
    keep = np.zeros(len(scores), bool)
    keep[idx[keep_local]] = True
    return keep


def at_least(scores: np.ndarray, cand: np.ndarray | None, threshold: float) -> np.ndarray:
    keep = scores >= np.float32(threshold)
    return keep & cand if cand is not None else keep


def score_stats(scores: np.ndarray, keep: np.ndarray, cand: np.ndarray | None = None) -> dict:
    kept = scores[keep]
    pool = scores[cand] if cand is not None else scores
    return {"kept_min_score": float(kept.min()) if len(kept) else None,
            "kept_mean_score": float(kept.mean()) if len(kept) else None,
            "candidates_mean_score": float(pool.mean()) if len(pool) else None}


def check_keep_rule(name: str, fraction, keep_count, threshold):
    """Exactly one of --fraction, --keep-count, --threshold (checked before any work); the
    threshold as a finite float."""
    if sum(x is not None for x in (fraction, keep_count, threshold)) != 1:
        raise ConfigError(f"{name} needs exactly one of --fraction, --keep-count or --threshold")
    return check_float("--threshold", threshold) if threshold is not None else None


def keep_by_score(pool: Pool, scorer: RowScorer, within, executor, work, *, fraction=None, keep_count=None,
                  threshold=None) -> tuple[np.ndarray, dict, int]:
    """Score every candidate (parts on the executor) and keep the top count asked (ties: the
    earlier row) or those scoring >= threshold: (kept uids, score stats, candidates)."""
    res = compute_scores(pool, scorer, within, executor, work)
    scores, cand, n = res.scores, res.cand, res.candidates
    if threshold is not None:
        keep = at_least(scores, cand, threshold)
    else:
        keep = top_rows(scores, cand, resolve_count(n, fraction=fraction, keep_count=keep_count))
    kept = res.kept(keep)
    res.cleanup()
    return kept, score_stats(scores, keep, cand), n
