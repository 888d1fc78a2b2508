"""filter dbp / semdedup end to end vs. the floor: bare faiss k-means on the same sample plus
one bare faiss search pass over all embeddings (the work no implementation can skip). For
SemDeDup also a second floor that adds its pairwise similarities (bare float32 GEMMs of the
lower triangle of every cluster of our run, on random rows of the same shapes): exact float32
M needs those flops, and at k=4000 on 4M rows they exceed the search's.

The floor process times only its training and search (not imports, not reading the
sample); ours is the CLI's whole wall time, split into its stages by their completion markers'
times (``breakdown_s``: the first stage from the command's start, each other from the one
before). Peak RSS is the whole process tree's.
Usage: python bench/bench_concept_filters.py --method dbp --rows 1000000,4000000 --clusters 100
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import measure, python, save, table  # noqa: E402

FLOOR = r"""
import glob, json, sys, time, numpy as np, faiss
pool, clus, key = sys.argv[1], sys.argv[2], sys.argv[3]
meta = json.load(open(clus + "/clustering.json"))
rows = np.load(clus + "/train_rows.npy")
files = sorted(glob.glob(pool + "/*.npz"))
parts, offset = [], 0
for f in files:
    arr = np.load(f, mmap_mode="r")[key]
    local = rows[(rows >= offset) & (rows < offset + len(arr))] - offset
    parts.append(np.asarray(arr[local], dtype=np.float32))
    offset += len(arr)
x = np.ascontiguousarray(np.concatenate(parts))
k = meta["k"]
t0 = time.perf_counter()
km = faiss.Kmeans(x.shape[1], k, niter=meta["niter"], seed=meta["seed"], spherical=True,
                  max_points_per_centroid=-(-len(x) // k) + 1, min_points_per_centroid=1)
km.train(x)
t1 = time.perf_counter()
index = faiss.IndexFlatIP(x.shape[1]); index.add(km.centroids)
n = 0
for f in files:
    arr = np.load(f, mmap_mode="r")[key]
    for a in range(0, len(arr), 16384):
        index.search(np.asarray(arr[a:a + 16384], dtype=np.float32), 1)
        n += min(16384, len(arr) - a)
t2 = time.perf_counter()
print(json.dumps({"train_s": t1 - t0, "search_s": t2 - t1, "rows": n}))
"""

# SemDeDup's own unskippable work: for every cluster of our run's assignment, the similarities
# of each member with every earlier one (the lower triangle, in 1024-column strips) as bare
# float32 GEMMs on random rows of the same shape (BLAS on all cores); nothing else
PAIR_FLOOR = r"""
import glob, json, sys, time, numpy as np
clus, dim = sys.argv[1], int(sys.argv[2])
cl = np.concatenate([np.load(p) for p in sorted(glob.glob(clus + "/assign/part-*.cluster.npy"))])
sizes = np.bincount(cl[cl >= 0])
x = np.random.default_rng(0).standard_normal((int(sizes.max()), dim), dtype=np.float32)
t0 = time.perf_counter()
flop = 0
for n in sizes[sizes > 1]:
    for c0 in range(0, n, 1024):
        c1 = min(n, c0 + 1024)
        x[c0:c1] @ x[:c1].T
        flop += 2 * (c1 - c0) * c1 * dim
t = time.perf_counter() - t0
print(json.dumps({"pairwise_s": t, "pairwise_tflop": flop / 1e12, "largest_cluster": int(sizes.max())}))
"""


def stage_breakdown(clustering: Path, started: float, wall: float) -> dict:
    """Seconds per stage of one run of ours, from the mtimes of its stages' part markers
    (``.markers/<stage>/*.json`` in the clustering folder and SemDeDup's work folder)."""
    ends = {}
    for marker in clustering.rglob(".markers/*/*.json"):
        stage = marker.parent.name
        ends[stage] = max(ends.get(stage, 0.0), marker.stat().st_mtime)
    out, before = {}, started
    for stage, end in sorted(ends.items(), key=lambda kv: kv[1]):
        out[stage] = round(end - before, 1)
        before = end
    out["after_last_stage"] = round(started + wall - before, 1)
    if "shuffle" not in out:  # SemDeDup removes the shuffle's markers with its files: its time is the dedup's
        out = {("shuffle+" + k if k.startswith("dedup") else k): v for k, v in out.items()}
    return out


def pairwise_paths() -> dict:
    """The precision and device SemDeDup's pairwise pass takes here (auto), with the eps
    threshold and with M needed everywhere (a target size)."""
    from conceptprune.filters.pairwise import PairwiseConfig

    fast, everywhere = PairwiseConfig().resolved(), PairwiseConfig().resolved(exact_everywhere=True)
    return {"eps": f"{fast.precision} on {fast.device}", "target_fraction": f"{everywhere.precision} on {everywhere.device}"}


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--method", choices=["dbp", "semdedup"], default="dbp")
    ap.add_argument("--rows", default="1000000,4000000")
    ap.add_argument("--clusters", type=int, default=100)
    ap.add_argument("--train-sample", type=int, default=None)
    ap.add_argument("--niter", type=int, default=None)
    ap.add_argument("--rows-per-file", type=int, default=250_000)
    ap.add_argument("--workdir", default="/tmp/cp-bench-concepts")
    ap.add_argument("--keep-pools", action="store_true")
    ap.add_argument("--repeat", type=int, default=3,
                    help="run ours and the floor alternately this many times; report the best of each")
    args = ap.parse_args()
    work = Path(args.workdir)
    results = []
    for rows in [int(r) for r in args.rows.split(",")]:
        pool = work / f"pool_{rows}"
        if not (pool / "_planted" / "COMPLETE").exists():
            measure([sys.executable, "-m", "conceptprune.cli", "--quiet", "make-pool", "--out", str(pool), "--rows",
                     str(rows), "--files", str(max(1, rows // args.rows_per_file)), "--concepts", "200",
                     "--embedding-keys", "l14_img", "--overwrite"])
        out = work / f"{args.method}_{rows}" / "keep.npy"
        shutil.rmtree(out.parent, ignore_errors=True)
        cmd = [sys.executable, "-m", "conceptprune.cli", "--quiet", "filter", args.method, "--pool", str(pool),
               "--out", str(out), "--clusters", str(args.clusters), "--executor", "local", "--workers", "1"]
        cmd += ["--fraction", "0.3"] if args.method == "dbp" else ["--eps", "0.05"]
        if args.train_sample:
            cmd += ["--train-sample", str(args.train_sample)]
        if args.niter:
            cmd += ["--niter", str(args.niter)]
        runs_ours, runs_floor = [], []
        clus = out.with_suffix(".clustering")
        load = [round(v, 2) for v in os.getloadavg()]  # the machine may be shared: say how busy it was
        for _ in range(args.repeat):  # alternate, so that machine noise hits both alike
            shutil.rmtree(out.parent, ignore_errors=True)
            started = time.time()
            runs_ours.append(measure(cmd))
            runs_ours[-1]["breakdown_s"] = stage_breakdown(clus, started, runs_ours[-1]["wall_s"])
            runs_ours[-1]["load_avg_after"] = [round(v, 2) for v in os.getloadavg()]
            floor = measure(python(FLOOR) + [str(pool), str(clus), "l14_img"])
            runs_floor.append({**json.loads(floor["stdout"].strip().splitlines()[-1]), "rss": floor["peak_rss_mib"]})
            if args.method == "semdedup":
                dim = int(json.loads((clus / "clustering.json").read_text())["dim"])
                pair = measure(python(PAIR_FLOOR) + [str(clus), str(dim)])
                runs_floor[-1].update(json.loads(pair["stdout"].strip().splitlines()[-1]))
        ours = min(runs_ours, key=lambda r: r["wall_s"])
        f = min(runs_floor, key=lambda r: r["train_s"] + r["search_s"])
        floor_s = f["train_s"] + f["search_s"]
        meta = json.loads((clus / "clustering.json").read_text())
        results.append({"rows": rows, "k": args.clusters, "train_sample": meta["train_sample"], "niter": meta["niter"],
                        "ours_wall_s": ours["wall_s"], "ours_peak_rss_mib": max(r["peak_rss_mib"] for r in runs_ours),
                        "floor_train_s": round(f["train_s"], 2), "floor_search_s": round(f["search_s"], 2),
                        "floor_peak_rss_mib": f["rss"],
                        "ratio_ours_over_floor": round(ours["wall_s"] / floor_s, 3),
                        "samples_per_s": round(rows / ours["wall_s"]),
                        **({"floor_pairwise_s": round(f["pairwise_s"], 2), "pairwise_tflop": round(f["pairwise_tflop"], 2),
                            "largest_cluster": f["largest_cluster"],
                            "ratio_ours_over_floor_with_pairwise": round(ours["wall_s"] / (floor_s + f["pairwise_s"]), 3)}
                           if "pairwise_s" in f else {}),
                        "all_ours_wall_s": [r["wall_s"] for r in runs_ours],
                        "ours_breakdown_s": ours["breakdown_s"], "ours_load_avg_after": ours["load_avg_after"],
                        "pairwise": pairwise_paths(),
                        "all_floor_s": [round(r["train_s"] + r["search_s"], 2) for r in runs_floor],
                        "load_avg_before": load, "load_avg_after": [round(v, 2) for v in os.getloadavg()],
                        "cpus": os.cpu_count(), "command": " ".join(sys.argv)})
        print(json.dumps(results[-1]), flush=True)
        if not args.keep_pools and rows != int(args.rows.split(",")[-1]):
            pass
    if len(results) > 1:
        growth = results[-1]["ours_peak_rss_mib"] / results[0]["ours_peak_rss_mib"]
        print(f"our peak RSS: x{growth:.3f} from {results[0]['rows']:,} to {results[-1]['rows']:,} rows")
    print(table(results, [c for c in results[0] if not c.startswith(('all_', 'load_', 'command'))]))
    print("saved", save(f"{args.method}_k{args.clusters}", {"benchmark": f"filter {args.method}", "results": results}))


if __name__ == "__main__":
    main()
