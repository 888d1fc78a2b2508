"""The benches that guard issue 17 cannot rot: the GPU check's CPU version runs every step
(search, SemDeDup's pairwise pass, train vs open_clip's main, evaluate) and the reshard bench
byte-compares its fast output with the member-by-member path, both at toy sizes."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(args, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def test_gpu_check_cpu_tiny(tmp_path):
    out = tmp_path / "gpu.json"
    _run(["bench/gpu_check.py", "--device", "cpu", "--tiny", "--workdir", str(tmp_path / "w"), "--out", str(out)],
         tmp_path)
    res = json.loads(out.read_text())
    steps = res["steps"]
    assert set(steps) == {"search", "semdedup", "train", "evaluate"}
    assert steps["search"]["assignment_equal"] and steps["search"]["rows_per_s"] > 0
    assert steps["semdedup"]["max_abs_diff_to_cpu"] < 1e-5
    assert steps["train"]["ours_samples_per_s"] > 0 and steps["train"]["open_clip_samples_per_s"] > 0
    assert steps["evaluate"]["images"] == 128


def test_reshard_bench_toy(tmp_path):
    out = tmp_path / "reshard.json"
    _run(["bench/bench_reshard.py", "--shards", "2", "--per-shard", "60", "--workdir", str(tmp_path / "w"),
          "--repeat", "1", "--out", str(out)], tmp_path)
    res = json.loads(out.read_text())
    assert all(res["byte_identical_to_reference"].values())
    # tar floor, the whole command with 1 and 2 workers, the reference path, the fixed cost, the worker loop
    assert len(res["results"]) == 6


def test_scale_bench_tiny(tmp_path):
    """bench_scale.py end to end at two toy sizes (the second a row prefix of the larger pool):
    every stage measured through the CLI, the chain's counts consistent, the pools deleted."""
    out, work = tmp_path / "scale.json", tmp_path / "w"
    _run(["bench/bench_scale.py", "--rows", "4000,8000", "--rows-per-file", "2000", "--dim", "8",
          "--concepts", "20", "--rows-per-cluster", "200", "--dbp-clusters", "5", "--niter", "2",
          "--clip-fraction", "0.3", "--executor", "inline", "--workdir", str(work), "--out", str(out)], tmp_path)
    res = json.loads(out.read_text())
    assert [r["rows"] for r in res["results"]] == [4000, 8000]
    for r in res["results"]:
        stages = r["stages"]
        assert list(stages) == ["clip-score", "semdedup", "dbp", "keep-list info"]
        for s in stages.values():
            assert s["wall_s"] > 0 and s["peak_rss_mib"] > 10 and s["command"]
        kept = r["kept"]
        assert int(0.3 * r["rows"]) <= kept["clip-score"] < r["rows"]  # the top 30%, ties kept
        assert 0 < kept["dbp"] < kept["semdedup"] <= kept["clip-score"]
        assert stages["semdedup"]["parameters"]["clusters"] == round(kept["clip-score"] / 200)
    assert set(res["fit"]) == {"clip-score", "semdedup", "dbp", "keep-list info"}
    assert not any(p.name.startswith(("pool", "out_")) for p in work.iterdir())  # disk given back
