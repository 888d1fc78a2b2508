"""Per-row filters on the executor: each part judges a contiguous slice of the pool's rows.

A per-row rule (``basic``, ``laion2b``, ``none``) decides every row on its own, so the pool is
cut into ``executor.workers`` row ranges (``Pool.split``), each part writes the sorted uids it
keeps and a bitmap of the ``--within`` uids it saw, and the launcher merges them. The result
is the same set of uids whatever the number of parts, and the fastText pass over a
128M-row pool can run as a SLURM array.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from conceptprune import keeplist as K
from conceptprune.atomic import atomic_open
from conceptprune.errors import KeepListError
from conceptprune.pool import Pool
from conceptprune.slurm.stage import Executor, Stage

from .base import Within, as_within


class RowRule:
    """What a per-row filter keeps. Subclasses name the parquet ``columns`` they read and
    implement ``judge(chunk, candidates) -> (keep mask, counters)``. Heavy state (a language
    model) is loaded lazily in the process that runs the part, never pickled."""

    columns: tuple = ()

    def judge(self, chunk, candidates: np.ndarray) -> tuple[np.ndarray, dict]:  # pragma: no cover - abstract
        raise NotImplementedError

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}


@dataclass
class RowFilterStage(Stage):
    work_dir: str
    pool_root: str
    embedding_dir: str | None
    within: str | None
    rule: RowRule
    name: str = "rows"

    def part_path(self, rank: int, world_size: int, what: str) -> Path:
        return Path(self.work_dir) / "parts" / f"{rank:05d}-of-{world_size:05d}.{what}.npy"

    def run(self, rank: int, world_size: int) -> dict:
        pool = Pool(self.pool_root, embedding_dir=self.embedding_dir)
        start, stop = pool.split(rank, world_size)
        within = Within(self.within)
        spill = Path(self.work_dir) / "spill" / str(rank)
        spill.mkdir(parents=True, exist_ok=True)
        kept, counters, n = K.UidCollector(spill_dir=spill), {}, 0
        for chunk in pool.iter_chunks(list(self.rule.columns), start=start, stop=stop, progress=False):
            cand = within.mask(chunk.uids)
            n += int(cand.sum())
            keep, counts = self.rule.judge(chunk, cand)
            for key, value in counts.items():
                counters[key] = counters.get(key, 0) + int(value)
            kept.add(chunk.uids[cand & keep])
        self._save(self.part_path(rank, world_size, "kept"), kept.to_array())
        if within:
            self._save(self.part_path(rank, world_size, "seen"), np.packbits(within.seen))
        shutil.rmtree(Path(self.work_dir) / "spill" / str(rank), ignore_errors=True)
        return {"candidates": n, "counters": counters}

    @staticmethod
    def _save(path: Path, arr: np.ndarray) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_open(path, "wb") as f:
            np.save(f, arr, allow_pickle=False)


@dataclass
class RowResult:
    kept: K.UidCollector
    candidates: int
    counters: dict = field(default_factory=dict)


def run_rows(pool: Pool, rule: RowRule, within, executor: Executor | str | None, work_dir: Path) -> RowResult:
    """Run ``rule`` over the pool in ``executor.workers`` parts and merge what they keep."""
    executor = Executor.coerce(executor)
    within = as_within(within)
    if pool.root is None:
        raise KeepListError("a per-row filter needs a pool folder")
    emb_dir = None
    if pool.files and pool.files[0].npz is not None and pool.files[0].npz.parent != pool.files[0].parquet.parent:
        emb_dir = str(pool.files[0].npz.parent)
    stage = RowFilterStage(str(work_dir), str(pool.root), emb_dir, str(within.path) if within else None, rule)
    world = executor.parts(max(1, pool.rows))
    res = executor.run(stage, world)
    kept, counters, n = K.UidCollector(), {}, 0
    seen = np.zeros(len(within.uids), bool) if within else None
    for rank, summary in enumerate(res.summaries):
        n += summary["candidates"]
        for key, value in summary["counters"].items():
            counters[key] = counters.get(key, 0) + value
        kept.add(np.load(stage.part_path(rank, world, "kept"), allow_pickle=False))
        if within:
            bits = np.load(stage.part_path(rank, world, "seen"), allow_pickle=False)
            seen |= np.unpackbits(bits, count=len(seen)).astype(bool)
    if within:
        within.seen = seen
        within.check()
    shutil.rmtree(work_dir, ignore_errors=True)
    return RowResult(kept, n, counters)


def work_dir_for(out, pool: Pool, method: str) -> Path:
    """Where the parts of a per-row filter go: beside the output (``KEEP.parts/``), or in a
    temporary folder for a Python call without one."""
    if out is not None:
        return Path(out).with_suffix(".parts")
    import tempfile

    return Path(tempfile.mkdtemp(prefix=f"conceptprune-{method}-"))
