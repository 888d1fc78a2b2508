"""Stages: work cut into ``world_size`` parts, each marked done when it finishes.

The pattern is datatrove's: a stage is a small picklable object whose ``run(rank,
world_size)`` processes part ``rank``; the same object runs unchanged under the SLURM
executor (a job array, one task per part), the local executor (a few worker processes) or
the debug executor (in this process). A finished part writes a completion marker, so a
rerun of the same command skips it, and an interrupted stage resumes where it stopped.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import traceback
from dataclasses import dataclass
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
    and the stage resumes from its markers and its own partial outputs."""

    def __call__(self, stage: Stage, ranks: Sequence[int], world_size: int) -> dict:
        return {int(r): run_part(stage, int(r), world_size) for r in ranks}


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

    @property
    def job_ids(self) -> list[str]:
        return [j.job_id for j in self.jobs]

    def wait(self, poll_s: float = 1.0) -> StageResult:
        if self.jobs:
            results = J.wait(self.jobs, desc=self.stage.name, units=[len(g) for g in self.groups], poll_s=poll_s)
            for res in results:
                self.done.update(res)
        ran = [r for g in self.groups for r in g]
        return StageResult([self.done[r] for r in range(self.world_size)], ran, self.executor)


def submit_stage(stage: Stage, world_size: int = 1, *, executor: str = "auto",
                 options: ClusterOptions | None = None, log_folder: str | os.PathLike | None = None) -> StageSubmission:
    """Submit every unfinished part of ``stage`` (returns at once, except under debug)."""
    if world_size < 1:
        raise ConfigError("world size must be >= 1")
    options = options or ClusterOptions()
    stage.check_world_size(world_size)
    done = stage.done_parts(world_size)
    pending = [r for r in range(world_size) if r not in done]
    kind = resolve_executor(executor)
    if not pending:
        log.info("%s: all %d parts already done; nothing to run", stage.name, world_size)
        return StageSubmission(stage, world_size, kind, [], [], done)
    if done:
        log.info("%s: %d of %d parts already done; running the other %d", stage.name, len(done), world_size,
                 len(pending))
    # one job per part on SLURM (an array), a few worker processes locally, one call in-process for debug
    if kind == "slurm":
        groups = [[r] for r in pending]
    elif kind == "local":
        workers = max(1, min(options.local_workers or os.cpu_count() or 1, len(pending)))
        groups = [pending[i::workers] for i in range(workers)]
    else:
        groups = [pending]
    runner = PartRunner()
    if kind == "debug" or (kind == "local" and len(groups) == 1 and not options.local_isolated):
        # in this process (datatrove runs a single local worker the same way): no interpreter
        # to start, and a failure raises right here
        log.info("%s: %d parts in this process", stage.name, len(pending))
        done.update(run_inline(runner, stage, pending, world_size))
        return StageSubmission(stage, world_size, kind, [], [pending], done)
    folder = Path(log_folder or Path(stage.work_dir) / options.log_folder) / stage.name
    ex = make_executor(kind, options.replace(nodes=1, tasks_per_node=1), folder, name=f"cp-{stage.name}")
    with ex.batch():
        jobs = [ex.submit(runner, stage, g, world_size) for g in groups]
    log.info("%s: %d parts on %s: %s", stage.name, len(pending), kind, J.describe(jobs))
    return StageSubmission(stage, world_size, kind, jobs, groups, done)


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


def run_stage(stage: Stage, world_size: int = 1, **kwargs) -> StageResult:
    """Run every unfinished part of ``stage`` and wait; returns the summaries of all parts."""
    return submit_stage(stage, world_size, **kwargs).wait()


def run_job(fn, *args, executor: str = "auto", options: ClusterOptions | None = None,
            folder: str | os.PathLike, name: str, **kwargs) -> list:
    """Submit one (possibly multi-node, multi-task) job and wait; one result per task."""
    options = options or ClusterOptions()
    kind = resolve_executor(executor)
    ex = make_executor(kind, options, folder, name=name)
    if kind == "debug":
        return [run_inline(fn, *args, **kwargs)]
    job = ex.submit(fn, *args, **kwargs)
    log.info("%s on %s: %s", name, kind, J.describe([job]))
    return J.wait([job], desc=name, units=[options.nodes * options.tasks_per_node], all_tasks=True)[0]
