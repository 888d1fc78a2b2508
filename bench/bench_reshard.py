"""reshard throughput on generated shards with a 30% keep-list, 1 vs 2 workers, next to plain
``tar`` reading the same files (the I/O floor). Samples/s and MB/s.
Usage: python bench/bench_reshard.py [--shards 96 --per-shard 2000]
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import measure, save, table  # noqa: E402


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
    floor = measure(["bash", "-c", f"for f in {work}/in/*.tar; do tar -xOf $f > /dev/null; done"])
    rows.append({"what": "tar -xO (I/O floor)", "wall_s": floor["wall_s"],
                 "samples_per_s": round(n / floor["wall_s"]), "MB_per_s": round(total_mb / floor["wall_s"], 1)})
    for workers in (1, 2):
        out = work / f"out{workers}"
        r = measure([sys.executable, "-m", "conceptprune.cli", "--quiet", "reshard", "--shards", str(work / "in"),
                     "--keep", str(work / "keep.npy"), "--out", str(out), "--workers", str(workers),
                     "--executor", "local"])
        meta = json.loads((out / "meta.json").read_text())
        assert meta["kept_samples"] == len(keep)
        rows.append({"what": f"conceptprune reshard, {workers} worker(s)", "wall_s": r["wall_s"],
                     "samples_per_s": round(n / r["wall_s"]), "MB_per_s": round(total_mb / r["wall_s"], 1),
                     "peak_rss_mib": r["peak_rss_mib"], "ratio_to_tar": round(floor["wall_s"] / r["wall_s"], 3)})
    print(f"{n} samples in {args.shards} shards ({total_mb:.0f} MB), keep-list of {len(keep)} (30%)")
    print(table(rows, ["what", "wall_s", "samples_per_s", "MB_per_s", "peak_rss_mib", "ratio_to_tar"]))
    print("saved", save("reshard", {"samples": n, "megabytes": round(total_mb, 1), "kept": len(keep), "results": rows}))


if __name__ == "__main__":
    main()
