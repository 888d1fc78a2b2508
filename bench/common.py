"""Benchmark helpers: run a command in a child process, report wall time and its peak RSS."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def measure(cmd: list[str], env: dict | None = None, cwd=None) -> dict:
    """Wall seconds and peak RSS (MiB) of one child process (ru_maxrss via wait4)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, env={**os.environ, **(env or {})}, cwd=cwd, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{stderr[-3000:]}")
    return {"wall_s": round(wall, 3), "peak_rss_mib": round(usage.ru_maxrss / 1024, 1), "stdout": stdout[-2000:]}


def python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def save(name: str, payload: dict) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def table(rows: list[dict], cols: list[str]) -> str:
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")
    return "\n".join(lines)


def floor_row(head: dict, ours: dict, ours_runs: list, fl: dict, floor_runs: list) -> dict:
    """One result row of a bench against its floor (one read + the bare GEMMs): ``ours`` and
    ``fl`` are the best runs, ``*_runs`` all of them."""
    floor_s = fl["read_s"] + fl["gemm_s"]
    return {**head, "tmac": round(fl["tmac"], 3),
            "ours_wall_s": ours["wall_s"], "ours_peak_rss_mib": ours["peak_rss_mib"],
            "floor_read_s": round(fl["read_s"], 2), "floor_gemm_s": round(fl["gemm_s"], 2),
            "floor_gflops": round(2e3 * fl["tmac"] / fl["gemm_s"], 1), "floor_peak_rss_mib": fl["rss"],
            "ratio_ours_over_floor": round(ours["wall_s"] / floor_s, 3),
            "all_ours_s": [r["wall_s"] for r in ours_runs],
            "all_floor_s": [round(r["read_s"] + r["gemm_s"], 2) for r in floor_runs]}
