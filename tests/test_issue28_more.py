"""Issue 28, the remaining friction items: compare --partial marks averages over fewer than 38
tasks and fills `kept` from the run's own records; compare and report refuse an existing
non-empty --out without --overwrite; evaluate package warns on a run of another scale; status
shows a finished training run and a finished reshard as finished."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import numpy as np
import pytest

from conceptprune.cli import main

ROWS = 60


def _cli(capsys, *argv):
    capsys.readouterr()
    rc = main(["--quiet", *map(str, argv)])
    out, err = capsys.readouterr()
    return rc, out, err.strip().splitlines()


@pytest.fixture(scope="module")
def resharded(tmp_path_factory):
    """A real keep-list (filter random, with its manifest), its pool's shards, and reshard's output."""
    from conceptprune import keeplist as K
    from conceptprune.data.reshard import reshard
    from conceptprune.slurm.stage import Executor
    from conceptprune.synthetic import SyntheticPoolConfig, make_pool, write_shards

    d = tmp_path_factory.mktemp("chain")
    make_pool(d / "pool", SyntheticPoolConfig(rows=ROWS, files=1, seed=3, concepts=3, block_rows=30,
                                              embedding_keys=("l14_img",)), progress=False)
    assert main(["--quiet", "filter", "random", "--pool", str(d / "pool"), "--out", str(d / "keep.npy"),
                 "--fraction", "0.5", "--seed", "1"]) == 0
    write_shards(d / "pool", d / "shards", rows=np.arange(ROWS), per_shard=20, progress=False)
    meta = reshard(d / "shards", d / "keep.npy", d / "data", shard_size=100, executor=Executor.create("inline"))
    return {"dir": d, "keep": d / "keep.npy", "data": d / "data", "meta": meta,
            "entries": len(K.read_keep_list(d / "keep.npy", multiset=True))}


def _run_folder(root: Path, resharded, scale="tiny", model="tiny-vit") -> Path:
    """run.json as train writes it: the data sources described by training's own resolve_data."""
    from conceptprune.training.launch import resolve_data

    _, sources = resolve_data([str(resharded["data"])])
    run = root / "runs" / "r1"
    run.mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"kind": "training-run", "name": "r1", "scale": scale,
                                              "recipe": {"model": model}, "data": sources}))
    return run


def _results(folder: Path, keys, run: Path | None = None) -> Path:
    from conceptprune.evaluation.run import _record_model

    folder.mkdir(parents=True)
    p = folder / "eval_results.jsonl"
    p.write_text("".join(json.dumps({"key": k, "dataset": k, "metrics": {"main_metric": 0.1 + 0.01 * i}}) + "\n"
                         for i, k in enumerate(keys)))
    if run is not None:  # what evaluate --model RUN writes beside its results
        _record_model(folder, str(run), "tiny-vit", None)
    return p


def _main_keys():
    from conceptprune.evaluation.tasks import TASKS

    return [t.key for t in TASKS if t.main_metric is not None]


def test_compare_partial_marks_n_of_38_and_fills_kept_from_the_run(tmp_path, resharded, capsys):
    keys = _main_keys()
    assert len(keys) == 38
    run = _run_folder(tmp_path, resharded)
    res = _results(tmp_path / "results" / "mine", ["imagenet1k", *[k for k in keys if k != "imagenet1k"][:4]], run)
    rc, out, err = _cli(capsys, "compare", res, "--partial", "--scale", "medium", "--out", tmp_path / "cmp")
    assert rc == 0, err
    mine = next(line for line in out.splitlines() if line.startswith("| mine | run |"))
    assert "(5/38)" in mine, mine  # the printed table marks the partial average
    kept = resharded["entries"]
    assert 0 < kept < ROWS and f"| mine | run | {kept} |" in mine, mine  # kept from run.json's keep-list manifest
    assert "(5/38)" in (tmp_path / "cmp" / "comparison.md").read_text()
    rows = {r["run"]: r for r in csv.DictReader(open(tmp_path / "cmp" / "aggregates.csv"))}
    assert rows["mine"]["average_tasks"] == "5/38" and rows["mine"]["kept"] == str(kept)
    assert all(r["average_tasks"] == "38/38" for n, r in rows.items() if n != "mine")
    per_task = list(csv.DictReader(open(tmp_path / "cmp" / "per_task.csv")))
    assert per_task[-1]["key"] == "average" and "mine: 5/38" in per_task[-1]["task"]
    # a full results file beside the run (RUN/eval/): no mark, kept still found
    full = _results(run / "eval", keys)
    from conceptprune.evaluation.compare import compare

    agg = compare([str(full)], scale=None)["aggregates"][0]
    assert agg["average_tasks"] == "38/38" and agg["kept"] == kept
    assert "/38)" not in compare([str(full)], scale=None)["markdown"]


def test_compare_and_report_refuse_a_non_empty_out_without_overwrite(tmp_path, capsys):
    res = _results(tmp_path / "r", _main_keys())
    out = tmp_path / "cmp"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    rc, _, err = _cli(capsys, "compare", res, "--scale", "none", "--out", out)
    assert rc == 2 and len(err) == 1 and "--overwrite" in err[0] and str(out) in err[0], err
    assert sorted(p.name for p in out.iterdir()) == ["mine.txt"]  # refused before any work
    rc, _, err = _cli(capsys, "compare", res, "--scale", "none", "--out", out, "--overwrite")
    assert rc == 0, err
    assert (out / "comparison.md").is_file()
    rc, _, err = _cli(capsys, "compare", res, "--scale", "none", "--out", tmp_path / "new")  # new folder: fine
    assert rc == 0, err
    # report: refused before it reads the (missing) keep-list; with --overwrite it gets that far
    rep = tmp_path / "rep"
    rep.mkdir()
    (rep / "index.html").write_text("an old report")
    rc, _, err = _cli(capsys, "report", tmp_path / "none.npy", "--out", rep)
    assert rc == 2 and len(err) == 1 and "--overwrite" in err[0], err
    rc, _, err = _cli(capsys, "report", tmp_path / "none.npy", "--out", rep, "--overwrite")
    assert rc == 2 and len(err) == 1 and "none.npy" in err[0] and "--overwrite" not in err[0], err
    assert (rep / "index.html").read_text() == "an old report"


def test_package_warns_when_the_run_was_trained_at_another_scale(tmp_path, resharded, caplog):
    from conceptprune.evaluation.package import package

    run = _run_folder(tmp_path, resharded, scale="tiny", model="tiny-vit")
    res = _results(tmp_path / "results" / "dbp", _main_keys(), run)
    with caplog.at_level(logging.WARNING):
        d = package(str(res), [str(resharded["keep"])], "medium", str(tmp_path / "bundle"))
    assert (d / "results.jsonl").is_file()
    msg = [r.getMessage() for r in caplog.records if "--scale medium" in r.getMessage()]
    assert msg and "scale tiny" in msg[0] and "tiny-vit" in msg[0] and "ViT-B-32" in msg[0], msg
    # a medium run of DataComp's architecture: nothing to say; --force silences the warning
    from conceptprune.evaluation.package import check_run_scale

    ok = tmp_path / "ok"
    ok.mkdir()
    good = _run_folder(ok, resharded, scale="medium", model="ViT-B-32")
    assert check_run_scale(_results(ok / "res", _main_keys(), good), "medium") is None
    assert "architecture ViT-B-32" in check_run_scale(_results(ok / "res2", _main_keys(), good), "xlarge")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert check_run_scale(res, "medium", force=True)
    assert not [r for r in caplog.records if "--scale" in r.getMessage()]


def test_status_shows_a_finished_reshard_and_a_finished_training_run(tmp_path, resharded, capsys):
    from conceptprune.slurm.progress import write_progress

    rc, out, err = _cli(capsys, "status", resharded["data"])
    assert rc == 0, err
    assert "no stages found" not in out and "reshard" in out and "finished" in out, out
    assert f"{resharded['meta']['kept_samples']} samples in {resharded['meta']['output_shard_count']} shards" in out
    run = tmp_path / "run"
    run.mkdir()
    write_progress(run, done=7, total=16, unit="steps", rate=123.0)  # the last update before the end
    (run / "run.json").write_text(json.dumps({"name": "run", "status": "running"}))
    rc, out, _ = _cli(capsys, "status", run)
    assert "step 7/16" in out  # while it runs: the progress line
    (run / "run.json").write_text(json.dumps({"name": "run", "status": "finished",
                                              "final_checkpoint": str(run / "checkpoints" / "epoch_1.pt")}))
    rc, out, err = _cli(capsys, "status", run)
    assert rc == 0, err
    assert "step 7/16" not in out and "finished" in out and "epoch_1.pt" in out, out
