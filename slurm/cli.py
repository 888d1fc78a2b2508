"""``conceptprune cluster check|info``: see which executor runs, and that jobs and collectives work."""

from __future__ import annotations

import json

from .options import add_cluster_args, options_from_args


def register(sub) -> None:
    p = sub.add_parser("cluster", help="check the job layer: executor, SLURM, distributed collectives")
    csub = p.add_subparsers(dest="action", metavar="<action>", required=True)
    q = csub.add_parser("info", help="which executor 'auto' resolves to, and the effective cluster options")
    add_cluster_args(q, distributed=True)
    q.set_defaults(func=_info)
    q = csub.add_parser("check", help="run an all_reduce across --nodes x --tasks-per-node tasks (gloo or nccl)")
    add_cluster_args(q, distributed=True)
    q.add_argument("--folder", default="cluster_check", help="folder for the job's logs (default ./cluster_check)")
    q.add_argument("--backend", choices=["auto", "gloo", "nccl"], default="auto",
                   help="torch.distributed backend (default: nccl with GPUs, else gloo)")
    q.set_defaults(func=_check)
    from .status import register as register_status

    register_status(sub)


def _info(args) -> None:
    from .executor import backend_named

    kind, opts = options_from_args(args)
    backend = backend_named(kind)
    print(json.dumps({"executor": backend.name, "backend": backend.describe(opts), "workers": args.workers,
                      "options": opts.as_dict()}, indent=2))


def _check(args) -> int:
    from .diagnostics import allreduce_check
    from .stage import Executor

    kind, opts = options_from_args(args)
    executor = Executor.create(kind, opts.replace(time=args.time or 10))
    results = executor.run_job(allreduce_check, args.backend, folder=args.folder, name="cp-cluster-check")
    for r in sorted(results, key=lambda r: r["rank"]):
        print(f"rank {r['rank']}/{r['world_size']} on {r['node']} (local rank {r['local_rank']}, {r['backend']}): "
              f"all_reduce sum {r['sum']:g} (expected {r['expected']:g}) {'ok' if r['ok'] else 'WRONG'}")
    return 0 if all(r["ok"] for r in results) else 1
