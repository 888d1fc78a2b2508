import shutil
import zipfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conceptprune import uids as U
from conceptprune.errors import PoolError
from conceptprune.npz import NpzArray
from conceptprune.pool import Pool
from conceptprune.synthetic import SyntheticPoolConfig, make_pool

from conftest import read_embeddings, read_pool_frame


def _tiny_pool(tmp_path, rows=300, files=2, **kw):
    cfg = SyntheticPoolConfig(rows=rows, files=files, seed=1, concepts=4, block_rows=100,
                              embedding_keys=("l14_img",), **kw)
    make_pool(tmp_path, cfg, progress=False)
    return tmp_path


def test_stream_matches_independent_read(small_pool):
    pool = Pool(small_pool, embedding_key="l14_img")
    df = read_pool_frame(small_pool)
    emb = read_embeddings(small_pool)
    assert pool.rows == len(df) and pool.dim == 768
    got_uids, got_emb, got_score = [], [], []
    for chunk in pool.iter_chunks(["clip_l14_similarity_score"], embeddings=True, chunk_rows=700):
        assert len(chunk) <= 700
        got_uids += U.array_to_uids(chunk.uids)
        got_emb.append(chunk.embeddings)
        got_score.append(chunk.column("clip_l14_similarity_score"))
    assert got_uids == df.uid.tolist()
    ref = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    np.testing.assert_allclose(np.concatenate(got_emb), ref, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(np.concatenate(got_score), df.clip_l14_similarity_score.to_numpy())


def test_row_ranges_cover_pool_exactly(small_pool):
    pool = Pool(small_pool)
    all_uids = pool.read_uids()
    for world in (1, 2, 3, 7):
        parts = [pool.read_uids(start=a, stop=b) for a, b in (pool.split(r, world) for r in range(world))]
        assert np.concatenate(parts).tolist() == all_uids.tolist()


def test_compressed_npz_reads_the_same(tmp_path, small_pool):
    src = sorted(small_pool.glob("*.npz"))[0]
    dst = tmp_path / "c.npz"
    with np.load(src) as z:
        np.savez_compressed(dst, **{k: z[k] for k in z.files})
    a, b = NpzArray(src, "l14_img"), NpzArray(dst, "l14_img")
    assert a.shape == b.shape
    np.testing.assert_array_equal(a.read(10, 500), b.read(10, 500))
    np.testing.assert_array_equal(a.read(0, 5), b.read(0, 5))  # rewind
    np.testing.assert_array_equal(a.read(1500, a.rows), b.read(1500, b.rows))


def test_parquet_npz_row_mismatch(tmp_path):
    pool = _tiny_pool(tmp_path)
    npz = sorted(pool.glob("*.npz"))[0]
    with np.load(npz) as z:
        arr = z["l14_img"][:-1]
    np.savez(npz, l14_img=arr)
    with pytest.raises(PoolError, match=r"has 149 rows but .*\.parquet has 150"):
        Pool(pool, embedding_key="l14_img")


def test_corrupt_and_truncated_npz(tmp_path):
    pool = _tiny_pool(tmp_path)
    npz = sorted(pool.glob("*.npz"))[0]
    data = npz.read_bytes()
    npz.write_bytes(data[: len(data) // 2])
    with pytest.raises(PoolError, match="not a readable .npz"):
        Pool(pool, embedding_key="l14_img")
    npz.write_bytes(b"this is not a zip file at all")
    with pytest.raises(PoolError, match=npz.name):
        Pool(pool, embedding_key="l14_img")


def test_missing_npz_and_missing_key(tmp_path):
    pool = _tiny_pool(tmp_path)
    with pytest.raises(PoolError, match="no array 'b32_img'"):
        Pool(pool, embedding_key="b32_img")
    sorted(pool.glob("*.npz"))[1].unlink()
    with pytest.raises(PoolError, match="no embeddings file"):
        Pool(pool, embedding_key="l14_img")
    Pool(pool)  # metadata-only use still works


def test_nan_and_zero_embeddings(tmp_path):
    pool = _tiny_pool(tmp_path)
    npz = sorted(pool.glob("*.npz"))[1]
    with np.load(npz) as z:
        arr = z["l14_img"].copy()
    arr[3] = np.nan
    arr[10] = 0
    np.savez(npz, l14_img=arr)
    with pytest.raises(PoolError, match=rf"{npz.name}\[l14_img\] row 3 .*NaN"):
        for _ in Pool(pool, embedding_key="l14_img").iter_chunks(embeddings=True):
            pass
    p = Pool(pool, embedding_key="l14_img", bad_embeddings="drop")
    valid = np.concatenate([c.valid if c.valid is not None else np.ones(len(c), bool)
                            for c in p.iter_chunks(embeddings=True)])
    assert np.flatnonzero(~valid).tolist() == [150 + 3, 150 + 10]
    assert p.report.nan_or_inf == 1 and p.report.zero == 1


def test_malformed_and_duplicate_uids(tmp_path):
    pool = _tiny_pool(tmp_path)
    pq_file = sorted(pool.glob("*.parquet"))[1]
    t = pq.read_table(pq_file)
    uids = t.column("uid").to_pylist()
    uids[7] = "not-a-uid"
    pq.write_table(t.set_column(0, "uid", pa.array(uids)), pq_file)
    with pytest.raises(PoolError, match=rf"{pq_file.name}: row 7: uid 'not-a-uid'"):
        Pool(pool).read_uids()
    first = pq.read_table(sorted(pool.glob("*.parquet"))[0]).column("uid").to_pylist()
    uids[7] = first[2]
    pq.write_table(t.set_column(0, "uid", pa.array(uids)), pq_file)
    with pytest.raises(PoolError, match=rf"occurs more than once .*row 2, .*{pq_file.name}: row 7"):
        Pool(pool).check_unique_uids()


def test_missing_column_and_bad_parquet(tmp_path):
    pool = _tiny_pool(tmp_path)
    f = sorted(pool.glob("*.parquet"))[0]
    pq.write_table(pq.read_table(f).drop(["text"]), f)
    with pytest.raises(PoolError, match="no column 'text'"):
        list(Pool(pool).iter_chunks(["text"]))
    f.write_bytes(b"PAR1garbage")
    with pytest.raises(PoolError, match="not a readable parquet"):
        Pool(pool)


def test_not_a_pool(tmp_path):
    with pytest.raises(PoolError, match="not found"):
        Pool(tmp_path / "nope")
    with pytest.raises(PoolError, match="no .parquet files"):
        Pool(tmp_path)


def test_short_uids_in_pool(tmp_path):
    make_pool(tmp_path, SyntheticPoolConfig(rows=200, files=1, seed=2, concepts=3, embedding_keys=(),
                                            short_uid_fraction=0.5), progress=False)
    raw = pq.read_table(sorted(tmp_path.glob("*.parquet"))[0]).column("uid").to_pylist()
    assert any(len(u) < 32 for u in raw)
    got = U.array_to_uids(Pool(tmp_path).read_uids())
    assert got == [u.rjust(32, "0") for u in raw]


def test_generated_near_duplicates_point_at_an_earlier_original_of_their_block():
    """make-pool's (and bench_scale's) near-duplicate map, resolved all at once: every copy
    points at an earlier row of its own generation block that is itself no copy, and the
    map equals the one-row-at-a-time resolution it replaced."""
    from types import SimpleNamespace

    from conceptprune.synthetic import near_duplicates

    def one_at_a_time(dup_of):
        dup_of = dup_of.copy()
        for t in np.flatnonzero(dup_of >= 0):  # ascending: an earlier copy is resolved first
            if dup_of[dup_of[t]] >= 0:
                dup_of[t] = dup_of[dup_of[t]]
        return dup_of

    for seed, frac, block, n in [(0, 0.3, 7, 3000), (1, 0.9, 100, 5000), (2, 0.05, 4096, 10000), (3, 0.5, 3, 2)]:
        cfg = SimpleNamespace(duplicate_fraction=frac, block_rows=block)
        dup_of = near_duplicates(n, cfg, np.random.default_rng(seed))
        copies = np.flatnonzero(dup_of >= 0)
        assert (dup_of[copies] < copies).all() and (dup_of[copies] // block == copies // block).all()
        assert (dup_of[dup_of[copies]] == -1).all()
        if frac >= 0.3 and n > 100:
            assert len(copies) > 0.2 * frac * n
        # the raw map (before resolution) from the same rng calls, resolved row by row
        rng = np.random.default_rng(seed)
        raw = np.full(n, -1, dtype=np.int64)
        t = np.sort(rng.choice(np.arange(1, n), size=min(int(round(frac * n)), n - 1), replace=False))
        start = (t // block) * block
        t, start = t[t > start], start[t > start]
        raw[t] = rng.integers(start, t)
        assert (one_at_a_time(raw) == dup_of).all()
