"""``conceptprune filter <method> --pool DIR --out KEEP.npy [--within PREV.npy] [options]``."""

from __future__ import annotations

import argparse

from conceptprune.checks import float_arg, fraction_arg, int_arg, renamed_flag, seed_arg

METHODS = {}  # name -> (help, add_arguments, run)


def method(name: str, help: str):
    def deco(fn):
        METHODS[name] = (help, fn)
        return fn
    return deco


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
    p = sub.add_parser("filter", help="filter a pool into a DataComp keep-list",
                       description="Filter a DataComp pool and write a keep-list (sorted u8,u8 uids) "
                                   "plus a JSON manifest.")
    msub = p.add_subparsers(dest="method", metavar="<method>", required=True)
    for name, (helptext, add) in METHODS.items():
        q = msub.add_parser(name, help=helptext, description=helptext)
        run = add(q)
        q.set_defaults(func=_with_output_policy(run))


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


@method("none", "keep every uid of the pool (or of --within)")
def _none(p):
    _common(p)
    _job_args(p)

    def run(a):
        from conceptprune.slurm.options import executor_from_args

        from . import keep_all, run_filter
        run_filter(keep_all, a.pool, a.out, **output_args(a), within=a.within, executor=executor_from_args(a))
    return run


@method("random", "keep exactly round(F * N) uids chosen at random (seeded)")
def _random(p):
    _common(p)
    p.add_argument("--fraction", type=fraction_arg(), required=True, help="fraction of candidates to keep, in (0, 1]")
    p.add_argument("--seed", type=seed_arg(), default=0, help="random seed (default 0)")
    _job_args(p)

    def run(a):
        from conceptprune.slurm.options import executor_from_args

        from . import random_subset, run_filter
        run_filter(random_subset, a.pool, a.out, **output_args(a), within=a.within, fraction=a.fraction, seed=a.seed,
                   executor=executor_from_args(a))
    return run


@method("clip-score", "DataComp's CLIP-score filter (top fraction, or score >= threshold)")
def _clip(p):
    _common(p)
    p.add_argument("--arch", choices=["l14", "b32"], default="l14",
                   help="which CLIP model's score column (DataComp's --arch; default l14)")
    renamed_flag(p, "--model", "--arch", "DataComp's name; --model names a trained model elsewhere")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--fraction", type=fraction_arg(),
                   help="keep the top fraction (threshold at index int(N*F), ties kept)")
    g.add_argument("--threshold", type=float_arg("--threshold"), help="keep score >= threshold (a finite number)")
    p.add_argument("--score-column", default=None,
                   help="use this parquet column instead (e.g. similarity_score from 'conceptprune embed --text')")
    _job_args(p)

    def run(a):
        from conceptprune.slurm.options import executor_from_args

        from . import clip_score, run_filter
        run_filter(clip_score, a.pool, a.out, **output_args(a), within=a.within, fraction=a.fraction,
                   threshold=a.threshold, model=a.arch, column=a.score_column, executor=executor_from_args(a))
    return run


@method("basic", "DataComp's basic filter: English caption > 2 words and > 5 chars, side >= 200 px, aspect <= 3")
def _basic(p):
    _common(p)
    p.add_argument("--lid-model", default=None,
                   help="fastText language-ID model (default: the bundled lid.176.ftz; DataComp used lid.176.bin)")

    _job_args(p)

    def run(a):
        from conceptprune.slurm.options import executor_from_args

        from . import basic, run_filter
        run_filter(basic, a.pool, a.out, **output_args(a), within=a.within, lid_model=a.lid_model,
                   executor=executor_from_args(a))
    return run


@method("laion2b", "DataComp's LAION-2B filter: English caption (gcld3) and CLIP B/32 score >= 0.28")
def _laion(p):
    _common(p)
    p.add_argument("--langid", choices=["gcld3", "fasttext"], default="gcld3",
                   help="language identifier (default gcld3, DataComp's for laion2b; fasttext: lid.176)")
    p.add_argument("--lid-model", default=None, help="with --langid fasttext: the model (default: bundled lid.176.ftz)")
    p.add_argument("--threshold", type=float_arg("--threshold"), default=0.28, help="minimum CLIP B/32 score (default 0.28)")

    _job_args(p)

    def run(a):
        from conceptprune.slurm.options import executor_from_args

        from . import laion2b, run_filter
        run_filter(laion2b, a.pool, a.out, **output_args(a), within=a.within, lid_model=a.lid_model,
                   threshold=a.threshold, langid=a.langid, executor=executor_from_args(a))
    return run


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


@method("dbp", "Density-Based Pruning: cluster budgets from softmax(d_inter * d_intra / T), keep the hardest")
def _dbp(p):
    _common(p, embeddings=True)
    p.add_argument("--fraction", type=fraction_arg(), required=True,
                   help="fraction of the candidates to keep, in (0, 1]")
    p.add_argument("--temperature", type=float_arg("--temperature", 0.0, min_open=True), default=0.1,
                   help="softmax temperature, > 0 (default 0.1, the paper's)")
    p.add_argument("--neighbors", type=int_arg("--neighbors", 1), default=20, help="nearest other centroids for d_inter (default 20)")
    p.add_argument("--balance", type=float_arg("--balance", 0.0, 1.0), default=0.0,
                   help="per-cluster floor r: at least min(r*N/k, n_j) kept (default 0, the paper's best)")
    p.add_argument("--prefer", choices=["hard", "easy", "random"], default="hard",
                   help="which members of a cluster to keep (default hard: furthest from the centroid)")
    renamed_flag(p, "--keep", "--prefer", "--keep names a keep-list elsewhere")
    _clustering_args(p)
    _job_args(p)

    def run(a):
        from conceptprune.slurm.options import executor_from_args

        from . import dbp, run_filter
        run_filter(dbp, a.pool, a.out, **output_args(a), within=a.within, embedding_key=a.embedding_key,
                   embedding_dir=a.embedding_dir, bad_embeddings=a.bad_embeddings,
                   fraction=a.fraction, temperature=a.temperature, neighbors=a.neighbors,
                   balance=a.balance, keep=a.prefer, clustering=_clustering_config(a), executor=executor_from_args(a))
    return run


@method("semdedup", "SemDeDup: remove near-duplicates inside each k-means cluster (eps or a target size)")
def _semdedup(p):
    _common(p, embeddings=True)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--eps", type=float_arg("--eps", 0.0, 1.0, max_open=True),
                   help="remove j when max similarity to an earlier member > 1 - eps (eps in [0, 1))")
    g.add_argument("--target-fraction", type=fraction_arg("--target-fraction"),
                   help="keep this fraction: the eps that hits it is read off the stored similarities")
    p.add_argument("--rule", choices=["paper", "greedy", "components"], default="paper",
                   help="paper (default): compare with every earlier member; greedy: only with kept ones; "
                        "components: one per connected component")
    p.add_argument("--pairwise", choices=["auto", "fp32", "bf16-recheck"], default="auto",
                   help="how M is computed; every choice gives float32's exact bits where a decision depends "
                        "on them. auto (default): a bfloat16 GEMM plus an exact recheck near the eps threshold "
                        "where bfloat16 is fast (CUDA, AMX CPUs), else float32")
    from .clustering_config import SEMDEDUP_CLUSTER_SIZE

    _clustering_args(p, default_k=f"candidates / {SEMDEDUP_CLUSTER_SIZE}")
    _job_args(p)

    def run(a):
        from conceptprune.slurm.options import executor_from_args

        from . import run_filter, semdedup
        run_filter(semdedup, a.pool, a.out, **output_args(a), within=a.within, embedding_key=a.embedding_key,
                   embedding_dir=a.embedding_dir, bad_embeddings=a.bad_embeddings, eps=a.eps,
                   target_fraction=a.target_fraction, rule=a.rule, clustering=_clustering_config(a),
                   executor=executor_from_args(a), pairwise=a.pairwise)
    return run


@method("ssl-prototypes", "SSL prototypes (Sorscher et al.): keep the hardest/easiest by distance to the centroid")
def _ssl(p):
    _common(p, embeddings=True)
    p.add_argument("--fraction", type=fraction_arg(), required=True,
                   help="fraction of the candidates to keep, in (0, 1]")
    p.add_argument("--prefer", choices=["hard", "easy"], default="hard",
                   help="hard (abundant data, default) or easy (scarce data)")
    renamed_flag(p, "--keep", "--prefer", "--keep names a keep-list elsewhere")
    p.add_argument("--balance", type=float_arg("--balance", 0.0, 1.0), default=None,
                   help="per-cluster floor R: each cluster keeps at least min(R*N/k, n_j) (the DBP paper's "
                        "SSP baseline uses 0.5)")
    _clustering_args(p)
    _job_args(p)

    def run(a):
        from conceptprune.slurm.options import executor_from_args

        from . import run_filter, ssl_prototypes
        run_filter(ssl_prototypes, a.pool, a.out, **output_args(a), within=a.within, embedding_key=a.embedding_key,
                   embedding_dir=a.embedding_dir, bad_embeddings=a.bad_embeddings, fraction=a.fraction,
                   keep=a.prefer, balance=a.balance, clustering=_clustering_config(a), executor=executor_from_args(a))
    return run


from . import cli_baselines  # noqa: E402,F401  (registers text-based, image-based and their tools)
