"""Issue 19 (and 16.3): bad inputs, outputs that overlap inputs, write order, flag validation.

Each test names the defect it guards; each failed on the code before the fix.
"""

import os
import shutil
import zipfile

import numpy as np
import pytest

from conceptprune.pool import Pool
from conceptprune.synthetic import SyntheticPoolConfig, make_pool


def _tiny_pool(path, rows=300, files=2, keys=("l14_img",), seed=1):
    make_pool(path, SyntheticPoolConfig(rows=rows, files=files, seed=seed, concepts=4, block_rows=100,
                                        embedding_keys=keys), progress=False)
    return path


def _rewrite_npz_row(npz_path, key, row, value):
    """Rewrite one row of an npz member in place (same size), keeping the file's mtime."""
    st = os.stat(npz_path)
    with zipfile.ZipFile(npz_path) as zf:
        arrays = {n[:-4]: np.load(zf.open(n)) for n in zf.namelist()}
    arrays[key][row] = value
    with zipfile.ZipFile(npz_path, "w", zipfile.ZIP_STORED) as zf:
        for k, a in arrays.items():
            with zf.open(f"{k}.npy", "w") as f:
                np.lib.format.write_array(f, a)
    os.utime(npz_path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(npz_path).st_size == st.st_size


# -- 19.5: a pool fingerprint that changes when the data changes ------------------------------

def test_fingerprint_changes_with_embeddings_even_at_same_size_and_mtime(tmp_path):
    from conceptprune.pool import pool_fingerprint

    pool_dir = _tiny_pool(tmp_path / "p")
    before = pool_fingerprint(Pool(pool_dir, embedding_key="l14_img"))
    assert pool_fingerprint(Pool(pool_dir, embedding_key="l14_img")) == before  # stable
    npz = sorted(pool_dir.glob("*.npz"))[1]
    _rewrite_npz_row(npz, "l14_img", 5, np.float16(0.5))
    assert pool_fingerprint(Pool(pool_dir, embedding_key="l14_img")) != before


def test_fingerprint_changes_with_mtime_and_key(tmp_path):
    from conceptprune.pool import pool_fingerprint

    pool_dir = _tiny_pool(tmp_path / "p", keys=("l14_img", "b32_img"))
    before = pool_fingerprint(Pool(pool_dir, embedding_key="l14_img"))
    assert pool_fingerprint(Pool(pool_dir, embedding_key="b32_img")) != before
    pq_file = sorted(pool_dir.glob("*.parquet"))[0]
    st = os.stat(pq_file)
    os.utime(pq_file, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert pool_fingerprint(Pool(pool_dir, embedding_key="l14_img")) != before


# -- helpers ------------------------------------------------------------------------------

import collections  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402

from conceptprune import keeplist as K  # noqa: E402
from conceptprune import uids as U  # noqa: E402
from conceptprune.cli import main  # noqa: E402
from conceptprune.errors import ConceptPruneError, ConfigError, PoolError  # noqa: E402
from conceptprune.slurm.stage import Executor  # noqa: E402


def _cli(capsys, *argv):
    capsys.readouterr()
    rc = main(["--quiet", *map(str, argv)])
    out, err = capsys.readouterr()
    return rc, out, err.strip().splitlines()


def _refused(capsys, *argv, match: str) -> str:
    """The command fails with exit code 2 and exactly one stderr line containing ``match``."""
    rc, _, err = _cli(capsys, *argv)
    assert rc == 2 and len(err) == 1 and match in err[0], (rc, err)
    return err[0]


def _uids(*ints) -> np.ndarray:
    return U.uids_to_array([f"{i:032x}" for i in ints])


def _counter(arr) -> collections.Counter:
    return collections.Counter(U.array_to_uids(arr))


def _save_datacomp_style(path, arr) -> None:
    """The way DataComp's README writes a subset file: arr.sort(); np.save."""
    arr = np.array(arr, dtype=np.dtype("u8,u8"))
    arr.sort()
    np.save(path, arr)


@pytest.fixture()
def pool(tmp_path):
    return _tiny_pool(tmp_path / "pool", rows=600, files=2)


def _state(path):
    """Bytes of a keep-list and its manifest (to prove a refused command changed nothing)."""
    return (path.read_bytes(), K.manifest_path(path).read_bytes() if K.manifest_path(path).exists() else None)


# -- 16.3: keep-lists with multiplicities (DataComp's upsampling) -----------------------------

def test_upsampled_keep_list_reads_as_multiset_and_info_reports_it(tmp_path, capsys):
    _save_datacomp_style(tmp_path / "up.npy", np.concatenate([_uids(1, 2, 3), _uids(2, 2, 9)]))
    assert U.array_to_uids(K.read_keep_list(tmp_path / "up.npy")) == [f"{i:032x}" for i in (1, 2, 3, 9)]
    multi = K.read_keep_list(tmp_path / "up.npy", multiset=True)
    assert _counter(multi) == collections.Counter({f"{1:032x}": 1, f"{2:032x}": 3, f"{3:032x}": 1, f"{9:032x}": 1})
    rc, out, _ = _cli(capsys, "keep-list", "info", tmp_path / "up.npy")
    info = json.loads(out)
    assert rc == 0 and info["entries"] == 6 and info["distinct"] == 4 and info["repeated_uids"] == 1
    assert info["max_multiplicity"] == 3 and info["multiplicities"] == {"1": 3, "3": 1}


def test_unsorted_list_with_repeats_stays_an_error(tmp_path):
    arr = np.concatenate([_uids(5, 5), _uids(1)])  # not sorted (a guard: was already refused)
    np.save(tmp_path / "bad.npy", arr)
    with pytest.raises(K.KeepListError, match="not sorted"):
        K.read_keep_list(tmp_path / "bad.npy", multiset=True)


A_COUNTS = {1: 2, 2: 1, 3: 1}
B_COUNTS = {1: 1, 2: 3, 4: 1}


@pytest.mark.parametrize("op, expected", [
    ("union", {1: 2, 2: 3, 3: 1, 4: 1}),       # max of the counts
    ("intersect", {1: 2, 2: 1}),               # the first list's counts, others as sets
    ("diff", {3: 1}),                          # every copy of a uid listed by another list removed
    ("concat", {1: 3, 2: 4, 3: 1, 4: 1}),      # counts add up
])
def test_set_operations_define_multiplicities(tmp_path, capsys, op, expected):
    for name, counts in (("a", A_COUNTS), ("b", B_COUNTS)):
        _save_datacomp_style(tmp_path / f"{name}.npy", _uids(*[u for u, c in counts.items() for _ in range(c)]))
    rc, _, err = _cli(capsys, "keep-list", op, tmp_path / "a.npy", tmp_path / "b.npy", "--out", tmp_path / "r.npy")
    assert rc == 0, err
    raw = np.load(tmp_path / "r.npy", mmap_mode="r")  # what DataComp's resharder loads
    assert raw.dtype == np.dtype("u8,u8") and (np.sort(raw) == raw).all()
    assert _counter(raw) == collections.Counter({f"{u:032x}": c for u, c in expected.items()})
    for u in range(1, 6):  # DataComp writes a sample searchsorted(right) - searchsorted(left) times
        key = np.array([divmod(u, 2**64)], np.dtype("u8,u8"))[0]
        assert np.searchsorted(raw, key, "right") - np.searchsorted(raw, key, "left") == expected.get(u, 0)


def test_sort_and_from_uids_keep_repeats_unless_unique(tmp_path, capsys):
    np.save(tmp_path / "messy.npy", _uids(9, 3, 9, 1, 9))
    assert _cli(capsys, "keep-list", "sort", tmp_path / "messy.npy", "--out", tmp_path / "s.npy")[0] == 0
    assert _counter(K.read_keep_list(tmp_path / "s.npy", multiset=True))[f"{9:032x}"] == 3
    assert _cli(capsys, "keep-list", "sort", tmp_path / "messy.npy", "--unique", "--out", tmp_path / "u.npy")[0] == 0
    assert len(np.load(tmp_path / "u.npy")) == 3
    (tmp_path / "uids.txt").write_text(f"{7:032x}\n{7:032x}\n{2:x}\n")
    assert _cli(capsys, "keep-list", "from-uids", tmp_path / "uids.txt", "--out", tmp_path / "t.npy")[0] == 0
    assert _counter(np.load(tmp_path / "t.npy")) == collections.Counter({f"{2:032x}": 1, f"{7:032x}": 2})


def test_within_takes_a_multiset_as_its_set(pool, tmp_path, capsys):
    first = Pool(pool).read_uids()[:50]
    _save_datacomp_style(tmp_path / "up.npy", np.concatenate([first, first[:10]]))
    rc, _, err = _cli(capsys, "filter", "none", "--pool", pool, "--within", tmp_path / "up.npy",
                      "--out", tmp_path / "o.npy")
    assert rc == 0, err
    assert _counter(np.load(tmp_path / "o.npy")) == collections.Counter(U.array_to_uids(first))


def test_memory_mapped_keep_lists_are_accepted(tmp_path):
    arr = np.sort(_uids(*range(1, 40)))
    # DataComp's "memory-mapped format": a raw array without an .npy header
    m = np.memmap(tmp_path / "raw.bin", dtype=np.dtype("u8,u8"), mode="w+", shape=(len(arr),))
    m[:] = arr
    m.flush()
    del m
    # and np.save of a memmap (an ordinary .npy)
    mm = np.memmap(tmp_path / "raw.bin", dtype=np.dtype("u8,u8"), mode="r")
    np.save(tmp_path / "saved.npy", mm)
    for p in ("raw.bin", "saved.npy"):
        assert K.read_keep_list(tmp_path / p).tolist() == arr.tolist()


def test_npz_given_as_keep_list_is_one_clear_line(pool, tmp_path, capsys):
    np.savez(tmp_path / "keep.npz", keep=_uids(1, 2))
    _refused(capsys, "keep-list", "info", tmp_path / "keep.npz", match="keep.npz: is a zip archive (an .npz?)")
    _refused(capsys, "filter", "none", "--pool", pool, "--within", tmp_path / "keep.npz", "--out", tmp_path / "o.npy",
             match="keep.npz: is a zip archive")
    (tmp_path / "uids.txt").write_text(f"{1:032x}\n" * 16)  # 33 * 16 bytes: a multiple of 16
    _refused(capsys, "keep-list", "info", tmp_path / "uids.txt", match="looks like a text file of uids")
    assert not (tmp_path / "o.npy").exists()


# -- 19.3: outputs never overlap inputs; an existing --out is not replaced silently ----------

def test_filter_out_equal_to_within_is_refused_before_work(pool, tmp_path, capsys):
    keep = tmp_path / "keep.npy"
    assert _cli(capsys, "filter", "none", "--pool", pool, "--out", keep)[0] == 0
    before = _state(keep)
    _refused(capsys, "filter", "random", "--pool", pool, "--within", keep, "--out", keep, "--fraction", "0.5",
             "--overwrite", match="is also the input --within")
    assert _state(keep) == before


def test_set_operation_out_equal_to_an_input_is_refused(tmp_path, capsys):
    _save_datacomp_style(tmp_path / "a.npy", _uids(1, 2))
    _save_datacomp_style(tmp_path / "b.npy", _uids(3))
    before = (tmp_path / "a.npy").read_bytes()
    for op in ("union", "intersect", "diff", "concat"):
        _refused(capsys, "keep-list", op, tmp_path / "b.npy", tmp_path / "a.npy", "--out", tmp_path / "a.npy",
                 "--overwrite", match="is also the input")
    _refused(capsys, "keep-list", "sort", tmp_path / "a.npy", "--out", tmp_path / "a.npy", "--overwrite",
             match="is also the input")
    assert (tmp_path / "a.npy").read_bytes() == before


def test_existing_out_needs_overwrite(pool, tmp_path, capsys):
    keep = tmp_path / "keep.npy"
    assert _cli(capsys, "filter", "random", "--pool", pool, "--out", keep, "--fraction", "0.5")[0] == 0
    before = _state(keep)
    _refused(capsys, "filter", "random", "--pool", pool, "--out", keep, "--fraction", "0.2",
             match="already exists; pass --overwrite")
    assert _state(keep) == before
    _save_datacomp_style(tmp_path / "a.npy", _uids(1))
    _refused(capsys, "keep-list", "union", tmp_path / "a.npy", "--out", keep, match="already exists")
    assert _state(keep) == before
    assert _cli(capsys, "filter", "random", "--pool", pool, "--out", keep, "--fraction", "0.2", "--overwrite")[0] == 0
    assert len(np.load(keep)) == 120 and K.read_manifest(keep)["params"]["fraction"] == 0.2


def test_out_inside_the_pool_folder_is_refused(pool, capsys):
    _refused(capsys, "filter", "none", "--pool", pool, "--out", pool / "keep.npy", match="inside the pool folder")
    assert not (pool / "keep.npy").exists()


# -- 19.4: write order; --out checked before the run -------------------------------------------

def test_out_not_npy_is_refused_before_any_work(pool, tmp_path, capsys):
    _refused(capsys, "filter", "dbp", "--pool", pool, "--out", tmp_path / "keep.txt", "--fraction", "0.5",
             "--clusters", "4", match="must end in .npy")
    assert not (tmp_path / "keep.clustering").exists()  # no k-means was trained


def test_manifest_records_the_keep_list_it_describes(pool, tmp_path, capsys):
    keep = tmp_path / "keep.npy"
    assert _cli(capsys, "filter", "none", "--pool", pool, "--out", keep)[0] == 0
    rec = K.read_manifest(keep)["keep_list"]
    assert rec["sha256"] == hashlib.sha256(keep.read_bytes()).hexdigest() and rec["entries"] == 600
    assert K.manifest_matches(keep) is True
    np.save(keep, np.load(keep)[:10])  # replaced behind the manifest's back
    assert K.manifest_matches(keep) is False
    rc, out, _ = _cli(capsys, "keep-list", "info", keep)
    assert json.loads(out)["manifest_matches"] is False


def _old_list(path):
    K.write_keep_list(path, _uids(*range(1, 11)), {"method": "old"})
    return _state(path)


def _run_py(code: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=120, **kw)


def _limit_file_size():  # preexec_fn: writes beyond 1 MiB fail with EFBIG, as on a full disk
    import resource
    import signal

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))


def test_failed_write_leaves_old_list_and_its_manifest_together(tmp_path):
    keep = tmp_path / "k.npy"
    before = _old_list(keep)
    out = _run_py(f"""
        import numpy as np
        from conceptprune import keeplist as K, uids as U
        rng = np.random.default_rng(0)
        arr = U.make_array(rng.integers(0, 2**64, 200000, dtype=np.uint64), np.zeros(200000, np.uint64))
        try:
            K.write_keep_list(r"{keep}", arr, {{"method": "new"}})
        except Exception as e:
            print(type(e).__name__, e)
    """, preexec_fn=_limit_file_size)
    assert out.stdout.startswith("WriteError") and str(keep) in out.stdout, out.stdout + out.stderr
    assert _state(keep) == before and K.manifest_matches(keep) is True
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k.json", "k.npy"]  # no temporary files left


def test_disk_full_is_one_line_naming_the_file(tmp_path):
    _save_datacomp_style(tmp_path / "a.npy", U.make_array(np.arange(1, 100001, dtype=np.uint64),
                                                          np.zeros(100000, np.uint64)))  # 1.6 MB
    out = subprocess.run([sys.executable, "-m", "conceptprune.cli", "keep-list", "sort", str(tmp_path / "a.npy"),
                          "--out", str(tmp_path / "big.npy")],
                         capture_output=True, text=True, timeout=120, preexec_fn=_limit_file_size)
    err = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(err) == 1, out.stderr
    assert f"{tmp_path / 'big.npy'}: cannot write (File too large)" in err[0]
    assert not (tmp_path / "big.npy").exists()


def test_kill_before_the_last_rename_never_leaves_old_list_beside_new_manifest(tmp_path):
    keep = tmp_path / "k.npy"
    _old_list(keep)
    code = f"""
        import os, time
        from conceptprune import keeplist as K, uids as U
        real = os.replace
        def stuck(src, dst):
            if str(dst) == r"{keep}":
                print("renaming", flush=True)
                time.sleep(60)
            return real(src, dst)
        os.replace = stuck
        K.write_keep_list(r"{keep}", U.uids_to_array([f"{{i:032x}}" for i in range(100, 120)]), {{"method": "new"}})
    """
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "renaming"
    proc.kill()
    proc.wait()
    if keep.exists():  # whatever list is there, its manifest describes it
        m = K.read_manifest(keep)
        assert m["counts"]["out"] == len(np.load(keep)), m
    assert not keep.exists() and K.read_manifest(keep)["method"] == "new"


@pytest.mark.parametrize("step", range(1, 6))
def test_kill_at_every_step_of_publishing(tmp_path, step):
    """Kill the writer just before its n-th rename or removal (of 4: remove the old list,
    rename the extra, the manifest, the list; a 5th never comes): the folder then holds the
    old pair, no list, or the new pair."""
    keep = tmp_path / "k.npy"
    K.write_keep_list(keep, _uids(*range(1, 11)), {"method": "old"},
                      extras={".extra.txt": lambda p: p.write_text("old")})
    code = f"""
        import os, time
        from pathlib import Path
        from conceptprune import keeplist as K, uids as U
        calls = [0]
        def hang(fn):
            def wrapped(*a, **kw):
                calls[0] += 1
                if calls[0] == {step}:
                    print("hanging", flush=True)
                    time.sleep(60)
                return fn(*a, **kw)
            return wrapped
        os.replace, os.unlink = hang(os.replace), hang(os.unlink)
        K.write_keep_list(r"{keep}", U.uids_to_array([f"{{i:032x}}" for i in range(100, 120)]), {{"method": "new"}},
                          extras={{".extra.txt": lambda p: Path(p).write_text("new")}})
        print("done", flush=True)
    """
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline().strip()
    proc.kill()
    proc.wait()
    assert line == ("done" if step == 5 else "hanging")
    if keep.exists():
        assert K.manifest_matches(keep) is True
        m = K.read_manifest(keep)
        assert (m["method"], len(np.load(keep))) in (("old", 10), ("new", 20))
        assert (tmp_path / "k.extra.txt").read_text() == m["method"]
    else:
        assert 1 < step < 5


# -- 19.8: make-pool into a pool; npz checksums ----------------------------------------------

def test_make_pool_into_an_existing_pool_is_refused(tmp_path, capsys):
    out = tmp_path / "p"
    assert _cli(capsys, "make-pool", "--out", out, "--rows", "100", "--files", "2", "--embedding-keys", "b32_img")[0] == 0
    before = sorted(p.name for p in out.iterdir())
    _refused(capsys, "make-pool", "--out", out, "--rows", "50", "--files", "1", "--seed", "3",
             "--embedding-keys", "b32_img", match="already holds a pool")
    assert sorted(p.name for p in out.iterdir()) == before
    assert _cli(capsys, "make-pool", "--out", out, "--rows", "50", "--files", "1", "--seed", "3",
                "--embedding-keys", "b32_img", "--overwrite")[0] == 0
    assert len(list(out.glob("*.parquet"))) == 1 and Pool(out).rows == 50


def _corrupt_npz_row(npz, key="l14_img", row=3):
    """Flip one byte of a stored row: the value stays finite, only the zip CRC-32 can tell."""
    from conceptprune.npz import NpzArray

    with NpzArray(npz, key) as arr:
        offset = arr._data_offset + row * arr.row_bytes + 1
    with open(npz, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x01]))


def test_pool_validate_and_readers_fail_on_npz_crc(pool, capsys):
    npz = sorted(pool.glob("*.npz"))[1]
    assert _cli(capsys, "pool", "validate", pool)[0] == 0
    _corrupt_npz_row(npz)
    _refused(capsys, "pool", "validate", pool, match=f"{npz}: member l14_img.npy fails its zip check")
    _refused(capsys, "pool", "validate", pool, "--embedding-key", "l14_img",
             match=f"{npz}: member l14_img.npy fails its zip CRC-32 check")
    with pytest.raises(PoolError, match="CRC-32"):
        for _ in Pool(pool, embedding_key="l14_img").iter_chunks(embeddings=True, chunk_rows=64):
            pass


def test_compressed_npz_corruption_names_the_file(tmp_path, capsys):
    pool_dir = _tiny_pool(tmp_path / "p", files=1)
    npz = next(pool_dir.glob("*.npz"))
    np.savez_compressed(npz, l14_img=np.load(npz)["l14_img"])
    info = zipfile.ZipFile(npz).getinfo("l14_img.npy")
    data = bytearray(npz.read_bytes())
    data[info.header_offset + 30 + len(info.filename) + len(info.extra) + info.compress_size // 2] ^= 0x10
    npz.write_bytes(bytes(data))
    _refused(capsys, "pool", "validate", pool_dir, match=f"{npz}: member l14_img.npy fails its zip check")
    with pytest.raises(PoolError, match=f"{npz}.*(CRC-32|corrupt)"):
        for _ in Pool(pool_dir, embedding_key="l14_img").iter_chunks(embeddings=True):
            pass


def test_filter_dbp_stops_on_a_corrupt_npz(pool, tmp_path, capsys):
    _corrupt_npz_row(sorted(pool.glob("*.npz"))[0])
    rc, _, err = _cli(capsys, "filter", "dbp", "--pool", pool, "--out", tmp_path / "k.npy", "--fraction", "0.5",
                      "--clusters", "4", "--workers", "1")
    assert rc != 0 and "CRC-32" in err[-1], err
    assert not (tmp_path / "k.npy").exists()


# -- 19.9: numeric flags checked up front; empty results -----------------------------------

BAD_FLAGS = [
    (["filter", "clip-score", "--threshold", "nan"], "--threshold must be a finite number"),
    (["filter", "clip-score", "--fraction", "nan"], "--fraction must be a finite number"),
    (["filter", "dbp", "--fraction", "0.5", "--niter", "-5"], "--niter must be >= 1"),
    (["filter", "dbp", "--fraction", "0.5", "--niter", "0"], "--niter must be >= 1"),
    (["filter", "dbp", "--fraction", "0.5", "--seed", str(2**64)], "--seed must be in [0, 2147483647]"),
    (["filter", "dbp", "--fraction", "0.5", "--seed", "-1"], "--seed must be in"),
    (["filter", "dbp", "--fraction", "0.5", "--workers", "-2"], "--workers must be >= 1"),
    (["filter", "dbp", "--fraction", "0.5", "--temperature", "nan"], "--temperature must be a finite number"),
    (["filter", "dbp", "--fraction", "0.5", "--temperature", "0"], "--temperature must be > 0"),
    (["filter", "dbp", "--fraction", "0.5", "--train-sample", "0"], "--train-sample must be >= 1"),
    (["filter", "dbp", "--fraction", "0.5", "--neighbors", "0"], "--neighbors must be >= 1"),
    (["filter", "dbp", "--fraction", "0.5", "--balance", "nan"], "--balance must be a finite number"),
    (["filter", "semdedup", "--eps", "nan"], "--eps must be a finite number"),
    (["filter", "ssl-prototypes", "--fraction", "0.5", "--clusters", "0"], "--clusters must be >= 1"),
    (["filter", "random", "--fraction", "0.5", "--seed", str(2**64)], "--seed must be in"),
    (["filter", "laion2b", "--threshold", "inf"], "--threshold must be a finite number"),
    # flags of filter commands registered elsewhere get the same checks (filters/cli.py)
    (["filter", "image-based-centroids", "--clusters", "0"], "--clusters must be >= 1"),
    (["filter", "image-based-centroids", "--clusters", "4", "--niter", "-1"], "--niter must be >= 1"),
    (["filter", "image-based-centroids", "--clusters", "4", "--seed", str(2**64)], "--seed must be in"),
    (["filter", "image-based", "--scale", "small", "--batch-size", "0"], "--batch-size must be >= 1"),
]


@pytest.mark.parametrize("argv, message", BAD_FLAGS, ids=[" ".join(a[1:]) for a, _ in BAD_FLAGS])
def test_numeric_flags_refused_up_front(pool, tmp_path, capsys, argv, message):
    out = tmp_path / "k.npy"
    _refused(capsys, *argv[:2], "--pool", pool, "--out", out, *argv[2:], match=message)
    assert not out.exists() and not (tmp_path / "k.clustering").exists()  # refused before any k-means


@pytest.mark.parametrize("argv, message", [
    (["--rows", "0"], "--rows must be >= 1"),
    (["--rows", "10", "--files", "0"], "--files must be >= 1"),
    (["--rows", "10", "--duplicate-fraction", "nan"], "--duplicate-fraction must be a finite number"),
    (["--rows", "10", "--seed", "-3"], "--seed must be >= 0"),
])
def test_make_pool_numeric_flags(tmp_path, capsys, argv, message):
    _refused(capsys, "make-pool", "--out", tmp_path / "p", *argv, match=message)
    assert not (tmp_path / "p").exists()


def test_python_api_checks_the_same_rules(pool, tmp_path):
    from conceptprune.filters import clip_score, dbp, random_subset, run_filter
    from conceptprune.filters.clustering_config import ClusteringConfig

    with pytest.raises(ConfigError, match="--niter must be >= 1"):  # 0 used to become 100
        run_filter(dbp, pool, tmp_path / "k.npy", embedding_key="l14_img", fraction=0.5,
                   clustering=ClusteringConfig(clusters=4, niter=0))
    with pytest.raises(ConfigError, match="--workers must be an integer >= 1"):
        run_filter(dbp, pool, tmp_path / "k.npy", embedding_key="l14_img", fraction=0.5,
                   clustering=ClusteringConfig(clusters=4), executor=Executor.create("local", workers=-2))
    with pytest.raises(ConfigError, match="--temperature must be a finite number"):
        run_filter(dbp, pool, tmp_path / "k.npy", embedding_key="l14_img", fraction=0.5, temperature=float("nan"))
    with pytest.raises(ConfigError, match="--threshold must be a finite number"):
        run_filter(clip_score, pool, tmp_path / "k.npy", threshold=float("nan"))
    with pytest.raises(ConfigError, match="--seed must be in"):  # 2**64 used to equal seed 0
        run_filter(random_subset, pool, tmp_path / "k.npy", fraction=0.5, seed=2**64)
    assert not (tmp_path / "k.clustering").exists() and not (tmp_path / "k.npy").exists()


def test_threshold_above_every_score_needs_allow_empty(pool, tmp_path, capsys):
    out = tmp_path / "k.npy"
    _refused(capsys, "filter", "clip-score", "--pool", pool, "--out", out, "--threshold", "2",
             match="kept no uid of its 600 candidates")
    assert not out.exists()
    assert _cli(capsys, "filter", "clip-score", "--pool", pool, "--out", out, "--threshold", "2", "--allow-empty")[0] == 0
    assert len(np.load(out)) == 0 and np.load(out).dtype == np.dtype("u8,u8")


# -- compare: names and main metrics ---------------------------------------------------------

def _write_results(path, override=None):
    from conceptprune.evaluation.tasks import TASKS

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for t in TASKS:
            v = None if t.main_metric is None else (override or {}).get(t.key, 0.5)
            f.write(json.dumps({"key": t.key, "dataset": t.name, "metrics": {"main_metric": v}}) + "\n")
    return path


def test_compare_refuses_missing_names_and_percentages(tmp_path, capsys):
    from conceptprune.evaluation.compare import compare

    a, b = _write_results(tmp_path / "a" / "r.jsonl"), _write_results(tmp_path / "b" / "r.jsonl")
    with pytest.raises(ConfigError, match="--names gives 1 name"):
        compare([str(a), str(b)], names=["only-one"])
    _refused(capsys, "compare", a, b, "--names", "x", match="--names gives 1 name(s) for 2 results file(s)")
    c = _write_results(tmp_path / "c" / "r.jsonl", {"imagenet1k": 57.3})
    _refused(capsys, "compare", c, match="imagenet1k: main_metric 57.3 is not a fraction in [0, 1] (a percentage?")
    d = _write_results(tmp_path / "d" / "r.jsonl", {"cifar10": float("nan")})
    with pytest.raises(ConfigError, match="cifar10: main_metric nan"):
        compare([str(d)])
    assert len(compare([str(a), str(b)], names=["x", "y"])["aggregates"]) >= 2


# -- errors that name the file -----------------------------------------------------------------

def test_corrupt_parquet_page_names_the_file(pool, tmp_path, capsys):
    import pyarrow.parquet as pq

    path = sorted(pool.glob("*.parquet"))[0]
    col = pq.ParquetFile(path).metadata.row_group(0).column(0)  # uid
    assert col.path_in_schema == "uid"
    data = bytearray(path.read_bytes())
    for k in range(col.data_page_offset, col.data_page_offset + 8):
        data[k] ^= 0xFF  # a damaged page header: pyarrow raises a bare OSError ("thrift")
    path.write_bytes(bytes(data))
    line = _refused(capsys, "filter", "none", "--pool", pool, "--out", tmp_path / "k.npy",
                    match=f"{path}: corrupt parquet data")
    assert "thrift" in line


def test_pool_validate_decodes_every_parquet_column(pool, capsys):
    import pyarrow.parquet as pq

    path = sorted(pool.glob("*.parquet"))[1]
    md = pq.ParquetFile(path).metadata.row_group(0)
    col = next(md.column(i) for i in range(md.num_columns) if md.column(i).path_in_schema == "text")
    data = bytearray(path.read_bytes())
    for k in range(col.data_page_offset, col.data_page_offset + 8):
        data[k] ^= 0xFF  # the captions' page: not read by the uid checks
    path.write_bytes(bytes(data))
    assert _cli(capsys, "pool", "validate", pool, "--skip-checksums")[0] == 0
    _refused(capsys, "pool", "validate", pool, match=f"{path}: corrupt parquet data")


# -- 19.6 (filters/cli.py part): --embedding-dir reaches the concept filters --------------------

def test_embedding_dir_is_used_by_concept_filters(pool, tmp_path, capsys):
    rc, _, err = _cli(capsys, "filter", "ssl-prototypes", "--pool", pool, "--out", tmp_path / "a.npy",
                      "--fraction", "0.5", "--clusters", "4", "--workers", "1")
    assert rc == 0, err
    emb = tmp_path / "emb"
    emb.mkdir()
    for p in pool.glob("*.npz"):
        p.rename(emb / p.name)
    rc, _, err = _cli(capsys, "filter", "ssl-prototypes", "--pool", pool, "--out", tmp_path / "b.npy",
                      "--fraction", "0.5", "--clusters", "4", "--workers", "1", "--embedding-dir", emb)
    assert rc == 0, err
    assert (tmp_path / "a.npy").read_bytes() == (tmp_path / "b.npy").read_bytes()
