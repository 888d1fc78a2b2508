"""filter normsim --norm inf end to end vs. its floor: one read of the pool's l14_img plus the
bare GEMMs against the target (N x M x d multiply-adds, float32, BLAS on all cores, the same
tile shapes), nothing else (no |.|, no max, no selection).

Ours is the CLI's whole wall time in one process (``--executor inline``) and its peak RSS.
Usage: python bench/bench_normsim.py --rows 100000 --target-rows 20000
       (the issue's 4M rows against a 1.3M-row target is ~4e15 multiply-adds: a GPU's job)
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench_negcliploss import make_pool  # noqa: E402
from common import floor_row, measure, python, save, table  # noqa: E402

FLOOR = r"""
import glob, json, sys, time, numpy as np
pool, target = sys.argv[1], sys.argv[2]
T = np.load(target).astype(np.float32)
CHUNK, BLOCK = 8192, 16384
t_read = t_gemm = 0.0
macs = 0
for path in sorted(glob.glob(pool + "/*.npz")):
    t0 = time.perf_counter()
    X = np.load(path)["l14_img"].astype(np.float32)
    t_read += time.perf_counter() - t0
    out = np.empty((CHUNK, min(BLOCK, len(T))), np.float32)
    for a in range(0, len(X), CHUNK):
        x = X[a:a + CHUNK]
        for b in range(0, len(T), BLOCK):
            blk = T[b:b + BLOCK]
            t0 = time.perf_counter()
            np.matmul(x, blk.T, out=out[:len(x), :len(blk)])
            t_gemm += time.perf_counter() - t0
            macs += len(x) * len(blk) * X.shape[1]
print(json.dumps({"read_s": t_read, "gemm_s": t_gemm, "tmac": macs / 1e12}))
"""


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--target-rows", type=int, default=20_000)
    ap.add_argument("--files", type=int, default=0, help="files (default: one per 100k rows)")
    ap.add_argument("--workdir", default="/tmp/cp-bench-normsim")
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--out", default=None, help="write the result here (default: bench/results/)")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    work = Path(args.workdir)
    pool = work / f"pool_{args.rows}"
    make_pool(pool, args.rows, args.files or max(1, args.rows // 100_000))
    rng = np.random.default_rng(0)
    t = rng.standard_normal((args.target_rows, 768)).astype(np.float32)
    t /= np.linalg.norm(t, axis=1, keepdims=True)
    target = work / "target_train.npy"
    np.save(target, t)
    ours_runs, floor_runs = [], []
    for _ in range(args.runs):
        ours_runs.append(measure([sys.executable, "-m", "conceptprune.cli", "--quiet", "filter", "normsim",
                                  "--pool", str(pool), "--out", str(work / "ours.npy"), "--target", str(target),
                                  "--norm", "inf", "--fraction", "0.2", "--executor", "inline", "--overwrite"]))
        f = measure(python(FLOOR) + [str(pool), str(target)])
        floor_runs.append({**json.loads(f["stdout"].strip().splitlines()[-1]), "rss": f["peak_rss_mib"]})
    ours = min(ours_runs, key=lambda r: r["wall_s"])
    fl = min(floor_runs, key=lambda r: r["read_s"] + r["gemm_s"])
    row = floor_row({"rows": args.rows, "target_rows": args.target_rows}, ours, ours_runs, fl, floor_runs)
    print(table([row], [c for c in row if not c.startswith("all_")]))
    payload = {"benchmark": "filter normsim --norm inf vs read + GEMMs", "results": [row]}
    if args.out:
        Path(args.out).write_text(json.dumps(payload, indent=2) + "\n")
    else:
        print("saved", save(f"normsim_{args.rows}x{args.target_rows}", payload))
    if not args.keep:
        shutil.rmtree(pool, ignore_errors=True)


if __name__ == "__main__":
    main()
