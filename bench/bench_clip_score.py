"""clip-score --fraction 0.3: conceptprune (streamed) vs. a whole-column pandas/numpy baseline.

The baseline is DataComp's own approach (baselines/filters.py): load uid + score for the whole
pool with pandas, sort the scores, take the threshold, convert the kept uids to u8,u8, sort, save.
Usage: python bench/bench_clip_score.py [--rows 1000000,10000000] [--workdir /tmp/cp-bench]
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import measure, python, save, table  # noqa: E402

BASELINE = r"""
import glob, sys, numpy as np, pandas as pd
files = sorted(glob.glob(sys.argv[1] + "/*.parquet"))
df = pd.concat([pd.read_parquet(f, columns=["uid", "clip_l14_similarity_score"]) for f in files], ignore_index=True)
scores = df["clip_l14_similarity_score"].to_numpy()
threshold = -np.sort(-scores)[int(len(scores) * 0.3)]
uids = df["uid"][scores >= threshold]
arr = np.array([(int(u[:16], 16), int(u[16:32], 16)) for u in uids], np.dtype("u8,u8"))
arr.sort()
np.save(sys.argv[2], arr)
"""


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rows", default="1000000,10000000")
    ap.add_argument("--files", type=int, default=0, help="files per pool (default: one per 1M rows)")
    ap.add_argument("--workdir", default="/tmp/cp-bench-clip")
    ap.add_argument("--keep", action="store_true", help="keep the generated pools")
    args = ap.parse_args()
    work = Path(args.workdir)
    rows_list = [int(r) for r in args.rows.split(",")]
    results = []
    for rows in rows_list:
        pool = work / f"pool_{rows}"
        if not (pool / "_planted" / "COMPLETE").exists():
            files = args.files or max(1, rows // 1_000_000)
            measure([sys.executable, "-m", "conceptprune.cli", "--quiet", "make-pool", "--out", str(pool),
                     "--rows", str(rows), "--files", str(files), "--embedding-keys", "", "--overwrite"])
        ours = measure([sys.executable, "-m", "conceptprune.cli", "--quiet", "filter", "clip-score", "--pool",
                        str(pool), "--out", str(work / f"ours_{rows}.npy"), "--fraction", "0.3", "--overwrite"])
        base = measure(python(BASELINE) + [str(pool), str(work / f"base_{rows}.npy")])
        same = np.array_equal(np.load(work / f"ours_{rows}.npy"), np.load(work / f"base_{rows}.npy"))
        results.append({"rows": rows, "ours_wall_s": ours["wall_s"], "ours_peak_rss_mib": ours["peak_rss_mib"],
                        "baseline_wall_s": base["wall_s"], "baseline_peak_rss_mib": base["peak_rss_mib"],
                        "wall_ratio_base_over_ours": round(base["wall_s"] / ours["wall_s"], 2),
                        "rss_ratio_base_over_ours": round(base["peak_rss_mib"] / ours["peak_rss_mib"], 2),
                        "identical_keep_lists": bool(same)})
        if not args.keep:
            shutil.rmtree(pool, ignore_errors=True)
    if len(results) > 1:
        growth = results[-1]["ours_peak_rss_mib"] / results[0]["ours_peak_rss_mib"]
        print(f"our peak RSS grows x{growth:.2f} from {rows_list[0]:,} to {rows_list[-1]:,} rows")
    print(table(results, list(results[0])))
    print("saved", save("clip_score", {"benchmark": "clip-score --fraction 0.3", "results": results}))


if __name__ == "__main__":
    main()
