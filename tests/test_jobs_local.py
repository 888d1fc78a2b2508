"""The job layer without SLURM: local processes and in-process debug runs, options."""

import json
import textwrap

import pytest

from conceptprune.errors import ConfigError
from conceptprune.slurm import executor as E
from conceptprune.slurm.diagnostics import CountingStage, allreduce_check
from conceptprune.slurm.jobs import JobFailedError
from conceptprune.slurm.options import ClusterOptions, parse_mem, parse_time
from conceptprune.slurm.stage import Executor


@pytest.mark.parametrize("executor", ["local", "debug"])
def test_stage_parts_run_once_and_rerun_skips(tmp_path, executor):
    stage = CountingStage(work_dir=str(tmp_path), steps=2, step_seconds=0.01)
    res = Executor.create(executor, workers=2).run(stage, 4)
    assert [s["rank"] for s in res.summaries] == [0, 1, 2, 3]
    assert sorted(res.ran) == [0, 1, 2, 3]
    assert len(list(stage.marker_dir().glob("*.json"))) == 4
    again = Executor.create(executor).run(stage, 4)
    assert again.ran == [] and again.summaries == res.summaries
    for r in range(4):  # each part ran exactly once
        assert len(json.loads(stage.state_path(r).read_text())["starts"]) == 1


def test_partial_rerun_runs_only_missing_parts(tmp_path):
    stage = CountingStage(work_dir=str(tmp_path), steps=1, step_seconds=0)
    Executor.create("local").run(stage, 3)
    stage.marker(1, 3).unlink()
    res = Executor.create("local").run(stage, 3)
    assert res.ran == [1]


def test_changed_world_size_is_refused(tmp_path):
    stage = CountingStage(work_dir=str(tmp_path), steps=1, step_seconds=0)
    Executor.create("inline").run(stage, 2)
    with pytest.raises(ConfigError, match="started with 2 parts"):
        Executor.create("inline").run(stage, 3)


def test_local_failure_carries_log_tail(tmp_path):
    stage = CountingStage(work_dir=str(tmp_path), steps=3, step_seconds=0.01, fail_at=1)
    with pytest.raises(JobFailedError) as err:
        Executor.create("local").run(stage, 1)
    assert "failed at step 1, as asked" in str(err.value)
    assert "failed at step 1, as asked" in err.value.log_tail
    assert not stage.marker(0, 1).exists()


def test_local_two_task_allreduce(tmp_path):
    results = Executor.create("local", ClusterOptions(tasks_per_node=2, time=5)).run_job(
        allreduce_check, "gloo", folder=tmp_path, name="t")
    assert sorted(r["rank"] for r in results) == [0, 1]
    assert all(r["ok"] and r["world_size"] == 2 for r in results)


def test_auto_falls_back_to_local_without_a_controller(monkeypatch, tmp_path):
    monkeypatch.setenv("SLURM_CONF", str(tmp_path / "no-such-slurm.conf"))
    E._slurm_answers.cache_clear()
    assert E.resolve_executor("auto") == "local"
    with pytest.raises(ConfigError, match="no SLURM controller"):
        E.resolve_executor("slurm")
    E._slurm_answers.cache_clear()


def test_options_from_profile_and_flags(tmp_path):
    import argparse

    from conceptprune.slurm.options import add_cluster_args, options_from_args

    prof = tmp_path / "c.yaml"
    prof.write_text(textwrap.dedent("""
        partition: gpu
        account: proj
        time: "1-00:00:00"
        gpus_per_node: 8
        mem: 480G
        setup: ["module load cuda"]
        extra: {exclusive: true}
    """))
    p = argparse.ArgumentParser()
    add_cluster_args(p, distributed=True)
    kind, o = options_from_args(p.parse_args(["--cluster-profile", str(prof), "--partition", "a100",
                                              "--nodes", "2", "--sbatch", "comment=x"]))
    assert kind == "auto"
    assert (o.partition, o.account, o.nodes, o.gpus_per_node, o.timeout_min, o.mem_gb) == ("a100", "proj", 2, 8, 1440, 480)
    assert o.extra == {"exclusive": True, "comment": "x"} and o.setup == ["module load cuda"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("partishun: gpu\n")
    with pytest.raises(ConfigError, match="unknown option"):
        ClusterOptions.from_yaml(bad)


def test_time_and_memory_parsing():
    assert [parse_time(x) for x in ("90", "1:30", "2:00:00", "1-0", "1-2:30", "0:0:1", 5)] == [90, 2, 120, 1440, 1590, 1, 5]
    assert parse_mem("64G") == 64 and parse_mem("512M") == 0.5
    for bad in ("soon", "1:2:3:4"):
        with pytest.raises(ConfigError):
            parse_time(bad)
    with pytest.raises(ConfigError):
        parse_mem("lots")


def test_slurm_executor_script_has_requested_directives(tmp_path):
    """The sbatch script submitit would write carries our options (no cluster needed)."""
    o = ClusterOptions(partition="gpu", account="proj", qos="high", time="2:00:00", nodes=2, tasks_per_node=8,
                       gpus_per_node=8, cpus_per_task=12, mem="480G", constraint="a100", extra={"exclusive": True},
                       setup=["module load cuda"])
    ex = E._submitit_slurm(o, tmp_path, "x")
    script = ex._executor._make_submission_file_text("python -c pass", "%j")
    for line in ("#SBATCH --partition=gpu", "#SBATCH --account=proj", "#SBATCH --qos=high", "#SBATCH --time=120",
                 "#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --cpus-per-task=12", "#SBATCH --mem=480GB", "#SBATCH --constraint=a100",
                 "#SBATCH --exclusive", "module load cuda", "#SBATCH --signal=USR2@120"):
        assert line in script, line


def test_local_workers_are_forked_only_where_that_is_safe(tmp_path):
    """A fresh launcher forks its second worker (no interpreter start); once an OpenMP runtime
    is loaded (faiss: a child forked after its k-means deadlocks, measured) or another Python
    thread runs, workers are fresh interpreters again. Checked in a fresh process."""
    import subprocess
    import sys

    code = textwrap.dedent(f"""
        import threading
        from conceptprune.slurm.diagnostics import CountingStage
        from conceptprune.slurm.executor import ForkJob, fork_is_safe
        from conceptprune.slurm.stage import Executor
        ex = Executor.create("local", workers=2)
        safe = fork_is_safe()
        sub = ex.submit(CountingStage(work_dir={str(tmp_path / 'a')!r}, steps=1, step_seconds=0), 2)
        forked = [isinstance(j, ForkJob) for j in sub.jobs]
        assert sub.wait().ran == [0, 1]
        t = threading.Thread(target=threading.Event().wait, args=(2,), daemon=True)
        t.start()
        with_thread = fork_is_safe()
        t.join()
        import faiss  # noqa: F401 - loads libgomp
        sub = ex.submit(CountingStage(work_dir={str(tmp_path / 'b')!r}, steps=1, step_seconds=0), 2)
        spawned = [isinstance(j, ForkJob) for j in sub.jobs]
        assert sub.wait().ran == [0, 1]
        print(safe, forked, with_thread, fork_is_safe(), spawned)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split("\n")[-2] == "True [True] False False [False]"
