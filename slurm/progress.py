"""Live progress of long work, read by whoever watches it: the launcher's progress line and
``conceptprune status``.

A job (or the launcher) writes ``progress.json`` in its work folder from time to time: what
it counts (``done``/``total`` in ``unit``), and optionally its rate, a loss, an ETA. The
format is the job layer's; what the numbers mean is the stage's.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from conceptprune.atomic import write_json

FILE = "progress.json"


def write_progress(folder: str | Path, *, done: float, total: float, unit: str = "steps", **extra) -> dict:
    rec = {"done": done, "total": total, "unit": unit, "updated": time.time(), **extra}
    write_json(Path(folder) / FILE, rec)
    return rec


def read_progress(folder: str | Path) -> dict | None:
    path = Path(folder) / FILE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):  # absent, or being replaced this instant
        return None


def _duration(s: float) -> str:
    s = int(max(0, s))
    h, m = divmod(s // 60, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s % 60:02d}s"


def format_progress(p: dict, now: float | None = None) -> str:
    """'step 120/500 (24%), 1,234 samples/s, loss 3.210, ETA 5m12s (updated 4s ago)'."""
    now = time.time() if now is None else now
    done, total = p.get("done", 0), p.get("total") or 0
    parts = [f"{p.get('unit', 'steps').rstrip('s')} {done:,.0f}/{total:,.0f}"
             + (f" ({100 * done / total:.0f}%)" if total else "")]
    if p.get("rate") is not None:
        parts.append(f"{p['rate']:,.0f} {p.get('rate_unit', 'samples/s')}")
    if p.get("loss") is not None:
        parts.append(f"loss {p['loss']:.3f}")
    if p.get("eta_s") is not None:
        parts.append(f"ETA {_duration(p['eta_s'])}")
    if p.get("updated"):
        parts.append(f"(updated {_duration(now - p['updated'])} ago)")
    return ", ".join(parts)
