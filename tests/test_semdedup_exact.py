"""SemDeDup decides exactly as float32 does, and the k-means training sample grows with k.

The pool stores fp16 embeddings (as DataComp's npz do). The reference here is an
independent computation: the stored values cast to float32, divided by their norms, the
full S = E E^T per cluster in float64 (exact products of the float32 values), M_j =
max_{i<j} S_ij rounded to float32. Pairs are planted with similarities within 1e-4 of the
threshold on both sides of it. With an eps the pairwise pass takes its fast path where the
CPU has one (bfloat16 + exact recheck), with a target size the float32 one (pairwise.py);
tests/test_pairwise.py checks both paths on their own."""

from __future__ import annotations

import glob
import logging

import numpy as np
import pytest

from conceptprune import uids as U
from conceptprune.errors import ConfigError
from conceptprune.filters import run_filter, semdedup
from conceptprune.filters.clustering import Clustering
from conceptprune.filters.clustering_config import ClusteringConfig, parse_bytes
from conceptprune.pool import Pool
from conceptprune.synthetic import SyntheticPoolConfig, make_pool

from conftest import uid_set
from conceptprune.slurm.stage import Executor

DIM, PAIRS, SINGLES, CLUSTERS = 64, 700, 600, 4
EPS = 0.05
THRESHOLD = 1.0 - EPS  # j is removed when M_j > 1 - eps


def _planted_vectors(seed: int = 0) -> np.ndarray:
    """Rows around CLUSTERS far-apart centres: PAIRS pairs whose cosine is spread over
    THRESHOLD +- 1.2e-4, and SINGLES unrelated rows; fp16 as stored, rows shuffled."""
    rng = np.random.default_rng(seed)
    centres = np.linalg.qr(rng.standard_normal((DIM, CLUSTERS)))[0].T * 3.0  # orthogonal, well apart
    def around(n):
        x = centres[rng.integers(0, CLUSTERS, n)] + rng.standard_normal((n, DIM))
        return x / np.linalg.norm(x, axis=1, keepdims=True)
    base = around(PAIRS)
    w = rng.standard_normal((PAIRS, DIM))
    w -= (w * base).sum(1, keepdims=True) * base  # orthogonal to its base
    w /= np.linalg.norm(w, axis=1, keepdims=True)
    target = THRESHOLD + rng.uniform(-1.2e-4, 1.2e-4, PAIRS)
    twin = target[:, None] * base + np.sqrt(1 - target ** 2)[:, None] * w  # cos(base, twin) = target
    rows = np.concatenate([base, twin, around(SINGLES)])
    return rows[rng.permutation(len(rows))].astype(np.float16)


@pytest.fixture(scope="module")
def planted_pool(tmp_path_factory):
    out = tmp_path_factory.mktemp("exact")
    rows = 2 * PAIRS + SINGLES
    make_pool(out, SyntheticPoolConfig(rows=rows, files=2, seed=5, concepts=4, families=2, embedding_keys=("l14_img",),
                                       block_rows=1000, dims={"l14_img": DIM}), progress=False)
    x = _planted_vectors()
    offset = 0
    for f in sorted(glob.glob(str(out / "*.npz"))):  # the same files, our vectors (fp16 as DataComp's)
        n = len(np.load(f)["l14_img"])
        np.savez(f, l14_img=x[offset:offset + n])
        offset += n
    assert offset == rows
    return out, x


def _as_float32(pool) -> np.ndarray:
    """The pool's own float32 view: the stored fp16 cast to float32, divided by float32 norms."""
    p = Pool(pool, embedding_key="l14_img")
    return p.read_embedding_rows(np.arange(p.rows))[0]


def _reference_m(clustering: Clustering, e: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Independent: per cluster, order by distance descending (ties: smaller uid), full S in
    float64, M_j over the strict upper triangle, rounded to float32. (uids, M)."""
    blocks = list(clustering.iter_assignment())
    uids = np.concatenate([b[1] for b in blocks])
    cluster = np.concatenate([b[2] for b in blocks])
    dist = np.concatenate([b[3] for b in blocks])
    hi, lo = U.split(uids)
    out_uids, out_m = [], []
    for c in range(clustering.k):
        rows = np.flatnonzero(cluster == c)
        rows = rows[np.lexsort((lo[rows], hi[rows], -dist[rows]))]
        e64 = e[rows].astype(np.float64)
        s = e64 @ e64.T
        out_m.append(np.array([s[:j, j].max() if j else -np.inf for j in range(len(rows))]).astype(np.float32))
        out_uids.append(uids[rows])
    return np.concatenate(out_uids), np.concatenate(out_m)


def _stored_m(clustering: Clustering, uids: np.ndarray) -> np.ndarray:
    """SemDeDup's stored M_j, in the order of ``uids``."""
    from conceptprune.filters.semdedup import iter_results

    res = np.concatenate(list(iter_results(clustering.dir / "semdedup" / "all", clustering.k)))
    where = {u: i for i, u in enumerate(U.make_array(res["hi"], res["lo"]).tolist())}
    return res["M"][[where[u] for u in uids.tolist()]]


def _reference_kept(clustering: Clustering, e: np.ndarray) -> set:
    """Keep M_j <= float32(1 - eps)."""
    uids, m = _reference_m(clustering, e)
    return uid_set(uids[m <= np.float32(1 - EPS)])


@pytest.mark.parametrize("pairwise", ["auto", "fp32", "bf16-recheck"])
def test_decisions_equal_float32_at_the_threshold(planted_pool, tmp_path, caplog, pairwise):
    pool, x16 = planted_pool
    e = _as_float32(pool)
    # the planted pairs do sit within 1e-4 of the threshold, on both sides
    s = e @ e.T
    np.fill_diagonal(s, -1)
    near = s[np.triu_indices(len(s), 1)]
    near = near[np.abs(near - THRESHOLD) < 1e-4]
    assert (near > THRESHOLD).sum() >= 100 and (near <= THRESHOLD).sum() >= 100
    with caplog.at_level(logging.INFO, logger="conceptprune.filters.clustering"):
        r = run_filter(semdedup, pool, tmp_path / "sd.npy", embedding_key="l14_img", eps=EPS,
                       clustering=ClusteringConfig(clusters=CLUSTERS, niter=20), executor=Executor.create("inline"),
                       pairwise=pairwise)
    clustering = Clustering(tmp_path / "sd.clustering")
    expected = _reference_kept(clustering, e)
    assert 0 < len(expected) < len(x16)
    assert uid_set(r.uids) == expected
    # the test can tell: similarities of fp16-rounded normalised vectors (the former way) decide otherwise
    assert _reference_kept(clustering, e.astype(np.float16).astype(np.float32)) != expected
    # the training sample's rule and budget are stated
    assert any("--kmeans-memory 8 GiB" in m for m in caplog.messages)


def test_training_sample_grows_with_k():
    def size(k, candidates=10**9, dim=768, memory="8G", train_sample=None):
        spec = ClusteringConfig(clusters=k, train_sample=train_sample, kmeans_memory=memory).filled()
        return spec.resolved_sample(candidates, dim)

    assert size(100) == 100_000  # small k: as before, min(1000 k, 500k)
    assert size(100, candidates=30_000) == 30_000
    assert size(4000) == 500_000
    assert size(10_000) == 640_000  # 64 points a centroid once that exceeds 500k
    assert size(50_000) == 8 * 2**30 // (4 * 768)  # SemDeDup's k: capped by the memory budget
    assert size(50_000, memory="16G") == 3_200_000
    assert size(50_000, memory="16G") / 50_000 >= 39  # faiss's warning threshold
    assert size(4000, memory="512M") == 512 * 2**20 // (4 * 768)
    assert size(4000, train_sample=100_000) == 100_000  # explicit --train-sample wins
    with pytest.raises(ConfigError, match="kmeans-memory"):
        size(50_000, memory="64M")
    assert parse_bytes("1.5GiB") == 3 * 2**29 and parse_bytes("512m") == 2**29 and parse_bytes("4096") == 4096
    for bad in ("", "G", "-1G", "lots"):
        with pytest.raises(ConfigError, match="kmeans-memory"):
            parse_bytes(bad)


def test_target_size_equals_float32_at_the_threshold(planted_pool, tmp_path):
    """A target size whose cut falls among the planted pairs: the n smallest exact M_j. Run on
    the clustering of an eps run first (M exact only from its threshold there), so the target
    run recomputes M everywhere; an eps run after it reuses that."""
    from conceptprune.filters.base import target_count

    pool, x16 = planted_pool
    e = _as_float32(pool)
    cfg = ClusteringConfig(clusters=CLUSTERS, niter=20)
    # bfloat16 first (on any CPU): below its threshold the stored M is bfloat16's, not exact
    first = run_filter(semdedup, pool, tmp_path / "eps.npy", embedding_key="l14_img", eps=EPS, clustering=cfg,
                       executor=Executor.create("inline"), pairwise="bf16-recheck")
    clustering = Clustering(tmp_path / "eps.clustering")
    uids, m = _reference_m(clustering, e)
    stored = _stored_m(clustering, uids)
    assert (stored[m >= THRESHOLD] == m[m >= THRESHOLD]).all()
    assert (stored != m).any()  # below the threshold: bfloat16's values
    near = np.sort(m[np.abs(m.astype(np.float64) - THRESHOLD) < 1e-4])
    assert len(near) >= 200
    cut = float(near[len(near) // 2])  # half the planted pairs on each side
    fraction = float((m <= np.float32(cut)).sum() / len(m))
    n = target_count(fraction, len(m))
    order = np.argsort(m, kind="stable")
    assert m[order[n - 1]] < m[order[n]]  # no tie at the cut: the reference selection is unique
    again = {"clustering": ClusteringConfig(dir=tmp_path / "eps.clustering"), "executor": Executor.create("inline")}
    r = run_filter(semdedup, pool, tmp_path / "tf.npy", embedding_key="l14_img", target_fraction=fraction, **again)
    assert uid_set(r.uids) == uid_set(uids[order[:n]])
    assert (_stored_m(clustering, uids) == m).all()  # now exact everywhere (the eps run's were not all)
    assert r.stats["eps_used"] == pytest.approx(1 - float(m[order[n - 1]]), abs=1e-7)
    e2 = run_filter(semdedup, pool, tmp_path / "eps2.npy", embedding_key="l14_img", eps=EPS, **again)
    assert uid_set(e2.uids) == uid_set(first.uids) == _reference_kept(clustering, e)
