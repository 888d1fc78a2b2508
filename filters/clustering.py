"""The clustering engine shared by SemDeDup, SSL prototypes and DBP.

1. A seeded training sample: the candidates with the smallest seeded uid hashes, so the
   sample depends on the uids and the seed only. faiss is told to use all of it
   (``max_points_per_centroid``), instead of silently keeping 256 points per centroid.
2. Spherical k-means with faiss (GPU when faiss-gpu sees one), a one-part stage (``kmeans``)
   that writes the centroids and the clustering's manifest (``clustering.json``).
3. A streaming assignment of every pool row, run as ``rank``/``world_size`` parts on the
   job layer after the k-means (SLURM ``afterok``): per row its cluster id and cosine
   distance to that centroid, as columnar ``.npy`` arrays aligned with the uids. A part
   records its progress after every block, so an interrupted assignment resumes where it
   stopped; the assignment is finished when every part has its completion marker.

``submit_clustering`` submits both (and a filter's later stages go after them), so a
detached launcher can exit; ``collect_clustering`` reads the finished result.

Everything lives in one folder (``--clustering DIR``), reused by any filter that asks for
the same pool data (``pool_fingerprint``: sizes, mtimes and a content hash of every file),
embedding key, k and seed. One run at a time builds or resumes it (an flock on
``DIR/.lock``; a second run waits, then reuses the result).

Worker-count independence: faiss's scores differ in the last bits with the batch a row is
searched in (up to ~1e-6), so its argmax alone would move near-tied rows between clusters
with the number of workers. Each row's cluster is therefore the exact argmax of the real
inner products, ties to the lowest centroid id: faiss returns the top 2; a row whose
runner-up is within ``TIE_TOL`` (relative to the row's norm) of the best is searched again
for its top ``RECHECK_K`` and rechecked in float64 over those within ``TIE_TOL`` (over all
centroids when all ``RECHECK_K`` are that close), and scores within ``EXACT_TOL`` of the
best are summed exactly (``math.fsum``). Under 3% of the rows are rechecked on real-like data. Distances are
recomputed row by row after the centroid is chosen, for the same reason.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from conceptprune import uids as U
from conceptprune.atomic import write_json
from conceptprune.errors import ConfigError, PoolError
from conceptprune.locks import file_lock
from conceptprune.npz import NpyColumn, row_parallel
from conceptprune.pool import Pool, file_fingerprints, pool_fingerprint
from conceptprune.progress import progress_enabled
from conceptprune.slurm.stage import Executor, Stage, StageSubmission

from .base import Within
from .clustering_config import DEFAULT_CLUSTERS, POINTS_PER_CENTROID, ClusteringConfig, format_bytes
from .select import grouped_select

log = logging.getLogger(__name__)

BLOCK_ROWS = 16_384  # assignment parts start at multiples of this (aligned reads, same chunks)
FORMAT_VERSION = 2  # 2: data fingerprint, bad-embedding counts, exact tie-breaking
RECHECK_K = 16  # candidates faiss returns for a near-tied row (all centroids if all are near)
TIE_TOL = 1e-4  # x norm: runner-up scores this close to the best are rechecked (faiss errs by ~1e-6)
EXACT_TOL = 1e-11  # x norm: float64 scores this close to the best are summed exactly


def folder_lock(directory: str | os.PathLike, doing: str):
    """Hold an exclusive lock on ``directory/.lock`` (the folder is created) for a block."""
    Path(directory).mkdir(parents=True, exist_ok=True)
    return file_lock(Path(directory) / ".lock", doing)


def _faiss():
    try:
        import faiss
    except ImportError:
        raise ConfigError("faiss is not installed: pip install 'conceptprune[cpu]' (or '[gpu]')") from None
    return faiss


def use_gpu(choice: str = "auto") -> bool:
    faiss = _faiss()
    n = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if choice == "yes" and n == 0:
        raise ConfigError("--gpu yes: faiss sees no GPU (install faiss-gpu on a GPU node)")
    return choice != "no" and n > 0


@dataclass(frozen=True)
class PoolSpec:
    """How to open the pool in a worker process (a Pool object itself is not shipped)."""

    root: str
    embedding_key: str
    embedding_dir: str | None = None
    bad_embeddings: str = "error"

    @classmethod
    def of(cls, pool: Pool) -> "PoolSpec":
        if pool.root is None or not pool.embedding_key:
            raise ConfigError("clustering needs a pool directory and an embedding key")
        emb_dir = None
        if pool.files and pool.files[0].npz is not None and pool.files[0].npz.parent != pool.files[0].parquet.parent:
            emb_dir = str(pool.files[0].npz.parent)
        return cls(str(pool.root), pool.embedding_key, emb_dir, pool.bad_embeddings)

    def open(self) -> Pool:
        return Pool(self.root, embedding_key=self.embedding_key, embedding_dir=self.embedding_dir,
                    bad_embeddings=self.bad_embeddings)


def pool_identity(pool: Pool) -> dict:
    """What a clustering was made from: the data fingerprint plus readable facts for messages."""
    return {"fingerprint": pool_fingerprint(pool), "rows": pool.rows, "embedding_key": pool.embedding_key,
            "dim": pool.dim}


def _file_names_fingerprints(pool: Pool) -> dict[str, str]:
    return {Path(path).name: fp for path, fp in file_fingerprints(pool).items()}


def aligned_split(rows: int, rank: int, world_size: int, block: int = BLOCK_ROWS) -> tuple[int, int]:
    """Row range of part ``rank``: boundaries on multiples of ``block``."""
    blocks = math.ceil(rows / block)
    a = blocks * rank // world_size * block
    b = blocks * (rank + 1) // world_size * block
    return min(a, rows), min(b, rows)


# -- the assignment stage ----------------------------------------------------------------


def nearest_centroids(index, centroids64: np.ndarray, x: np.ndarray, norms: np.ndarray,
                      valid: np.ndarray | None) -> np.ndarray:
    """Each row's nearest centroid by inner product: the exact argmax, ties to the lowest id,
    whatever batch the rows come in (see the module doc). ``x`` as stored (any norm)."""
    k = len(centroids64)
    if k == 1:
        return np.zeros(len(x), dtype=np.int32)
    scores, ids = index.search(x, 2)  # as fast as the top 1; the top 4 costs ~14% more at k = 100
    cluster = ids[:, 0].astype(np.int32)
    norms = norms.astype(np.float64)
    near = scores[:, 1].astype(np.float64) >= scores[:, 0] - TIE_TOL * norms
    if valid is not None:
        near &= valid  # invalid rows are zeros: every centroid ties, and they get -1 anyway
    rows = np.flatnonzero(near)
    if len(rows):  # typically under 3% of the rows: search them again for more candidates
        scores, ids = index.search(np.ascontiguousarray(x[rows]), min(RECHECK_K, k))
        cluster[rows] = _recheck(x[rows], scores, ids, norms[rows], centroids64)
    return cluster


def _recheck(x: np.ndarray, scores: np.ndarray, ids: np.ndarray, norms: np.ndarray, c64: np.ndarray) -> np.ndarray:
    """The exact nearest centroid of near-tied rows. Candidates: the returned centroids within
    TIE_TOL of the best faiss score (the true best is among them, as faiss errs by far less
    than TIE_TOL / 2), or every centroid when all returned ones are that close."""
    x64 = x.astype(np.float64)
    tol = TIE_TOL * norms
    everything = (scores[:, -1] >= scores[:, 0] - tol) & (len(c64) > ids.shape[1])
    part = np.flatnonzero(~everything)
    r, j = np.nonzero(scores[part] >= (scores[part, 0] - tol[part])[:, None])
    pr, pc = [part[r]], [ids[part][r, j].astype(np.int64)]
    full = np.flatnonzero(everything)
    for a in range(0, len(full), 256):  # bounded memory: 256 rows x k scores
        f = full[a:a + 256]
        s = x64[f] @ c64.T  # float64 errs by ~1e-13: a 1e-9 margin keeps the true best
        r, j = np.nonzero(s >= s.max(axis=1, keepdims=True) - 1e-9 * norms[f, None])
        pr.append(f[r])
        pc.append(j.astype(np.int64))
    pr, pc = np.concatenate(pr), np.concatenate(pc)
    exact = np.einsum("ij,ij->i", x64[pr], c64[pc])  # pair by pair: the same bits in any batch
    best = np.full(len(x), -np.inf)
    np.maximum.at(best, pr, exact)
    close = np.flatnonzero(exact >= best[pr] - EXACT_TOL * norms[pr])
    close = close[np.bincount(pr[close], minlength=len(x))[pr[close]] > 1]
    for i in close:  # rows with several candidates this close (true ties): sum exactly
        exact[i] = math.fsum((x64[pr[i]] * c64[pc[i]]).tolist())  # float32 products are exact in float64
    order = np.lexsort((pc, -exact, pr))  # per row: the best score, then the lowest id
    first = order[np.r_[True, pr[order][1:] != pr[order][:-1]]]
    out = np.empty(len(x), dtype=np.int32)
    out[pr[first]] = pc[first]
    return out


def part_lock(path: Path):
    """A lock on one part's outputs: a part left running by a killed launcher (an orphaned
    worker) and its rerun never write the same files at once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return file_lock(path.parent / f".{path.name}.lock", f"writing {path.name}")


@dataclass
class AssignStage(Stage):
    work_dir: str
    pool: PoolSpec
    gpu: str = "auto"
    name: str = "assign"

    def part_paths(self, rank: int, world_size: int) -> dict[str, Path]:
        base = Path(self.work_dir) / "assign" / f"part-{rank:05d}-of-{world_size:05d}"
        return {c: Path(f"{base}.{c}.npy") for c in ("uid", "cluster", "dist")} | {"progress": Path(f"{base}.progress.json")}

    def run(self, rank: int, world_size: int) -> dict:
        paths = self.part_paths(rank, world_size)
        with part_lock(paths["progress"]):
            return self._run(rank, world_size, paths)

    def _run(self, rank: int, world_size: int, paths: dict[str, Path]) -> dict:
        from .torch_search import centroid_index
        pool = self.pool.open()
        a, b = aligned_split(pool.rows, rank, world_size)
        done, bad = 0, {"nan_or_inf": 0, "zero": 0, "examples": []}
        if paths["progress"].exists():
            state = json.loads(paths["progress"].read_text())
            done, bad = state["rows_done"], state["bad_embeddings"]
            cols = {c: NpyColumn(paths[c], "r+") for c in ("uid", "cluster", "dist")}
            log.info("assign part %d/%d: resuming at row %d of %d", rank, world_size, done, b - a)
        else:
            cols = {"uid": NpyColumn.create(paths["uid"], b - a, U.UID_DTYPE),
                    "cluster": NpyColumn.create(paths["cluster"], b - a, np.int32),
                    "dist": NpyColumn.create(paths["dist"], b - a, np.float32)}
        centroids = np.load(Path(self.work_dir) / "centroids.npy")
        centroids64 = centroids.astype(np.float64)
        index = centroid_index(centroids, self.gpu)  # faiss(-gpu), or torch on CUDA without faiss-gpu
        try:
            for chunk in pool.iter_chunks(embeddings=True, start=a + done, stop=b, chunk_rows=BLOCK_ROWS,
                                          progress=f"assign {rank + 1}/{world_size}", normalize=False):
                # the nearest centroid by inner product does not change with a row's norm, so the
                # rows are searched as stored and only the one distance per row is scaled
                cluster = nearest_centroids(index, centroids64, chunk.embeddings, chunk.norms, chunk.valid)
                sim = np.empty(len(chunk), dtype=np.float32)
                x = chunk.embeddings

                def dots(a, b):  # row by row: the same bits whatever the chunk (see module doc)
                    sim[a:b] = np.einsum("ij,ij->i", x[a:b], centroids[cluster[a:b]])

                row_parallel(dots, len(chunk))
                dist = (1.0 - sim / chunk.norms).astype(np.float32)
                if chunk.valid is not None:
                    cluster[~chunk.valid] = -1
                    dist[~chunk.valid] = np.nan
                at = chunk.start - a
                cols["uid"].write(at, chunk.uids)
                cols["cluster"].write(at, cluster)
                cols["dist"].write(at, dist)
                for c in cols.values():
                    c.sync()
                write_json(paths["progress"], {"rows_done": at + len(chunk), "bad_embeddings": _bad_total(bad, pool)})
        finally:
            for c in cols.values():
                c.close()
        return {"rows": b - a, "bad_embeddings": _bad_total(bad, pool)}


def _bad_total(before: dict, pool: Pool) -> dict:
    """Bad-embedding counts of a part: those recorded before a resume plus this run's."""
    r = pool.report
    return {"nan_or_inf": before["nan_or_inf"] + r.nan_or_inf, "zero": before["zero"] + r.zero,
            "examples": (before["examples"] + r.examples)[:5]}


# -- the clustering folder ---------------------------------------------------------------


class Clustering:
    """A finished clustering: centroids plus the per-row assignment, read in row order.
    Finished means: every part of its assignment stage has its completion marker."""

    def __init__(self, directory: str | os.PathLike):
        self.dir = Path(directory)
        meta_path = self.dir / "clustering.json"
        if not meta_path.exists():
            raise ConfigError(f"{self.dir}: not a clustering folder (no clustering.json)")
        self.meta = json.loads(meta_path.read_text())
        self.k = int(self.meta["k"])
        self.rows = int(self.meta["pool"]["rows"])
        self.world_size = int(self.meta["assignment"]["world_size"])
        self.assigned = AssignStage(str(self.dir), None).done_parts(self.world_size)  # per part: its summary
        if len(self.assigned) < self.world_size:
            raise ConfigError(f"{self.dir}: the assignment is not finished ({len(self.assigned)} of "
                              f"{self.world_size} parts); rerun the filter to resume it")
        self.centroids = np.load(self.dir / "centroids.npy")

    def parts(self) -> list[tuple[int, int, dict[str, Path]]]:
        stage = AssignStage(str(self.dir), None)  # only for the path layout
        return [(*aligned_split(self.rows, r, self.world_size), stage.part_paths(r, self.world_size))
                for r in range(self.world_size)]

    def bad_embeddings(self) -> dict:
        """The pool's rows with NaN, infinite or all-zero embeddings, summed over the parts."""
        bad = {"nan_or_inf": 0, "zero": 0, "examples": []}
        for rank in range(self.world_size):
            part = self.assigned[rank]["bad_embeddings"]
            for key in ("nan_or_inf", "zero"):
                bad[key] += part[key]
            bad["examples"] = (bad["examples"] + part["examples"])[:5]
        return bad

    def iter_assignment(self, start: int = 0, stop: int | None = None
                        ) -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray]]:
        """(first row, uids, cluster, dist) blocks in global row order (BLOCK_ROWS-aligned);
        only the blocks that overlap rows [start, stop) are read."""
        for a, b, paths in self.parts():
            if b <= start or (stop is not None and a >= stop):
                continue
            with NpyColumn(paths["uid"]) as u, NpyColumn(paths["cluster"]) as c, NpyColumn(paths["dist"]) as d:
                for s in range(0, b - a, BLOCK_ROWS):
                    e = min(b - a, s + BLOCK_ROWS)
                    if a + e <= start or (stop is not None and a + s >= stop):
                        continue
                    yield a + s, u.read(s, e), c.read(s, e), d.read(s, e)

    def candidates(self, within: Within) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
        """(rows, uids, cluster, dist) of candidate rows (in --within, valid embedding)."""
        for start, uids, cluster, dist in self.iter_assignment():
            keep = cluster >= 0
            if within:
                keep &= within.mask(uids)
            rows = np.flatnonzero(keep) + start
            yield rows, uids[keep], cluster[keep], dist[keep]

    def cluster_stats(self, within: Within) -> tuple[np.ndarray, np.ndarray]:
        """(size, mean distance to centroid) of every cluster over the candidates."""
        size = np.zeros(self.k, dtype=np.int64)
        total = np.zeros(self.k, dtype=np.float64)
        for _, _, cluster, dist in self.candidates(within):
            size += np.bincount(cluster, minlength=self.k)
            total += np.bincount(cluster, weights=dist.astype(np.float64), minlength=self.k)
        within.check()
        with np.errstate(invalid="ignore", divide="ignore"):
            return size, np.where(size > 0, total / np.maximum(size, 1), np.nan)

    def centroid_distances(self) -> np.ndarray:
        """k x k cosine distances between centroids."""
        c = self.centroids.astype(np.float64)
        return 1.0 - c @ c.T


def within_id(within: Within) -> str:
    """A short id of the candidate set (for caches keyed by it)."""
    if not within:
        return "all"
    return hashlib.sha1(within.uids.tobytes()).hexdigest()[:16]


def clustering_dir_for(pool: Pool, config: ClusteringConfig, out=None, default_k: int = DEFAULT_CLUSTERS) -> Path:
    """``config.dir``, else next to the output (``KEEP.clustering/``), else a cache folder named
    after the pool and the config (a Python call without an output; the pool may be read-only)."""
    if config.dir is not None:
        return Path(config.dir)
    if out is not None:
        return Path(out).with_suffix(".clustering")
    key = hashlib.sha1(repr((str(Path(pool.root).resolve()), pool.rows, pool.embedding_key,
                             config.clusters or default_k, config.seed, config.niter,
                             config.train_sample)).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("CONCEPTPRUNE_CACHE", Path.home() / ".cache" / "conceptprune"))
    return cache / "clusterings" / key


def finished_world(stage: Stage) -> int | None:
    """The part count with which ``stage`` finished (every part has its marker), else None."""
    d = stage.marker_dir()
    worlds = sorted({int(p.stem.split("-of-")[1]) for p in d.glob("*-of-*.json")}) if d.exists() else []
    return next((w for w in worlds if len(stage.done_parts(w)) == w), None)


@dataclass
class ClusteringChain:
    """A clustering on its way: its folder, k and the stages submitted for it (k-means training
    when it is new, then the assignment); a later stage goes ``after=[chain.last]``."""

    dir: Path
    k: int
    submissions: list[StageSubmission]

    @property
    def last(self) -> StageSubmission:
        return self.submissions[-1]


def submit_clustering(directory: Path, pool: Pool, config: ClusteringConfig, within: Within, executor: Executor,
                      *, default_k: int = DEFAULT_CLUSTERS) -> ClusteringChain:
    """Submit what the clustering in ``directory`` still needs: k-means training (one part) unless
    it is trained, then the unfinished parts of its assignment (afterok the training). Call it
    under ``folder_lock(directory)``."""
    meta_path = directory / "clustering.json"
    subs = []
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        _check_reusable(directory, meta, pool_identity(pool), config, within, pool)
        k, world = int(meta["k"]), int(meta.get("assignment", {}).get("world_size", executor.workers))
        if world != executor.workers and len(AssignStage(str(directory), None).done_parts(world)) < world:
            log.info("resuming the assignment with its original %d parts", world)
    else:
        config = config.filled(default_k)
        k, world = config.clusters, executor.workers
        train = TrainStage(str(directory), PoolSpec.of(pool), config, str(within.path) if within else None, world)
        subs.append(executor.submit(train, 1))
    assign = AssignStage(str(directory), PoolSpec.of(pool), gpu=config.gpu)
    subs.append(executor.submit(assign, world, after=subs))
    return ClusteringChain(directory, k, subs)


def finish_chain(executor: Executor, subs: Sequence[StageSubmission], status_dir: Path) -> bool:
    """Wait for submitted stages in order (True); when the executor detaches and some still have
    jobs, leave them to SLURM and say how to collect (False). A failure cancels the stages
    submitted after it (their afterok can no longer be met)."""
    if executor.detach and any(s.jobs for s in subs):
        jobs = ", ".join(f"{s.stage.name} {','.join(s.pending_job_ids())}" for s in subs if s.jobs)
        log.warning("submitted %s; detached. 'conceptprune status %s' shows where they stand; rerun the same "
                    "command once they are done to collect the keep-list", jobs, status_dir)
        return False
    for i, sub in enumerate(subs):
        try:
            sub.wait()
        except BaseException:
            for later in subs[i + 1:]:
                for job in later.jobs:
                    job.cancel(check=False)
            raise
    return True


def collect_clustering(directory: Path, pool: Pool) -> Clustering:
    """The finished clustering, with --bad-embeddings enforced on its recorded bad rows."""
    clustering = Clustering(directory)
    _apply_bad_embeddings(directory, clustering.bad_embeddings(), pool)
    return clustering


def build_clustering(directory: str | os.PathLike, pool: Pool, config: ClusteringConfig, within: Within, *,
                     executor: "Executor | None" = None, default_k: int = DEFAULT_CLUSTERS) -> Clustering | None:
    """Train (or reuse) the clustering in ``directory`` and run (or resume) its assignment; None
    when the executor detaches before the jobs are done (the same call, rerun, collects it).

    One run at a time (``folder_lock``): a concurrent run with the same folder waits, then
    reuses what the first one built."""
    directory = Path(directory)
    executor = Executor.given(executor)
    with folder_lock(directory, "building or checking the clustering"):
        chain = submit_clustering(directory, pool, config, within, executor, default_k=default_k)
        if not finish_chain(executor, chain.submissions, directory):
            return None
    return collect_clustering(directory, pool)


def clustering_for(pool: Pool, config: ClusteringConfig | None, within: Within, executor=None, *, out=None,
                   default_k: int = DEFAULT_CLUSTERS) -> Clustering | None:
    """Build or reuse the clustering ``config`` asks for (see ``clustering_dir_for``)."""
    config = config or ClusteringConfig()
    return build_clustering(clustering_dir_for(pool, config, out, default_k), pool, config, within,
                            executor=executor, default_k=default_k)


def _check_reusable(directory: Path, meta: dict, identity: dict, config: ClusteringConfig, within: Within,
                    pool: Pool) -> None:
    if meta.get("format") != FORMAT_VERSION:
        raise ConfigError(f"--clustering {directory} was made by an older conceptprune (format "
                          f"{meta.get('format')}, now {FORMAT_VERSION}) that cannot tell whether the pool's data "
                          "changed since; delete the folder or use another one")
    made = meta["pool"]
    if made["fingerprint"] != identity["fingerprint"]:
        facts = ("rows", "embedding_key", "dim")
        if any(made[key] != identity[key] for key in facts):
            raise ConfigError(f"--clustering {directory} was made from another pool or embedding key "
                              f"({made['rows']} rows, {made['embedding_key']}, dim {made['dim']}; this one: "
                              f"{identity['rows']} rows, {identity['embedding_key']}, dim {identity['dim']})")
        then, now = meta.get("pool_files", {}), _file_names_fingerprints(pool)
        changed = sorted(name for name in then.keys() | now.keys() if then.get(name) != now.get(name))
        raise ConfigError(f"--clustering {directory} was made from other data: {', '.join(changed[:3]) or 'the pool'}"
                          f"{' and more' if len(changed) > 3 else ''} changed since (size, time or content); "
                          "delete the folder or use another one to cluster the pool as it is now")
    asked = {"k": config.clusters, "seed": config.seed, "niter": config.niter, "train_sample": config.train_sample}
    differing = {key: (meta[key], v) for key, v in asked.items() if v is not None and meta[key] != v}
    if differing:
        detail = ", ".join(f"{key} {a} (asked {b})" for key, (a, b) in differing.items())
        raise ConfigError(f"--clustering {directory} holds another clustering: {detail}; "
                          "use another folder or the same options")
    if meta["within"] != within_id(within):
        if config.dir is not None:  # --clustering DIR: sharing one clustering was asked for
            log.info("reusing clustering %s (trained on another candidate set, as --clustering asks)", directory)
        else:  # the folder beside --out from an earlier run: this run alone would have trained another
            log.warning("reusing clustering %s, trained on another candidate set by an earlier run; the result "
                        "differs from a fresh clustering of these candidates: delete the folder or pass "
                        "--clustering DIR to choose", directory)
    log.info("reusing clustering %s (k=%d)", directory, meta["k"])


def _apply_bad_embeddings(directory: Path, bad: dict, pool: Pool) -> None:
    """Enforce --bad-embeddings on the clustering's recorded bad rows and report them."""
    n = bad["nan_or_inf"] + bad["zero"]
    if n and pool.bad_embeddings == "error":
        first = bad["examples"][0] if bad["examples"] else "?"
        raise PoolError(f"{first}; {n} rows of the pool have NaN, infinite or all-zero embeddings (recorded in "
                        f"--clustering {directory}). Re-embed, or pass --bad-embeddings drop to leave them out "
                        "(never kept)")
    report = pool.report  # the whole pool's count, not just the rows this process read
    report.nan_or_inf, report.zero, report.examples = bad["nan_or_inf"], bad["zero"], list(bad["examples"])


@dataclass
class TrainStage(Stage):
    """Spherical k-means on the seeded training sample, as one part: writes ``centroids.npy``,
    ``train_rows.npy`` and the clustering's manifest ``clustering.json`` (what it was made from
    and with, and the assignment's part count)."""

    work_dir: str
    pool: PoolSpec
    config: ClusteringConfig  # filled: every default resolved
    within_path: str | None = None
    assign_world: int = 1
    name: str = "kmeans"

    def run(self, rank: int, world_size: int) -> dict:
        pool = self.pool.open()
        meta = _train(Path(self.work_dir), pool, self.config, Within(self.within_path), pool_identity(pool),
                      self.assign_world)
        return {key: meta[key] for key in ("k", "trained_on", "objective", "gpu", "train_wall_time_s")}


def _train(directory: Path, pool: Pool, spec: ClusteringConfig, within: Within, identity: dict,
           assign_world: int) -> dict:
    faiss = _faiss()
    t0 = time.time()
    rows = sample_rows(pool, within, spec)
    x, valid = pool.read_embedding_rows(rows)
    if not valid.all():  # boolean indexing copies: only pay for it when rows are dropped
        x = np.ascontiguousarray(x[valid])
    if len(x) < spec.clusters:
        raise ConfigError(f"--clusters {spec.clusters} is more than the {len(x)} examples available to cluster")
    if len(x) < 39 * spec.clusters:
        log.warning("only %d training points for %d clusters (faiss suggests >= %d)", len(x), spec.clusters, 39 * spec.clusters)
    gpu = use_gpu(spec.gpu)
    rule = ("--train-sample" if spec.train_sample is not None else
            f"min(candidates, max(min(1000 k, 500k), {POINTS_PER_CENTROID} k), --kmeans-memory "
            f"{format_bytes(spec.kmeans_memory)} / (4 x dim))")
    log.info("k-means: k=%d on %d x %d sample (%.0f a centroid; %s: %.2f GiB), %d iterations, seed %d, %s",
             spec.clusters, len(x), x.shape[1], len(x) / spec.clusters, rule, x.nbytes / 2**30, spec.niter, spec.seed,
             "GPU" if gpu else "CPU")
    km = faiss.Kmeans(x.shape[1], spec.clusters, niter=spec.niter, seed=spec.seed, spherical=True, gpu=gpu,
                      max_points_per_centroid=math.ceil(len(x) / spec.clusters) + 1, min_points_per_centroid=1,
                      # faiss's own per-iteration line (time, objective) at a terminal, unless --quiet
                      verbose=log.isEnabledFor(logging.DEBUG) or (progress_enabled() and sys.stdout.isatty()))
    t_km = time.time()
    km.train(x)
    log.info("k-means: %d iterations in %.1f s (%.2f s an iteration, %.0f rows/s)", spec.niter, time.time() - t_km,
             (time.time() - t_km) / max(spec.niter, 1), len(x) * spec.niter / max(time.time() - t_km, 1e-9))
    centroids = km.centroids.astype(np.float32)
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    directory.mkdir(parents=True, exist_ok=True)
    from conceptprune.atomic import atomic_open

    with atomic_open(directory / "centroids.npy", "wb") as f:
        np.save(f, centroids)
    with atomic_open(directory / "train_rows.npy", "wb") as f:  # provenance: which rows trained it
        np.save(f, rows)
    meta = {"format": FORMAT_VERSION, "k": spec.clusters, "seed": spec.seed, "niter": spec.niter,
            "train_sample": int(len(rows)), "trained_on": int(len(x)), "dim": int(x.shape[1]),
            "objective": float(km.obj[-1]) if len(km.obj) else None, "faiss": faiss.__version__,
            "gpu": gpu, "pool": identity, "pool_files": _file_names_fingerprints(pool),
            "pool_path": str(pool.root), "within": within_id(within),
            "train_wall_time_s": round(time.time() - t0, 3), "assignment": {"world_size": assign_world}}
    write_json(directory / "clustering.json", meta)
    return meta


def sample_rows(pool: Pool, within: Within, spec: ClusteringConfig) -> np.ndarray:
    """Sorted global rows of the training sample: the candidate rows with the smallest
    seeded hashes of their row index (no reading without --within; one uid pass with it,
    keeping the candidates' row numbers: 8 B a candidate, nothing a pool row)."""
    cand = None
    if within:
        cand = np.concatenate([np.flatnonzero(within.mask(chunk.uids)) + chunk.start
                               for chunk in pool.iter_chunks(progress="candidates")] or [np.empty(0, np.int64)])
        within.check()
    step = 1 << 20  # rows a batch: bounds memory (~80 MB), the selection is the same for any step

    def batches():
        for a in range(0, pool.rows, step):
            if cand is None:
                rows = np.arange(a, min(pool.rows, a + step), dtype=np.uint64)
            else:
                lo, hi = np.searchsorted(cand, [a, a + step])
                rows = cand[lo:hi].astype(np.uint64)
            keys = U.hash_uids(U.make_array(rows, rows), spec.seed)
            yield np.zeros(len(rows), np.int64), keys, U.make_array(np.zeros(len(rows), np.uint64), rows)

    n = len(within.uids) if within else pool.rows
    if n == 0:
        raise ConfigError("no candidate rows to cluster")
    kept, _ = grouped_select(batches, np.array([spec.resolved_sample(n, pool.dim)]), "hash", clamp=True)
    return kept.to_array()["f1"].astype(np.int64)

