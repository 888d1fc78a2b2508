"""Executor backends: where the parts of a stage run, behind one small protocol.

An ``Executor`` (``slurm/stage.py``) holds one backend object and asks it four things:
submit groups of parts (after the jobs of earlier stages), wait for them, find the still
live jobs of an earlier submission's record, and describe itself (for that record). Three
backends implement it:

- ``InlineBackend``: every part in this process, at once (debugging, tests, tiny data).
- ``LocalBackend``: worker processes on this machine. A worker is forked from the launcher
  (no new interpreter, no pickling), the launcher runs the first group itself; where a fork
  is unsafe (an OpenMP runtime is loaded, whose pool a forked child deadlocks on, or another
  Python thread runs, or GPUs are handed out) a worker is a fresh interpreter (submitit's local
  executor). Either way a worker exits when its launcher is gone, even after SIGKILL.
- ``SlurmBackend``: submitit job arrays, ``--dependency=afterok`` between stages, arrays cut at
  the cluster's ``MaxArraySize``, ``parts_per_task`` parts packed into one array task.

Only the CLI's option parsing turns a name into a backend (``backend_named``). ``auto`` picks
SLURM only when a controller actually answers (``scontrol ping``): having the client commands
installed is not enough, so a laptop with slurm-client but no cluster runs local processes.
A new backend (Ray, Kubernetes) is one class here and one entry in ``BACKENDS``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import submitit
from submitit.core.utils import FailedJobError, UncompletedJobError

from conceptprune.errors import ConfigError

from . import jobs as J
from .options import ClusterOptions

log = logging.getLogger(__name__)

DEFAULT_MAX_ARRAY_SIZE = 1001  # SLURM's own default for MaxArraySize


@functools.lru_cache(maxsize=None)
def _slurm_answers(conf: str | None) -> bool:
    if not shutil.which("sbatch") or not shutil.which("scontrol"):
        return False
    try:
        out = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.SubprocessError):
        return False
    return out.returncode == 0 and "UP" in out.stdout


def slurm_available() -> bool:
    return _slurm_answers(os.environ.get("SLURM_CONF"))


@functools.lru_cache(maxsize=None)
def _max_array_size(conf: str | None) -> int:
    try:
        out = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=15).stdout
    except (OSError, subprocess.SubprocessError):
        return DEFAULT_MAX_ARRAY_SIZE
    m = re.search(r"^\s*MaxArraySize\s*=\s*(\d+)", out, re.MULTILINE)
    return int(m.group(1)) if m and int(m.group(1)) > 0 else DEFAULT_MAX_ARRAY_SIZE


def max_array_size() -> int:
    """The cluster's MaxArraySize (an array holds at most this many tasks, indices 0..N-1),
    from ``scontrol show config``; SLURM's default 1001 where it cannot be read."""
    return _max_array_size(os.environ.get("SLURM_CONF"))


def call_here(fn: Callable, args: tuple, kwargs: dict | None = None) -> Any:
    """Run ``fn(*args, **kwargs)`` here. The stage's own clear errors pass through; anything else
    becomes a JobFailedError with the traceback's tail (the original is its __cause__)."""
    from conceptprune.errors import ConceptPruneError

    try:
        return fn(*args, **(kwargs or {}))
    except ConceptPruneError:
        raise
    except Exception as e:
        tb = traceback.format_exc()
        raise J.JobFailedError(f"{getattr(fn, '__name__', type(fn).__name__)} failed: {type(e).__name__}: {e}",
                               state="FAILED", log_tail="\n".join(tb.splitlines()[-30:])) from e


@dataclass
class Launch:
    """What a backend's ``submit`` started: one job per group of ``groups``, the parts the
    launcher runs itself when it waits (``here``), and the results of parts already run."""

    jobs: list = field(default_factory=list)
    groups: list = field(default_factory=list)
    here: list = field(default_factory=list)
    results: dict = field(default_factory=dict)


class Backend:
    """The protocol every backend implements (the base class runs nothing itself).

    ``fn(*args, group)`` is what one job runs for a group of parts (the executor passes its
    part runner and the stage); ``shape`` is (nodes, tasks per node) of each job, every task
    calling ``fn``."""

    name = "backend"
    can_detach = False  # jobs outlive the launcher, so it may exit after submitting
    poll_s = 1.0  # how often ``wait`` looks at unfinished jobs

    def check(self) -> "Backend":
        """Raise ConfigError when this backend cannot run here; else itself."""
        return self

    def dependencies(self, after: Sequence) -> list[str]:
        """Job ids that a later stage's jobs wait for (SLURM's afterok); a backend that runs
        in the launcher's process tree waits for the earlier submissions here instead."""
        for sub in after:
            sub.wait()
        return []

    def pack(self, pending: list[int], workers: int, options: ClusterOptions) -> list[list[int]]:
        """Cut the unfinished parts into the groups that become jobs."""
        return [list(pending)]

    def submit(self, fn: Callable, args: tuple, groups: list[list[int]], *, options: ClusterOptions, folder: Path,
               name: str, after: list[str], shape: tuple[int, int] | None = None) -> Launch:
        raise NotImplementedError

    def wait(self, jobs: list, *, desc: str, units: list[int], all_tasks: bool = False) -> list:
        """Results of ``jobs`` in order; on Ctrl-C, jobs that cannot outlive the launcher stop."""
        try:
            return J.wait(jobs, desc=desc, units=units, poll_s=self.poll_s, all_tasks=all_tasks)
        except KeyboardInterrupt:
            self.interrupted(jobs)
            raise

    def interrupted(self, jobs: list) -> None:
        """The launcher got Ctrl-C while ``jobs`` ran (SLURM's go on; local ones stop)."""

    def in_launcher(self, workers: int) -> bool:
        """Whether every part of a stage cut into ``workers`` parts runs in the launcher itself
        (a caller may then load what the parts need once, early, to fail fast)."""
        return False

    def live_jobs(self, record: dict, pending: list[int]) -> tuple[list, list[list[int]]]:
        """The jobs of an earlier submission (its ``submission.record``) still queued or
        running that hold parts in ``pending``, with those parts."""
        return [], []

    def submit_job(self, fn: Callable, args: tuple, kwargs: dict, *, options: ClusterOptions, folder: Path,
                   name: str) -> Any:
        """One job of ``options.nodes x options.tasks_per_node`` tasks, each calling ``fn``."""
        raise ConfigError(f"{name}: a multi-task job runs in its own processes; use the local or slurm executor")

    def run_job(self, fn: Callable, args: tuple, kwargs: dict, *, options: ClusterOptions, folder: Path,
                name: str) -> list:
        job = self.submit_job(fn, args, kwargs, options=options, folder=folder, name=name)
        return self.wait([job], desc=name, units=[options.nodes * options.tasks_per_node], all_tasks=True)[0]

    def describe(self, options: ClusterOptions) -> dict:
        """What ran the jobs, for ``submission.record`` and ``cluster info``."""
        return {"name": self.name}

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    def __eq__(self, other) -> bool:
        return type(self) is type(other) and vars(self) == vars(other)

    def __hash__(self) -> int:
        return hash(type(self))


class InlineBackend(Backend):
    """Every part in this process, at submit time: a failure raises right there."""

    name = "inline"

    def in_launcher(self, workers):
        return True

    def submit(self, fn, args, groups, *, options, folder, name, after, shape=None) -> Launch:
        if shape and tuple(shape) != (1, 1):
            raise ConfigError(f"{name}: a part of {shape[0]}x{shape[1]} tasks runs in its own processes; "
                              "use the local or slurm executor")
        parts = [r for g in groups for r in g]
        log.info("%s: %d parts in this process", name, len(parts))
        res = call_here(fn, (*args, parts))
        return Launch(groups=[parts], results=res)

    def run_job(self, fn, args, kwargs, *, options, folder, name) -> list:
        return [call_here(fn, args, kwargs)]


# -- local processes ------------------------------------------------------------------------------


_OPENMP = re.compile(r"/lib(gomp|iomp5|omp)[-.\w]*\.so")


def fork_is_safe() -> bool:
    """Whether a child forked from this process can run a stage: no other Python thread (it
    may hold a lock the child then waits on for ever) and no OpenMP runtime loaded (a child of
    a process that has used GNU OpenMP deadlocks in its first parallel region: faiss's k-means
    did, measured; torch and faiss load it). BLAS pools and jemalloc's thread, which most
    processes have, reset themselves at fork."""
    if threading.active_count() != 1:
        return False
    try:
        with open("/proc/self/maps") as f:
            return not _OPENMP.search(f.read())
    except OSError:
        return False


class _Paths:
    def __init__(self, folder: Path, job_id: str):
        d = folder / job_id
        self.stdout, self.stderr = d / f"{job_id}_0_log.out", d / f"{job_id}_0_log.err"
        self.result_pickle = d / f"{job_id}_0_result.pkl"


class ForkJob:
    """A local worker forked from the launcher: no new interpreter, no pickled arguments (only
    its result is pickled, into the log folder beside its logs, as submitit's jobs do)."""

    def __init__(self, folder: Path, fn: Callable, args: tuple, launcher: tuple | None):
        folder.mkdir(parents=True, exist_ok=True)
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()  # nothing buffered before the fork is written twice
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child never returns (coverage cannot see it)
            _fork_child(folder, fn, args, launcher)
        self.pid, self.job_id = pid, str(pid)
        self.paths = _Paths(folder, self.job_id)
        self._code: int | None = None

    def done(self, force_check: bool = False) -> bool:
        if self._code is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                pid, status = self.pid, 0
            if pid:
                self._code = os.waitstatus_to_exitcode(status)
        return self._code is not None

    @property
    def state(self) -> str:
        if not self.done():
            return "RUNNING"
        return "COMPLETED" if self._code == 0 else f"FAILED (exit {self._code})"

    def result(self) -> Any:
        while not self.done():
            time.sleep(0.02)
        try:
            with open(self.paths.result_pickle, "rb") as f:
                outcome, value = pickle.load(f)
        except (OSError, EOFError, pickle.UnpicklingError):
            raise UncompletedJobError(f"job {self.job_id} exited with code {self._code} and left no result; "
                                      f"log: {self.paths.stderr}") from None
        if outcome == "success":
            return value
        raise FailedJobError(f"Job {self.job_id} failed with trace:\n{'-' * 40}\n{value}\n{'-' * 40}\n"
                             f"logs: {self.paths.stderr}")

    def results(self) -> list:
        return [self.result()]

    def cancel(self, check: bool = True) -> None:
        if not self.done():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)
            for _ in range(100):  # reap it: no zombie left behind
                if self.done():
                    break
                time.sleep(0.02)


def _fork_child(folder: Path, fn: Callable, args: tuple, launcher: tuple | None) -> None:  # pragma: no cover
    code, outcome = 1, ("error", "the worker did not finish")
    paths = None
    try:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        job_id = str(os.getpid())
        paths = _Paths(folder, job_id)
        paths.stdout.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            paths.result_pickle.unlink()
        for fd, path in ((1, paths.stdout), (2, paths.stderr)):
            f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(f, fd)
            os.close(f)
        os.environ["SUBMITIT_LOCAL_JOB_ID"] = job_id  # the job id a part's marker records
        if launcher:
            watch_launcher(launcher)
        else:
            signal.signal(signal.SIGINT, lambda *_: os._exit(130))
        outcome, code = ("success", fn(*args)), 0
    except BaseException:  # noqa: BLE001 - everything goes to the log and the result file
        tb = traceback.format_exc()
        with contextlib.suppress(Exception):
            sys.stderr.write(tb)
        outcome = ("error", tb.rstrip())
    finally:
        with contextlib.suppress(BaseException):
            if paths is not None:
                tmp = paths.result_pickle.with_suffix(".tmp")
                with open(tmp, "wb") as f:
                    pickle.dump(outcome, f)
                os.replace(tmp, paths.result_pickle)
        with contextlib.suppress(BaseException):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def process_start(pid: int) -> str | None:
    """A process's start time (field 22 of /proc/PID/stat), or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def launcher_identity() -> tuple | None:
    """(pid, start time) of this process: a worker can tell whether it still exists (a pid
    alone may be reused). None where /proc is missing."""
    start = process_start(os.getpid())
    return (os.getpid(), start) if start else None


def watch_launcher(launcher: tuple, poll_s: float = 0.5) -> None:
    """In a local worker: exit when the launcher is gone (killed, even with SIGKILL; a rerun
    resumes from the markers), and exit quietly on Ctrl-C (the launcher reports it once)."""
    pid, start = launcher
    if pid == os.getpid():
        return  # the launcher itself runs this group
    signal.signal(signal.SIGINT, lambda *_: os._exit(130))  # no traceback per worker on Ctrl-C

    def watch():
        while process_start(pid) == start:
            time.sleep(poll_s)
        os._exit(143)

    threading.Thread(target=watch, name="launcher-watch", daemon=True).start()


@contextlib.contextmanager
def quiet_ctrl_c():
    """Start interpreter-based local jobs with SIGINT ignored (inherited through exec): a
    Ctrl-C in the terminal then reaches only the launcher, which stops its jobs and says so
    once, instead of every submitit controller and worker printing a traceback."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


def _submitit_local(options: ClusterOptions, folder: Path, name: str) -> submitit.Executor:
    if options.nodes != 1:
        raise ConfigError(f"the local executor runs on one node; --nodes {options.nodes} needs SLURM")
    folder.mkdir(parents=True, exist_ok=True)
    ex = submitit.LocalExecutor(folder=folder / "%j", max_num_timeout=options.max_requeues)
    ex.update_parameters(name=name, timeout_min=options.timeout_min, nodes=1, tasks_per_node=options.tasks_per_node,
                         gpus_per_node=options.gpus_per_node, signal_delay_s=min(options.signal_delay_s, 30),
                         setup=list(options.setup))
    return ex


@dataclass(eq=False, repr=False)
class LocalBackend(Backend):
    """Worker processes on this machine; ``workers`` parts run at once.

    ``fork``: None (default) forks workers from the launcher whenever that is safe
    (``fork_is_safe``, and no GPUs are handed out), True/False force either way
    (False: every worker a fresh interpreter through submitit's local executor).
    ``isolated``: the launcher runs no part itself (every group its own process)."""

    fork: bool | None = None
    isolated: bool = False
    name = "local"
    poll_s = 0.05  # a local job is polled by a process check, no scheduler query

    def in_launcher(self, workers):
        return workers <= 1 and not self.isolated

    def pack(self, pending, workers, options):
        n = max(1, min(workers, len(pending)))
        return [pending[i::n] for i in range(n)]

    def _forks(self, options: ClusterOptions) -> bool:
        if self.fork is not None:
            return self.fork
        return not options.gpus_per_node and fork_is_safe()

    def submit(self, fn, args, groups, *, options, folder, name, after, shape=None) -> Launch:
        groups = [list(g) for g in groups]
        launcher = launcher_identity()
        if shape is None and not self.isolated and len(groups) == 1:
            # one group: this process runs it (datatrove runs a single local worker the same way):
            # nothing to start, and a failure raises right here
            log.info("%s: %d parts in this process", name, len(groups[0]))
            return Launch(groups=groups, results=call_here(fn, (*args, groups[0])))
        # the launcher would only wait: it runs the first group itself (in wait()), unless GPUs are
        # handed out to the workers or each part is a multi-task job
        here = groups.pop(0) if not self.isolated and not options.gpus_per_node and shape is None else []
        if shape is None and self._forks(options):
            jobs = [ForkJob(folder, fn, (*args, g), launcher) for g in groups]
            how = "forked"
        else:
            nodes, tasks = shape or (1, 1)
            ex = _submitit_local(options.replace(nodes=nodes, tasks_per_node=tasks), folder, name)
            with quiet_ctrl_c(), ex.batch():
                jobs = [ex.submit(fn, *args, g) for g in groups]
            how = "interpreters"
        log.info("%s: %d worker processes (%s), pids %s%s", name, len(jobs), how, ",".join(j.job_id for j in jobs),
                 f"; parts {here} in this process" if here else "")
        return Launch(jobs=jobs, groups=groups, here=here)

    def interrupted(self, jobs):
        for j in jobs:  # local workers die with their launcher
            j.cancel(check=False)

    def submit_job(self, fn, args, kwargs, *, options, folder, name):
        with quiet_ctrl_c():
            job = _submitit_local(options, Path(folder), name).submit(fn, *args, **kwargs)
        log.info("%s on local processes: %s", name, J.describe([job]))
        return job

    def describe(self, options):
        return {"name": self.name, "fork": self._forks(options), "isolated": self.isolated,
                "gpus_per_node": options.gpus_per_node, "log_folder": options.log_folder}


# -- SLURM ----------------------------------------------------------------------------------------


def _submitit_slurm(options: ClusterOptions, folder: Path, name: str, after: Sequence[str] = (),
                    parallelism: int | None = None) -> submitit.Executor:
    folder.mkdir(parents=True, exist_ok=True)
    ex = submitit.AutoExecutor(folder=folder / "%j", cluster="slurm", slurm_max_num_timeout=options.max_requeues)
    common = dict(name=name, timeout_min=options.timeout_min, nodes=options.nodes,
                  tasks_per_node=options.tasks_per_node, gpus_per_node=options.gpus_per_node)
    if options.cpus_per_task:
        common["cpus_per_task"] = options.cpus_per_task
    if options.mem_gb:
        common["mem_gb"] = options.mem_gb
    extra = dict(options.extra)
    if after:
        extra["dependency"] = "afterok:" + ":".join(after)
    slurm = dict(slurm_partition=options.partition, slurm_account=options.account, slurm_qos=options.qos,
                 slurm_constraint=options.constraint,
                 slurm_array_parallelism=parallelism or options.array_parallelism,
                 slurm_signal_delay_s=options.signal_delay_s,
                 slurm_setup=list(options.setup) or None, slurm_additional_parameters=extra or None)
    ex.update_parameters(**common, **{k: v for k, v in slurm.items() if v is not None})
    return ex


@dataclass(eq=False, repr=False)
class SlurmBackend(Backend):
    """submitit job arrays. An array holds at most the cluster's MaxArraySize tasks (more
    parts go into several arrays), each task runs ``options.parts_per_task`` parts, and a
    stage's arrays wait for the jobs of the stages it comes after (afterok)."""

    name = "slurm"
    can_detach = True

    def check(self):
        if not slurm_available():
            raise ConfigError("--executor slurm: no SLURM controller answers 'scontrol ping' "
                              "(is SLURM_CONF set, is slurmctld up?)")
        return self

    def dependencies(self, after):
        return [i for sub in after for i in sub.pending_job_ids()]

    def pack(self, pending, workers, options):
        k = max(1, options.parts_per_task)
        return [list(pending[i:i + k]) for i in range(0, len(pending), k)]

    def submit(self, fn, args, groups, *, options, folder, name, after, shape=None) -> Launch:
        nodes, tasks = shape or (1, 1)
        opts = options.replace(nodes=nodes, tasks_per_node=tasks)
        cap = max_array_size()
        jobs = []
        for i in range(0, len(groups), cap):
            ex = _submitit_slurm(opts, folder, name, after)
            with ex.batch():
                jobs += [ex.submit(fn, *args, g) for g in groups[i:i + cap]]
        log.info("%s: %d parts on slurm%s: %s", name, sum(map(len, groups)),
                 f" after {','.join(after)}" if after else "", J.describe(jobs))
        return Launch(jobs=jobs, groups=[list(g) for g in groups])

    def live_jobs(self, record, pending):
        from .status import queued_or_running

        if record.get("executor") != self.name:
            return [], []
        ids = list(record.get("job_ids", []))
        live = queued_or_running(ids)
        jobs, groups = [], []
        for job_id, group in zip(ids, record.get("groups", [])):
            mine = [r for r in group if r in pending]
            if mine and job_id in live:
                jobs.append(submitit.SlurmJob(folder=Path(record["log_folder"]) / "%j", job_id=job_id))
                groups.append(mine)
        return jobs, groups

    def submit_job(self, fn, args, kwargs, *, options, folder, name):
        job = _submitit_slurm(options, Path(folder), name).submit(fn, *args, **kwargs)
        log.info("%s on slurm: %s", name, J.describe([job]))
        return job

    def describe(self, options):
        opts = options.as_dict()
        opts["timeout_min"] = options.timeout_min
        return {"name": self.name, "max_array_size": max_array_size(), "options": opts}


class PlanBackend(Backend):
    """The backend a name stands for, not resolved (no controller asked): for a dry run that
    only describes the job it would submit. It runs nothing."""

    def __init__(self, name: str):
        self.name = name

    def submit(self, fn, args, groups, *, options, folder, name, after, shape=None) -> Launch:
        raise ConfigError(f"{name}: the '{self.name}' executor is a plan (a dry run's); build a runnable one "
                          f"with Executor.create({self.name!r})")

    def __repr__(self) -> str:
        return f"PlanBackend({self.name!r})"


# -- names (the CLI's --executor) -----------------------------------------------------------------

BACKENDS: dict[str, Callable[[], Backend]] = {"inline": InlineBackend, "debug": InlineBackend,
                                             "local": LocalBackend, "slurm": SlurmBackend}
NAMES = ("auto", "slurm", "local", "inline", "debug")  # debug: the old name of inline


def backend_named(name: str) -> Backend:
    """The backend a name picks: ``auto`` (or CONCEPTPRUNE_EXECUTOR) is SLURM when a controller
    answers, else local processes."""
    if name == "auto":
        name = os.environ.get("CONCEPTPRUNE_EXECUTOR", "auto")
    if name == "auto":
        return SlurmBackend() if slurm_available() else LocalBackend()
    if name not in BACKENDS:
        raise ConfigError(f"--executor must be one of {', '.join(NAMES[:-1])}, not {name!r}")
    return BACKENDS[name]().check()


def resolve_executor(name: str) -> str:
    """The name of the backend ``name`` picks (``cluster info``)."""
    return backend_named(name).name
