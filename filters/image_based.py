"""DataComp's ``image_based`` baseline (and, chained after clip-score, ``image_based ∩ CLIP score``).

As DataComp's ``baselines/apply_filter.py`` does it:

1. the reference (ImageNet-1k training images, OpenAI CLIP L/14 ``image_features``, five
   files) is assigned to the pool's k-means centroids; the centroids hit by some reference
   image are the targets;
2. pool rows pass DataComp's caption filter (fastText English, > 1 fastText token, > 5 chars);
3. each such row's stored ``l14_img`` (float16 -> float32, not re-normalised) is assigned to
   a centroid, and the row is kept when that centroid is a target.

"Assigned" is DataComp's code: ``argmax`` of the dot product with the centroids, in float32,
first index on a tie. The centroids come from faiss's L2 k-means and are not unit length, so
this is not the nearest centroid; ``assign="l2"`` is the corrected variant (Euclidean
nearest, the rule the centroids were trained with).

``image_based ∩ CLIP score`` (DataComp's ``image_based_intersect_clip_score``) equals
``filter clip-score --arch l14 --fraction 0.3`` followed by ``filter image-based --within``:
DataComp takes the score threshold over the whole pool, then applies the same steps to the
rows above it.

Centroids: DataComp's per-scale files (fetched, see ``assets.py``), or your own: ``build_centroids``
runs DataComp's recipe (``baselines/image_based_clustering.py``: caption-filtered ``l14_img``
in float32, faiss L2 k-means, 20 iterations, seed 0, every point used) with faiss on GPU when
it sees one.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import numpy as np

from conceptprune import uids as U
from conceptprune.atomic import atomic_open, write_json
from conceptprune.errors import ConfigError
from conceptprune.keeplist import UidCollector
from conceptprune.pool import Pool

from .base import FilterResult, as_pool, as_within
from .clustering_config import ClusteringConfig
from .langid import LanguageId
from .text_based import caption_filter_mask

log = logging.getLogger(__name__)

ASSIGN_RULES = ("dot", "l2")


class Assigner:
    """Label rows with a centroid: argmax x.c ("dot", DataComp's) or argmin |x - c| ("l2")."""

    def __init__(self, centroids: np.ndarray, rule: str = "dot", batch_size: int = 1024, device: str = "auto"):
        import torch

        if rule not in ASSIGN_RULES:
            raise ConfigError(f"--assign must be one of {list(ASSIGN_RULES)}, got {rule!r}")
        if batch_size < 1:
            raise ConfigError("--batch-size must be >= 1")
        self.torch = torch
        self.device = _device(device)
        self.rule, self.batch_size = rule, batch_size
        self.centroids = torch.from_numpy(np.ascontiguousarray(centroids, dtype=np.float32)).to(self.device)
        self.half_sq = (self.centroids * self.centroids).sum(1) / 2 if rule == "l2" else None
        self.k, self.dim = centroids.shape

    def __call__(self, x: np.ndarray) -> np.ndarray:
        torch = self.torch
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ConfigError(f"features of width {x.shape[-1]} against centroids of width {self.dim}")
        out = np.empty(len(x), dtype=np.int64)
        with torch.no_grad():
            for a in range(0, len(x), self.batch_size):
                xb = torch.from_numpy(np.ascontiguousarray(x[a:a + self.batch_size], dtype=np.float32))
                sim = xb.to(self.device) @ self.centroids.T
                if self.half_sq is not None:  # |x-c|^2 = |x|^2 - 2 (x.c - |c|^2/2)
                    sim -= self.half_sq
                out[a:a + len(xb)] = torch.argmax(sim, dim=1).cpu().numpy()
        return out


def _device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: torch sees no GPU")
    return device


def target_centroids(assigner: Assigner, reference: np.ndarray, paths=()) -> np.ndarray:
    """Sorted ids of the centroids that some reference row is assigned to."""
    if reference.shape[1] != assigner.dim:
        where = ", ".join(map(str, paths)) or "reference"
        raise ConfigError(f"{where}: features are {reference.shape[1]}-d but the centroids are {assigner.dim}-d")
    return np.unique(assigner(reference))


def resolve_centroids(scale, centroids, assets_dir=None, assets_url=None) -> Path:
    from .assets import datacomp_centroids

    if (scale is None) == (centroids is None):
        raise ConfigError("image-based needs exactly one of --scale (DataComp's centroids) or --centroids FILE")
    return Path(centroids) if centroids else datacomp_centroids(scale, assets_dir, assets_url)


def resolve_reference(reference, assets_dir=None, assets_url=None) -> list[Path]:
    from .assets import in1k_reference

    if reference:
        return [Path(p) for p in ([reference] if isinstance(reference, (str, os.PathLike)) else reference)]
    return in1k_reference(assets_dir, assets_url)


def image_based(pool: Pool, *, within=None, scale: str | None = None, centroids=None, reference=None,
                assign: str = "dot", lid_model=None, batch_size: int = 1024, device: str = "auto",
                assets_dir=None, assets_url=None, clustering: ClusteringConfig | None = None,
                executor=None, out=None) -> FilterResult | None:
    """Centroids from DataComp (``scale``), a file (``centroids``), or our clustering engine
    (``clustering``: spherical k-means, GPU, SLURM parts; see ``engine_image_based``; None when
    the executor detaches before its jobs are done)."""
    from .assets import load_centroids, load_reference

    within = as_within(within)
    if not pool.embedding_key:
        raise ConfigError("image-based needs the pool's embeddings (embedding key l14_img)")
    if clustering is not None:
        if scale is not None or centroids is not None or assign != "dot":
            raise ConfigError("--clusters/--clustering (our clustering engine) go without --scale, --centroids "
                              "and --assign (unit centroids: the dot rule is the nearest centroid)")
        return engine_image_based(pool, within, reference, lid_model, batch_size, device, assets_dir, assets_url,
                                  clustering=clustering, executor=executor, out=out)
    c_path = resolve_centroids(scale, centroids, assets_dir, assets_url)  # assets before any work
    r_paths = resolve_reference(reference, assets_dir, assets_url)
    c = load_centroids(c_path)
    if pool.dim != c.shape[1]:
        raise ConfigError(f"{c_path}: centroids are {c.shape[1]}-d but {pool.embedding_key} is {pool.dim}-d")
    assigner = Assigner(c, assign, batch_size, device)
    targets = target_centroids(assigner, load_reference(r_paths, keep_half=True), r_paths)
    is_target = np.zeros(assigner.k, dtype=bool)
    is_target[targets] = True
    lid = LanguageId(lid_model)
    kept, n, passed = UidCollector(), 0, 0
    for chunk in pool.iter_chunks(["text"], embeddings=True, normalize=False, progress="image-based filter"):
        cand = within.mask(chunk.uids)
        if chunk.valid is not None:
            cand &= chunk.valid
        n += int(cand.sum())
        rows = np.flatnonzero(cand)
        texts = chunk.pylist("text")
        ok = rows[caption_filter_mask([texts[i] for i in rows], lid)]
        passed += len(ok)
        labels = assigner(chunk.embeddings[ok])
        kept.add(chunk.uids[ok[is_target[labels]]])
    within.check()
    params = {"scale": scale, "centroids": str(c_path), "k": assigner.k, "reference": [str(p) for p in r_paths],
              "assign": assign, "lid_model": str(lid.path), "device": assigner.device}
    stats = {"target_centroids": int(len(targets)), "caption_filter_passed": passed}
    return FilterResult("image-based", kept, params, {"pool": pool.rows, "candidates": n}, stats=stats)




def engine_image_based(pool: Pool, within, reference, lid_model, batch_size, device, assets_dir, assets_url, *,
                       clustering, executor, out) -> FilterResult | None:
    """image-based on a clustering made by our engine (the one SemDeDup, SSL prototypes and DBP
    share): its unit centroids and its per-row assignment (exact argmax of x.c, ties to the
    lowest id: DataComp's rule) are reused, so the pool is assigned once, in parallel parts."""
    from .assets import load_reference
    from .clustering import clustering_for

    # the reference (fetched when not given) and the language model before any k-means
    r_paths = resolve_reference(reference, assets_dir, assets_url)
    ref = load_reference(r_paths, keep_half=True)
    lid = LanguageId(lid_model)
    # trained on the pool, not on --within: each row's cluster and the targets then do not depend
    # on the candidates, so image-based --within clip.npy is exactly image-based AND CLIP score
    # (DataComp's intersection), as with fixed centroids
    cl = clustering_for(pool, clustering, as_within(None), executor, out=out)
    if cl is None:
        return None
    if ref.shape[1] != cl.centroids.shape[1]:
        raise ConfigError(f"{', '.join(map(str, r_paths))}: features are {ref.shape[1]}-d but the pool's "
                          f"{pool.embedding_key} is {cl.centroids.shape[1]}-d")
    assigner = Assigner(cl.centroids, "dot", batch_size, device)
    targets = target_centroids(assigner, ref, r_paths)
    is_target = np.zeros(cl.k, dtype=bool)
    is_target[targets] = True
    caption_ok = np.zeros(pool.rows, dtype=bool)
    for chunk in pool.iter_chunks(["text"], progress="image-based: captions"):
        rows = np.flatnonzero(within.mask(chunk.uids))
        texts = chunk.pylist("text")
        caption_ok[rows[caption_filter_mask([texts[i] for i in rows], lid)] + chunk.start] = True
    kept, n = UidCollector(), 0
    for rows, uids, cluster, _ in cl.candidates(within):
        n += len(rows)
        kept.add(uids[caption_ok[rows] & is_target[cluster]])
    within.check()
    params = {"clustering": str(cl.dir), "k": cl.k, "seed": cl.meta.get("seed"), "assign": "dot",
              "reference": [str(p) for p in r_paths], "lid_model": str(lid.path)}
    stats = {"target_centroids": int(len(targets)), "caption_filter_passed": int(caption_ok.sum())}
    return FilterResult("image-based", kept, params, {"pool": pool.rows, "candidates": n}, stats=stats)


# -- building centroids ----------------------------------------------------------------------

def build_centroids(out, *, pool=None, features=None, clusters: int, niter: int = 20, seed: int = 0,
                    caption_filter: bool = True, train_sample: int | None = None, within=None,
                    lid_model=None, embedding_key: str = "l14_img", gpu: str = "auto") -> dict:
    """DataComp's centroid recipe on a pool (or a feature file); writes OUT (.npy) + OUT.json."""
    from .clustering import _faiss, use_gpu

    if (pool is None) == (features is None):
        raise ConfigError("build centroids from exactly one of --pool or --features")
    if clusters < 1 or niter < 1:
        raise ConfigError("--clusters and --niter must be >= 1")
    if features is not None:
        from .assets import load_reference

        x, source = load_reference([features]), {"features": str(features)}
    else:
        pool = as_pool(pool, embedding_key=embedding_key)
        x, source = training_rows(pool, as_within(within), caption_filter, train_sample, seed, lid_model)
    if len(x) < clusters:
        raise ConfigError(f"--clusters {clusters} is more than the {len(x)} vectors to cluster")
    faiss, on_gpu = _faiss(), use_gpu(gpu)
    km = faiss.Kmeans(x.shape[1], clusters, niter=niter, seed=seed, gpu=on_gpu,
                      max_points_per_centroid=max(10_000_000, math.ceil(len(x) / clusters) + 1))
    km.train(x)
    c = np.ascontiguousarray(km.centroids, dtype=np.float32).reshape(clusters, x.shape[1])
    out = Path(out)
    with atomic_open(out, "wb") as f:
        np.save(f, c)
    meta = {"k": clusters, "dim": int(x.shape[1]), "niter": niter, "seed": seed, "trained_on": int(len(x)),
            "kmeans": "faiss L2 (DataComp's image_based_clustering.py)", "gpu": on_gpu,
            "objective": float(km.obj[-1]) if len(km.obj) else None, "faiss": faiss.__version__, **source}
    write_json(out.with_suffix(".json"), meta)
    return meta


def training_rows(pool: Pool, within, caption_filter: bool, train_sample: int | None, seed: int,
                  lid_model=None) -> tuple[np.ndarray, dict]:
    """Stored embeddings (float32) of the caption-filtered candidates, or of a seeded sample of them."""
    lid = LanguageId(lid_model) if caption_filter else None
    rows, keys = [], []
    for chunk in pool.iter_chunks(["text"] if caption_filter else [], progress="centroids: captions"):
        ok = np.flatnonzero(within.mask(chunk.uids))
        if caption_filter:
            texts = chunk.pylist("text")
            ok = ok[caption_filter_mask([texts[i] for i in ok], lid)]
        rows.append(ok + chunk.start)
        keys.append(U.hash_uids(chunk.uids[ok], seed))
    within.check()
    rows, keys = np.concatenate(rows), np.concatenate(keys)
    if train_sample is not None and train_sample < len(rows):
        rows = np.sort(rows[np.lexsort((rows, keys))[:train_sample]])  # smallest seeded uid hashes
    x = np.empty((len(rows), pool.dim), dtype=np.float32)
    at = 0
    for chunk in pool.iter_chunks(embeddings=True, normalize=False, uids=False, progress="centroids: embeddings"):
        a, b = np.searchsorted(rows, [chunk.start, chunk.start + len(chunk)])
        local = rows[a:b] - chunk.start
        if chunk.valid is not None:  # rows dropped under --bad-embeddings drop
            local = local[chunk.valid[local]]
        x[at:at + len(local)] = chunk.embeddings[local]
        at += len(local)
    x = x[:at]
    source = {"pool": str(pool.root), "embedding_key": pool.embedding_key, "caption_filter": caption_filter,
              "candidates": int(len(rows)), "train_sample": train_sample}
    return x, source


from conceptprune.checks import int_arg  # noqa: E402

from .assets import ASSET_PARAMS  # noqa: E402
from .registry import FilterSpec, Param, register  # noqa: E402


def _image_based_keywords(a, kw: dict) -> dict:
    """One source of centroids; the clustering engine's keywords only when it is the source."""
    engine = a.clusters is not None or a.clustering is not None
    if (a.scale is not None) + (a.centroids is not None) + engine != 1:
        raise ConfigError("image-based needs one of --scale (DataComp's centroids), --centroids FILE, "
                          "or --clusters K / --clustering DIR (our clustering engine)")
    if not engine:
        kw.pop("clustering", None)
        kw.pop("executor", None)
    if not kw.get("embedding_dir"):
        kw.pop("embedding_dir", None)
    return {**kw, "embedding_key": "l14_img"}


register(FilterSpec(
    "image-based", "DataComp's image-based filter: caption filter, then keep rows whose k-means centroid is hit by an "
                   "ImageNet-1k image (image-based AND CLIP score: --within a clip-score list)", image_based,
    runs_as="clustering", clustering=True, prepare=_image_based_keywords,
    params=(Param("--embedding-dir", help="folder of the npz files if not beside the parquet files"),
            Param("--bad-embeddings", choices=("error", "drop"), default="error",
                  help="NaN/zero embeddings: stop with an error (default) or drop those rows (never kept)"),
            Param("--scale", choices=("small", "medium", "large", "xlarge"), group="centroids",
                  help="use DataComp's centroids for this pool scale (downloaded once)"),
            Param("--centroids", metavar="FILE", group="centroids",
                  help="your own centroids (.npy from image-based-centroids, or .pt as DataComp writes them); "
                       "or, instead of both, --clusters K / --clustering DIR: our clustering engine"),
            Param("--reference", nargs="+", metavar="FILE",
                  help="reference image features (.pt holding image_features, or .npy; default: DataComp's "
                       "ImageNet-1k L/14 features, 5 files)"),
            Param("--assign", choices=("dot", "l2"), default="dot",
                  help="dot (default): DataComp's argmax x.c; l2: the corrected nearest-centroid rule"),
            Param("--lid-model", help="fastText language-ID model (default: bundled lid.176.ftz; 'datacomp': "
                                      "DataComp's lid.176.bin)"),
            Param("--batch-size", int, default=1024, help="rows per assignment batch (default 1024)"),
            Param("--device", default="auto", help="torch device for the assignment (default: cuda when present)"))
    + ASSET_PARAMS))


def _centroids_command(a) -> None:
    meta = build_centroids(a.out, pool=a.pool, features=a.features, clusters=a.clusters, niter=a.niter,
                           seed=a.seed, caption_filter=not a.no_caption_filter, train_sample=a.train_sample,
                           within=a.within, lid_model=a.lid_model, gpu=a.gpu)
    print(f"{a.out}: {meta['k']} centroids of width {meta['dim']} from {meta['trained_on']} vectors")


register(FilterSpec(
    "image-based-centroids", "build centroids for image-based with DataComp's recipe (caption filter, faiss L2 "
                             "k-means, 20 iterations, seed 0) from your pool or a feature file",
    command=_centroids_command, common=False, jobs=False,
    params=(Param("--pool", group="source", required=True,
                  help="DataComp metadata directory (its l14_img embeddings are clustered)"),
            Param("--features", metavar="FILE", group="source",
                  help="cluster these features instead (.npy, or .pt with image_features)"),
            Param("--out", required=True, help="centroids .npy (a .json with the settings is written beside it)"),
            Param("--clusters", int, required=True, help="k (DataComp's: 100000)"),
            Param("--niter", int, default=20, help="k-means iterations (default 20, DataComp's)"),
            Param("--seed", int, default=0, help="k-means and sample seed (default 0, DataComp's)"),
            Param("--train-sample", int_arg("--train-sample", 1),
                  help="cluster only this many candidates, those with the smallest seeded uid hashes (default all)"),
            Param("--no-caption-filter", action="store_true",
                  help="cluster every candidate, not only captions passing DataComp's caption filter"),
            Param("--within", metavar="PREV.npy", help="only cluster uids of this keep-list"),
            Param("--lid-model", help="fastText language-ID model (default: bundled lid.176.ftz; 'datacomp': "
                                      "DataComp's lid.176.bin)"),
            Param("--gpu", choices=("auto", "yes", "no"), default="auto",
                  help="faiss on GPU (default: when available)"))))
