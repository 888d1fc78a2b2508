"""``conceptprune compare``: DataComp's aggregates of one or more results files, side by side
with the published baselines, a per-task table, and plots. Markdown and CSV."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from conceptprune.errors import ConfigError

from . import baselines as B
from .run import read_results
from .tasks import AGGREGATES, BY_KEY, TASKS


def load(path: str | Path, require_all: bool = True) -> dict[str, dict]:
    """key -> row; duplicated, unknown or (with require_all) missing tasks are errors."""
    rows = read_results(path)
    if not rows:
        raise ConfigError(f"{path}: no results")
    out = {}
    for r in rows:
        key = r.get("key")
        if key not in BY_KEY and require_all:
            raise ConfigError(f"{path}: unknown task {key!r} (your own tasks need --partial)")
        if key in out:
            raise ConfigError(f"{path}: task {key} appears more than once")
        _check_main_metric(path, key, r)
        out[key] = r
    missing = [t.key for t in TASKS if t.main_metric is not None and t.key not in out]
    if require_all and missing:
        raise ConfigError(f"{path}: {len(missing)} task(s) with a main metric missing, e.g. {', '.join(missing[:3])}"
                          " (evaluate them, or pass --partial to aggregate what is there)")
    return out


def _check_main_metric(path, key, row) -> None:
    """A main metric is null or a finite fraction in [0, 1] (57.3 is a percentage: refused)."""
    metrics = row.get("metrics")
    if not isinstance(metrics, dict):
        raise ConfigError(f"{path}: task {key}: no 'metrics' object")
    v = metrics.get("main_metric")
    if v is None:
        return
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not 0.0 <= v <= 1.0:
        raise ConfigError(f"{path}: task {key}: main_metric {v!r} is not a fraction in [0, 1]"
                          + (" (a percentage? divide by 100)" if isinstance(v, (int, float)) and 1 < v <= 100 else ""))


def aggregates(results: dict[str, dict]) -> dict[str, float]:
    """DataComp's aggregates: plain means of the main metrics of each group (NaN if absent)."""
    out = {}
    for name, member in AGGREGATES.items():
        vals = [results[t.key]["metrics"]["main_metric"] for t in TASKS if member(t) and t.key in results]
        vals = [float("nan") if v is None else float(v) for v in vals]
        out[name] = float(np.mean(vals)) if vals else float("nan")
    return out


def compare(paths: list[str], *, scale: str = "medium", names: list[str] | None = None, out: str | None = None,
            partial: bool = False) -> dict:
    if names is not None and len(names) != len(paths):
        raise ConfigError(f"--names gives {len(names)} name(s) for {len(paths)} results file(s); give one per file")
    runs = [load(p, require_all=not partial) for p in paths]
    names = names or [Path(p).parent.name or Path(p).stem for p in paths]
    if len(set(names)) < len(names):
        names = [f"{n} ({i})" for i, n in enumerate(names)]
    agg_rows = [{"run": n, "kept": None, **aggregates(r)} for n, r in zip(names, runs)]
    table_rows = agg_rows + (B.rows(scale) if scale else [])
    per_task = [{"key": t.key, "task": t.name, **{n: _main(r, t.key) for n, r in zip(names, runs)}}
                for t in TASKS if t.main_metric is not None and any(t.key in r for r in runs)]
    own = sorted({k for r in runs for k in r if k not in BY_KEY})  # your own tasks, after DataComp's
    per_task += [{"key": k, "task": next(r[k]["dataset"] for r in runs if k in r),
                  **{n: _main(r, k) for n, r in zip(names, runs)}} for k in own]
    md = _markdown(table_rows, per_task, names, scale)
    result = {"aggregates": table_rows, "per_task": per_task, "markdown": md}
    if out:
        d = Path(out)
        d.mkdir(parents=True, exist_ok=True)
        (d / "comparison.md").write_text(md)
        _csv(d / "aggregates.csv", table_rows, ["run", "kept", *B.COLUMNS])
        _csv(d / "per_task.csv", per_task, ["key", "task", *names])
        result["plots"] = [str(p) for p in _plots(d, table_rows, per_task, names)]
    return result


def _main(results, key):
    r = results.get(key)
    v = r["metrics"].get("main_metric") if r else None
    return None if v is None else float(v)


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, int):
        return f"{v / 1e6:.0f}M"
    return f"{v:.3f}"


def _markdown(table_rows, per_task, names, scale) -> str:
    cols = ["run", "kept", *B.COLUMNS]
    lines = [f"## Aggregates ({'with the DataComp ' + scale + ' baselines' if scale else 'runs only'})", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in table_rows:
        lines.append("| " + " | ".join([r["run"], _fmt(r["kept"])] + [_fmt(r[c]) for c in B.COLUMNS]) + " |")
    lines += ["", "## Per task (main metric)", "", "| task | " + " | ".join(names) + " |",
              "|" + "---|" * (len(names) + 1)]
    for r in per_task:
        lines.append(f"| {r['task']} | " + " | ".join(_fmt(r[n]) for n in names) + " |")
    return "\n".join(lines) + "\n"


def _csv(path: Path, rows: list[dict], cols: list[str]) -> None:
    import csv

    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def _plots(d: Path, table_rows, per_task, names) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, ax = plt.subplots(figsize=(max(7, 1.1 * len(table_rows)), 4.5))
    width = 0.8 / len(B.COLUMNS)
    x = np.arange(len(table_rows))
    for i, c in enumerate(B.COLUMNS):
        ax.bar(x + i * width, [r[c] if r[c] is not None else np.nan for r in table_rows], width, label=c)
    ax.set_xticks(x + 0.4 - width / 2)
    ax.set_xticklabels([r["run"].replace("baseline: ", "") for r in table_rows], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("score")
    ax.legend(fontsize=8, ncol=3)
    ax.set_title("DataComp aggregates")
    fig.tight_layout()
    paths.append(d / "aggregates.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    if len(names) >= 2:  # per-task deltas of every run against the first
        ref = names[0]
        fig, ax = plt.subplots(figsize=(9, 0.22 * len(per_task) + 1.5))
        y = np.arange(len(per_task))
        for j, n in enumerate(names[1:]):
            delta = [(r[n] - r[ref]) if r[n] is not None and r[ref] is not None else np.nan for r in per_task]
            ax.barh(y + j * 0.8 / (len(names) - 1), delta, 0.8 / (len(names) - 1), label=f"{n} - {ref}")
        ax.set_yticks(y)
        ax.set_yticklabels([r["task"] for r in per_task], fontsize=7)
        ax.axvline(0, color="k", lw=0.8)
        ax.set_xlabel("difference in main metric")
        ax.legend(fontsize=8)
        ax.invert_yaxis()
        fig.tight_layout()
        paths.append(d / "per_task_delta.png")
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    return paths
