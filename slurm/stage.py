"""Stages: work cut into ``world_size`` parts, each marked done when it finishes.

The pattern is datatrove's: a stage is a small picklable object whose ``run(rank,
world_size)`` processes part ``rank``; the same object runs unchanged on every backend of the
``Executor`` (``slurm/executor.py``): SLURM (job arrays), local worker processes, or this
process (inline). A finished part writes a completion marker, so a
rerun of the same command skips it, and an interrupted stage resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import submitit

from conceptprune.atomic import write_json
from conceptprune.errors import ConfigError

from .executor import (NAMES, Backend, LocalBackend, PlanBackend, backend_named, call_here, launcher_identity,
                       watch_launcher)
from .options import DEFAULT_WORKERS, ClusterOptions

log = logging.getLogger(__name__)


class Stage:
    """Base class. Subclasses set ``name`` and ``work_dir`` and implement ``run``."""

    name: str = "stage"
    work_dir: str | os.PathLike

    def run(self, rank: int, world_size: int) -> Any:  # pragma: no cover - abstract
        """Process part ``rank``; return a small JSON-able summary of it."""
        raise NotImplementedError

    def job_shape(self) -> tuple[int, int] | None:
        """(nodes, tasks per node) of the job that runs each part, every task calling ``run``
        (a distributed part, e.g. training); only task 0 writes the part's marker. None (the
        default): one task a part, and the executor groups parts freely."""
        return None

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
    from .dist import task_rank
    from .liveness import hold_part

    if stage.job_shape() is not None and task_rank() > 0:
        return stage.run(rank, world_size)  # one task of a shaped part: task 0 marks the part
    with hold_part(stage.marker_dir(), rank, world_size):  # who runs it, for a second launcher to see
        summary = stage.run(rank, world_size)
    write_json(marker, {"rank": rank, "world_size": world_size, "summary": summary, "host": socket.gethostname(),
                        "job_id": os.environ.get("SLURM_JOB_ID") or os.environ.get("SUBMITIT_LOCAL_JOB_ID")})
    return summary


class PartRunner(submitit.helpers.Checkpointable):
    """Runs parts of a stage; on preemption or time limit submitit requeues the same call,
    and the stage resumes from its markers and its own partial outputs.

    Given its launcher (local workers), it watches it: when that process is gone (killed,
    even with SIGKILL) the worker exits instead of running on as an orphan, and a Ctrl-C in
    the terminal ends it quietly (the launcher reports the interruption once)."""

    def __init__(self, launcher: tuple | None = None):
        self.launcher = launcher

    def __call__(self, stage: Stage, world_size: int, ranks: Sequence[int]) -> dict:
        if self.launcher:
            watch_launcher(self.launcher)  # nothing to watch in the launcher itself
        return {int(r): run_part(stage, int(r), world_size) for r in ranks}


@dataclass
class StageResult:
    summaries: list  # per rank
    ran: list[int]  # parts run now (the others were already done)
    executor: str  # the backend's name


@dataclass
class StageSubmission:
    """Submitted parts of a stage; ``wait()`` blocks until they finish."""

    stage: Stage
    world_size: int
    backend: Backend
    jobs: list
    groups: list[list[int]]
    done: dict
    here: list[int] = field(default_factory=list)  # parts the launcher runs itself while the jobs run

    @property
    def job_ids(self) -> list[str]:
        return [j.job_id for j in self.jobs]

    def pending_job_ids(self) -> list[str]:
        """The ids of jobs that outlive the launcher (SLURM's), which a later stage's jobs wait
        for (afterok); none for local or inline runs, which a later stage waits for in the launcher."""
        return self.job_ids if self.backend.can_detach else []

    @property
    def executor(self) -> str:
        return self.backend.name

    def wait(self, poll_s: float | None = None) -> StageResult:
        ran_here, self.here = self.here, []
        if ran_here:
            try:
                self.done.update(call_here(PartRunner(), (self.stage, self.world_size, ran_here)))
            except KeyboardInterrupt:
                self.backend.interrupted(self.jobs)
                raise
        if self.jobs:
            shaped = self.stage.job_shape() is not None  # every task returns; task 0's result is the part's
            results = self.backend.wait(self.jobs, desc=self.stage.name, units=[len(g) for g in self.groups],
                                        all_tasks=shaped)
            for res in results:
                self.done.update(res[0] if shaped else res)
        ran = ran_here + [r for g in self.groups for r in g]
        return StageResult([self.done[r] for r in range(self.world_size)], ran, self.backend.name)


def record_submission(stage: Stage, sub: StageSubmission, log_folder: Path, after: list[str],
                      executor: "Executor") -> None:
    """What ``conceptprune status`` reads: the jobs of the latest submission of a stage, and
    what ran them (the backend and its options)."""
    write_json(stage.marker_dir() / "submission.record",
               {"stage": stage.name, "world_size": sub.world_size, "executor": sub.backend.name,
                "job_ids": sub.job_ids, "groups": sub.groups, "after": after, "log_folder": str(log_folder),
                "workers": executor.workers, "backend": sub.backend.describe(executor.options),
                "submitted": time.strftime("%Y-%m-%dT%H:%M:%S")})


def run_inline(fn, *args, **kwargs):
    """Call a job function here (clear errors pass, others become JobFailedError)."""
    return call_here(fn, args, kwargs)


# -- one executor object -----------------------------------------------------------------------


@dataclass(frozen=True)
class Executor:
    """Where work runs, decided once: a backend object (``InlineBackend``: this process,
    ``LocalBackend``: worker processes on this machine, ``SlurmBackend``: submitit job arrays),
    the cluster options and ``workers``, the number of parts a stage is cut into. Build it
    from the CLI (``executor_from_args``), by name (``Executor.create("local", workers=4)``)
    or from a backend object, and pass it as one value; it runs every stage unchanged and
    owns completion markers.

    ``submit(stage, world_size, after=[...])`` builds a stage graph: on SLURM each stage's
    array waits for the arrays it comes after (``--dependency=afterok``), so a whole chain
    can be submitted and the launcher may exit (``detach``); locally the graph runs in order.
    """

    backend: Backend = field(default_factory=LocalBackend)
    options: ClusterOptions = field(default_factory=ClusterOptions)
    workers: int = DEFAULT_WORKERS  # parts a stage is cut into (--workers); all run at once locally
    detach: bool = False

    def __post_init__(self):
        if not isinstance(self.backend, Backend):
            raise ConfigError(f"Executor: the backend is a Backend object (InlineBackend(), LocalBackend(), "
                              f"SlurmBackend()) or use Executor.create({self.backend!r}), not {self.backend!r}")
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 1:
            raise ConfigError(f"--workers must be an integer >= 1, not {self.workers!r}")
        if self.detach and not self.backend.can_detach:
            raise ConfigError(f"--detach needs SLURM (the {self.backend.name} executor runs in this process tree, "
                              "which must stay alive)")
        self.options.validate()

    @classmethod
    def create(cls, kind: str = "auto", options: ClusterOptions | None = None, *, workers: int = DEFAULT_WORKERS,
               detach: bool = False) -> "Executor":
        """An Executor from a backend's name (``auto``, ``inline``, ``local``, ``slurm``), as
        ``--executor`` names it."""
        return cls(backend_named(kind), options or ClusterOptions(), workers, detach)

    @classmethod
    def auto(cls) -> "Executor":
        """SLURM when a controller answers, else local processes; one part."""
        return cls.create("auto")

    @staticmethod
    def given(executor: "Executor | None") -> "Executor":
        """``executor``, or ``Executor.auto()`` for None (a function's default). Names are the
        CLI's (``--executor``): past it, only an Executor travels."""
        if executor is None:
            return Executor.auto()
        if not isinstance(executor, Executor):
            hint = f"Executor.create({executor!r})" if isinstance(executor, str) else "Executor.create('local')"
            raise ConfigError(f"executor: pass an Executor (e.g. {hint}), not {executor!r}")
        return executor

    @classmethod
    def plan(cls, name: str = "auto", options: ClusterOptions | None = None, *, workers: int = DEFAULT_WORKERS) \
            -> "Executor":
        """An executor that only describes what a backend would run (a dry run): the name is not
        resolved, no controller is asked, nothing runs."""
        if name not in NAMES:
            raise ConfigError(f"--executor must be one of {', '.join(NAMES)}, not {name!r}")
        return cls(PlanBackend(name), options or ClusterOptions(), workers)

    @property
    def kind(self) -> str:
        """The backend's name (for messages and file names; behaviour lives in the backend)."""
        return self.backend.name

    def replace(self, **changes) -> "Executor":
        return dataclasses.replace(self, **changes)

    @property
    def in_launcher(self) -> bool:
        """Every part runs in this process (inline, or one local worker)."""
        return self.backend.in_launcher(self.workers)

    def parts(self, available: int) -> int:
        """How many parts to cut ``available`` units of work into: ``workers``, at most one
        unit a part, at least one part."""
        return max(1, min(self.workers, available))

    # -- stages -----------------------------------------------------------------------------

    def submit(self, stage: Stage, world_size: int = 1, *, after: Sequence["StageSubmission"] = (),
               log_folder: str | os.PathLike | None = None) -> "StageSubmission":
        """Submit every unfinished part of ``stage`` after the stages in ``after`` succeed
        (returns at once on SLURM; locally the earlier stages are waited for first)."""
        if world_size < 1:
            raise ConfigError("world size must be >= 1")
        deps = self.backend.dependencies(after)
        stage.check_world_size(world_size)
        done = stage.done_parts(world_size)
        pending = [r for r in range(world_size) if r not in done]
        if not pending:
            log.info("%s: all %d parts already done; nothing to run", stage.name, world_size)
            return StageSubmission(stage, world_size, self.backend, [], [], done)
        if done:
            log.info("%s: %d of %d parts already done; running the other %d", stage.name, len(done), world_size,
                     len(pending))
        folder = self.log_folder(stage, log_folder)
        live_jobs, live_groups = self.backend.live_jobs(self._record(stage, world_size), pending)
        if live_jobs:  # an earlier launcher's jobs still queued or running: wait for those, submit the rest
            covered = {r for g in live_groups for r in g}
            log.info("%s: parts %s are still in jobs %s from an earlier submission; not submitted again",
                     stage.name, sorted(covered), ",".join(j.job_id for j in live_jobs))
            pending = [r for r in pending if r not in covered]
            if not pending:
                return StageSubmission(stage, world_size, self.backend, live_jobs, live_groups, done)
        from .liveness import refuse_busy_parts

        refuse_busy_parts(stage.name, stage.marker_dir(), pending, world_size)  # run by another launcher now
        shape = stage.job_shape()
        groups = [[r] for r in pending] if shape else self.backend.pack(pending, self.workers, self.options)
        runner = PartRunner(launcher=launcher_identity() if not self.backend.can_detach else None)
        launch = self.backend.submit(runner, (stage, world_size), groups, options=self.options, folder=folder,
                                     name=f"cp-{stage.name}", after=deps, shape=shape)
        done.update(launch.results)
        sub = StageSubmission(stage, world_size, self.backend, live_jobs + launch.jobs, live_groups + launch.groups,
                              done, launch.here)
        if launch.jobs:
            record_submission(stage, sub, folder, deps, self)
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
                     "command to collect the result", sub.stage.name, ",".join(sub.job_ids), sub.stage.work_dir)
            return None
        return sub.wait()

    @staticmethod
    def _record(stage: Stage, world_size: int) -> dict:
        """The stage's last ``submission.record`` if it was for ``world_size`` parts, else {}."""
        try:
            rec = json.loads((stage.marker_dir() / "submission.record").read_text())
        except (FileNotFoundError, ValueError):
            return {}
        return rec if isinstance(rec, dict) and rec.get("world_size") == world_size else {}

    def log_folder(self, stage: Stage, log_folder=None) -> Path:
        return Path(log_folder or Path(stage.work_dir) / self.options.log_folder) / stage.name

    # -- one (multi-node, multi-task) job -----------------------------------------------------

    def submit_job(self, fn, *args, folder: str | os.PathLike, name: str, **kwargs) -> submitit.Job:
        """Submit one job of ``options.nodes x options.tasks_per_node`` tasks (each runs ``fn``;
        ``slurm.dist.export_torch_env`` gives them a torch rendezvous); returns at once."""
        return self.backend.submit_job(fn, args, kwargs, options=self.options, folder=Path(folder), name=name)

    def run_job(self, fn, *args, folder: str | os.PathLike, name: str, **kwargs) -> list:
        """``submit_job`` and wait; one result per task (inline: one call in this process)."""
        return self.backend.run_job(fn, args, kwargs, options=self.options, folder=Path(folder), name=name)


def executor_from_args(args) -> Executor:
    """The one Executor a command runs its stages with, from the job-layer flags
    (``options.add_cluster_args``)."""
    from .options import options_from_args

    kind, opts = options_from_args(args)
    return Executor.create(kind, opts, workers=getattr(args, "workers", DEFAULT_WORKERS),
                           detach=bool(getattr(args, "detach", False)))
