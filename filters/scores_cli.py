"""``conceptprune scores --pool P --out scores.parquet`` and ``conceptprune scores correlate TABLE``."""

from __future__ import annotations

import argparse

from conceptprune.checks import fraction_arg, int_arg


def register(sub) -> None:
    p = sub.add_parser("scores", help="one table of every per-sample score on a pool; how the scores agree",
                       description="Write one parquet table, a row per pool row, of every per-sample score the "
                                   "toolkit computes (CLIP score L/14 and B/32, negCLIPLoss, NormSim with "
                                   "--target, SSL-prototype distance, DBP complexity and in-cluster rank, "
                                   "SemDeDup's M). 'scores correlate TABLE' prints their Spearman rank "
                                   "correlations and top-F overlaps and plots them.")
    p.add_argument("--pool", help="DataComp metadata directory")
    p.add_argument("--out", help="output table (.parquet)")
    p.add_argument("--target", default=None, metavar="TARGET.npy",
                   help="NormSim target embeddings (a train split); without it no NormSim columns")
    p.add_argument("--clusters", type=int_arg("--clusters", 1), default=None,
                   help="k of the clustering behind ssl_distance and the DBP columns (default 100)")
    p.add_argument("--semdedup-clusters", type=int_arg("--semdedup-clusters", 1), default=None,
                   help="k of SemDeDup's clustering (default: SemDeDup's, rows / 10000)")
    p.add_argument("--seed", type=int_arg("--seed", 0), default=None, help="k-means seed (default 1234)")
    p.add_argument("--batch-size", type=int_arg("--batch-size", 1), default=None,
                   help="negCLIPLoss batch size (default 32768)")
    p.add_argument("--repetitions", type=int_arg("--repetitions", 1), default=None,
                   help="negCLIPLoss repetitions (default 10)")
    p.add_argument("--skip", default="", help="comma-separated parts not to compute: clip, negcliploss, normsim, "
                                              "ssl, dbp, semdedup")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    from conceptprune.slurm.options import add_cluster_args

    add_cluster_args(p)
    p.set_defaults(func=_table)
    s = p.add_subparsers(dest="action", metavar="<action>")
    q = s.add_parser("correlate", help="Spearman rank correlations and top-F overlaps of a scores table")
    q.add_argument("table", help="a table written by 'conceptprune scores'")
    q.add_argument("--fraction", type=fraction_arg(), default=0.2, help="F of the top-F overlap (default 0.2)")
    q.add_argument("--plot", default=None, metavar="PNG", help="heatmaps (default: TABLE.correlate.png)")
    q.set_defaults(func=_correlate)


def _table(a: argparse.Namespace) -> None:
    from conceptprune.errors import ConfigError
    from conceptprune.slurm.stage import executor_from_args

    from .clustering_config import ClusteringConfig
    from .scores_table import score_table

    if not a.pool or not a.out:
        raise ConfigError("scores: give --pool and --out (or 'scores correlate TABLE')")
    ncl = {k: v for k, v in (("batch_size", a.batch_size), ("repetitions", a.repetitions)) if v is not None}
    cfg = ClusteringConfig(**{k: v for k, v in (("clusters", a.clusters), ("seed", a.seed)) if v is not None})
    out = score_table(a.pool, a.out, target=a.target, clustering=cfg, semdedup_clusters=a.semdedup_clusters,
                      skip=[s for s in a.skip.split(",") if s], executor=executor_from_args(a),
                      overwrite=a.overwrite, negcliploss_args=ncl)
    print(out)


def _correlate(a: argparse.Namespace) -> None:
    from pathlib import Path

    from .scores_table import correlate

    plot = a.plot or str(Path(a.table).with_suffix(".correlate.png"))
    r = correlate(a.table, fraction=a.fraction, plot=plot)
    with_pd_width(lambda: (
        print(f"{r['n']:,} rows; scores oriented so that larger = kept by that filter\n"),
        print("Spearman rank correlation"),
        print(r["spearman"].round(3).to_string()),
        print(f"\noverlap of the top {a.fraction:g} ({r['top']:,} rows)"),
        print(r["overlap"].round(3).to_string()),
        print(f"\nplot: {plot}")))


def with_pd_width(fn):
    import pandas as pd

    with pd.option_context("display.width", 250, "display.max_columns", 50):
        fn()
