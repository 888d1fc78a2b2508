"""``conceptprune demo``: the whole loop on real images, on a laptop, with no internet.

1. A small web-like pool from scikit-learn's handwritten digits (real images that ship with
   the package): augmented 32 px views with captions from varied templates, plus the noise of
   web data: bursts of near-duplicate images, off-topic, empty and wrong-digit captions.
   Held-out digits are kept apart for evaluation.
2. The pool is served on a loopback HTTP server and fetched with ``download`` (img2dataset).
3. ``train`` on the full pool; that model is the encoder for ``embed`` (as one would embed
   with a CLIP model), image and caption embeddings.
4. ``filter``: SemDeDup -> CLIP score -> DBP, and at the same size CLIP score alone (the best
   simple DataComp baseline) and a random subset (SSL prototypes too with ``ssl``); negCLIPLoss ->
   NormSim-inf (the paper's sequential recipe, issue 25) against a target of printed digits set
   aside for it (embedded by the same full-pool model); ``reshard`` each.
5. ``train`` every arm (all data and each subset) with the same number of samples seen and
   several training seeds; ``evaluate`` every run on held-out digits (zero-shot
   classification) and held-out caption retrieval; mean and spread over the seeds.
6. A report (HTML + Markdown + PNG plots) that links the chain's own report (``conceptprune report``).

Every step is the production code path with a small configuration.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import logging
import os
import shutil
import threading
import time
from dataclasses import asdict, dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np

from conceptprune.atomic import atomic_open, write_json

log = logging.getLogger(__name__)

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
TEMPLATES = ["a photo of the digit {w}", "handwritten number {w}", "the number {d} written by hand",
             "a scan of a handwritten {w}", "digit {d}", "a drawing of the numeral {w}",
             "{w}, written with a pen", "a small picture of a {w}"]
OFF_TOPIC = ["click here to subscribe", "IMG_2031.JPG", "free shipping on all orders", "untitled",
             "best deals of the week", "logo", "a photo of my cat", "download now"]
EVAL_TEMPLATES = ["a photo of the digit {c}.", "the handwritten number {c}.", "a drawing of a {c}."]


@dataclass
class DemoConfig:
    out: str = "demo_out"
    seed: int = 0
    views: int = 3  # augmented views of each pool digit
    duplicate_bursts: int = 40  # images copied many times (web duplication)
    burst_size: int = 25
    wrong_captions: float = 0.2  # captions naming another digit
    junk_captions: float = 0.2  # off-topic or empty captions
    held_out: float = 0.3
    keep_fraction: float = 0.35
    samples_seen: int = 40_000  # per training run, every arm and seed
    train_seeds: int = 2  # each arm is trained with seeds seed, seed + 1, ...
    ssl: bool = False  # also the arm SemDeDup -> CLIP score -> SSL prototypes
    target_per_digit: int = 50  # negCLIPLoss -> NormSim: printed-digit target images per digit
    negclip_first: float = 1.5  # negCLIPLoss keeps this x the arms' size, NormSim-inf the size (0.3 N / 0.2 N)
    only: tuple | None = None  # train only these subset arms (the full pool is always trained: it is the encoder)
    threads: int = 2  # torch/OpenMP threads everywhere: the numbers depend on it, not on the machine's cores
    semdedup_keep: float = 0.8  # near-duplicate bursts are ~20% of the pool
    clip_keep: float = 0.75  # image-caption similarity under the full-pool model
    clusters: int = 20
    quick: bool = False  # a much smaller configuration (tests)
    command: tuple | None = None  # the command line the keep-lists' manifests record (the CLI's argv)

    def scaled(self) -> "DemoConfig":
        if not self.quick:
            return self
        return DemoConfig(**{**asdict(self), "views": 1, "duplicate_bursts": 10, "burst_size": 8,
                             "samples_seen": 1024, "clusters": 8,
                             "target_per_digit": 20})


# -- 1. the pool -------------------------------------------------------------------------------


def _augment(img8: np.ndarray, rng: np.random.Generator):
    from PIL import Image

    a = (img8 / 16.0 * 255).astype(np.uint8)
    im = Image.fromarray(a, "L").resize((24, 24), Image.BILINEAR)
    im = im.rotate(float(rng.uniform(-15, 15)), resample=Image.BILINEAR)
    canvas = Image.new("L", (32, 32), 0)
    canvas.paste(im, (int(rng.integers(0, 9)), int(rng.integers(0, 9))))
    fg = np.array(rng.integers(140, 256, 3), dtype=np.float32)
    bg = np.array(rng.integers(0, 90, 3), dtype=np.float32)
    if rng.random() < 0.3:
        fg, bg = bg, fg
    alpha = np.asarray(canvas, dtype=np.float32)[..., None] / 255.0
    rgb = alpha * fg + (1 - alpha) * bg + rng.normal(0, 6, (32, 32, 3))
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), "RGB")


def _jpeg(im) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=92)
    return buf.getvalue()


def build_pool(cfg: DemoConfig, root: Path) -> dict:
    """Pool images (in memory, served later), metadata parquet and held-out digits."""
    import pandas as pd
    from sklearn.datasets import load_digits

    rng = np.random.default_rng(cfg.seed)
    digits = load_digits()
    order = rng.permutation(len(digits.target))
    n_hold = int(cfg.held_out * len(order))
    hold, train = order[:n_hold], order[n_hold:]
    images, rows, truth = {}, [], []

    def add(im, label, caption, kind):
        uid = hashlib.md5(f"{cfg.seed}-{len(rows)}".encode()).hexdigest()
        images[uid] = _jpeg(im)
        rows.append({"uid": uid, "url": f"/{uid}.jpg", "text": caption, "original_width": 32, "original_height": 32,
                     "face_bboxes": []})
        truth.append({"uid": uid, "digit": int(label), "kind": kind})

    for i in train:
        for _ in range(cfg.views):
            y = digits.target[i]
            caption = TEMPLATES[rng.integers(len(TEMPLATES))].format(w=WORDS[y], d=y)
            kind = "clean"
            r = rng.random()
            if r < cfg.junk_captions / 2:
                caption, kind = OFF_TOPIC[rng.integers(len(OFF_TOPIC))], "off-topic caption"
            elif r < cfg.junk_captions:
                caption, kind = "", "empty caption"
            elif r < cfg.junk_captions + cfg.wrong_captions:
                wrong = (y + rng.integers(1, 10)) % 10
                caption = TEMPLATES[rng.integers(len(TEMPLATES))].format(w=WORDS[wrong], d=wrong)
                kind = "wrong digit"
            add(_augment(digits.images[i], rng), y, caption, kind)
    for b in range(cfg.duplicate_bursts):  # the same picture re-posted many times
        i = train[rng.integers(len(train))]
        y = digits.target[i]
        base = np.asarray(_augment(digits.images[i], rng), dtype=np.float32)
        caption = TEMPLATES[rng.integers(len(TEMPLATES))].format(w=WORDS[y], d=y)
        for _ in range(cfg.burst_size):
            from PIL import Image

            im = Image.fromarray(np.clip(base + rng.normal(0, 2, base.shape), 0, 255).astype(np.uint8), "RGB")
            add(im, y, caption, "duplicate")
    meta = root / "metadata"
    meta.mkdir(parents=True, exist_ok=True)
    df = pd.DataFrame(rows)
    for k, part in enumerate(np.array_split(np.arange(len(df)), 2)):
        with atomic_open(meta / f"{k:032x}.parquet", "wb") as f:
            df.iloc[part].to_parquet(f, index=False)
    with atomic_open(root / "truth.parquet", "wb") as f:
        pd.DataFrame(truth).to_parquet(f, index=False)
    return {"images": images, "held_out": hold, "digits": digits, "pool_rows": len(df),
            "kinds": pd.DataFrame(truth)["kind"].value_counts().to_dict()}


class _Server:
    def __init__(self, images: dict[str, bytes]):
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                body = images.get(self.path.strip("/").split(".")[0])
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "image/jpeg")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *a):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __exit__(self, *exc):
        self.httpd.shutdown()


# -- the loop ------------------------------------------------------------------------------


def _step(n: int, title: str) -> None:
    print(f"\n== step {n}: {title}", flush=True)


ARMS = {"full": "all data", "random": "random", "clip-score": "CLIP score",
        "dbp": "SemDeDup -> CLIP score -> DBP", "negclip": "negCLIPLoss -> NormSim",
        "ssl": "SemDeDup -> CLIP score -> SSL prototypes"}
METRICS = (("demo/digits", "acc1", "digits acc1"), ("demo/digit-captions", "mean_recall@5", "caption R@5"))


def summarize(values: list[float]) -> dict:
    """Mean and spread of one metric over the training seeds."""
    v = np.asarray(values, dtype=np.float64)
    return {"values": [float(x) for x in v], "mean": float(v.mean()),
            "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "min": float(v.min()), "max": float(v.max())}


def verdict(summary: dict, a: str = "dbp", b: str = "clip-score", metric: str = "demo/digits") -> str:
    """Does arm ``a`` beat arm ``b`` on ``metric``, given the spread over seeds?"""
    if a not in summary or b not in summary:
        return ""
    x, y = summary[a][metric], summary[b][metric]
    diff = x["mean"] - y["mean"]
    if x["min"] > y["max"]:
        how = f"every {ARMS[a]} seed is above every {ARMS[b]} seed"
    elif x["max"] < y["min"]:
        how = f"every {ARMS[a]} seed is below every {ARMS[b]} seed"
    else:
        how = "the seeds' ranges overlap: no difference at this size and number of seeds"
    label = next(lab for key, _, lab in METRICS if key == metric)
    return f"{ARMS[a]} vs {ARMS[b]}: {diff:+.3f} mean {label} ({how})"


def format_table(summary: dict, seeds: list[int], kept: dict) -> list[str]:
    """The table ``make demo`` prints: per arm and metric, each seed, the mean and min-max."""
    w = max(len(ARMS[a]) for a in summary)
    head = f"{'arm':{w}s} {'kept':>5s}  {'metric':12s} " + " ".join(f"{'s' + str(s):>6s}" for s in seeds)
    lines = [head + f"  {'mean':>6s}  {'min-max':>11s}"]
    for arm, per in summary.items():
        for i, (key, _, label) in enumerate(METRICS):
            m = per[key]
            name, k = (ARMS[arm], f"{kept[arm]:5d}") if i == 0 else ("", " " * 5)
            lines.append(f"{name:{w}s} {k}  {label:12s} " + " ".join(f"{v:6.3f}" for v in m["values"])
                         + f"  {m['mean']:6.3f}  {m['min']:.3f}-{m['max']:.3f}")
    return lines


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def pinned_threads(n: int):
    """``n`` threads for torch and OpenMP here and in the worker processes started meanwhile.
    torch splits its reductions by its thread count (by default the number of cores, whatever
    the load), so the trained weights change with it: pinned, the demo gives the same numbers
    on any number of cores (for the same CPU type and package versions)."""
    import torch

    saved_env, saved_torch = os.environ.get("OMP_NUM_THREADS"), torch.get_num_threads()
    os.environ["OMP_NUM_THREADS"] = str(n)  # read by the training and embedding workers' torch and faiss
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved_torch)
        if saved_env is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = saved_env


def run_demo(cfg: DemoConfig | None = None) -> Path:
    cfg = (cfg or DemoConfig()).scaled()
    with pinned_threads(cfg.threads):
        return _run_demo(cfg)


def _run_demo(cfg: DemoConfig) -> Path:
    import pandas as pd

    from conceptprune.data.download import download
    from conceptprune.data.embed import EmbedStage
    from conceptprune.filters import (clip_score, dbp, negcliploss, normsim, random_subset, run_filter, semdedup,
                                      ssl_prototypes)
    from conceptprune.filters.clustering_config import ClusteringConfig
    from conceptprune.slurm.pipeline import CallStage, Pipeline
    from conceptprune.slurm.stage import Executor
    from conceptprune.training.launch import TrainConfig, train

    executor = Executor.auto()  # SLURM where a controller answers (every step waits for its jobs), else local
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start, timings, counts = time.time(), {}, {}
    seeds = [cfg.seed + i for i in range(cfg.train_seeds)]  # training seeds; the filters use cfg.seed
    arms = ["full"] + [a for a in ARMS if a != "full" and (a != "ssl" or cfg.ssl)
                       and (cfg.only is None or a in cfg.only)]

    def timed(name, fn):
        t = time.time()
        result = fn()
        timings[name] = round(time.time() - t, 1)
        return result

    _step(1, "build a web-like pool from scikit-learn's handwritten digits")
    pool = timed("pool", lambda: build_pool(cfg, out / "web"))
    counts["pool"] = pool["pool_rows"]
    print(f"{pool['pool_rows']} image-caption pairs: {pool['kinds']}; {len(pool['held_out'])} digits held out")

    _step(2, "serve it on a loopback HTTP server and download it with img2dataset")
    meta_dir = out / "web" / "metadata"
    with _Server(pool["images"]) as base:
        # the pool keeps its relative urls (inputs are never rewritten): img2dataset reads a copy
        # of the metadata whose urls point at this server
        served = out / "web" / "served_metadata"
        served.mkdir(parents=True, exist_ok=True)
        for p in sorted(meta_dir.glob("*.parquet")):
            df = pd.read_parquet(p)
            df["url"] = base + df["url"]
            with atomic_open(served / p.name, "wb") as f:
                df.to_parquet(f, index=False)
        # one thread: img2dataset writes samples in the order they finish, so this keeps the
        # shard order, and with it the whole demo, reproducible
        dl = timed("download", lambda: download(out / "data", metadata_dir=served, processes=1, threads=1,
                                                img2dataset_args={"number_sample_per_shard": 1000, "timeout": 5}))
    shards = out / "data" / "shards"
    counts["downloaded"] = dl["successes"]
    print(f"downloaded {dl['successes']} of {dl['count']} into {dl['shards']} shards")

    runs = out / "runs"
    data = {"full": shards}

    def train_config(arm: str, seed: int) -> TrainConfig:
        return TrainConfig([str(data[arm])], "tiny", str(runs), name=f"{arm}-s{seed}", seed=seed,
                           samples_seen=cfg.samples_seen, checkpoints=2)

    _step(3, f"train the tiny CLIP on the full pool, seed {seeds[0]} (it is also the encoder for the filters)")
    full = timed(f"train full s{seeds[0]}", lambda: train(train_config("full", seeds[0]), executor=executor))

    _step(4, "embed images and captions with that model")
    emb = out / "embeddings"
    embed = EmbedStage(str(emb), str(shards), "cp-tiny-vit", full["final_checkpoint"], batch_size=256, text=True)
    timed("embed", lambda: executor.run(embed, 1))

    _step(5, "filter: SemDeDup -> CLIP score -> DBP (the DBP paper's DataComp pipeline); "
             "CLIP score alone and random at the same size")
    filt = out / "filters"
    keep_list = functools.partial(run_filter, command=cfg.command)
    n = counts["downloaded"]
    target = round(cfg.keep_fraction * n)
    sd = timed("semdedup", lambda: keep_list(semdedup, emb, filt / "semdedup.npy", embedding_key="img",
                                              target_fraction=cfg.semdedup_keep,
                                              clustering=ClusteringConfig(clusters=cfg.clusters, niter=30)))
    counts["after semdedup"] = len(sd.uids)
    cs = timed("clip score (chain)", lambda: keep_list(clip_score, emb, filt / "clipscore.npy",
                                                        within=filt / "semdedup.npy", fraction=cfg.clip_keep,
                                                        column="similarity_score"))
    counts["after clip score"] = len(cs.uids)
    frac = min(1.0, target / len(cs.uids))
    d = timed("dbp", lambda: keep_list(dbp, emb, filt / "dbp.npy", embedding_key="img", within=filt / "clipscore.npy",
                                        fraction=frac, clustering=ClusteringConfig(dir=filt / "semdedup.clustering"),
                                        neighbors=min(20, cfg.clusters - 1)))
    size = len(d.uids)  # every subset arm keeps this many
    counts["semdedup -> clip score -> dbp"] = size
    r = timed("random", lambda: keep_list(random_subset, emb, filt / "random.npy", fraction=size / n, seed=cfg.seed))
    counts["random"] = len(r.uids)
    # DataComp's rule keeps the rows scoring >= the score at index int(N f): f = (size - 0.5) / N keeps `size`
    c = timed("clip score", lambda: keep_list(clip_score, emb, filt / "clip-score.npy", fraction=(size - 0.5) / n,
                                               column="similarity_score"))
    counts["clip score alone"] = len(c.uids)
    if cfg.ssl:
        s = timed("ssl prototypes", lambda: keep_list(
            ssl_prototypes, emb, filt / "ssl.npy", embedding_key="img", within=filt / "clipscore.npy",
            fraction=size / len(cs.uids), clustering=ClusteringConfig(dir=filt / "semdedup.clustering")))
        counts["semdedup -> clip score -> ssl prototypes"] = len(s.uids)
    kept = {"full": n, "random": len(r.uids), "clip-score": len(c.uids), "dbp": size}
    if cfg.ssl:
        kept["ssl"] = len(s.uids)
    if "negclip" in arms:  # the paper's sequential recipe on the demo's own embeddings (keys img / txt)
        target = timed("normsim target", lambda: build_target(out / "targets" / "printed_digits.npy",
                                                              full["final_checkpoint"], cfg))
        first = min(n, round(cfg.negclip_first * size))
        nc = timed("negcliploss", lambda: keep_list(negcliploss, emb, filt / "negcliploss.npy", keep_count=first,
                                                     arch="embed", seed=cfg.seed))
        counts["negcliploss"] = len(nc.uids)
        ns = timed("normsim", lambda: keep_list(normsim, emb, filt / "negclip.npy", within=filt / "negcliploss.npy",
                                                 target=str(target), norm="inf", keep_count=size, arch="embed"))
        counts["negcliploss -> normsim"] = kept["negclip"] = len(ns.uids)
        print(f"negCLIPLoss kept {len(nc.uids)}, then NormSim-inf {len(ns.uids)} "
              f"(target: {target.name}, printed digits never in the pool or the evaluation)")
    print(f"SemDeDup kept {len(sd.uids)}, CLIP score {len(cs.uids)}, DBP {size}; random {len(r.uids)}, "
          f"CLIP score alone {len(c.uids)}" + (f", SSL prototypes {kept['ssl']}" if cfg.ssl else ""))

    _step(6, f"one pipeline: reshard each keep-list, train every arm with seeds {seeds} (the same "
             f"{cfg.samples_seen:,} samples seen), evaluate every run on held-out digits")
    evalsets = out / "evalsets"
    build_evalsets(evalsets, pool["digits"], pool["held_out"], cfg.seed)
    pipe = Pipeline(out / "pipeline")

    def add(name, target, kwargs, after=()):
        pipe.add(name, CallStage(str(out / "pipeline" / name), target, kwargs, name=name), after=after)

    for arm in arms[1:]:
        data[arm] = out / "data" / f"shards_{arm}"
        add(f"reshard-{arm}", "conceptprune.data.reshard:reshard",
            {"shards": str(shards), "keep": str(filt / f"{arm}.npy"), "out": str(data[arm]), "shard_size": 1000,
             "overwrite": True})
    for seed in seeds:
        for arm in arms:
            if (arm, seed) != ("full", seeds[0]):
                add(f"train-{arm}-s{seed}", "conceptprune.training.launch:train", {"cfg": train_config(arm, seed)},
                    after=[f"reshard-{arm}"] if arm != "full" else [])
    for arm in arms:
        for seed in seeds:
            name = f"{arm}-s{seed}"
            trained = [f"train-{name}"] if (arm, seed) != ("full", seeds[0]) else []
            add(f"evaluate-{name}", "conceptprune.evaluation.run:evaluate",
                {"model": str(runs / name), "data_dir": str(evalsets), "output": str(out / "eval" / name),
                 "tasks": [k for k, _, _ in METRICS]}, after=trained)
    steps = timed("pipeline (reshard, train, evaluate)", lambda: pipe.run(executor))
    for name, res in steps.items():  # each step's own time, from its marker
        if res.summaries and isinstance(res.summaries[0], dict) and "wall_s" in res.summaries[0]:
            timings[name.replace("-", " ", 1)] = round(res.summaries[0]["wall_s"], 1)
    from conceptprune.evaluation.run import read_results

    results = {arm: {seed: {r["key"]: r["metrics"] for r in read_results(out / "eval" / f"{arm}-s{seed}" /
                                                                           "eval_results.jsonl")}
                     for seed in seeds} for arm in arms}
    summary = {arm: {key: summarize([results[arm][s][key][metric] for s in seeds]) for key, metric, _ in METRICS}
               for arm in arms}
    table = format_table(summary, seeds, kept)
    print("\n" + "\n".join(table))
    answer = verdict(summary)
    print(answer)
    more = [v for v in (verdict(summary, "negclip", "dbp"), verdict(summary, "negclip", "clip-score")) if v]
    for line in more:
        print(line)

    _step(8, "write the reports (the chain's own report first: the demo's report links it)")
    from conceptprune.report.html import write_report as write_chain_report

    chain = timed("chain report", lambda: write_chain_report(
        [filt / "semdedup.npy", filt / "clipscore.npy", filt / "dbp.npy"], out / "chain_report", shards=shards,
        compare=[filt / "clip-score.npy"]))
    fingerprints = {f"filters/{p.name}": _sha256(p) for p in sorted(filt.glob("*.npy"))}
    fingerprints.update({f"targets/{p.name}": _sha256(p) for p in sorted((out / "targets").glob("*.npy"))})
    fingerprints.update({f"runs/{a}-s{s}": _sha256(Path(train_ckpt(runs / f"{a}-s{s}"))) for a in arms for s in seeds})
    timings["total"] = round(time.time() - t_start, 1)
    from .demo_report import write_report

    path = write_report(out, cfg, counts, timings, results, pool["kinds"], summary=summary, seeds=seeds, kept=kept,
                        table=table, answer=answer, fingerprints=fingerprints, arms=ARMS, metrics=METRICS,
                        more=more)
    print(f"\nreport: {path} (and report.md); chain report: {out / 'chain_report' / 'index.html'} "
          f"({chain['bytes'] / 1e6:.1f} MB); total {timings['total']:.0f} s")
    return path


def printed_digit(y: int, rng: np.random.Generator) -> np.ndarray:
    """An 8 x 8 image of the printed digit ``y`` in scikit-learn's format (0..16): Pillow's own
    font at a random size and stroke, cropped and box-filtered to 7 rows. Not a handwritten digit,
    so never one of the pool's or the evaluation's."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=int(rng.integers(18, 30)))
    im = Image.new("L", (48, 48), 0)
    ImageDraw.Draw(im).text((8, 4), str(y), fill=255, font=font, stroke_width=int(rng.integers(0, 2)), stroke_fill=255)
    ys, xs = np.nonzero(np.asarray(im))
    crop = im.crop((int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1))
    small = crop.resize((min(8, max(1, round(crop.width * 6 / crop.height))), 7), Image.BOX)
    grid = np.zeros((8, 8))
    x0 = (8 - small.width) // 2
    grid[1:, x0:x0 + small.width] = np.asarray(small, dtype=np.float64) / 255 * 16
    return grid


def build_target(path: Path, checkpoint: str, cfg: DemoConfig) -> Path:
    """NormSim's target for the demo: ``target_per_digit`` printed digits of each class, through
    the pool's augmentation and JPEG, embedded (L2-normalised image embeddings) by the same
    full-pool model and ``Encoder`` as the pool. Their own seeded stream ([seed, 25]): every other
    arm's numbers are those of a demo without this arm. A manifest beside it says what it is."""
    from PIL import Image

    from conceptprune.data.embed import Encoder

    rng = np.random.default_rng([cfg.seed, 25])
    labels = np.repeat(np.arange(10), cfg.target_per_digit)
    encoder = Encoder("cp-tiny-vit", checkpoint)  # as EmbedStage builds it
    tensors = []
    for y in labels:
        im = _augment(printed_digit(int(y), rng), rng)
        with Image.open(io.BytesIO(_jpeg(im))) as decoded:
            tensors.append(encoder.preprocess(decoded.convert("RGB")))
    emb = np.concatenate([encoder.images(tensors[a:a + 256]) for a in range(0, len(tensors), 256)]).astype(np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path, "wb") as f:
        np.save(f, emb)
    write_json(path.with_suffix(".json"), {
        "what": "NormSim target of the demo: image embeddings of printed digits (Pillow's font, 8 x 8 like "
                "scikit-learn's digits, the pool's augmentation), a train-like set of the digits task; "
                "none of them is in the pool or among the held-out evaluation digits",
        "rows": int(len(emb)), "per_digit": cfg.target_per_digit, "labels": "0-9, in blocks of per_digit",
        "model": "cp-tiny-vit", "normalised": True, "rng": [cfg.seed, 25],
        # relative to this file: an absolute path could hold any word (NormSim warns on 'test' here)
        "checkpoint": os.path.relpath(checkpoint, path.parent), "checkpoint_sha256": _sha256(Path(checkpoint))})
    return path


def train_ckpt(run_dir: Path) -> str:
    """The run's final checkpoint (what evaluate reads)."""
    return json.loads((Path(run_dir) / "run.json").read_text())["final_checkpoint"]


def build_evalsets(root: Path, digits, held_out: np.ndarray, seed: int) -> None:
    """Held-out digits: zero-shot classification and caption retrieval, as your own tasks."""
    from conceptprune.evaluation.wds import write_classification, write_retrieval

    rng = np.random.default_rng(seed + 1)
    images = [_augment(digits.images[i], rng) for i in held_out]
    labels = digits.target[held_out]
    write_classification(root / "demo-digits", images, labels, WORDS, EVAL_TEMPLATES, nshards=2)
    write_json(root / "demo-digits" / "task.json", {"key": "demo/digits", "name": "Digits (held-out, zero-shot)",
                                                    "type": "zeroshot_classification", "main_metric": "acc1"})
    # captions name only the digit, so 100 images (10 of each digit) and recall@5 keep it informative
    n = min(100, len(images))
    captions = [[TEMPLATES[j].format(w=WORDS[y], d=y) for j in rng.choice(len(TEMPLATES), 2, replace=False)]
                for y in labels[:n]]
    write_retrieval(root / "demo-digit-captions", images[:n], captions)
    write_json(root / "demo-digit-captions" / "task.json",
               {"key": "demo/digit-captions", "name": "Digit captions (held-out retrieval, 100 images)",
                "type": "retrieval", "main_metric": "mean_recall@5"})
