import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a failed hub lookup would otherwise wait ~45 s
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("CONCEPTPRUNE_PROGRESS", "0")

import glob
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conceptprune.synthetic import SyntheticPoolConfig, make_pool


@pytest.fixture(scope="session")
def small_pool(tmp_path_factory) -> Path:
    """3 files, 6000 rows, all four embedding keys, 12 concepts."""
    out = tmp_path_factory.mktemp("pool")
    make_pool(out, SyntheticPoolConfig(rows=6000, files=3, seed=7, concepts=12, block_rows=1000), progress=False)
    return out


def read_pool_frame(pool_dir) -> pd.DataFrame:
    """The whole pool as one DataFrame, read independently of conceptprune.pool."""
    files = sorted(glob.glob(os.path.join(pool_dir, "*.parquet")))
    return pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)


def read_planted(pool_dir) -> pd.DataFrame:
    files = sorted(glob.glob(os.path.join(pool_dir, "_planted", "*.parquet")))
    return pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)


def read_embeddings(pool_dir, key="l14_img") -> np.ndarray:
    files = sorted(glob.glob(os.path.join(pool_dir, "*.npz")))
    return np.concatenate([np.load(f)[key] for f in files]).astype(np.float32)


def uid_set(arr) -> set:
    from conceptprune.uids import array_to_uids
    return set(array_to_uids(arr))
