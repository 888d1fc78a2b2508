"""Atomic file writes: a temporary file in the destination folder, fsync, then rename.

A reader (or a resumed run) sees either the old file or the complete new one, never a
partial write; an interrupted writer leaves only a ``.tmp-*`` file that is cleaned up.
A full disk (or quota, file-size limit, read-only file system) ends with a
:class:`WriteError` naming the file being written.

``StagedFile`` splits the two halves: write and fsync now, rename later, so several outputs
can be prepared completely before any of them replaces an existing file (see
``keeplist.publish``: the keep-list lands last).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import tempfile
from pathlib import Path
from typing import IO, Iterator

from .errors import ConceptPruneError

# errors that mean "this output cannot be written here", as opposed to a bug or an input error
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}


class WriteError(ConceptPruneError):
    """An output could not be written (disk full, quota, file too large, read-only)."""


def write_error(path: str | os.PathLike, e: OSError) -> WriteError:
    why = e.strerror or f"short write, disk full or file-size limit? {e}"
    return WriteError(f"{path}: cannot write ({why}); nothing was replaced")


def is_write_failure(e: BaseException) -> bool:
    if not isinstance(e, OSError):
        return False
    # numpy's tofile (np.save into a real file) reports a short write without an errno
    return e.errno in _WRITE_ERRNOS or (e.errno is None and "requested and" in str(e) and "written" in str(e))


class StagedFile:
    """A temporary sibling of ``path``, written and fsynced, renamed onto ``path`` by ``commit``."""

    def __init__(self, path: str | os.PathLike, mode: str = "wb"):
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.tmp-", dir=self.path.parent)
        except OSError as e:
            if is_write_failure(e) or e.errno in (errno.EACCES, errno.ENOTDIR):
                raise write_error(self.path, e) from None
            raise
        self.tmp = Path(tmp)
        self.file: IO = os.fdopen(fd, mode)

    def finish(self) -> None:
        """Flush and fsync the data (the file stays under its temporary name)."""
        try:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            os.chmod(self.tmp, 0o666 & ~_umask())  # mkstemp makes 0600; outputs are shared on clusters
        except OSError as e:
            self.discard()
            if is_write_failure(e):
                raise write_error(self.path, e) from None
            raise

    def commit(self) -> Path:
        if not self.file.closed:
            self.finish()
        os.replace(self.tmp, self.path)
        return self.path

    def discard(self) -> None:
        with contextlib.suppress(OSError):
            self.file.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.tmp)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary sibling of ``path`` for writing; rename it onto ``path`` on success."""
    staged = StagedFile(path, mode)
    try:
        yield staged.file
        staged.commit()
    except OSError as e:
        staged.discard()
        if is_write_failure(e):
            raise write_error(path, e) from None
        raise
    except BaseException:
        staged.discard()
        raise


def staged_name(path: str | os.PathLike) -> Path:
    """A hidden temporary name beside ``path`` that keeps its suffix (writers such as
    matplotlib pick the format from it)."""
    path = Path(path)
    return path.with_name(f".{path.stem}.tmp-{secrets.token_hex(4)}{path.suffix}")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: str | os.PathLike, obj) -> None:
    with atomic_open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False, default=_json_default)
        f.write("\n")


def save_figure(fig, path: str | os.PathLike, **kwargs) -> None:
    """A matplotlib figure written atomically (its format from the file's suffix)."""
    fmt = Path(path).suffix.lstrip(".") or "png"
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format=fmt, **kwargs)


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


def _json_default(o):
    import numpy as np

    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, os.PathLike):
        return os.fspath(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def file_digest(path: str | os.PathLike, algorithm: str = "sha256") -> str:
    """Hex digest of a file's bytes, read in 4 MiB blocks (keep-lists, assets, shards)."""
    import hashlib

    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()
