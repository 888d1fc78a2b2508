"""SemDeDup decides exactly as float32 does, and the k-means training sample grows with k.

The pool stores fp16 embeddings (as DataComp's npz do). The reference here is an
independent float32 computation: the stored values cast to float32, divided by their
norms, the full S = E E^T per cluster in float32, M_j = max_{i<j} S_ij. Pairs are planted
with similarities within 1e-4 of the threshold on both sides of it."""

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
from conceptprune.synthetic import SyntheticPoolConfig, make_pool

from conftest import uid_set

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


def _as_float32(x16: np.ndarray) -> np.ndarray:
    x = x16.astype(np.float32)
    return x / np.sqrt((x * x).sum(axis=1, dtype=np.float32))[:, None]


def _reference_kept(clustering: Clustering, e: np.ndarray) -> set:
    """Independent: per cluster, order by distance descending (ties: smaller uid), full S in
    float32, M_j over the strict upper triangle, keep M_j <= float32(1 - eps)."""
    blocks = list(clustering.iter_assignment())
    uids = np.concatenate([b[1] for b in blocks])
    cluster = np.concatenate([b[2] for b in blocks])
    dist = np.concatenate([b[3] for b in blocks])
    hi, lo = U.split(uids)
    kept = []
    for c in range(clustering.k):
        rows = np.flatnonzero(cluster == c)
        rows = rows[np.lexsort((lo[rows], hi[rows], -dist[rows]))]
        s = e[rows] @ e[rows].T
        m = np.array([s[:j, j].max() if j else -np.inf for j in range(len(rows))], dtype=np.float32)
        kept.append(uids[rows[m <= np.float32(1 - EPS)]])
    return uid_set(np.concatenate(kept))


def test_decisions_equal_float32_at_the_threshold(planted_pool, tmp_path, caplog):
    pool, x16 = planted_pool
    e = _as_float32(x16)
    # the planted pairs do sit within 1e-4 of the threshold, on both sides
    s = e @ e.T
    np.fill_diagonal(s, -1)
    near = s[np.triu_indices(len(s), 1)]
    near = near[np.abs(near - THRESHOLD) < 1e-4]
    assert (near > THRESHOLD).sum() >= 100 and (near <= THRESHOLD).sum() >= 100
    with caplog.at_level(logging.INFO, logger="conceptprune.filters.clustering"):
        r = run_filter(semdedup, pool, tmp_path / "sd.npy", embedding_key="l14_img", eps=EPS,
                       clustering=ClusteringConfig(clusters=CLUSTERS, niter=20), executor="debug")
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
