"""The clustering cache under adversarial use (issue 19, items 2, 5, 6, 7): concurrent
SemDeDup runs on one clustering, kills at any moment followed by a rerun with another
--workers, changed pool data, --bad-embeddings on a reused clustering, --embedding-dir, and
cluster ids that do not depend on how rows are batched."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conceptprune import keeplist as K
from conceptprune.cli import main
from conceptprune.errors import ConfigError, PoolError
from conceptprune.filters import dbp, run_filter
from conceptprune.filters.clustering import AssignStage, Clustering, PoolSpec
from conceptprune.filters.clustering_config import ClusteringConfig
from conceptprune.pool import Pool
from conceptprune.slurm.stage import Executor
from conceptprune.synthetic import SyntheticPoolConfig, make_pool



@pytest.fixture(scope="module")
def small_pool_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("cache_small_pool")
    make_pool(out, SyntheticPoolConfig(rows=4000, files=2, seed=6, concepts=6, families=3,
                                       embedding_keys=("l14_img",)), progress=False)
    return out


@pytest.fixture(scope="module")
def pool_dir(tmp_path_factory):
    """More than 16,384 rows: two workers get two row ranges."""
    out = tmp_path_factory.mktemp("cache_pool")
    make_pool(out, SyntheticPoolConfig(rows=20000, files=3, seed=3, concepts=6, families=3, duplicate_fraction=0.1,
                                       embedding_keys=("l14_img",), block_rows=4000), progress=False)
    return out


def _semdedup_args(pool, out, clus, *extra):
    return ["--quiet", "filter", "semdedup", "--pool", str(pool), "--out", str(out), "--clustering", str(clus),
            "--clusters", "6", "--niter", "10", "--executor", "debug", *map(str, extra)]


def _cli(args, prelude="", **env):
    """The CLI in a fresh interpreter, after ``prelude`` (Python run first)."""
    code = prelude + "\nimport sys\nfrom conceptprune.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    return subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "CONCEPTPRUNE_PROGRESS": "0", **env})


# -- 19.7: the cluster of a row does not depend on how rows are batched --------------------


def _write_tie_pool(root, sizes, d=64, seed=0):
    """Rows whose coordinates come in equal pairs (x[2m] == x[2m+1]) and, every third row,
    free rows; uids and embeddings only (what the assignment reads)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    rows = []
    for i, n in enumerate(sizes):
        x = np.repeat(rng.standard_normal((n, d // 2)) * 0.3 + 1.0, 2, axis=1)
        free = np.arange(n) % 3 == 2
        x[free] = rng.standard_normal((int(free.sum()), d)) * 0.3 + 1.0
        x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)
        pq.write_table(pa.table({"uid": [f"{i:08x}{j:024x}" for j in range(n)]}), root / f"f{i}.parquet")
        np.savez(root / f"f{i}.npz", l14_img=x)
        rows.append(x)
    return np.concatenate(rows)


def _exact_nearest(x, c):
    """Reference: the argmax of the exactly summed inner products, ties to the lowest id."""
    x64, c64 = x.astype(np.float64), c.astype(np.float64)
    s = x64 @ c64.T
    out = s.argmax(axis=1)
    for r in np.flatnonzero(np.sort(s, axis=1)[:, -2] >= s.max(axis=1) - 1e-9):
        exact = [math.fsum((x64[r] * c64[j]).tolist()) for j in range(len(c))]
        out[r] = int(np.argmax(exact))  # the first maximum: the lowest id
    return out


def test_cluster_ids_do_not_depend_on_the_batching(tmp_path):
    # centroid 1 is centroid 0 with its coordinates swapped in pairs: every paired row is an
    # exact tie between them, which float32 scoring breaks by the last bits of its batch.
    # The files' sizes make a world of 2 search rows 16365..16383 in a batch of 19 (faiss's
    # non-BLAS path) that a world of 1 searches in a batch of 16,384.
    d = 64
    x = _write_tie_pool(tmp_path / "pool", [16365, 16403], d)
    rng = np.random.default_rng(1)
    c0 = np.abs(rng.standard_normal(d))
    c0 /= np.linalg.norm(c0)
    centroids = np.stack([c0, c0.reshape(-1, 2)[:, ::-1].reshape(-1), -c0,
                          rng.standard_normal(d) / np.sqrt(d)]).astype(np.float32)
    expected = _exact_nearest(x.astype(np.float32), centroids)
    assert (expected == 0).sum() > 20_000 and (expected != 0).sum() > 1000  # ties and free rows
    pool = Pool(tmp_path / "pool", embedding_key="l14_img")
    for world in (1, 2, 3):
        work = tmp_path / f"w{world}"
        work.mkdir()
        np.save(work / "centroids.npy", centroids)
        Executor.create("inline").run(AssignStage(str(work), PoolSpec.of(pool), gpu="no"), world)
        (work / "clustering.json").write_text(json.dumps(
            {"k": len(centroids), "pool": {"rows": pool.rows}, "assignment": {"world_size": world}}))
        got = np.concatenate([b[2] for b in Clustering(work).iter_assignment()])
        assert (got != expected).sum() == 0, f"world {world}: {(got != expected).sum()} rows differ"


def test_many_tied_centroids_go_to_the_lowest_id_in_any_batch():
    """More exactly tied centroids than faiss's recheck returns (20 > RECHECK_K): the full
    float64 recheck; the answer is the lowest tied id whatever the batch size."""
    import faiss

    from conceptprune.filters.clustering import RECHECK_K, nearest_centroids

    d, rng = 64, np.random.default_rng(2)
    c0 = np.abs(rng.standard_normal(d))
    tied = []
    for m in range(20):  # c0 with pair m swapped: the same score for any x with x[2m] == x[2m+1]
        c = c0.copy()
        c[2 * m], c[2 * m + 1] = c0[2 * m + 1], c0[2 * m]
        tied.append(c)
    centroids = np.concatenate([rng.standard_normal((3, d)), tied, -c0[None]]).astype(np.float32)
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    assert len(tied) > RECHECK_K
    x = np.repeat(rng.standard_normal((500, d // 2)) * 0.3 + 1.0, 2, axis=1).astype(np.float32)
    x[::5] = rng.standard_normal((100, d))  # and some free rows
    expected = _exact_nearest(x, centroids)
    assert (expected[x[:, 0] == x[:, 1]] == 3).all()
    index = faiss.IndexFlatIP(d)
    index.add(centroids)
    norms = np.linalg.norm(x, axis=1)
    for batch in (len(x), 64, 7, 1):
        got = np.concatenate([nearest_centroids(index, centroids.astype(np.float64), x[a:a + batch],
                                                norms[a:a + batch], None) for a in range(0, len(x), batch)])
        assert (got == expected).all(), f"batch {batch}: {(got != expected).sum()} rows differ"


def test_identical_vectors_same_result_with_one_and_two_workers(tmp_path):
    """A pool of copies of 24 vectors clustered with k = 40: faiss's k-means splits clusters
    into centroid pairs the copies are near-tied between (~1e-7), so before the exact
    recheck ~180 rows changed cluster with the number of workers. The whole filter gives
    the same keep-lists (dbp and semdedup) with 1 and 2 workers."""
    pool = tmp_path / "pool"
    make_pool(pool, SyntheticPoolConfig(rows=18000, files=2, seed=4, concepts=5, duplicate_fraction=0.0,
                                        embedding_keys=("l14_img",)), progress=False)
    rng = np.random.default_rng(0)
    for f in sorted(pool.glob("*.npz")):
        with np.load(f) as z:
            e = z["l14_img"].copy()
        e[:] = e[rng.integers(0, 12, len(e))]  # 12 distinct vectors per file, repeated
        np.savez(f, l14_img=e)
    outs = {}
    for workers in (1, 2):
        d = tmp_path / f"w{workers}"
        run_filter(dbp, pool, d / "dbp.npy", embedding_key="l14_img", fraction=0.3,
                   clustering=ClusteringConfig(clusters=40, niter=10),
                   executor=Executor.create("inline", workers=workers))
        from conceptprune.filters import semdedup
        run_filter(semdedup, pool, d / "sd.npy", embedding_key="l14_img", eps=0.01,
                   clustering=ClusteringConfig(dir=d / "dbp.clustering"),
                   executor=Executor.create("inline", workers=workers))
        outs[workers] = [(d / n).read_bytes() for n in ("dbp.npy", "sd.npy")]
    assert outs[1] == outs[2]


# -- 19.2: concurrent runs and kills on one clustering folder --------------------------------


BARRIER = "import time, os\ntime.sleep(max(0.0, float(os.environ['CP_START_AT']) - time.time()))"


def test_two_semdedup_runs_at_once_share_one_clustering(pool_dir, tmp_path):
    ref = {}
    for f in ("0.5", "0.7"):  # one after the other: the reference
        assert main(_semdedup_args(pool_dir, tmp_path / "ref" / f"{f}.npy", tmp_path / "ref" / "c",
                                   "--target-fraction", f)) == 0
        ref[f] = (tmp_path / "ref" / f"{f}.npy").read_bytes()
    start_at = str(time.time() + 8)  # both start their work at the same moment, after their imports
    procs = {f: _cli(_semdedup_args(pool_dir, tmp_path / "run" / f"{f}.npy", tmp_path / "run" / "c",
                                    "--target-fraction", f), BARRIER, CP_START_AT=start_at) for f in ("0.5", "0.7")}
    results = {f: p.communicate(timeout=300) for f, p in procs.items()}
    for f, p in procs.items():
        assert p.returncode == 0, results[f][1][-2000:]
        assert (tmp_path / "run" / f"{f}.npy").read_bytes() == ref[f]
    assert any("waiting for it" in err for _, err in results.values())  # they did overlap
    # the cache is complete and right: a third run reuses it
    assert main(_semdedup_args(pool_dir, tmp_path / "run" / "again.npy", tmp_path / "run" / "c",
                               "--target-fraction", "0.5")) == 0
    assert (tmp_path / "run" / "again.npy").read_bytes() == ref["0.5"]


KILL = """
import os, signal, sys
import importlib
S = importlib.import_module("conceptprune.filters.semdedup")
ST = importlib.import_module("conceptprune.slurm.stage")
import numpy as np
kind, n = os.environ["CP_KILL"].split(":")
count = [0]
def hit():
    count[0] += 1
    if count[0] == int(n):
        os.kill(os.getpid(), signal.SIGKILL)
if kind == "shuffle-write":  # between a batch's .meta append and its .emb append
    real_open = open
    def counting_open(path, mode="r", *a, **k):
        if mode == "ab" and str(path).endswith(".emb"):
            hit()
        return real_open(path, mode, *a, **k)
    S.open = counting_open
elif kind == "marker":  # right after a stage part's completion marker
    real_write = ST.write_json
    def counting_write(path, obj):
        real_write(path, obj)
        hit()
    ST.write_json = counting_write
elif kind == "bucket":  # a dedup bucket's result written, not yet renamed into place
    import contextlib
    real_atomic_open = S.atomic_open
    @contextlib.contextmanager
    def counting_atomic_open(path, *a, **k):
        with real_atomic_open(path, *a, **k) as f:
            yield f
            hit()
    S.atomic_open = counting_atomic_open
"""


@pytest.mark.parametrize("kill,rerun_workers,stage", [
    ("shuffle-write:7", 1, "shuffle"), ("marker:1", 3, "shuffle"), ("bucket:2", 1, "dedup"),
    ("marker:1", 1, "assign")])
def test_kill_anywhere_then_rerun_with_other_workers(pool_dir, tmp_path, kill, rerun_workers, stage):
    ref_out, ref_clus = tmp_path / "ref.npy", tmp_path / "ref.clustering"
    assert main(_semdedup_args(pool_dir, ref_out, ref_clus, "--eps", "0.02", "--workers", "1")) == 0
    clus = tmp_path / "c"
    if stage != "assign":  # the same clustering, without SemDeDup's work
        shutil.copytree(ref_clus, clus, ignore=shutil.ignore_patterns("semdedup"))
    p = _cli(_semdedup_args(pool_dir, tmp_path / "out.npy", clus, "--eps", "0.02", "--workers", "2"), KILL,
             CP_KILL=kill)
    _, err = p.communicate(timeout=300)
    assert p.returncode == -signal.SIGKILL, err[-2000:]
    assert not (tmp_path / "out.npy").exists()
    for _ in range(2):  # the rerun, with another --workers; then once more, reusing it
        assert main(_semdedup_args(pool_dir, tmp_path / "out.npy", clus, "--eps", "0.02", "--workers",
                                   rerun_workers, "--overwrite")) == 0
        assert (tmp_path / "out.npy").read_bytes() == ref_out.read_bytes()


# -- 19.5: a clustering is reused only for the same data and policy --------------------------


def test_changed_embeddings_are_not_reused(small_pool_dir, tmp_path):
    pool = tmp_path / "pool"
    shutil.copytree(small_pool_dir, pool)
    clus = tmp_path / "c"
    a = run_filter(dbp, pool, tmp_path / "a.npy", embedding_key="l14_img", fraction=0.5,
                   clustering=ClusteringConfig(clusters=6, dir=clus, niter=10), executor=Executor.create("inline"))
    npz = sorted(pool.glob("*.npz"))[1]
    with np.load(npz) as z:
        e = z["l14_img"].copy()
    e = e[::-1].copy()  # same shape, same rows count, other data
    np.savez(npz, l14_img=e)
    with pytest.raises(ConfigError, match=f"other data: {npz.name} changed"):
        run_filter(dbp, pool, tmp_path / "b.npy", embedding_key="l14_img", fraction=0.5,
                   executor=Executor.create("inline"), clustering=ClusteringConfig(dir=clus))
    b = run_filter(dbp, pool, tmp_path / "b.npy", embedding_key="l14_img", fraction=0.5,
                   clustering=ClusteringConfig(clusters=6, dir=tmp_path / "fresh", niter=10), executor=Executor.create("inline"))
    assert not np.array_equal(a.uids, b.uids)


def test_bad_embeddings_policy_on_a_reused_clustering(tmp_path):
    pool = tmp_path / "pool"
    make_pool(pool, SyntheticPoolConfig(rows=3000, files=1, seed=5, concepts=4, embedding_keys=("l14_img",)),
              progress=False)
    npz = next(pool.glob("*.npz"))
    with np.load(npz) as z:
        arr = z["l14_img"].copy()
    arr[[10, 2000]] = np.nan
    arr[2500] = 0
    np.savez(npz, l14_img=arr)
    clus = tmp_path / "c"
    for name in ("first", "reused"):
        r = run_filter(dbp, pool, tmp_path / f"{name}.npy", embedding_key="l14_img", bad_embeddings="drop",
                       fraction=0.5, clustering=ClusteringConfig(clusters=4, dir=clus, train_sample=1000, niter=10),
                       executor=Executor.create("inline"))
        assert len(r.uids) == round(0.5 * 2997)
        report = json.loads((tmp_path / f"{name}.json").read_text())["embeddings"]
        assert (report["nan_or_inf"], report["zero"]) == (2, 1), name
        assert "row 10" in report["examples"][0]
    with pytest.raises(PoolError, match=r"row 10 .*NaN.*3 rows"):
        run_filter(dbp, pool, tmp_path / "strict.npy", embedding_key="l14_img", fraction=0.5,
                   executor=Executor.create("inline"), clustering=ClusteringConfig(dir=clus))
    assert not (tmp_path / "strict.npy").exists()


# -- 19.6: --embedding-dir -----------------------------------------------------------------


def test_embedding_dir_is_used_by_every_cluster_filter(small_pool_dir, tmp_path):
    pool_dir = small_pool_dir
    # the pool's folder holds a decoy npz (rows reversed); the real embeddings are elsewhere
    pool, emb = tmp_path / "pool", tmp_path / "emb"
    emb.mkdir()
    shutil.copytree(pool_dir, pool)
    for npz in pool.glob("*.npz"):
        shutil.move(npz, emb / npz.name)
        with np.load(emb / npz.name) as z:
            np.savez(npz, l14_img=z["l14_img"][::-1].copy())
    common = ["--clusters", "6", "--niter", "10", "--executor", "debug"]
    methods = {"dbp": ["--fraction", "0.4"], "semdedup": ["--eps", "0.02"], "ssl-prototypes": ["--fraction", "0.4"]}
    for method, args in methods.items():
        ref = tmp_path / "ref" / f"{method}.npy"
        assert main(["--quiet", "filter", method, "--pool", str(pool_dir), "--out", str(ref), *args, *common,
                     "--clustering", str(tmp_path / "ref" / "c")]) == 0
        got = tmp_path / "got" / f"{method}.npy"
        assert main(["--quiet", "filter", method, "--pool", str(pool), "--embedding-dir", str(emb), "--out", str(got),
                     *args, *common, "--clustering", str(tmp_path / "got" / "c")]) == 0
        assert got.read_bytes() == ref.read_bytes(), method
    # without the npz files anywhere: a clear error naming the file, not the decoy
    (tmp_path / "empty").mkdir()
    with pytest.raises(PoolError, match=r"no embeddings file .*\.npz"):
        Pool(pool, embedding_key="l14_img", embedding_dir=tmp_path / "empty")
    assert K.read_keep_list(tmp_path / "got" / "dbp.npy").size


def test_a_corrupt_semdedup_cache_is_named_not_used(small_pool_dir, tmp_path):
    """A cache filled twice (what two unlocked runs did) is refused with the folder to delete."""
    from conceptprune.filters import semdedup

    run_filter(semdedup, small_pool_dir, tmp_path / "a.npy", embedding_key="l14_img", eps=0.02,
               clustering=ClusteringConfig(clusters=6, niter=10), executor=Executor.create("inline"))
    work = tmp_path / "a.clustering" / "semdedup" / "all"
    bucket = sorted((work / "m").glob("b*.npy"))[0]
    res = np.load(bucket)
    np.save(bucket, np.concatenate([res, res]))
    with pytest.raises(ConfigError, match=f"hold {4000 + len(res):,} rows for 4,000 candidates; delete {work}"):
        run_filter(semdedup, small_pool_dir, tmp_path / "b.npy", embedding_key="l14_img", eps=0.02,
                   executor=Executor.create("inline"), clustering=ClusteringConfig(dir=tmp_path / "a.clustering"))


def test_the_training_sample_is_the_candidates_with_the_smallest_row_hashes(tmp_path):
    """``sample_rows`` with --within: the n candidate rows (files of odd sizes, so chunks start
    anywhere) whose seeded row hashes are smallest, in row order; without it, the same over
    every row."""
    from conceptprune import uids as U
    from conceptprune.filters.base import Within, as_pool
    from conceptprune.filters.clustering import sample_rows
    from conceptprune.synthetic import SyntheticPoolConfig, make_pool

    make_pool(tmp_path / "pool", SyntheticPoolConfig(rows=20003, files=3, seed=4, concepts=3,
                                                     embedding_keys=("l14_img",)), progress=False)
    pool = as_pool(tmp_path / "pool", embedding_key="l14_img")
    uids = np.concatenate([c.uids for c in pool.iter_chunks()])
    chosen = np.flatnonzero(np.random.default_rng(1).random(len(uids)) < 0.2)
    K.write_keep_list(tmp_path / "w.npy", uids[chosen])
    for within, rows in ((Within(tmp_path / "w.npy"), chosen), (Within(None), np.arange(len(uids)))):
        cfg = ClusteringConfig(clusters=3, train_sample=500, seed=7).filled()
        keys = U.hash_uids(U.make_array(rows.astype(np.uint64), rows.astype(np.uint64)), 7)
        want = np.sort(rows[np.argsort(keys, kind="stable")[:500]])
        assert (sample_rows(pool, within, cfg) == want).all()
