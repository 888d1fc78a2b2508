"""negCLIPLoss (Wang et al. 2024, arXiv 2405.19547), as the authors' ``cal_new_clip_score`` computes it.

For row i with image embedding f_i and text embedding g_i (the pool's stored ``l14_img`` /
``l14_txt``, or ``b32_*``, read as float32 and NOT renormalised):

    score_i = s_i - (1/K) sum_k R_i^(k),   s_i = <f_i, g_i>,
    R_i = (tau/2) [ LSE_{j in b} (<f_i, g_j> / tau) + LSE_{j in b} (<f_j, g_i> / tau) ]

over the batch b that holds i in repetition k, the row's own pair included. It equals -tau
times the row's symmetric CLIP loss in that batch.

**The batching rule** (the authors' code draws an unseeded ``torch.randperm`` per shard; the
paper does not state it): batches never cross pool files. Files in sorted name order get
index f (0-based, over the whole pool). For repetition k (0-based) file f's n_f rows are
permuted by ``numpy.random.default_rng([seed, f, k]).permutation(n_f)`` and cut into
consecutive batches of B rows, the last one shorter. B >= n_f means one batch of the whole
file: no randomness, and the K repetitions are one.

Memory: one batch (2 x B x d float32, plus a tile of T x B scores), the launcher's one float32
score a row, and a file's two arrays as stored when they fit ``FILE_CACHE_BYTES`` (1 GiB; a
DataComp shard's l14 pair is 338 MB in fp16): each file is then read once. A larger file is
gathered a batch at a time with positioned reads (``NpzArray.read_rows``), never held whole, at
K x ceil(n_f / B) passes over it (page cache), small beside the K x n_f x B x d multiply-adds.

Numerics: each batch's similarity tile is exponentiated once with one shift c for the whole
batch, folded into the GEMM as an extra coordinate (so it costs no pass): c = max(0, max_i
||f_i|| max_j ||g_j|| / tau - 88), which bounds every exponent by 88 (no overflow). A row or
column whose sum is so small that the entries lost to float32 underflow could move its LSE by
more than 1e-7 (relative) is recomputed exactly with a max-shifted LSE in float64. With unit-
norm CLIP embeddings and tau = 0.01 nothing is recomputed. The CUDA backend (torch, used when a
GPU is there) takes ``torch.logsumexp`` of float32 tiles; both agree within 1e-5 on the score.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

from conceptprune.checks import check_float, check_int, check_seed
from conceptprune.errors import ConfigError, PoolError
from conceptprune.npz import NpzArray, row_parallel, to_float32
from conceptprune.pool import Pool

from .base import FilterResult, as_within
from .rows import work_dir_for
from .scores import RowScorer, check_keep_rule, compute_scores, keep_by_score

log = logging.getLogger(__name__)

ARCH_KEYS = {"l14": ("l14_img", "l14_txt"), "b32": ("b32_img", "b32_txt"),
             "embed": ("img", "txt")}  # embed: the keys `conceptprune embed --text` writes (own model)
DEFAULT_BATCH = 32768
DEFAULT_REPETITIONS = 10
DEFAULT_TEMPERATURE = 0.01
DEFAULT_SEED = 0
TILE_ROWS = 1024  # rows of the batch's similarity matrix computed at a time (T x B float32)
EXP_MAX = 88.0  # float32 exp overflows above ~88.72
TINY = 1.2e-38  # float32's smallest normal: what an entry lost to underflow can weigh at most
REL_TOL = 1e-7  # a sum whose possible underflow loss exceeds this fraction is recomputed exactly
FILE_CACHE_BYTES = 1 << 30  # a file whose image + text arrays fit is read once and batched from memory


def batch_terms(F: np.ndarray, G: np.ndarray, tau: float) -> tuple[np.ndarray, np.ndarray]:
    """For one batch (float32 rows F, G): (s_i, R_i / (tau/2)) = (<f_i, g_i>, row LSE_i + column
    LSE_i of S / tau), numpy (BLAS) on the CPU. Memory: the scaled batch plus a T x B tile."""
    F = np.ascontiguousarray(F, dtype=np.float32)
    G = np.ascontiguousarray(G, dtype=np.float32)
    n, d = F.shape
    s = np.einsum("ij,ij->i", F, G)
    inv = np.float32(1.0 / tau)
    fn = np.sqrt(np.einsum("ij,ij->i", F, F, dtype=np.float64))
    gn = np.sqrt(np.einsum("ij,ij->i", G, G, dtype=np.float64))
    c = max(0.0, float(fn.max() * gn.max()) / tau - EXP_MAX) if n else 0.0
    # augmented operands: [f/tau, -c] . [g, 1] = <f, g>/tau - c, the shift done inside the GEMM
    Fa = np.empty((n, d + 1), np.float32)
    np.multiply(F, inv, out=Fa[:, :d])
    Fa[:, d] = -c
    Ga = np.empty((n, d + 1), np.float32)
    Ga[:, :d] = G
    Ga[:, d] = 1.0
    GaT = Ga.T
    row_sum = np.empty(n, np.float64)
    col_sum = np.zeros(n, np.float64)
    tile = np.empty((min(TILE_ROWS, n), n), np.float32)
    for a in range(0, n, TILE_ROWS):
        b = min(a + TILE_ROWS, n)
        t = tile[: b - a]
        np.matmul(Fa[a:b], GaT, out=t)
        parts = []

        def part(lo, hi, t=t, parts=parts):
            np.exp(t[lo:hi], out=t[lo:hi])
            parts.append((lo, hi, t[lo:hi].sum(axis=1), t[lo:hi].sum(axis=0)))

        row_parallel(part, b - a, min_rows=64)
        for lo, hi, rs, cs in parts:
            row_sum[a + lo: a + hi] = rs
            col_sum += cs
    floor = n * TINY / REL_TOL  # below this a sum may have lost more than REL_TOL to underflow
    row_lse = c + np.log(np.maximum(row_sum, 1e-300))
    col_lse = c + np.log(np.maximum(col_sum, 1e-300))
    bad_r, bad_c = np.flatnonzero(row_sum < floor), np.flatnonzero(col_sum < floor)
    if len(bad_r):
        row_lse[bad_r] = _exact_lse(F[bad_r], G, tau)
    if len(bad_c):
        col_lse[bad_c] = _exact_lse(G[bad_c], F, tau)
    return s, row_lse + col_lse


def _exact_lse(A: np.ndarray, B: np.ndarray, tau: float, block: int = 256) -> np.ndarray:
    """LSE_j(<a_i, b_j> / tau) per row of A, max-shifted, in float64."""
    out = np.empty(len(A), np.float64)
    B64 = B.astype(np.float64)
    for a in range(0, len(A), block):
        x = (A[a:a + block].astype(np.float64) @ B64.T) / tau
        m = x.max(axis=1)
        out[a:a + block] = m + np.log(np.exp(x - m[:, None]).sum(axis=1))
    return out


def batch_terms_torch(F: np.ndarray, G: np.ndarray, tau: float, device: str = "cuda",
                      tile: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """``batch_terms`` with torch on ``device``: float32 tiles, ``torch.logsumexp`` per row
    and per column tile, columns combined with ``logaddexp``."""
    import torch

    Ft = torch.from_numpy(np.ascontiguousarray(F, dtype=np.float32)).to(device)
    Gt = torch.from_numpy(np.ascontiguousarray(G, dtype=np.float32)).to(device)
    n = Ft.shape[0]
    s = (Ft * Gt).sum(dim=1)
    Fs = Ft / tau
    row = torch.empty(n, dtype=torch.float64, device=device)
    col = torch.full((n,), -math.inf, dtype=torch.float64, device=device)
    for a in range(0, n, tile):
        t = Fs[a:a + tile] @ Gt.T
        row[a:a + tile] = torch.logsumexp(t, dim=1).double()
        col = torch.logaddexp(col, torch.logsumexp(t, dim=0).double())
    return s.cpu().numpy(), (row + col).cpu().numpy()


def batch_permutation(seed: int, file_index: int, repetition: int, n: int) -> np.ndarray:
    """The documented batching rule's permutation of a file's rows."""
    return np.random.default_rng([seed, file_index, repetition]).permutation(n)


def file_scores(img: NpzArray, txt: NpzArray, file_index: int, *, batch_size: int, repetitions: int,
                temperature: float, seed: int, backend: str = "numpy") -> np.ndarray:
    """negCLIPLoss of every row of one pool file (float32)."""
    n = img.rows
    terms = batch_terms if backend == "numpy" else batch_terms_torch
    if n == 0:
        return np.zeros(0, np.float32)
    if batch_size >= n:  # one batch, the same for every repetition
        s, lse = terms(to_float32(img.read(0, n)), to_float32(txt.read(0, n)), temperature)
        return (s - 0.5 * temperature * lse).astype(np.float32)
    s = np.empty(n, np.float32)
    acc = np.zeros(n, np.float64)
    if 2 * n * img.row_bytes <= FILE_CACHE_BYTES:  # one read of the file, kept as stored (fp16: 338 MB a
        whole_img, whole_txt = img.read(0, n), txt.read(0, n)  # DataComp shard of 110k rows x 768 x 2)

        def gather(rows):
            return to_float32(whole_img[rows]), to_float32(whole_txt[rows])
    else:  # a batch at a time by positioned reads: memory O(B d), the file read once a batch
        def gather(rows):
            return to_float32(img.read_rows(rows)), to_float32(txt.read_rows(rows))
    for k in range(repetitions):
        perm = batch_permutation(seed, file_index, k, n)
        for a in range(0, n, batch_size):
            rows = np.sort(perm[a:a + batch_size])  # a batch is a set: read it in file order
            s_b, lse = terms(*gather(rows), temperature)
            acc[rows] += lse
            if k == 0:
                s[rows] = s_b
    return (s - 0.5 * temperature * (acc / repetitions)).astype(np.float32)


def resolve_backend(backend: str) -> str:
    if backend not in ("auto", "numpy", "cuda"):
        raise ConfigError(f"--backend must be auto, numpy or cuda, not {backend!r}")
    if backend == "numpy":
        return backend
    from .torch_search import torch_sees_cuda

    if torch_sees_cuda():
        return "cuda"
    if backend == "cuda":
        raise ConfigError("--backend cuda: torch sees no CUDA device")
    return "numpy"


@dataclass
class NegClipLossScorer(RowScorer):
    arch: str = "l14"
    batch_size: int = DEFAULT_BATCH
    repetitions: int = DEFAULT_REPETITIONS
    temperature: float = DEFAULT_TEMPERATURE
    seed: int = DEFAULT_SEED
    backend: str = "auto"
    file_aligned = True
    name = "negcliploss"

    def score(self, pool: Pool, start: int, stop: int, cand=None) -> np.ndarray:
        img_key, txt_key = ARCH_KEYS[self.arch]
        backend = resolve_backend(self.backend)
        out = np.empty(stop - start, np.float32)
        for fi, f in enumerate(pool.files):
            if not (start <= f.offset < stop) or f.rows == 0:
                continue
            if f.offset + f.rows > stop:
                raise AssertionError(f"part [{start}, {stop}) cuts file {f.parquet.name}")
            if f.npz is None:
                raise PoolError(f"{f.parquet}: no {f.stem}.npz beside it (negcliploss reads {img_key}, {txt_key})")
            with NpzArray(f.npz, img_key) as img, NpzArray(f.npz, txt_key) as txt:
                for arr in (img, txt):
                    if arr.rows != f.rows:
                        raise PoolError(f"{f.npz}[{arr.key}] has {arr.rows} rows but {f.parquet.name} has {f.rows}")
                if img.dim != txt.dim:
                    raise PoolError(f"{f.npz}: {img_key} is {img.dim}-d but {txt_key} is {txt.dim}-d")
                out[f.offset - start: f.offset - start + f.rows] = file_scores(
                    img, txt, fi, batch_size=self.batch_size, repetitions=self.repetitions,
                    temperature=self.temperature, seed=self.seed, backend=backend)
        return out


def make_scorer(arch: str = "l14", batch_size: int = DEFAULT_BATCH, repetitions: int = DEFAULT_REPETITIONS,
                temperature: float = DEFAULT_TEMPERATURE, seed: int = DEFAULT_SEED,
                backend: str = "auto") -> NegClipLossScorer:
    if arch not in ARCH_KEYS:
        raise ConfigError(f"--arch must be one of {sorted(ARCH_KEYS)}, got {arch!r}")
    return NegClipLossScorer(arch, check_int("--batch-size", batch_size, min=1),
                             check_int("--repetitions", repetitions, min=1),
                             check_float("--temperature", temperature, min=0.0, min_open=True),
                             check_seed("--seed", seed), backend)


def negcliploss_scores(pool, *, executor=None, work_dir=None, within=None,
                       **kw) -> tuple[np.ndarray, np.ndarray | None]:
    """(negCLIPLoss of every pool row, candidate mask or None), computed as file-range parts."""
    pool = pool if isinstance(pool, Pool) else Pool(pool)
    res = compute_scores(pool, make_scorer(**kw), within, executor, work_dir)
    res.cleanup()
    return res.scores, res.cand


def negcliploss(pool: Pool, *, fraction: float | None = None, keep_count: int | None = None,
                threshold: float | None = None, arch: str = "l14", batch_size: int = DEFAULT_BATCH,
                repetitions: int = DEFAULT_REPETITIONS, temperature: float = DEFAULT_TEMPERATURE,
                seed: int = DEFAULT_SEED, backend: str = "auto", within=None, executor=None,
                out=None) -> FilterResult:
    """Keep exactly ``int(N * fraction)`` (or ``keep_count``) candidates with the largest
    negCLIPLoss (ties: the earlier row), or those with score >= ``threshold``. N counts the
    candidates (``--within``); the scores use whole files regardless, as the authors' do."""
    threshold = check_keep_rule("negcliploss", fraction, keep_count, threshold)
    scorer = make_scorer(arch, batch_size, repetitions, temperature, seed, backend)
    kept, stats, n = keep_by_score(pool, scorer, as_within(within), executor, work_dir_for(out, pool, "negcliploss"),
                                   fraction=fraction, keep_count=keep_count, threshold=threshold)
    params = {"arch": arch, "fraction": fraction, "keep_count": keep_count, "threshold": threshold,
              "batch_size": scorer.batch_size, "repetitions": scorer.repetitions,
              "temperature": scorer.temperature, "seed": scorer.seed,
              "batching": "files by name -> f; default_rng([seed, f, k]).permutation(n_f); consecutive batches"}
    return FilterResult("negcliploss", kept, params, {"pool": pool.rows, "candidates": n},
                        stats=stats)




from conceptprune.checks import float_arg, fraction_arg, int_arg, seed_arg  # noqa: E402

from .registry import FilterSpec, Param, register  # noqa: E402

register(FilterSpec(
    "negcliploss", "negCLIPLoss (Wang et al. 2024): CLIP score minus its batch normalisation; keep the top",
    negcliploss, runs_as="rows", sweep=True,
    params=(Param("--fraction", fraction_arg(), group="keep", required=True,
                  help="keep exactly int(N*F) candidates with the largest negCLIPLoss (ties: the earlier row)"),
            Param("--keep-count", int_arg("--keep-count", 1), group="keep", required=True, metavar="N",
                  help="keep exactly min(N, candidates) rows (an absolute size: the paper's recipe's second step)"),
            Param("--threshold", float_arg("--threshold"), group="keep", required=True,
                  help="keep negCLIPLoss >= threshold"),
            Param("--arch", choices=("l14", "b32", "embed"), default="l14",
                  help="which stored embedding pair (l14_img/l14_txt, default; b32_img/b32_txt; or img/txt, "
                       "as 'conceptprune embed --text' writes them)"),
            Param("--batch-size", int_arg("--batch-size", 1), default=DEFAULT_BATCH,
                  help=f"rows a batch, B (default {DEFAULT_BATCH}, the authors' runs); B >= a file's rows: one batch"),
            Param("--repetitions", int_arg("--repetitions", 1), default=DEFAULT_REPETITIONS,
                  help=f"random batchings averaged, K (default {DEFAULT_REPETITIONS}, the authors' medium runs)"),
            Param("--temperature", float_arg("--temperature", 0.0, min_open=True), default=DEFAULT_TEMPERATURE,
                  help=f"tau (default {DEFAULT_TEMPERATURE}: OpenAI CLIP's logit scale cap, the authors')"),
            Param("--seed", seed_arg(), default=DEFAULT_SEED,
                  help="batching seed: file f, repetition k permute by default_rng([seed, f, k]) (default 0)"),
            Param("--backend", choices=("auto", "numpy", "cuda"), default="auto",
                  help="auto (default): torch on CUDA when a GPU is there, else numpy/BLAS"))))
