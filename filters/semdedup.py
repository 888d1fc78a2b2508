"""SemDeDup (Abbas et al. 2023): remove semantic near-duplicates inside each k-means cluster.

Members of a cluster are ordered by cosine distance to the centroid, descending (ties: the
smaller uid first). With S = E E^T, M_j = max_{i<j} S_ij (the column maximum of the strict
upper triangle) and the paper's rule removes j when M_j > 1 - eps. M is computed in column
blocks (memory O(n * B), never splitting a cluster; ``pairwise.py``: a fast GEMM, bfloat16
where the hardware has it, then an exact recheck) and stored: every M_j that may exceed
1 - eps is float32's exact value, so the decisions are float32's. With float32 GEMMs (a CPU
without AMX, ``--pairwise fp32``) every M_j is made exact, whatever eps or target size was
asked, so any later eps or target size reads the stored M off without recomputing anything;
with ``bf16-recheck`` (CUDA, AMX) M is exact from the threshold asked (all of it for a target
size): a later run at that eps or a smaller one reads it off, one at a larger eps recomputes. ``greedy`` (compare only
with kept members) and ``components`` (keep one per connected component) depend on eps and
are computed for the eps asked.

Two stages on the job layer: ``shuffle`` (row-range parts) writes each candidate's
embedding into one of up to 256 bucket files by cluster; ``dedup`` (bucket parts) loads a
bucket, groups it by cluster and computes M (or the rule's keep flags).

The work folder (``CLUSTERING/semdedup/<candidate set>``) is a cache shared by every run on
that clustering and candidate set (e.g. several target fractions): one run at a time fills
it (``folder_lock``; the others wait, then reuse the finished results). ``semdedup.json``
records its parameters; the stages' completion markers say what is done. The shuffle's
partial files are keyed by its world size: a rerun with another ``--workers`` discards an
unfinished shuffle (a finished one serves any worker count; the dedup's per-bucket results
never depend on it).

The filter submits the whole chain at once: k-means -> assignment (``clustering.py``) ->
shuffle -> dedup, each after the one before (SLURM ``afterok``), so a detached launcher
(``--detach``) may exit; the same command, rerun once the jobs are done, collects the
keep-list. Locally the same graph runs in order.
"""

from __future__ import annotations

import glob
import json
import logging
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from conceptprune import keeplist as K
from conceptprune import uids as U
from conceptprune.atomic import atomic_open, write_json
from conceptprune.errors import ConfigError
from conceptprune.keeplist import UidCollector
from conceptprune.progress import progress_bar
from conceptprune.npz import NpzArray
from conceptprune.slurm.stage import Executor, Stage

from .base import FilterResult, Within, as_within, check_fraction, target_count
from .clustering import (BLOCK_ROWS, Clustering, ClusteringChain, PoolSpec, aligned_split, clustering_dir_for,
                         collect_clustering, finish_chain, finished_world, folder_lock, part_lock, submit_clustering,
                         within_id)
from .clustering_config import SEMDEDUP_CLUSTER_SIZE, ClusteringConfig
from .common import cluster_table, table_writer
from .dbp import complexity
from .pairwise import (PAIR_BLOCK, PRECISIONS, ROW_BLOCK, PairwiseConfig, column_max_upper, components_keep,  # noqa: F401
                       exact_column_max, greedy_keep, needs_torch, normalized, single_threaded_torch)
from .select import grouped_select

log = logging.getLogger(__name__)

RULES = ("paper", "greedy", "components")
PAPER_EPS = (0.00095, 0.03, 0.07, 0.124, 0.165, 0.205, 0.26)  # LAION-440M: 79.6% .. 19.8% kept
META_DTYPE = np.dtype([("hi", "<u8"), ("lo", "<u8"), ("cluster", "<i4"), ("dist", "<f4")])
OUT_DTYPE = np.dtype([("hi", "<u8"), ("lo", "<u8"), ("cluster", "<i4"), ("dist", "<f4"), ("M", "<f4"),
                      ("keep", "?")])
DEDUP_THREADS = 8  # buckets at once in a dedup part (memory: this many buckets)
FORMAT = 2  # 2: raw stored embeddings, float32 similarities (1: fp16-rounded normalised vectors)


def n_buckets(k: int) -> int:
    return min(k, 256)


def bucket_of(cluster: np.ndarray, k: int) -> np.ndarray:
    return (cluster.astype(np.int64) * n_buckets(k)) // k


# -- stages ------------------------------------------------------------------------------


@dataclass
class ShuffleStage(Stage):
    """Writes each candidate (uid, cluster, distance, embedding as stored) into its cluster's
    bucket. Reads the assignment (uids, clusters) and the embedding arrays only: no parquet,
    no float conversion; rows with bad embeddings already have cluster -1."""

    work_dir: str
    clustering_dir: str
    pool: PoolSpec
    within_path: str | None = None
    emb_dtype: str = "float16"  # what the bucket files hold: the pool's own fp16, else float32
    name: str = "shuffle"

    def run(self, rank: int, world_size: int) -> dict:
        tag = f"p{rank:05d}-of-{world_size:05d}"
        out = Path(self.work_dir) / "shuffle"
        with part_lock(out / tag):
            return self._run(rank, world_size, tag, out)

    def _run(self, rank: int, world_size: int, tag: str, out: Path) -> dict:
        clustering = Clustering(self.clustering_dir)
        pool = self.pool.open()
        within = Within(self.within_path)
        for leftover in glob.glob(str(out / f"*.{tag}.*")):  # an interrupted earlier try
            os.unlink(leftover)
        a, b = aligned_split(pool.rows, rank, world_size)
        written = 0
        bar = progress_bar(total=b - a, desc=f"semdedup shuffle, part {rank + 1}/{world_size}", unit="rows")
        with _RawRows(pool) as raw, bar:
            # this part's rows only: blocks and parts both start at multiples of BLOCK_ROWS
            for start, uids, cluster, dist in clustering.iter_assignment(a, b):
                keep = cluster >= 0
                if within:
                    keep &= within.mask(uids)
                if keep.any():
                    written += self._write(out, tag, clustering.k, uids, cluster, dist, keep,
                                           raw.read(start, start + len(uids)))
                bar.update(len(uids))
        return {"rows": written}

    def _write(self, out: Path, tag: str, k: int, uids, cluster, dist, keep, emb) -> int:
        idx = np.flatnonzero(keep)
        buckets = bucket_of(cluster[idx], k)
        order = np.argsort(buckets, kind="stable")
        idx, buckets = idx[order], buckets[order]
        cuts = np.flatnonzero(np.diff(buckets)) + 1
        for rows in np.split(idx, cuts):
            meta = np.empty(len(rows), META_DTYPE)
            meta["hi"], meta["lo"] = U.split(uids[rows])
            meta["cluster"], meta["dist"] = cluster[rows], dist[rows]
            bucket = int(bucket_of(cluster[rows[:1]], k)[0])
            with open(out / f"b{bucket:04d}.{tag}.meta", "ab") as f:
                f.write(meta.tobytes())
            with open(out / f"b{bucket:04d}.{tag}.emb", "ab") as f:
                f.write(emb[rows].astype(self.emb_dtype, copy=False).tobytes())
        return len(idx)


class _RawRows:
    """Embedding rows [start, stop) of the pool as stored (one npz open at a time)."""

    def __init__(self, pool):
        self.pool = pool
        self.current: tuple[int, NpzArray] | None = None

    def read(self, start: int, stop: int) -> np.ndarray:
        parts = []
        for i, f in enumerate(self.pool.files):
            lo, hi = max(start, f.offset), min(stop, f.offset + f.rows)
            if lo < hi:
                parts.append(self._array(i, f).read(lo - f.offset, hi - f.offset))
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def _array(self, i: int, f) -> NpzArray:
        if self.current is None or self.current[0] != i:
            self.close()
            self.current = (i, NpzArray(f.npz, self.pool.embedding_key))
        return self.current[1]

    def close(self) -> None:
        if self.current is not None:
            self.current[1].close()
            self.current = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def stored_dtype(pool) -> str:
    """float16 when every embedding file stores float16 (DataComp's), else float32: the
    bucket files then hold exactly the values the pool's float32 view is made from."""
    for f in pool.files:
        with NpzArray(f.npz, pool.embedding_key) as arr:
            if arr.dtype != np.float16:
                return "float32"
    return "float16"


@dataclass
class DedupStage(Stage):
    """Per bucket: group by cluster, order by distance (descending), compute M / keep flags
    in float32 from the embeddings normalised exactly as the pool normalises them."""

    work_dir: str
    k: int
    dim: int
    rule: str = "paper"
    eps: float | None = None
    shuffle_world: int = 1  # read only the shuffle parts of this world size
    emb_dtype: str = "float16"
    name: str = "dedup"
    pairwise: str = "auto"  # M's fast precision (pairwise.PRECISIONS): the same decisions whichever
    exact_everywhere: bool = False  # M exact for every j whatever eps (float32 GEMMs: the recheck is cheap)

    def exact_from(self) -> float:
        """M_j is exact (float32's) wherever it may reach this: the threshold of the eps asked
        (the paper rule with bf16-recheck), else everywhere (a target size reads its threshold off
        M; and on the float32 path, where exactness everywhere costs little, so that another eps
        reuses the stored M)."""
        if self.exact_everywhere or self.rule != "paper" or self.eps is None:
            return -math.inf
        return float(np.float32(1.0 - self.eps))

    def marker_dir(self) -> Path:
        """Results exact from a threshold serve only runs at or above it: the markers say which."""
        f = self.exact_from()
        d = super().marker_dir()
        return d if f == -math.inf else d.with_name(f"{self.name}-exact-from-{f:.9g}")

    def run(self, rank: int, world_size: int) -> dict:
        from concurrent.futures import ThreadPoolExecutor

        from threadpoolctl import threadpool_limits

        work = Path(self.work_dir)
        (work / "m").mkdir(parents=True, exist_ok=True)
        buckets = sorted(range(rank, n_buckets(self.k), world_size), key=lambda b: -self._bucket_bytes(work, b))
        # one bucket a core, each with a single-threaded BLAS: most clusters are small GEMMs,
        # which a multi-threaded BLAS runs far below its speed (and far worse on a busy machine)
        threads = max(1, min(len(os.sched_getaffinity(0)), DEDUP_THREADS, len(buckets)))
        torch = self.rule == "paper" and needs_torch(PairwiseConfig(self.pairwise), self.exact_from() == -math.inf)
        total = sum(self._bucket_bytes(work, b, ".meta") for b in buckets) // META_DTYPE.itemsize
        bar = progress_bar(total=total, desc=f"semdedup dedup, part {rank + 1}/{world_size}", unit="rows")

        def one(b: int) -> int:
            n = self._one(work, b)
            bar.update(n)  # tqdm's update holds its own lock
            return n

        with threadpool_limits(1, user_api="blas"), single_threaded_torch(torch), bar, \
                ThreadPoolExecutor(threads, thread_name_prefix="dedup") as ex:
            return {"rows": sum(ex.map(one, buckets))}

    def _bucket_bytes(self, work: Path, bucket: int, ext: str = ".emb") -> int:
        """The largest buckets go first, so that no core waits for one at the end."""
        pattern = f"b{bucket:04d}.p*-of-{self.shuffle_world:05d}{ext}"
        return sum(os.path.getsize(p) for p in glob.glob(str(work / "shuffle" / pattern)))

    def _one(self, work: Path, bucket: int) -> int:
        target = work / "m" / f"b{bucket:04d}.npy"
        exact = glob.glob(f"{target}.exact-from-*")  # (paper rule) its M is exact from these thresholds
        if target.exists() and (self.rule != "paper" or any(float(p.rsplit("-from-", 1)[1]) <= self.exact_from()
                                                            for p in exact)):
            return int(np.load(target, mmap_mode="r").shape[0])  # finished before an interruption, or reusable
        for p in exact:
            os.unlink(p)
        out = self._bucket(*self._read_bucket(work, bucket))
        with atomic_open(target, "wb") as f:
            np.save(f, out)
        Path(f"{target}.exact-from-{self.exact_from():.9g}").touch()  # after the result: a kill leaves none
        return len(out)

    def _bucket(self, meta: np.ndarray, emb: np.ndarray) -> np.ndarray:
        order = np.lexsort((meta["lo"], meta["hi"], -meta["dist"], meta["cluster"]))
        meta = meta[order]
        out = np.empty(len(meta), OUT_DTYPE)
        for name in META_DTYPE.names:
            out[name] = meta[name]
        cuts = np.flatnonzero(np.diff(meta["cluster"])) + 1
        for seg in np.split(np.arange(len(meta)), cuts):
            if not len(seg):
                continue
            e = normalized(emb[order[seg[0]:seg[-1] + 1]])
            if self.rule == "paper":
                out["M"][seg] = exact_column_max(e, PairwiseConfig(self.pairwise), self.exact_from())
                out["keep"][seg] = True  # decided later from M and eps
            else:
                out["M"][seg] = np.nan
                fn = greedy_keep if self.rule == "greedy" else components_keep
                out["keep"][seg] = fn(e, 1.0 - self.eps)
        return out

    def _read_bucket(self, work: Path, bucket: int) -> tuple[np.ndarray, np.ndarray]:
        pattern = f"b{bucket:04d}.p*-of-{self.shuffle_world:05d}.meta"
        metas, embs = [], []
        for p in sorted(glob.glob(str(work / "shuffle" / pattern))):
            meta = np.fromfile(p, META_DTYPE)
            emb = np.fromfile(p[:-5] + ".emb", self.emb_dtype)
            if len(emb) != len(meta) * self.dim:
                raise ConfigError(f"{p}: {len(meta)} rows but {p[:-5]}.emb holds {len(emb) / self.dim:g}; "
                                  f"the shuffle was cut short: delete {work} and rerun")
            metas.append(meta)
            embs.append(emb.reshape(-1, self.dim))
        if not metas:
            return np.empty(0, META_DTYPE), np.empty((0, self.dim), self.emb_dtype)
        return np.concatenate(metas), np.concatenate(embs)


def iter_results(work: Path, k: int):
    for bucket in range(n_buckets(k)):
        p = work / "m" / f"b{bucket:04d}.npy"
        yield np.load(p)


# -- the filter --------------------------------------------------------------------------


def semdedup(pool, *, eps: float | None = None, target_fraction: float | None = None, rule: str = "paper",
             within=None, clustering: ClusteringConfig | None = None, executor: "Executor | None" = None,
             out=None, pairwise: str = "auto") -> FilterResult | None:
    """``pairwise``: how M is computed (``pairwise.PRECISIONS``; the same bits whichever). The whole chain (k-means -> assignment -> shuffle -> dedup) is submitted at once, each
    stage after the one before (SLURM ``afterok``; in order locally). None when the executor
    detaches before the jobs are done: the same call, rerun afterwards, collects the result."""
    if (eps is None) == (target_fraction is None):
        raise ConfigError("semdedup needs exactly one of --eps or --target-fraction")
    if rule not in RULES:
        raise ConfigError(f"--rule must be one of {', '.join(RULES)}")
    if pairwise not in PRECISIONS:
        raise ConfigError(f"--pairwise must be one of {', '.join(PRECISIONS)}, got {pairwise!r}")
    if eps is not None and not 0 <= eps < 1:
        raise ConfigError(f"--eps must be in [0, 1), got {eps}")
    if target_fraction is not None:
        target_fraction = check_fraction(target_fraction, "target-fraction")
        if rule != "paper":
            raise ConfigError("--target-fraction needs --rule paper (the other rules depend on eps)")
    within = as_within(within)
    config = clustering or ClusteringConfig()
    default_k = max(1, round((len(within.uids) if within else pool.rows) / SEMDEDUP_CLUSTER_SIZE))
    executor = Executor.given(executor)
    cdir = clustering_dir_for(pool, config, out, default_k)
    work = cdir / "semdedup" / (within_id(within) + ("" if rule == "paper" else f"-{rule}-{eps:g}"))
    with folder_lock(cdir, "building or checking the clustering"):
        chain = submit_clustering(cdir, pool, config, within, executor, default_k=default_k)
        with folder_lock(work, "running SemDeDup"):  # a concurrent run waits, then reuses the results
            subs = _submit_stages(work, chain, pool, within, rule, eps, executor, pairwise)
            if not finish_chain(executor, chain.submissions + subs, cdir):
                return None
            shutil.rmtree(work / "shuffle", ignore_errors=True)  # the embeddings copy is no longer needed
            shutil.rmtree(work / ".markers" / "shuffle", ignore_errors=True)  # a run at a lower eps threshold
            # recomputes M where it is not yet exact (DedupStage.exact_from), so it shuffles again
    clustering = collect_clustering(cdir, pool)
    seed = clustering.meta["seed"]
    size, d_intra = clustering.cluster_stats(within)  # also checks --within against the pool

    # one pass over the stored results for the eps table, then the selection
    kept_per = np.zeros(clustering.k, np.int64)
    m_total = int(size.sum())
    eps_table = {e: 0 for e in PAPER_EPS}
    stored = 0
    for res in iter_results(work, clustering.k):
        stored += len(res)
        if rule == "paper":
            for e in PAPER_EPS:
                eps_table[e] += int((res["M"] <= np.float32(1 - e)).sum())
    if stored != m_total:  # e.g. a cache filled by two runs at once before it was locked
        raise ConfigError(f"the SemDeDup results in {work} hold {stored:,} rows for {m_total:,} candidates; "
                          f"delete {work} and rerun")
    kept = UidCollector()
    if rule == "paper" and target_fraction is not None:
        n_keep = target_count(target_fraction, m_total)

        def batches():
            for res in iter_results(work, clustering.k):
                yield np.zeros(len(res), np.int64), res["M"], U.make_array(res["hi"], res["lo"])

        grouped_select(batches, np.array([n_keep]), "smallest", collector=kept)
        chosen = kept.to_array()
        max_m = -np.inf
        for res in iter_results(work, clustering.k):
            sel = K.member(chosen, U.make_array(res["hi"], res["lo"]))[0]
            kept_per += np.bincount(res["cluster"][sel], minlength=clustering.k)
            if sel.any():
                max_m = max(max_m, float(res["M"][sel].max()))
        eps_used = None if not np.isfinite(max_m) else float(1.0 - max_m)
        kept = chosen
    else:
        for res in iter_results(work, clustering.k):
            sel = res["keep"] & (res["M"] <= np.float32(1 - eps)) if rule == "paper" else res["keep"]
            kept.add(U.make_array(res["hi"][sel], res["lo"][sel]))
            kept_per += np.bincount(res["cluster"][sel], minlength=clustering.k)
        eps_used = eps
    # d_inter only fills SemDeDup's cluster table (DBP's 20 neighbours where there are as many):
    # fewer clusters is no reason for DBP's warning here
    d_inter, cx = complexity(clustering, size, d_intra, min(20, max(int((size > 0).sum()) - 1, 0)))
    table = cluster_table(size, d_intra, d_inter, cx, np.full(clustering.k, np.nan), kept_per)
    params = {"eps": eps, "target_fraction": target_fraction, "clusters": clustering.k, "rule": rule,
              "seed": seed, "clustering": str(clustering.dir), "train_sample": clustering.meta["train_sample"]}
    stats = {"eps_used": eps_used,
             "kept_fraction_at_paper_eps": {f"{e:g}": round(c / max(m_total, 1), 4) for e, c in eps_table.items()}
             if rule == "paper" else None}
    return FilterResult("semdedup", kept, params, {"pool": clustering.rows, "candidates": m_total}, stats,
                        extras=table_writer(table, f"SemDeDup ({rule}): keep {int(kept_per.sum()):,} of "
                                                   f"{m_total:,}, k={clustering.k}"))


def _submit_stages(work: Path, chain: ClusteringChain, pool, within: Within, rule, eps,
                   executor: Executor, pairwise: str = "auto") -> list:
    """Submit the shuffle after the clustering's last stage and the dedup after the shuffle;
    nothing when the dedup's results are there (they serve any worker count)."""
    _discard_older_format(work)
    write_json(work / "semdedup.json", {"rule": rule, "eps": eps, "k": chain.k, "format": FORMAT})  # parameters
    emb_dtype = stored_dtype(pool)
    # float32 GEMMs (a CPU without AMX, or --pairwise fp32): M is made exact for every j, which
    # costs a recheck of the few near-maximal pairs, so that any later eps reads it off; with
    # bf16-recheck only from the threshold asked (exact everywhere would recheck most columns)
    everywhere = PairwiseConfig(pairwise).resolved().precision == "fp32"
    dedup = DedupStage(str(work), chain.k, pool.dim, rule, eps, emb_dtype=emb_dtype, pairwise=pairwise,
                       exact_everywhere=everywhere)
    if finished_world(dedup) is not None:
        log.info("reusing SemDeDup results in %s", work)
        return []
    workers = executor.workers
    shuffle = ShuffleStage(str(work), str(chain.dir), PoolSpec.of(pool), str(within.path) if within else None,
                           emb_dtype)
    world = _shuffle_world(work, shuffle, workers)
    shuffled = executor.submit(shuffle, world, after=[chain.last])
    dedup.shuffle_world = world
    dedup_world = min(workers, n_buckets(chain.k))
    _forget_other_worlds(dedup, dedup_world)  # its per-bucket results serve any world size
    return [shuffled, executor.submit(dedup, dedup_world, after=[shuffled])]


def _shuffle_world(work: Path, shuffle: ShuffleStage, workers: int) -> int:
    """The world size to shuffle with: a finished shuffle's own (any worker count reads it);
    otherwise ``workers``, after discarding an unfinished shuffle made with another (its files
    and markers name their world size; each part of a resumed one clears its own leftovers)."""
    done = finished_world(shuffle)
    if done is not None:
        return done
    tag = f"-of-{workers:05d}."
    files = (work / "shuffle").glob("*") if (work / "shuffle").exists() else ()
    markers = shuffle.marker_dir().glob("*-of-*.json") if shuffle.marker_dir().exists() else ()
    if any(tag not in p.name for p in files) or any(not p.name.endswith(f"-of-{workers:05d}.json") for p in markers):
        log.info("%s: discarding an unfinished shuffle made with another number of parts (now %d)", work, workers)
        shutil.rmtree(work / "shuffle", ignore_errors=True)
        shutil.rmtree(shuffle.marker_dir(), ignore_errors=True)
    return workers


def _discard_older_format(work: Path) -> None:
    """Results or a shuffle made by an older SemDeDup (e.g. similarities of fp16-rounded
    vectors) are removed, so that they are computed again in float32. (``shuffle.json`` is an
    older version's record of the shuffle's world size, now read off its markers.)"""
    made = [json.loads(p.read_text()).get("format") for p in (work / "semdedup.json", work / "shuffle.json")
            if p.exists()]
    if all(f == FORMAT for f in made):
        (work / "shuffle.json").unlink(missing_ok=True)
        return
    log.info("%s: discarding SemDeDup results of an older format (%s, now %d)", work, made, FORMAT)
    for p in work.iterdir():
        if p.name != ".lock":
            shutil.rmtree(p) if p.is_dir() else p.unlink()


def _forget_other_worlds(stage, world: int) -> None:
    d = stage.marker_dir()
    for p in d.glob("*-of-*.json") if d.exists() else ():
        if not p.name.endswith(f"-of-{world:05d}.json"):
            p.unlink()


from conceptprune.checks import float_arg, fraction_arg  # noqa: E402

from .registry import FilterSpec, Param, register  # noqa: E402


def _explain(view, q, kept: bool) -> dict:
    """M_j against 1 - eps, and the earlier near-duplicate that removed a dropped sample."""
    from conceptprune import uids as U

    eps = view.eps()
    out = {"eps": eps}
    for res in view.semdedup_results():
        m = (res["hi"] == q[0]["f0"]) & (res["lo"] == q[0]["f1"])
        if m.any():
            r = res[m][0]
            out.update(cluster=int(r["cluster"]), distance=float(r["dist"]), M=float(r["M"]))
            break
    else:
        out["why"] = "no stored SemDeDup result for this uid"
        return out
    target = (view.params or {}).get("target_fraction")
    if eps is not None:
        out["why"] = (f"M_j {out['M']:.5f} {'<=' if kept else '>'} 1 - eps = {1 - eps:.5f} "
                      f"(cluster {out['cluster']}")
        if target is not None:  # eps was not chosen: the target size forced it
            out["eps_from_target_fraction"] = target
            out["why"] += f"; eps {eps:.4g} is what --target-fraction {target:g} needed"
        out["why"] += ")"
    if not kept and view.pool_dir is not None:
        partner, sim = view.near_duplicate(q)
        pu = U.pair_to_uid(*partner[0])
        out.update(removed_by=pu, similarity=float(sim[0]), removed_by_kept=view.kept(partner[0].reshape(1)))
        out["why"] = out.get("why", "") + f"; near duplicate of {pu} (cos {sim[0]:.5f})"
        if target is not None and eps is not None and sim[0] < 0.9:  # the paper's eps are <= 0.1: say whose threshold this is
            out["why"] += (f" only at the eps the target size forced ({eps:.3g}; SemDeDup's paper uses eps <= 0.1, "
                           "cos >= 0.9)")
    return out


register(FilterSpec(
    "semdedup", "SemDeDup: remove near-duplicates inside each k-means cluster (eps or a target size)", semdedup,
    runs_as="clustering", embeddings=True, clustering=True, explain=_explain,
    default_clusters=f"candidates / {SEMDEDUP_CLUSTER_SIZE}",
    params=(Param("--eps", float_arg("--eps", 0.0, 1.0, max_open=True), group="size", required=True,
                  help="remove j when max similarity to an earlier member > 1 - eps (eps in [0, 1))"),
            Param("--target-fraction", fraction_arg("--target-fraction"), group="size", required=True,
                  help="keep this fraction: the eps that hits it is read off the stored similarities"),
            Param("--rule", choices=("paper", "greedy", "components"), default="paper",
                  help="paper (default): compare with every earlier member; greedy: only with kept ones; "
                       "components: one per connected component"),
            Param("--pairwise", choices=("auto", "fp32", "bf16-recheck"), default="auto",
                  help="how M is computed; every choice gives float32's exact bits where a decision depends "
                       "on them. auto (default): a bfloat16 GEMM plus an exact recheck near the eps threshold "
                       "where bfloat16 is fast (CUDA, AMX CPUs), else float32"))))
