import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a failed hub lookup would otherwise wait ~45 s
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("CONCEPTPRUNE_PROGRESS", "0")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations (via img2dataset) calls PyPI on import

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


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A randomly initialised (seed 0) cp-tiny-vit checkpoint in open_clip's form."""
    import open_clip
    import torch

    from conceptprune.models import register

    register()
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "tiny.pt"
    torch.save({"epoch": 1, "state_dict": open_clip.create_model("cp-tiny-vit").state_dict()}, path)
    return path


def write_circle_shards(out: Path, shards: int, per_shard: int) -> Path:
    """Webdataset shards of 32 px coloured circles with captions and DataComp uids (uid
    ``{shard:016x}{index:016x}``) and img2dataset's ``_stats.json``, as a download leaves them."""
    import io
    import json

    from PIL import Image, ImageDraw

    from conceptprune.tars import Sample, ShardWriter

    rng = np.random.default_rng(0)
    colors = ["red", "green", "blue", "yellow"]
    for s in range(shards):
        w = ShardWriter(out / f"{s:08d}.tar")
        for i in range(per_shard):
            c = int(rng.integers(4))
            im = Image.new("RGB", (32, 32), "white")
            ImageDraw.Draw(im).ellipse([4, 4, 28, 28], fill=colors[c])
            buf = io.BytesIO()
            im.save(buf, format="JPEG")
            w.write(Sample(f"{s:04d}{i:04d}", {"jpg": buf.getvalue(), "txt": f"a {colors[c]} circle".encode(),
                                                "json": json.dumps({"uid": f"{s:016x}{i:016x}"}).encode()}))
        w.close()
        (out / f"{s:08d}_stats.json").write_text(json.dumps({"count": per_shard, "successes": per_shard}))
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


# -- the localhost SLURM cluster (tests/slurm_cluster.sh) -----------------------------------

SLURM_TOOLS = ("munged", "mungekey", "slurmctld", "slurmd", "slurmdbd", "sbatch", "sacct", "mariadbd")


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A real SLURM cluster (2 nodes, accounting) for the session; SLURM_CONF points at it."""
    import shutil
    import subprocess
    import time

    missing = [t for t in SLURM_TOOLS if shutil.which(t) is None]
    if missing:
        pytest.skip(f"SLURM packages not installed (missing {', '.join(missing)}); "
                    "install them with `make slurm-deps` (Debian, root)")
    if os.geteuid() != 0:
        pytest.skip("the localhost SLURM cluster runs its daemons as root")
    from conceptprune.slurm import executor

    base = tmp_path_factory.mktemp("slurm")
    script = Path(__file__).parent / "slurm_cluster.sh"
    env = {**os.environ, "CP_SLURM_PORT_BASE": str(17000 + (os.getpid() % 40) * 200)}
    t0 = time.time()
    out = subprocess.run(["bash", str(script), "up", str(base)], capture_output=True, text=True, env=env, timeout=180)
    if out.returncode != 0:
        subprocess.run(["bash", str(script), "down", str(base)], env=env, capture_output=True)
        pytest.fail(f"the SLURM test cluster did not start:\n{out.stderr[-3000:]}")
    startup = time.time() - t0
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(base / "etc" / "slurm.conf")
    executor._slurm_answers.cache_clear()
    print(f"\nSLURM test cluster up in {startup:.1f} s at {base}")
    try:
        yield {"base": base, "startup_s": startup}
    finally:
        subprocess.run(["bash", str(script), "down", str(base)], env=env, capture_output=True, timeout=120)
        if old is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old
        executor._slurm_answers.cache_clear()
