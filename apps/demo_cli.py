"""``conceptprune demo``."""

from __future__ import annotations


def register(sub) -> None:
    from conceptprune.checks import int_arg

    p = sub.add_parser("demo", help="the whole loop on real images (scikit-learn digits), with a report",
                       description="Build a small web-like image-text pool from scikit-learn's digits, download it "
                                   "from a loopback server, train, embed, filter (random, CLIP score, SemDeDup->CLIP "
                                   "score->DBP, negCLIPLoss->NormSim at the same size), reshard, train each with several "
                                   "seeds, evaluate on held-out digits and write DIR/report.html.")
    p.add_argument("--out", default="demo_out", help="output folder (default demo_out)")
    p.add_argument("--seed", type=int, default=0, help="seed of the pool and the filters, and the first training seed "
                   "(default 0)")
    p.add_argument("--seeds", type=int_arg("--seeds", min=1), default=2,
                   help="training seeds per arm: --seed, --seed + 1, ... (default 2)")
    p.add_argument("--ssl", action="store_true", help="also the arm SemDeDup -> CLIP score -> SSL prototypes")
    p.add_argument("--threads", type=int_arg("--threads", min=1), default=2,
                   help="torch/OpenMP threads in every step (default 2); the numbers depend on it, not on the "
                        "machine's cores or load")
    p.add_argument("--quick", action="store_true", help="a much smaller configuration for tests (about 2 minutes on 2 CPU cores; every arm at chance)")
    p.set_defaults(func=_demo)


def _demo(a) -> None:
    from .demo import DemoConfig, run_demo

    run_demo(DemoConfig(out=a.out, seed=a.seed, quick=a.quick, train_seeds=a.seeds, ssl=a.ssl,
                         threads=a.threads, command=tuple(a.command_line)))
