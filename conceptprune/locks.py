"""Outputs locked while a command writes them.

``file_lock(path)`` holds an exclusive ``flock`` on ``path`` (created; deleted by its holder only
with ``remove``, and then a waiter that got the lock of the deleted file starts over). flock
locks belong to the open file, so the kernel drops one when its process dies: a killed run never
leaves a stale lock. A second run waits, and says so. Works on local disks and on NFS (Linux
emulates flock with NFS byte-range locks).

``output_lock(out)`` is the lock of one output: ``.<name>.lock`` beside it while a command runs
(removed when it is done). Every command
that writes ``out`` together with reusable state next to it (a filter's ``KEEP.parts/``, a
reshard's ``OUT.state/``) holds it from its first check of ``out`` to its last write, so two
commands given the same output run one after the other instead of sharing that state.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import socket
import time
from pathlib import Path
from typing import Iterator

log = logging.getLogger(__name__)


@contextlib.contextmanager
def file_lock(path: str | os.PathLike, doing: str, remove: bool = False) -> Iterator[None]:
    """Hold an exclusive flock on the file ``path`` for the block (see the module's note).

    ``remove``: the holder deletes the file before it lets go (no lock file is left beside an
    output). A waiter that then gets the lock of the deleted file sees that the path no longer
    names it and starts over, so two processes never both believe they hold the lock."""
    path = Path(path)
    waited = None
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise
            log.info("%s: cannot lock a read-only folder (%s); going on unlocked", path.parent, e.strerror)
            yield  # reading needs no lock; any write there fails on its own, naming its file
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            if waited is None:
                log.warning("%s is held by %s; waiting for it before %s", path, holder, doing)
                waited = time.time()
            fcntl.flock(fd, fcntl.LOCK_EX)
        if _same_file(fd, path):
            break
        os.close(fd)  # its holder removed it on the way out: take the current one
    if waited is not None:
        log.info("%s: got the lock after %.1f s", path, time.time() - waited)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} ({doing})\n".encode(), 0)
        yield
    finally:
        if remove:
            with contextlib.suppress(OSError):
                os.unlink(path)
        os.close(fd)  # releases the lock


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


def lock_path(out: str | os.PathLike) -> Path:
    out = Path(out)
    return out.parent / f".{out.name}.lock"


def output_lock(out: str | os.PathLike, doing: str):
    """The lock of the output file ``out`` (its folder is created)."""
    path = lock_path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    return file_lock(path, doing, remove=True)
