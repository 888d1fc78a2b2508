"""filter negcliploss end to end vs. its floor: one read of the pool's l14_img / l14_txt plus the
bare batch GEMMs (K x N x B x d multiply-adds: every batch's F_b G_b^T, float32, BLAS on all
cores, on the batches of the documented rule), nothing else (no exp, no sums, no selection).

Ours is the CLI's whole wall time in one process (``--executor inline``: imports, the scan, the
selection, writing the keep-list) and its peak RSS. The floor process times only its read and
its GEMMs.
Usage: python bench/bench_negcliploss.py --rows 200000 --batch-size 4096 --repetitions 2
       (the issue's 4M rows at B = 32768, K = 10 is ~1e15 multiply-adds: hours on a small CPU)
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import floor_row, measure, python, save, table  # noqa: E402

FLOOR = r"""
import glob, json, sys, time, numpy as np
pool, B, K, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
t_read = t_gemm = 0.0
macs = 0
for f, path in enumerate(sorted(glob.glob(pool + "/*.npz"))):
    t0 = time.perf_counter()
    z = np.load(path)
    F = z["l14_img"].astype(np.float32)
    G = z["l14_txt"].astype(np.float32)
    t_read += time.perf_counter() - t0
    n, d = F.shape
    for k in range(1 if B >= n else K):
        perm = np.random.default_rng([seed, f, k]).permutation(n) if B < n else np.arange(n)
        for a in range(0, n, B):
            idx = np.sort(perm[a:a + B])
            Fb, Gb = F[idx], G[idx]
            t0 = time.perf_counter()
            Fb @ Gb.T
            t_gemm += time.perf_counter() - t0
            macs += len(idx) * len(idx) * d
print(json.dumps({"read_s": t_read, "gemm_s": t_gemm, "tmac": macs / 1e12}))
"""


def make_pool(pool: Path, rows: int, files: int) -> None:
    if not (pool / "_planted" / "COMPLETE").exists():
        measure([sys.executable, "-m", "conceptprune.cli", "--quiet", "make-pool", "--out", str(pool), "--rows",
                 str(rows), "--files", str(files), "--embedding-keys", "l14_img,l14_txt", "--overwrite"])


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--files", type=int, default=0, help="files (default: one per 100k rows)")
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--repetitions", type=int, default=2)
    ap.add_argument("--workdir", default="/tmp/cp-bench-ncl")
    ap.add_argument("--runs", type=int, default=1, help="alternate ours and the floor; keep the best of each")
    ap.add_argument("--out", default=None, help="write the result here (default: bench/results/)")
    ap.add_argument("--keep", action="store_true", help="keep the generated pool")
    args = ap.parse_args()
    work = Path(args.workdir)
    pool = work / f"pool_{args.rows}"
    make_pool(pool, args.rows, args.files or max(1, args.rows // 100_000))
    ours_runs, floor_runs = [], []
    for _ in range(args.runs):
        ours_runs.append(measure([sys.executable, "-m", "conceptprune.cli", "--quiet", "filter", "negcliploss",
                                  "--pool", str(pool), "--out", str(work / "ours.npy"), "--fraction", "0.3",
                                  "--batch-size", str(args.batch_size), "--repetitions", str(args.repetitions),
                                  "--backend", "numpy", "--executor", "inline", "--overwrite"]))
        f = measure(python(FLOOR) + [str(pool), str(args.batch_size), str(args.repetitions), "0"])
        floor_runs.append({**json.loads(f["stdout"].strip().splitlines()[-1]), "rss": f["peak_rss_mib"]})
    ours = min(ours_runs, key=lambda r: r["wall_s"])
    fl = min(floor_runs, key=lambda r: r["read_s"] + r["gemm_s"])
    row = floor_row({"rows": args.rows, "B": args.batch_size, "K": args.repetitions}, ours, ours_runs, fl, floor_runs)
    print(table([row], [c for c in row if not c.startswith("all_")]))
    payload = {"benchmark": "filter negcliploss --fraction 0.3 vs read + batch GEMMs", "results": [row]}
    if args.out:
        Path(args.out).write_text(json.dumps(payload, indent=2) + "\n")
    else:
        print("saved", save(f"negcliploss_{args.rows}", payload))
    if not args.keep:
        shutil.rmtree(pool, ignore_errors=True)


if __name__ == "__main__":
    main()
