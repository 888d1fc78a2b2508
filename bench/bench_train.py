"""Training throughput: ``conceptprune train --scale tiny --executor local`` vs. calling
open_clip's main directly with the same argv on the same data. Throughput is read from
open_clip's own log (samples/s of the steps after warm-up), so start-up costs do not count.
Usage: python bench/bench_train.py [--samples 16384]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import measure, python, save, table  # noqa: E402

DIRECT = r"""
import sys, json
from conceptprune.models import register
register()
from open_clip_train.main import main
argv = json.load(open(sys.argv[1]))
sys.exit(0 if main(argv) != -1 else 1)
"""


def steady_rate(log: Path) -> float:
    rates = [float(m) for m in re.findall(r"Batch \(t\): [\d.]+, ([\d.]+)/s,", log.read_text())]
    rates = rates[2:] or rates  # skip warm-up steps
    return round(statistics.median(rates), 1)


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--samples", type=int, default=16384)
    ap.add_argument("--workdir", default="/tmp/cp-bench-train")
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    from bench_reshard import make_shards

    make_shards(work / "shards", 4, 1000)
    rows = []
    for i in range(args.repeat):  # alternate to share machine noise
        name = f"ours{i}"
        r = measure([sys.executable, "-m", "conceptprune.cli", "--quiet", "train", "--data", str(work / "shards"),
                     "--scale", "tiny", "--output", str(work / "runs"), "--name", name, "--executor", "local",
                     "--samples-seen", str(args.samples), "--checkpoints", "1"])
        rec = json.loads((work / "runs" / name / "run.json").read_text())
        rows.append({"what": "conceptprune train (local executor)", "samples_per_s": steady_rate(work / "runs" / name / "out.log"),
                     "wall_s": r["wall_s"]})
        argv = list(rec["open_clip_argv"])
        argv[argv.index("--name") + 1] = f"direct{i}"
        (work / "argv.json").write_text(json.dumps(argv))
        d = measure(python(DIRECT) + [str(work / "argv.json")])
        rows.append({"what": "open_clip main, same argv", "samples_per_s": steady_rate(work / "runs" / f"direct{i}" / "out.log"),
                     "wall_s": d["wall_s"]})
    ours = statistics.median(r["samples_per_s"] for r in rows if r["what"].startswith("conceptprune"))
    direct = statistics.median(r["samples_per_s"] for r in rows if r["what"].startswith("open_clip"))
    print(table(rows, ["what", "samples_per_s", "wall_s"]))
    print(f"median samples/s: ours {ours:.1f}, direct {direct:.1f}, ratio {ours / direct:.3f}")
    print("saved", save("train_tiny", {"samples_seen": args.samples, "runs": rows, "ours_samples_per_s": ours,
                                       "direct_samples_per_s": direct, "ratio": round(ours / direct, 3)}))


if __name__ == "__main__":
    main()
