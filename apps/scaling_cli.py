"""``conceptprune scaling perceptron | fit | sweep``."""

from __future__ import annotations

import json


def _floats(s: str) -> tuple:
    return tuple(float(x) for x in s.split(",") if x.strip())


def register(sub) -> None:
    p = sub.add_parser("scaling", help="data-pruning scaling laws: the perceptron theory, fits, pruning sweeps")
    ssub = p.add_subparsers(dest="action", metavar="<action>", required=True)
    q = ssub.add_parser("perceptron", help="the teacher-student perceptron experiment (Sorscher et al. 2022)",
                        description="Train students on the hardest, easiest or a random fraction f of teacher-labelled "
                                    "Gaussian data; plot test error against alpha_prune and the Pareto frontier.")
    q.add_argument("--dim", type=int, default=100, help="input dimension N (default 100)")
    q.add_argument("--alpha-tot", default="1,2,4,8,16,32", help="examples per dimension before pruning")
    q.add_argument("--fractions", default="0.1,0.2,0.4,0.7,1.0", help="fractions kept")
    q.add_argument("--strategies", default="hard,easy,random", help="which examples are kept")
    q.add_argument("--theta", type=float, default=0.0, help="probe angle to the teacher in degrees (0: perfect metric)")
    q.add_argument("--probe", choices=["angle", "trained"], default="angle",
                   help="angle: the teacher turned by --theta; trained: a student trained on --probe-alpha * N examples")
    q.add_argument("--probe-alpha", type=float, default=2.0, help="examples per dimension for a trained probe")
    q.add_argument("--seeds", default="0,1,2", help="seeds, comma-separated")
    q.add_argument("--steps", type=int, default=400, help="optimisation steps per student (default 400)")
    q.add_argument("--out", required=True, help="output folder (JSON, CSV, plots)")
    q.set_defaults(func=_perceptron)
    q = ssub.add_parser("fit", help="fit power law vs exponential to error-vs-size points",
                        description="Series of (size, error) from perceptron results or from real runs (CSV/JSON with "
                                    "size|kept and error|accuracy, optional series); least squares on log error.")
    q.add_argument("results", nargs="+", help="perceptron.json/.csv or runs CSV/JSON")
    q.add_argument("--min-size", type=float, default=0.0, help="only fit points with size >= this")
    q.set_defaults(func=_fit)
    q = ssub.add_parser("sweep", help="keep-lists of a filter at several fractions (one clustering); optionally "
                                      "reshard, train and evaluate each")
    q.add_argument("--pool", required=True, help="pool folder")
    from conceptprune.filters.registry import names

    q.add_argument("--method", default="dbp", choices=names(sweep=True),
                   help="filter (those of the filter registry that take --fraction)")
    q.add_argument("--fractions", required=True, help="fractions kept, comma-separated")
    q.add_argument("--out", required=True, help="output folder")
    q.add_argument("--embedding-key", default="l14_img", help="npz array with the image embeddings")
    q.add_argument("--clusters", type=int, default=None, help="k for the clustering (default: the filter's)")
    q.add_argument("--train", metavar="SCALE", default=None, help="also train each subset at this scale (tiny, medium..)")
    q.add_argument("--shards", help="downloaded shards to reshard each keep-list from (needed with --train)")
    q.add_argument("--evaluate", metavar="EVAL_DATA", default=None, help="also evaluate each run on these sets")
    q.add_argument("--tasks", nargs="+", help="evaluation task keys (default: all in EVAL_DATA's registry)")
    q.add_argument("--samples-seen", type=int, default=None, help="training samples seen (default: the recipe's)")
    q.set_defaults(func=_sweep)


def _perceptron(a) -> None:
    from .scaling import PerceptronConfig, fit, pareto, perceptron, write_perceptron

    cfg = PerceptronConfig(dim=a.dim, alpha_tot=_floats(a.alpha_tot), fractions=_floats(a.fractions),
                           strategies=tuple(a.strategies.split(",")), theta=a.theta, probe=a.probe,
                           probe_alpha=a.probe_alpha, seeds=tuple(int(s) for s in a.seeds.split(",")), steps=a.steps)
    rows = perceptron(cfg)
    paths = write_perceptron(rows, cfg, a.out)
    front = pareto(rows)
    print("Pareto frontier (alpha_prune, error, best f):")
    for ap, e, f in front:
        print(f"  {ap:8.3g} {e:.4f}  f={f:g}")
    print("written:", ", ".join(str(p) for p in paths))


def _fit(a) -> None:
    from .scaling import fit, read_points

    for path in a.results:
        for name, (sizes, errors) in read_points(path).items():
            pts = [(s, e) for s, e in zip(sizes, errors) if s >= a.min_size]
            if len(pts) < 3:
                continue
            r = fit(*zip(*pts))
            print(f"{path} [{name}]: power law nu = {r['power_law']['exponent']:.3f} (R2 {r['power_law']['r2']:.3f}), "
                  f"exponential rate = {r['exponential']['rate']:.3f} (R2 {r['exponential']['r2']:.3f}) -> "
                  f"{r['better'].replace('_', ' ')} fits better")


def _sweep(a) -> None:
    from .scaling import sweep

    from conceptprune.filters.registry import get

    filter_args = {"clusters": a.clusters} if a.clusters and get(a.method).clustering else {}
    res = sweep(a.pool, a.method, list(_floats(a.fractions)), a.out, embedding_key=a.embedding_key, shards=a.shards,
                train_scale=a.train, eval_data=a.evaluate, tasks=a.tasks, filter_args=filter_args,
                train_args={"samples_seen": a.samples_seen} if a.samples_seen else None, command=a.command_line)
    print(json.dumps(res["rows"], indent=2))
