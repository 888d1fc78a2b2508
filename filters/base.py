"""What all filters share: the result type, ``--within`` composition, writing outputs."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from conceptprune import keeplist as K
from conceptprune import uids as U
from conceptprune.errors import ConfigError, KeepListError
from conceptprune.manifest import base_manifest
from conceptprune.pool import Pool

log = logging.getLogger(__name__)


@dataclass
class FilterResult:
    method: str
    kept: np.ndarray | K.UidCollector  # the uids to keep (any order; written sorted)
    params: dict
    counts: dict  # "pool": rows read, "candidates": rows eligible (after --within), "out"
    stats: dict = field(default_factory=dict)
    # extra outputs written next to the keep-list: suffix -> writer(path)
    extras: dict[str, Callable[[Path], None]] = field(default_factory=dict)

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


def target_count(fraction: float, n: int, name: str = "fraction") -> int:
    """``round(fraction * n)`` examples, refusing a target of zero."""
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
        self.uids = K.read_keep_list(self.path) if self.path else None
        self.seen = np.zeros(len(self.uids), dtype=bool) if self.path else None

    def __bool__(self) -> bool:
        return self.path is not None

    def mask(self, chunk_uids: np.ndarray) -> np.ndarray:
        if self.uids is None:
            return np.ones(len(chunk_uids), dtype=bool)
        found, idx = K.member(self.uids, chunk_uids)
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
        return {"path": str(self.path), "count": int(len(self.uids))}


def as_within(within) -> Within:
    return within if isinstance(within, Within) else Within(within)


def as_pool(pool, **kw) -> Pool:
    return pool if isinstance(pool, Pool) else Pool(pool, **kw)


def run_filter(fn: Callable[..., FilterResult], pool, out: str | os.PathLike | None = None, *,
               within=None, **params) -> FilterResult:
    """Run a filter function and write its keep-list, manifest and extra outputs."""
    t0 = time.time()
    pool = as_pool(pool, **{k: params.pop(k) for k in ("embedding_key", "bad_embeddings") if k in params})
    within = as_within(within)
    if getattr(fn, "uses_clustering", False) and out is not None:
        params.setdefault("out", out)  # the clustering goes next to the keep-list by default
    result = fn(pool, within=within, **params)
    if out is not None:
        write_result(result, out, pool, within, time.time() - t0)
    return result


def write_result(result: FilterResult, out: str | os.PathLike, pool: Pool, within: Within,
                 wall_time: float) -> Path:
    out = Path(out)
    counts = dict(result.counts)
    counts["out"] = int(len(result.kept))
    manifest = base_manifest(
        "keep-list", method=result.method, params=result.params,
        seed=result.params.get("seed"), pool=pool.describe(), within=within.describe(),
        counts=counts, stats=result.stats, wall_time_s=round(wall_time, 3),
        embeddings=pool.report.as_dict() if pool.embedding_key else None)
    for suffix, writer in result.extras.items():
        writer(out.with_suffix(suffix))
    if isinstance(result.kept, K.UidCollector):
        result.kept.write(out, manifest)
    else:
        K.write_keep_list(out, result.kept, manifest)
    log.info("kept %d of %d candidates (%d pool rows) -> %s", counts["out"], counts.get("candidates", -1),
             counts.get("pool", -1), out)
    return out
