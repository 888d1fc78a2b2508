"""``conceptprune run PIPELINE.toml``."""

from __future__ import annotations

import json


def register(sub) -> None:
    from conceptprune.slurm.options import add_cluster_args

    p = sub.add_parser("run", help="run a whole loop from one pipeline file (TOML or YAML), as one stage graph",
                       description="Build the steps of PIPELINE (download, embed, filter, reshard, train, evaluate, "
                                   "compare, each after the steps it names) and hand them to one executor: on SLURM "
                                   "one graph of jobs with afterok dependencies (--detach: submit and exit; the same "
                                   "command rerun collects). Finished steps are skipped; 'conceptprune status "
                                   "FOLDER' shows every step. The file's format: apps/pipeline.py's docstring and "
                                   "the README.")
    p.add_argument("pipeline", metavar="PIPELINE", help="the pipeline file (.toml, .yaml)")
    p.add_argument("--dry-run", action="store_true", help="print the steps, their folders and dependencies; run nothing")
    add_cluster_args(p)
    p.set_defaults(func=_run)


def _run(a) -> None:
    from conceptprune.slurm.stage import executor_from_args

    from .pipeline import run_pipeline

    res = run_pipeline(a.pipeline, executor_from_args(a), dry_run=a.dry_run)
    if res is None:
        print(f"submitted; rerun 'conceptprune run {a.pipeline}' to collect, 'conceptprune status' to follow")
    else:
        print(json.dumps(res, indent=2, default=str))
