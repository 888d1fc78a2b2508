"""SemDeDup's pairwise kernels, per cluster (members in the furthest-first order).

``exact_column_max(e, config, exact_from)`` gives M_j = max_{i<j} <e_i, e_j> (M_0 = -inf),
*exact* wherever M_j may reach ``exact_from``: there M_j is the float32 rounding of the exact
inner product of the float32 rows (float64 products, which are exact, and float64 sums; exact
rational arithmetic where float64 lands within its own error of a float32 rounding midpoint),
the same bits on any machine, device, batch or precision. Below ``exact_from`` M_j is the fast
GEMM's value, which is below ``exact_from`` too; so every decision ``M_j > t`` with
t >= exact_from is float32's. SemDeDup passes its eps threshold float32(1 - eps), or -inf
(exact everywhere) for a target size, whose threshold is read off M.

The similarities are first computed in a fast precision, in column blocks of ``block``
columns against all earlier rows (memory O(n * block), a cluster never split):

- ``bf16-recheck``: torch bfloat16 GEMM, float32 accumulation (CUDA; CPUs with AMX. On a CPU
  with avx512_bf16 only it is no faster than float32 and costs GiBs: see cpu_has_fast_bf16);
- ``fp32``: float32 GEMM (torch on the CPU or CUDA, TF32 off).

Then, in every column that may reach ``exact_from``, every pair whose approximate similarity
could be the column's maximum (its upper bound reaches the largest lower bound in the column)
is recomputed exactly, and M_j is the largest exact value. Where a bf16 column has more than
DENSE such pairs (dense clusters: the bf16 bound is ~0.005), those columns are first redone by a
float32 GEMM (bound ~1e-4). Every recomputed pair is checked against the bound (a library that
broke it would raise, not decide wrongly). ``auto`` takes bf16-recheck only with a finite
``exact_from`` (exact everywhere, most columns of a dense cluster would be redone in float32).

The bound, for rows x_i (float32), a_i = bf16(x_i), r_i = x_i - a_i (exact in float32):
  x_i.x_j - a_i.a_j = a_i.r_j + r_i.x_j, so |.| <= |a_i||r_j| + |r_i||x_j| (Cauchy-Schwarz);
  float32 accumulation in any order and rounding mode: <= gamma_d sum_k |a_ik a_jk| <=
  gamma_d |a_i||a_j|, gamma_d = d u / (1 - d u), u = 2^-23;
  a bfloat16 output (torch on the CPU has no float32 output for bf16 GEMMs): <= 2^-8 / (1 - 2^-8)
  of the output's magnitude; denormals flushed: < 2^-120 a term.
Norms are upper bounds (float32 sums of squares inflated by d 2^-23 + 2^-20); per cluster the
largest are used. For fp32 only the accumulation term remains.

``greedy_keep`` and ``components_keep`` (the rules that depend on eps) and ``column_max_upper``
(the plain float32 pass) are float32 GEMMs on the CPU, as before.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache

import numpy as np

from conceptprune.npz import row_parallel, to_float32

from .torch_search import torch_sees_cuda

PRECISIONS = ("auto", "fp32", "bf16-recheck")
DEVICES = ("auto", "cpu", "cuda")
PAIR_BLOCK = 256  # columns a block: the diagonal blocks' wasted half stays small
ROW_BLOCK = 8192  # rows a GEMM against a column block (8192 x 1024 float32: 32 MiB)
U_ACC = 2.0 ** -23  # float32 accumulation, any rounding mode
U_BF16 = 2.0 ** -8  # bfloat16 round to nearest (8-bit significand)
TINY = 2.0 ** -120  # a denormal flushed to zero, per term
DENSE = 8  # candidates a column above which bf16-recheck recomputes the columns in float32 first
GATHER_PAIRS = 2048  # pairs rechecked at once (2 x 2048 x d float64: 25 MB at d = 768)


# -- the plain float32 kernels -------------------------------------------------------------


def normalized(raw: np.ndarray) -> np.ndarray:
    """Rows as float32 divided by their float32 norms: the same operations, so the same bits,
    as the pool's own normalisation (``to_float32`` then ``Pool._normalise``)."""
    norms = np.empty(len(raw), dtype=np.float32)
    x = to_float32(raw, norms)  # a new array whatever the dtype (norms are asked for)
    row_parallel(lambda a, b: np.divide(x[a:b], norms[a:b, None], out=x[a:b]), len(x))
    return x


@lru_cache(maxsize=4)
def _tri(n: int) -> np.ndarray:
    return np.tri(n, dtype=bool)


def _lower_mask(n: int) -> np.ndarray:
    """n x n: True where i >= j (the part of a diagonal block that is not i < j)."""
    return _tri(max(n, PAIR_BLOCK))[:n, :n]  # the top-left square of a lower-triangle mask is one


def column_max_upper(e: np.ndarray, block: int = PAIR_BLOCK) -> np.ndarray:
    """M_j = max_{i<j} <e_i, e_j> (M_0 = -inf) in plain float32 GEMM blocks (numpy's BLAS):
    memory O(n * block); agrees with ``exact_column_max`` to float32 rounding (~1e-7)."""
    e = np.ascontiguousarray(e, dtype=np.float32)
    n = len(e)
    m = np.empty(n, dtype=np.float32)
    for c0 in range(0, n, block):
        c1 = min(n, c0 + block)
        cols = e[c0:c1]
        s = cols @ cols.T
        np.copyto(s, np.float32(-np.inf), where=_lower_mask(c1 - c0))
        best = s.max(axis=0)
        for r0 in range(0, c0, ROW_BLOCK):
            r1 = min(c0, r0 + ROW_BLOCK)
            np.maximum(best, (e[r0:r1] @ cols.T).max(axis=0), out=best)
        m[c0:c1] = best
    return m


def greedy_keep(e: np.ndarray, threshold: float, block: int = PAIR_BLOCK) -> np.ndarray:
    """Greedy NMS in the cluster order: keep j unless it is a near-duplicate (> threshold)
    of an earlier *kept* member."""
    n = len(e)
    keep = np.zeros(n, dtype=bool)
    for c0 in range(0, n, block):
        c1 = min(n, c0 + block)
        cols = e[c0:c1].astype(np.float32)
        removed = np.zeros(c1 - c0, dtype=bool)
        kept_before = np.flatnonzero(keep[:c0])
        for k0 in range(0, len(kept_before), block):
            rows = e[kept_before[k0:k0 + block]].astype(np.float32)
            removed |= (rows @ cols.T > threshold).any(axis=0)
        s = cols @ cols.T
        for j in range(c1 - c0):
            if not removed[j]:
                keep[c0 + j] = True
                removed[j + 1:] |= s[j, j + 1:] > threshold
    return keep


def components_keep(e: np.ndarray, threshold: float, block: int = PAIR_BLOCK) -> np.ndarray:
    """One member per connected component of the graph S_ij > threshold: the first in order."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = len(e)
    labels = np.arange(n)
    for c0 in range(0, n, block):
        c1 = min(n, c0 + block)
        cols = e[c0:c1].astype(np.float32)
        ei, ej = [], []
        for r0 in range(0, c1, block):
            r1 = min(c1, r0 + block)
            s = e[r0:r1].astype(np.float32) @ cols.T
            s[np.arange(r0, r1)[:, None] >= np.arange(c0, c1)[None, :]] = -np.inf
            i, j = np.nonzero(s > threshold)
            ei.append(i + r0)
            ej.append(j + c0)
        i, j = np.concatenate(ei), np.concatenate(ej)
        if len(i):
            g = coo_matrix((np.ones(len(i), np.int8), (labels[i], labels[j])), shape=(n, n))
            _, comp = connected_components(g, directed=False)
            labels = comp[labels]
    keep = np.zeros(n, dtype=bool)
    keep[np.unique(labels, return_index=True)[1]] = True
    return keep


# -- the exact column maximum: a fast GEMM, then an exact recheck -----------------------------


@dataclass(frozen=True)
class PairwiseConfig:
    """How SemDeDup computes M (the result is the same bits whichever is chosen)."""

    precision: str = "auto"  # auto: bf16-recheck where bfloat16 GEMMs are fast (CUDA, AMX), else fp32
    device: str = "auto"  # auto: cuda when torch sees a GPU, else cpu
    block: int = PAIR_BLOCK

    def resolved(self, exact_everywhere: bool = False) -> "PairwiseConfig":
        """Concrete precision and device. ``auto`` takes bf16-recheck only where it pays: a fast
        bfloat16 GEMM (CUDA, AMX), and M needed exact only from a threshold on
        (everywhere, on dense clusters nearly every column would be recomputed in float32)."""
        if self.precision not in PRECISIONS:
            raise ValueError(f"pairwise precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.device not in DEVICES and not self.device.startswith("cuda:"):
            raise ValueError(f"pairwise device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        device = self.device
        if device == "auto":
            device = "cuda" if torch_sees_cuda() else "cpu"
        precision = self.precision
        if precision == "auto":
            fast = device.startswith("cuda") or cpu_has_fast_bf16()
            precision = "bf16-recheck" if fast and not exact_everywhere else "fp32"
        return PairwiseConfig(precision, device, self.block)

    def numpy_only(self) -> bool:
        """(A resolved config) float32 on the CPU: numpy's BLAS, no torch in the process."""
        return self.device == "cpu" and self.precision == "fp32"


@lru_cache(maxsize=1)
def cpu_has_fast_bf16() -> bool:
    """The CPU has AMX tiles for bfloat16, and torch's oneDNN uses them. avx512_bf16 alone does
    not count: on an AMD EPYC with it (2 cores, one thread each) torch's bfloat16 GEMM ran at
    170 GFLOP/s, no faster than numpy's float32 GEMM (167), and SemDeDup's largest cluster of
    the 4M-row bench (52k rows) took 16 s in bf16-recheck vs 16 s in fp32 with 3.4 GiB peak
    RSS vs 0.85 (oneDNN keeps a packed operand per GEMM shape, and every column block has its
    own)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    if "amx_bf16" not in flags:
        return False
    import torch

    return torch.ops.mkldnn._is_mkldnn_bf16_supported()


def needs_torch(config: "PairwiseConfig", exact_everywhere: bool = False) -> bool:
    """Whether ``exact_column_max`` runs on torch with this config (else numpy alone)."""
    return not config.resolved(exact_everywhere).numpy_only()


@contextlib.contextmanager
def single_threaded_torch(needed: bool = True):
    """torch's CPU GEMMs on one thread for the block (SemDeDup runs one bucket a core);
    nothing, and no torch import, when not ``needed``."""
    if not needed:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass(frozen=True)
class _Bound:
    """|exact - approx| <= c0 + c1 |approx| for every pair of the cluster."""

    c0: float
    c1: float
    norm: float  # the largest row norm (float64's own error: <= d 2^-53 norm^2)

    def lower(self, s: np.ndarray) -> np.ndarray:
        return s - self.c1 * np.abs(s) - self.c0

    def upper_inverse(self, y: np.ndarray) -> np.ndarray:
        """The smallest approx s with s + c1 |s| + c0 >= y (rounded down a little)."""
        z = y - self.c0
        s = np.where(z >= 0, z / (1 + self.c1), z / (1 - self.c1))
        return s - 2.0 ** -30 * (1 + np.abs(s))


def _bound(d: int, nx: float, na: float | None = None, nr: float | None = None,
           bf16_output: bool = False) -> _Bound:
    """The error bound of a GEMM of rows of dimension d and norms <= nx: float32 (na None), or
    bfloat16 with the rounded rows' norms <= na and the rounding residuals' norms <= nr."""
    gamma = d * U_ACC / (1 - d * U_ACC)
    if na is None:
        return _Bound(gamma * nx * nx + d * TINY, 0.0, nx)
    c0 = na * nr + nr * nx + gamma * na * na + 2 * d * TINY
    return _Bound(c0, U_BF16 / (1 - U_BF16) if bf16_output else 0.0, nx)


def _max_norm(x: np.ndarray) -> float:
    """An upper bound of the rows' norms: float32 sums of squares err by <= d 2^-24 relative."""
    if not len(x):
        return 0.0
    return float(np.sqrt(np.einsum("ij,ij->i", x, x).max(), dtype=np.float64)) * (1 + x.shape[1] * 2.0 ** -23 + 2.0 ** -20)


def exact_column_max(e: np.ndarray, config: PairwiseConfig | None = None,
                     exact_from: float = -math.inf) -> np.ndarray:
    """M_j = max_{i<j} <e_i, e_j> (M_0 = -inf), each the correctly rounded float32 of the exact
    value wherever the exact value may be >= ``exact_from`` (so every decision
    ``M_j > t`` with t >= exact_from is float32's); below it, the fast GEMM's value. ``e``
    float32 rows (any norm). See the module doc."""
    cfg = (config or PairwiseConfig()).resolved(exact_everywhere=exact_from == -math.inf)
    x = np.ascontiguousarray(e, dtype=np.float32)
    n = len(x)
    m = np.full(n, -np.inf, dtype=np.float32)
    if n < 2:
        return m
    if cfg.numpy_only():
        gemm = _NumpyGemm(x)
        for c0 in range(0, n, cfg.block):
            m[c0:min(n, c0 + cfg.block)] = gemm.column_max(c0, min(n, c0 + cfg.block), exact_from)
        m[0] = -np.inf
        return m
    import torch

    with torch.no_grad(), _exact_cuda_matmul(cfg.device):
        gemm = _Gemm(x, cfg)
        for c0 in range(0, n, cfg.block):
            m[c0:min(n, c0 + cfg.block)] = gemm.column_max(c0, min(n, c0 + cfg.block), exact_from)
    m[0] = -np.inf
    return m


class _NumpyGemm:
    """``_Gemm``'s float32 path on the CPU in numpy alone (the same GEMMs, candidates and
    exact recheck): a dedup process then never imports torch."""

    def __init__(self, x: np.ndarray):
        self.x = x
        self.bound = _bound(x.shape[1], _max_norm(x))

    def column_max(self, c0: int, c1: int, exact_from: float) -> np.ndarray:
        """M of the columns [c0, c1): exact wherever it may reach ``exact_from``."""
        s = self.x[c0:c1] @ self.x[:c1].T  # columns x rows, float32
        np.copyto(s[:, c0:c1], np.float32(-np.inf), where=_lower_mask(c1 - c0).T)  # rows i >= j
        approx = s.max(axis=1)
        a64 = approx.astype(np.float64)
        with np.errstate(invalid="ignore"):
            need = np.flatnonzero(np.isfinite(a64) & (a64 + self.bound.c0 >= exact_from))
        if not len(need):
            return approx
        sub = s if len(need) == len(s) else s[need]
        k, ri = np.nonzero(sub >= _candidate_floor(approx[need], self.bound)[:, None])
        out = approx.copy()
        out[need] = _exact_max(self.x, ri, need[k] + c0, k, len(need), sub[k, ri], self.bound)
        return out


@contextlib.contextmanager
def _exact_cuda_matmul(device: str):
    """No TF32 for float32 and no reduced-precision reductions for bfloat16 GEMMs (the bound
    assumes float32 accumulation)."""
    if not device.startswith("cuda"):
        yield
        return
    import torch

    m = torch.backends.cuda.matmul
    before = (m.allow_tf32, m.allow_bf16_reduced_precision_reduction)
    m.allow_tf32, m.allow_bf16_reduced_precision_reduction = False, False
    try:
        yield
    finally:
        m.allow_tf32, m.allow_bf16_reduced_precision_reduction = before


class _Gemm:
    """A cluster's rows on the device (float32, and bfloat16 for bf16-recheck) with the error
    bounds of their GEMMs."""

    def __init__(self, x: np.ndarray, cfg: PairwiseConfig):
        import torch

        self.torch, self.x = torch, x
        self.x32 = torch.from_numpy(x).to(cfg.device)
        nx = _max_norm(x)
        self.bound32 = _bound(x.shape[1], nx)
        self.bf16 = cfg.precision == "bf16-recheck"
        self.float_out = True
        if self.bf16:
            self.x16 = self.x32.to(torch.bfloat16)
            self.float_out = self.x32.is_cuda and _has_mm_out_dtype()
            a = self.x16.float().cpu().numpy()
            self.bound16 = _bound(x.shape[1], nx, _max_norm(a), _max_norm(x - a),  # x - a is exact in float32
                                  bf16_output=not self.float_out)

    def strip(self, c0: int, c1: int, cols: np.ndarray | None = None, bf16: bool = False):
        """Approximate S[i, j] for the block's columns j = c0 + cols (all when None) against the
        rows i < c1, as a (columns x rows) tensor (the reductions then run along contiguous
        memory) in the GEMM's output dtype, with i >= j masked to -inf."""
        torch = self.torch
        src = self.x16 if bf16 else self.x32
        left = src[c0:c1] if cols is None else src[torch.from_numpy(cols + c0).to(src.device)]
        if bf16 and self.float_out:
            s = torch.mm(left, src[:c1].T, out_dtype=torch.float32)
        elif not bf16 and not src.is_cuda:  # numpy's BLAS: faster than torch's float32 GEMM here
            s = torch.from_numpy(self.x[c0:c1] @ self.x[:c1].T if cols is None else self.x[cols + c0] @ self.x[:c1].T)
        else:
            s = left @ src[:c1].T
        j = torch.arange(c0, c1, device=s.device) if cols is None else torch.from_numpy(cols + c0).to(s.device)
        s[:, c0:c1].masked_fill_(torch.arange(c0, c1, device=s.device)[None, :] >= j[:, None], -math.inf)
        return s

    def column_max(self, c0: int, c1: int, exact_from: float) -> np.ndarray:
        """M of the columns [c0, c1): exact wherever it may reach ``exact_from``."""
        torch = self.torch
        bound = self.bound16 if self.bf16 else self.bound32
        s = self.strip(c0, c1, bf16=self.bf16)
        approx = s.max(dim=1).values.float().cpu().numpy()
        a64 = approx.astype(np.float64)
        with np.errstate(invalid="ignore"):
            need = np.flatnonzero(np.isfinite(a64) & (a64 + bound.c0 + bound.c1 * np.abs(a64) >= exact_from))
        if not len(need):
            return approx
        sub = s if len(need) == len(s) else s[torch.from_numpy(need).to(s.device)]
        ri, k, sv = self._candidates(sub, approx[need], bound)
        if self.bf16 and len(ri) > DENSE * len(need):  # many pairs near the maxima: a float32 GEMM of those columns
            bound = self.bound32
            s = self.strip(c0, c1, cols=need)
            ri, k, sv = self._candidates(s, s.max(dim=1).values.cpu().numpy(), bound)
        out = approx.copy()
        out[need] = _exact_max(self.x, ri, need[k] + c0, k, len(need), sv, bound)
        return out

    def _candidates(self, s, best: np.ndarray, bound: "_Bound"):
        """(rows, columns of s, approx values) of the pairs that may be their column's max
        (``s``: columns x rows)."""
        torch = self.torch
        t = _candidate_floor(best, bound)
        k, ri = torch.nonzero(s >= torch.from_numpy(t).to(s.device)[:, None], as_tuple=True)
        return ri.cpu().numpy(), k.cpu().numpy(), s[k, ri].float().cpu().numpy()


def _candidate_floor(best: np.ndarray, bound: "_Bound") -> np.ndarray:
    """Per column, the smallest approximate value a pair can have and still be the column's
    exact maximum (its upper bound reaches the largest lower bound), rounded down in float32."""
    t = bound.upper_inverse(bound.lower(best.astype(np.float64))).astype(np.float32)
    return np.nextafter(t, np.float32(-np.inf))  # float32 rounding never drops a candidate


@lru_cache(maxsize=1)
def _has_mm_out_dtype() -> bool:
    import torch

    try:
        a = torch.ones(2, 2, dtype=torch.bfloat16, device="cuda")
        return torch.mm(a, a, out_dtype=torch.float32).dtype == torch.float32
    except (TypeError, RuntimeError):
        return False


def _exact_max(x: np.ndarray, ri: np.ndarray, cj: np.ndarray, k: np.ndarray, width: int, approx: np.ndarray,
               bound: _Bound) -> np.ndarray:
    """Per column k in [0, width): the correctly rounded float32 of the exact maximum over its
    candidate pairs (rows ri, global columns cj); each pair checked against the bound."""
    exact = _exact_dots(x, ri, cj)
    err = np.abs(exact - approx.astype(np.float64))
    limit = bound.c0 + bound.c1 * np.abs(approx.astype(np.float64))
    if (err > limit).any():
        w = int(np.argmax(err - limit))
        raise RuntimeError(f"pairwise GEMM error {err[w]:.3g} exceeds its proven bound {limit[w]:.3g} "
                           f"(rows {ri[w]}, {cj[w]}): use the fp32 pairwise precision")
    best = np.full(width, -np.inf)
    np.maximum.at(best, k, exact)
    out = best.astype(np.float32)
    tol = 2 * x.shape[1] * 2.0 ** -53 * bound.norm ** 2 + 1e-300  # float64's own error, doubled
    for c in np.flatnonzero(np.isfinite(best) & _near_midpoint(best, tol)):
        near = np.flatnonzero((k == c) & (exact >= best[c] - 2 * tol))
        out[c] = max(_round_exactly(x[ri[w]], x[cj[w]]) for w in near)
    return out


def _exact_dots(x: np.ndarray, ri: np.ndarray, cj: np.ndarray) -> np.ndarray:
    """<x_i, x_j> in float64, pair by pair (the same bits in any batch)."""
    out = np.empty(len(ri), dtype=np.float64)
    for a in range(0, len(ri), GATHER_PAIRS):
        b = min(len(ri), a + GATHER_PAIRS)
        out[a:b] = np.einsum("ij,ij->i", x[ri[a:b]].astype(np.float64), x[cj[a:b]].astype(np.float64))
    return out


def _near_midpoint(v: np.ndarray, tol: float) -> np.ndarray:
    """float64 values within tol of a point halfway between two float32s (or of a float32:
    a value's float32 neighbours are then too close to call)."""
    f = v.astype(np.float32).astype(np.float64)
    up = np.nextafter(v.astype(np.float32), np.float32(np.inf)).astype(np.float64)
    down = np.nextafter(v.astype(np.float32), np.float32(-np.inf)).astype(np.float64)
    return (np.abs(v - (f + up) / 2) <= tol) | (np.abs(v - (f + down) / 2) <= tol)


def _round_exactly(a: np.ndarray, b: np.ndarray) -> np.float32:
    """The correctly rounded float32 (ties to even) of the exact <a, b> (rational arithmetic)."""
    exact = sum((Fraction(float(p)) for p in a.astype(np.float64) * b.astype(np.float64)), Fraction(0))
    guess = np.float32(float(exact))
    options = [np.nextafter(guess, np.float32(-np.inf)), guess, np.nextafter(guess, np.float32(np.inf))]
    return min(options, key=lambda f: (abs(Fraction(float(f)) - exact), int(f.view(np.uint32)) & 1))
