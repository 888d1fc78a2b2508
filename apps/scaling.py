"""The theory of data pruning (Sorscher et al., "Beyond neural scaling laws", NeurIPS 2022).

``perceptron``: the teacher-student experiment. Inputs x ~ N(0, I_N), labels sign(T . x) from
a teacher T; P = alpha_tot * N examples. A probe (the teacher turned by an angle theta, or a
student trained briefly on a separate sample) gives each example a margin y (probe . x);
keeping the smallest margins is keep-hard, the largest keep-easy. A student is trained on the
kept fraction f (logistic loss, full-batch Adam: on separable data its direction tends to the
max-margin solution of the theory) and its test error is the angle to the teacher / pi.
Every (alpha_tot, f, strategy, seed) of a size is trained at once as one batched problem.

``fit``: power law (error = a * n^-nu) against exponential (error = a * exp(-b n)) by least
squares on log error; ``sweep``: keep-lists of a filter at several fractions (one shared
clustering), optionally trained and evaluated through the normal stages.
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from conceptprune.atomic import atomic_open, save_figure, write_json
from conceptprune.errors import ConfigError

log = logging.getLogger(__name__)

STRATEGIES = ("hard", "easy", "random")


@dataclass
class PerceptronConfig:
    dim: int = 100
    alpha_tot: tuple = (1, 2, 4, 8, 16, 32)
    fractions: tuple = (0.1, 0.2, 0.4, 0.7, 1.0)
    strategies: tuple = STRATEGIES
    theta: float = 0.0  # probe angle to the teacher, degrees
    probe: str = "angle"  # "angle", or "trained": a student trained on probe_alpha * N fresh examples
    probe_alpha: float = 2.0
    seeds: tuple = (0, 1, 2)
    steps: int = 400
    lr: float = 0.05


def _probe(cfg: PerceptronConfig, teacher, g):
    import torch

    n = cfg.dim
    if cfg.probe == "angle":
        u = torch.randn(n, generator=g)
        u -= (u @ teacher) * teacher
        u /= u.norm()
        th = np.deg2rad(cfg.theta)
        return float(np.cos(th)) * teacher + float(np.sin(th)) * u
    if cfg.probe == "trained":
        x = torch.randn(int(cfg.probe_alpha * n), n, generator=g)
        y = torch.sign(x @ teacher)
        w = _train(x[None], y[None], torch.ones(1, len(y)), cfg)[0]
        return w / w.norm()
    raise ConfigError("--probe must be 'angle' or 'trained'")


def _train(x, y, mask, cfg: PerceptronConfig):
    """Logistic-loss students for a batch of (padded) datasets: (B, P, N) -> (B, N)."""
    import torch

    w = torch.zeros(x.shape[0], x.shape[2], requires_grad=True)
    opt = torch.optim.Adam([w], lr=cfg.lr)
    count = mask.sum(1).clamp(min=1)
    scale = 1.0 / np.sqrt(x.shape[2])
    for _ in range(cfg.steps):
        z = y * torch.einsum("bpn,bn->bp", x, w) * scale
        loss = ((torch.nn.functional.softplus(-z) * mask).sum(1) / count).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return w.detach()


def perceptron(cfg: PerceptronConfig) -> list[dict]:
    """One row per (alpha_tot, f, strategy, seed): alpha_prune = f * alpha_tot and the error."""
    import torch

    for f in cfg.fractions:
        if not 0 < f <= 1:
            raise ConfigError(f"fractions must be in (0, 1], got {f}")
    bad = set(cfg.strategies) - set(STRATEGIES)
    if bad:
        raise ConfigError(f"unknown strategies {sorted(bad)} (have {STRATEGIES})")
    rows = []
    for alpha in cfg.alpha_tot:
        p = int(round(alpha * cfg.dim))
        data = []  # per seed: teacher, inputs, labels, probe margins
        for seed in cfg.seeds:
            g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(round(alpha * 1000)))
            teacher = torch.randn(cfg.dim, generator=g)
            teacher /= teacher.norm()
            probe = _probe(cfg, teacher, g)
            x = torch.randn(p, cfg.dim, generator=g)
            y = torch.sign(x @ teacher)
            data.append((seed, teacher, x, y, y * (x @ probe), g))
        for f in cfg.fractions:  # one batch a fraction: every student keeps the same k, no padding
            k = max(1, int(round(f * p)))
            batch = []
            for seed, teacher, x, y, margin, g in data:
                for s in cfg.strategies:
                    if s == "hard":
                        idx = torch.argsort(margin)[:k]
                    elif s == "easy":
                        idx = torch.argsort(margin, descending=True)[:k]
                    else:
                        idx = torch.randperm(p, generator=g)[:k]
                    batch.append((seed, s, x[idx], y[idx], teacher))
            w = _train(torch.stack([b[2] for b in batch]), torch.stack([b[3] for b in batch]),
                       torch.ones(len(batch), k), cfg)
            t = torch.stack([b[4] for b in batch])
            cos = (w / w.norm(dim=1, keepdim=True).clamp(min=1e-12) * t).sum(1).clamp(-1, 1)
            for b, e in zip(batch, (torch.arccos(cos) / np.pi).tolist()):
                rows.append({"alpha_tot": float(alpha), "fraction": float(f), "strategy": b[1], "seed": int(b[0]),
                             "alpha_prune": float(f * alpha), "error": float(e)})
        log.info("alpha_tot %g: %d students trained", alpha, len(cfg.fractions) * len(cfg.seeds) * len(cfg.strategies))
    return rows


def mean_errors(rows: list[dict]) -> dict[tuple, float]:
    """(alpha_tot, fraction, strategy) -> error averaged over seeds."""
    acc: dict[tuple, list] = {}
    for r in rows:
        acc.setdefault((r["alpha_tot"], r["fraction"], r["strategy"]), []).append(r["error"])
    return {k: float(np.mean(v)) for k, v in acc.items()}


def pareto(rows: list[dict], strategy: str = "hard") -> list[tuple[float, float, float]]:
    """Lower envelope over f: (alpha_prune, error, f) points no other point beats with less data."""
    pts = sorted((a * f, e, f) for (a, f, s), e in mean_errors(rows).items() if s == strategy)
    front, best = [], np.inf
    for ap, e, f in pts:
        if e < best:
            front.append((ap, e, f))
            best = e
    return front


# -- fits ----------------------------------------------------------------------------------


def fit(sizes, errors) -> dict:
    """Power law vs exponential, least squares on log(error)."""
    n = np.asarray(sizes, dtype=float)
    e = np.asarray(errors, dtype=float)
    ok = (n > 0) & (e > 0)
    n, e = n[ok], e[ok]
    if len(n) < 3:
        raise ConfigError("a fit needs at least 3 points with positive size and error")
    y = np.log(e)
    out = {"points": int(len(n))}
    for name, x in (("power_law", np.log(n)), ("exponential", n)):
        slope, icpt = np.polyfit(x, y, 1)
        resid = y - (icpt + slope * x)
        r2 = 1 - float((resid ** 2).sum() / max(((y - y.mean()) ** 2).sum(), 1e-300))
        key = "exponent" if name == "power_law" else "rate"
        out[name] = {"a": float(np.exp(icpt)), key: float(-slope), "rss": float((resid ** 2).sum()), "r2": r2}
    out["better"] = "exponential" if out["exponential"]["rss"] < out["power_law"]["rss"] else "power_law"
    return out


def read_points(path: str | Path) -> dict[str, tuple[list, list]]:
    """Series of (size, error) from a perceptron results file (one series per strategy and f,
    plus the Pareto frontier) or from a CSV/JSON of real runs with columns
    size (or kept) and error (or accuracy, read as 1 - accuracy), optionally series."""
    path = Path(path)
    rows = json.loads(path.read_text()) if path.suffix == ".json" else list(csv.DictReader(open(path)))
    if isinstance(rows, dict):
        rows = rows.get("rows", [])
    if rows and "alpha_prune" in rows[0]:
        rows = [{**r, "alpha_tot": float(r["alpha_tot"]), "fraction": float(r["fraction"]),
                 "error": float(r["error"])} for r in rows]
        series = {}
        for (a, f, s), e in sorted(mean_errors(rows).items()):
            series.setdefault(f"{s}, f={f:g}", ([], []))
            series[f"{s}, f={f:g}"][0].append(a * f)
            series[f"{s}, f={f:g}"][1].append(e)
        front = pareto(rows)
        series["pareto (keep hard, best f)"] = ([p[0] for p in front], [p[1] for p in front])
        return series
    series = {}
    for r in rows:
        size = float(r.get("size", r.get("kept", 0)))
        err = float(r["error"]) if "error" in r and r["error"] not in ("", None) else 1 - float(r["accuracy"])
        s = series.setdefault(str(r.get("series", path.stem)), ([], []))
        s[0].append(size)
        s[1].append(err)
    return series


# -- outputs -------------------------------------------------------------------------------


def write_perceptron(rows: list[dict], cfg: PerceptronConfig, out: str | Path) -> list[Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "perceptron.json", {"config": asdict(cfg), "rows": rows})
    with atomic_open(out / "perceptron.csv", "w") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return [out / "perceptron.json", out / "perceptron.csv"] + plot_perceptron(rows, cfg, out)


def plot_perceptron(rows, cfg: PerceptronConfig, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    means = mean_errors(rows)
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(cfg.fractions)))
    fig, axes = plt.subplots(1, len(cfg.strategies), figsize=(4.2 * len(cfg.strategies), 3.8), sharey=True)
    axes = np.atleast_1d(axes)
    for ax, s in zip(axes, cfg.strategies):
        for f, c in zip(cfg.fractions, colors):
            pts = sorted((a * f, means[(a, f, s)]) for a in cfg.alpha_tot if (a, f, s) in means)
            ax.plot(*zip(*pts), "o-", color=c, ms=3, label=f"f = {f:g}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("alpha_prune = f * alpha_tot")
        ax.set_title(f"keep {s}" if s != "random" else "random pruning")
    axes[0].set_ylabel("test error (angle / pi)")
    axes[-1].legend(fontsize=7)
    probe = f"probe at theta = {cfg.theta:g} deg" if cfg.probe == "angle" else "trained probe"
    fig.suptitle(f"teacher-student perceptron, N = {cfg.dim}, {probe}, {len(cfg.seeds)} seeds", fontsize=10)
    fig.tight_layout()
    p1 = out / "error_vs_alpha_prune.png"
    save_figure(fig, p1, dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5.5, 4))
    front = pareto(rows, "hard") if "hard" in cfg.strategies else []
    if "random" in cfg.strategies:
        rnd = sorted((a * f, means[(a, f, "random")]) for (a, f, s) in means if s == "random")
        ax.plot(*zip(*rnd), ".", color="gray", alpha=0.6, label="random pruning (all f)")
        fr = fit(*zip(*rnd))["power_law"]
        xs = np.geomspace(min(p[0] for p in rnd), max(p[0] for p in rnd), 50)
        ax.plot(xs, fr["a"] * xs ** -fr["exponent"], "--", color="gray", label=f"power law, nu = {fr['exponent']:.2f}")
    if front:
        ax.plot([p[0] for p in front], [p[1] for p in front], "o-", color="tab:red", label="Pareto frontier (keep hard)")
        for ap, e, f in front:
            ax.annotate(f"{f:g}", (ap, e), fontsize=6, xytext=(2, 2), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("alpha_prune (examples kept / N)")
    ax.set_ylabel("test error")
    ax.set_title("best f at each dataset size beats the power law", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    p2 = out / "pareto.png"
    save_figure(fig, p2, dpi=120)
    plt.close(fig)
    return [p1, p2]


# -- sweeps over real data -------------------------------------------------------------------


def sweep(pool: str, method: str, fractions: list[float], out: str, *, embedding_key: str = "l14_img",
          shards: str | None = None, train_scale: str | None = None, eval_data: str | None = None,
          tasks: list[str] | None = None, filter_args: dict | None = None, train_args: dict | None = None,
          executor: "Executor | None" = None, command: list[str] | None = None) -> dict:
    """Keep-lists at several fractions sharing one clustering; optionally reshard, train and
    evaluate each through the normal stages, and plot accuracy against the kept fraction.
    ``command``: the command line the keep-lists' manifests record (the CLI's argv)."""
    from conceptprune.filters import registry, run_filter

    sweepable = registry.names(sweep=True)  # filters whose spec takes a --fraction
    if method not in sweepable:
        raise ConfigError(f"--method must be one of {', '.join(sweepable)}")
    spec = registry.get(method)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    fn = spec.fn
    rows = []
    clustering = out / "clustering"
    for f in sorted(fractions):
        keep = out / f"keep_{f:g}.npy"
        extra = dict(filter_args or {})
        if spec.clustering:
            import dataclasses

            from conceptprune.filters.clustering_config import ClusteringConfig

            # the clustering's own settings (clusters, niter, seed, ...) go into its config, one shared folder
            names = {f.name for f in dataclasses.fields(ClusteringConfig)} - {"dir"}
            config = ClusteringConfig(dir=clustering, **{n: extra.pop(n) for n in names if n in extra})
            extra.update(clustering=config)
        if spec.embeddings:
            extra["embedding_key"] = embedding_key
        r = run_filter(fn, pool, keep, fraction=f, command=command, **spec.params_from(extra))
        rows.append({"fraction": f, "kept": len(r.kept), "keep_list": str(keep)})
    if train_scale:
        if not shards:
            raise ConfigError("--train needs --shards (the downloaded shards to reshard)")
        from conceptprune.data.reshard import reshard
        from conceptprune.evaluation.run import evaluate
        from conceptprune.training.launch import TrainConfig, train

        for row in rows:
            data = out / f"shards_{row['fraction']:g}"
            reshard(shards, row["keep_list"], data, overwrite=True, executor=executor)
            rec = train(TrainConfig([str(data)], train_scale, str(out / "runs"), name=f"{method}-{row['fraction']:g}",
                                    **(train_args or {})), executor=executor)
            row["run"] = str(out / "runs" / rec["name"])
            if eval_data:
                res = evaluate(row["run"], eval_data, str(out / "eval" / rec["name"]), tasks=tasks)
                mains = [r["metrics"]["main_metric"] for r in res["results"] if r["metrics"]["main_metric"] is not None]
                row["accuracy"] = float(np.mean(mains)) if mains else None
                row["size"] = row["kept"]
    write_json(out / "sweep.json", rows)
    if any("accuracy" in r for r in rows):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 3.6))
        ax.plot([r["fraction"] for r in rows], [r.get("accuracy") for r in rows], "o-")
        ax.set_xlabel("fraction kept")
        ax.set_ylabel("mean main metric")
        ax.set_title(f"{method}: accuracy against the data kept", fontsize=9)
        fig.tight_layout()
        save_figure(fig, out / "accuracy_vs_fraction.png", dpi=120)
        plt.close(fig)
    return {"rows": rows}
