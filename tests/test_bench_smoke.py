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
          "--out", str(out)], tmp_path)
    res = json.loads(out.read_text())
    assert all(res["byte_identical_to_reference"].values())
    # tar floor, the whole command with 1 and 2 workers, its worker loop alone, the reference path
    assert len(res["results"]) == 5
