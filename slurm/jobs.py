"""Submitting, waiting for and explaining jobs, whatever the executor."""

from __future__ import annotations

import logging
import re
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import submitit
from submitit.core.utils import FailedJobError, UncompletedJobError

from conceptprune.errors import ConceptPruneError
from conceptprune.progress import progress_bar

log = logging.getLogger(__name__)


class JobFailedError(ConceptPruneError):
    def __init__(self, message: str, job_id: str | None = None, state: str | None = None,
                 log_tail: str = "", log_path: str | None = None):
        super().__init__(message)
        self.job_id, self.state, self.log_tail, self.log_path = job_id, state, log_tail, log_path


class JobCancelledError(JobFailedError):
    pass


def tail(path: Path | None, lines: int = 30) -> str:
    if path is None or not Path(path).exists():
        return ""
    with open(path, "rb") as f:
        f.seek(0, 2)
        f.seek(max(0, f.tell() - 64 * 1024))
        text = f.read().decode("utf-8", "replace")
    return "\n".join(text.splitlines()[-lines:])


def log_paths(job: submitit.Job) -> tuple[Path | None, Path | None]:
    try:
        return job.paths.stdout, job.paths.stderr
    except Exception:  # the debug executor has no files
        return None, None


def describe(jobs: Sequence[submitit.Job]) -> str:
    if not jobs:
        return "no jobs"
    out, err = log_paths(jobs[0])
    ids = jobs[0].job_id.split("_")[0]
    where = f"logs: {Path(err).parent}" if err else "in this process"
    return f"job {ids} ({len(jobs)} task{'s' if len(jobs) > 1 else ''}), {where}"


def _state(job) -> str:
    try:
        return str(job.state)
    except Exception:
        return "UNKNOWN"


def _controller_view(job) -> str:
    """'JobState=... Reason=... Restarts=...' from scontrol, or '' when unavailable."""
    if not hasattr(job, "watcher"):
        return ""
    try:
        out = subprocess.run(["scontrol", "-o", "show", "job", job.job_id], capture_output=True, text=True,
                             timeout=15).stdout
    except (OSError, subprocess.SubprocessError):
        return ""
    fields = dict(re.findall(r"(JobState|Reason|Restarts|ExitCode)=(\S+)", out))
    return " ".join(f"{k}={v}" for k, v in fields.items())


def _requeued(job) -> bool:
    """A SLURM job that 'finished' without a result file but is queued or running again.

    During a requeue sacct can briefly report the old run's end (FAILED), and submitit's
    watcher caches finished states for good; the controller knows better.
    """
    if not hasattr(job, "watcher") or job.paths.result_pickle.exists():
        return False
    m = re.search(r"JobState=(\S+)", _controller_view(job))
    # COMPLETING comes first in a requeue; a job that really ended shows FAILED on the next poll
    return bool(m) and m.group(1) in ("COMPLETING", "PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED",
                                      "CONFIGURING", "RESIZING", "SUSPENDED")


def _exception_line(message: str) -> str:
    """The exception line of submitit's FailedJobError text: the last line of the traceback
    block between its dashed separators (the message ends with log paths)."""
    lines = message.strip().splitlines()
    seps = [i for i, line in enumerate(lines) if set(line.strip()) == {"-"}]
    block = lines[seps[0] + 1:seps[1]] if len(seps) >= 2 else lines
    block = [line for line in block if line.strip()]
    return block[-1].strip() if block else "failed"


def explain_failure(job: submitit.Job, exc: BaseException) -> JobFailedError:
    """A JobFailedError carrying the job's state and the tail of its log."""
    state = _state(job)
    out, err = log_paths(job)
    log_tail = tail(err) or tail(out)
    if isinstance(exc, FailedJobError):
        reason = _exception_line(str(exc))
    else:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    where = f"; log: {err}" if err else ""
    if state.upper().startswith("CANCELLED"):
        return JobCancelledError(f"job {job.job_id} was cancelled ({state}){where}", job.job_id, state, log_tail, str(err))
    view = _controller_view(job)
    body = f"job {job.job_id} failed ({state}{'; ' + view if view else ''}): {reason}{where}"
    if log_tail:
        body += "\n--- log tail ---\n" + log_tail
    return JobFailedError(body, job.job_id, state, log_tail, str(err) if err else None)


def wait(jobs: Sequence[submitit.Job], *, desc: str = "jobs", poll_s: float = 1.0,
         on_done: Callable[[int, Any], None] | None = None, units: Sequence[int] | None = None,
         all_tasks: bool = False, on_poll: Callable[[], None] | None = None) -> list:
    """Wait for all jobs; return their results in order (``all_tasks``: a list per job, one
    entry per task). ``on_poll`` replaces the parts bar with the caller's own, called each poll. The first failure raises JobFailedError; the other jobs keep running
    and a rerun picks up their parts."""
    results: list = [None] * len(jobs)
    pending = list(range(len(jobs)))
    units = list(units) if units else [1] * len(jobs)
    bar = progress_bar(total=sum(units), desc=desc, unit="parts", disable=on_poll is not None)
    try:
        while pending:
            if pending and hasattr(jobs[pending[0]], "watcher"):
                jobs[pending[0]].done(force_check=True)  # one sacct call refreshes every job
            still = []
            for i in pending:
                job = jobs[i]
                if not job.done():
                    still.append(i)
                    continue
                if _state(job).upper().startswith("CANCELLED"):  # no result file will come
                    raise explain_failure(job, UncompletedJobError("cancelled"))
                if _requeued(job):  # accounting showed the end of the run before the requeue
                    job.watcher.clear()
                    still.append(i)
                    continue
                try:
                    results[i] = job.results() if all_tasks else job.result()
                except (FailedJobError, UncompletedJobError) as e:
                    raise explain_failure(job, e) from None
                except Exception as e:  # the debug executor raises the job's own exception
                    if isinstance(job, submitit.DebugJob):
                        raise
                    raise explain_failure(job, e) from None
                bar.update(units[i])
                if on_done:
                    on_done(i, results[i])
            pending = still
            if on_poll is not None:
                on_poll()  # the caller's own progress line (e.g. training steps)
            if pending:
                time.sleep(poll_s)
    finally:
        bar.close()
    return results
