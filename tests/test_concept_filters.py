"""SemDeDup, SSL prototypes and DBP: kernels against independent computations, planted
structure, determinism across workers, resume after interruption, bad input."""

import itertools
import json

import numpy as np
import pandas as pd
import pytest

from conceptprune import keeplist as K
from conceptprune import uids as U
from conceptprune.errors import ConfigError, KeepListError, PoolError
from conceptprune.filters import dbp, run_filter, semdedup, ssl_prototypes
from conceptprune.filters.budget import allocate, objective
from conceptprune.filters.clustering import Clustering
from conceptprune.filters.clustering_config import ClusteringConfig
from conceptprune.filters.select import grouped_select
from conceptprune.filters.semdedup import column_max_upper, components_keep, greedy_keep
from conceptprune.slurm.stage import Executor
from conceptprune.synthetic import SyntheticPoolConfig, make_pool

from conftest import read_embeddings, read_planted, read_pool_frame, uid_set



# -- budget allocation ------------------------------------------------------------------


def _brute_force(p, total, sizes, lower):
    best, best_val = None, np.inf
    for combo in itertools.product(*[range(lo, n + 1) for lo, n in zip(lower, sizes)]):
        if sum(combo) == total:
            val = objective(np.array(combo), p, total)
            if val < best_val - 1e-9:
                best, best_val = np.array(combo), val
    return best, best_val


def test_allocation_matches_brute_force_on_small_cases():
    rng = np.random.default_rng(0)
    for _ in range(150):
        k = int(rng.integers(2, 5))
        sizes = rng.integers(0, 7, k)
        if sizes.sum() == 0:
            continue
        total = int(rng.integers(1, sizes.sum() + 1))
        p = rng.dirichlet(np.ones(k) * rng.choice([0.2, 1, 5]))
        r = float(rng.choice([0, 0.3, 1.0]))
        lower = np.minimum(np.floor(r * total / k), sizes).astype(int)
        got = allocate(p, total, sizes, lower)
        assert got.sum() == total and (got >= lower).all() and (got <= sizes).all()
        _, best_val = _brute_force(p, total, sizes, lower)
        assert objective(got, p, total) == pytest.approx(best_val, abs=1e-9)


def test_allocation_against_qp_solver():
    from scipy.optimize import minimize

    rng = np.random.default_rng(1)
    for _ in range(20):
        k = 12
        sizes = rng.integers(5, 400, k)
        total = int(0.3 * sizes.sum())
        p = rng.dirichlet(np.ones(k))
        res = minimize(lambda x: ((x - p * total) ** 2).sum(), x0=sizes * total / sizes.sum(),
                       jac=lambda x: 2 * (x - p * total), bounds=list(zip(np.zeros(k), sizes)),
                       constraints=[{"type": "eq", "fun": lambda x: x.sum() - total}], method="SLSQP",
                       options={"ftol": 1e-12, "maxiter": 500})
        got = allocate(p, total, sizes)
        assert got.sum() == total and (got <= sizes).all() and (got >= 0).all()
        # integer rounding costs less than a quarter per cluster over the continuous optimum
        assert res.fun - 1e-6 <= objective(got, p, total) <= res.fun + k / 4 + 1e-6
        assert np.abs(got - res.x).max() < 1.0 + 1e-4


def test_allocation_rejects_infeasible():
    with pytest.raises(ConfigError):
        allocate(np.array([0.5, 0.5]), 10, np.array([3, 3]))
    with pytest.raises(ConfigError):
        allocate(np.array([0.5, 0.5]), 4, np.array([3, 3]), lower=np.array([3, 3]))


# -- exact grouped selection --------------------------------------------------------------


@pytest.mark.parametrize("order", ["largest", "smallest", "hash"])
def test_grouped_select_matches_sorting(order):
    rng = np.random.default_rng(2)
    n, groups = 5000, 7
    uids = U.make_array(rng.integers(0, 2**64, n, dtype=np.uint64), rng.integers(0, 2**64, n, dtype=np.uint64))
    g = rng.integers(0, groups, n)
    if order == "hash":
        key = rng.integers(0, 50, n).astype(np.uint64) << np.uint64(58)  # heavy ties
    else:
        key = rng.choice(np.array([-np.inf, -1, 0.1, 0.1000001, 0.25, 0.5, 2], np.float32), n)
    sizes = np.bincount(g, minlength=groups)
    budgets = (sizes * rng.uniform(0, 1, groups)).astype(int)
    budgets[0], budgets[1] = 0, sizes[1]

    def batches():
        for part in np.array_split(np.arange(n), 9):
            yield g[part], key[part], uids[part]

    kept, counts = grouped_select(batches, budgets, order)
    assert (counts == budgets).all()
    expected = set()
    for grp in range(groups):
        idx = np.flatnonzero(g == grp)
        k = key[idx] if order != "largest" else -key[idx]
        hi, lo = U.split(uids[idx])
        rank = np.lexsort((lo, hi, k.astype(np.float64) if order != "hash" else k))
        expected |= set(map(tuple, uids[idx[rank[: budgets[grp]]]].tolist()))
    assert set(map(tuple, kept.to_array().tolist())) == expected


# -- pairwise kernels -----------------------------------------------------------------------


def _clustered_vectors(n=700, d=32, seed=0):
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((n // 3, d))
    x = np.concatenate([base, base[: n // 3] + 0.01 * rng.standard_normal((n // 3, d)),
                        rng.standard_normal((n - 2 * (n // 3), d))])
    x = x[rng.permutation(n)]
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)


def test_column_max_matches_dense():
    e = _clustered_vectors()
    s = e.astype(np.float32) @ e.astype(np.float32).T
    s[np.tril_indices(len(e))] = -np.inf  # keep i < j only
    np.testing.assert_allclose(column_max_upper(e, block=64), s.max(axis=0), rtol=0, atol=1e-6)


def test_greedy_and_components_match_naive():
    e = _clustered_vectors(n=300)
    s = e.astype(np.float32) @ e.astype(np.float32).T
    thr = 0.95
    keep = np.zeros(len(e), bool)
    for j in range(len(e)):
        keep[j] = not (s[np.flatnonzero(keep[:j]), j] > thr).any()
    np.testing.assert_array_equal(greedy_keep(e, thr, block=32), keep)
    from scipy.sparse.csgraph import connected_components
    adj = np.triu(s > thr, 1)
    _, lab = connected_components(adj, directed=False)
    first = np.zeros(len(e), bool)
    first[np.unique(lab, return_index=True)[1]] = True
    np.testing.assert_array_equal(components_keep(e, thr, block=32), first)
    # the paper's rule removes at least as much as greedy, components at least as much as paper
    m = column_max_upper(e, block=32)
    paper = m <= thr
    assert components_keep(e, thr).sum() <= paper.sum() <= greedy_keep(e, thr).sum()


# -- filters on planted pools ------------------------------------------------------------


@pytest.fixture(scope="module")
def concept_pool(tmp_path_factory):
    out = tmp_path_factory.mktemp("concepts")
    make_pool(out, SyntheticPoolConfig(rows=8000, files=2, seed=11, concepts=8, families=4, duplicate_fraction=0.05,
                                       embedding_keys=("l14_img",), block_rows=2000, spread=(0.3, 2.0)),
              progress=False)
    return out


def test_semdedup_finds_planted_duplicates(concept_pool, tmp_path):
    r = run_filter(semdedup, concept_pool, tmp_path / "sd.npy", embedding_key="l14_img", eps=0.01,
                   clustering=ClusteringConfig(clusters=8, niter=20), executor=Executor.create("inline"))
    kept = uid_set(r.uids)
    df, truth = read_pool_frame(concept_pool), read_planted(concept_pool)
    cl = np.concatenate([b[2] for b in Clustering(tmp_path / "sd.clustering").iter_assignment()])
    dup = truth.dup_of.to_numpy()
    group = np.where(dup >= 0, dup, np.arange(len(df)))  # original's row = group id
    n_groups_checked = 0
    for gid in np.unique(group[dup >= 0]):
        members = np.flatnonzero(group == gid)
        if len(set(cl[members])) > 1:  # split across clusters: SemDeDup cannot see it
            continue
        n_groups_checked += 1
        assert sum(df.uid[i] in kept for i in members) == 1, f"group {gid}"
    assert n_groups_checked >= 0.97 * len(np.unique(group[dup >= 0]))
    singles = np.setdiff1d(np.arange(len(df)), np.flatnonzero(np.bincount(group, minlength=len(df))[group] > 1))
    assert all(df.uid[i] in kept for i in singles)  # no false positives
    m = json.loads((tmp_path / "sd.json").read_text())
    assert m["stats"]["kept_fraction_at_paper_eps"]["0.00095"] <= 1.0


def test_semdedup_target_fraction_reads_off_stored_similarities(concept_pool, tmp_path):
    run_filter(semdedup, concept_pool, tmp_path / "a.npy", embedding_key="l14_img", eps=0.01,
               clustering=ClusteringConfig(clusters=8, niter=20), executor=Executor.create("inline"))
    b = run_filter(semdedup, concept_pool, tmp_path / "b.npy", embedding_key="l14_img", target_fraction=0.7,
                   executor=Executor.create("inline"), clustering=ClusteringConfig(dir=tmp_path / "a.clustering"))
    assert len(b.uids) == round(0.7 * 8000)
    # the eps it reports reproduces the selection (up to ties at the cut)
    c = run_filter(semdedup, concept_pool, tmp_path / "c.npy", embedding_key="l14_img", eps=b.stats["eps_used"],
                   executor=Executor.create("inline"), clustering=ClusteringConfig(dir=tmp_path / "a.clustering"))
    assert abs(len(c.uids) - len(b.uids)) <= 2 and uid_set(b.uids) <= uid_set(c.uids)


def test_dbp_keeps_more_of_complex_clusters_and_hardest_members(concept_pool, tmp_path):
    r = run_filter(dbp, concept_pool, tmp_path / "dbp.npy", embedding_key="l14_img", fraction=0.3,
                   neighbors=3, clustering=ClusteringConfig(clusters=8, niter=20), executor=Executor.create("inline"))
    assert len(r.uids) == round(0.3 * 8000)
    t = pd.read_parquet(tmp_path / "dbp.clusters.parquet")
    assert list(t.columns[:7]) == ["cluster", "size", "d_intra", "d_inter", "complexity", "P", "kept"]
    assert t.kept.sum() == len(r.uids) and (t.kept <= t["size"]).all()
    frac = t.kept / t["size"]
    assert t.complexity.corr(frac, method="spearman") > 0.7
    top, bottom = t.nlargest(3, "complexity"), t.nsmallest(3, "complexity")
    assert (top.kept / top["size"]).mean() > 2 * (bottom.kept / bottom["size"]).mean()
    # inside each cluster: kept = the furthest from the centroid
    c = Clustering(tmp_path / "dbp.clustering")
    uids = np.concatenate([b[1] for b in c.iter_assignment()])
    cl = np.concatenate([b[2] for b in c.iter_assignment()])
    dist = np.concatenate([b[3] for b in c.iter_assignment()])
    is_kept = K.member(r.uids, uids)[0]
    for j in range(c.k):
        m = cl == j
        if is_kept[m].any() and (~is_kept[m]).any():
            assert dist[m & is_kept].min() >= dist[m & ~is_kept].max()
    assert (tmp_path / "dbp.clusters.png").stat().st_size > 10_000
    manifest = json.loads((tmp_path / "dbp.json").read_text())
    assert manifest["params"]["temperature"] == 0.1 and manifest["params"]["clusters"] == 8


def test_dbp_easy_and_random_and_balance(concept_pool, tmp_path):
    clus = tmp_path / "c"
    hard = run_filter(dbp, concept_pool, tmp_path / "h.npy", embedding_key="l14_img", fraction=0.2,
                      clustering=ClusteringConfig(clusters=8, dir=clus, niter=20), executor=Executor.create("inline"))
    easy = run_filter(dbp, concept_pool, tmp_path / "e.npy", embedding_key="l14_img", fraction=0.2, keep="easy",
                      executor=Executor.create("inline"), clustering=ClusteringConfig(dir=clus))
    rnd = run_filter(dbp, concept_pool, tmp_path / "r.npy", embedding_key="l14_img", fraction=0.2, keep="random",
                     executor=Executor.create("inline"), clustering=ClusteringConfig(dir=clus))
    assert len(hard.uids) == len(easy.uids) == len(rnd.uids) == 1600
    t_h = pd.read_parquet(tmp_path / "h.clusters.parquet")
    # opposite ends of each cluster: they meet only where the budget is over half the cluster
    overlap = len(uid_set(hard.uids) & uid_set(easy.uids))
    assert overlap == int(np.maximum(0, 2 * t_h.kept - t_h["size"]).sum())
    t_r = pd.read_parquet(tmp_path / "r.clusters.parquet")
    assert (t_h.kept == t_r.kept).all()  # same budgets, other members
    bal = run_filter(dbp, concept_pool, tmp_path / "b.npy", embedding_key="l14_img", fraction=0.2, balance=1.0,
                     executor=Executor.create("inline"), clustering=ClusteringConfig(dir=clus))
    t_b = pd.read_parquet(tmp_path / "b.clusters.parquet")
    floor = np.minimum(1600 // 8, t_b["size"])
    assert (t_b.kept >= floor).all() and t_b.kept.sum() == 1600


def test_ssl_prototypes(concept_pool, tmp_path):
    r = run_filter(ssl_prototypes, concept_pool, tmp_path / "s.npy", embedding_key="l14_img", fraction=0.25,
                   clustering=ClusteringConfig(clusters=8, niter=20), executor=Executor.create("inline"))
    c = Clustering(tmp_path / "s.clustering")
    uids = np.concatenate([b[1] for b in c.iter_assignment()])
    dist = np.concatenate([b[3] for b in c.iter_assignment()])
    is_kept = K.member(r.uids, uids)[0]
    assert is_kept.sum() == 2000 and dist[is_kept].min() >= dist[~is_kept].max()  # globally hardest
    easy = run_filter(ssl_prototypes, concept_pool, tmp_path / "e.npy", embedding_key="l14_img", fraction=0.25,
                      keep="easy", executor=Executor.create("inline"), clustering=ClusteringConfig(dir=tmp_path / "s.clustering"))
    is_easy = K.member(easy.uids, uids)[0]
    assert dist[is_easy].max() <= dist[~is_easy].min()
    bal = run_filter(ssl_prototypes, concept_pool, tmp_path / "b.npy", embedding_key="l14_img", fraction=0.25,
                     balance=0.5, executor=Executor.create("inline"), clustering=ClusteringConfig(dir=tmp_path / "s.clustering"))
    t = pd.read_parquet(tmp_path / "b.clusters.parquet")
    assert len(bal.uids) == 2000 and (t.kept >= np.minimum(int(0.5 * 2000 / 8), t["size"])).all()


# -- determinism and resume ------------------------------------------------------------


def test_bit_identical_with_one_and_two_workers(concept_pool, tmp_path):
    outs = {}
    for workers in (1, 2):
        d = tmp_path / f"w{workers}"
        run_filter(dbp, concept_pool, d / "dbp.npy", embedding_key="l14_img", fraction=0.3,
                   clustering=ClusteringConfig(clusters=8, niter=20),
                   executor=Executor.create("local", workers=workers))
        run_filter(semdedup, concept_pool, d / "sd.npy", embedding_key="l14_img", eps=0.05,
                   clustering=ClusteringConfig(dir=d / "dbp.clustering"),
                   executor=Executor.create("local", workers=workers))
        assert json.loads((d / "dbp.clustering" / "clustering.json").read_text())["assignment"]["world_size"] == workers
        outs[workers] = {n: (d / n).read_bytes() for n in ("dbp.npy", "sd.npy")}
    assert outs[1] == outs[2]


def test_interrupted_run_resumes_to_the_same_keep_list(concept_pool, tmp_path, monkeypatch):
    from conceptprune import npz

    ref = run_filter(dbp, concept_pool, tmp_path / "ref" / "dbp.npy", embedding_key="l14_img", fraction=0.3,
                     clustering=ClusteringConfig(clusters=8, niter=20), executor=Executor.create("inline"))
    real_sync, calls = npz.NpyColumn.sync, []

    def crash_in_second_block(self):
        calls.append(1)
        if len(calls) == 4:  # block 1 is written and recorded; block 2 dies half-written
            raise KeyboardInterrupt
        real_sync(self)

    monkeypatch.setattr(npz.NpyColumn, "sync", crash_in_second_block)
    with pytest.raises(KeyboardInterrupt):
        run_filter(dbp, concept_pool, tmp_path / "run" / "dbp.npy", embedding_key="l14_img", fraction=0.3,
                   clustering=ClusteringConfig(clusters=8, niter=20), executor=Executor.create("inline"))
    assert not (tmp_path / "run" / "dbp.npy").exists()
    progress = list((tmp_path / "run" / "dbp.clustering" / "assign").glob("*.progress.json"))
    assert json.loads(progress[0].read_text())["rows_done"] == 16384 or 0 < json.loads(progress[0].read_text())["rows_done"]
    monkeypatch.setattr(npz.NpyColumn, "sync", real_sync)
    resumed = run_filter(dbp, concept_pool, tmp_path / "run" / "dbp.npy", embedding_key="l14_img", fraction=0.3,
                         clustering=ClusteringConfig(clusters=8, niter=20), executor=Executor.create("inline"))
    assert (tmp_path / "run" / "dbp.npy").read_bytes() == (tmp_path / "ref" / "dbp.npy").read_bytes()
    assert len(resumed.uids) == len(ref.uids)


# -- bad input -----------------------------------------------------------------------------


def test_bad_input(concept_pool, tmp_path):
    with pytest.raises(ConfigError, match="more than the"):
        run_filter(dbp, concept_pool, tmp_path / "x.npy", embedding_key="l14_img", fraction=0.3,
                   clustering=ClusteringConfig(clusters=9000, niter=20), executor=Executor.create("inline"))
    for bad in (0, 1.2, -1):
        with pytest.raises(ConfigError, match=r"\(0, 1\]"):
            run_filter(dbp, concept_pool, tmp_path / "x.npy", embedding_key="l14_img", fraction=bad,
                       clustering=ClusteringConfig(clusters=8, niter=20), executor=Executor.create("inline"))
    K.write_keep_list(tmp_path / "foreign.npy", U.uids_to_array(["ab" * 16]))
    with pytest.raises(KeepListError, match="not in the pool"):
        run_filter(ssl_prototypes, concept_pool, tmp_path / "y.npy", embedding_key="l14_img", fraction=0.3,
                   within=tmp_path / "foreign.npy", clustering=ClusteringConfig(clusters=8, niter=20),
                       executor=Executor.create("inline"))
    with pytest.raises(ConfigError, match="exactly one"):
        semdedup(concept_pool, eps=0.1, target_fraction=0.5)
    with pytest.raises(ConfigError, match="--rule paper"):
        run_filter(semdedup, concept_pool, tmp_path / "z.npy", embedding_key="l14_img", target_fraction=0.5,
                   rule="greedy", clustering=ClusteringConfig(clusters=8, niter=20), executor=Executor.create("inline"))
    assert not list(tmp_path.glob("*.npy"))[1:]  # only the --within list we wrote


def test_nan_embeddings_error_or_drop(tmp_path):
    make_pool(tmp_path, SyntheticPoolConfig(rows=3000, files=1, seed=5, concepts=4, embedding_keys=("l14_img",)),
              progress=False)
    npz_path = next(tmp_path.glob("*.npz"))
    with np.load(npz_path) as z:
        arr = z["l14_img"].copy()
    arr[[10, 2000]] = np.nan
    np.savez(npz_path, l14_img=arr)
    with pytest.raises(PoolError, match="row 10.*NaN"):
        run_filter(dbp, tmp_path, tmp_path / "o" / "a.npy", embedding_key="l14_img", fraction=0.5,
                   clustering=ClusteringConfig(clusters=4, niter=20), executor=Executor.create("inline"))
    r = run_filter(dbp, tmp_path, tmp_path / "o2" / "a.npy", embedding_key="l14_img", bad_embeddings="drop",
                   fraction=0.5, clustering=ClusteringConfig(clusters=4, niter=20), executor=Executor.create("inline"))
    df = read_pool_frame(tmp_path)
    assert len(r.uids) == round(0.5 * 2998)
    assert not {df.uid[10], df.uid[2000]} & uid_set(r.uids)


def test_empty_clusters_get_no_budget(concept_pool, tmp_path):
    clus = tmp_path / "c"
    run_filter(dbp, concept_pool, tmp_path / "all.npy", embedding_key="l14_img", fraction=0.5,
               clustering=ClusteringConfig(clusters=8, dir=clus, niter=20), executor=Executor.create("inline"))
    c = Clustering(clus)
    uids = np.concatenate([b[1] for b in c.iter_assignment()])
    cl = np.concatenate([b[2] for b in c.iter_assignment()])
    K.write_keep_list(tmp_path / "few.npy", uids[cl < 3])  # candidates only in clusters 0-2
    r = run_filter(dbp, concept_pool, tmp_path / "few_dbp.npy", embedding_key="l14_img", fraction=0.5,
                   within=tmp_path / "few.npy", neighbors=2, executor=Executor.create("inline"), clustering=ClusteringConfig(dir=clus))
    t = pd.read_parquet(tmp_path / "few_dbp.clusters.parquet")
    assert (t.kept[t.cluster >= 3] == 0).all() and (t["size"][t.cluster >= 3] == 0).all()
    assert r.stats["empty_clusters"] == 5 and len(r.uids) == round(0.5 * (cl < 3).sum())


def test_clustering_reuse_checks(concept_pool, tmp_path):
    clus = tmp_path / "c"
    run_filter(dbp, concept_pool, tmp_path / "a.npy", embedding_key="l14_img", fraction=0.5,
               clustering=ClusteringConfig(clusters=8, dir=clus, niter=20), executor=Executor.create("inline"))
    with pytest.raises(ConfigError, match="k 8 \\(asked 5\\)"):
        run_filter(dbp, concept_pool, tmp_path / "b.npy", embedding_key="l14_img", fraction=0.5, executor=Executor.create("inline"),
                   clustering=ClusteringConfig(clusters=5, dir=clus))
    other = tmp_path / "other"
    make_pool(other, SyntheticPoolConfig(rows=500, files=1, seed=1, concepts=3, embedding_keys=("l14_img",)),
              progress=False)
    with pytest.raises(ConfigError, match="another pool"):
        run_filter(dbp, other, tmp_path / "c.npy", embedding_key="l14_img", fraction=0.5,
                   executor=Executor.create("inline"), clustering=ClusteringConfig(dir=clus))
