"""Training as a stage of the job layer: it waits for its job on every executor (SLURM too),
its completion is the executor's marker, and its inputs and run name are checked first."""

import json
import re
import time
from pathlib import Path

import pytest

from conceptprune.errors import ConfigError
from conceptprune.slurm.options import ClusterOptions
from conceptprune.slurm.stage import Executor
from conceptprune.training.launch import TrainConfig, train
from conftest import write_circle_shards


@pytest.fixture(scope="module")
def tiny_shards(tmp_path_factory):
    return write_circle_shards(tmp_path_factory.mktemp("shards"), 2, 40)


def _cfg(shards, out, name, **kw):
    return TrainConfig([str(shards)], "tiny", str(out), name=name, samples_seen=kw.pop("samples_seen", 128),
                       checkpoints=kw.pop("checkpoints", 1), **kw)


# -- on the localhost SLURM cluster ------------------------------------------------------------


@pytest.mark.slurm
def test_slurm_train_waits_and_evaluate_takes_the_run(slurm_cluster, tiny_shards, tmp_path):
    """issue 26: where a controller answers, train() returned at once with status 'submitted',
    and evaluate (as the demo and the scaling sweep call it next) found no final checkpoint."""
    from conceptprune.evaluation.run import resolve_model

    t0 = time.time()
    rec = train(_cfg(tiny_shards, tmp_path / "runs", "s"), executor=Executor.create("slurm", ClusterOptions(time=15)))
    took = time.time() - t0
    run = tmp_path / "runs" / "s"
    try:
        arch, ckpt = resolve_model(str(run), None)  # what `evaluate --model RUN` does first
    except ConfigError as e:
        pytest.fail(f"train returned after {took:.1f} s with status {rec['status']!r}; evaluate: {e}")
    assert rec["status"] == "finished"
    assert arch == "cp-tiny-vit" and Path(ckpt) == run / "checkpoints" / "epoch_1.pt"


# -- issue 27.10: a reshard output that lost (or never had) shards is refused -------------------


@pytest.fixture(scope="module")
def resharded(tiny_shards, tmp_path_factory):
    """The real reshard of every sample of tiny_shards into 4 shards of 20."""
    import numpy as np

    from conceptprune.data.reshard import reshard
    from conceptprune.uids import uids_to_array

    base = tmp_path_factory.mktemp("resharded")
    uids = uids_to_array([f"{s:016x}{i:016x}" for s in range(2) for i in range(40)])
    uids.sort()
    np.save(base / "keep.npy", uids)
    meta = reshard(tiny_shards, base / "keep.npy", base / "out", shard_size=20, executor=Executor.create("inline"))
    assert meta["output_shard_count"] == 4
    return base / "out"


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_train_refuses_shards_that_disagree_with_meta_and_sizes(resharded, tmp_path):
    runs = tmp_path / "runs"
    ok = train(_cfg(resharded, runs, "ok"), executor=Executor.create("local"), dry_run=True)  # the intact output is taken
    assert ok["data"][0]["shards"] == 4 and ok["data"][0]["samples"] == 80
    lost = _copy(resharded, tmp_path / "lost")
    (lost / "00000003.tar").unlink()  # a shard lost: meta.json says 4, 3 are there
    with pytest.raises(ConfigError, match=r"sizes.json lists 1 shard\(s\) that are not there \(first 00000003.tar\)"):
        train(_cfg(lost, runs, "lost"), executor=Executor.create("local"), dry_run=True)
    (lost / "sizes.json").unlink()
    with pytest.raises(ConfigError, match="meta.json says output_shard_count 4, the folder holds 3"):
        train(_cfg(lost, runs, "lost"), executor=Executor.create("local"), dry_run=True)
    claims = _copy(resharded, tmp_path / "claims")
    meta = json.loads((claims / "meta.json").read_text())
    (claims / "meta.json").write_text(json.dumps({**meta, "output_shard_count": 100}))
    with pytest.raises(ConfigError, match="meta.json says output_shard_count 100, the folder holds 4"):
        train(_cfg(claims, runs, "claims"), executor=Executor.create("local"), dry_run=True)
    extra = _copy(resharded, tmp_path / "extra")
    (extra / "00000009.tar").write_bytes((extra / "00000000.tar").read_bytes())
    with pytest.raises(ConfigError, match="00000009.tar is not in sizes.json"):
        train(_cfg(extra, runs, "extra"), executor=Executor.create("local"), dry_run=True)
    bad = _copy(resharded, tmp_path / "bad")
    (bad / "meta.json").write_text("{not json")
    with pytest.raises(ConfigError, match="meta.json: unreadable"):
        train(_cfg(bad, runs, "bad"), executor=Executor.create("local"), dry_run=True)
    assert not runs.exists()


# -- issue 27.4: a run name is one folder inside --output --------------------------------------


def test_train_refuses_a_name_outside_output(tiny_shards, tmp_path):
    out = tmp_path / "a" / "runs"
    for name in ("../../x", "/abs/x", str(tmp_path / "abs"), "..", ".", "a/b", ""):
        with pytest.raises(ConfigError, match="a run name is one folder name inside --output"):
            train(_cfg(tiny_shards, out, name), executor=Executor.create("local"))
    assert not (tmp_path / "x").exists() and not (tmp_path / "abs").exists() and not out.exists()


# -- issue 27.11 and 27.12: a second train does not join a run still training; no ETA once it is killed --


def test_second_local_train_refuses_a_live_run_and_status_drops_the_eta_after_kill_9(tiny_shards, tmp_path):
    import os
    import signal
    import subprocess
    import sys

    from conceptprune.slurm.progress import format_progress, read_progress
    from conceptprune.slurm.status import progress_files, status

    runs = tmp_path / "runs"
    code = ("from conceptprune.slurm.stage import Executor\nfrom conceptprune.training.launch import TrainConfig, train\n"
            f"train(TrainConfig([{str(tiny_shards)!r}], 'tiny', {str(runs)!r}, name='r', samples_seen=64 * 400, "
            "checkpoints=1), executor=Executor.create('local'))\n")
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen([sys.executable, "-c", code], stdout=log, stderr=subprocess.STDOUT)
    run = runs / "r"
    try:
        t0 = time.time()
        while (read_progress(run) or {}).get("eta_s") is None and time.time() - t0 < 120 and first.poll() is None:
            time.sleep(0.2)
        assert first.poll() is None and read_progress(run).get("eta_s"), (tmp_path / "first.log").read_text()[-2000:]
        cli = "import sys; from conceptprune.cli import main; sys.exit(main(sys.argv[1:]))"
        try:
            second = subprocess.run([sys.executable, "-c", cli, "train", "--data", str(tiny_shards), "--scale", "tiny",
                                     "--output", str(runs), "--name", "r", "--samples-seen", str(64 * 400),
                                     "--checkpoints", "1", "--executor", "local"],
                                    capture_output=True, text=True, timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail("the second train joined the run still training (still running after 60 s); starts.jsonl: "
                        + (run / "starts.jsonl").read_text())
        assert second.returncode != 0 and first.poll() is None
        assert re.search(r"train: part 0 of 1 .* is being run now by process \d+", second.stderr), second.stderr
        assert len((run / "starts.jsonl").read_text().splitlines()) == 1  # no second training in the folder
        (row,) = status(runs)
        assert (row.stage, row.state, row.running) == ("train", "running", 1)
        (folder, p), = progress_files(runs)
        assert p["live"] and p.get("eta_s") is not None
        os.kill(first.pid, signal.SIGKILL)  # the launcher; its local worker follows it
        first.wait()
        t0 = time.time()
        while status(runs)[0].running and time.time() - t0 < 30:
            time.sleep(0.2)
        (row,) = status(runs)
        assert row.state == "incomplete" and row.running == 0
        (folder, p), = progress_files(runs)
        assert p["live"] is False and "eta_s" not in p and "ETA" not in format_progress(p)
        assert read_progress(run).get("eta_s") is not None  # the file still says it: status knows better
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()


# -- issue 27.12: status says what it cannot tell ---------------------------------------------


def _stage_dir(root, record):
    d = root / "work" / ".markers" / "embed"
    d.mkdir(parents=True)
    (d / "submission.record").write_text(record if isinstance(record, str) else json.dumps(record))
    return d


def test_status_cannot_tell_when_sacct_cannot_reach_the_accounting(tmp_path, monkeypatch):
    import shutil

    from conceptprune.slurm.status import _main, status

    if not shutil.which("sacct"):
        pytest.skip("no sacct (install the SLURM client: tests/slurm_cluster.sh install)")
    conf = tmp_path / "etc" / "slurm.conf"  # a cluster whose controller and accounting nobody serves
    conf.parent.mkdir()
    conf.write_text("ClusterName=gone\nSlurmctldHost=localhost\nSlurmctldPort=9\n"
                    "AccountingStorageType=accounting_storage/slurmdbd\nAccountingStorageHost=127.0.0.1\n"
                    "AccountingStoragePort=9\nAuthType=auth/munge\n"
                    f"AuthInfo=socket={tmp_path / 'no-munge.socket'}\n")
    monkeypatch.setenv("SLURM_CONF", str(conf))
    _stage_dir(tmp_path, {"stage": "embed", "world_size": 2, "executor": "slurm", "job_ids": ["7_0", "7_1"],
                          "groups": [[0], [1]], "log_folder": str(tmp_path / "logs")})
    (row,) = status(tmp_path)
    assert row.state == "cannot tell", f"shown {row.state!r} with sacct unable to answer"
    assert set(row.job_states.values()) == {"CANNOT_TELL"} and "cannot tell the SLURM jobs' states" in row.problem
    import argparse

    assert _main(argparse.Namespace(dir=str(tmp_path), json=False)) == 3


def test_status_refuses_records_the_executor_does_not_write(tmp_path):
    from conceptprune.slurm.status import status

    d = _stage_dir(tmp_path / "a", {"stage": "embed", "world_size": -3, "executor": "local", "job_ids": []})
    (row,) = status(tmp_path / "a")
    assert row.state == "unreadable" and "world_size -3 is not a number of parts" in row.problem
    d = _stage_dir(tmp_path / "b", '{"stage": "embed", "world_si')  # truncated
    (row,) = status(tmp_path / "b")
    assert row.state == "unreadable" and str(d / "submission.record") in row.problem
    d = _stage_dir(tmp_path / "c", [1, 2])
    (row,) = status(tmp_path / "c")
    assert row.state == "unreadable" and "a JSON list" in row.problem
    d = _stage_dir(tmp_path / "d", {"stage": "embed", "world_size": 1, "executor": "local", "job_ids": []})
    (d / "abc-of-xyz.json").write_text("{}")
    (row,) = status(tmp_path / "d")
    assert row.state == "unreadable" and "abc-of-xyz.json: not a completion marker" in row.problem


@pytest.mark.slurm
def test_detached_reshard_then_train_run_as_one_afterok_graph(slurm_cluster, tiny_shards, resharded, tmp_path):
    """The reshard stage and the training stage submitted together, detached: the training job
    waits for the reshard's array (afterok in its sbatch script), status shows both, and the
    same train call rerun collects the finished run without submitting again."""
    import subprocess

    from conceptprune.data.reshard import ReshardStage
    from conceptprune.slurm.status import status
    from conceptprune.training.launch import plan_run, submit

    ex = Executor.create("slurm", ClusterOptions(time=10), workers=2, detach=True)
    rs = ReshardStage(str(tmp_path / "work" / "out.state"), [str(t) for t in sorted(tiny_shards.glob("*.tar"))],
                      str(resharded / "sample_ids.npy"), 20)
    r_sub = ex.submit(rs, 2)
    stage, record = plan_run(_cfg(resharded, tmp_path / "work" / "runs", "g"), ex)
    t_sub = submit(stage, record, ex, after=[r_sub])
    assert len(r_sub.jobs) == 2 and len(t_sub.jobs) == 1
    script = Path(t_sub.jobs[0].paths.submission_file).read_text()
    dep = [line for line in script.splitlines() if "--dependency" in line]
    assert dep == [f"#SBATCH --dependency=afterok:{r_sub.jobs[0].job_id}:{r_sub.jobs[1].job_id}"], script
    print("\n".join(["train job's sbatch script:"] + [ln for ln in script.splitlines() if ln.startswith("#SBATCH")]))
    rows = {r.stage: r for r in status(tmp_path / "work")}
    assert set(rows) == {"reshard", "train"} and rows["train"].executor == "slurm"
    print("\n".join(r.line() for r in rows.values()))
    t0 = time.time()
    while not stage.done_parts(1) and time.time() - t0 < 240:
        time.sleep(1)
    assert stage.done_parts(1), (tmp_path / "work" / "runs" / "g" / "out.log").read_text()[-2000:]
    ids = [j.job_id for j in r_sub.jobs] + [t_sub.jobs[0].job_id]
    out = subprocess.run(["sacct", "-n", "-P", "-X", "-o", "JobID,Start,End,State", "-j",
                          ",".join(sorted({i.split("_")[0] for i in ids}))], capture_output=True, text=True).stdout
    times = {line.split("|")[0]: line.split("|")[1:] for line in out.splitlines()}
    print(out)
    assert times[t_sub.jobs[0].job_id][0] >= max(times[j.job_id][1] for j in r_sub.jobs)  # ISO times: started after
    assert [r.state for r in status(tmp_path / "work")] == ["done", "done"]
    record_file = stage.marker_dir() / "submission.record"
    before = record_file.read_text()
    again = train(_cfg(resharded, tmp_path / "work" / "runs", "g"), executor=Executor.create("slurm"))
    assert again["status"] == "finished" and Path(again["final_checkpoint"]).exists()
    assert record_file.read_text() == before  # collected, not submitted again


@pytest.mark.slurm
def test_scaling_sweep_with_training_on_slurm_evaluates_finished_runs(slurm_cluster, tmp_path):
    """issue 26: `scaling sweep --train` (as the demo) calls train, then evaluate on its run;
    on SLURM train returned before the job ran and evaluate found no checkpoint."""
    import numpy as np
    from PIL import Image, ImageDraw

    from conceptprune.apps.scaling import sweep
    from conceptprune.evaluation.wds import write_classification
    from conceptprune.synthetic import SyntheticPoolConfig, make_pool, write_shards

    make_pool(tmp_path / "pool", SyntheticPoolConfig(rows=200, files=1, seed=3, concepts=4,
                                                     embedding_keys=("l14_img",)), progress=False)
    write_shards(tmp_path / "pool", tmp_path / "shards", per_shard=100, progress=False)
    colors = ["red", "green", "blue", "yellow"]
    labels = np.arange(24) % 4
    images = []
    for y in labels:
        im = Image.new("RGB", (32, 32), "white")
        ImageDraw.Draw(im).rectangle([6, 6, 26, 26], fill=colors[y])
        images.append(im)
    write_classification(tmp_path / "eval" / "cifar10", images, labels, colors, ["a {c} square."])
    res = sweep(str(tmp_path / "pool"), "random", [0.5], str(tmp_path / "sweep"), shards=str(tmp_path / "shards"),
                train_scale="tiny", eval_data=str(tmp_path / "eval"), tasks=["cifar10"],
                train_args={"samples_seen": 128, "checkpoints": 1},
                executor=Executor.create("slurm", ClusterOptions(time=10)))
    (row,) = res["rows"]
    assert row["kept"] == 100 and row["accuracy"] is not None and 0.0 <= row["accuracy"] <= 1.0


def test_run_locks_where_the_file_system_takes_none(tmp_path, monkeypatch):
    """Lustre without -o flock answers ENOSYS: parts still run (liveness is then unknown)."""
    import errno
    import fcntl

    from conceptprune.slurm import liveness as L

    with L.hold_part(tmp_path, 0, 2):
        assert L.is_running(tmp_path, 0, 2) and not L.is_running(tmp_path, 1, 2)
        with pytest.raises(L.PartBusyError, match=r"part 0 of 2 .* is being run by process \d+"):
            with L.hold_part(tmp_path, 0, 2, wait_s=0.2):
                pass
    assert not L.is_running(tmp_path, 0, 2)
    real = fcntl.flock

    def no_locks(fd, op):
        if op & fcntl.LOCK_UN:
            return real(fd, op)
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with L.hold_part(tmp_path, 0, 2):
        assert not L.is_running(tmp_path, 0, 2)
