import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from conceptprune import keeplist as K
from conceptprune import uids as U
from conceptprune.errors import KeepListError


def _random_uids(n, seed=0):
    rng = np.random.default_rng(seed)
    return U.make_array(rng.integers(0, 2**64, n, dtype=np.uint64), rng.integers(0, 2**64, n, dtype=np.uint64))


def test_round_trip_sorted_unique_and_manifest(tmp_path):
    arr = _random_uids(1000)
    p = K.write_keep_list(tmp_path / "keep.npy", arr, {"method": "test"})
    back = K.read_keep_list(p)
    assert back.dtype == np.dtype("u8,u8")
    raw = np.load(p)
    assert raw.dtype == np.dtype("u8,u8")
    # sorted the way DataComp's resharder expects: arr.sort() on the structured array
    ref = arr.copy()
    ref.sort()
    assert raw.tolist() == ref.tolist()
    assert K.read_manifest(p)["counts"]["out"] == 1000


def test_datacomp_searchsorted_finds_every_uid(tmp_path):
    arr = _random_uids(2000, seed=3)
    arr["f0"][:50] = 0  # many entries sharing the high word (leading-zero uids)
    p = K.write_keep_list(tmp_path / "k.npy", arr)
    subset = np.load(p)
    query = arr[::7]
    idx = np.searchsorted(subset, query)  # exactly what DataComp's resharder does
    assert (subset[idx] == query).all()


def test_write_rejects_duplicates_and_wrong_suffix(tmp_path):
    arr = _random_uids(10)
    with pytest.raises(KeepListError, match="more than once"):
        K.write_keep_list(tmp_path / "k.npy", np.concatenate([arr, arr[:1]]))
    with pytest.raises(KeepListError, match=".npy"):
        K.write_keep_list(tmp_path / "k.bin", arr)
    assert not (tmp_path / "k.npy").exists()


def test_read_validation(tmp_path):
    arr = _random_uids(100)
    arr.sort()
    np.save(tmp_path / "unsorted.npy", arr[::-1])
    with pytest.raises(KeepListError, match="not sorted"):
        K.read_keep_list(tmp_path / "unsorted.npy")
    np.save(tmp_path / "dup.npy", np.sort(np.concatenate([arr, arr[5:6]])))
    # a repeated uid is DataComp's upsampling: legal; the set by default, every entry on request
    assert K.read_keep_list(tmp_path / "dup.npy").tolist() == arr.tolist()
    assert len(K.read_keep_list(tmp_path / "dup.npy", multiset=True)) == 101
    np.save(tmp_path / "dtype.npy", np.arange(10, dtype=np.uint64))
    with pytest.raises(KeepListError, match="dtype"):
        K.read_keep_list(tmp_path / "dtype.npy")
    np.save(tmp_path / "i8.npy", arr.astype("i8,i8"))
    with pytest.raises(KeepListError, match="dtype"):
        K.read_keep_list(tmp_path / "i8.npy")
    (tmp_path / "garbage.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(KeepListError, match="not a readable"):
        K.read_keep_list(tmp_path / "garbage.npy")
    with pytest.raises(KeepListError, match="not found"):
        K.read_keep_list(tmp_path / "missing.npy")


def test_member_with_shared_high_words():
    keep = _random_uids(300, seed=1)
    keep["f0"][:200] = 7
    keep = K.sort_uids(keep)
    query = np.concatenate([keep[::3], _random_uids(50, seed=2)])
    found, idx = K.member(keep, query)
    keep_set = set(map(tuple, keep.tolist()))
    assert found.tolist() == [tuple(q) in keep_set for q in query.tolist()]
    assert (keep[idx[found]] == query[found]).all()


def test_set_operations():
    a, b = _random_uids(100, 1), _random_uids(100, 2)
    ab = K.union(a, b[:50])
    assert len(ab) == 150
    assert len(K.intersect(ab, b)) == 50
    assert len(K.difference(ab, a)) == 50
    sa = set(map(tuple, a.tolist()))
    assert set(map(tuple, K.difference(ab, b).tolist())) == sa


def test_interrupted_write_leaves_no_keep_list(tmp_path, monkeypatch):
    arr = _random_uids(1000)

    def broken_save(f, a, allow_pickle=False):
        f.write(b"\x93NUMPY partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(K.np, "save", broken_save)
    with pytest.raises(KeyboardInterrupt):
        K.write_keep_list(tmp_path / "k.npy", arr)
    assert os.listdir(tmp_path) == [] or all(not n.endswith(".npy") for n in os.listdir(tmp_path))
    assert not any(n.startswith(".k.npy.tmp") for n in os.listdir(tmp_path))


def test_killed_writer_leaves_no_keep_list(tmp_path):
    """A writer killed (SIGKILL) after writing its data, before the rename."""
    code = textwrap.dedent(f"""
        import os, sys, time, numpy as np
        from conceptprune import keeplist as K, uids as U
        real_fsync, calls = os.fsync, []
        def stuck(fd):  # the keep-list's data is written (temporary name), then we hang on the manifest
            calls.append(fd)
            if len(calls) == 1:
                return real_fsync(fd)
            print("written", flush=True); time.sleep(60)
        os.fsync = stuck
        rng = np.random.default_rng(0)
        arr = U.make_array(rng.integers(0, 2**64, 100000, dtype=np.uint64), rng.integers(0, 2**64, 100000, dtype=np.uint64))
        K.write_keep_list(r"{tmp_path / 'k.npy'}", arr, {{"method": "t"}})
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "written"
    proc.kill()
    proc.wait()
    assert not (tmp_path / "k.npy").exists()
    assert any(n.startswith(".k.npy.tmp") for n in os.listdir(tmp_path))  # only the temporary file


def test_written_files_follow_umask(tmp_path):
    K.write_keep_list(tmp_path / "k.npy", _random_uids(5), {"method": "t"})
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "k.npy").stat().st_mode & 0o777 == 0o666 & ~mask
    assert (tmp_path / "k.json").stat().st_mode & 0o777 == 0o666 & ~mask


@pytest.mark.parametrize("spill_rows", [10**9, 1000, 1])
def test_collector_spills_and_writes_same_file_as_np_save(tmp_path, spill_rows):
    arr = _random_uids(20000, seed=5)
    arr["f0"][:300] = 0  # a crowded bucket
    col = K.UidCollector(spill_rows=spill_rows, spill_dir=tmp_path / "spill")
    for part in np.array_split(arr, 17):
        col.add(part)
    assert len(col) == 20000
    col.write(tmp_path / "a.npy", {"method": "t"})
    K.write_keep_list(tmp_path / "b.npy", arr)
    assert (tmp_path / "a.npy").read_bytes() == (tmp_path / "b.npy").read_bytes()
    assert col.to_array().tolist() == K.read_keep_list(tmp_path / "b.npy").tolist()
    assert K.read_manifest(tmp_path / "a.npy")["counts"]["out"] == 20000
    col.cleanup()
    assert not (tmp_path / "spill").exists() or not any((tmp_path / "spill").iterdir())


def test_collector_rejects_duplicates_across_chunks(tmp_path):
    arr = _random_uids(5000, seed=6)
    col = K.UidCollector(spill_rows=100, spill_dir=tmp_path)
    col.add(arr)
    col.add(arr[1234:1235])
    with pytest.raises(KeepListError, match="more than once"):
        col.write(tmp_path / "k.npy")
    assert not (tmp_path / "k.npy").exists()


def test_multiplicities_describe_and_combine():
    arr = K.sort_uids(np.concatenate([_uids_small(1, 2, 2, 2, 5), _uids_small(5)]))
    uids, counts = K.multiplicities(arr)
    assert U.array_to_uids(uids) == [f"{i:032x}" for i in (1, 2, 5)] and counts.tolist() == [1, 3, 2]
    assert K.describe(arr) == {"entries": 6, "distinct": 3, "repeated_uids": 2, "max_multiplicity": 3,
                               "multiplicities": {"1": 1, "2": 1, "3": 1}}
    assert K.describe(arr[:0])["entries"] == 0
    b = _uids_small(2, 7)
    assert K.combine("union", [arr, b]).tolist() == arr.tolist() + K.sort_uids(_uids_small(7)).tolist()
    assert K.combine("intersect", [arr, b]).tolist() == K.sort_uids(_uids_small(2, 2, 2)).tolist()
    assert K.combine("diff", [arr, b]).tolist() == K.sort_uids(_uids_small(1, 5, 5)).tolist()
    assert len(K.combine("concat", [arr, b, b])) == 10
    with pytest.raises(K.ConfigError):
        K.combine("xor", [arr])


def _uids_small(*ints):
    return U.uids_to_array([f"{i:032x}" for i in ints])


def test_multiset_write_and_stale_manifest_removed(tmp_path):
    p = tmp_path / "m.npy"
    K.write_keep_list(p, _uids_small(3, 1, 3), {"method": "t"}, multiset=True)
    assert np.load(p).tolist() == K.sort_uids(_uids_small(1, 3, 3)).tolist()
    m = K.read_manifest(p)
    assert m["keep_list"]["entries"] == 3 and m["keep_list"]["distinct"] == 2 and m["counts"]["out"] == 3
    with pytest.raises(KeepListError, match="more than once"):  # a set unless asked
        K.write_keep_list(tmp_path / "s.npy", _uids_small(3, 3))
    K.write_keep_list(p, _uids_small(4))  # no manifest: the old one described another list
    assert K.read_manifest(p) is None and K.manifest_matches(p) is None


def test_empty_lists(tmp_path):
    K.write_keep_list(tmp_path / "e.npy", _uids_small())
    assert len(K.read_keep_list(tmp_path / "e.npy")) == 0
    (tmp_path / "zero.bin").write_bytes(b"")
    with pytest.raises(KeepListError, match="empty file"):
        K.read_keep_list(tmp_path / "zero.bin")


def test_member_finds_every_uid_and_its_index_also_among_shared_high_words():
    """``member`` (plain and through a reused ``UidIndex``) against a dictionary, on lists whose
    uids often share their high word (short uids) and on full 128-bit ones, queries unsorted."""
    rng = np.random.default_rng(5)
    for trial in range(200):
        hmax = [3, 50, 2 ** 63][trial % 3]
        n, m = int(rng.integers(0, 200)), int(rng.integers(0, 300))
        keep = np.unique(U.make_array(rng.integers(0, hmax, n, dtype=np.uint64), rng.integers(0, 9, n, dtype=np.uint64)))
        query = U.make_array(rng.integers(0, hmax, m, dtype=np.uint64), rng.integers(0, 9, m, dtype=np.uint64))
        if len(keep) and m:
            some = rng.random(m) < 0.5
            query[some] = keep[rng.integers(0, len(keep), int(some.sum()))]
        where = {(int(h), int(lo)): i for i, (h, lo) in enumerate(keep.tolist())}
        want = np.array([where.get((int(h), int(lo)), -1) for h, lo in query.tolist()], dtype=np.int64)
        index = K.UidIndex(keep)
        for got in (K.member(keep, query), K.member(index, query), K.member(index, query)):
            assert (got[1] == want).all() and (got[0] == (want >= 0)).all(), trial
