"""Runs every benchmark in this folder with its defaults, one after another (they each
need the whole machine), and lists the result files. Hours on a laptop: the pools are large.
Usage: python bench/run_all.py [--only reshard,train]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
BENCHES = {
    "clip_score": ["bench_clip_score.py"],
    "dbp": ["bench_concept_filters.py", "--method", "dbp"],
    "semdedup": ["bench_concept_filters.py", "--method", "semdedup", "--clusters", "4000", "--train-sample",
                 "100000", "--niter", "10", "--repeat", "1"],
    "reshard": ["bench_reshard.py"],
    "train": ["bench_train.py", "--repeat", "5", "--samples", "8192"],
    "evaluate": ["bench_evaluate.py"],
    "embed": ["bench_embed.py"],
    "gpu": ["gpu_check.py"],  # needs a CUDA device: only when named (--only gpu)
}
DEFAULT = [n for n in BENCHES if n != "gpu"]


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--only", default=",".join(DEFAULT), help="comma-separated: " + ", ".join(BENCHES) +
                    " (default: all but gpu)")
    args = ap.parse_args()
    names = [n for n in args.only.split(",") if n]
    unknown = sorted(set(names) - set(BENCHES))
    if unknown:
        ap.error(f"unknown benchmark(s) {unknown}; choose from {sorted(BENCHES)}")
    failed = []
    for name in names:
        print(f"== {name}", flush=True)
        if subprocess.run([sys.executable, str(HERE / BENCHES[name][0]), *BENCHES[name][1:]]).returncode:
            failed.append(name)
    print("results:", *sorted(str(p) for p in (HERE / "results").glob("*.json")), sep="\n  ")
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
