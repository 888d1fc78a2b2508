"""Row-count scale run (issue 17, item 4): clip-score -> SemDeDup -> DBP -> keep-list info
through the real CLI, at several pool sizes, with wall time and peak RSS per stage.

The pool: DataComp's files (``<hash>.parquet`` + ``<hash>.npz``, fp16 L2-normalised
``l14_img``), written by the project's generator (``conceptprune/synthetic.py``: its concept
world and its per-file writer, so the planted concepts, near-duplicates and CLIP scores are
make-pool's) at a small embedding width (default 32) with ``--rows-per-file`` rows a file.
Each parquet is then cut down to the two columns this chain reads (``uid``,
``clip_l14_similarity_score``): make-pool's full metadata is ~150 B/row (147 MB a million
rows, random hex uid/url/sha256), 19 GB at 128M rows, which with the embeddings and the
SemDeDup spill does not fit this machine's disk. The largest pool is generated once; a smaller
one is a folder of symlinks to its first files (a row prefix: the same rows, the same order).

Per stage: wall seconds, peak RSS of the whole process tree (the launcher plus the executor's
worker processes, summed, polled from /proc every 0.2 s), the largest single process's peak
(``ru_maxrss`` via wait4), rows/s, the command and the load average before/after.

k policy: SemDeDup k = round(candidates / --rows-per-cluster) (the paper's fixed cluster size,
~8.7k rows: LAION-440M into 50k clusters), so its pairwise pass stays linear in rows while its
assignment grows as N * k = N^2 / rows-per-cluster; DBP k fixed (--dbp-clusters, 100).

    python bench/bench_scale.py --rows 16000000,32000000,128000000 --workdir /work/scale_tmp
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]

CLI = [str(Path(sys.executable).parent / "conceptprune")]
CHILD_ENV = dict(os.environ)
CHILD_CWD = [None]  # with a snapshot: not the repository (``python -m`` puts the cwd first on sys.path)
KEEP_COLUMNS = ["uid", "clip_l14_similarity_score"]
_PAGE = os.sysconf("SC_PAGE_SIZE")


# -- code ---------------------------------------------------------------------------------------

def snapshot_code(rev: str, dest: Path) -> str:
    """The package as committed at ``rev``, laid out as an importable ``conceptprune`` folder
    (pyproject's package-dir mapping), so that a long run is not broken by edits to the shared
    working tree; children get it first on PYTHONPATH (the editable finder comes after sys.path)."""
    import tomllib
    commit = subprocess.run(["git", "rev-parse", rev], cwd=ROOT, capture_output=True, text=True,
                            check=True).stdout.strip()
    if dest.exists():
        shutil.rmtree(dest)
    src = dest / "src"
    src.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", commit], cwd=ROOT, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)
    mapping = tomllib.loads((src / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    pkg = dest / "lib" / "conceptprune"
    shutil.copytree(src / mapping["conceptprune"], pkg)
    for name, folder in mapping.items():
        if name != "conceptprune":
            shutil.copytree(src / folder, pkg / name.split(".", 1)[1])
    CHILD_ENV["PYTHONPATH"] = str(dest / "lib")
    CHILD_CWD[0] = str(dest)
    return commit


# -- pool --------------------------------------------------------------------------------------

def _config(rows: int, files: int, dim: int, seed: int, concepts: int):
    from conceptprune.synthetic import EMBEDDING_DIMS, SyntheticPoolConfig
    return SyntheticPoolConfig(rows=rows, files=files, seed=seed, concepts=concepts,
                               embedding_keys=("l14_img",), dims={k: dim for k in EMBEDDING_DIMS})


def _write_one(args) -> str:
    """File i of the pool: make-pool's concept world, near-duplicates, score model and
    embedding generator (``synthetic._World``, ``synthetic._embeddings``), written with only
    the columns this chain reads (KEEP_COLUMNS) and the ``l14_img`` npz."""
    from conceptprune import synthetic as S
    from conceptprune import uids as U
    from conceptprune.npz import NpzWriter
    out, rows, files, dim, seed, concepts, i = args
    cfg = _config(rows, files, dim, seed, concepts)
    world = S._World(cfg, np.random.default_rng(cfg.seed))
    bounds = np.linspace(0, cfg.rows, cfg.files + 1).astype(np.int64)
    name = hashlib.sha256(f"{cfg.seed}-{i}".encode()).hexdigest()[:32]
    out = Path(out)
    n = int(bounds[i + 1] - bounds[i])
    rng = np.random.default_rng([cfg.seed, i])
    concept = rng.choice(cfg.concepts, size=n, p=world.weights)
    dup_of = S.near_duplicates(n, cfg, rng)  # make-pool's near-duplicates, same rng calls
    has_dup = dup_of >= 0
    concept[has_dup] = concept[dup_of[has_dup]]
    kind = rng.choice(3, size=n, p=[0.8, 0.1, 0.1])
    quality = np.where(kind == 0, rng.uniform(0.4, 1.0, n), rng.uniform(0.0, 0.3, n))
    quality[has_dup] = quality[dup_of[has_dup]]
    scores = {m: np.clip(0.12 + 0.22 * quality + rng.normal(0, 0.02, n), -1, 1).astype(np.float32)
              for m in ("l14", "b32")}
    uid = U.make_array(rng.integers(0, 2 ** 64, n, dtype=np.uint64), rng.integers(0, 2 ** 64, n, dtype=np.uint64))
    with NpzWriter(out / f"{name}.npz", {"l14_img": (n, dim, "float16")}) as w:
        for a in range(0, n, cfg.block_rows):
            b = min(n, a + cfg.block_rows)
            emb = S._embeddings(world, concept[a:b], dup_of[a:b] - a, scores, a, ("l14_img",), rng)
            w.write("l14_img", a, emb["l14_img"])
    table = pa.table({"uid": S._fixed_strings(U.hex_array(uid)),
                      "clip_l14_similarity_score": pa.array(scores["l14"], pa.float32())})
    tmp = out / f"{name}.parquet.tmp"
    pq.write_table(table, tmp, row_group_size=cfg.row_group_size)
    os.replace(tmp, out / f"{name}.parquet")
    return name


def make_scale_pool(out: Path, rows: int, rows_per_file: int, dim: int, seed: int, concepts: int,
                    procs: int, first: int = 0, last: int | None = None) -> dict:
    """Files ``first``..``last`` (exclusive) of the pool of ``rows`` rows (all by default)."""
    files = max(1, -(-rows // rows_per_file))
    last = files if last is None else last
    if first == 0 and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    jobs = [(str(out), rows, files, dim, seed, concepts, i) for i in range(first, last)]
    with ProcessPoolExecutor(procs) as ex:
        names = list(ex.map(_write_one, jobs))
    wall = time.perf_counter() - t0
    return {"rows": rows, "files": files, "names": names, "dim": dim, "seed": seed, "concepts": concepts,
            "generate_wall_s": round(wall, 1)}


def prefix_pool(big: Path, names: list[str], files: int, out: Path) -> None:
    """The first ``files`` files of ``big`` as a pool of their own (symlinks)."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for n in names[:files]:
        for ext in (".parquet", ".npz"):
            os.symlink(big / f"{n}{ext}", out / f"{n}{ext}")


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file() and not p.is_symlink())


# -- measurement -------------------------------------------------------------------------------

def _tree_rss(root: int) -> int:
    """Sum of RSS bytes of ``root`` and all its descendants."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(d))
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        try:
            with open(f"/proc/{pid}/statm") as f:
                total += int(f.read().split()[1]) * _PAGE
        except (OSError, IndexError, ValueError):
            pass
        todo.extend(children.get(pid, ()))
    return total


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def measure(cmd: list[str], log) -> dict:
    load_before = _load()
    t_start = time.time()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=CHILD_ENV,
                            cwd=CHILD_CWD[0])
    peak = [0]
    done = threading.Event()

    def poll():
        while not done.is_set():
            peak[0] = max(peak[0], _tree_rss(proc.pid))
            done.wait(0.2)

    th = threading.Thread(target=poll, daemon=True)
    th.start()
    out_lines = []
    for line in proc.stdout:
        out_lines.append(line)
        log.write(line)
        log.flush()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    done.set()
    th.join()
    rc = os.waitstatus_to_exitcode(status)
    if rc != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({rc}):\n{''.join(out_lines)[-3000:]}")
    return {"wall_s": round(wall, 2), "peak_rss_mib": round(peak[0] / 2 ** 20, 1),
            "max_process_rss_mib": round(usage.ru_maxrss / 1024, 1),
            "load_before": load_before, "load_after": _load(), "command": " ".join(cmd),
            "phases_s": phases("".join(out_lines), t_start, wall), "started_unix": round(t_start, 1),
            "output_tail": "".join(out_lines)[-1500:]}


_MARKS = (("assign", " assign: "), ("shuffle", " shuffle: "), ("dedup", " dedup: "), ("write", " kept "))


def phases(output: str, start: float, wall: float) -> dict:
    """Seconds between the CLI's own log lines (HH:MM:SS, UTC): ``train`` until the assignment
    stage is launched (start-up, reading --within, k-means), then ``assign``, ``shuffle`` and
    ``dedup`` (SemDeDup) until the next, ``write`` from "kept ..." to the end. 1 s resolution."""
    day0 = start - start % 86400
    marks = [("train", start)]
    for line in output.splitlines():
        for name, needle in _MARKS:
            if needle in line and line[:8].count(":") == 2 and name not in dict(marks):
                h, m, sec = (int(x) for x in line[:8].split(":"))
                t = day0 + h * 3600 + m * 60 + sec
                marks.append((name, t + 86400 if t < start - 60 else t))
    marks.append(("end", start + wall))
    return {a: round(max(0.0, tb - ta), 1) for (a, ta), (_, tb) in zip(marks, marks[1:])}


def _entries(keep: Path) -> int:
    return int(np.load(keep, mmap_mode="r").shape[0])


def run_chain(pool: Path, rows: int, work: Path, a, log) -> dict:
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    w = ["--workers", str(a.workers), "--executor", a.executor]
    stages = {}
    clip, sem, dbp = work / "clip.npy", work / "semdedup.npy", work / "dbp.npy"

    log.write(f"\n== {rows} rows: clip-score\n")
    cmd = CLI + ["--quiet", "filter", "clip-score", "--pool", str(pool), "--out", str(clip),
                 "--fraction", str(a.clip_fraction)]
    stages["clip-score"] = {**measure(cmd, log), "input_rows": rows,
                            "parameters": {"fraction": a.clip_fraction}}
    n_clip = _entries(clip)

    k_sem = max(1, round(n_clip / a.rows_per_cluster))
    sample = min(n_clip, a.train_per_centroid * k_sem)  # faiss warns below 39 a centroid
    log.write(f"\n== {rows} rows: semdedup (candidates {n_clip}, k {k_sem})\n")
    cmd = CLI + ["--quiet", "filter", "semdedup", "--pool", str(pool), "--within", str(clip), "--out", str(sem),
                 "--embedding-key", "l14_img", "--eps", str(a.eps), "--clusters", str(k_sem),
                 "--niter", str(a.niter), "--train-sample", str(sample), "--gpu", "no"] + w
    stages["semdedup"] = {**measure(cmd, log), "input_rows": n_clip,
                          "parameters": {"eps": a.eps, "clusters": k_sem, "rows_per_cluster": a.rows_per_cluster,
                                         "niter": a.niter, "train_sample": sample, "workers": a.workers}}
    n_sem = _entries(sem)

    sample = min(n_sem, 1000 * a.dbp_clusters)  # the CLI's default at this k
    log.write(f"\n== {rows} rows: dbp (candidates {n_sem})\n")
    cmd = CLI + ["--quiet", "filter", "dbp", "--pool", str(pool), "--within", str(sem), "--out", str(dbp),
                 "--embedding-key", "l14_img", "--fraction", str(a.dbp_fraction), "--clusters", str(a.dbp_clusters),
                 "--niter", str(a.niter), "--train-sample", str(sample), "--gpu", "no"] + w
    stages["dbp"] = {**measure(cmd, log), "input_rows": n_sem,
                     "parameters": {"fraction": a.dbp_fraction, "clusters": a.dbp_clusters, "niter": a.niter,
                                    "train_sample": sample, "workers": a.workers}}
    n_dbp = _entries(dbp)

    log.write(f"\n== {rows} rows: keep-list info\n")
    cmd = CLI + ["keep-list", "info", str(dbp)]
    stages["keep-list info"] = {**measure(cmd, log), "input_rows": n_dbp, "parameters": {}}

    for s in stages.values():
        # rows/s against the pool's rows (what a user pays per pool row) and against the stage's input
        s["pool_rows_per_s"] = round(rows / s["wall_s"], 1)
        s["input_rows_per_s"] = round(s["input_rows"] / s["wall_s"], 1)
    spill = _du(work)
    return {"rows": rows, "kept": {"clip-score": n_clip, "semdedup": n_sem, "dbp": n_dbp},
            "stages": stages, "work_bytes_at_end": spill}


def fit(results: list[dict]) -> dict:
    """Per stage, least squares wall = a + b * N (+ c * N^2 / rows_per_cluster for SemDeDup's
    assignment, when three sizes allow it): seconds per pool row."""
    out = {}
    if len(results) < 2:
        return out
    n = np.array([r["rows"] for r in results], dtype=np.float64)
    for stage in results[0]["stages"]:
        t = np.array([r["stages"][stage]["wall_s"] for r in results])
        m = np.array([r["stages"][stage]["peak_rss_mib"] for r in results])
        b, a0 = np.polyfit(n, t, 1)
        mb, ma = np.polyfit(n, m, 1)
        out[stage] = {"wall_s_model": f"{a0:.3g} + {b:.4g} * rows", "s_per_row": float(f"{b:.4g}"),
                      "rss_mib_model": f"{ma:.4g} + {mb * 1e6:.4g} * rows/1e6",
                      "rss_bytes_per_row": round(mb * 2 ** 20, 2)}
        if stage == "semdedup" and len(results) >= 3:
            A = np.stack([np.ones_like(n), n, n ** 2], 1)
            coef, *_ = np.linalg.lstsq(A, t, rcond=None)
            out[stage]["wall_s_model_quadratic"] = f"{coef[0]:.3g} + {coef[1]:.4g} * rows + {coef[2]:.4g} * rows^2"
    return out


# Projection to DataComp medium at 768-d. Row-parallel phases (the executor's parts) scale
# perfectly over workers; the launcher's phases (start-up, reading --within, k-means on the
# sample, the global selection, the keep-list) do not. Two models for the width:
#   "x d": every phase that touches embeddings (assign, shuffle, dedup) costs 768/32 times more
#          per row (the assumption; an upper bound: at 32-d these phases are per-row
#          overhead, not bytes or flops);
#   "calibrated": the assignment's k-dependent term, the shuffle and the pairwise pass at the
#          per-row / per-flop rates the 768-d benches measured on this machine
#          (results/semdedup_k4000.json, results/dbp_k100.json), plus our per-row overhead.
ROW_PARALLEL = {"assign", "shuffle", "dedup"}


def _per_row_fit(results: list[dict]) -> dict:
    """SemDeDup's assignment seconds per pool row = a + b * k (2 workers, measured width) from
    the two largest complete sizes (k differs between them: k = candidates / rows-per-cluster)."""
    r1, r2 = results[-2], results[-1]
    y = [r["stages"]["semdedup"]["phases_s"]["assign"] / r["rows"] for r in (r1, r2)]
    k = [r["stages"]["semdedup"]["parameters"]["clusters"] for r in (r1, r2)]
    b = (y[1] - y[0]) / (k[1] - k[0]) if k[1] != k[0] else 0.0
    return {"a": y[1] - b * k[1], "b": b}


def project(res: dict, rows: int = 128_000_000, dim: int = 768, workers=(1, 64)) -> list[dict]:
    """Seconds per stage for ``rows`` pool rows at ``dim`` on each number of workers, from the
    per-row costs of the largest complete size, under both width models (see above)."""
    results = [r for r in res["results"] if r.get("complete", True)]
    big = results[-1]
    w0, d0 = int(res.get("workers", 2)), int(res["pool"]["dim"])
    xd = dim / d0
    f = res["results"][0]["stages"]["clip-score"]["parameters"]["fraction"]
    s = res["results"][0]["stages"]["semdedup"]["parameters"]["rows_per_cluster"]
    cand = f * rows
    k = max(1, round(cand / s))
    fit = _per_row_fit(results)
    sem768 = json.loads((ROOT / "bench" / "results" / "semdedup_k4000.json").read_text())
    dbp768 = json.loads((ROOT / "bench" / "results" / "dbp_k100.json").read_text())
    r768 = sem768["results"][0]
    bd = r768["ours_breakdown_s"]
    b768 = bd["assign"] / (r768["rows"] * r768["k"])  # s per row-centroid, 768-d
    # the 768-d bench times the shuffle and the pairwise pass together: one rate per flop of
    # the pairwise GEMMs (sum of n^2 d over its clusters) for both, the shuffle counted as 0
    shuffle768 = 0.0
    pair768 = next(v for key, v in bd.items() if key.startswith("shuffle+dedup")) / (r768["pairwise_tflop"] * 1e12)
    d4 = dbp768["results"][-1]
    dbp_assign768 = (d4["ours_wall_s"] - d4["floor_train_s"]) / d4["rows"]  # s per row, k = 100
    n0, c0 = big["rows"], big["kept"]["clip-score"]

    def per(stage, phase, per_what):
        return big["stages"][stage]["phases_s"].get(phase, 0.0) / per_what

    out = []
    # (stage, phase, seconds at 128M x measured width, x-d seconds, calibrated seconds)
    terms = [
        ("clip-score", "scan", big["stages"]["clip-score"]["wall_s"] / n0 * rows, None, None),
        ("semdedup", "train", per("semdedup", "train", n0) * rows, None, None),
        ("semdedup", "assign", rows * (fit["a"] + fit["b"] * k), None, rows * (fit["a"] + b768 * k)),
        ("semdedup", "shuffle", per("semdedup", "shuffle", c0) * cand, None, shuffle768 * cand),
        ("semdedup", "dedup", per("semdedup", "dedup", c0) * cand, None, pair768 * cand * s * dim),
        ("semdedup", "write", per("semdedup", "write", c0) * cand, None, None),
        ("dbp", "train", per("dbp", "train", n0) * rows, None, None),
        ("dbp", "assign", per("dbp", "assign", n0) * rows, None, dbp_assign768 * rows),
        ("dbp", "write", per("dbp", "write", n0) * rows, None, None),
        ("keep-list info", "read", big["stages"]["keep-list info"]["wall_s"], None, None),
    ]
    for stage, phase, t32, _, cal in terms:
        par = phase in ROW_PARALLEL
        t_xd = t32 * (xd if par else 1.0)
        t_cal = cal if cal is not None else t_xd
        row = {"stage": stage, "phase": phase, "row_parallel": par, f"{d0}d_{w0}w_s": round(t32, 1)}
        for w in workers:
            scale = w0 / w if par else 1.0
            row[f"xd_{w}w_s"] = round(t_xd * scale, 1)
            row[f"calibrated_{w}w_s"] = round(t_cal * scale, 1)
        out.append(row)
    return [{"rows": rows, "dim": dim, "candidates": int(cand), "semdedup_k": k, "fit": fit,
             "rates_768d": {"assign_s_per_row_centroid": b768, "shuffle_s_per_row": shuffle768,
                            "pairwise_s_per_n2d": pair768, "dbp_assign_s_per_row": dbp_assign768}}] + out


def markdown(res: dict) -> str:
    """The README's two tables from a scale.json."""
    stages = list(res["results"][0]["stages"])
    out = ["| rows | " + " | ".join(f"{s}: s / MiB" for s in stages) + " |", "|---|" + "---|" * len(stages)]
    for r in res["results"]:
        cells = [f"{r['stages'][s]['wall_s']:.0f} / {r['stages'][s]['peak_rss_mib']:.0f}" if s in r["stages"]
                 else "not run" for s in stages]
        out.append(f"| {r['rows'] / 1e6:g}M{'' if r.get('complete', True) else ' (partial)'} | " + " | ".join(cells) + " |")
    head, *terms = project(res)
    out += ["", f"Projection to {head['rows'] / 1e6:g}M rows x {head['dim']}-d (SemDeDup on {head['candidates']:,} "
                f"candidates, k = {head['semdedup_k']}), hours:", "",
            "| stage | phase | row-parallel | x d, 1 worker | x d, 64 workers | calibrated, 1 worker | calibrated, 64 workers |",
            "|---|---|---|---|---|---|---|"]
    tot = {c: 0.0 for c in ("xd_1w_s", "xd_64w_s", "calibrated_1w_s", "calibrated_64w_s")}
    for t in terms:
        for c in tot:
            tot[c] += t[c]
        out.append(f"| {t['stage']} | {t['phase']} | {'yes' if t['row_parallel'] else 'no'} | "
                   + " | ".join(f"{t[c] / 3600:.2f}" for c in tot) + " |")
    out.append("| **total** | | | " + " | ".join(f"**{v / 3600:.1f}**" for v in tot.values()) + " |")
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default="16000000,32000000,128000000", help="pool sizes, comma-separated")
    p.add_argument("--rows-per-file", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=32)
    p.add_argument("--concepts", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--executor", default="local", help="the filters' --executor (local: worker processes)")
    p.add_argument("--gen-procs", type=int, default=2)
    p.add_argument("--clip-fraction", type=float, default=0.03)
    p.add_argument("--eps", type=float, default=0.05)
    p.add_argument("--rows-per-cluster", type=int, default=8700)
    p.add_argument("--dbp-clusters", type=int, default=100)
    p.add_argument("--dbp-fraction", type=float, default=0.5)
    p.add_argument("--niter", type=int, default=10)
    p.add_argument("--train-per-centroid", type=int, default=64, help="SemDeDup's k-means sample per centroid")
    p.add_argument("--workdir", default="/work/scale_tmp")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "scale.json"))
    p.add_argument("--code", default=None, metavar="REV",
                   help="run the CLI from this commit (a snapshot under --workdir) instead of the working tree")
    p.add_argument("--keep", action="store_true", help="keep the pools and outputs (default: deleted)")
    p.add_argument("--table", metavar="JSON", help="print the README tables of a scale.json and exit")
    a = p.parse_args(argv)
    if a.table:
        print(markdown(json.loads(Path(a.table).read_text())))
        return
    sizes = sorted(int(float(x)) for x in a.rows.split(","))
    if any(s % a.rows_per_file for s in sizes[:-1]):
        p.error("every size but the largest must be a multiple of --rows-per-file (row-prefix pools)")
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    log = open(work / "bench_scale.log", "a")
    log.write(f"\n#### {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime())} UTC {' '.join(sys.argv)}\n")
    t_all = time.perf_counter()
    code = snapshot_code(a.code, work / "code") if a.code else "working tree"
    log.write(f"code: {code}\n")
    big = work / "pool_files"  # the largest pool's files; each size is a folder of links to a prefix
    gen = {"rows": sizes[-1], "rows_per_file": a.rows_per_file, "dim": a.dim, "seed": a.seed,
           "concepts": a.concepts, "embedding": f"l14_img fp16 x {a.dim}", "columns": KEEP_COLUMNS,
           "prefix_pools": "a smaller size is the first files of the largest pool (symlinks)",
           "generate": []}
    names, results = [], []
    path = Path(a.out)

    def payload():
        return {
            "what": f"clip-score -> semdedup -> dbp -> keep-list info through the CLI, --workers {a.workers}, "
                    f"{a.executor} executor",
            "code": code, "workers": a.workers,
            "machine": {"cpus": os.cpu_count(), "note": "2-core machine shared with other sessions"},
            "pool": gen,
            "k_policy": {"semdedup": f"k = round(candidates / {a.rows_per_cluster})",
                         "dbp": f"k = {a.dbp_clusters} fixed",
                         "train_sample": f"semdedup min(candidates, {a.train_per_centroid} k); dbp min(candidates, 1000 k)",
                         "niter": a.niter},
            "rss_note": "peak_rss_mib: summed RSS of the command's process tree (launcher + workers), polled every "
                        "0.2 s; max_process_rss_mib: the largest single process (ru_maxrss)",
            "results": results,
            "fit": fit(results),
            "total_wall_s": round(time.perf_counter() - t_all, 1),
        }

    try:
        for rows in sizes:
            # the files this size needs beyond those already written (the pool grows file by file)
            have, need = len(names), -(-rows // a.rows_per_file)
            if need > have:
                load0 = _load()
                g = make_scale_pool(big, sizes[-1], a.rows_per_file, a.dim, a.seed, a.concepts, a.gen_procs,
                                    first=have, last=need)
                names += g["names"]
                gen["generate"].append({"files": [have, need], "wall_s": g["generate_wall_s"],
                                        "load_before": load0, "load_after": _load()})
                log.write(f"generated files {have}..{need} in {g['generate_wall_s']} s\n")
                log.flush()
            pool = work / f"pool_{rows}"
            prefix_pool(big, names, need, pool)
            results.append(run_chain(pool, rows, work / f"out_{rows}", a, log))
            results[-1]["pool_bytes"] = _du(big)
            if not a.keep:
                shutil.rmtree(work / f"out_{rows}", ignore_errors=True)
                shutil.rmtree(pool, ignore_errors=True)
            print(json.dumps({"rows": rows, **{s: [v["wall_s"], v["peak_rss_mib"]]
                                               for s, v in results[-1]["stages"].items()}}), flush=True)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(payload(), indent=2) + "\n")  # after each size: partial results survive
    finally:
        if not a.keep:
            shutil.rmtree(big, ignore_errors=True)
            for rows in sizes:
                shutil.rmtree(work / f"pool_{rows}", ignore_errors=True)
                shutil.rmtree(work / f"out_{rows}", ignore_errors=True)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
