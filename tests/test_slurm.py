"""The job layer on a real SLURM cluster (tests/slurm_cluster.sh): arrays, multi-node jobs,
requeue after preemption, failures and cancellation."""

import json
import subprocess
import time

import pytest

from conceptprune.slurm.diagnostics import CountingStage, allreduce_check
from conceptprune.slurm.jobs import JobCancelledError, JobFailedError
from conceptprune.slurm.options import ClusterOptions
from conceptprune.slurm.stage import Executor
from conceptprune.slurm.status import queued_or_running

pytestmark = pytest.mark.slurm


def _scontrol(*args) -> str:
    return subprocess.run(["scontrol", *args], capture_output=True, text=True, check=True).stdout


def _wait_until(cond, timeout=90, what="condition"):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if cond():
            return
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def _count(stage, rank=0):
    p = stage.state_path(rank)
    return json.loads(p.read_text())["count"] if p.exists() else -1


def _release_when_requeued(job_id):
    """Slurm holds a requeued job ~120 s (BeginTime); let it start now."""
    def held():
        info = _scontrol("show", "job", job_id)
        return "JobState=PENDING" in info and "BeginTime" in info
    _wait_until(held, 60, f"job {job_id} to be requeued")
    # slurmd refuses a relaunch in the same second the old run's credential was revoked
    # ("Job credential revoked"); the ~120 s hold exists for that. Two seconds suffice.
    time.sleep(2)
    _scontrol("update", f"JobId={job_id}", "StartTime=now")


def test_job_array_of_four_parts_and_rerun_does_nothing(slurm_cluster, tmp_path):
    stage = CountingStage(work_dir=str(tmp_path), steps=1, step_seconds=0.1)
    sub = Executor.create("slurm", ClusterOptions(time=5)).submit(stage, 4)
    assert len(sub.jobs) == 4 and all("_" in j for j in sub.job_ids)  # one SLURM array
    res = sub.wait(poll_s=0.3)
    assert [s["rank"] for s in res.summaries] == [0, 1, 2, 3]
    assert len(list(stage.marker_dir().glob("*.json"))) == 4
    again = Executor.create("slurm").submit(stage, 4)
    assert again.jobs == [] and again.wait().summaries == res.summaries


def test_two_nodes_allreduce(slurm_cluster, tmp_path):
    results = Executor.create("slurm", ClusterOptions(nodes=2, tasks_per_node=1, time=5)).run_job(
        allreduce_check, "gloo", folder=tmp_path, name="allreduce")
    assert sorted(r["rank"] for r in results) == [0, 1]
    assert {r["node"] for r in results} == {"node1", "node2"}
    assert all(r["ok"] and r["sum"] == 3.0 for r in results)


@pytest.mark.parametrize("how", ["preemption-signal", "scontrol-requeue"])
def test_preempted_job_resumes_from_saved_state(slurm_cluster, tmp_path, how):
    # long enough that the killed first run cannot finish within SLURM's KillWait (5 s):
    # submitit ignores the SIGTERM that comes first, so only SIGKILL stops it
    stage = CountingStage(work_dir=str(tmp_path), steps=30, step_seconds=0.4)
    # 15 min: submitit calls any signal a time-out when the limit is 10 min or less
    sub = Executor.create("slurm", ClusterOptions(time=15)).submit(stage, 1)
    job_id = sub.job_ids[0].split("_")[0]
    _wait_until(lambda: _count(stage) >= 2, what="the job to count")
    if how == "preemption-signal":  # what SLURM sends before preempting: submitit checkpoints + requeues
        subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
    else:  # an operator's requeue: the job is killed and started again
        _scontrol("requeue", job_id)
    _release_when_requeued(job_id)
    res = sub.wait(poll_s=0.3)
    assert res.summaries[0]["count"] == 30
    starts = json.loads(stage.state_path(0).read_text())["starts"]
    assert len(starts) == 2
    assert starts[1]["count"] >= 2 and starts[1]["restart"] == 1  # resumed, not restarted from zero


def test_failing_job_error_carries_log_tail(slurm_cluster, tmp_path):
    stage = CountingStage(work_dir=str(tmp_path), steps=3, step_seconds=0.1, fail_at=1)
    with pytest.raises(JobFailedError) as err:
        Executor.create("slurm", ClusterOptions(time=5)).run(stage, 1)
    assert "failed at step 1, as asked" in str(err.value)
    assert "RuntimeError" in err.value.log_tail
    assert err.value.log_path and err.value.log_path.endswith(".err")


def test_cancelled_job_is_reported_as_cancelled(slurm_cluster, tmp_path):
    stage = CountingStage(work_dir=str(tmp_path), steps=100, step_seconds=0.5)
    sub = Executor.create("slurm", ClusterOptions(time=10)).submit(stage, 1)
    _wait_until(lambda: _count(stage) >= 1, what="the job to start")
    subprocess.run(["scancel", sub.job_ids[0].split("_")[0]], check=True)
    with pytest.raises(JobCancelledError, match="cancelled"):
        sub.wait(poll_s=0.3)


def test_stage_graph_afterok_with_a_detached_launcher(slurm_cluster, tmp_path):
    """A launcher submits two stages, the second after the first (afterok), and exits at
    once; SLURM runs the graph on its own; status follows it; a rerun collects the result."""
    import os
    import sys
    import textwrap

    from conceptprune.slurm.stage import Executor
    from conceptprune.slurm.status import status

    script = tmp_path / "launch.py"
    script.write_text(textwrap.dedent(f"""
        from conceptprune.slurm.diagnostics import CountingStage
        from conceptprune.slurm.options import ClusterOptions
        from conceptprune.slurm.stage import Executor
        ex = Executor.create("slurm", ClusterOptions(time=5), detach=True)
        a = CountingStage(work_dir={str(tmp_path)!r}, steps=6, step_seconds=0.3, name="first")
        b = CountingStage(work_dir={str(tmp_path)!r}, steps=1, step_seconds=0.1, name="second")
        sa = ex.submit(a, 2)
        sb = ex.submit(b, 1, after=[sa])
        assert ex.finish(sb) is None
        print(" ".join(sa.job_ids), "|", " ".join(sb.job_ids))
    """))
    t0 = time.time()
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=os.environ, timeout=120)
    assert out.returncode == 0, out.stderr
    assert time.time() - t0 < 30  # the launcher did not wait for the 2 s of counting
    first_ids, second_ids = [s.split() for s in out.stdout.strip().split("|")]
    second = second_ids[0].split("_")[0]
    info = _scontrol("show", "job", second)
    assert "Dependency=afterok:" in info and first_ids[0].split("_")[0] in info
    a = CountingStage(work_dir=str(tmp_path), steps=6, step_seconds=0.3, name="first")
    b = CountingStage(work_dir=str(tmp_path), steps=1, step_seconds=0.1, name="second")
    _wait_until(lambda: b.marker(0, 1).exists(), 120, "the second stage to finish")
    assert b.marker(0, 1).stat().st_mtime >= max(a.marker(r, 2).stat().st_mtime for r in range(2))
    assert {r.stage: r.state for r in status(tmp_path)} == {"first": "done", "second": "done"}
    res = Executor.create("slurm").run(b, 1)  # collecting afterwards submits nothing
    assert res.ran == [] and res.summaries[0]["count"] == 1


def test_status_shows_a_running_and_a_failed_slurm_stage(slurm_cluster, tmp_path):
    from conceptprune.slurm.stage import Executor
    from conceptprune.slurm.status import status

    ex = Executor.create("slurm", ClusterOptions(time=5))
    slow = CountingStage(work_dir=str(tmp_path / "slow"), steps=100, step_seconds=0.3)
    bad = CountingStage(work_dir=str(tmp_path / "bad"), steps=3, step_seconds=0.05, fail_at=1)
    s1 = ex.submit(slow, 1)
    s2 = ex.submit(bad, 1)
    _wait_until(lambda: _count(slow) >= 1, what="the slow job to start")
    with pytest.raises(JobFailedError):
        s2.wait(poll_s=0.3)
    def rows():
        return {r.work_dir.rsplit("/", 1)[1]: r for r in status(tmp_path)}
    # accounting may lag the job by a poll or two
    _wait_until(lambda: rows()["slow"].state == "running", 30, "status to show the slow job running")
    rows = rows()
    assert rows["bad"].state == "failed" and "failed at step 1, as asked" in rows["bad"].failure
    subprocess.run(["scancel", s1.job_ids[0].split("_")[0]], check=True)


def test_rerun_while_jobs_run_waits_for_them_instead_of_submitting_again(slurm_cluster, tmp_path):
    """A detached launcher's jobs are still queued or running when the same command is run
    again: the rerun waits for those jobs (found through submission.record and sacct) and
    submits nothing for their parts; only a part with no live job is submitted."""
    ex = Executor.create("slurm", ClusterOptions(time=5), detach=True)
    stage = CountingStage(work_dir=str(tmp_path), steps=8, step_seconds=0.4, name="slow")
    first = ex.submit(stage, 3)
    assert ex.finish(first) is None and len(first.job_ids) == 3
    first.jobs[2].cancel()  # this part's job will not run: a rerun must submit it again
    _wait_until(lambda: first.job_ids[2] not in queued_or_running(first.job_ids), 30, "the cancel")
    again = Executor.create("slurm", ClusterOptions(time=5)).submit(stage, 3)
    assert again.job_ids[:2] == first.job_ids[:2]  # reattached, not resubmitted
    assert len(again.job_ids) == 3 and again.job_ids[2] not in first.job_ids
    res = again.wait()
    assert [s["count"] for s in res.summaries] == [8, 8, 8]
    starts = [json.loads(stage.state_path(r).read_text())["starts"] for r in range(2)]
    assert [len(s) for s in starts] == [1, 1]  # parts 0 and 1 ran once, in the first jobs
