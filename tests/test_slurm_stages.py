"""The production stages on the real localhost SLURM cluster (tests/slurm_cluster.sh): embed,
reshard, clustering assignment + SemDeDup, evaluation. Each gives what the in-process executor
gives, and no job carries more than 1 MB of pickled arguments (weights are never shipped)."""

import json
from pathlib import Path

import numpy as np
import pytest

from conceptprune import keeplist as K
from conceptprune import uids as U
from conceptprune.filters.clustering_config import ClusteringConfig
from conceptprune.slurm.options import ClusterOptions
from conceptprune.slurm.stage import Executor
from conftest import write_circle_shards

pytestmark = pytest.mark.slurm
MB = 1_000_000


def _slurm(workers=2) -> Executor:
    return Executor.create("slurm", ClusterOptions(time=10), workers=workers)


def _assert_small_pickles(root: Path, at_least: int) -> None:
    pickles = list(Path(root).rglob("*_submitted.pkl"))
    assert len(pickles) >= at_least, f"expected >= {at_least} submitted jobs under {root}, found {len(pickles)}"
    big = {str(p): p.stat().st_size for p in pickles if p.stat().st_size > MB}
    assert not big, f"job pickles over 1 MB: {big}"



@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_circle_shards(tmp_path_factory.mktemp("shards"), 3, 20)


def test_embed_and_reshard_on_slurm_equal_inline(slurm_cluster, tmp_path, shards, tiny_checkpoint):
    from conceptprune.data.embed import EmbedStage
    from conceptprune.data.reshard import reshard
    from conceptprune.pool import Pool

    outs = {}
    for name, ex in (("slurm", _slurm(3)), ("inline", Executor.create("inline"))):
        stage = EmbedStage(str(tmp_path / f"emb_{name}"), str(shards), "cp-tiny-vit", str(tiny_checkpoint),
                           batch_size=8, text=True)
        ex.run(stage, ex.parts(3))
        pool = Pool(tmp_path / f"emb_{name}", embedding_key="img")
        emb = np.concatenate([c.embeddings for c in pool.iter_chunks([], embeddings=True)])
        outs[name] = (pool.read_uids(), emb)
    assert np.array_equal(outs["slurm"][0], outs["inline"][0])
    np.testing.assert_allclose(outs["slurm"][1], outs["inline"][1], atol=1e-6)

    keep = U.uids_to_array([f"{s:016x}{i:016x}" for s in range(3) for i in range(0, 20, 3)])
    K.write_keep_list(tmp_path / "keep.npy", keep)
    tars = {}
    for name, ex in (("slurm", _slurm(2)), ("local", Executor.create("local", workers=2))):
        meta = reshard(shards, tmp_path / "keep.npy", tmp_path / f"out_{name}", shard_size=5, executor=ex)
        assert meta["kept_samples"] == len(keep)
        tars[name] = {p.name: p.read_bytes() for p in sorted((tmp_path / f"out_{name}").glob("*.tar"))}
    assert tars["slurm"] == tars["local"] and len(tars["slurm"]) == 5  # 21 samples, 5 a shard
    # the embed array's 3 jobs (reshard's job folder goes with its state once the output is assembled)
    _assert_small_pickles(tmp_path, at_least=3)


def test_semdedup_and_evaluate_on_slurm_equal_inline(slurm_cluster, tmp_path, tiny_checkpoint):
    from conceptprune.evaluation.run import evaluate
    from conceptprune.evaluation.wds import write_classification
    from conceptprune.filters import run_filter, semdedup
    from conceptprune.synthetic import SyntheticPoolConfig, make_pool

    make_pool(tmp_path / "pool", SyntheticPoolConfig(rows=3000, files=2, seed=3, concepts=8, block_rows=500),
              progress=False)
    lists = {}
    for name, ex in (("slurm", _slurm(2)), ("inline", Executor.create("inline", workers=2))):
        out = tmp_path / f"sd_{name}.npy"
        run_filter(semdedup, tmp_path / "pool", out, embedding_key="l14_img", target_fraction=0.8, executor=ex,
                   clustering=ClusteringConfig(clusters=6, niter=10))
        lists[name] = out.read_bytes()
    assert lists["slurm"] == lists["inline"]

    rng = np.random.default_rng(0)
    from PIL import Image

    ims = [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(24)]
    data = tmp_path / "evalsets"
    write_classification(data / "wds_cifar10_test", ims, np.arange(24) % 4, ["a", "b", "c", "d"],
                         ["a photo of {c}."], nshards=2)
    write_classification(data / "wds_mnist_test", ims, np.arange(24) % 3, ["x", "y", "z"], ["{c}."], nshards=2)
    rows = {}
    for name, ex in (("slurm", _slurm(2)), ("inline", Executor.create("inline"))):
        res = evaluate(str(tiny_checkpoint), str(data), str(tmp_path / f"eval_{name}"), arch="cp-tiny-vit",
                       tasks=["cifar10", "mnist"], executor=ex)
        assert not res["errors"]
        rows[name] = {r["key"]: r["metrics"] for r in res["results"]}
    assert rows["slurm"] == rows["inline"] and set(rows["slurm"]) == {"cifar10", "mnist"}
    _assert_small_pickles(tmp_path, at_least=4)


def test_detached_reshard_and_evaluate_then_collected(slurm_cluster, tmp_path, shards, tiny_checkpoint):
    """`--detach`: the command submits its array and exits; `status` follows the jobs; the same
    command rerun afterwards collects exactly what an attached run writes."""
    import os
    import subprocess
    import sys
    import time

    from conceptprune.data.reshard import reshard
    from conceptprune.evaluation.wds import write_classification
    from conceptprune.slurm.status import status

    keep = U.uids_to_array([f"{s:016x}{i:016x}" for s in range(3) for i in range(1, 20, 2)])
    K.write_keep_list(tmp_path / "keep.npy", keep)
    rng = np.random.default_rng(1)
    from PIL import Image

    ims = [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(16)]
    write_classification(tmp_path / "evalsets" / "wds_cifar10_test", ims, np.arange(16) % 4, list("abcd"), ["{c}."])
    write_classification(tmp_path / "evalsets" / "wds_stl10_test", ims, np.arange(16) % 2, list("ab"), ["{c}."])
    cli = [sys.executable, "-m", "conceptprune.cli"]
    commands = [
        ["reshard", "--shards", str(shards), "--keep", str(tmp_path / "keep.npy"), "--out", str(tmp_path / "out"),
         "--shard-size", "6"],
        ["evaluate", "--model", str(tiny_checkpoint), "--arch", "cp-tiny-vit", "--data-dir", str(tmp_path / "evalsets"),
         "--out", str(tmp_path / "eval"), "--tasks", "cifar10", "stl10"],
    ]
    slurm = ["--executor", "slurm", "--workers", "2", "--time", "10"]
    for cmd in commands:
        t0 = time.time()
        out = subprocess.run(cli + cmd + slurm + ["--detach"], capture_output=True, text=True, env=os.environ,
                             timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        assert time.time() - t0 < 60
    assert not (tmp_path / "out").exists()  # nothing assembled yet: the jobs may still run

    def all_done():
        rows = status(tmp_path)
        return len(rows) == 2 and all(r.state == "done" for r in rows)
    t0 = time.time()
    while not all_done():
        assert time.time() - t0 < 180, [r.line() for r in status(tmp_path)]
        time.sleep(1)
    for cmd in commands:  # collect: nothing is submitted again
        out = subprocess.run(cli + cmd + slurm, capture_output=True, text=True, env=os.environ, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
    attached = reshard(shards, tmp_path / "keep.npy", tmp_path / "attached", shard_size=6,
                       executor=Executor.create("local", workers=2))
    assert attached["kept_samples"] == len(keep) == 30
    got = {p.name: p.read_bytes() for p in (tmp_path / "out").glob("*.tar")}
    assert got == {p.name: p.read_bytes() for p in (tmp_path / "attached").glob("*.tar")} and got
    rows = [json.loads(line) for line in (tmp_path / "eval" / "eval_results.jsonl").read_text().splitlines()]
    assert sorted(r["key"] for r in rows) == ["cifar10", "stl10"]


def test_semdedup_graph_submitted_detached_then_collected(slurm_cluster, tmp_path):
    """`filter semdedup --executor slurm --detach`: the launcher submits the whole graph (k-means ->
    assignment -> shuffle -> dedup, each afterok the one before) and exits without a keep-list;
    once SLURM has run it, the same command collects a keep-list byte-identical to the inline one."""
    import os
    import subprocess
    import sys
    import time

    from conceptprune.filters import run_filter, semdedup
    from conceptprune.slurm.status import status
    from conceptprune.synthetic import SyntheticPoolConfig, make_pool

    make_pool(tmp_path / "pool", SyntheticPoolConfig(rows=2000, files=2, seed=4, concepts=6, block_rows=500),
              progress=False)
    out = tmp_path / "sd_slurm.npy"
    command = [sys.executable, "-m", "conceptprune.cli", "filter", "semdedup", "--pool", str(tmp_path / "pool"),
               "--out", str(out), "--target-fraction", "0.8", "--clusters", "5", "--niter", "10",
               "--executor", "slurm", "--workers", "2", "--time", "10", "--detach"]
    t0 = time.time()
    launched = subprocess.run(command, capture_output=True, text=True, env=os.environ, timeout=120)
    assert launched.returncode == 0, launched.stderr[-2000:]
    assert time.time() - t0 < 60 and not out.exists()  # submitted, not waited for
    cdir = tmp_path / "sd_slurm.clustering"
    assert f"conceptprune status {cdir}" in launched.stderr and "rerun the same command" in launched.stderr
    assert launched.stderr.count(" parts on slurm") == 4  # one submission a stage

    graph = ("kmeans", "assign", "shuffle", "dedup")
    records = {p.parent.name: (p, json.loads(p.read_text())) for p in tmp_path.rglob("submission.record")}
    assert sorted(records) == sorted(graph)
    for before, stage in zip(graph, graph[1:]):
        rec, earlier = records[stage][1], records[before][1]
        assert rec["after"] == earlier["job_ids"] and rec["job_ids"]
        scripts = list(Path(rec["log_folder"]).rglob("*_submission.sh"))
        assert scripts and all(f"--dependency=afterok:{':'.join(earlier['job_ids'])}" in s.read_text()
                               for s in scripts), f"{stage}: no afterok on {before} in its sbatch script"

    t0 = time.time()
    while len(status(cdir)) < 4 or not all(r.state == "done" for r in status(cdir)):
        assert time.time() - t0 < 240, [r.line() for r in status(cdir)]
        time.sleep(1)
    last = {s: max(p.stat().st_mtime for p in records[s][0].parent.glob("*-of-*.json")) for s in graph}
    first = {s: min(p.stat().st_mtime for p in records[s][0].parent.glob("*-of-*.json")) for s in graph}
    assert all(first[b] >= last[a] for a, b in zip(graph, graph[1:]))  # each stage ran after the one before

    collected = subprocess.run(command, capture_output=True, text=True, env=os.environ, timeout=120)
    assert collected.returncode == 0, collected.stderr[-2000:]
    assert out.exists() and " parts on slurm" not in collected.stderr  # collected: nothing submitted again
    assert not list(cdir.glob("semdedup/*/shuffle"))  # the embeddings copy goes once the result is collected
    ref = tmp_path / "sd_inline.npy"
    run_filter(semdedup, tmp_path / "pool", ref, embedding_key="l14_img", target_fraction=0.8,
               clustering=ClusteringConfig(clusters=5, niter=10), executor=Executor.create("inline", workers=2))
    assert out.read_bytes() == ref.read_bytes() and 0 < len(K.read_keep_list(out)) < 2000
    _assert_small_pickles(tmp_path, at_least=7)


def test_arrays_respect_max_array_size_and_pack_parts(slurm_cluster, tmp_path):
    """The test cluster's MaxArraySize is 4: six parts go into two arrays (4 + 2); with
    --parts-per-task 2 five parts run as three array tasks. submission.record holds the
    backend and its options."""
    from conceptprune.slurm import executor as E
    from conceptprune.slurm.diagnostics import CountingStage

    E._max_array_size.cache_clear()
    assert E.max_array_size() == 4
    stage = CountingStage(work_dir=str(tmp_path / "a"), steps=1, step_seconds=0)
    sub = Executor.create("slurm", ClusterOptions(time=5), workers=6).submit(stage, 6)
    assert len(sub.jobs) == 6 and len({j.job_id.split("_")[0] for j in sub.jobs}) == 2
    assert sorted(sub.wait().ran) == list(range(6))
    rec = json.loads((stage.marker_dir() / "submission.record").read_text())
    assert rec["executor"] == "slurm" and rec["workers"] == 6
    assert rec["backend"]["max_array_size"] == 4 and rec["backend"]["options"]["time"] == 5

    packed = CountingStage(work_dir=str(tmp_path / "b"), steps=1, step_seconds=0)
    sub = Executor.create("slurm", ClusterOptions(time=5, parts_per_task=2), workers=5).submit(packed, 5)
    assert sub.groups == [[0, 1], [2, 3], [4]] and len(sub.jobs) == 3
    assert sorted(sub.wait().ran) == list(range(5))
    jobs = [json.loads(packed.marker(r, 5).read_text())["job_id"] for r in range(5)]
    assert jobs[0] == jobs[1] and jobs[2] == jobs[3] and len(set(jobs)) == 3  # two parts, one array task
    rec = json.loads((packed.marker_dir() / "submission.record").read_text())
    assert rec["backend"]["options"]["parts_per_task"] == 2 and rec["groups"] == [[0, 1], [2, 3], [4]]
