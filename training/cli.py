"""``conceptprune train``."""

from __future__ import annotations

import argparse


def register(sub) -> None:
    from conceptprune.checks import int_arg, seed_arg
    from conceptprune.slurm.options import add_cluster_args

    p = sub.add_parser(
        "train", help="train CLIP on filtered shards with DataComp's recipe (open_clip, SLURM or local)",
        description="Run open_clip's training with DataComp's recipe for a scale, on SLURM through submitit "
                    "(requeued and resumed on preemption) or locally; waits for the run unless --detach (SLURM: exit once "
                    "submitted, 'conceptprune status' follows it, the same command rerun collects it). "
                    "Extra open_clip flags go after '--'.",
        epilog="example: conceptprune train --data resharded/ --scale medium --output runs --nodes 2 "
               "--gpus-per-node 8 --partition gpu --time 24:00:00 -- --report-to wandb")
    p.add_argument("--data", action="append", required=True,
                   help="webdataset shards: a folder (e.g. reshard's output) or a brace pattern; repeat to combine")
    p.add_argument("--scale", required=True, choices=["tiny", "small", "medium", "large", "xlarge"],
                   help="DataComp scale (tiny: a CPU-sized model for tests and the demo)")
    p.add_argument("--output", required=True, help="runs folder; the run goes to OUTPUT/<name>/")
    p.add_argument("--name", help="run name (default <scale>-<data folder>); a rerun with it resumes")
    p.add_argument("--seed", type=seed_arg(), default=0, help="training seed (default 0)")
    p.add_argument("--max-batch-per-gpu", type=int_arg("--max-batch-per-gpu", 1), default=None,
                   help="split the per-GPU batch with gradient accumulation above this size")
    p.add_argument("--samples-seen", type=int_arg("--samples-seen", 1), default=None,
                   help="override the recipe's samples seen (a deviation, recorded in run.json)")
    p.add_argument("--checkpoints", type=int_arg("--checkpoints", 1), default=None,
                   help="override the recipe's number of checkpoints (8)")
    p.add_argument("--keep-checkpoints", choices=["latest", "all"], default="latest",
                   help="latest: epoch_latest.pt and the final epoch_N.pt, as DataComp (default); all: every epoch")
    p.add_argument("--dry-run", action="store_true", help="print the open_clip argv per task and the job, then exit")
    p.add_argument("extra", nargs=argparse.REMAINDER, help="after '--': extra open_clip flags")
    add_cluster_args(p, distributed=True)
    p.set_defaults(func=_train)


def _train(a) -> None:
    import json

    from conceptprune.slurm.options import options_from_args
    from conceptprune.slurm.stage import Executor, executor_from_args

    from .launch import TrainConfig, train

    # a dry run asks no controller which executor 'auto' means
    executor = Executor.plan(*options_from_args(a)) if a.dry_run else executor_from_args(a)
    extra = a.extra[1:] if a.extra and a.extra[0] == "--" else a.extra
    cfg = TrainConfig(a.data, a.scale, a.output, a.name, a.seed, a.max_batch_per_gpu, a.samples_seen, a.checkpoints,
                      extra, keep_checkpoints=a.keep_checkpoints)
    rec = train(cfg, executor=executor, dry_run=a.dry_run)
    if not a.dry_run:
        print(json.dumps({k: rec.get(k) for k in ("name", "status", "job_ids", "final_checkpoint") if k in rec},
                         indent=2))
