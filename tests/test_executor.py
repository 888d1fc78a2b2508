"""The Executor object: one value that runs every stage, a stage graph, launcher death, status."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from conceptprune.errors import ConfigError
from conceptprune.slurm.diagnostics import CountingStage
from conceptprune.slurm.options import ClusterOptions
from conceptprune.slurm.executor import InlineBackend, LocalBackend, SlurmBackend
from conceptprune.slurm.stage import Executor
from conceptprune.slurm.status import status


def _count(stage, rank=0):
    p = stage.state_path(rank)
    return json.loads(p.read_text())["count"] if p.exists() else -1


def test_executor_is_resolved_once_and_validates(tmp_path):
    assert isinstance(Executor.create("debug").backend, InlineBackend)
    assert isinstance(Executor.create("inline").backend, InlineBackend)
    assert Executor.create("local", workers=3).workers == 3
    assert Executor() == Executor(LocalBackend(), workers=1)  # the one default of --workers: 1 part
    with pytest.raises(ConfigError, match="--workers must be an integer >= 1"):
        Executor.create("local", workers=-2)
    with pytest.raises(ConfigError, match="--detach needs SLURM"):
        Executor.create("local", detach=True)
    with pytest.raises(ConfigError, match="--detach needs SLURM"):
        Executor(InlineBackend(), detach=True)
    ex = Executor.create("local")
    assert Executor.given(ex) is ex
    # past the CLI only Executor objects travel: a kind name is refused like anything else
    with pytest.raises(ConfigError, match=r"pass an Executor \(e.g. Executor.create\('inline'\)\)"):
        Executor.given("inline")
    with pytest.raises(ConfigError, match="pass an Executor"):
        Executor.given(3)
    with pytest.raises(ConfigError, match="Backend object"):
        Executor("slurm")
    with pytest.raises(ConfigError, match="a plan"):  # a dry run's executor (no controller asked) runs nothing
        Executor.plan("slurm").run(CountingStage(work_dir=str(tmp_path), steps=1), 1)
    # the SLURM backend packs parts into array tasks; the local one deals them to its workers
    assert SlurmBackend().pack(list(range(5)), 5, ClusterOptions(parts_per_task=2)) == [[0, 1], [2, 3], [4]]
    assert SlurmBackend().pack([1, 4], 5, ClusterOptions()) == [[1], [4]]
    assert LocalBackend().pack(list(range(5)), 2, ClusterOptions()) == [[0, 2, 4], [1, 3]]
    with pytest.raises(ConfigError, match="--parts-per-task"):
        ClusterOptions(parts_per_task=0).validate()


@pytest.mark.parametrize("backend", [InlineBackend(), LocalBackend(isolated=True)], ids=["inline", "local"])
def test_graph_runs_in_order_locally(tmp_path, backend):
    ex = Executor(backend, workers=2)
    a = CountingStage(work_dir=str(tmp_path), steps=2, step_seconds=0.01, name="first")
    b = CountingStage(work_dir=str(tmp_path), steps=1, step_seconds=0.01, name="second")
    sa = ex.submit(a, 2)
    sb = ex.submit(b, 1, after=[sa])
    # the second stage starts only once every part of the first is marked done
    first_done = max(a.marker(r, 2).stat().st_mtime for r in range(2))
    res = sb.wait()
    assert res.summaries[0]["rank"] == 0
    assert b.marker(0, 1).stat().st_mtime >= first_done
    rows = {r.stage: r for r in status(tmp_path)}
    assert rows["first"].state == "done" and rows["first"].done == 2
    assert rows["second"].state == "done"


@pytest.mark.parametrize("fork", [True, False], ids=["forked", "interpreter"])
def test_killing_the_local_launcher_stops_its_workers(tmp_path, fork):
    """SIGKILL of the process that started local workers (forked, or fresh interpreters): they
    stop within seconds, and a rerun finishes the stage from where it stood."""
    script = tmp_path / "launch.py"
    script.write_text(textwrap.dedent(f"""
        from conceptprune.slurm.diagnostics import CountingStage
        from conceptprune.slurm.executor import LocalBackend
        from conceptprune.slurm.options import ClusterOptions
        from conceptprune.slurm.stage import Executor
        stage = CountingStage(work_dir={str(tmp_path)!r}, steps=400, step_seconds=0.05)
        Executor(LocalBackend(fork={fork}), ClusterOptions(time=5), workers=2).run(stage, 2)
    """))
    proc = subprocess.Popen([sys.executable, str(script)], stderr=subprocess.DEVNULL)
    stage = CountingStage(work_dir=str(tmp_path), steps=400, step_seconds=0.05)
    t0 = time.time()
    while min(_count(stage, 0), _count(stage, 1)) < 1:
        assert time.time() - t0 < 60, "workers never started"
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    time.sleep(2)
    before = [_count(stage, r) for r in range(2)]
    time.sleep(1.5)
    after = [_count(stage, r) for r in range(2)]
    assert before == after, f"workers still counting after their launcher died: {before} -> {after}"
    assert max(after) < 400


def test_status_reports_a_failed_part_with_its_log(tmp_path, capsys):
    from conceptprune.cli import main
    from conceptprune.slurm.jobs import JobFailedError

    ex = Executor(LocalBackend(isolated=True), ClusterOptions(time=5))
    stage = CountingStage(work_dir=str(tmp_path), steps=3, step_seconds=0.01, fail_at=1)
    with pytest.raises(JobFailedError):
        ex.run(stage, 1)
    rows = status(tmp_path)
    assert [r.state for r in rows] == ["failed"]
    assert "failed at step 1, as asked" in rows[0].failure
    assert main(["status", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "0/1" in out and "failed" in out and "as asked" in out


def test_per_row_filters_give_the_same_list_for_any_part_count(small_pool, tmp_path):
    """basic, laion2b and none run as parts on the executor (local processes here, a SLURM
    array on a cluster); the keep-list does not depend on how many parts."""
    import pickle

    from conceptprune.errors import KeepListError
    from conceptprune.filters import basic, keep_all, laion2b, run_filter
    from conceptprune.filters.basic import BasicRule

    for name, fn, kw in (("basic", basic, {}), ("laion2b", laion2b, {"langid": "fasttext"}), ("none", keep_all, {})):
        outs = []
        for ex in (Executor.create("inline"), Executor(LocalBackend(isolated=True), workers=3)):
            out = tmp_path / f"{name}-{ex.kind}.npy"
            res = run_filter(fn, small_pool, out, **kw, executor=ex)
            assert len(res.kept) > 0
            outs.append(out.read_bytes())
            assert not out.with_suffix(".parts").exists()  # the parts are merged and removed
        assert outs[0] == outs[1] and outs[0], name
    rule = BasicRule()  # the language model is loaded in the part's process, never shipped
    assert len(pickle.dumps(rule)) < 1000
    # --within is checked across all parts: a uid from elsewhere is reported
    from conceptprune import keeplist as K
    from conceptprune import uids as U

    within = K.read_keep_list(tmp_path / "none-local.npy")[:50]
    K.write_keep_list(tmp_path / "w.npy", np.concatenate([within, U.uids_to_array(["f" * 32])]))
    with pytest.raises(KeepListError, match="not in the pool"):
        run_filter(keep_all, small_pool, tmp_path / "x.npy", within=tmp_path / "w.npy",
                   executor=Executor(LocalBackend(isolated=True), workers=2))


def _global_selection_cases(pool_dir, tmp_path):
    """clip-score --fraction / --threshold and random (with and without --within), each with
    the keep-list an independent whole-column computation gives (DataComp's sort; all keys)."""
    from conceptprune import keeplist as K
    from conceptprune import uids as U
    from conceptprune.filters import clip_score, random_subset

    from conftest import read_pool_frame

    df = read_pool_frame(pool_dir)
    arr = U.uids_to_array(list(df.uid))
    l14 = df.clip_l14_similarity_score.to_numpy(np.float32)
    thr = -np.sort(-l14)[int(len(l14) * 0.3)]  # DataComp: the score at index int(N f), descending
    by_threshold = arr[df.clip_b32_similarity_score.to_numpy(np.float32) >= np.float32(0.3)]

    def smallest_keys(cand, k, seed):
        hi, lo = U.split(cand)
        return cand[np.lexsort((lo, hi, U.hash_uids(cand, seed)))[:k]]

    within = K.sort_uids(arr[np.arange(len(arr)) % 3 != 1])
    K.write_keep_list(tmp_path / "within.npy", within)
    return [("clip-fraction", clip_score, {"fraction": 0.3}, arr[l14 >= thr]),
            ("clip-threshold", clip_score, {"threshold": 0.3, "model": "b32"}, by_threshold),
            ("random", random_subset, {"fraction": 0.3, "seed": 3}, smallest_keys(arr, round(0.3 * len(arr)), 3)),
            ("random-within", random_subset, {"fraction": 0.25, "seed": 8, "within": tmp_path / "within.npy"},
             smallest_keys(within, round(0.25 * len(within)), 8))]


def test_global_selections_are_the_same_for_any_part_count(small_pool, tmp_path):
    """clip-score's scans and random run as row-range parts; the exact global selection at
    the merge gives the same keep-list, byte for byte, for any part count and executor, and
    it is the whole-column answer."""
    from conceptprune import keeplist as K
    from conceptprune.filters import run_filter

    executors = {"inline-1": Executor.create("inline"), "inline-3": Executor.create("inline", workers=3),
                 "local-1": Executor.create("local", workers=1)}  # one local part runs in this process
    executors.update({f"local-{w}": Executor(LocalBackend(isolated=True), workers=w)
                      for w in (2, 3)})
    for name, fn, kw, expected in _global_selection_cases(small_pool, tmp_path):
        outs = {}
        # worker processes cost seconds each: two part counts for two of the cases, one for the others
        both = name in ("clip-fraction", "random")
        for ex_name in ("inline-1", "inline-3", "local-1", "local-3") + (("local-2",) if both else ()):
            ex = executors[ex_name]
            out = tmp_path / f"{name}-{ex_name}.npy"
            run_filter(fn, small_pool, out, **kw, executor=ex)
            outs[ex_name] = out.read_bytes()
            assert not out.with_suffix(".parts").exists()
        assert len(set(outs.values())) == 1, (name, [k for k in outs if outs[k] != outs["inline-1"]])
        got = K.read_keep_list(tmp_path / f"{name}-inline-1.npy")
        assert np.array_equal(got, K.sort_uids(expected)), name


@pytest.mark.slurm
def test_global_selections_on_slurm_match_inline(slurm_cluster, small_pool, tmp_path):
    from conceptprune.filters import run_filter

    slurm = Executor.create("slurm", ClusterOptions(time=5), workers=3)
    for name, fn, kw, _ in _global_selection_cases(small_pool, tmp_path):
        if name == "clip-threshold":
            continue
        run_filter(fn, small_pool, tmp_path / f"{name}-inline.npy", **kw, executor=Executor.create("inline"))
        run_filter(fn, small_pool, tmp_path / f"{name}-slurm.npy", **kw, executor=slurm)
        assert (tmp_path / f"{name}-slurm.npy").read_bytes() == (tmp_path / f"{name}-inline.npy").read_bytes()


@pytest.mark.parametrize("fork", [True, False], ids=["forked", "interpreter"])
def test_ctrl_c_stops_local_workers_without_a_traceback_each(tmp_path, fork):
    """Ctrl-C in a terminal reaches the launcher and its local workers (one process group):
    the workers exit quietly, the launcher reports the interruption once, nothing keeps running."""
    script = tmp_path / "launch.py"
    script.write_text(textwrap.dedent(f"""
        from conceptprune.slurm.diagnostics import CountingStage
        from conceptprune.slurm.executor import LocalBackend
        from conceptprune.slurm.options import ClusterOptions
        from conceptprune.slurm.stage import Executor
        stage = CountingStage(work_dir={str(tmp_path)!r}, steps=400, step_seconds=0.05)
        try:
            Executor(LocalBackend(fork={fork}), ClusterOptions(time=5), workers=2).run(stage, 2)
        except KeyboardInterrupt:  # what the CLI does: one line
            raise SystemExit("interrupted")
    """))
    # a terminal's foreground job has SIGINT at its default; started from a background job of a
    # non-interactive shell (nohup ... &), this process and so the launcher would inherit it
    # ignored, and the launcher would never see the Ctrl-C (that made this test fail in such runs)
    proc = subprocess.Popen([sys.executable, str(script)], stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    stage = CountingStage(work_dir=str(tmp_path), steps=400, step_seconds=0.05)
    t0 = time.time()
    while min(_count(stage, 0), _count(stage, 1)) < 1:
        assert time.time() - t0 < 60, "workers never started"
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGINT)  # what the terminal does on Ctrl-C
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert "Traceback" not in err and "interrupted" in err, err
    logs = "".join(p.read_text() for p in tmp_path.rglob("*_log.err"))
    assert "KeyboardInterrupt" not in logs and "Traceback" not in logs, logs[-2000:]
    time.sleep(1.5)
    before = [_count(stage, r) for r in range(2)]
    time.sleep(1.0)
    assert [_count(stage, r) for r in range(2)] == before
