"""Values travel explicitly: the command line a manifest records, whether progress bars are
drawn, a filter's extra outputs (data, not closures), and run.json updates from several
processes (locked, none lost)."""

import json
import multiprocessing
import os
import pickle

import numpy as np
import pandas as pd
from conceptprune import keeplist as K
from conceptprune.cli import main
from conceptprune.filters import random_subset, run_filter
from conceptprune.filters.base import ClusterTable, FilterResult, Within, write_result
from conceptprune.pool import Pool
from conceptprune.progress import progress_bar


def test_manifests_record_the_command_that_made_them(small_pool, tmp_path):
    argv = ["--quiet", "filter", "random", "--pool", str(small_pool), "--out", str(tmp_path / "a.npy"),
            "--fraction", "0.3"]
    assert main(argv) == 0
    assert K.read_manifest(tmp_path / "a.npy")["command"] == ["conceptprune", *argv]
    ops = ["keep-list", "union", str(tmp_path / "a.npy"), str(tmp_path / "a.npy"), "--out", str(tmp_path / "u.npy")]
    assert main(ops) == 0
    assert K.read_manifest(tmp_path / "u.npy")["command"] == ["conceptprune", *ops]
    # a Python call after the command: no command recorded, unless it passes one
    run_filter(random_subset, small_pool, tmp_path / "b.npy", fraction=0.3)
    assert K.read_manifest(tmp_path / "b.npy")["command"] is None
    run_filter(random_subset, small_pool, tmp_path / "c.npy", fraction=0.3, command=["my-script", "--x"])
    assert K.read_manifest(tmp_path / "c.npy")["command"] == ["my-script", "--x"]


def test_quiet_switches_bars_off_for_its_command_only(small_pool, tmp_path, monkeypatch):
    monkeypatch.setenv("CONCEPTPRUNE_PROGRESS", "1")
    assert not progress_bar(total=3).disable  # read when the bar is made
    assert main(["--quiet", "filter", "none", "--pool", str(small_pool), "--out", str(tmp_path / "n.npy")]) == 0
    assert os.environ["CONCEPTPRUNE_PROGRESS"] == "1"  # restored for what runs next in this process
    monkeypatch.setenv("CONCEPTPRUNE_PROGRESS", "0")
    assert progress_bar(total=3).disable


def test_extras_are_data_and_written_beside_the_keep_list(small_pool, tmp_path):
    table = pd.DataFrame({"cluster": np.arange(3, dtype=np.int32), "size": np.array([4, 0, 2]),
                          "kept": np.array([2, 0, 1]), "complexity": np.array([0.1, 0.2, 0.3])})
    uids = np.array([(1, 2), (3, 4), (5, 6)], dtype="u8,u8")
    res = FilterResult("demo", uids, {}, {"pool": 3, "candidates": 3}, extras=ClusterTable(table, "a title"))
    back = pickle.loads(pickle.dumps(res))  # a result is plain data
    assert back.extras.title == "a title" and back.extras.table.equals(table)
    (tmp_path / "out").mkdir()
    write_result(back, tmp_path / "out" / "k.npy", Pool(small_pool), Within(None), 0.0)
    assert pd.read_parquet(tmp_path / "out" / "k.clusters.parquet").equals(table)
    assert (tmp_path / "out" / "k.clusters.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(K.read_keep_list(tmp_path / "out" / "k.npy")) == 3


def _hammer(args):
    from conceptprune.training.launch import _update

    path, worker, n = args
    for i in range(n):
        _update(path, **{f"w{worker}-{i}": i})


def test_concurrent_run_json_updates_lose_nothing(tmp_path):
    """Four processes update run.json 40 times each at once: every key survives."""
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"status": "submitted"}))
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(4) as pool:
        pool.map(_hammer, [(path, w, 40) for w in range(4)])
    data = json.loads(path.read_text())
    assert data["status"] == "submitted"
    missing = [f"w{w}-{i}" for w in range(4) for i in range(40) if f"w{w}-{i}" not in data]
    assert not missing, f"{len(missing)} updates lost, e.g. {missing[:3]}"
