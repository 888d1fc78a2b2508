"""``conceptprune run PIPELINE.toml`` (issue 26.2): a loop from one file as one stage graph.

Locally: filter chain -> reshard -> train gives the same keep-lists as the commands run one by
one, and a rerun runs nothing. On the localhost SLURM cluster: reshard -> train -> evaluate
submitted detached as one graph (afterok in the sbatch scripts), status shows every step, and
the rerun collects without submitting anything again."""

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from conceptprune import keeplist as K
from conceptprune.errors import ConfigError
from conceptprune.synthetic import SyntheticPoolConfig, make_pool, write_shards


@pytest.fixture(scope="module")
def loop_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("loop")
    make_pool(root / "pool", SyntheticPoolConfig(rows=1200, files=2, seed=3, concepts=6, block_rows=300),
              progress=False)
    write_shards(root / "pool", root / "shards", per_shard=400, image_size=32, progress=False)
    return root


def _cp(*args, cwd=None, check=True):
    r = subprocess.run([sys.executable, "-m", "conceptprune.cli", "--quiet", *args], capture_output=True, text=True,
                       cwd=cwd, timeout=900)
    if check:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


LOCAL = textwrap.dedent("""
    folder = "loop"

    [[step]]
    name = "clip"
    command = "filter"
    method = "clip-score"
    pool = "{pool}"
    out = "work/clip.npy"
    fraction = 0.5

    [[step]]
    name = "dbp"
    command = "filter"
    method = "dbp"
    after = ["clip"]
    workers = 2
    pool = "{pool}"
    within = "work/clip.npy"
    out = "work/dbp.npy"
    fraction = 0.5
    clusters = 4

    [[step]]
    name = "reshard"
    command = "reshard"
    after = ["dbp"]
    shards = "{shards}"
    keep = "work/dbp.npy"
    out = "work/shards_dbp"
    shard_size = 100

    [[step]]
    name = "train"
    command = "train"
    after = ["reshard"]
    data = "work/shards_dbp"
    scale = "tiny"
    output = "runs"
    name_ = "ignored"
""")


def test_local_pipeline_equals_the_commands_and_reruns_nothing(loop_data, tmp_path):
    from conceptprune.filters import clip_score, dbp, run_filter
    from conceptprune.filters.clustering_config import ClusteringConfig

    text = LOCAL.format(pool=loop_data / "pool", shards=loop_data / "shards").replace(
        'name_ = "ignored"\n', 'run_name = "t"\nsamples_seen = 128\n')
    # a key the command does not take is a one-line error naming the step, before any work
    bad = tmp_path / "bad.toml"
    bad.write_text(LOCAL.format(pool=loop_data / "pool", shards=loop_data / "shards"))
    r = _cp("run", str(bad), "--executor", "local", check=False)
    assert r.returncode == 2 and "step train" in r.stderr and "name_" in r.stderr
    f = tmp_path / "loop.toml"
    f.write_text(text)
    t0 = time.time()
    out = json.loads(_cp("run", str(f), "--executor", "local").stdout)
    first = time.time() - t0
    assert set(out) == {"clip", "dbp", "reshard", "train"}
    # the same lists as the filters run directly, one after the other
    ref_clip = run_filter(clip_score, loop_data / "pool", tmp_path / "ref_clip.npy", fraction=0.5)
    ref_dbp = run_filter(dbp, loop_data / "pool", tmp_path / "ref_dbp.npy", within=tmp_path / "ref_clip.npy",
                         fraction=0.5, embedding_key="l14_img", clustering=ClusteringConfig(clusters=4, dir=tmp_path / "ref.clustering"))
    assert np.array_equal(K.read_keep_list(tmp_path / "work" / "clip.npy"), np.sort(ref_clip.uids))
    assert np.array_equal(K.read_keep_list(tmp_path / "work" / "dbp.npy"), K.read_keep_list(tmp_path / "ref_dbp.npy"))
    meta = json.loads((tmp_path / "work" / "shards_dbp" / "meta.json").read_text())
    assert meta["kept_samples"] == len(ref_dbp.uids)
    assert (tmp_path / "runs" / "t" / "info.pkl").exists()
    described = json.loads((tmp_path / "loop" / "pipeline.json").read_text())
    assert [s["name"] for s in described["steps"]] == ["clip", "dbp", "reshard", "train"]
    assert described["steps"][3]["after"] == ["reshard"]
    # rerun: every step is marked done, nothing runs again, the outputs are untouched
    stamp = {p: p.stat().st_mtime_ns for p in (tmp_path / "work").rglob("*") if p.is_file()}
    t0 = time.time()
    _cp("run", str(f), "--executor", "local")
    assert {p: p.stat().st_mtime_ns for p in stamp} == stamp
    assert time.time() - t0 < first
    st = _cp("status", str(tmp_path)).stdout
    for name in ("clip", "dbp", "reshard"):
        assert name in st


def test_pipeline_files_are_checked_before_any_work(tmp_path):
    from conceptprune.apps.pipeline import build, load

    f = tmp_path / "p.toml"
    f.write_text('[[step]]\nname = "a"\ncommand = "filter"\nmethod = "clip-score"\npool = "x"\nout = "y.npy"\n'
                 'fraction = 0.5\n[[step]]\nname = "b"\ncommand = "reshard"\nafter = ["c"]\n')
    with pytest.raises(ConfigError, match="step 'b' comes after 'c', which is not an earlier step"):
        build(load(f))
    f.write_text('[[step]]\nname = "a"\ncommand = "filtre"\n')
    with pytest.raises(ConfigError, match="p.toml: step 1 \\(a\\): command must be one of"):
        load(f)
    f.write_text('[[step]]\nname = "a"\ncommand = "filter"\nmethod = "dbp"\npool = "x"\nout = "y.npy"\neps = 0.1\n')
    with pytest.raises(ConfigError, match="step a: filter dbp has no parameter 'eps'"):
        build(load(f))
    f.write_text("[[step]\n")
    with pytest.raises(ConfigError, match="not a valid toml file"):
        load(f)
    f.write_text('[[step]]\nname = "a"\ncommand = "reshard"\ncluster = { gpus = 8 }\n')
    with pytest.raises(ConfigError, match="step a: unknown cluster option 'gpus'"):
        build(load(f))


@pytest.mark.slurm
def test_slurm_detached_reshard_train_evaluate_is_one_graph(slurm_cluster, loop_data, tmp_path):
    from conceptprune.evaluation.wds import write_classification
    from PIL import Image

    # a keep-list of half the pool, and a tiny cifar10 evaluation set
    assert len(K.read_keep_list(_half_list(loop_data, tmp_path)))
    rng = np.random.default_rng(0)
    ims = [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(20)]
    write_classification(tmp_path / "eval" / "cifar10", ims, rng.integers(0, 10, 20), [str(i) for i in range(10)],
                         ["a photo of {c}."])
    f = tmp_path / "loop.toml"
    f.write_text(textwrap.dedent(f"""
        [[step]]
        name = "reshard"
        command = "reshard"
        shards = "{loop_data / 'shards'}"
        keep = "half.npy"
        out = "work/shards"
        shard_size = 200

        [[step]]
        name = "train"
        command = "train"
        after = ["reshard"]
        data = "work/shards"
        scale = "tiny"
        output = "runs"
        run_name = "t"
        samples_seen = 128

        [[step]]
        name = "evaluate"
        command = "evaluate"
        after = ["train"]
        model = "runs/t"
        data_dir = "eval"
        output = "work/eval"
        tasks = ["cifar10"]
        cluster = {{ time = "9" }}
    """))
    r = _cp("run", str(f), "--executor", "slurm", "--detach")
    assert "submitted" in r.stdout
    # one graph: each later step's sbatch script waits (afterok) for the one before
    scripts = sorted(tmp_path.rglob("*_submission.sh"))
    deps = [l for s in scripts for l in s.read_text().splitlines() if "--dependency" in l]
    assert len(deps) >= 2 and all("afterok" in d for d in deps), deps
    # a step's own cluster options reach its job (evaluate: --time 9), the others keep the CLI's
    times = {s.parent.parent.name: [l for l in s.read_text().splitlines() if "--time" in l] for s in scripts}
    assert times.get("evaluate") == ["#SBATCH --time=9"], times
    st = _cp("status", str(tmp_path)).stdout
    for name in ("reshard", "train", "evaluate"):
        assert name in st
    # the rerun collects: it waits for the same jobs and submits no step again (the training
    # step's job itself submits the training's own job, with the run's nodes and GPUs, in runs/t)
    before = {p.name for p in (tmp_path / "loop").rglob("*_submission.sh")}
    out = json.loads(_cp("run", str(f), "--executor", "slurm").stdout)
    after = {p.name for p in (tmp_path / "loop").rglob("*_submission.sh")}
    assert after == before and set(out) == {"reshard", "train", "evaluate"}
    assert len(list((tmp_path / "runs" / "t").rglob("*_submission.sh"))) == 1
    rows = [json.loads(l) for l in (tmp_path / "work" / "eval" / "eval_results.jsonl").read_text().splitlines()]
    assert [r["key"] for r in rows] == ["cifar10"]


def _half_list(loop_data, tmp_path) -> Path:
    from conceptprune.filters import random_subset, run_filter

    run_filter(random_subset, loop_data / "pool", tmp_path / "half.npy", fraction=0.5, seed=1)
    return tmp_path / "half.npy"
