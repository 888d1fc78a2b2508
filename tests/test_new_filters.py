"""negCLIPLoss, NormSim, hierarchical k-means sampling and the score table, each against an
implementation written here from the papers / the authors' code (float64, plain loops)."""

import glob
import importlib
import logging
import os

import numpy as np
import pytest

from conceptprune.filters.negcliploss import negcliploss, negcliploss_scores
from conceptprune.filters.normsim import normsim, normsim_scores
from conceptprune.filters.scores import top_rows
from conceptprune.pool import Pool
from conceptprune.slurm.stage import Executor
from conceptprune.synthetic import SyntheticPoolConfig, make_pool

from conftest import read_pool_frame, uid_set

TAU = 0.01


@pytest.fixture(scope="module")
def pool3(tmp_path_factory):
    """3 files of unequal size (700 / 700 / 700 rows split unevenly by make_pool), 32-d l14 pair."""
    out = tmp_path_factory.mktemp("ncl_pool")
    make_pool(out, SyntheticPoolConfig(rows=2100, files=3, seed=3, concepts=8, block_rows=500,
                                       embedding_keys=("l14_img", "l14_txt"),
                                       dims={"l14_img": 32, "l14_txt": 32}), progress=False)
    return out


def _files(pool_dir):
    return sorted(glob.glob(os.path.join(pool_dir, "*.npz")))


def _lse(x, axis):
    m = x.max(axis=axis, keepdims=True)
    return np.squeeze(m + np.log(np.exp(x - m).sum(axis=axis, keepdims=True)), axis)


def reference_negcliploss(pool_dir, B, K, seed, tau=TAU, img="l14_img", txt="l14_txt"):
    """The issue's rule, literally: per file f (sorted names), per repetition k, permute by
    default_rng([seed, f, k]), batches of B, R = tau/2 (row LSE + column LSE), float64."""
    out = []
    for f, path in enumerate(_files(pool_dir)):
        z = np.load(path)
        F, G = z[img].astype(np.float32).astype(np.float64), z[txt].astype(np.float32).astype(np.float64)
        n = len(F)
        s = np.einsum("ij,ij->i", F, G)
        R = np.zeros(n)
        reps = 1 if B >= n else K
        for k in range(reps):
            perm = np.random.default_rng([seed, f, k]).permutation(n) if B < n else np.arange(n)
            for a in range(0, n, B):
                idx = perm[a:a + B]
                S = F[idx] @ G[idx].T / tau
                R[idx] += tau / 2 * (_lse(S, 1) + _lse(S, 0))
        out.append(s - R / reps)
    return np.concatenate(out)


def _same_top(ref_scores, kept_uids, all_uids, count, band=1e-4):
    """Our kept set equals the reference's top ``count`` except for rows within ``band`` of the cut."""
    order = np.argsort(-ref_scores, kind="stable")
    cut = ref_scores[order[count - 1]]
    ref = set(all_uids[order[:count]])
    ours = set(kept_uids)
    assert len(ours) == count
    differ = ref ^ ours
    pos = {u: i for i, u in enumerate(all_uids)}
    for u in differ:
        assert abs(ref_scores[pos[u]] - cut) <= band, (u, ref_scores[pos[u]], cut)


@pytest.mark.parametrize("B,K", [(5000, 3), (128, 3)])  # B >= n_f (one batch a file); B < n_f (random batches)
def test_negcliploss_matches_reference(pool3, B, K, monkeypatch):
    df = read_pool_frame(pool3)
    ref = reference_negcliploss(pool3, B, K, seed=5)
    for workers in (1, 2, 3):  # file-range parts: the same scores for any part count
        scores, cand = negcliploss_scores(Pool(pool3), batch_size=B, repetitions=K, seed=5, backend="numpy",
                                          executor=Executor.create("inline", workers=workers))
        assert cand is None
        np.testing.assert_allclose(scores, ref, atol=2e-6, rtol=0)
        if workers == 1:
            first = scores
        else:
            assert np.array_equal(scores, first)
    # a file too large to hold is gathered a batch at a time from the npz: the same scores
    monkeypatch.setattr(importlib.import_module("conceptprune.filters.negcliploss"), "FILE_CACHE_BYTES", 0)
    scores, _ = negcliploss_scores(Pool(pool3), batch_size=B, repetitions=K, seed=5, backend="numpy",
                                   executor=Executor.create("inline", workers=2))
    assert np.array_equal(scores, first)
    r = negcliploss(Pool(pool3), fraction=0.3, batch_size=B, repetitions=K, seed=5, backend="numpy",
                    executor=Executor.create("inline", workers=2))
    n = int(len(df) * 0.3)  # exactly int(N * F)
    _same_top(ref, uid_set(r.uids), df.uid.to_numpy(), n)


def test_negcliploss_seed_changes_batches_not_one_batch(pool3):
    a, _ = negcliploss_scores(Pool(pool3), batch_size=128, repetitions=2, seed=1, backend="numpy", executor=Executor.create("inline"))
    b, _ = negcliploss_scores(Pool(pool3), batch_size=128, repetitions=2, seed=2, backend="numpy", executor=Executor.create("inline"))
    assert not np.array_equal(a, b)
    a, _ = negcliploss_scores(Pool(pool3), batch_size=10_000, repetitions=2, seed=1, backend="numpy",
                              executor=Executor.create("inline"))
    b, _ = negcliploss_scores(Pool(pool3), batch_size=10_000, repetitions=5, seed=2, backend="numpy",
                              executor=Executor.create("inline"))
    assert np.array_equal(a, b)  # one batch a file: no randomness, repetitions are one


def test_negcliploss_stable_lse_with_large_norms():
    # rows not renormalised: norms of 5 make S/tau reach 500, where a plain exp overflows;
    # the batch kernel must still give the max-shifted LSE
    from conceptprune.filters.negcliploss import batch_terms

    rng = np.random.default_rng(0)
    F = rng.standard_normal((700, 16)).astype(np.float32)
    F /= np.linalg.norm(F, axis=1, keepdims=True)
    G = (F + rng.standard_normal(F.shape).astype(np.float32))
    G /= np.linalg.norm(G, axis=1, keepdims=True)
    F[:50] *= 5
    s, lse = batch_terms(F, G, TAU)
    S = F.astype(np.float64) @ G.astype(np.float64).T / TAU
    np.testing.assert_allclose(lse, _lse(S, 1) + _lse(S, 0), rtol=1e-6)
    np.testing.assert_allclose(s, np.diag(S) * TAU, atol=1e-5)


def test_negcliploss_ties_and_threshold():
    scores = np.array([0.5, 0.2, 0.5, 0.5, 0.1, 0.5], np.float32)
    keep = top_rows(scores, None, 3)
    assert keep.tolist() == [True, False, True, True, False, False]  # ties: the earlier rows
    cand = np.array([False, True, True, True, True, True])
    assert top_rows(scores, cand, 2).tolist() == [False, False, True, True, False, False]


def test_universal_captions_kept_by_clip_score_dropped_by_negcliploss(tmp_path):
    """A planted pool: 'universal' captions whose text embedding is close to every image (a
    high CLIP score with its own image, and with all others) rank at the top by CLIP score and
    at the bottom by negCLIPLoss."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    make_pool(tmp_path, SyntheticPoolConfig(rows=1200, files=2, seed=1, embedding_keys=()), progress=False)
    rng = np.random.default_rng(0)
    d = 256
    w = np.zeros(d, np.float32)
    w[0] = 1.0  # the direction a universal caption ("a photo") points to

    def unit_perp(x, *to):  # rows of x made orthogonal to w and to the rows of `to`, unit length
        x = x.copy()
        x[:, 0] = 0
        for t in to:
            x -= np.einsum("ij,ij->i", x, t)[:, None] * t
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    universal = {}
    for path in sorted(glob.glob(str(tmp_path / "*.parquet"))):
        t = pq.read_table(path)
        n = t.num_rows
        uni = rng.random(n) < 0.05
        # an image's share of the universal direction: small for most, large for the few
        # stock-like images that got a universal caption
        a = np.where(uni, rng.uniform(0.5, 0.6, n), rng.uniform(0.15, 0.3, n)).astype(np.float32)
        F = a[:, None] * w + np.sqrt(1 - a ** 2)[:, None] * unit_perp(rng.standard_normal((n, d)).astype(np.float32))
        U = rng.standard_normal((n, d)).astype(np.float32)
        U -= np.einsum("ij,ij->i", U, F)[:, None] * F
        U /= np.linalg.norm(U, axis=1, keepdims=True)
        G = 0.4 * F + np.sqrt(1 - 0.4 ** 2) * U  # an ordinary caption: CLIP score 0.4, specific to its image
        G[uni] = w  # a universal caption: CLIP score 0.5-0.6 with its image, and high with every image
        s = np.einsum("ij,ij->i", F, G).astype(np.float32)
        np.savez(path.replace(".parquet", ".npz"), l14_img=F.astype(np.float16), l14_txt=G.astype(np.float16))
        t = t.set_column(t.schema.get_field_index("clip_l14_similarity_score"), "clip_l14_similarity_score",
                         pa.array(s))
        pq.write_table(t, path)
        for u, flag in zip(t.column("uid").to_pylist(), uni):
            universal[u] = bool(flag)
    uni_set = {u for u, f in universal.items() if f}
    assert all(np.load(p)["l14_img"].shape[1] == d for p in glob.glob(str(tmp_path / "*.npz")))
    df = read_pool_frame(tmp_path)  # DataComp's CLIP-score rule: score >= the value at index int(0.2 N)
    thr = -np.sort(-df.clip_l14_similarity_score.to_numpy())[int(0.2 * len(df))]
    by_clip = set(df.uid[df.clip_l14_similarity_score >= thr])
    by_ncl = uid_set(negcliploss(Pool(tmp_path), fraction=0.2, batch_size=256, repetitions=2,
                                 backend="numpy", executor=Executor.create("inline")).uids)
    assert len(uni_set & by_clip) / len(uni_set) > 0.9  # CLIP score keeps them
    assert len(uni_set & by_ncl) == 0  # negCLIPLoss drops every one


# -- NormSim ----------------------------------------------------------------------------------

def reference_normsim(pool_dir, target, p):
    F = np.concatenate([np.load(f)["l14_img"].astype(np.float64) for f in _files(pool_dir)])
    S = np.abs(F @ target.astype(np.float64).T)
    return S.max(axis=1) if p == "inf" else np.sqrt((S ** 2).sum(axis=1))


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    rng = np.random.default_rng(4)
    t = rng.standard_normal((300, 32)).astype(np.float32)
    t /= np.linalg.norm(t, axis=1, keepdims=True)
    path = tmp_path_factory.mktemp("target") / "target_train.npy"
    np.save(path, t)
    return path


@pytest.mark.parametrize("p", ["inf", "2"])
def test_normsim_matches_reference(pool3, target, p, monkeypatch):
    ns = importlib.import_module("conceptprune.filters.normsim")  # the module, not the function it exports

    monkeypatch.setattr(ns, "TARGET_BLOCK", 128)  # several target blocks, and a ragged last one
    monkeypatch.setattr(ns, "CHUNK", 500)
    ref = reference_normsim(pool3, np.load(target), p)
    for workers in (1, 3):
        scores, _ = normsim_scores(Pool(pool3), target, norm=p, executor=Executor.create("inline", workers=workers))
        np.testing.assert_allclose(scores, ref, rtol=1e-5)
    df = read_pool_frame(pool3)
    r = normsim(Pool(pool3), target=target, norm=p, keep_count=333, executor=Executor.create("inline"))
    _same_top(ref, uid_set(r.uids), df.uid.to_numpy(), 333, band=1e-5)


def test_normsim_warns_on_test_split(pool3, target, tmp_path, caplog):
    bad = tmp_path / "imagenet_test.npy"
    bad.write_bytes(target.read_bytes())
    with caplog.at_level(logging.WARNING):
        r = normsim(Pool(pool3), target=bad, keep_count=10, executor=Executor.create("inline"))
    assert "test" in caplog.text and r.stats["warnings"]
    from conceptprune.errors import ConfigError

    np.save(tmp_path / "wrongdim.npy", np.ones((3, 7), np.float32))
    with pytest.raises(ConfigError, match="7-d"):
        normsim(Pool(pool3), target=tmp_path / "wrongdim.npy", keep_count=10, executor=Executor.create("inline"))


def test_paper_recipe_is_sequential(pool3, target, tmp_path):
    """top int(0.3 N) by negCLIPLoss, then of those the top int(0.2 N) by NormSim-inf (N the
    whole pool), through keep-list files and --within as the CLI chains them."""
    from conceptprune import keeplist as K
    from conceptprune.filters import run_filter

    df = read_pool_frame(pool3)
    N = len(df)
    uids = df.uid.to_numpy()
    ncl = reference_negcliploss(pool3, 256, 2, seed=0)
    ns = reference_normsim(pool3, np.load(target), "inf")
    first = run_filter(negcliploss, Pool(pool3), tmp_path / "ncl.npy", fraction=0.3, batch_size=256, repetitions=2,
                       backend="numpy", executor=Executor.create("local", workers=2))
    assert len(first.uids) == int(0.3 * N)
    _same_top(ncl, uid_set(first.uids), uids, int(0.3 * N))
    second = run_filter(normsim, Pool(pool3), tmp_path / "final.npy", within=tmp_path / "ncl.npy",
                        target=target, norm="inf", keep_count=int(0.2 * N), executor=Executor.create("inline"))
    assert len(K.read_keep_list(tmp_path / "final.npy")) == int(0.2 * N)
    stage1 = np.isin(uids, list(uid_set(first.uids)))
    masked = np.where(stage1, ns, -np.inf)
    _same_top(masked, uid_set(second.uids), uids, int(0.2 * N), band=1e-5)
    # not the intersection of two independent top lists
    inter = set(uids[np.argsort(-ncl)[: int(0.3 * N)]]) & set(uids[np.argsort(-ns)[: int(0.2 * N)]])
    assert len(inter) < int(0.2 * N)


# -- hierarchical k-means, balanced sampling ----------------------------------------------------

def _cut(sizes, q):
    """The largest integer t with sum(min(t, n)) <= q, by a plain scan."""
    t = 0
    while t < max(sizes) and sum(min(t + 1, n) for n in sizes) <= q:
        t += 1
    return t


def _split(sizes, q, rng):
    """The authors' find_subcluster_target_size with the documented seeded choice."""
    sizes = [int(n) for n in sizes]
    if sum(sizes) <= q:
        return sizes
    t = _cut(sizes, q)
    out = [min(t, n) for n in sizes]
    big = [i for i, n in enumerate(sizes) if n > t]
    for i in rng.choice(np.array(big), q - sum(out), replace=False):
        out[int(i)] += 1
    return out


def test_water_fill_against_a_scan():
    from conceptprune.filters.hkmeans import water_fill

    rng = np.random.default_rng(0)
    for _ in range(200):
        sizes = rng.integers(0, 30, rng.integers(1, 12))
        q = int(rng.integers(0, sizes.sum() + 5))
        got = water_fill(sizes, q, np.random.default_rng([1, 2, 3]))
        assert got.tolist() == _split(sizes, q, np.random.default_rng([1, 2, 3]))
        assert got.sum() == min(q, sizes.sum()) and (got <= sizes).all()


@pytest.fixture(scope="module")
def hk_runs(pool3, tmp_path_factory):
    from conceptprune.filters import ClusteringConfig
    from conceptprune.filters.hkmeans import hkmeans

    tmp = tmp_path_factory.mktemp("hk")
    runs = {}
    for workers in (1, 2):
        cfg = ClusteringConfig(dir=tmp / f"clustering{workers}", seed=3, niter=10, gpu="no")
        r = hkmeans(Pool(pool3, embedding_key="l14_img"), keep_count=500, levels=(24, 5), resampling_steps=(3, 2),
                    sample_sizes=(5, 2), leaf="closest", clusters_out=tmp / f"clusters{workers}.parquet",
                    clustering=cfg, executor=Executor.create("inline", workers=workers))
        runs[workers] = (r, tmp / f"clusters{workers}.parquet")
    return runs


def test_hkmeans_exact_size_and_same_for_any_worker_count(hk_runs):
    (r1, c1), (r2, c2) = hk_runs[1], hk_runs[2]
    assert len(r1.uids) == 500
    assert uid_set(r1.uids) == uid_set(r2.uids)
    import pandas as pd

    assert pd.read_parquet(c1).equals(pd.read_parquet(c2))


def test_hkmeans_counts_are_the_water_filling_split(hk_runs, pool3):
    import pandas as pd

    r, clusters = hk_runs[1]
    df = pd.read_parquet(clusters)
    assert len(df) == 2100 and set(df.columns) == {"uid", "level1", "level2", "distance"}
    size1 = df.groupby("level1").size()
    parent = df.groupby("level1").level2.first()
    assert (df.groupby("level1").level2.nunique() == 1).all()  # a tree
    size2 = df.groupby("level2").size()
    seed, L = 3, 2
    top = sorted(size2.index)
    q2 = dict(zip(top, _split([size2[c] for c in top], 500, np.random.default_rng([seed, L + 1, 0]))))
    expected = {}
    for c in top:
        kids = sorted(parent.index[parent == c])
        for k, q in zip(kids, _split([size1[k] for k in kids], q2[c], np.random.default_rng([seed, 2, int(c)]))):
            expected[k] = q
    kept = df[df.uid.isin(uid_set(r.uids))]
    got = kept.groupby("level1").size().reindex(sorted(expected), fill_value=0)
    assert got.to_dict() == expected
    assert sum(expected.values()) == 500
    # --leaf closest: inside a cluster the kept members are its nearest
    df["kept"] = df.uid.isin(uid_set(r.uids))
    df["row"] = np.arange(len(df))
    cut = 0
    for c, g in df.groupby("level1"):
        g = g.sort_values(["distance", "row"])
        assert g.kept.tolist() == [True] * expected[c] + [False] * (len(g) - expected[c])
        cut += expected[c] < len(g)
    assert cut >= 3


def test_hkmeans_keep_count_above_pool_keeps_all(pool3, tmp_path):
    from conceptprune.filters import ClusteringConfig
    from conceptprune.filters.hkmeans import hkmeans

    r = hkmeans(Pool(pool3, embedding_key="l14_img"), keep_count=10**6, levels=(6,), resampling_steps=(1,),
                sample_sizes=(1,), clustering=ClusteringConfig(dir=tmp_path / "c", seed=1, niter=5, gpu="no"),
                executor=Executor.create("inline"))
    assert len(r.uids) == 2100


# -- the command line and the score table ---------------------------------------------------------

def test_cli_recipe_hkmeans_and_score_table(pool3, target, tmp_path, capsys):
    from conceptprune import keeplist as K
    from conceptprune.cli import main

    df = read_pool_frame(pool3)
    N = len(df)
    common = ["--executor", "inline"]
    assert main(["--quiet", "filter", "negcliploss", "--pool", str(pool3), "--out", str(tmp_path / "ncl.npy"),
                 "--fraction", "0.3", "--batch-size", "256", "--repetitions", "2", "--backend", "numpy", *common]) == 0
    assert main(["--quiet", "filter", "normsim", "--pool", str(pool3), "--out", str(tmp_path / "final.npy"),
                 "--within", str(tmp_path / "ncl.npy"), "--target", str(target), "--keep-count", str(int(0.2 * N)),
                 *common]) == 0
    final = K.read_keep_list(tmp_path / "final.npy")
    assert len(final) == int(0.2 * N)
    assert K.read_manifest(tmp_path / "final.npy")["counts"] == {"pool": N, "candidates": int(0.3 * N),
                                                                 "out": int(0.2 * N)}
    assert main(["--quiet", "filter", "hkmeans", "--pool", str(pool3), "--out", str(tmp_path / "hk.npy"),
                 "--keep-count", "300", "--levels", "12,3", "--resampling-steps", "2,2", "--sample-sizes", "4,2",
                 "--niter", "5", "--clusters-out", str(tmp_path / "hk.parquet"), *common]) == 0
    assert len(K.read_keep_list(tmp_path / "hk.npy")) == 300
    with pytest.raises(SystemExit):  # one of --fraction, --keep-count, --threshold
        main(["filter", "negcliploss", "--pool", str(pool3), "--out", str(tmp_path / "x.npy"),
              "--fraction", "0.3", "--keep-count", "5"])

    table = tmp_path / "scores.parquet"
    assert main(["--quiet", "scores", "--pool", str(pool3), "--out", str(table), "--target", str(target),
                 "--clusters", "6", "--batch-size", "256", "--repetitions", "2", *common]) == 0
    import pandas as pd

    t = pd.read_parquet(table)
    assert t.uid.tolist() == df.uid.tolist()
    np.testing.assert_array_equal(t.clip_l14.to_numpy(), df.clip_l14_similarity_score.to_numpy())
    np.testing.assert_allclose(t.negcliploss, reference_negcliploss(pool3, 256, 2, seed=0), atol=2e-6)
    np.testing.assert_allclose(t.normsim_inf, reference_normsim(pool3, np.load(target), "inf"), rtol=1e-5)
    for c in ("ssl_distance", "dbp_complexity", "dbp_rank", "semdedup_m"):
        assert t[c].notna().all(), c
    # dbp_rank: 0 is each cluster's furthest member
    far = t.loc[t.groupby("cluster").ssl_distance.idxmax()]
    assert (far.dbp_rank == 0).all()
    capsys.readouterr()
    assert main(["scores", "correlate", str(table), "--fraction", "0.25"]) == 0
    text = capsys.readouterr().out
    assert "Spearman" in text and "negcliploss" in text and (tmp_path / "scores.correlate.png").stat().st_size > 0
    from conceptprune.filters.scores_table import correlate

    r = correlate(table, fraction=0.25)
    sp, ov = r["spearman"].to_numpy(), r["overlap"].to_numpy()
    assert np.allclose(np.diag(sp), 1) and np.allclose(sp, sp.T) and np.allclose(np.diag(ov), 1)
    from scipy.stats import spearmanr

    assert sp[list(r["spearman"].index).index("clip_l14"), list(r["spearman"].index).index("negcliploss")] == \
        pytest.approx(spearmanr(t.clip_l14, t.negcliploss).statistic, abs=1e-9)


@pytest.mark.parametrize("method", ["random", "clip-score", "ssl-prototypes", "dbp"])
def test_keep_count_on_the_fraction_filters(pool3, tmp_path, method):
    """--keep-count N beside --fraction: exactly N kept (clip-score: the N-th largest score is the
    threshold, ties kept, so at least N)."""
    from conceptprune import keeplist as K
    from conceptprune.cli import main

    extra = ["--clusters", "5", "--niter", "5"] if method in ("ssl-prototypes", "dbp") else []
    out = tmp_path / "k.npy"
    assert main(["--quiet", "filter", method, "--pool", str(pool3), "--out", str(out), "--keep-count", "777",
                 "--executor", "inline", *extra]) == 0
    kept = K.read_keep_list(out)
    if method == "clip-score":
        df = read_pool_frame(pool3)
        thr = -np.sort(-df.clip_l14_similarity_score.to_numpy())[776]
        assert uid_set(kept) == set(df.uid[df.clip_l14_similarity_score >= thr])
    else:
        assert len(kept) == 777
    assert K.read_manifest(out)["params"]["keep_count"] == 777


def test_negcliploss_cuda_matches_numpy():
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    from conceptprune.filters.negcliploss import batch_terms, batch_terms_torch

    rng = np.random.default_rng(1)
    F = rng.standard_normal((5000, 768)).astype(np.float32)
    F /= np.linalg.norm(F, axis=1, keepdims=True)
    G = F + rng.standard_normal(F.shape).astype(np.float32)
    G /= np.linalg.norm(G, axis=1, keepdims=True)
    s_np, l_np = batch_terms(F, G, TAU)
    s_cu, l_cu = batch_terms_torch(F, G, TAU, tile=1024)
    np.testing.assert_allclose(s_cu, s_np, atol=1e-5)
    np.testing.assert_allclose(TAU / 2 * l_cu, TAU / 2 * l_np, atol=1e-5)  # on the score's scale


@pytest.mark.parametrize("bench,args", [
    ("bench/bench_negcliploss.py", ["--rows", "3000", "--batch-size", "512", "--repetitions", "2"]),
    ("bench/bench_normsim.py", ["--rows", "3000", "--target-rows", "500"])])
def test_benches_run_at_toy_size(tmp_path, bench, args):
    """The benches cannot rot: each runs end to end (ours through the CLI, then its floor)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "r.json"
    r = subprocess.run([sys.executable, bench, *args, "--workdir", str(tmp_path / "w"), "--out", str(out)],
                       cwd=root, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    row = json.loads(out.read_text())["results"][0]
    assert row["ratio_ours_over_floor"] > 0 and row["ours_peak_rss_mib"] > 0 and row["tmac"] > 0
