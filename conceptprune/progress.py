"""Progress bars (tqdm on stderr) that the CLI's --quiet / log level can switch off."""

from __future__ import annotations

import os
import sys

from tqdm.auto import tqdm

_ENABLED = os.environ.get("CONCEPTPRUNE_PROGRESS", "1") != "0"


def set_enabled(flag: bool) -> None:
    global _ENABLED
    _ENABLED = flag


def progress_bar(iterable=None, *, total=None, desc: str = "", unit: str = "it", disable: bool = False, **kw):
    return tqdm(iterable, total=total, desc=desc, unit=unit, unit_scale=True, dynamic_ncols=True,
                disable=disable or not _ENABLED, file=sys.stderr, mininterval=0.5, **kw)
