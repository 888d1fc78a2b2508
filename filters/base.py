"""What all filters share: the result type, ``--within`` composition, writing outputs."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from conceptprune import keeplist as K
from conceptprune import uids as U
from conceptprune.checks import check_seed
from conceptprune.errors import ConfigError, KeepListError
from conceptprune.manifest import base_manifest
from conceptprune.pool import Pool

from .registry import runs_as

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)


@dataclass
class ClusterTable:
    """A cluster-based filter's extra outputs, as data: its per-cluster table (one row a
    cluster) and the title of its plot. ``write_result`` writes them beside the keep-list as
    KEEP.clusters.parquet and KEEP.clusters.png."""

    table: "pd.DataFrame"
    title: str

    def write_table(self, path: Path) -> None:
        from conceptprune.atomic import atomic_open

        with atomic_open(path, "wb") as f:
            self.table.to_parquet(f, index=False)

    def write_plot(self, path: Path) -> None:
        from .plots import plot_clusters

        plot_clusters(self.table, path, self.title)

    def outputs(self) -> dict[str, Callable[[Path], None]]:
        """suffix -> how to write it (what ``keeplist.publish`` stages with the keep-list)."""
        return {".clusters.parquet": self.write_table, ".clusters.png": self.write_plot}


@dataclass
class FilterResult:
    method: str
    kept: np.ndarray | K.UidCollector  # the uids to keep (any order; written sorted)
    params: dict
    counts: dict  # "pool": rows read, "candidates": rows eligible (after --within), "out"
    stats: dict = field(default_factory=dict)
    extras: ClusterTable | None = None  # extra outputs written next to the keep-list

    @property
    def uids(self) -> np.ndarray:
        """The kept uids as an array (sorted when they were collected in a UidCollector)."""
        if isinstance(self.kept, K.UidCollector):
            self.kept = self.kept.to_array()
        return self.kept

    def __len__(self) -> int:
        return len(self.kept)


def check_fraction(fraction: float, name: str = "fraction") -> float:
    try:
        f = float(fraction)
    except (TypeError, ValueError):
        raise ConfigError(f"--{name} must be a number in (0, 1], got {fraction!r}") from None
    if not (0.0 < f <= 1.0):
        raise ConfigError(f"--{name} must be in (0, 1], got {fraction}")
    return f


KEEP_COUNT_HELP = "keep exactly min(N, candidates) examples (an absolute size instead of a fraction)"


def target_count(fraction: float | None, n: int, name: str = "fraction", keep_count: int | None = None) -> int:
    """``round(fraction * n)`` examples, or ``min(keep_count, n)`` (``--keep-count``, an absolute
    size; exactly one of the two), refusing a target of zero."""
    if keep_count is not None:
        from conceptprune.checks import check_int

        if fraction is not None:
            raise ConfigError(f"give one of --{name} or --keep-count, not both")
        return min(check_int("--keep-count", keep_count, min=1), n)
    if fraction is None:
        raise ConfigError(f"give --{name} or --keep-count")
    f = check_fraction(fraction, name)
    k = round(f * n)
    if k < 1:
        raise ConfigError(f"--{name} {f} of {n} candidates keeps no example")
    return k


class Within:
    """Restricts a filter to the uids of a previous keep-list (``--within PREV.npy``).

    ``mask(uids)`` marks which pool rows are candidates; after a full pass ``check()``
    raises if some uids of the list never appeared in the pool.
    """

    def __init__(self, path: str | os.PathLike | None):
        self.path = Path(path) if path else None
        self.uids = K.read_keep_list(self.path) if self.path else None  # a multiset counts as its set
        self.seen = np.zeros(len(self.uids), dtype=bool) if self.path else None
        self._index = None  # built on the first mask(): one copy of the words, not one a chunk

    def __bool__(self) -> bool:
        return self.path is not None

    def mask(self, chunk_uids: np.ndarray) -> np.ndarray:
        if self.uids is None:
            return np.ones(len(chunk_uids), dtype=bool)
        if self._index is None:
            self._index = K.UidIndex(self.uids)
        found, idx = K.member(self._index, chunk_uids)
        self.seen[idx[found]] = True
        return found

    def check(self) -> None:
        if self.uids is None:
            return
        missing = ~self.seen
        if missing.any():
            first = U.pair_to_uid(*self.uids[int(np.flatnonzero(missing)[0])])
            raise KeepListError(f"--within {self.path}: {int(missing.sum())} of its {len(self.uids)} uids are "
                                f"not in the pool (first: {first}); was it made from another pool?")

    def describe(self) -> dict | None:
        if self.uids is None:
            return None
        return {"path": str(self.path), "absolute_path": str(Path(self.path).resolve()), "count": int(len(self.uids))}


def as_within(within) -> Within:
    return within if isinstance(within, Within) else Within(within)


def as_pool(pool, **kw) -> Pool:
    return pool if isinstance(pool, Pool) else Pool(pool, **kw)


def check_filter_output(out, pool: Pool, within, overwrite: bool) -> None:
    """Before any work: ``out`` must be a new (or, with overwrite, replaceable) ``.npy`` that
    is not an input, and not inside the pool's folder (where its ``.clusters.parquet`` would
    be read as part of the pool next time)."""
    within_path = within.path if isinstance(within, Within) else within
    K.check_output(out, inputs={"--within": within_path}, overwrite=overwrite)
    parent = Path(out).resolve().parent
    pool_dirs = {f.parquet.resolve().parent for f in pool.files}
    if parent in pool_dirs:
        raise ConfigError(f"--out {out} is inside the pool folder {parent}: outputs written there "
                          "(KEEP.clusters.parquet) would be read as pool files; write it elsewhere")


def run_filter(fn: Callable[..., FilterResult], pool, out: str | os.PathLike | None = None, **kw) -> FilterResult:
    """``_run_filter`` with ``out`` locked (``conceptprune.locks.output_lock``) from its first check
    to its last write: two runs given one ``--out`` (and so one ``KEEP.parts/``) run one after the other."""
    if out is None:
        return _run_filter(fn, pool, out, **kw)
    from conceptprune.locks import output_lock

    with output_lock(out, f"writing {out}"):
        return _run_filter(fn, pool, out, **kw)


def _run_filter(fn: Callable[..., FilterResult], pool, out: str | os.PathLike | None = None, *,
                within=None, overwrite: bool = True, allow_empty: bool = False,
                command: Sequence[str] | None = None, **params) -> FilterResult:
    """Run a filter function and write its keep-list, manifest and extra outputs.

    The output is checked before any work (``check_filter_output``): ``overwrite`` replaces an
    existing ``out`` (the Python default: the caller named the path; the CLI refuses unless
    ``--overwrite``). An empty result is an error unless ``allow_empty`` (nothing is written
    then). ``command``: the command line the manifest records (the CLI's argv)."""
    t0 = time.time()
    pool = as_pool(pool, **{k: params.pop(k) for k in ("embedding_key", "bad_embeddings", "embedding_dir")
                            if k in params})
    if params.get("seed") is not None:  # every filter's seed: a wrapped one would alias another
        params["seed"] = check_seed("--seed", params["seed"])
    if out is not None:
        check_filter_output(out, pool, within, overwrite)
    within = as_within(within)
    if out is not None and runs_as(fn) in ("rows", "clustering"):
        params.setdefault("out", out)  # the clustering or the parts go next to the keep-list by default
    result = fn(pool, within=within, **params)
    if result is None:  # the executor detached: the same call, rerun once its jobs are done, collects it
        return None
    if len(result.kept) == 0 and not allow_empty:
        raise ConfigError(f"{result.method} kept no uid of its {result.counts.get('candidates', '?')} candidates "
                          f"(params {_short(result.params)}); nothing written. Pass --allow-empty to write "
                          "an empty keep-list")
    if out is not None:
        write_result(result, out, pool, within, time.time() - t0, command)
    return result


def _short(params: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in params.items() if v is not None and k not in ("clustering",))


def write_result(result: FilterResult, out: str | os.PathLike, pool: Pool, within: Within,
                 wall_time: float, command: Sequence[str] | None = None) -> Path:
    """The keep-list, its manifest and the extras, written in ``keeplist.publish``'s order
    (the keep-list lands last; the manifest records its sha256)."""
    out = Path(out)
    counts = dict(result.counts)
    counts["out"] = int(len(result.kept))
    manifest = base_manifest(
        "keep-list", command=command, method=result.method, params=result.params,
        seed=result.params.get("seed"), pool=pool.describe(), within=within.describe(),
        counts=counts, stats=result.stats, wall_time_s=round(wall_time, 3),
        embeddings=pool.report.as_dict() if pool.embedding_key else None)
    extras = result.extras.outputs() if result.extras is not None else None
    if isinstance(result.kept, K.UidCollector):
        result.kept.write(out, manifest, extras=extras)
    else:
        K.write_keep_list(out, result.kept, manifest, extras=extras)
    log.info("kept %d of %d candidates (%d pool rows) -> %s", counts["out"], counts.get("candidates", -1),
             counts.get("pool", -1), out)
    return out
