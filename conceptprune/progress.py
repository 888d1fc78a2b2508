"""Progress bars (tqdm on stderr) that the CLI's --quiet can switch off.

Whether bars are drawn is read from ``CONCEPTPRUNE_PROGRESS`` (``0``: none) each time a bar
is made, so a command's setting also reaches the worker processes it starts.
"""

from __future__ import annotations

import os
import sys

from tqdm.auto import tqdm

ENV = "CONCEPTPRUNE_PROGRESS"


def progress_enabled() -> bool:
    return os.environ.get(ENV, "1") != "0"


def progress_bar(iterable=None, *, total=None, desc: str = "", unit: str = "it", disable: bool = False, **kw):
    return tqdm(iterable, total=total, desc=desc, unit=unit, unit_scale=True, dynamic_ncols=True,
                disable=disable or not progress_enabled(), file=sys.stderr, mininterval=0.5, **kw)
