"""``conceptprune filter <method> --pool DIR --out KEEP.npy [--within PREV.npy] [options]``."""

from __future__ import annotations

import argparse

from conceptprune.checks import int_arg, renamed_flag, seed_arg


def _common(p: argparse.ArgumentParser, embeddings: bool = False) -> None:
    p.add_argument("--pool", required=True, help="DataComp metadata directory (<name>.parquet + <name>.npz)")
    p.add_argument("--out", required=True, help="output keep-list (.npy); a manifest .json is written beside it")
    p.add_argument("--within", default=None, metavar="PREV.npy",
                   help="only consider uids of this keep-list (chain filters: clip-score -> semdedup -> dbp); "
                        "a list with repeated uids counts as its set")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out (default: refuse, before any work)")
    p.add_argument("--allow-empty", action="store_true",
                   help="write an empty keep-list when nothing passes (default: an error, nothing written)")
    if embeddings:
        p.add_argument("--embedding-key", default="l14_img",
                       help="npz array with the image embeddings (default l14_img; b32_img, or a key "
                            "written by 'conceptprune embed')")
        p.add_argument("--embedding-dir", default=None, help="folder of the npz files if not beside the parquet files")
        p.add_argument("--bad-embeddings", choices=["error", "drop"], default="error",
                       help="NaN/zero embeddings: stop with an error (default) or drop those rows (never kept)")


def register(sub) -> None:
    """``filter <name>`` for every filter in the registry (``filters/registry.py``)."""
    from .registry import specs

    p = sub.add_parser("filter", help="filter a pool into a DataComp keep-list",
                       description="Filter a DataComp pool and write a keep-list (sorted u8,u8 uids) "
                                   "plus a JSON manifest.")
    msub = p.add_subparsers(dest="method", metavar="<method>", required=True)
    for spec in specs():
        q = msub.add_parser(spec.name, help=spec.help, description=spec.help)
        add_arguments(q, spec)
        q.set_defaults(func=_with_output_policy(lambda a, spec=spec: run_spec(spec, a)))


def add_arguments(p: argparse.ArgumentParser, spec) -> None:
    """The filter's flags: the shared ones its spec asks for, then its own."""
    if spec.common:
        _common(p, embeddings=spec.embeddings)
    spec.add_arguments(p)
    for old, new, why in spec.renamed:
        renamed_flag(p, old, new, why)
    if spec.clustering:
        _clustering_args(p, default_k=spec.default_clusters)
    if spec.jobs:
        _job_args(p)


def run_spec(spec, a):
    """Run one filter command: the spec's keywords plus the shared ones, through ``run_filter``."""
    if spec.command is not None:
        return spec.command(a)
    from . import run_filter

    kw = {}
    if spec.embeddings:
        kw.update(embedding_key=a.embedding_key, embedding_dir=a.embedding_dir, bad_embeddings=a.bad_embeddings)
    if spec.clustering:
        kw["clustering"] = _clustering_config(a)
    if spec.jobs:
        from conceptprune.slurm.stage import executor_from_args

        kw["executor"] = executor_from_args(a)
    kw.update(spec.keywords(a))
    if spec.prepare is not None:
        kw = spec.prepare(a, kw)
    run_filter(spec.fn, a.pool, a.out, **output_args(a), within=a.within, **kw)


# Integer options shared by several filters (including ones registered elsewhere, and --workers
# from the job options): each must be >= 1 when given. Checked for every filter command before
# it runs, on top of the per-flag argparse types.
POSITIVE_INTS = ("workers", "clusters", "niter", "train_sample", "neighbors", "batch_size")


def check_common_numbers(a) -> None:
    from conceptprune.checks import check_float, check_int, check_seed

    for dest in POSITIVE_INTS:
        if getattr(a, dest, None) is not None:
            check_int(f"--{dest.replace('_', '-')}", getattr(a, dest), min=1)
    if getattr(a, "seed", None) is not None:
        check_seed("--seed", a.seed)
    for dest in ("fraction", "target_fraction"):
        if getattr(a, dest, None) is not None:
            check_float(f"--{dest.replace('_', '-')}", getattr(a, dest), min=0.0, max=1.0, min_open=True)
    if getattr(a, "threshold", None) is not None:
        check_float("--threshold", a.threshold)


def _with_output_policy(run):
    """Every filter command: check the shared numeric options before any work, then run (its
    ``run_filter`` call takes ``**output_args(a)``)."""
    def wrapped(a):
        check_common_numbers(a)
        return run(a)
    return wrapped


def output_args(a) -> dict:
    """What a filter command tells ``run_filter`` about its output: an existing --out is
    replaced only with --overwrite, an empty list written only with --allow-empty, and the
    manifest records the command line (``command_line``, set by the CLI)."""
    return {"overwrite": bool(getattr(a, "overwrite", False)), "allow_empty": bool(getattr(a, "allow_empty", False)),
            "command": getattr(a, "command_line", None)}


def _clustering_args(p, default_k: str | None = None):
    from .clustering_config import DEFAULT_CLUSTERS, DEFAULT_NITER, DEFAULT_SEED, KMEANS_MEMORY, POINTS_PER_CENTROID

    # defaults stay None here: ClusteringConfig holds each one (the help only quotes them)
    g = p.add_argument_group("clustering (shared by semdedup, ssl-prototypes and dbp)")
    g.add_argument("--clusters", type=int_arg("--clusters", 1), default=None,
                   help=f"k for spherical k-means (default {default_k or DEFAULT_CLUSTERS}; "
                        "with --clustering DIR: the k stored there)")
    g.add_argument("--clustering", default=None, metavar="DIR",
                   help="folder holding (or to hold) the clustering, reusable by the other filters "
                        "(default: next to --out, KEEP.clustering/)")
    g.add_argument("--seed", type=seed_arg(), default=None,
                   help=f"k-means and sampling seed, in [0, 2^31-1] (default {DEFAULT_SEED}, the reference's)")
    g.add_argument("--niter", type=int_arg("--niter", 1), default=None,
                   help=f"k-means iterations, >= 1 (default {DEFAULT_NITER})")
    g.add_argument("--train-sample", type=int_arg("--train-sample", 1), default=None,
                   help="k-means training sample size (default min(candidates, max(min(1000 k, 500000), "
                        f"{POINTS_PER_CENTROID} k), --kmeans-memory / (4 x dim))); faiss is made to use all of it")
    g.add_argument("--kmeans-memory", default=None, metavar="SIZE",
                   help="memory the default training sample may take as float32 rows, e.g. 8G or 512M "
                        f"(default {KMEANS_MEMORY})")
    g.add_argument("--gpu", choices=["auto", "yes", "no"], default=None, help="faiss on GPU (default: when available)")


def _clustering_config(a):
    """The clustering flags as one ClusteringConfig (flags not given keep its defaults)."""
    from .clustering_config import ClusteringConfig

    given = {"clusters": a.clusters, "dir": a.clustering, "seed": a.seed, "niter": a.niter,
             "train_sample": a.train_sample, "kmeans_memory": a.kmeans_memory, "gpu": a.gpu}
    return ClusteringConfig(**{k: v for k, v in given.items() if v is not None})


def _job_args(p):
    from conceptprune.slurm.options import add_cluster_args
    add_cluster_args(p)
