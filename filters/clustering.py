"""The clustering engine shared by SemDeDup, SSL prototypes and DBP.

1. A seeded training sample: the candidates with the smallest seeded uid hashes, so the
   sample depends on the uids and the seed only. faiss is told to use all of it
   (``max_points_per_centroid``), instead of silently keeping 256 points per centroid.
2. Spherical k-means with faiss (GPU when faiss-gpu sees one).
3. A streaming assignment of every pool row, run as ``rank``/``world_size`` parts on the
   job layer: per row its cluster id and cosine distance to that centroid, as columnar
   ``.npy`` arrays aligned with the uids. A part records its progress after every block,
   so an interrupted assignment resumes where it stopped.

Everything lives in one folder (``--clustering DIR``), reused by any filter that asks for
the same pool, embedding key, k and seed. Distances are recomputed row by row after faiss
picks the centroid: faiss's own distances differ in the last bits with the batch a row is
searched in, which would make results depend on the number of workers.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from conceptprune import uids as U
from conceptprune.atomic import write_json
from conceptprune.errors import ConfigError
from conceptprune.npz import NpyColumn, row_parallel
from conceptprune.pool import Pool
from conceptprune.slurm.options import ClusterOptions
from conceptprune.slurm.stage import Stage, run_stage

from .base import Within
from .select import grouped_select

log = logging.getLogger(__name__)

BLOCK_ROWS = 16_384  # assignment parts start at multiples of this (aligned reads, same chunks)
FORMAT_VERSION = 1


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


def pool_fingerprint(pool: Pool) -> dict:
    return {"files": [[f.parquet.name, f.rows] for f in pool.files], "rows": pool.rows,
            "embedding_key": pool.embedding_key, "dim": pool.dim}


@dataclass
class ClusteringSpec:
    """What to train. None means: take it from an existing clustering, else the default."""

    k: int | None = None
    seed: int | None = None  # default 1234, the reference code's
    niter: int | None = None  # default 100
    train_sample: int | None = None  # default min(candidates, 1000 k, 500k)
    gpu: str = "auto"
    default_k: int = 100

    def filled(self) -> "ClusteringSpec":
        return ClusteringSpec(k=self.k or self.default_k, seed=1234 if self.seed is None else self.seed,
                              niter=self.niter or 100, train_sample=self.train_sample, gpu=self.gpu)

    def resolved_sample(self, candidates: int) -> int:
        if self.train_sample is not None:
            if self.train_sample < self.k:
                raise ConfigError(f"--train-sample {self.train_sample} is smaller than --clusters {self.k}")
            return min(self.train_sample, candidates)
        return min(candidates, 1000 * self.k, 500_000)


def aligned_split(rows: int, rank: int, world_size: int, block: int = BLOCK_ROWS) -> tuple[int, int]:
    """Row range of part ``rank``: boundaries on multiples of ``block``."""
    blocks = math.ceil(rows / block)
    a = blocks * rank // world_size * block
    b = blocks * (rank + 1) // world_size * block
    return min(a, rows), min(b, rows)


# -- the assignment stage ----------------------------------------------------------------


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
        faiss = _faiss()
        pool = self.pool.open()
        a, b = aligned_split(pool.rows, rank, world_size)
        paths = self.part_paths(rank, world_size)
        done = 0
        if paths["progress"].exists():
            done = json.loads(paths["progress"].read_text())["rows_done"]
            cols = {c: NpyColumn(paths[c], "r+") for c in ("uid", "cluster", "dist")}
            log.info("assign part %d/%d: resuming at row %d of %d", rank, world_size, done, b - a)
        else:
            cols = {"uid": NpyColumn.create(paths["uid"], b - a, U.UID_DTYPE),
                    "cluster": NpyColumn.create(paths["cluster"], b - a, np.int32),
                    "dist": NpyColumn.create(paths["dist"], b - a, np.float32)}
        centroids = np.load(Path(self.work_dir) / "centroids.npy")
        index = faiss.IndexFlatIP(centroids.shape[1])
        if use_gpu(self.gpu):
            index = faiss.index_cpu_to_all_gpus(index)
        index.add(centroids)
        invalid = 0
        try:
            for chunk in pool.iter_chunks(embeddings=True, start=a + done, stop=b, chunk_rows=BLOCK_ROWS,
                                          progress=f"assign {rank + 1}/{world_size}", normalize=False):
                # the nearest centroid by inner product does not change with a row's norm, so the
                # rows are searched as stored and only the one distance per row is scaled
                _, nearest = index.search(chunk.embeddings, 1)
                cluster = nearest[:, 0].astype(np.int32)
                sim = np.empty(len(chunk), dtype=np.float32)
                x = chunk.embeddings

                def dots(a, b):  # row by row: the same bits whatever the chunk (see module doc)
                    sim[a:b] = np.einsum("ij,ij->i", x[a:b], centroids[cluster[a:b]])

                row_parallel(dots, len(chunk))
                dist = (1.0 - sim / chunk.norms).astype(np.float32)
                if chunk.valid is not None:
                    cluster[~chunk.valid] = -1
                    dist[~chunk.valid] = np.nan
                    invalid += int((~chunk.valid).sum())
                at = chunk.start - a
                cols["uid"].write(at, chunk.uids)
                cols["cluster"].write(at, cluster)
                cols["dist"].write(at, dist)
                for c in cols.values():
                    c.sync()
                write_json(paths["progress"], {"rows_done": at + len(chunk)})
        finally:
            for c in cols.values():
                c.close()
        return {"rows": b - a, "invalid": invalid}


# -- the clustering folder ---------------------------------------------------------------


class Clustering:
    """A finished clustering: centroids plus the per-row assignment, read in row order."""

    def __init__(self, directory: str | os.PathLike):
        self.dir = Path(directory)
        meta_path = self.dir / "clustering.json"
        if not meta_path.exists():
            raise ConfigError(f"{self.dir}: not a clustering folder (no clustering.json)")
        self.meta = json.loads(meta_path.read_text())
        if not self.meta.get("assignment", {}).get("complete"):
            raise ConfigError(f"{self.dir}: the assignment is not finished; rerun the filter to resume it")
        self.centroids = np.load(self.dir / "centroids.npy")
        self.k = int(self.meta["k"])
        self.rows = int(self.meta["pool"]["rows"])
        self.world_size = int(self.meta["assignment"]["world_size"])

    def parts(self) -> list[tuple[int, int, dict[str, Path]]]:
        stage = AssignStage(str(self.dir), None)  # only for the path layout
        return [(*aligned_split(self.rows, r, self.world_size), stage.part_paths(r, self.world_size))
                for r in range(self.world_size)]

    def iter_assignment(self) -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray]]:
        """(first row, uids, cluster, dist) blocks in global row order (BLOCK_ROWS-aligned)."""
        for a, b, paths in self.parts():
            with NpyColumn(paths["uid"]) as u, NpyColumn(paths["cluster"]) as c, NpyColumn(paths["dist"]) as d:
                for s in range(0, b - a, BLOCK_ROWS):
                    e = min(b - a, s + BLOCK_ROWS)
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


def build_clustering(directory: str | os.PathLike, pool: Pool, spec: ClusteringSpec, within: Within, *,
                     workers: int = 1, executor: str = "auto", options: ClusterOptions | None = None) -> Clustering:
    """Train (or reuse) the clustering in ``directory`` and run (or resume) its assignment."""
    directory = Path(directory)
    meta_path = directory / "clustering.json"
    fingerprint = pool_fingerprint(pool)
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta["pool"] != fingerprint:
            raise ConfigError(f"--clustering {directory} was made from another pool or embedding key "
                              f"({meta['pool']['rows']} rows, {meta['pool']['embedding_key']})")
        asked = {"k": spec.k, "seed": spec.seed, "niter": spec.niter, "train_sample": spec.train_sample}
        differing = {key: (meta[key], v) for key, v in asked.items() if v is not None and meta[key] != v}
        if differing:
            detail = ", ".join(f"{key} {a} (asked {b})" for key, (a, b) in differing.items())
            raise ConfigError(f"--clustering {directory} holds another clustering: {detail}; "
                              "use another folder or the same options")
        if meta["within"] != within_id(within):
            log.warning("reusing clustering %s trained on another candidate set", directory)
        log.info("reusing clustering %s (k=%d)", directory, meta["k"])
    else:
        meta = _train(directory, pool, spec.filled(), within, fingerprint)
    assignment = meta.get("assignment", {})
    if not assignment.get("complete"):
        world = assignment.get("world_size", workers)
        if world != workers:
            log.info("resuming the assignment with its original %d parts", world)
        t0 = time.time()
        stage = AssignStage(str(directory), PoolSpec.of(pool), gpu=spec.gpu)
        run_stage(stage, world, executor=executor, options=options)
        meta["assignment"] = {"world_size": world, "complete": True, "wall_time_s": round(time.time() - t0, 3)}
        write_json(meta_path, meta)
    return Clustering(directory)


def _train(directory: Path, pool: Pool, spec: ClusteringSpec, within: Within, fingerprint: dict) -> dict:
    faiss = _faiss()
    t0 = time.time()
    rows = sample_rows(pool, within, spec)
    x, valid = pool.read_embedding_rows(rows)
    if not valid.all():  # boolean indexing copies: only pay for it when rows are dropped
        x = np.ascontiguousarray(x[valid])
    if len(x) < spec.k:
        raise ConfigError(f"--clusters {spec.k} is more than the {len(x)} examples available to cluster")
    if len(x) < 39 * spec.k:
        log.warning("only %d training points for %d clusters (faiss suggests >= %d)", len(x), spec.k, 39 * spec.k)
    gpu = use_gpu(spec.gpu)
    log.info("k-means: k=%d on %d x %d sample, %d iterations, seed %d, %s", spec.k, len(x), x.shape[1],
             spec.niter, spec.seed, "GPU" if gpu else "CPU")
    km = faiss.Kmeans(x.shape[1], spec.k, niter=spec.niter, seed=spec.seed, spherical=True, gpu=gpu,
                      max_points_per_centroid=math.ceil(len(x) / spec.k) + 1, min_points_per_centroid=1,
                      verbose=log.isEnabledFor(logging.DEBUG))
    km.train(x)
    centroids = km.centroids.astype(np.float32)
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    directory.mkdir(parents=True, exist_ok=True)
    from conceptprune.atomic import atomic_open

    with atomic_open(directory / "centroids.npy", "wb") as f:
        np.save(f, centroids)
    with atomic_open(directory / "train_rows.npy", "wb") as f:  # provenance: which rows trained it
        np.save(f, rows)
    meta = {"format": FORMAT_VERSION, "k": spec.k, "seed": spec.seed, "niter": spec.niter,
            "train_sample": int(len(rows)), "trained_on": int(len(x)), "dim": int(x.shape[1]),
            "objective": float(km.obj[-1]) if len(km.obj) else None, "faiss": faiss.__version__,
            "gpu": gpu, "pool": fingerprint, "pool_path": str(pool.root), "within": within_id(within),
            "train_wall_time_s": round(time.time() - t0, 3)}
    write_json(directory / "clustering.json", meta)
    return meta


def sample_rows(pool: Pool, within: Within, spec: ClusteringSpec) -> np.ndarray:
    """Sorted global rows of the training sample: the candidate rows with the smallest
    seeded hashes of their row index (no reading without --within; one uid pass with it)."""
    mask = None
    if within:
        mask = np.zeros(pool.rows, dtype=bool)
        for chunk in pool.iter_chunks(progress="candidates"):
            mask[chunk.start:chunk.start + len(chunk)] = within.mask(chunk.uids)
        within.check()
        mask = np.packbits(mask)  # 1 bit a row
    step = 1 << 20  # rows a batch: bounds memory (~80 MB), the selection is the same for any step

    def batches():
        for a in range(0, pool.rows, step):
            rows = np.arange(a, min(pool.rows, a + step), dtype=np.uint64)
            if mask is not None:
                rows = rows[_bits(mask, a, len(rows))]
            keys = U.hash_uids(U.make_array(rows, rows), spec.seed)
            yield np.zeros(len(rows), np.int64), keys, U.make_array(np.zeros(len(rows), np.uint64), rows)

    n = len(within.uids) if within else pool.rows
    if n == 0:
        raise ConfigError("no candidate rows to cluster")
    kept, _ = grouped_select(batches, np.array([spec.resolved_sample(n)]), "hash", clamp=True)
    return kept.to_array()["f1"].astype(np.int64)


def _bits(packed: np.ndarray, start: int, n: int) -> np.ndarray:
    """Bits [start, start + n) of a packbits array as bools (start a multiple of 8)."""
    return np.unpackbits(packed[start // 8:(start + n + 7) // 8], count=n).astype(bool)
