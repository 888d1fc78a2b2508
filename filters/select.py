"""Exact streaming selection: keep the best ``budget[g]`` rows of every group ``g``.

"Best" is the largest (or smallest) float32 key, or the smallest uint64 hash; ties go to
the smaller uid, so the result depends only on the data, never on row order or workers.
Two passes over the candidates: a per-group histogram of the keys' top bits finds each
group's boundary bin; the second pass keeps rows below it and collects the boundary bin's
rows, which are resolved exactly. Memory: the histograms plus the boundary rows, not the
number of candidates.
"""

from __future__ import annotations

from typing import Callable, Iterable

import numpy as np

from conceptprune import uids as U
from conceptprune.keeplist import UidCollector

Batch = tuple[np.ndarray, np.ndarray, np.ndarray]  # (group int, key, uids) of candidate rows


def sortable_f32(x: np.ndarray) -> np.ndarray:
    """float32 -> uint32 whose unsigned order is the float order."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    neg = (bits >> np.uint32(31)).astype(bool)
    return np.where(neg, ~bits, bits | np.uint32(0x80000000))


def from_sortable_f32(key) -> float:
    key = np.uint32(key)
    bits = key & np.uint32(0x7FFFFFFF) if key & np.uint32(0x80000000) else ~key
    return float(np.array([bits], dtype=np.uint32).view(np.float32)[0])


def rank_key(key: np.ndarray, order: str) -> np.ndarray:
    """uint64 whose ascending order is the preference order.

    order: 'largest' / 'smallest' (float keys) or 'hash' (uint64 keys, smallest first)."""
    if order == "hash":
        return np.asarray(key, dtype=np.uint64)
    s = sortable_f32(key).astype(np.uint64) << np.uint64(32)
    return ~s if order == "largest" else s


def _bits_for(groups: int) -> int:
    # at most ~4M histogram cells in all, between 256 and 65536 bins a group
    return int(max(8, min(16, np.floor(np.log2(max(1, (1 << 22) // max(groups, 1)))))))


def grouped_select(batches: Callable[[], Iterable[Batch]], budgets: np.ndarray, order: str,
                   collector: UidCollector | None = None, clamp: bool = False) -> tuple[UidCollector, np.ndarray]:
    """Keep ``budgets[g]`` rows of each group; returns (kept uids, kept count per group).

    ``batches()`` is called twice and must yield the same candidates both times. A budget
    above a group's size is an error, or (``clamp``) means the whole group.
    """
    budgets = np.asarray(budgets, dtype=np.int64)
    G = len(budgets)
    bits = _bits_for(G)
    nbins = 1 << bits
    shift = np.uint64(64 - bits)
    hist = np.zeros(G * nbins, dtype=np.int64)
    pending, pending_rows = [], 0
    for g, key, _ in batches():  # bincount over G * nbins cells is costly: batch ~4M rows at a time
        pending.append(g.astype(np.int64) * nbins + (rank_key(key, order) >> shift).astype(np.int64))
        pending_rows += len(g)
        if pending_rows >= 1 << 22:
            hist += np.bincount(np.concatenate(pending), minlength=G * nbins)
            pending, pending_rows = [], 0
    if pending:
        hist += np.bincount(np.concatenate(pending), minlength=G * nbins)
    hist = hist.reshape(G, nbins)
    sizes = hist.sum(axis=1)
    if clamp:
        budgets = np.minimum(budgets, sizes)
    if (budgets > sizes).any():
        g = int(np.flatnonzero(budgets > sizes)[0])
        raise ValueError(f"group {g}: budget {budgets[g]} exceeds its {sizes[g]} candidates")
    cum = np.cumsum(hist, axis=1)
    # boundary bin: first bin whose cumulative count reaches the budget (nbins: keep none)
    boundary = np.where(budgets > 0, (cum < budgets[:, None]).sum(axis=1), -1)
    below = np.where(boundary > 0, cum[np.arange(G), np.maximum(boundary - 1, 0)], 0)
    need = budgets - below  # rows still wanted from the boundary bin
    kept = collector if collector is not None else UidCollector()
    counts = np.zeros(G, dtype=np.int64)
    edge_g, edge_k, edge_u = [], [], []
    for g, key, uids in batches():
        rk = rank_key(key, order)
        top = (rk >> shift).astype(np.int64)
        b = boundary[g]
        take = top < b
        kept.add(uids[take])
        counts += np.bincount(g[take], minlength=G) if G > 1 else take.sum()
        at = top == b
        edge_g.append(g[at])
        edge_k.append(rk[at])
        edge_u.append(uids[at])
    if edge_g:
        eg, ek, eu = np.concatenate(edge_g), np.concatenate(edge_k), np.concatenate(edge_u)
        hi, lo = U.split(eu)
        order_ = np.lexsort((lo, hi, ek, eg))
        eg, eu = eg[order_], eu[order_]
        start = np.searchsorted(eg, np.arange(G), side="left")
        pos = np.arange(len(eg)) - start[eg]  # rank inside the group's boundary rows
        pick = pos < need[eg]
        kept.add(eu[pick])
        counts += np.bincount(eg[pick], minlength=G)
    return kept, counts
