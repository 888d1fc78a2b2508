"""Run manifests: what produced an output, so a keep-list or a run can be traced and redone."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import subprocess
from pathlib import Path
from typing import Sequence

from . import __version__


def git_revision(path: str | os.PathLike | None = None) -> str | None:
    """Commit of the conceptprune checkout (None for a non-git install)."""
    here = Path(path) if path else Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "-C", str(here), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def base_manifest(kind: str, *, command: Sequence[str] | None = None, **fields) -> dict:
    """The fields every manifest has; ``command``: the command line that made the output (the
    CLI passes its argv; None for a Python call)."""
    m = {
        "kind": kind,
        "conceptprune_version": __version__,
        "git_revision": git_revision(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "python": platform.python_version(),
        "command": list(command) if command is not None else None,
    }
    m.update(fields)
    return m
