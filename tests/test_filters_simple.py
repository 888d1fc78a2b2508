import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conceptprune import keeplist as K
from conceptprune.errors import ConfigError, KeepListError
from conceptprune.filters import basic, clip_score, keep_all, laion2b, random_subset, run_filter
from conceptprune.filters.langid import LanguageId, bundled_model_path
from conceptprune.pool import Pool

from conftest import read_pool_frame, uid_set


def _datacomp_clip_threshold(scores: np.ndarray, fraction: float) -> float:
    # DataComp baselines: the value at index int(N * f) of the scores sorted descending
    return float(-np.sort(-scores)[int(len(scores) * fraction)])


@pytest.mark.parametrize("fraction", [0.01, 0.3, 0.5, 0.999])
def test_clip_score_fraction_matches_datacomp(small_pool, fraction):
    df = read_pool_frame(small_pool)
    thr = _datacomp_clip_threshold(df.clip_l14_similarity_score.to_numpy(), fraction)
    expected = set(df.uid[df.clip_l14_similarity_score >= thr])
    r = clip_score(Pool(small_pool), fraction=fraction)
    assert r.params["threshold"] == pytest.approx(thr, abs=0)
    assert uid_set(r.uids) == expected


def test_clip_score_ties_and_negative_scores(tmp_path, small_pool):
    # rewrite scores with heavy ties and negatives; the radix select must stay exact
    import pyarrow as pa
    import pyarrow.parquet as pq
    for f in small_pool.glob("*.parquet"):
        shutil.copy(f, tmp_path / f.name)
    rng = np.random.default_rng(0)
    for f in sorted(tmp_path.glob("*.parquet")):
        t = pq.read_table(f)
        s = rng.choice(np.array([-0.5, -0.1, 0.0, 0.1, 0.2, 0.2000001], np.float32), len(t))
        pq.write_table(t.set_column(t.schema.get_field_index("clip_b32_similarity_score"),
                                    "clip_b32_similarity_score", pa.array(s)), f)
    df = read_pool_frame(tmp_path)
    for fraction in (0.1, 0.4, 0.9):
        thr = _datacomp_clip_threshold(df.clip_b32_similarity_score.to_numpy(), fraction)
        r = clip_score(Pool(tmp_path), fraction=fraction, model="b32")
        assert r.params["threshold"] == thr
        assert uid_set(r.uids) == set(df.uid[df.clip_b32_similarity_score >= thr])


def test_clip_score_threshold_and_full_fraction(small_pool):
    df = read_pool_frame(small_pool)
    r = clip_score(Pool(small_pool), threshold=0.3, model="b32")
    assert uid_set(r.uids) == set(df.uid[df.clip_b32_similarity_score >= np.float32(0.3)])
    assert len(clip_score(Pool(small_pool), fraction=1.0).uids) == len(df)


@pytest.mark.parametrize("bad", [0, -0.1, 1.5, float("nan")])
def test_fraction_outside_range(small_pool, bad):
    with pytest.raises(ConfigError, match=r"\(0, 1\]"):
        clip_score(Pool(small_pool), fraction=bad)
    with pytest.raises(ConfigError, match=r"\(0, 1\]"):
        random_subset(Pool(small_pool), fraction=bad)


def test_random_exact_count_seeded_and_order_independent(small_pool, tmp_path):
    pool = Pool(small_pool)
    n = pool.rows
    for f in (0.1, 0.25, 0.3333):
        r = random_subset(pool, fraction=f, seed=3)
        assert len(r.uids) == round(f * n)
        assert uid_set(r.uids) <= set(read_pool_frame(small_pool).uid)
    a = random_subset(pool, fraction=0.3, seed=3).uids
    b = random_subset(pool, fraction=0.3, seed=3).uids
    c = random_subset(pool, fraction=0.3, seed=4).uids
    assert np.array_equal(K.sort_uids(a), K.sort_uids(b))
    assert not np.array_equal(K.sort_uids(a), K.sort_uids(c))
    # the same rows, cut into other files in another order, give the same choice
    df = read_pool_frame(small_pool)
    other = tmp_path / "reshuffled"
    other.mkdir()
    perm = np.random.default_rng(0).permutation(len(df))
    for i, part in enumerate(np.array_split(perm, 5)):
        df.iloc[part].to_parquet(other / f"{i:02d}.parquet")
    d = random_subset(Pool(other), fraction=0.3, seed=3).uids
    assert uid_set(d) == uid_set(a)


def test_none_keeps_everything(small_pool):
    assert uid_set(keep_all(Pool(small_pool)).uids) == set(read_pool_frame(small_pool).uid)


def test_basic_matches_independent_rule(small_pool):
    import fasttext

    df = read_pool_frame(small_pool)
    model = fasttext.load_model(str(bundled_model_path()))
    lang = [model.predict(t.replace("\n", " "), k=1)[0][0].replace("__label__", "") for t in df.text]
    w, h = df.original_width.to_numpy(), df.original_height.to_numpy()
    ok = ((np.array(lang) == "en") & (df.text.str.split().str.len() > 2) & (df.text.str.len() > 5)
          & (np.minimum(w, h) >= 200) & (np.maximum(w, h) / np.minimum(w, h) <= 3))
    r = basic(Pool(small_pool))
    assert uid_set(r.uids) == set(df.uid[ok])
    assert 0.3 * len(df) < len(r.uids) < 0.95 * len(df)  # the generator plants all three failure kinds


def test_language_id_sees_languages():
    lid = LanguageId()
    assert lid.predict(["a photo of a dog on the beach", "ein Hund am Strand im Sommer",
                        "une maison près de la plage", ""])[:3] == ["en", "de", "fr"]


def test_laion2b_rule(small_pool):
    df = read_pool_frame(small_pool)
    lid = LanguageId()
    en = np.array(lid.predict(df.text.tolist())) == "en"
    ok = en & (df.clip_b32_similarity_score.to_numpy() >= np.float32(0.28))
    assert uid_set(laion2b(Pool(small_pool), langid="fasttext").uids) == set(df.uid[ok])  # gcld3: test_baselines.py


def test_within_composition_and_manifest(small_pool, tmp_path):
    first = run_filter(clip_score, small_pool, tmp_path / "clip.npy", fraction=0.5)
    second = run_filter(random_subset, small_pool, tmp_path / "rand.npy", within=tmp_path / "clip.npy",
                        fraction=0.5, seed=1)
    assert len(second.uids) == round(0.5 * len(first.uids))
    assert uid_set(second.uids) <= uid_set(first.uids)
    m = json.loads((tmp_path / "rand.json").read_text())
    assert m["method"] == "random" and m["params"] == {"fraction": 0.5, "seed": 1}
    assert m["within"]["count"] == len(first.uids)
    assert m["counts"] == {"pool": 6000, "candidates": len(first.uids), "out": len(second.uids)}
    assert m["conceptprune_version"] and m["wall_time_s"] >= 0 and m["pool"]["rows"] == 6000
    # clip-score inside the previous list: the threshold is taken over the candidates only
    third = clip_score(Pool(small_pool), fraction=0.5, within=tmp_path / "rand.npy")
    df = read_pool_frame(small_pool)
    cand = df[df.uid.isin(uid_set(second.uids))]
    thr = _datacomp_clip_threshold(cand.clip_l14_similarity_score.to_numpy(), 0.5)
    assert uid_set(third.uids) == set(cand.uid[cand.clip_l14_similarity_score >= thr])


def test_within_with_foreign_uids(small_pool, tmp_path):
    from conceptprune import uids as U
    foreign = U.uids_to_array(["f" * 32, "e" * 32])
    K.write_keep_list(tmp_path / "foreign.npy", foreign)
    with pytest.raises(KeepListError, match="2 of its 2 uids are not in the pool"):
        random_subset(Pool(small_pool), fraction=0.5, within=tmp_path / "foreign.npy")
