"""Issue 28: the offline loop's pieces. ``make-pool --shards`` (the stand-in for ``download``),
and the checks that fail before the work."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import tarfile

import numpy as np
import pytest

from conceptprune.pool import Pool
from conceptprune.slurm.stage import Executor
from conceptprune.synthetic import SyntheticPoolConfig, make_pool, write_shards

CLI = [sys.executable, "-m", "conceptprune.cli"]


def _members(tar):
    with tarfile.open(tar) as t:
        return {m.name: t.extractfile(m).read() for m in t.getmembers()}


def test_make_pool_shards_are_what_datacomps_download_leaves(tmp_path):
    r = subprocess.run(CLI + ["--quiet", "make-pool", "--rows", "700", "--files", "2", "--out", str(tmp_path / "pool"),
                              "--shards", str(tmp_path / "shards"), "--shard-size", "300"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "wrote 3 shards, 700 samples" in r.stdout
    tars = sorted((tmp_path / "shards").glob("*.tar"))
    assert [t.name for t in tars] == ["00000000.tar", "00000001.tar", "00000002.tar"]
    uids = []
    for t in tars:
        stats = json.loads(t.with_name(t.stem + "_stats.json").read_text())
        m = _members(t)
        n = len(m) // 3
        assert stats["count"] == stats["successes"] == n
        for name, data in m.items():
            if name.endswith(".json"):
                meta = json.loads(data)
                key = name[:-5]
                assert meta["key"] == key and meta["status"] == "success"
                assert m[f"{key}.txt"].decode() == (meta["caption"] or "")
                from PIL import Image
                assert Image.open(io.BytesIO(m[f"{key}.jpg"])).size == (32, 32)
                uids.append(meta["uid"])
    pool = Pool(tmp_path / "pool")
    from conceptprune import uids as U
    assert uids == [U.pair_to_uid(int(a), int(b)) for a, b in pool.read_uids()]  # every row, in pool order
    # a second run into the same folder is refused without --overwrite (before the pool is written)
    r = subprocess.run(CLI + ["make-pool", "--rows", "10", "--out", str(tmp_path / "pool2"),
                              "--shards", str(tmp_path / "shards")], capture_output=True, text=True)
    assert r.returncode != 0 and "already holds" in r.stderr and not (tmp_path / "pool2").exists()


def test_reshard_takes_make_pool_shards(tmp_path):
    from conceptprune.data.reshard import reshard
    from conceptprune.keeplist import write_keep_list

    make_pool(tmp_path / "pool", SyntheticPoolConfig(rows=400, files=1, seed=3, embedding_keys=()), progress=False)
    assert write_shards(tmp_path / "pool", tmp_path / "shards", per_shard=150, progress=False) == 400
    uids = np.sort(Pool(tmp_path / "pool").read_uids())[::4]
    write_keep_list(tmp_path / "k.npy", uids, {"method": "test"})
    reshard(tmp_path / "shards", tmp_path / "k.npy", tmp_path / "out")
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["kept_samples"] == len(uids) and meta["missing_from_shards"] == 0 and meta["input_shards"] == 3


def test_near_duplicates_look_like_their_original(tmp_path):
    make_pool(tmp_path / "pool", SyntheticPoolConfig(rows=300, files=1, seed=1, duplicate_fraction=0.2,
                                                     embedding_keys=()), progress=False)
    write_shards(tmp_path / "pool", tmp_path / "shards", progress=False)
    import pyarrow.parquet as pq
    from PIL import Image

    planted = pq.read_table(next((tmp_path / "pool" / "_planted").glob("*.parquet"))).to_pandas()
    m = _members(tmp_path / "shards" / "00000000.tar")
    imgs = [np.asarray(Image.open(io.BytesIO(m[k])), np.float32) for k in sorted(k for k in m if k.endswith(".jpg"))]
    dups = planted.index[planted.dup_of >= 0][:10]
    assert len(dups)
    for j in dups:
        i = int(planted.dup_of[j])
        other = next(r for r in range(len(imgs)) if planted.concept[r] != planted.concept[j])
        assert np.abs(imgs[j] - imgs[i]).mean() < 6 < np.abs(imgs[j] - imgs[other]).mean()


def test_another_eps_reuses_the_stored_m(tmp_path, caplog):
    """README: "SemDeDup stores its M_j, so another eps or target size costs no recomputation".
    On the float32 path the first eps run stores M exact everywhere: a larger eps (a lower
    threshold) and a target size are read off it (no shuffle, no dedup part runs) and equal
    fresh runs."""
    import logging

    from conceptprune.filters import run_filter, semdedup
    from conceptprune.filters.clustering_config import ClusteringConfig

    make_pool(tmp_path / "pool", SyntheticPoolConfig(rows=3000, files=1, seed=5, concepts=6,
                                                     duplicate_fraction=0.2, embedding_keys=("l14_img",)),
              progress=False)
    pool = tmp_path / "pool"
    shared = {"clustering": ClusteringConfig(dir=tmp_path / "c", clusters=4), "executor": Executor.create("inline"),
              "embedding_key": "l14_img", "pairwise": "fp32"}
    run_filter(semdedup, pool, tmp_path / "a.npy", eps=0.01, **shared)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        b = run_filter(semdedup, pool, tmp_path / "b.npy", eps=0.3, **shared)
        c = run_filter(semdedup, pool, tmp_path / "c.npy", target_fraction=0.5, **shared)
    text = caplog.text
    assert text.count("reusing SemDeDup results") == 2, text
    assert "shuffle" not in text.replace("reusing SemDeDup results", "")
    fresh = {**shared, "clustering": ClusteringConfig(dir=tmp_path / "f", clusters=4)}
    assert (run_filter(semdedup, pool, tmp_path / "fb.npy", eps=0.3, **fresh).uids == b.uids).all()
    fresh["clustering"] = ClusteringConfig(dir=tmp_path / "g", clusters=4)
    assert (run_filter(semdedup, pool, tmp_path / "fc.npy", target_fraction=0.5, **fresh).uids == c.uids).all()


# -- fail before the work, offline ---------------------------------------------------------------


@pytest.fixture()
def l14_pool(tmp_path):
    make_pool(tmp_path / "pool", SyntheticPoolConfig(rows=2000, files=1, seed=9, concepts=6,
                                                     embedding_keys=("l14_img",)), progress=False)
    return tmp_path / "pool"


def test_image_based_without_reference_offline_fails_before_kmeans(l14_pool, tmp_path, monkeypatch):
    from conceptprune.errors import ConfigError
    from conceptprune.filters import image_based, run_filter
    from conceptprune.filters.clustering_config import ClusteringConfig

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("CONCEPTPRUNE_DATACOMP_ASSETS", str(tmp_path / "empty-cache"))
    with pytest.raises(ConfigError, match="HF_HUB_OFFLINE is set.*baseline-assets"):
        run_filter(image_based, l14_pool, tmp_path / "ib.npy", embedding_key="l14_img",
                   clustering=ClusteringConfig(clusters=4, dir=tmp_path / "c"), executor=Executor.create("inline"))
    assert not (tmp_path / "c" / "centroids.npy").exists() and not (tmp_path / "ib.npy").exists()
    with pytest.raises(ConfigError, match="HF_HUB_OFFLINE is set"):  # DataComp's centroids likewise
        run_filter(image_based, l14_pool, tmp_path / "ib.npy", embedding_key="l14_img", scale="small",
                   reference=str(tmp_path / "nothing.npy"))


def test_text_based_offline_without_synsets_fails_first(l14_pool, tmp_path, monkeypatch):
    import time

    from conceptprune.errors import ConfigError
    from conceptprune.filters import run_filter, text_based

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("CONCEPTPRUNE_DATACOMP_ASSETS", str(tmp_path / "empty-cache"))
    t0 = time.time()
    with pytest.raises(ConfigError, match="imagenet21k.*HF_HUB_OFFLINE is set"):
        run_filter(text_based, l14_pool, tmp_path / "tb.npy")
    assert time.time() - t0 < 5


def test_engine_image_based_within_clip_is_the_intersection(l14_pool, tmp_path):
    """image-based --clusters K --within clip.npy == (image-based --clusters K) ∩ clip.npy:
    the engine's clustering is trained on the pool, not on the candidates."""
    from conceptprune import keeplist as K
    from conceptprune.filters import clip_score, image_based, run_filter
    from conceptprune.filters.clustering_config import ClusteringConfig

    import pyarrow.parquet as pq

    concept = pq.read_table(next((l14_pool / "_planted").glob("*.parquet"))).column("concept").to_numpy()
    x = np.load(next(l14_pool.glob("*.npz")))["l14_img"][np.flatnonzero(concept == 0)[:5]].astype(np.float32)
    np.save(tmp_path / "ref.npy", x)
    clip = run_filter(clip_score, l14_pool, tmp_path / "clip.npy", fraction=0.3)
    cfg = {"embedding_key": "l14_img", "reference": str(tmp_path / "ref.npy"), "executor": Executor.create("inline")}
    alone = run_filter(image_based, l14_pool, tmp_path / "ib.npy",
                       clustering=ClusteringConfig(clusters=30, niter=5, dir=tmp_path / "c1"), **cfg)
    both = run_filter(image_based, l14_pool, tmp_path / "ibc.npy", within=tmp_path / "clip.npy",
                      clustering=ClusteringConfig(clusters=30, niter=5, dir=tmp_path / "c2"), **cfg)
    expect = K.intersect(K.read_keep_list(tmp_path / "ib.npy"), K.read_keep_list(tmp_path / "clip.npy"))
    assert 0 < len(both.uids) < len(alone.uids)
    assert np.array_equal(K.read_keep_list(tmp_path / "ibc.npy"), expect)


# -- messages ----------------------------------------------------------------------------------


def test_semdedup_with_few_clusters_prints_no_dbp_warning(l14_pool, tmp_path, caplog):
    import logging

    from conceptprune.filters import run_filter, semdedup
    from conceptprune.filters.clustering_config import ClusteringConfig

    with caplog.at_level(logging.INFO):
        run_filter(semdedup, l14_pool, tmp_path / "sd.npy", embedding_key="l14_img", target_fraction=0.8,
                   clustering=ClusteringConfig(clusters=1), executor=Executor.create("inline"))
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text


def test_shared_clustering_warns_only_when_not_asked_for(l14_pool, tmp_path, caplog):
    """--clustering DIR shared on purpose: an info line. The folder beside --out reused by a run
    with other candidates (its result differs from a fresh one): a warning."""
    import logging

    from conceptprune.filters import clip_score, dbp, run_filter
    from conceptprune.filters.clustering_config import ClusteringConfig

    run_filter(clip_score, l14_pool, tmp_path / "clip.npy", fraction=0.5)
    kw = {"embedding_key": "l14_img", "fraction": 0.5, "neighbors": 4, "executor": Executor.create("inline")}
    run_filter(dbp, l14_pool, tmp_path / "a.npy", clustering=ClusteringConfig(clusters=5, dir=tmp_path / "c"), **kw)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        run_filter(dbp, l14_pool, tmp_path / "b.npy", within=tmp_path / "clip.npy",
                   clustering=ClusteringConfig(dir=tmp_path / "c"), **kw)
    assert "as --clustering asks" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    run_filter(dbp, l14_pool, tmp_path / "d.npy", clustering=ClusteringConfig(clusters=5), **kw)
    caplog.clear()
    with caplog.at_level(logging.INFO):  # the same --out (its d.clustering/), other candidates
        run_filter(dbp, l14_pool, tmp_path / "d.npy", within=tmp_path / "clip.npy",
                   clustering=ClusteringConfig(clusters=5), **kw)
    assert [r for r in caplog.records if r.levelno == logging.WARNING and "earlier run" in r.getMessage()]


# -- progress ----------------------------------------------------------------------------------


def test_semdedup_shows_progress_on_its_long_steps_and_quiet_silences_it(l14_pool, tmp_path):
    """The assignment, SemDeDup's shuffle and dedup each draw a bar with rows/s and an ETA
    (tqdm on stderr); k-means logs its iterations' time and rate; --quiet draws none."""
    import os

    env = {**os.environ, "CONCEPTPRUNE_PROGRESS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = ["filter", "semdedup", "--pool", str(l14_pool), "--target-fraction", "0.8", "--clusters", "3",
           "--executor", "inline"]
    r = subprocess.run(CLI + cmd + ["--out", str(tmp_path / "a.npy")], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    for what in ("assign 1/1", "semdedup shuffle, part 1/1", "semdedup dedup, part 1/1"):
        line = next((x for x in r.stderr.replace("\r", "\n").splitlines() if what in x and "100%" in x), None)
        assert line is not None and "rows/s" in line, (what, r.stderr[-2000:])
    assert re.search(r"k-means: \d+ iterations in [\d.]+ s \([\d.]+ s an iteration, \d+ rows/s\)", r.stderr)
    q = subprocess.run(CLI + ["--quiet"] + cmd + ["--out", str(tmp_path / "b.npy")], capture_output=True, text=True,
                       env=env)
    assert q.returncode == 0 and "%|" not in q.stderr and "it/s]" not in q.stderr, q.stderr[-2000:]


def test_evaluate_on_an_empty_data_folder_fails_before_the_model(tiny_checkpoint, tmp_path):
    """One line naming the folder and `evaluate download`, before the model is loaded (a
    checkpoint that cannot load would fail otherwise), instead of 40 failures after it."""
    from conceptprune.errors import ConfigError
    from conceptprune.evaluation.run import evaluate

    (tmp_path / "evalsets").mkdir()
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a checkpoint")
    for model in (str(tiny_checkpoint), str(broken)):
        with pytest.raises(ConfigError, match=r"holds none of the 40 task\(s\) asked.*evaluate download"):
            evaluate(model, str(tmp_path / "evalsets"), str(tmp_path / "out"), arch="cp-tiny-vit")
    assert not (tmp_path / "out" / "eval_errors.json").exists()
    with pytest.raises(ConfigError, match="folder not found"):
        evaluate(str(tiny_checkpoint), str(tmp_path / "nowhere"), str(tmp_path / "out"), arch="cp-tiny-vit")


def test_debug_log_level_is_not_flooded_by_matplotlib(tmp_path):
    np.save(tmp_path / "k.npy", np.zeros(1, "u8,u8"))
    code = ("import sys; from conceptprune.cli import main; main(['--log-level', 'debug', 'keep-list', 'info', "
            f"{str(tmp_path / 'k.npy')!r}]); import matplotlib.pyplot as plt; plt.figure(); "
            "import matplotlib.font_manager as fm; fm.FontManager()")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "matplotlib" not in r.stderr and "findfont" not in r.stderr, r.stderr[:2000]


def test_manifests_record_the_pool_and_within_absolute_too(l14_pool, tmp_path, monkeypatch):
    from conceptprune.filters import clip_score, random_subset, run_filter

    monkeypatch.chdir(tmp_path)
    run_filter(clip_score, "pool", "clip.npy", fraction=0.5)
    run_filter(random_subset, "pool", "r.npy", within="clip.npy", fraction=0.5, seed=1)
    man = json.loads((tmp_path / "r.json").read_text())
    assert man["pool"]["path"] == "pool" and man["pool"]["absolute_path"] == str(l14_pool.resolve())
    assert man["within"]["path"] == "clip.npy" and man["within"]["absolute_path"] == str((tmp_path / "clip.npy").resolve())


def test_a_pool_without_embeddings_names_the_download_flag(tmp_path):
    from conceptprune.errors import PoolError
    from conceptprune.filters import dbp, run_filter

    make_pool(tmp_path / "pool", SyntheticPoolConfig(rows=50, files=1, embedding_keys=()), progress=False)
    with pytest.raises(PoolError, match=r"no embeddings file .*--with-embeddings"):
        run_filter(dbp, tmp_path / "pool", tmp_path / "d.npy", embedding_key="l14_img", fraction=0.5)
