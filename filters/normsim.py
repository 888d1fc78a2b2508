"""NormSim (Wang et al. 2024, arXiv 2405.19547), as the authors' ``cal_similarity_scores_norm``.

    NormSim_p(i) = || ( |<f_i, t_m>| )_{m = 1..M} ||_p,   p in {2, inf}

f_i is the pool row's stored image embedding (``l14_img``; ``--arch b32``: ``b32_img``), read as
float32 and not renormalised (as the authors read it); t_m are the rows of the target, a
``.npy`` (M x d) of image embeddings from the same model as the pool's (OpenAI ViT-L/14 for
``l14_img``), L2-normalised when they were made. The absolute value is what ``torch.norm``
takes; for p = inf the score is max_m |<f_i, t_m>|. NormSim_2^2 = M x VAS (the authors' earlier
score f^T (T^T T / M) f), so p = 2 ranks exactly as VAS does.

The paper's targets are the **train** splits of the 24 downstream tasks ("target24", embedded
with OpenAI ViT-L/14 ``encode_image``) or ImageNet-1k **train**; never a test split (that would
select the pool by the evaluation data). A target whose file name or manifest
(``TARGET.json``) says ``test`` is warned about.

Streaming: pool rows in chunks of ``CHUNK`` against the target in blocks of ``TARGET_BLOCK``
(one float32 GEMM a tile, then |.| and a max, or a sum of squares in float64); memory is the
target (M x d float32) plus one tile.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from conceptprune import keeplist as K
from conceptprune.errors import ConfigError, PoolError
from conceptprune.npz import NpzArray, row_parallel, to_float32
from conceptprune.pool import Pool

from .base import FilterResult, as_within
from .rows import work_dir_for
from .scores import RowScorer, check_keep_rule, compute_scores, keep_by_score

log = logging.getLogger(__name__)

IMAGE_KEYS = {"l14": "l14_img", "b32": "b32_img", "embed": "img"}  # embed: `conceptprune embed`'s key
NORMS = {"inf": np.inf, "2": 2}
CHUNK = 8192  # pool rows a tile
TARGET_BLOCK = 16384  # target rows a tile


def load_target(path: str | Path, dim: int | None = None) -> np.ndarray:
    """The target embeddings as float32 (M x d), checked; warns about a test split."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--target {path}: no such file (a .npy of image embeddings; make one with "
                          "'conceptprune embed' over the target images)")
    try:
        t = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as e:
        raise ConfigError(f"--target {path}: not a readable .npy ({e})") from None
    if t.ndim != 2 or t.shape[0] == 0 or t.dtype.kind != "f":
        raise ConfigError(f"--target {path}: expected a non-empty 2-D float array of embeddings, got "
                          f"{t.dtype} {t.shape}")
    if dim is not None and t.shape[1] != dim:
        raise ConfigError(f"--target {path}: {t.shape[1]}-d rows but the pool's embeddings are {dim}-d "
                          "(the target must come from the same model as the pool's)")
    out = to_float32(np.asarray(t))
    if out is t:
        out = np.array(out)
    bad = ~np.isfinite(out).all(axis=1)
    if bad.any():
        raise ConfigError(f"--target {path}: row {int(np.flatnonzero(bad)[0])} is not finite")
    for warning in test_split_warnings(path):
        log.warning("%s", warning)
    return out


def test_split_warnings(path: str | Path) -> list[str]:
    """Warnings when a target looks like a test split (its name or its manifest says 'test')."""
    path = Path(path)
    out = []
    if "test" in path.name.lower():
        out.append(f"--target {path}: the file name says 'test'; NormSim's target must be a TRAIN split "
                   "(selecting the pool by the evaluation data leaks it into training)")
    mpath = K.manifest_path(path)
    if mpath.is_file():
        try:
            text = json.dumps(json.loads(mpath.read_text()))
        except (OSError, ValueError):
            text = ""
        if "test" in text.lower():
            out.append(f"--target {path}: its manifest {mpath.name} mentions 'test'; NormSim's target must be "
                       "a TRAIN split")
    return out


def normsim_block(x: np.ndarray, target: np.ndarray, p: float) -> np.ndarray:
    """NormSim_p of the rows of ``x`` (float32) against ``target`` (float32, M x d), float64."""
    n = len(x)
    out = np.zeros(n, np.float64)
    tile = np.empty((n, min(TARGET_BLOCK, len(target))), np.float32)
    for a in range(0, len(target), TARGET_BLOCK):
        blk = target[a:a + TARGET_BLOCK]
        t = tile[:, : len(blk)]
        np.matmul(x, blk.T, out=t)

        def part(lo, hi, t=t):
            if p == np.inf:
                np.abs(t[lo:hi], out=t[lo:hi])
                np.maximum(out[lo:hi], t[lo:hi].max(axis=1), out=out[lo:hi])
            else:
                out[lo:hi] += np.einsum("ij,ij->i", t[lo:hi], t[lo:hi])

        row_parallel(part, n, min_rows=256)
    return out if p == np.inf else np.sqrt(out)


@dataclass
class NormSimScorer(RowScorer):
    target: str = ""
    norm: str = "inf"
    arch: str = "l14"
    per_row = True
    name = "normsim"

    def score(self, pool: Pool, start: int, stop: int, cand: np.ndarray | None = None) -> np.ndarray:
        key = IMAGE_KEYS[self.arch]
        p = NORMS[self.norm]
        target = None
        out = np.full(stop - start, np.nan, np.float32)
        for f in pool.files:
            lo, hi = max(start, f.offset), min(stop, f.offset + f.rows)
            if lo >= hi:
                continue
            if f.npz is None:
                raise PoolError(f"{f.parquet}: no {f.stem}.npz beside it (normsim reads {key})")
            with NpzArray(f.npz, key) as arr:
                if target is None:
                    target = load_target(self.target, arr.dim)
                for a in range(lo, hi, CHUNK):
                    b = min(a + CHUNK, hi)
                    sel = None if cand is None else np.flatnonzero(cand[a - start: b - start])
                    if sel is not None and len(sel) == 0:
                        continue
                    x = to_float32(arr.read(a - f.offset, b - f.offset))
                    if sel is not None and len(sel) < b - a:
                        x = np.ascontiguousarray(x[sel])
                        out[a - start + sel] = normsim_block(x, target, p)
                    else:
                        out[a - start: b - start] = normsim_block(x, target, p)
        return out


def make_scorer(target, norm: str = "inf", arch: str = "l14") -> NormSimScorer:
    norm = str(norm)
    if norm in ("Inf", "INF", "infinity"):
        norm = "inf"
    if norm not in NORMS:
        raise ConfigError(f"--norm must be inf or 2, got {norm!r}")
    if arch not in IMAGE_KEYS:
        raise ConfigError(f"--arch must be one of {sorted(IMAGE_KEYS)}, got {arch!r}")
    if target is None:
        raise ConfigError("normsim needs --target TARGET.npy (image embeddings of a train split)")
    target = str(Path(target).resolve())
    load_target(target)  # checked before any work
    return NormSimScorer(target, norm, arch)


def normsim_scores(pool, target, *, norm: str = "inf", arch: str = "l14", executor=None, work_dir=None,
                   within=None) -> tuple[np.ndarray, np.ndarray | None]:
    pool = pool if isinstance(pool, Pool) else Pool(pool)
    res = compute_scores(pool, make_scorer(target, norm, arch), within, executor, work_dir)
    res.cleanup()
    return res.scores, res.cand


def normsim(pool: Pool, *, target=None, norm: str = "inf", arch: str = "l14", fraction: float | None = None,
            keep_count: int | None = None, threshold: float | None = None, within=None, executor=None,
            out=None) -> FilterResult:
    """Keep exactly ``int(N * fraction)`` (or ``keep_count``) candidates with the largest
    NormSim_p (ties: the earlier row), or those with NormSim >= ``threshold``."""
    threshold = check_keep_rule("normsim", fraction, keep_count, threshold)
    scorer = make_scorer(target, norm, arch)
    warnings = test_split_warnings(scorer.target)
    kept, stats, n = keep_by_score(pool, scorer, as_within(within), executor, work_dir_for(out, pool, "normsim"),
                                   fraction=fraction, keep_count=keep_count, threshold=threshold)
    params = {"target": scorer.target, "target_rows": int(np.load(scorer.target, mmap_mode="r").shape[0]),
              "norm": scorer.norm, "arch": arch, "fraction": fraction, "keep_count": keep_count,
              "threshold": threshold}
    if warnings:
        stats["warnings"] = warnings
    return FilterResult("normsim", kept, params, {"pool": pool.rows, "candidates": n}, stats=stats)




from conceptprune.checks import float_arg, fraction_arg, int_arg  # noqa: E402

from .registry import FilterSpec, Param, register  # noqa: E402

register(FilterSpec(
    "normsim", "NormSim (Wang et al. 2024): p-norm of a row's |similarity| to a target set's images; keep the top",
    normsim, runs_as="rows",
    params=(Param("--target", required=True, metavar="TARGET.npy",
                  help="image embeddings of the target (M x d .npy, the pool's model, e.g. OpenAI L/14 over the "
                       "train splits of the 24 downstream tasks or ImageNet-1k train; never a test split)"),
            Param("--norm", choices=("inf", "2"), default="inf", help="p: inf (max, the paper's best; default) or 2"),
            Param("--fraction", fraction_arg(), group="keep", required=True,
                  help="keep exactly int(N*F) candidates with the largest NormSim (ties: the earlier row)"),
            Param("--keep-count", int_arg("--keep-count", 1), group="keep", required=True, metavar="N",
                  help="keep exactly min(N, candidates) rows, e.g. int(0.2 x pool rows) after "
                       "'negcliploss --fraction 0.3' (the paper's medium recipe)"),
            Param("--threshold", float_arg("--threshold"), group="keep", required=True,
                  help="keep NormSim >= threshold"),
            Param("--arch", choices=("l14", "b32", "embed"), default="l14",
                  help="pool image embeddings: l14_img (default), b32_img, or img ('conceptprune embed')"))))
