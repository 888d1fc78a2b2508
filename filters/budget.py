"""DBP's per-cluster budget: the integer optimum of

    minimise  sum_j (N_j - P_j N)^2   s.t.  sum_j N_j = N,  lb_j <= N_j <= n_j.

The continuous problem is separable: N_j = clip(P_j N + lam, lb_j, n_j) for one scalar lam
(water-filling), found by bisection. Rounding it by largest remainder is optimal for the
integer problem (no unit can move between two clusters and lower the cost), keeps every
bound and hits N exactly. The reference code's OSQP + rint misses N and can exceed n_j.
"""

from __future__ import annotations

import numpy as np

from conceptprune.errors import ConfigError


def water_fill(target: np.ndarray, lower: np.ndarray, upper: np.ndarray, total: float) -> np.ndarray:
    """Continuous solution x_j = clip(target_j + lam, lower_j, upper_j) with sum x = total."""
    target, lower, upper = (np.asarray(a, dtype=np.float64) for a in (target, lower, upper))
    lo = float(np.min(lower - target)) - 1.0
    hi = float(np.max(upper - target)) + 1.0
    for _ in range(200):  # bisection to machine precision
        mid = 0.5 * (lo + hi)
        if np.clip(target + mid, lower, upper).sum() < total:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-12 * max(1.0, abs(mid)):
            break
    return np.clip(target + 0.5 * (lo + hi), lower, upper)


def allocate(probabilities: np.ndarray, total: int, sizes: np.ndarray, lower: np.ndarray | None = None) -> np.ndarray:
    """Integer budgets N_j (int64) with sum == total and lower <= N_j <= sizes."""
    p = np.asarray(probabilities, dtype=np.float64)
    n = np.asarray(sizes, dtype=np.int64)
    lb = np.zeros_like(n) if lower is None else np.asarray(lower, dtype=np.int64)
    if (lb > n).any() or (lb < 0).any():
        raise ConfigError("every cluster's lower bound must lie in [0, cluster size]")
    if lb.sum() > total:
        raise ConfigError(f"the balance floors ({int(lb.sum())} in all) exceed the {total} examples to keep")
    if n.sum() < total:
        raise ConfigError(f"cannot keep {total} examples from {int(n.sum())} candidates")
    x = water_fill(p * total, lb, n, total)
    out = np.clip(np.floor(x), lb, n).astype(np.int64)
    rem = x - out
    deficit = int(total - out.sum())
    idx = np.arange(len(out))
    while deficit > 0:  # largest remainder first; ties to the smaller cluster id
        room = np.flatnonzero(out < n)
        pick = room[np.lexsort((idx[room], -rem[room]))][:deficit]
        out[pick] += 1
        rem[pick] -= 1.0
        deficit -= len(pick)
    while deficit < 0:  # only reachable through rounding noise in x
        room = np.flatnonzero(out > lb)
        pick = room[np.lexsort((idx[room], rem[room]))][: -deficit]
        out[pick] -= 1
        rem[pick] += 1.0
        deficit += len(pick)
    return out


def objective(budgets: np.ndarray, probabilities: np.ndarray, total: int) -> float:
    return float(((np.asarray(budgets, float) - np.asarray(probabilities, float) * total) ** 2).sum())
