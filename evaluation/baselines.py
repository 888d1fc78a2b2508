"""Published results to compare with, shipped as data in ``evaluation/reference/``.

- ``openclip_results.csv``: open_clip's ``docs/openclip_results.csv``, per-task results on
  DataComp's 38 tasks for every released OpenCLIP checkpoint, among them DataComp's own baseline
  checkpoints at the four scales (``commonpool_{s,m,l,xl}_*``, ``datacomp_{s,m,l,xl}_*``).
- ``filter_{scale}.tsv``, ``byod_{scale}.tsv``: DataComp's leaderboards (mlfoundations/datacomp_site,
  ``dcclip/data``): date, entry, ImageNet, average, dataset size (or ``-``), team, paper.
- ``sources.json``: the repository, path and commit each file was read from.

One reader (:func:`load`). Columns are read by name (the CSV gained ``params (M)`` and
``FLOPs (B)`` over time); open_clip's task columns carry DataComp's display names and are mapped
to DataComp's keys (``ImageNet 1k`` -> ``imagenet1k``). A row whose stored average is not the
mean of its 38 task values (to the file's 4-decimal rounding: the stored average and each task
value are rounded, so they may differ by up to 1e-4) or with a value outside [0, 1] is kept and
flagged: a warning names it, ``baselines list`` marks it, and ``compare`` says so when it is used.

``update(path)`` copies a newer version of a source file in (after reading it with the same
checks), so the table can follow the sources as they gain rows.
"""

from __future__ import annotations

import csv
import functools
import json
import logging
import math
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from conceptprune.errors import ConfigError

from .tasks import AGGREGATES, TASKS

log = logging.getLogger(__name__)

REFERENCE = Path(__file__).parent / "reference"
SCALES = ("small", "medium", "large", "xlarge")
TRACKS = ("filtering", "byod")
COLUMNS = tuple(AGGREGATES)  # ImageNet, ImageNet dist. shifts, VTAB, Retrieval, Average
MAIN = [t for t in TASKS if t.main_metric is not None]  # the 38 averaged tasks
BY_NAME = {t.name: t.key for t in MAIN}  # open_clip's column name -> DataComp's key
AVERAGE_COLUMN = "Average perf. on 38 datasets"
# the stored average and every task value are rounded to 4 decimals: they may differ by 0.5e-4 + 0.5e-4
AVERAGE_TOLERANCE = 1e-4 + 1e-9

# DataComp's stated seed noise (DataComp README): reseeding moves ImageNet by about 0.2 points and the
# 38-task average by up to 0.006. It states no figure for the other tasks; they get ImageNet's.
SEED_NOISE = {"imagenet1k": 0.002, "Average": 0.006}
SEED_NOISE_OTHER = 0.002


def seed_noise(key: str) -> float:
    return SEED_NOISE.get(key, SEED_NOISE_OTHER)


# DataComp's baseline checkpoints: <commonpool|datacomp>_<s|m|l|xl>[_<filter>]_s<samples>_b<batch>
_BASELINE_TAG = re.compile(r"^(commonpool|datacomp)_(s|m|l|xl)_(?:(basic|text|image|laion|clip)_)?s\d+[mb]_b\d+k$")
_SCALE_LETTER = {"s": "small", "m": "medium", "l": "large", "xl": "xlarge"}
SCALE_ARCH = {"small": "ViT-B-32", "medium": "ViT-B-32", "large": "ViT-B-16", "xlarge": "ViT-L-14"}
# filter -> (our label, the leaderboard's entry for it)
BASELINE_FILTERS = {
    None: ("no filtering", "Baseline: No filtering"),
    "basic": ("basic", "Baseline: Basic filtering"),
    "text": ("text-based", "Baseline: Text-based"),
    "image": ("image-based", "Baseline: Image-based"),
    "laion": ("LAION-2B filter", "Baseline: LAION-2B filtering"),
    "clip": ("CLIP score L/14 top 30%", "Baseline: CLIP score (L/14 30%)"),
    "datacomp": ("image-based and CLIP score", "Baseline: Image-based ∩ CLIP score (L/14 30%)"),
}


@dataclass(frozen=True)
class ModelResult:
    """One row of open_clip's results table."""

    model: str
    pretrained: str
    average: float  # as stored
    tasks: dict  # DataComp key -> value
    line: int  # line in the file (1 = header)
    params_m: float | None = None
    flops_b: float | None = None
    problems: tuple = ()  # validation failures, each a sentence
    scale: str | None = None  # a DataComp baseline checkpoint: its scale
    filter: str | None = None  # ... and its baseline's label

    @property
    def name(self) -> str:
        return f"{self.model}/{self.pretrained}"

    def aggregates(self) -> dict:
        return aggregates_of(self.tasks)


@dataclass(frozen=True)
class LeaderboardEntry:
    """One row of a DataComp leaderboard file."""

    track: str
    scale: str
    date: str
    entry: str
    imagenet: float
    average: float
    size: int | None
    team: str
    paper: str
    line: int
    problems: tuple = ()

    @property
    def name(self) -> str:
        return self.entry


@dataclass
class Reference:
    models: list  # ModelResult
    leaderboard: list  # LeaderboardEntry
    sources: dict = field(default_factory=dict)
    problems: list = field(default_factory=list)  # "file line N (name): what"

    def datacomp_baselines(self, scale: str) -> list:
        """DataComp's baseline checkpoints of ``scale`` (their per-task rows), in the paper's order."""
        check_scale(scale)
        order = list(BASELINE_FILTERS)
        rows = [m for m in self.models if m.scale == scale]
        return sorted(rows, key=lambda m: order.index(_filter_of(m.pretrained)))

    def board(self, scale: str, track: str = "filtering") -> list:
        check_scale(scale)
        return [e for e in self.leaderboard if e.scale == scale and e.track == track]

    def find(self, name: str, scale: str | None = None):
        """A ModelResult (``model/pretrained``) or a LeaderboardEntry (its entry text, any case;
        ``SCALE:entry`` or ``scale`` picks among scales)."""
        for m in self.models:
            if m.name == name:
                return m
        want_scale = scale
        text = name
        if ":" in name and name.split(":", 1)[0] in SCALES:
            want_scale, text = name.split(":", 1)
        hits = [e for e in self.leaderboard if e.entry.strip().lower() == text.strip().lower()
                and (want_scale is None or e.scale == want_scale)]
        if len({(e.scale, e.track) for e in hits}) > 1:
            hits = [e for e in hits if e.track == "filtering"] or hits
        if len(hits) > 1:
            where = ", ".join(f"{e.scale} ({e.track})" for e in hits)
            raise ConfigError(f"--against {name!r}: a leaderboard entry at several scales ({where}); "
                              f"write SCALE:{text} or pass --scale")
        if hits:
            return hits[0]
        close = [m.name for m in self.models if text.lower() in m.name.lower()]
        close += [f"{e.scale}:{e.entry}" for e in self.leaderboard if text.lower() in e.entry.lower()]
        raise ConfigError(f"--against {name!r}: no OpenCLIP model/pretrained or leaderboard entry of that name"
                          + (f" (did you mean: {', '.join(close[:5])}?)" if close else
                             "; 'conceptprune baselines list --search TEXT' lists them"))


def check_scale(scale: str) -> None:
    if scale not in SCALES:
        raise ConfigError(f"unknown scale {scale!r} (one of {', '.join(SCALES)})")


def _filter_of(pretrained: str):
    m = _BASELINE_TAG.match(pretrained)
    if not m:
        return None
    return "datacomp" if m.group(1) == "datacomp" else m.group(3)


def _baseline_scale(model: str, pretrained: str):
    """(scale, label) of a DataComp baseline checkpoint, else (None, None). The tag's scale letter
    and the scale's architecture must both match (ViT-B-16 datacomp_xl_* is DataComp-1B, not xlarge)."""
    m = _BASELINE_TAG.match(pretrained)
    if not m:
        return None, None
    scale = _SCALE_LETTER[m.group(2)]
    if SCALE_ARCH[scale] != model:
        return None, None
    return scale, BASELINE_FILTERS[_filter_of(pretrained)][0]


def aggregates_of(values: dict) -> dict:
    """DataComp's aggregates of key -> value (plain means; NaN where a group has no value)."""
    out = {}
    for name, member in AGGREGATES.items():
        vals = [values[t.key] for t in TASKS if member(t) and t.key in values and values[t.key] is not None]
        need = [t for t in TASKS if member(t) and t.main_metric is not None]
        out[name] = float(sum(vals) / len(vals)) if vals and len(vals) == len(need) else float("nan")
    return out


def _float(text: str, what: str):
    text = (text or "").strip()
    if text in ("", "-"):
        return None
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"{what}: {text!r} is not a number") from None


def read_openclip_csv(path: str | Path) -> tuple[list, list]:
    """(rows, problems). Structural faults (a task column missing, a cell not a number) are errors
    naming the file and line; value faults are problems carried on the row and returned."""
    path = Path(path)
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        missing = [c for c in ("name", "pretrained", AVERAGE_COLUMN, *BY_NAME) if c not in header]
        if missing:
            raise ConfigError(f"{path}: column(s) {', '.join(missing)} missing (open_clip's results table "
                              f"has name, pretrained, {AVERAGE_COLUMN!r} and the 38 task columns)")
        extra = [c for c in header if c not in ("name", "pretrained", AVERAGE_COLUMN, "params (M)", "FLOPs (B)",
                                                 *BY_NAME)]
        if extra:
            log.warning("%s: column(s) %s not known; ignored", path, ", ".join(extra))
        rows, problems = [], []
        for line, r in enumerate(reader, 2):
            where = f"{path.name} line {line} ({r['name']}/{r['pretrained']})"
            vals = {BY_NAME[c]: _float(r[c], f"{path}: line {line} column {c!r}") for c in BY_NAME}
            avg = _float(r[AVERAGE_COLUMN], f"{path}: line {line} column {AVERAGE_COLUMN!r}")
            bad = []
            none = [c for c in BY_NAME if vals[BY_NAME[c]] is None]
            if none or avg is None:
                bad.append(f"empty value(s): {', '.join(none + ([AVERAGE_COLUMN] if avg is None else []))}")
            out = [f"{c}={vals[BY_NAME[c]]}" for c in BY_NAME
                   if vals[BY_NAME[c]] is not None and not 0.0 <= vals[BY_NAME[c]] <= 1.0]
            if avg is not None and not 0.0 <= avg <= 1.0:
                out.append(f"average={avg}")
            if out:
                bad.append(f"value(s) outside [0, 1]: {', '.join(out)}")
            if not none and avg is not None:
                mean = sum(vals.values()) / len(vals)
                if abs(mean - avg) > AVERAGE_TOLERANCE:
                    bad.append(f"stored average {avg:.4f} is not the mean of its 38 task values ({mean:.4f})")
            scale, label = _baseline_scale(r["name"], r["pretrained"])
            rows.append(ModelResult(r["name"], r["pretrained"], avg, vals, line,
                                    _float(r.get("params (M)"), f"{path}: line {line} params"),
                                    _float(r.get("FLOPs (B)"), f"{path}: line {line} FLOPs"),
                                    tuple(bad), scale, label))
            problems += [f"{where}: {b}" for b in bad]
    return rows, problems


def read_leaderboard_tsv(path: str | Path, track: str, scale: str) -> tuple[list, list]:
    """DataComp's leaderboard file: no header; date, entry, ImageNet, average, size, team, paper."""
    path = Path(path)
    rows, problems = [], []
    with open(path, encoding="utf-8") as f:
        for line, text in enumerate(f, 1):
            if not text.strip():
                continue
            cells = text.rstrip("\n").split("\t")
            if len(cells) < 6:
                raise ConfigError(f"{path}: line {line} has {len(cells)} field(s); DataComp's leaderboard rows have "
                                  "date, entry, ImageNet, average, size, team[, paper]")
            cells += [""] * (7 - len(cells))
            date, entry, inet, avg, size, team, paper = (c.strip() for c in cells[:7])
            inet_v = _float(inet, f"{path}: line {line} ImageNet")
            avg_v = _float(avg, f"{path}: line {line} average")
            size_v = _float(size, f"{path}: line {line} size")
            bad = [f"{n}={v}" for n, v in (("ImageNet", inet_v), ("average", avg_v)) if v is None or not 0 <= v <= 1]
            bad = [f"value(s) missing or outside [0, 1]: {', '.join(bad)}"] if bad else []
            rows.append(LeaderboardEntry(track, scale, date, entry, inet_v, avg_v,
                                         None if size_v is None else int(size_v), team, paper, line, tuple(bad)))
            problems += [f"{path.name} line {line} ({entry}): {b}" for b in bad]
    return rows, problems


def _leaderboard_files(folder: Path):
    for scale in SCALES:
        for track, prefix in (("filtering", "filter"), ("byod", "byod")):
            p = folder / f"{prefix}_{scale}.tsv"
            if p.exists():
                yield p, track, scale


def load(folder: str | Path | None = None, *, warn: bool = True) -> Reference:
    """The reference table (the shipped one by default); problems are logged as warnings."""
    folder = Path(folder) if folder is not None else REFERENCE
    if folder == REFERENCE:
        ref = _shipped()
    else:
        ref = _read(folder)
    if warn:
        for p in ref.problems:
            log.warning("reference data: %s", p)
    return ref


@functools.lru_cache(maxsize=1)
def _shipped() -> Reference:
    return _read(REFERENCE)


def _read(folder: Path) -> Reference:
    models, problems = read_openclip_csv(folder / "openclip_results.csv")
    board = []
    for p, track, scale in _leaderboard_files(folder):
        rows, pr = read_leaderboard_tsv(p, track, scale)
        board += rows
        problems += pr
    models, more = _cross_check(models, board)
    src = folder / "sources.json"
    sources = json.loads(src.read_text())["files"] if src.exists() else {}
    return Reference(models, board, sources, problems + more)


LEADERBOARD_TOLERANCE = 0.0015  # the leaderboard rounds to 3 decimals, the CSV to 4


def _cross_check(models: list, board: list) -> tuple[list, list]:
    """Checks across rows and files: two checkpoints with the same 38 values (a copied row), and a
    DataComp baseline checkpoint whose ImageNet or average disagrees with its leaderboard entry."""
    import dataclasses

    extra = {id(m): [] for m in models}
    seen = {}
    for m in models:
        key = tuple(m.tasks[t.key] for t in MAIN)
        first = seen.get(key)
        if first is not None and first.pretrained == m.pretrained and \
                first.model.removesuffix("-quickgelu") == m.model.removesuffix("-quickgelu"):
            continue  # open_clip lists OpenAI's weights under both activations: one checkpoint, one result
        if first is not None:
            extra[id(m)].append(f"the same 38 task values as line {first.line} ({first.name})")
            extra[id(first)].append(f"the same 38 task values as line {m.line} ({m.name})")
        else:
            seen[key] = m
    entries = {(e.scale, e.entry): e for e in board if e.track == "filtering"}
    for m in models:
        if m.scale is None:
            continue
        e = entries.get((m.scale, BASELINE_FILTERS[_filter_of(m.pretrained)][1]))
        if e is None or e.imagenet is None or e.average is None:
            continue
        off = [f"{what} {mine:.4f} vs {theirs:.3f}" for what, mine, theirs in
               (("ImageNet", m.tasks["imagenet1k"], e.imagenet), ("average", m.average, e.average))
               if abs(mine - theirs) > LEADERBOARD_TOLERANCE]
        if off:
            extra[id(m)].append(f"disagrees with its leaderboard entry {e.entry!r} ({m.scale}): {', '.join(off)}")
    out, problems = [], []
    for m in models:
        more = extra[id(m)]
        if more:
            m = dataclasses.replace(m, problems=m.problems + tuple(more))
            problems += [f"openclip_results.csv line {m.line} ({m.name}): {x}" for x in more]
        out.append(m)
    return out, problems


# -- the old interface: the DataComp baselines of one scale as aggregate rows ---------------------


def rows(scale: str, ref: Reference | None = None) -> list[dict]:
    """DataComp's baselines of ``scale``: aggregates recomputed from their checkpoints' per-task rows,
    with the kept-sample counts from the scale's leaderboard."""
    check_scale(scale)
    ref = ref or load(warn=False)
    sizes = {e.entry: e.size for e in ref.board(scale)}
    out = []
    for m in ref.datacomp_baselines(scale):
        label, entry = BASELINE_FILTERS[_filter_of(m.pretrained)]
        out.append({"run": f"baseline: {label}", "kept": sizes.get(entry), **m.aggregates(), "tag": m.pretrained,
                    "name": m.name})
    return out


def rank(average: float, scale: str, track: str = "filtering", ref: Reference | None = None) -> tuple[int, int]:
    """(rank, entries + 1): where ``average`` would stand on the leaderboard of ``scale``, sorted
    by the 38-task average as DataComp's leaderboard is (ties rank ahead of the run)."""
    ref = ref or load(warn=False)
    board = [e for e in ref.board(scale, track) if e.average is not None]
    return 1 + sum(e.average >= average for e in board), len(board) + 1


# -- listing and updating -------------------------------------------------------------------------


def listing(scale: str | None = None, search: str | None = None, ref: Reference | None = None) -> str:
    ref = ref or load(warn=False)
    if scale is not None:
        check_scale(scale)
    s = (search or "").lower()
    lines = []
    models = [m for m in ref.models if (scale is None or m.scale == scale) and s in m.name.lower()]
    if models:
        lines.append(f"OpenCLIP checkpoints ({ref.sources.get('openclip_results.csv', {}).get('repository', '')} "
                     f"{ref.sources.get('openclip_results.csv', {}).get('path', '')}"
                     f" @ {ref.sources.get('openclip_results.csv', {}).get('commit', '?')[:7]}):")
        lines.append(f"  {'model/pretrained':60s} {'ImageNet':>8s} {'Average':>8s}  DataComp baseline")
        for m in models:
            base = f"{m.scale}: {m.filter}" if m.scale else ""
            flag = "  !! " + "; ".join(m.problems) if m.problems else ""
            lines.append(f"  {m.name:60s} {m.tasks['imagenet1k']:8.4f} {m.average:8.4f}  {base}{flag}")
    for sc in SCALES if scale is None else (scale,):
        for track in TRACKS:
            board = [e for e in ref.board(sc, track) if s in e.entry.lower() or s in e.team.lower()]
            if not board:
                continue
            src = ref.sources.get(f"{'filter' if track == 'filtering' else 'byod'}_{sc}.tsv", {})
            lines.append(f"DataComp leaderboard, {sc}, {track} track ({src.get('repository', '')} "
                         f"{src.get('path', '')} @ {src.get('commit', '?')[:7]}):")
            for i, e in enumerate(sorted(board, key=lambda e: -(e.average or 0)), 1):
                flag = "  !! " + "; ".join(e.problems) if e.problems else ""
                lines.append(f"  {i:3d}. {e.entry[:60]:60s} {_f(e.imagenet):>8s} {_f(e.average):>8s}  "
                             f"{e.team}{flag}")
    if not lines:
        return "nothing matches" + (f" {search!r}" if search else "") + (f" at {scale}" if scale else "")
    if ref.problems:
        lines.append(f"{len(ref.problems)} row(s) failed validation (marked !!)")
    return "\n".join(lines)


def _f(v) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def update(path: str | Path, *, folder: str | Path | None = None, source: dict | None = None) -> dict:
    """Replace a reference file by a newer version of it (``openclip_results.csv``,
    ``filter_<scale>.tsv`` or ``byod_<scale>.tsv``, by file name), after reading it with the same
    checks; its entry in sources.json says where it came from. Returns a summary."""
    path = Path(path)
    folder = Path(folder) if folder is not None else REFERENCE
    name = path.name
    m = re.fullmatch(r"(filter|byod)_(small|medium|large|xlarge)\.tsv", name)
    if name == "openclip_results.csv":
        rows, problems = read_openclip_csv(path)
    elif m:
        rows, problems = read_leaderboard_tsv(path, "filtering" if m.group(1) == "filter" else "byod", m.group(2))
    else:
        raise ConfigError(f"{path}: not a reference file name (openclip_results.csv, filter_<scale>.tsv or "
                          "byod_<scale>.tsv, as in the source repositories)")
    if not rows:
        raise ConfigError(f"{path}: no rows")
    from conceptprune.atomic import atomic_open, write_json

    old = len(_read(folder).models) if name == "openclip_results.csv" and (folder / name).exists() else None
    with atomic_open(folder / name, "wb") as f, open(path, "rb") as src:
        shutil.copyfileobj(src, f)
    srcs_path = folder / "sources.json"
    srcs = json.loads(srcs_path.read_text()) if srcs_path.exists() else {"files": {}}
    entry = dict(srcs["files"].get(name, {}))
    entry.update(source or {"updated_from": str(path.resolve())})
    srcs["files"][name] = entry
    write_json(srcs_path, srcs)
    if folder == REFERENCE:
        _shipped.cache_clear()
    for p in problems:
        log.warning("%s: %s", path, p)
    return {"file": name, "rows": len(rows), "previous_rows": old, "problems": problems}
