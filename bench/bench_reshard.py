"""reshard throughput on generated shards with a 30% keep-list, 1 vs 2 workers, next to plain
``tar`` reading the same files (the I/O floor). Samples/s and MB/s. The default (fast) path
copies kept samples as byte ranges of each tar; the output is byte-compared with the
member-by-member reference path (run once, 1 worker) and the comparison is reported.
Usage: python bench/bench_reshard.py [--shards 96 --per-shard 2000]
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

    from conceptprune.data.tars import Sample, ShardWriter

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
    ap.add_argument("--out", default=None, help="results file (default bench/results/reshard.json)")
    args = ap.parse_args()
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    uids = make_shards(work / "in", args.shards, args.per_shard)
    from conceptprune import keeplist as K
    from conceptprune import uids as U

    rng = np.random.default_rng(1)
    keep = [u for u in uids if rng.random() < 0.3]
    K.write_keep_list(work / "keep.npy", U.uids_to_array(keep))
    total_mb = sum(p.stat().st_size for p in (work / "in").glob("*.tar")) / 2**20
    n = len(uids)
    rows = []
    load_before = os.getloadavg()
    floor = measure(["bash", "-c", f"for f in {work}/in/*.tar; do tar -xOf $f > /dev/null; done"])
    rows.append({"what": "tar -xO (I/O floor)", "wall_s": floor["wall_s"],
                 "samples_per_s": round(n / floor["wall_s"]), "MB_per_s": round(total_mb / floor["wall_s"], 1)})
    runs = [(1, "out1", {}), (2, "out2", {}), (1, "ref", {"CONCEPTPRUNE_RESHARD_REFERENCE": "1"})]
    for workers, name, env in runs:
        out = work / name
        r = measure([sys.executable, "-m", "conceptprune.cli", "--quiet", "reshard", "--shards", str(work / "in"),
                     "--keep", str(work / "keep.npy"), "--out", str(out), "--workers", str(workers),
                     "--executor", "local"], env=env)
        meta = json.loads((out / "meta.json").read_text())
        assert meta["kept_samples"] == len(keep)
        what = f"conceptprune reshard, {workers} worker(s)" + (" (reference member-by-member path)" if env else "")
        rows.append({"what": what, "wall_s": r["wall_s"],
                     "samples_per_s": round(n / r["wall_s"]), "MB_per_s": round(total_mb / r["wall_s"], 1),
                     "peak_rss_mib": r["peak_rss_mib"], "ratio_to_tar": round(floor["wall_s"] / r["wall_s"], 3)})
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
    print(table(rows, ["what", "wall_s", "samples_per_s", "MB_per_s", "peak_rss_mib", "ratio_to_tar"]))
    print("byte-identical to the reference path:", identical, "load average before/after:", load_before, load_after)
    payload = {"samples": n, "megabytes": round(total_mb, 1), "kept": len(keep),
               "byte_identical_to_reference": identical, "loadavg_before": [round(x, 2) for x in load_before],
               "loadavg_after": [round(x, 2) for x in load_after], "cpus": os.cpu_count(), "results": rows}
    if args.out:
        Path(args.out).write_text(json.dumps(payload, indent=2) + "\n")
    print("saved", Path(args.out) if args.out else save("reshard", payload))
    if not all(identical.values()):
        sys.exit("the fast output differs from the reference path")


def stream_digest(folder: Path) -> str:
    """sha256 of the output's samples in order: each shard's bytes up to its end-of-archive."""
    import hashlib
    import mmap

    from conceptprune.data.tars import index_plain

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
