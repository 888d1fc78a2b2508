"""``conceptprune compare``: results files side by side with published results, per task and in
DataComp's aggregates, with an interval and a verdict for every difference.

Baselines: DataComp's baseline checkpoints of a scale (``scale``; their per-task rows from
open_clip's results table) and any OpenCLIP checkpoint (``model/pretrained``) or DataComp
leaderboard entry named in ``against`` (see ``baselines``). Aggregates are recomputed from
per-task values wherever there are some (a leaderboard entry has ImageNet and the average only).

Intervals (95%) and verdicts (better / worse / within noise; see ``bootstrap``):

- run vs run: the paired bootstrap over the examples both were evaluated on (each task's metric
  recomputed on every resample; the average as the mean of the resampled tasks);
- run vs a published baseline (no per-example data): the run's own bootstrap interval, widened
  on both sides by DataComp's stated seed noise (ImageNet 0.002, average 0.006; other tasks
  ImageNet's figure);
- without per-example outcomes (``eval_outcomes/`` beside the results file): the seed noise alone.

Outputs with ``out``: ``comparison.md``, ``comparison.html`` (tables and plots, no server),
``aggregates.csv``, ``per_task.csv`` (one column per run and baseline, then per pair
``delta RUN - NAME`` with ``... lo``, ``... hi``, ``... verdict``, ``... interval``; a last row
``average``), ``comparison.json`` (settings and sources) and the plots, all written atomically.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from conceptprune.atomic import atomic_open, write_json
from conceptprune.errors import ConfigError

from . import baselines as B
from . import bootstrap as BS
from .run import read_results
from .tasks import AGGREGATES, BY_KEY, TASKS

MAIN_KEYS = [t.key for t in TASKS if t.main_metric is not None]


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


def aggregate_counts(keys) -> dict[str, tuple[int, int]]:
    """Per aggregate: (tasks of its group among ``keys``, tasks in its group). An aggregate of a
    partial results file is over fewer tasks than the published ones it stands beside."""
    keys = set(keys)
    return {name: (sum(1 for t in TASKS if member(t) and t.key in keys), sum(1 for t in TASKS if member(t)))
            for name, member in AGGREGATES.items()}


def _of(counts: dict | None, col: str) -> str:
    """'' when the aggregate is over its whole group, else ' (n/N)'."""
    n, total = (counts or {}).get(col, (0, 0))
    return f" ({n}/{total})" if n < total else ""


# -- a run's keep-list size, from the run's own records -----------------------------------------


def run_folder_of(results: str | Path) -> Path | None:
    """The training run a results file belongs to: the run evaluate recorded beside it
    (eval_model.json), else the first of its folder, that folder's parent and grandparent holding a
    run.json (``RUN/eval/eval_results.jsonl``) or DataComp's info.pkl."""
    import json

    d = Path(results).resolve().parent
    try:  # evaluate records the model it evaluated (eval_model.json)
        run = json.loads((d / "eval_model.json").read_text()).get("run")
        if run and ((Path(run) / "run.json").is_file() or (Path(run) / "info.pkl").is_file()):
            return Path(run)
    except (OSError, ValueError, AttributeError):
        pass
    for cand in (d, d.parent, d.parent.parent):
        if (cand / "run.json").is_file() or (cand / "info.pkl").is_file():
            return cand
    return None


def run_record(run: Path | None) -> dict:
    """The run's run.json (read as JSON: evaluation does not import training); {} when absent or
    unreadable."""
    import json

    if run is None or not (run / "run.json").is_file():
        return {}
    try:
        rec = json.loads((run / "run.json").read_text())
    except (OSError, ValueError):
        return {}
    return rec if isinstance(rec, dict) else {}


def kept_of(results: str | Path) -> int | None:
    """Keep-list entries the run trained on: run.json's data sources (train records, for a reshard
    of a keep-list, the keep-list's manifest), summed; None when any source has no such count."""
    sources = run_record(run_folder_of(results)).get("data")
    if not isinstance(sources, list) or not sources:
        return None
    total = 0
    for src in sources:
        man = src.get("keep_list_manifest") if isinstance(src, dict) else None
        kl = man.get("keep_list") if isinstance(man, dict) else None
        n = kl.get("entries") if isinstance(kl, dict) else None
        if n is None and isinstance(man, dict):
            n = (man.get("counts") or {}).get("out")
        if isinstance(n, bool) or not isinstance(n, int):
            return None
        total += n
    return total


@dataclass
class Side:
    """One column of the comparison: a run (with its outcomes) or a published baseline."""

    name: str
    values: dict  # task key -> main metric
    aggregates: dict
    kind: str  # run | openclip | datacomp baseline | leaderboard
    kept: int | None = None
    outcomes: dict = field(default_factory=dict)  # task key -> bootstrap.Outcomes
    samples: dict = field(default_factory=dict)  # task key -> resampled metric values
    note: str = ""
    problems: tuple = ()
    leaderboard: tuple | None = None  # (imagenet, average) for a leaderboard entry
    counts: dict | None = None  # aggregate -> (tasks averaged, tasks in its group); None: all


@dataclass
class CompareConfig:
    results: list
    names: list | None = None
    against: list = field(default_factory=list)
    scale: str | None = "medium"  # DataComp's baselines and leaderboard of this scale; None: neither
    out: str | None = None
    partial: bool = False
    seed: int = 0
    resamples: int = 1000
    overwrite: bool = True  # False (the CLI without --overwrite): an existing non-empty out is refused


def compare(paths: list[str], *, scale: str | None = "medium", names: list[str] | None = None,
            out: str | None = None, partial: bool = False, against: list[str] | None = None, seed: int = 0,
            resamples: int = 1000, overwrite: bool = True) -> dict:
    return run(CompareConfig(list(paths), names, list(against or []), scale, out, partial, seed, resamples,
                             overwrite))


def check_out(out, overwrite: bool) -> None:
    """Before any work: ``out`` is a folder that is new, empty, or replaced with ``overwrite``."""
    if not out:
        return
    d = Path(out)
    if d.exists() and not d.is_dir():
        raise ConfigError(f"--out {d}: is a file, not a folder")
    if d.is_dir() and any(d.iterdir()) and not overwrite:
        raise ConfigError(f"--out {d} already exists and is not empty; pass --overwrite to replace what is there")


def run(cfg: CompareConfig) -> dict:
    if cfg.names is not None and len(cfg.names) != len(cfg.results):
        raise ConfigError(f"--names gives {len(cfg.names)} name(s) for {len(cfg.results)} results file(s); "
                          "give one per file")
    if cfg.resamples < 100:
        raise ConfigError(f"--resamples {cfg.resamples}: need at least 100 for a 95% interval")
    check_out(cfg.out, cfg.overwrite)
    if cfg.scale is not None:
        B.check_scale(cfg.scale)
    ref = B.load(warn=False)
    against = [ref.find(n, cfg.scale) for n in cfg.against]  # all names checked before any work
    loaded = [load(p, require_all=not cfg.partial) for p in cfg.results]
    names = cfg.names or [Path(p).parent.name or Path(p).stem for p in cfg.results]
    if len(set(names)) < len(names):
        names = [f"{n} ({i})" for i, n in enumerate(names)]
    runs = []
    for n, r, p in zip(names, loaded, cfg.results):
        vals = {k: _main(r, k) for k in r}
        side = Side(n, vals, aggregates(r), "run", outcomes=BS.load_all(p, [k for k in vals if vals[k] is not None]),
                    kept=kept_of(p), counts=aggregate_counts(r))
        _check_outcomes(side, p)
        runs.append(side)
    bases = [_side_of(x, n) for x, n in zip(against, cfg.against)]
    if cfg.scale:
        for row in B.rows(cfg.scale, ref):
            m = next(x for x in ref.models if x.name == row["name"])
            if m.name not in {b.name for b in bases}:
                bases.append(_side_of(m, row["run"], kind="datacomp baseline", kept=row["kept"]))
    for s in runs:
        for k, o in s.outcomes.items():
            s.samples[k] = BS.resampled([o], cfg.seed, cfg.resamples)[0]
    pairs = [(r, b) for r in runs for b in bases] + [(r, runs[0]) for r in runs[1:]]
    deltas = {(a.name, b.name): _deltas(a, b) for a, b in pairs}
    keys = [k for k in MAIN_KEYS if any(k in s.values for s in runs)]
    keys += sorted({k for s in runs for k in s.values if k not in BY_KEY})  # your own tasks, after DataComp's
    per_task = []
    own_names = {k: r[k].get("dataset") or k for r in reversed(loaded) for k in r if k not in BY_KEY}
    has_average = any(not math.isnan(s.aggregates.get("Average", float("nan"))) for s in runs)
    for k in keys + (["average"] if has_average else []):
        row = {"key": k, "task": _average_label(runs) if k == "average" else
               BY_KEY[k].name if k in BY_KEY else own_names[k]}
        for s in runs + bases:
            row[s.name] = s.aggregates.get("Average") if k == "average" else s.values.get(k)
        for (a, b), d in deltas.items():
            col = f"delta {a} - {b}"
            v = d.get(k)
            row.update({col: v and v["delta"], f"{col} lo": v and v["lo"], f"{col} hi": v and v["hi"],
                        f"{col} verdict": v and v["verdict"], f"{col} interval": v and v["method"]})
        per_task.append(row)
    agg_rows = [{"run": s.name, "kind": s.kind, "kept": s.kept, **s.aggregates,
                 "average_tasks": "{}/{}".format(*(s.counts or {}).get("Average", (len(MAIN_KEYS), len(MAIN_KEYS)))),
                 "_counts": s.counts} for s in runs + bases]
    ranks = {}
    if cfg.scale:
        for s in runs:
            avg = s.aggregates.get("Average")
            if avg is not None and not math.isnan(avg):
                ranks[s.name] = B.rank(avg, cfg.scale, ref=ref)
    summary = [_summary(a, b, deltas[(a.name, b.name)]) for a, b in pairs]
    settings = {"seed": cfg.seed, "resamples": cfg.resamples, "scale": cfg.scale,
                "seed_noise": {"imagenet1k": B.SEED_NOISE["imagenet1k"], "Average": B.SEED_NOISE["Average"],
                               "other tasks": B.SEED_NOISE_OTHER},
                "results": [str(p) for p in cfg.results], "against": cfg.against,
                "sources": ref.sources}
    detail = [(a.name, b.name) for a, b in pairs if b.kind != "datacomp baseline"]
    md = _markdown(runs, bases, agg_rows, per_task, summary, ranks, detail, cfg)
    result = {"aggregates": [{k: v for k, v in r.items() if k != "_counts"} for r in agg_rows], "per_task": per_task, "summary": summary, "ranks": ranks,
              "markdown": md, "settings": settings}
    if cfg.out:
        d = Path(cfg.out)
        d.mkdir(parents=True, exist_ok=True)
        cols = ["key", "task", *[s.name for s in runs + bases]]
        for a, b in pairs:
            c = f"delta {a.name} - {b.name}"
            cols += [c, f"{c} lo", f"{c} hi", f"{c} verdict", f"{c} interval"]
        _write_text(d / "comparison.md", md)
        _csv(d / "aggregates.csv", agg_rows, ["run", "kind", "kept", *B.COLUMNS, "average_tasks"])
        _csv(d / "per_task.csv", per_task, cols)
        write_json(d / "comparison.json", {**settings, "summary": summary,
                                           "ranks": {k: list(v) for k, v in ranks.items()}})
        plots = _plots(d, runs, bases, agg_rows, per_task, pairs, cfg.scale, ref)
        _write_text(d / "comparison.html", _html(md_parts=(runs, bases, agg_rows, per_task, summary, ranks, detail,
                                                           cfg), plots=plots))
        result["plots"] = [str(p) for p in plots]
        result["html"] = str(d / "comparison.html")
    return result


def _check_outcomes(side: Side, path) -> None:
    for k, o in list(side.outcomes.items()):
        v = side.values.get(k)
        if v is None or abs(o.metric() - v) > 1e-4:
            raise ConfigError(f"{Path(path).parent / BS.OUTCOMES}: task {k}: its per-example outcomes give "
                              f"{o.metric():.4f}, the results file {v} (outcomes of another evaluation? "
                              "evaluate again or remove the folder)")


def _side_of(x, given: str, kind: str | None = None, kept=None) -> Side:
    if isinstance(x, B.ModelResult):
        return Side(given, dict(x.tasks), x.aggregates(), kind or "openclip", kept=kept, problems=x.problems,
                    note=f"OpenCLIP {x.name}", counts=aggregate_counts(x.tasks))
    vals = {"imagenet1k": x.imagenet}
    aggs = {c: float("nan") for c in B.COLUMNS}
    aggs["ImageNet"], aggs["Average"] = x.imagenet, x.average
    return Side(given, vals, aggs, "leaderboard", kept=x.size, problems=x.problems,
                note=f"DataComp {x.scale} {x.track} leaderboard: {x.entry} ({x.team}, {x.date})",
                leaderboard=(x.imagenet, x.average))


def _main(results, key):
    r = results.get(key)
    v = r["metrics"].get("main_metric") if r else None
    return None if v is None else float(v)


def _deltas(a: Side, b: Side) -> dict:
    """Per task key (and 'average'): delta a - b, its 95% interval, the verdict and how it was made."""
    out = {}
    paired = b.kind == "run"
    for k, va in a.values.items():
        vb = b.values.get(k)
        if va is None or vb is None:
            continue
        out[k] = _one(va - vb, a.samples.get(k), b.samples.get(k) if paired else None, va, vb,
                      B.seed_noise(k), paired, a.outcomes.get(k), b.outcomes.get(k))
    aa, ab = a.aggregates.get("Average"), b.aggregates.get("Average")
    if aa is not None and ab is not None and not (math.isnan(aa) or math.isnan(ab)):
        sa = _average_samples(a)
        sb = _average_samples(b) if paired else None
        out["average"] = _one(aa - ab, sa, sb, aa, ab, B.SEED_NOISE["Average"], paired, True, True)
        out["average"]["exceeds_seed_noise"] = abs(aa - ab) > B.SEED_NOISE["Average"]
    return out


def _average_samples(s: Side):
    if not all(k in s.samples for k in MAIN_KEYS):
        return None
    return np.mean([s.samples[k] for k in MAIN_KEYS], axis=0)


def _one(delta, sa, sb, va, vb, noise, paired, oa, ob) -> dict:
    if paired:
        if sa is not None and sb is not None:
            same = not isinstance(oa, BS.Outcomes) or _same_examples(oa, ob)
            lo, hi = BS.interval(sa - sb)  # the same draws for both runs of a task (bootstrap.rng_for)
            method = "paired bootstrap" if same else "unpaired bootstrap (different examples)"
        else:
            lo, hi, method = delta - noise, delta + noise, "seed noise only: no per-example outcomes"
    elif sa is not None:
        lo, hi = BS.interval(sa - vb)
        lo, hi, method = lo - noise, hi + noise, f"run's bootstrap + seed noise {noise:g}"
    else:
        lo, hi, method = delta - noise, delta + noise, f"seed noise {noise:g} only: no per-example outcomes"
    return {"delta": float(delta), "lo": float(lo), "hi": float(hi), "verdict": BS.verdict(lo, hi), "method": method}


def _same_examples(a, b) -> bool:
    try:
        BS.check_paired(a, b, "")
        return True
    except ConfigError:
        return False


def _summary(a: Side, b: Side, d: dict) -> dict:
    tasks = {k: v for k, v in d.items() if k != "average"}
    avg = d.get("average")
    return {"run": a.name, "against": b.name, "kind": b.kind,
            "tasks": len(tasks), "better": sum(v["verdict"] == "better" for v in tasks.values()),
            "worse": sum(v["verdict"] == "worse" for v in tasks.values()),
            "within noise": sum(v["verdict"] == "within noise" for v in tasks.values()),
            "average": avg, "problems": list(b.problems),
            "average_tasks": (_of(a.counts, "Average") or _of(b.counts, "Average")).strip()[1:-1] or None}


# -- text ---------------------------------------------------------------------------------------


def _average_label(runs) -> str:
    """'Average (38)', or with each partial run's count: 'Average (38; mine: 5/38)'."""
    partial = [f"{s.name}: {_of(s.counts, 'Average').strip()[1:-1]}" for s in runs if _of(s.counts, "Average")]
    return f"Average ({len(MAIN_KEYS)}{'; ' + ', '.join(partial) if partial else ''})"


def _agg(r: dict, col: str) -> str:
    """An aggregate cell: the value, with '(n/N)' when over fewer tasks than its group."""
    text = _fmt(r[col])
    return text + _of(r.get("_counts"), col) if text != "-" else text


def _fmt(v, signed=False) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, int):
        return f"{v / 1e6:.0f}M" if v >= 1e6 else str(v)
    return f"{v:+.4f}" if signed else f"{v:.4f}"


def _iv(v) -> str:
    return "-" if not v else f"{v['delta']:+.4f} [{v['lo']:+.4f}, {v['hi']:+.4f}] {v['verdict']}"


def _summary_line(s) -> str:
    avg = s["average"]
    text = f"- **{s['run']} - {s['against']}**"
    if avg:
        noise = "larger than" if avg["exceeds_seed_noise"] else "within"
        text += (f": average {_iv(avg)} ({avg['method']}); the difference is {noise} DataComp's seed noise "
                 f"({B.SEED_NOISE['Average']})")
        if s.get("average_tasks"):
            text += f" (NOTE: an average over {s['average_tasks']} tasks)"
    text += (f"; per task at 95%: {s['better']} better, {s['worse']} worse, {s['within noise']} within noise "
             f"(of {s['tasks']})")
    if s["problems"]:
        text += f". NOTE: this reference row failed validation: {'; '.join(s['problems'])}"
    return text


def _markdown(runs, bases, agg_rows, per_task, summary, ranks, detail, cfg) -> str:
    L = []
    scale = cfg.scale
    L += [f"## Aggregates ({'with the DataComp ' + scale + ' baselines' if scale else 'runs only'})", "",
          "| run | kind | kept | " + " | ".join(B.COLUMNS) + " |", "|" + "---|" * (len(B.COLUMNS) + 3)]
    for r in agg_rows:
        L.append(f"| {r['run']} | {r['kind']} | {_fmt(r['kept'])} | " + " | ".join(_agg(r, c) for c in B.COLUMNS)
                 + " |")
    if ranks:
        L += ["", f"## Leaderboard ({scale}, filtering track, by the 38-task average)", ""]
        for n, (rk, of) in ranks.items():
            s = next(s for s in runs if s.name == n)
            part = _of(s.counts, "Average")
            L.append(f"- {n}: average {s.aggregates['Average']:.4f}{part} would rank {rk} of {of}"
                     + (" (an average over fewer tasks than the leaderboard's)" if part else ""))
    if summary:
        L += ["", "## Verdicts (95% intervals)", "",
              f"Paired bootstrap between runs ({cfg.resamples} resamples, seed {cfg.seed}); against a published "
              f"baseline the run's own bootstrap widened by DataComp's seed noise (ImageNet "
              f"{B.SEED_NOISE['imagenet1k']}, average {B.SEED_NOISE['Average']}, other tasks "
              f"{B.SEED_NOISE_OTHER}: DataComp states no figure for them).", ""]
        L += [_summary_line(s) for s in summary]
    if detail:
        L += ["", "## Per-task differences (delta [95% interval] verdict)", "",
              "| task | " + " | ".join(f"{a} - {b}" for a, b in detail) + " |", "|" + "---|" * (len(detail) + 1)]
        for r in per_task:
            cells = []
            for a, b in detail:
                c = f"delta {a} - {b}"
                v = None if r.get(c) is None else {"delta": r[c], "lo": r[f"{c} lo"], "hi": r[f"{c} hi"],
                                                   "verdict": r[f"{c} verdict"]}
                cells.append(_iv(v))
            L.append(f"| {r['task']} | " + " | ".join(cells) + " |")
        methods = sorted({r.get(f"delta {a} - {b} interval") for r in per_task for a, b in detail} - {None})
        L += ["", "Intervals: " + "; ".join(methods)]
    cols = [s.name for s in runs + bases]
    L += ["", "## Per task (main metric)", "", "| task | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 1)]
    for r in per_task:
        L.append(f"| {r['task']} | " + " | ".join(_fmt(r[c]) for c in cols) + " |")
    notes = [f"- {s.name}: {s.note}" + (f" (failed validation: {'; '.join(s.problems)})" if s.problems else "")
             for s in bases if s.note]
    if notes:
        L += ["", "## Baselines", ""] + notes
    return "\n".join(L) + "\n"


def _write_text(path: Path, text: str) -> None:
    with atomic_open(path, "w") as f:
        f.write(text)


def _csv(path: Path, rows: list[dict], cols: list[str]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    _write_text(path, buf.getvalue())


# -- pictures and the page ---------------------------------------------------------------------


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    with atomic_open(path, "wb") as f:
        fig.savefig(f, dpi=110, format="png")
    plt.close(fig)
    return path


def _plots(d: Path, runs, bases, agg_rows, per_task, pairs, scale, ref) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, ax = plt.subplots(figsize=(max(7, 1.1 * len(agg_rows)), 4.5))
    width = 0.8 / len(B.COLUMNS)
    x = np.arange(len(agg_rows))
    for i, c in enumerate(B.COLUMNS):
        ax.bar(x + i * width, [r[c] if r[c] is not None else np.nan for r in agg_rows], width, label=c)
    ax.set_xticks(x + 0.4 - width / 2)
    ax.set_xticklabels([r["run"].replace("baseline: ", "") for r in agg_rows], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("score")
    ax.legend(fontsize=8, ncol=3)
    ax.set_title("DataComp aggregates")
    fig.tight_layout()
    paths.append(_save(fig, d / "aggregates.png"))
    # per-task differences with their intervals: the first run against the first baseline (or run)
    chosen = pairs[:1] if pairs else []
    named = [p for p in pairs if p[1].kind in ("run", "openclip", "leaderboard")]
    if named:
        chosen = named[:1]
    for a, b in chosen:
        c = f"delta {a.name} - {b.name}"
        rows = [r for r in per_task if r.get(c) is not None]
        if not rows:
            continue
        fig, ax = plt.subplots(figsize=(9, 0.24 * len(rows) + 1.6))
        y = np.arange(len(rows))
        delta = np.array([r[c] for r in rows])
        err = np.array([[r[c] - r[f"{c} lo"] for r in rows], [r[f"{c} hi"] - r[c] for r in rows]])
        colors = ["#2ca02c" if r[f"{c} verdict"] == "better" else "#d62728" if r[f"{c} verdict"] == "worse"
                  else "#7f7f7f" for r in rows]
        ax.barh(y, delta, 0.7, color=colors, xerr=err, error_kw={"elinewidth": 0.9, "capsize": 2})
        ax.set_yticks(y)
        ax.set_yticklabels([r["task"] for r in rows], fontsize=7)
        ax.axvline(0, color="k", lw=0.8)
        ax.set_xlabel(f"{a.name} - {b.name} (main metric; bars: 95% interval)")
        ax.invert_yaxis()
        fig.tight_layout()
        paths.append(_save(fig, d / "per_task_delta.png"))
    if scale:
        fig, ax = plt.subplots(figsize=(7, 5))
        board = [e for e in ref.board(scale) if e.imagenet is not None and e.average is not None]
        ax.scatter([e.imagenet for e in board], [e.average for e in board], c="#1f77b4", s=28,
                   label=f"DataComp {scale} leaderboard ({len(board)})", zorder=2)
        for s in bases:
            i, a = s.aggregates.get("ImageNet"), s.aggregates.get("Average")
            if i is not None and a is not None and not (math.isnan(i) or math.isnan(a)):
                ax.scatter([i], [a], marker="s", c="#ff7f0e", s=30, zorder=3)
                ax.annotate(s.name.replace("baseline: ", ""), (i, a), fontsize=6, xytext=(3, -8),
                            textcoords="offset points")
        for s in runs:
            i, a = s.aggregates.get("ImageNet"), s.aggregates.get("Average")
            if i is not None and a is not None and not (math.isnan(i) or math.isnan(a)):
                ax.scatter([i], [a], marker="*", c="#d62728", s=220, edgecolors="k", zorder=5)
                ax.annotate(s.name, (i, a), fontsize=9, fontweight="bold", xytext=(6, 4), textcoords="offset points")
        ax.set_xlabel("ImageNet 1k accuracy")
        ax.set_ylabel("average over 38 tasks")
        ax.set_title(f"{scale}: ImageNet vs average (runs: red stars, DataComp baselines: squares)")
        ax.legend(fontsize=8, loc="lower right")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        paths.append(_save(fig, d / "imagenet_vs_average.png"))
    return paths


def _esc(s) -> str:
    import html

    return html.escape(str(s))


def _html(md_parts, plots) -> str:
    runs, bases, agg_rows, per_task, summary, ranks, detail, cfg = md_parts

    def table(header, rows):
        h = "".join(f"<th>{_esc(c)}</th>" for c in header)
        body = "".join("<tr>" + "".join(f"<td class='{cls}'>{_esc(v)}</td>" for v, cls in r) + "</tr>" for r in rows)
        return f"<table><thead><tr>{h}</tr></thead><tbody>{body}</tbody></table>"

    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>conceptprune compare</title><style>",
             "body{font-family:sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse;margin:1em 0;"
             "font-size:13px}td,th{border:1px solid #ccc;padding:3px 7px;text-align:right}td.l,th{text-align:left}"
             "td.better{background:#d4f4d4}td.worse{background:#f8d0d0}img{max-width:100%;display:block;"
             "margin:1em 0}</style></head><body>",
             f"<h1>Comparison{' at ' + _esc(cfg.scale) + ' scale' if cfg.scale else ''}</h1>",
             "<h2>Aggregates</h2>",
             table(["run", "kind", "kept", *B.COLUMNS],
                   [[(r["run"], "l"), (r["kind"], "l"), (_fmt(r["kept"]), "")] + [(_agg(r, c), "") for c in B.COLUMNS]
                    for r in agg_rows])]
    if ranks:
        parts.append(f"<h2>Leaderboard ({_esc(cfg.scale)}, filtering track)</h2><ul>"
                     + "".join(f"<li>{_esc(n)}: would rank {rk} of {of}</li>" for n, (rk, of) in ranks.items())
                     + "</ul>")
    if summary:
        parts.append("<h2>Verdicts (95% intervals)</h2><p>" + _esc(
            f"Paired bootstrap between runs ({cfg.resamples} resamples, seed {cfg.seed}); against a published "
            f"baseline the run's own bootstrap widened by DataComp's seed noise (ImageNet "
            f"{B.SEED_NOISE['imagenet1k']}, average {B.SEED_NOISE['Average']}, other tasks {B.SEED_NOISE_OTHER}).")
            + "</p><ul>" + "".join(f"<li>{_esc(_summary_line(s).lstrip('- ').replace('**', ''))}</li>"
                                   for s in summary) + "</ul>")
    if detail:
        rows = []
        for r in per_task:
            cells = [(r["task"], "l")]
            for a, b in detail:
                c = f"delta {a} - {b}"
                if r.get(c) is None:
                    cells.append(("-", ""))
                else:
                    cells.append((f"{r[c]:+.4f} [{r[c + ' lo']:+.4f}, {r[c + ' hi']:+.4f}] {r[c + ' verdict']}",
                                  r[c + " verdict"].split()[0]))
            rows.append(cells)
        parts += ["<h2>Per-task differences</h2>", table(["task", *[f"{a} - {b}" for a, b in detail]], rows)]
    parts.append("<h2>Plots</h2>")
    for p in plots:
        parts.append(f"<img src='{_esc(p.name)}' alt='{_esc(p.stem)}'>")
    cols = [s.name for s in runs + bases]
    parts += ["<h2>Per task (main metric)</h2>",
              table(["task", *cols], [[(r["task"], "l")] + [(_fmt(r[c]), "") for c in cols] for r in per_task])]
    notes = [f"{s.name}: {s.note}" + (f" (failed validation: {'; '.join(s.problems)})" if s.problems else "")
             for s in bases if s.note]
    if notes:
        parts.append("<h2>Baselines</h2><ul>" + "".join(f"<li>{_esc(n)}</li>" for n in notes) + "</ul>")
    parts.append("</body></html>\n")
    return "\n".join(parts)
