"""Who is running a part right now, whatever the executor.

The process that runs a part (an inline launcher, a local worker, task 0 of a SLURM job) holds
an exclusive ``flock`` on ``<markers>/<rank>-of-<world>.running`` for as long as the part runs,
and writes its identity (host, pid, job id) into it. The kernel drops the lock when that
process ends, however it ends (``kill -9`` included), so a held lock is a live run and a free
one is not: a second launcher asks before it runs the same part (two trainings would
otherwise write one run folder), and ``conceptprune status`` asks before it shows an ETA.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path

from conceptprune.errors import ConfigError

from .dist import job_identity

log = logging.getLogger(__name__)


def lock_path(marker_dir: Path, rank: int, world_size: int) -> Path:
    return Path(marker_dir) / f"{rank:05d}-of-{world_size:05d}.running"


_warned = False


def _try_lock(fd: int) -> bool | None:
    """True: locked; False: another process holds it; None: this file system takes no locks
    (Lustre mounted without ``flock``, some FUSE): liveness is then not known, and nothing is
    refused for it."""
    global _warned
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            return False
        if not _warned:
            log.warning("run locks are not supported where the markers are (%s): a second launcher of a part "
                        "being run now is not detected", e)
            _warned = True
        return None


class PartBusyError(ConfigError):
    pass


@contextlib.contextmanager
def hold_part(marker_dir: Path, rank: int, world_size: int, wait_s: float = 5.0):
    """Hold the part's run lock while the block runs; PartBusyError if another process holds it
    (after ``wait_s``: a launcher's probe holds it for an instant, a stopping run for a moment)."""
    path = lock_path(marker_dir, rank, world_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + wait_s
        while _try_lock(fd) is False:
            if time.monotonic() > deadline:
                raise PartBusyError(f"part {rank} of {world_size} in {marker_dir} is being run by "
                                    f"{describe(read_holder(path))}")
            time.sleep(0.05)
        job_id, _ = job_identity()
        info = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "job_id": job_id,
                           "since": time.time()}).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, info, 0)
        yield
    finally:
        os.close(fd)  # drops the lock; the file stays (removing it would race with a new holder)


def read_holder(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text() or "{}")
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def describe(holder: dict) -> str:
    if not holder:
        return "another process"
    job = f", job {holder['job_id']}" if holder.get("job_id") else ""
    return f"process {holder.get('pid')} on {holder.get('host')}{job}"


def is_running(marker_dir: Path, rank: int, world_size: int) -> bool:
    """Whether a process holds the part's run lock now (an instant's probe)."""
    path = lock_path(marker_dir, rank, world_size)
    try:
        fd = os.open(path, os.O_RDWR)  # an exclusive lock on NFS needs a writable descriptor
    except OSError:
        return False
    try:
        got = _try_lock(fd)
        if got:
            fcntl.flock(fd, fcntl.LOCK_UN)
        return got is False
    finally:
        os.close(fd)


def refuse_busy_parts(name: str, marker_dir: Path, ranks, world_size: int, wait_s: float = 5.0) -> None:
    """ConfigError naming the first of ``ranks`` that another process is running now (one that
    is stopping gets ``wait_s`` to let go)."""
    deadline = time.monotonic() + wait_s
    for rank in ranks:
        while is_running(marker_dir, rank, world_size):
            if time.monotonic() > deadline:
                holder = read_holder(lock_path(marker_dir, rank, world_size))
                raise PartBusyError(f"{name}: part {rank} of {world_size} ({marker_dir.parent.parent}) is being run "
                                    f"now by {describe(holder)}; wait for it to finish (or stop it), then rerun")
            time.sleep(0.1)
