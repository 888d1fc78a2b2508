"""Paths that come from outside (a server's file listing, a row of a downloaded table, a record in
a run folder, a ``--name`` flag) checked to stay inside the folder they are meant for.

One rule for every such path, applied before anything is read, written or deleted with it:
relative, no ``..`` part, no empty or ``.`` part games, and, once joined to the folder and
resolved (symbolic links included), still below that folder. A path that breaks it is a
:class:`UnsafePathError` naming the path and where it came from.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

from .errors import ConceptPruneError


class UnsafePathError(ConceptPruneError):
    """A path given from outside would leave the folder it belongs to."""


def relative(rel, where: str, root: str = "its folder") -> PurePosixPath:
    """The lexical half of the rule (no file system): a relative path without ``..``."""
    text = os.fspath(rel) if isinstance(rel, (str, os.PathLike)) else rel
    if not isinstance(text, str) or not text or "\0" in text or "\\" in text:
        raise UnsafePathError(f"{where}: unusable path {text!r}")
    pure = PurePosixPath(text)
    if pure.is_absolute() or ".." in pure.parts or text.startswith("~") or not pure.parts:
        raise UnsafePathError(f"{where}: path {text!r} would leave {root}")
    return pure


def inside(root: str | os.PathLike, rel: str | os.PathLike, where: str) -> Path:
    """``root / rel``, refused unless it stays inside ``root`` (``where`` names the source of
    ``rel`` for the error: a listing, a file, a flag)."""
    pure = relative(rel, where, str(root))
    root = Path(root)
    joined = root / pure
    if not is_within(joined, root):
        raise UnsafePathError(f"{where}: path {str(pure)!r} would leave {root} (through a link)")
    return joined


def is_within(path: str | os.PathLike, root: str | os.PathLike) -> bool:
    """Whether ``path``, resolved (links followed, missing parts allowed), is ``root`` or below it."""
    p, r = Path(path).resolve(), Path(root).resolve()
    return p == r or r in p.parents


def check_inside(path: str | os.PathLike, root: str | os.PathLike, where: str) -> Path:
    """An absolute or relative path that must resolve below ``root`` (e.g. a checkpoint a run
    folder's record names): refused otherwise."""
    p = Path(path)
    if not p.is_absolute():
        p = Path(root) / p
    if not is_within(p, root):
        raise UnsafePathError(f"{where}: {path} is outside {root}")
    return p
