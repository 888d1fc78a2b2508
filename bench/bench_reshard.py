"""reshard throughput on generated shards with a 30% keep-list, 1 vs 2 workers, next to plain
``tar`` reading the same files (the I/O floor). Samples/s and MB/s, each command's speed as a
ratio to tar's and its wall time as a ratio to 1 worker's (the local executor forks its second
worker from the launcher, which runs the first part itself). The default (fast) path
copies kept samples as byte ranges of each tar; the output is byte-compared with the
member-by-member reference path (run once, 1 worker) and the comparison is reported.
The floor and the commands run ``--repeat`` times, interleaved (floor, 1 worker, 2 workers,
floor, ...) so that they share the machine's load; the fastest run of each is reported, every
run's time is kept. The fixed cost (the same command on a keep-list that matches nothing in
one shard: start-up, executor, assembly) is timed too.
Usage: python bench/bench_reshard.py [--shards 96 --per-shard 2000 --repeat 3]
"""

from __future__ import annotations

import argparse
import filecmp
import io
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import measure, python, save, table  # noqa: E402

STAGE_ONLY = r"""
import sys, time, logging
from pathlib import Path
from conceptprune.data.reshard import ReshardStage
logging.disable(logging.WARNING)
inputs = [str(p) for p in sorted(Path(sys.argv[2]).glob("*.tar"))]
stage = ReshardStage(sys.argv[1], inputs, sys.argv[3])
t = time.perf_counter()
stage.run(0, 1)
print(time.perf_counter() - t)
"""


def make_shards(out: Path, shards: int, per_shard: int) -> list[str]:
    from PIL import Image

    from conceptprune.tars import Sample, ShardWriter

    rng = np.random.default_rng(0)
    out.mkdir(parents=True, exist_ok=True)
    uids = []
    base = [rng.integers(0, 255, (64, 64, 3), dtype=np.uint8) for _ in range(16)]
    jpgs = []
    for b in base:
        buf = io.BytesIO()
        Image.fromarray(b).save(buf, format="JPEG", quality=90)
        jpgs.append(buf.getvalue())  # ~6 KB, like a small web image
    for s in range(shards):
        w = ShardWriter(out / f"{s:08d}.tar")
        for i in range(per_shard):
            uid = f"{int(rng.integers(0, 2**63)):016x}{int(rng.integers(0, 2**63)):016x}"
            uids.append(uid)
            w.write(Sample(f"{s:05d}{i:05d}", {"jpg": jpgs[i % 16], "txt": f"caption {i}".encode(),
                                                "json": json.dumps({"uid": uid, "caption": f"caption {i}"}).encode()}))
        w.close()
        (out / f"{s:08d}_stats.json").write_text(json.dumps({"count": per_shard, "successes": per_shard}))
    return uids


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shards", type=int, default=96)
    ap.add_argument("--per-shard", type=int, default=2000)
    ap.add_argument("--workdir", default="/tmp/cp-bench-reshard")
    ap.add_argument("--repeat", type=int, default=3, help="runs of the floor and of each command (default 3)")
    ap.add_argument("--out", default=None, help="results file (default bench/results/reshard.json)")
    ap.add_argument("--reuse", action="store_true",
                    help="reuse the shards and keep-list a former run left in --workdir (same --shards, --per-shard)")
    args = ap.parse_args()
    work = Path(args.workdir)
    from conceptprune import keeplist as K
    from conceptprune import uids as U

    if not (args.reuse and len(list((work / "in").glob("*.tar"))) == args.shards and (work / "keep.npy").exists()):
        shutil.rmtree(work, ignore_errors=True)
        uids = make_shards(work / "in", args.shards, args.per_shard)
        rng = np.random.default_rng(1)
        K.write_keep_list(work / "keep.npy", U.uids_to_array([u for u in uids if rng.random() < 0.3]))
    shutil.rmtree(work / "one", ignore_errors=True)  # a former run's fixed-cost input
    keep = K.read_keep_list(work / "keep.npy")
    total_mb = sum(p.stat().st_size for p in (work / "in").glob("*.tar")) / 2**20
    n = args.shards * args.per_shard
    rows = []
    load_before = os.getloadavg()
    floor_cmd = ["bash", "-c", f"for f in {work}/in/*.tar; do tar -xOf $f > /dev/null; done"]
    runs = {"floor": [], 1: [], 2: []}
    for _ in range(args.repeat):
        runs["floor"].append(measure(floor_cmd))
        for workers in (1, 2):
            runs[workers].append(reshard_run(work / "in", work / f"out{workers}", workers, work / "keep.npy", len(keep)))
    floor = min(runs["floor"], key=lambda r: r["wall_s"])
    rows.append({"what": "tar -xO (I/O floor)", **timing(runs["floor"], n, total_mb, rss=False)})
    best = {w: min(r["wall_s"] for r in runs[w]) for w in (1, 2)}
    for workers in (1, 2):
        rows.append({"what": f"conceptprune reshard, {workers} worker(s)", **timing(runs[workers], n, total_mb),
                     "ratio_to_tar": round(floor["wall_s"] / best[workers], 3),
                     "time_vs_1_worker": round(best[workers] / best[1], 3)})
    ref = reshard_run(work / "in", work / "ref", 1, work / "keep.npy", len(keep), {"CONCEPTPRUNE_RESHARD_REFERENCE": "1"})
    rows.append({"what": "conceptprune reshard, 1 worker(s) (reference member-by-member path)",
                 **timing([ref], n, total_mb), "ratio_to_tar": round(floor["wall_s"] / ref["wall_s"], 3)})
    one = work / "one"  # the fixed cost: the whole command on one shard, a keep-list matching none of it
    one.mkdir()
    for suffix in (".tar", "_stats.json"):
        os.link(work / "in" / f"00000000{suffix}", one / f"00000000{suffix}")
    K.write_keep_list(work / "none.npy", U.uids_to_array(["f" * 32]))
    fixed = [reshard_run(one, work / "fixed", 1, work / "none.npy", 0) for _ in range(args.repeat)]
    rows.append({"what": "fixed cost: the same command, 1 worker, on 1 shard with a keep-list matching none "
                         "of it (start-up, executor, assembly)", "wall_s": min(r["wall_s"] for r in fixed),
                 "wall_s_runs": [r["wall_s"] for r in fixed], "peak_rss_mib": max(r["peak_rss_mib"] for r in fixed)})
    inner = measure(python(STAGE_ONLY) + [str(work / "stage"), str(work / "in"), str(work / "keep.npy")])
    stage_s = float(inner["stdout"].strip().splitlines()[-1])
    rows.append({"what": "its worker loop alone (1 worker, in-process: no CLI start-up, executor or assembly)",
                 "wall_s": round(stage_s, 3), "samples_per_s": round(n / stage_s),
                 "MB_per_s": round(total_mb / stage_s, 1), "peak_rss_mib": inner["peak_rss_mib"],
                 "ratio_to_tar": round(floor["wall_s"] / stage_s, 3)})
    identical = {"out1 (files)": same_output(work / "ref", work / "out1"),
                 "out2 (sample stream; its shards split differently)": same_stream(work / "ref", work / "out2")}
    load_after = os.getloadavg()
    print(f"{n} samples in {args.shards} shards ({total_mb:.0f} MB), keep-list of {len(keep)} (30%)")
    print(table(rows, ["what", "wall_s", "samples_per_s", "MB_per_s", "peak_rss_mib", "ratio_to_tar",
                       "time_vs_1_worker"]))
    print(f"ratios: 2 workers take x{best[2] / best[1]:.3f} the wall time of 1 worker (goal <= 0.6); "
          f"1 worker runs at x{floor['wall_s'] / best[1]:.3f} of tar -xO's speed (goal >= 0.7)")
    print("byte-identical to the reference path:", identical, "load average before/after:", load_before, load_after)
    payload = {"samples": n, "megabytes": round(total_mb, 1), "kept": len(keep), "repeat": args.repeat,
               "command": " ".join(["python", "bench/bench_reshard.py", *sys.argv[1:]]),
               "byte_identical_to_reference": identical, "loadavg_before": [round(x, 2) for x in load_before],
               "loadavg_after": [round(x, 2) for x in load_after], "cpus": os.cpu_count(), "results": rows}
    if args.out:
        Path(args.out).write_text(json.dumps(payload, indent=2) + "\n")
    print("saved", Path(args.out) if args.out else save("reshard", payload))
    if not all(identical.values()):
        sys.exit("the fast output differs from the reference path")


def reshard_run(shards: Path, out: Path, workers: int, keep: Path, kept: int, env: dict | None = None) -> dict:
    """One ``conceptprune reshard`` as a user runs it, into a fresh ``out``."""
    shutil.rmtree(out, ignore_errors=True)
    r = measure([sys.executable, "-m", "conceptprune.cli", "--quiet", "reshard", "--shards", str(shards),
                 "--keep", str(keep), "--out", str(out), "--workers", str(workers), "--executor", "local"]
                + (["--allow-empty"] if kept == 0 else []), env=env)  # (a list matching nothing is an error)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["kept_samples"] == kept, meta["kept_samples"]
    return r


def timing(runs: list, n: int, total_mb: float, rss: bool = True) -> dict:
    """The fastest of ``runs``: wall time, samples/s, MB/s; the largest peak RSS; every run's
    wall time."""
    best = min(r["wall_s"] for r in runs)
    out = {"wall_s": best, "samples_per_s": round(n / best), "MB_per_s": round(total_mb / best, 1)}
    if rss:
        out["peak_rss_mib"] = max(r["peak_rss_mib"] for r in runs)
    if len(runs) > 1:
        out["wall_s_runs"] = [r["wall_s"] for r in runs]
    return out


def stream_digest(folder: Path) -> str:
    """sha256 of the output's samples in order: each shard's bytes up to its end-of-archive."""
    import hashlib
    import mmap

    from conceptprune.tars import index_plain

    h = hashlib.sha256()
    for tar in sorted(folder.glob("*.tar")):
        with open(tar, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            index = index_plain(tar, buf)
            assert index is not None, f"{tar} is not a plain tar"
            h.update(buf[:index.end[-1]] if len(index) else b"")
    return h.hexdigest()


def same_stream(a: Path, b: Path) -> bool:
    return stream_digest(a) == stream_digest(b)


def same_output(a: Path, b: Path) -> bool:
    """Every file but meta.json (which names its own folder) is byte-identical."""
    names = sorted(p.name for p in a.iterdir() if p.name != "meta.json")
    if names != sorted(p.name for p in b.iterdir() if p.name != "meta.json"):
        return False
    return all(filecmp.cmp(a / x, b / x, shallow=False) for x in names)


if __name__ == "__main__":
    main()
