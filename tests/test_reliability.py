"""Issue 19 (and 16.3): bad inputs, outputs that overlap inputs, write order, flag validation.

Each test names the defect it guards; each failed on the code before the fix.
"""

import os
import shutil
import zipfile

import numpy as np
import pytest

from conceptprune.pool import Pool, pool_fingerprint
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
    pool_dir = _tiny_pool(tmp_path / "p")
    before = pool_fingerprint(Pool(pool_dir, embedding_key="l14_img"))
    assert pool_fingerprint(Pool(pool_dir, embedding_key="l14_img")) == before  # stable
    npz = sorted(pool_dir.glob("*.npz"))[1]
    _rewrite_npz_row(npz, "l14_img", 5, np.float16(0.5))
    assert pool_fingerprint(Pool(pool_dir, embedding_key="l14_img")) != before


def test_fingerprint_changes_with_mtime_and_key(tmp_path):
    pool_dir = _tiny_pool(tmp_path / "p", keys=("l14_img", "b32_img"))
    before = pool_fingerprint(Pool(pool_dir, embedding_key="l14_img"))
    assert pool_fingerprint(Pool(pool_dir, embedding_key="b32_img")) != before
    pq_file = sorted(pool_dir.glob("*.parquet"))[0]
    st = os.stat(pq_file)
    os.utime(pq_file, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert pool_fingerprint(Pool(pool_dir, embedding_key="l14_img")) != before
