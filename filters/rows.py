"""Per-row filters on the executor: each part judges a contiguous slice of the pool's rows.

A per-row rule (``basic``, ``laion2b``, ``none``, ``clip-score --threshold``) decides every
row on its own, so the pool is cut into ``executor.workers`` row ranges (``Pool.split``), each
part writes the sorted uids it keeps and a bitmap of the ``--within`` uids it saw, and the
launcher merges them. The result is the same set of uids whatever the number of parts, and
the fastText pass over a 128M-row pool can run as a SLURM array.

A rule may also return arrays (a histogram, the rows of a boundary bin): each part saves
them, and the launcher sums them (or concatenates the ones the rule names in ``concat``).
That is the scan of a global selection (``clip-score --fraction``, ``random``): the parts
stream their rows, the launcher does the exact, worker-count-independent selection.
"""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from conceptprune import keeplist as K
from conceptprune import uids as U
from conceptprune.atomic import atomic_open
from conceptprune.errors import KeepListError
from conceptprune.pool import Pool, pool_fingerprint
from conceptprune.slurm.stage import Executor, Stage

from .base import Within, as_within

MERGE_ROWS = 1 << 20  # uids read back from a part's file at a time


class RowRule:
    """What a per-row filter keeps. Subclasses name the parquet ``columns`` they read and
    implement ``judge(chunk, candidates) -> (keep mask or None, counters)``: counters are
    ints (summed into the summary) or arrays (saved by the part; summed at the merge, or
    concatenated for the names in ``concat``). ``needs_uids = False`` skips reading the uid
    column when no ``--within`` asks for it (a rule that keeps nothing). Heavy state (a
    language model) is loaded lazily in the process that runs the part, never pickled."""

    columns: tuple = ()
    concat: tuple = ()
    needs_uids: bool = True

    def judge(self, chunk, candidates: np.ndarray) -> tuple[np.ndarray | None, dict]:  # pragma: no cover - abstract
        raise NotImplementedError

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}


class _Counters:
    """A part's counters: ints summed; arrays summed, or collected for concatenation."""

    def __init__(self, concat: tuple):
        self.concat, self.ints, self.arrays = concat, {}, {}

    def add(self, counts: dict) -> None:
        for key, value in counts.items():
            if isinstance(value, np.ndarray):
                if key in self.concat:
                    self.arrays.setdefault(key, []).append(value)
                else:
                    self.arrays[key] = self.arrays[key] + value if key in self.arrays else value.copy()
            else:
                self.ints[key] = self.ints.get(key, 0) + int(value)

    def final_arrays(self) -> dict[str, np.ndarray]:
        return {k: np.concatenate(v) if k in self.concat else v for k, v in self.arrays.items()}


@dataclass
class RowFilterStage(Stage):
    work_dir: str
    pool_root: str | list[str]  # the pool folder, or its parquet files
    embedding_dir: str | None
    within: str | None
    rule: RowRule
    name: str = "rows"

    within_digest: str | None = None  # the --within list's content when the stage was made

    def part_path(self, rank: int, world_size: int, what: str, suffix: str = "npy") -> Path:
        # under the stage's name (its inputs' and rule's digest): parts of other work are never read
        return Path(self.work_dir) / "parts" / self.name / f"{rank:05d}-of-{world_size:05d}.{what}.{suffix}"

    def run(self, rank: int, world_size: int) -> dict:
        pool = Pool(self.pool_root, embedding_dir=self.embedding_dir)
        start, stop = pool.split(rank, world_size)
        within = Within(self.within)
        if within and _within_digest(within) != self.within_digest:
            raise KeepListError(f"--within {self.within}: the list changed while the filter ran; run it again")
        spill = Path(self.work_dir) / "spill" / str(rank)
        spill.mkdir(parents=True, exist_ok=True)
        kept, counters, n = K.UidCollector(spill_dir=spill), _Counters(self.rule.concat), 0
        columns = list(self.rule.columns)
        label = f"{self.name.rsplit('-', 1)[0]} {rank + 1}/{world_size}"  # the name less its digest
        for chunk in pool.iter_chunks(columns, uids=self.rule.needs_uids or bool(within), start=start, stop=stop,
                                      progress=label):
            cand = within.mask(chunk.uids) if chunk.uids is not None else np.ones(len(chunk), bool)
            n += int(cand.sum())
            keep, counts = self.rule.judge(chunk, cand)
            counters.add(counts)
            if keep is not None:
                kept.add(chunk.uids[cand & keep])
        self._save_kept(self.part_path(rank, world_size, "kept", "bin"), kept)
        if within:
            self._save(self.part_path(rank, world_size, "seen"), np.packbits(within.seen))
        arrays = counters.final_arrays()
        for key, arr in arrays.items():
            self._save(self.part_path(rank, world_size, f"array-{key}"), arr)
        shutil.rmtree(spill, ignore_errors=True)
        return {"candidates": n, "counters": counters.ints, "arrays": sorted(arrays)}

    @staticmethod
    def _save(path: Path, arr: np.ndarray) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_open(path, "wb") as f:
            np.save(f, arr, allow_pickle=False)

    @staticmethod
    def _save_kept(path: Path, kept: K.UidCollector) -> None:
        """The part's kept uids, sorted, as raw u8,u8 records: written block by block, so a
        part never holds more than one spill bucket of them."""
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_open(path, "wb") as f:
            for block in kept.sorted_blocks():
                f.write(np.ascontiguousarray(block, dtype=U.UID_DTYPE).tobytes())


@dataclass
class RowResult:
    kept: K.UidCollector
    candidates: int
    counters: dict = field(default_factory=dict)
    arrays: dict = field(default_factory=dict)  # the parts' arrays, merged


def run_rows(pool: Pool, rule: RowRule, within, executor: Executor | None, work_dir: Path,
             name: str = "rows") -> RowResult:
    """Run ``rule`` over the pool in ``executor.workers`` parts and merge what they keep.
    ``name``: what the stage does (the filter's name, e.g. ``basic``, ``clip-score-high``); the
    stage is named ``<name>-<digest of its inputs>``."""
    executor = Executor.given(executor)
    within = as_within(within)
    emb_dir = None
    if pool.files and pool.files[0].npz is not None and pool.files[0].npz.parent != pool.files[0].parquet.parent:
        emb_dir = str(pool.files[0].npz.parent)
    source = str(pool.root) if pool.root is not None else [str(f.parquet) for f in pool.files]
    within_path = str(within.path) if within else None
    # reusable state is keyed by content: the pool's fingerprint and the --within list's uids, not their paths
    within_digest = _within_digest(within) if within else None
    name = f"{name}-{_digest(source, emb_dir, within_path, pool_fingerprint(pool), within_digest, rule)}"
    stage = RowFilterStage(str(work_dir), source, emb_dir, within_path, rule, name, within_digest)
    world = executor.parts(max(1, pool.rows))
    res = executor.run(stage, world)
    try:
        return _merge(res, stage, world, within, rule)
    finally:  # merged or refused (a --within check): the parts are not reused
        shutil.rmtree(work_dir, ignore_errors=True)


def _within_digest(within: Within) -> str:
    return hashlib.sha256(np.ascontiguousarray(within.uids).view(np.uint8).data).hexdigest()


def _merge(res, stage: "RowFilterStage", world: int, within: Within, rule: RowRule) -> "RowResult":
    kept, counters, n = K.UidCollector(), {}, 0
    seen = np.zeros(len(within.uids), bool) if within else None
    arrays = _Counters(rule.concat)  # summed part by part: one array of each in memory
    for rank, summary in enumerate(res.summaries):
        n += summary["candidates"]
        for key, value in summary["counters"].items():
            counters[key] = counters.get(key, 0) + value
        _merge_kept(kept, stage.part_path(rank, world, "kept", "bin"))
        arrays.add({key: np.load(stage.part_path(rank, world, f"array-{key}"), allow_pickle=False)
                    for key in summary["arrays"]})
        if within:
            bits = np.load(stage.part_path(rank, world, "seen"), allow_pickle=False)
            seen |= np.unpackbits(bits, count=len(seen)).astype(bool)
    if within:
        within.seen = seen
        within.check()
    return RowResult(kept, n, counters, arrays.final_arrays())


def _digest(*parts) -> str:
    """A short digest of a stage's inputs and rule, so that a rerun resumes only the same work."""
    state = [p.__getstate__() if isinstance(p, RowRule) else p for p in parts]
    text = repr([type(parts[-1]).__name__, *[sorted(s.items()) if isinstance(s, dict) else s for s in state]])
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def _merge_kept(kept: K.UidCollector, path: Path) -> None:
    if path.stat().st_size == 0:
        return
    part = np.memmap(path, dtype=U.UID_DTYPE, mode="r")
    for a in range(0, len(part), MERGE_ROWS):
        kept.add(np.array(part[a:a + MERGE_ROWS]))
    del part


def work_dir_for(out, pool: Pool, method: str) -> Path:
    """Where the parts of a per-row filter go: beside the output (``KEEP.parts/``), or in a
    temporary folder for a Python call without one."""
    if out is not None:
        return Path(out).with_suffix(".parts")
    import tempfile

    return Path(tempfile.mkdtemp(prefix=f"conceptprune-{method}-"))
