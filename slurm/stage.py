"""Stages: work cut into ``world_size`` parts, each marked done when it finishes.

The pattern is datatrove's: a stage is a small picklable object whose ``run(rank,
world_size)`` processes part ``rank``; the same object runs unchanged under the SLURM
executor (a job array, one task per part), the local executor (a few worker processes) or
the debug executor (in this process). A finished part writes a completion marker, so a
rerun of the same command skips it, and an interrupted stage resumes where it stopped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import signal
import socket
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import submitit

from conceptprune.atomic import write_json
from conceptprune.errors import ConfigError

from . import jobs as J
from .executor import make_executor, resolve_executor
from .options import ClusterOptions

log = logging.getLogger(__name__)


class Stage:
    """Base class. Subclasses set ``name`` and ``work_dir`` and implement ``run``."""

    name: str = "stage"
    work_dir: str | os.PathLike

    def run(self, rank: int, world_size: int) -> Any:  # pragma: no cover - abstract
        """Process part ``rank``; return a small JSON-able summary of it."""
        raise NotImplementedError

    # -- completion markers ---------------------------------------------------------------

    def marker_dir(self) -> Path:
        return Path(self.work_dir) / ".markers" / self.name

    def marker(self, rank: int, world_size: int) -> Path:
        return self.marker_dir() / f"{rank:05d}-of-{world_size:05d}.json"

    def done_parts(self, world_size: int) -> dict[int, Any]:
        out = {}
        d = self.marker_dir()
        if d.exists():
            for p in d.glob(f"*-of-{world_size:05d}.json"):
                with open(p) as f:
                    out[int(p.name.split("-")[0])] = json.load(f)["summary"]
        return out

    def check_world_size(self, world_size: int) -> None:
        d = self.marker_dir()
        if not d.exists():
            return
        others = {int(p.stem.split("-of-")[1]) for p in d.glob("*-of-*.json")} - {world_size}
        if others:
            raise ConfigError(f"{d}: this stage was started with {sorted(others)[0]} parts; rerun with the "
                              f"same number of workers, or delete {d} to start over with {world_size}")


def run_part(stage: Stage, rank: int, world_size: int) -> Any:
    """Run one part unless its marker exists; write the marker when it finishes."""
    marker = stage.marker(rank, world_size)
    if marker.exists():
        with open(marker) as f:
            return json.load(f)["summary"]
    summary = stage.run(rank, world_size)
    write_json(marker, {"rank": rank, "world_size": world_size, "summary": summary, "host": socket.gethostname(),
                        "job_id": os.environ.get("SLURM_JOB_ID") or os.environ.get("SUBMITIT_LOCAL_JOB_ID")})
    return summary


class PartRunner(submitit.helpers.Checkpointable):
    """Runs parts of a stage; on preemption or time limit submitit requeues the same call,
    and the stage resumes from its markers and its own partial outputs.

    Under the local executor it also watches the launcher: when that process is gone
    (killed, even with SIGKILL) the worker exits instead of running on as an orphan, and a
    Ctrl-C in the terminal ends it quietly (the launcher reports the interruption once)."""

    def __init__(self, launcher: tuple | None = None):
        self.launcher = launcher

    def __call__(self, stage: Stage, ranks: Sequence[int], world_size: int) -> dict:
        if self.launcher and os.environ.get("SUBMITIT_EXECUTOR") == "local":
            _watch_launcher(self.launcher)
        return {int(r): run_part(stage, int(r), world_size) for r in ranks}


def _process_start(pid: int) -> str | None:
    """A process's start time (field 22 of /proc/PID/stat), or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


@contextlib.contextmanager
def _quiet_ctrl_c(kind: str):
    """Start local job processes with SIGINT ignored (inherited through exec): a Ctrl-C in the
    terminal then reaches only the launcher, which stops its jobs and says so once, instead
    of every submitit controller and worker printing a traceback."""
    if kind != "local" or threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


def launcher_identity() -> tuple | None:
    """(pid, start time) of this process: a worker can tell whether it still exists (a pid
    alone may be reused). None where /proc is missing."""
    start = _process_start(os.getpid())
    return (os.getpid(), start) if start else None


def _watch_launcher(launcher: tuple, poll_s: float = 0.5) -> None:
    pid, start = launcher
    signal.signal(signal.SIGINT, lambda *_: os._exit(130))  # no traceback per worker on Ctrl-C

    def watch():
        while _process_start(pid) == start:
            time.sleep(poll_s)
        os._exit(143)  # the launcher is gone: stop; a rerun resumes from the markers

    threading.Thread(target=watch, name="launcher-watch", daemon=True).start()


@dataclass
class StageResult:
    summaries: list  # per rank
    ran: list[int]  # parts run now (the others were already done)
    executor: str


@dataclass
class StageSubmission:
    """Submitted parts of a stage; ``wait()`` blocks until they finish."""

    stage: Stage
    world_size: int
    executor: str
    jobs: list
    groups: list[list[int]]
    done: dict
    here: list[int] = field(default_factory=list)  # parts the launcher runs itself while the jobs run

    @property
    def job_ids(self) -> list[str]:
        return [j.job_id for j in self.jobs]

    def pending_job_ids(self) -> list[str]:
        """The SLURM job ids a later stage must wait for (afterok); none for local or inline runs,
        which a later stage waits for in the launcher instead."""
        return [j.job_id for j in self.jobs if self.executor == "slurm"]

    def wait(self, poll_s: float = 1.0) -> StageResult:
        ran_here, self.here = self.here, []
        if ran_here:
            try:
                self.done.update(run_inline(PartRunner(), self.stage, ran_here, self.world_size))
            except KeyboardInterrupt:
                for j in self.jobs:  # local workers die with their launcher
                    j.cancel(check=False)
                raise
        if self.jobs:
            if self.executor == "local":  # a local job is polled by a process check, no scheduler query:
                poll_s = min(poll_s, 0.05)  # polling often costs nothing and holds no result back
            try:
                results = J.wait(self.jobs, desc=self.stage.name, units=[len(g) for g in self.groups],
                                 poll_s=poll_s)
            except KeyboardInterrupt:
                if self.executor == "local":  # local workers die with their launcher
                    for j in self.jobs:
                        j.cancel(check=False)
                raise
            for res in results:
                self.done.update(res)
        ran = ran_here + [r for g in self.groups for r in g]
        return StageResult([self.done[r] for r in range(self.world_size)], ran, self.executor)


def record_submission(stage: Stage, sub: StageSubmission, log_folder: Path, after: list[str]) -> None:
    """What ``conceptprune status`` reads: the jobs of the latest submission of a stage."""
    write_json(stage.marker_dir() / "submission.record",
               {"stage": stage.name, "world_size": sub.world_size, "executor": sub.executor,
                "job_ids": sub.job_ids, "groups": sub.groups, "after": after, "log_folder": str(log_folder),
                "submitted": time.strftime("%Y-%m-%dT%H:%M:%S")})

def run_inline(fn, *args, **kwargs):
    """Call a job function here. The stage's own clear errors pass through; anything else
    becomes a JobFailedError with the traceback's tail (the original is its __cause__)."""
    from conceptprune.errors import ConceptPruneError

    try:
        return fn(*args, **kwargs)
    except ConceptPruneError:
        raise
    except Exception as e:
        tb = traceback.format_exc()
        raise J.JobFailedError(f"{getattr(fn, '__name__', type(fn).__name__)} failed: {type(e).__name__}: {e}",
                               state="FAILED", log_tail="\n".join(tb.splitlines()[-30:])) from e


# -- one executor object -----------------------------------------------------------------------

INLINE_NAMES = ("inline", "debug")


@dataclass(frozen=True)
class Executor:
    """Where work runs, decided once: ``inline`` (this process), ``local`` (worker processes
    on this machine) or ``slurm`` (submitit job arrays). Build it from the CLI or by keyword
    and pass it as one value; it runs every stage unchanged and owns completion markers.

    ``submit(stage, world_size, after=[...])`` builds a stage graph: on SLURM each stage's
    array waits for the arrays it comes after (``--dependency=afterok``), so a whole chain
    can be submitted and the launcher may exit (``detach``); locally the graph runs in order.
    """

    kind: str = "local"
    options: ClusterOptions = field(default_factory=ClusterOptions)
    workers: int = 1  # parts a stage is cut into (--workers); also how many run at once locally
    detach: bool = False

    @classmethod
    def create(cls, kind: str = "auto", options: ClusterOptions | None = None, *, workers: int | None = None,
               detach: bool = False) -> "Executor":
        options = options or ClusterOptions()
        if workers is not None:
            if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
                raise ConfigError(f"--workers must be an integer >= 1, not {workers!r}")
            options = options.replace(local_workers=workers, array_parallelism=workers)
        kind = "inline" if kind in INLINE_NAMES else resolve_executor(kind)
        if detach and kind != "slurm":
            raise ConfigError(f"--detach needs SLURM (the {kind} executor runs in this process tree, "
                              "which must stay alive)")
        return cls(kind, options.validate(), workers or 1, detach)

    @classmethod
    def coerce(cls, executor: "Executor | str | None", options: ClusterOptions | None = None) -> "Executor":
        """An Executor as given, or one built from a kind name ("auto", "local", ...)."""
        if isinstance(executor, Executor):
            return executor
        return cls.create(executor or "auto", options)

    def parts(self, available: int) -> int:
        """How many parts to cut ``available`` units of work into: ``workers``, at most one
        unit a part, at least one part."""
        return max(1, min(self.workers, available))

    @property
    def submitit_kind(self) -> str:
        return "debug" if self.kind == "inline" else self.kind

    # -- stages -----------------------------------------------------------------------------

    def submit(self, stage: Stage, world_size: int = 1, *, after: Sequence["StageSubmission"] = (),
               log_folder: str | os.PathLike | None = None) -> "StageSubmission":
        """Submit every unfinished part of ``stage`` after the stages in ``after`` succeed
        (returns at once on SLURM; locally the earlier stages are waited for first)."""
        if world_size < 1:
            raise ConfigError("world size must be >= 1")
        if self.kind != "slurm":
            for dep in after:
                dep.wait()
        stage.check_world_size(world_size)
        done = stage.done_parts(world_size)
        pending = [r for r in range(world_size) if r not in done]
        if not pending:
            log.info("%s: all %d parts already done; nothing to run", stage.name, world_size)
            return StageSubmission(stage, world_size, self.kind, [], [], done)
        if done:
            log.info("%s: %d of %d parts already done; running the other %d", stage.name, len(done), world_size,
                     len(pending))
        folder = self.log_folder(stage, log_folder)
        deps = [j for d in after for j in d.pending_job_ids()]
        live_jobs, live_groups = self._live_jobs(stage, world_size, pending) if self.kind == "slurm" else ([], [])
        if live_jobs:  # an earlier launcher's jobs still queued or running: wait for those, submit the rest
            covered = {r for g in live_groups for r in g}
            log.info("%s: parts %s are still in SLURM jobs %s from an earlier submission; not submitted again",
                     stage.name, sorted(covered), ",".join(j.job_id for j in live_jobs))
            pending = [r for r in pending if r not in covered]
            if not pending:
                return StageSubmission(stage, world_size, self.kind, live_jobs, live_groups, done)
        groups = self._groups(pending)
        runner = PartRunner(launcher=None if self.kind == "slurm" else launcher_identity())
        shared = self.kind == "local" and not self.options.local_isolated
        if self.kind == "inline" or (shared and len(groups) == 1):
            # in this process (datatrove runs a single local worker the same way): no interpreter
            # to start, and a failure raises right here
            log.info("%s: %d parts in this process", stage.name, len(pending))
            done.update(run_inline(runner, stage, pending, world_size))
            return StageSubmission(stage, world_size, self.kind, [], [pending], done)
        # the launcher would only wait for local workers: it runs the first group itself (in wait()),
        # one interpreter fewer to start (unless GPUs are handed out to the workers)
        here = groups.pop(0) if shared and not self.options.gpus_per_node else []
        ex = self._submitit(folder, f"cp-{stage.name}", nodes=1, tasks_per_node=1, after=deps)
        with _quiet_ctrl_c(self.kind), ex.batch():
            jobs = [ex.submit(runner, stage, g, world_size) for g in groups]
        sub = StageSubmission(stage, world_size, self.kind, live_jobs + jobs, live_groups + groups, done, here)
        record_submission(stage, sub, folder, deps)
        log.info("%s: %d parts on %s%s: %s%s", stage.name, len(pending), self.kind,
                 f" after {','.join(deps)}" if deps else "", J.describe(jobs),
                 f"; parts {here} in this process" if here else "")
        return sub

    def run(self, stage: Stage, world_size: int = 1, **kwargs) -> "StageResult":
        """Run every unfinished part of ``stage`` and wait; the summaries of all parts."""
        if self.detach:
            raise ConfigError(f"--detach: the {stage.name} stage's result is needed before this command can go on; "
                              "run it without --detach")
        return self.submit(stage, world_size, **kwargs).wait()

    def finish(self, sub: "StageSubmission") -> "StageResult | None":
        """Wait for a submission, unless this executor detaches (then None: rerun the same
        command to collect the result once the jobs are done)."""
        if self.detach and sub.jobs:
            log.info("%s: submitted (%s); detached. 'conceptprune status %s' shows progress; rerun the same "
                     "command to collect the result", sub.stage.name, ",".join(sub.pending_job_ids()),
                     sub.stage.work_dir)
            return None
        return sub.wait()

    @staticmethod
    def _live_jobs(stage: Stage, world_size: int, pending: list[int]) -> tuple[list, list[list[int]]]:
        """The jobs of this stage's last SLURM submission (``submission.record``) that are still
        queued or running and hold parts in ``pending``, with those parts: a rerun of a detached
        command waits for them instead of running the same parts twice."""
        from .status import queued_or_running

        try:
            rec = json.loads((stage.marker_dir() / "submission.record").read_text())
        except (FileNotFoundError, ValueError):
            return [], []
        if rec.get("executor") != "slurm" or rec.get("world_size") != world_size:
            return [], []
        live = queued_or_running(rec.get("job_ids", []))
        jobs, groups = [], []
        for job_id, group in zip(rec.get("job_ids", []), rec.get("groups", [])):
            mine = [r for r in group if r in pending]
            if mine and job_id in live:
                jobs.append(submitit.SlurmJob(folder=Path(rec["log_folder"]) / "%j", job_id=job_id))
                groups.append(mine)
        return jobs, groups

    def _groups(self, pending: list[int]) -> list[list[int]]:
        # one job per part on SLURM (an array), a few worker processes locally, one call inline
        if self.kind == "slurm":
            return [[r] for r in pending]
        if self.kind == "local":
            workers = max(1, min(self.options.local_workers or os.cpu_count() or 1, len(pending)))
            return [pending[i::workers] for i in range(workers)]
        return [pending]

    def log_folder(self, stage: Stage, log_folder=None) -> Path:
        return Path(log_folder or Path(stage.work_dir) / self.options.log_folder) / stage.name

    def _submitit(self, folder, name: str, *, nodes: int, tasks_per_node: int, after=()) -> submitit.Executor:
        opts = self.options.replace(nodes=nodes, tasks_per_node=tasks_per_node)
        if after:
            extra = dict(opts.extra)
            extra["dependency"] = "afterok:" + ":".join(after)
            opts = dataclasses.replace(opts, extra=extra)
        return make_executor(self.submitit_kind, opts, folder, name=name)

    # -- one (multi-node, multi-task) job -----------------------------------------------------

    def submit_job(self, fn, *args, folder: str | os.PathLike, name: str, **kwargs) -> submitit.Job:
        """Submit one job of ``options.nodes x options.tasks_per_node`` tasks (each runs ``fn``;
        ``slurm.dist.export_torch_env`` gives them a torch rendezvous); returns at once."""
        if self.kind == "inline":
            raise ConfigError(f"{name}: a multi-task job runs in its own processes; use the local or slurm executor")
        with _quiet_ctrl_c(self.kind):
            job = make_executor(self.submitit_kind, self.options, folder, name=name).submit(fn, *args, **kwargs)
        log.info("%s on %s: %s", name, self.kind, J.describe([job]))
        return job

    def run_job(self, fn, *args, folder: str | os.PathLike, name: str, **kwargs) -> list:
        """``submit_job`` and wait; one result per task (inline: one call in this process)."""
        if self.kind == "inline":
            return [run_inline(fn, *args, **kwargs)]
        job = self.submit_job(fn, *args, folder=folder, name=name, **kwargs)
        return J.wait([job], desc=name, units=[self.options.nodes * self.options.tasks_per_node], all_tasks=True)[0]

