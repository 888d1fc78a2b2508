"""`conceptprune report` at 1M rows and the uid index's build rate and memory.

1. A generated pool (`make-pool`, B/32 image embeddings only), a chain on it made with the CLI
   (clip-score -> dbp, or clip-score -> semdedup -> dbp with --semdedup) and webdataset shards
   for an evenly spread subset of its rows (report.fixtures.write_shards: real 24 px JPEGs).
   The report is built twice: with the uid index absent (built on the way) and reused; wall
   time, peak RSS (the child's, wait4) and the folder's size on disk; the page is rendered in
   headless Chromium when one is installed (not blank: pixel spread and the plots' colour).
2. The index alone over many tiny samples (a ~300-byte JPEG, a caption and a json each) in
   shards of --per-shard: builds over growing prefixes of the shards with a small and a large
   memory budget (one worker, then two at the largest size): samples/s and peak RSS. The
   small budget's files are compared with the large budget's (one run, the in-memory case).

Usage: python bench/bench_report.py [--rows 1000000 --shard-samples 20000 --index-samples 2000000]
"""

from __future__ import annotations

import argparse
import filecmp
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import measure, save, table  # noqa: E402

CLI = [sys.executable, "-m", "conceptprune.cli", "--quiet", "--log-level", "warning"]

BUILD = r"""
import json, logging, sys
from conceptprune.report.index import build_index
logging.disable(logging.WARNING)
idx = build_index(sys.argv[1], sys.argv[2], workers=int(sys.argv[3]), memory=sys.argv[4])
print(json.dumps(idx.stats))
"""


def du(folder: Path, skip: str | None = None) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and (skip is None or skip not in p.parts))


def cli(*args) -> dict:
    return measure(CLI + [str(a) for a in args])


def tiny_shards(out: Path, samples: int, per_shard: int) -> list[Path]:
    """Shards of tiny samples: 8 distinct ~300-byte JPEGs, a caption, a json with a random uid."""
    from PIL import Image

    from conceptprune.tars import Sample, ShardWriter

    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    jpgs = []
    for c in range(8):
        buf = io.BytesIO()
        Image.new("RGB", (8, 8), (32 * c, 255 - 32 * c, 128)).save(buf, format="JPEG", quality=50)
        jpgs.append(buf.getvalue())
    paths = []
    for s in range(-(-samples // per_shard)):
        n = min(per_shard, samples - s * per_shard)
        hi, lo = rng.integers(0, 2**63, n), rng.integers(0, 2**63, n)
        w = ShardWriter(out / f"{s:08d}.tar")
        for i in range(n):
            uid = f"{int(hi[i]):016x}{int(lo[i]):016x}"
            w.write(Sample(f"{s:05d}{i:05d}", {"jpg": jpgs[i % 8], "txt": b"a tiny caption",
                                               "json": b'{"uid": "%s"}' % uid.encode()}))
        w.close()
        paths.append(out / f"{s:08d}.tar")
    return paths


def subset(tars: list[Path], k: int, folder: Path) -> Path:
    """A folder of symlinks to the first k shards (the index reads *.tar of a folder)."""
    folder.mkdir(parents=True, exist_ok=True)
    for p in tars[:k]:
        (folder / p.name).symlink_to(p)
    return folder


def screenshot(page: Path, shot: Path) -> dict | None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        return None
    from PIL import Image

    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                    "--no-first-run", f"--user-data-dir={shot.parent / 'profile'}", "--hide-scrollbars",
                    "--window-size=1280,2600", f"--screenshot={shot}", page.as_uri()],
                   check=True, capture_output=True, timeout=300)
    px = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    return {"pixel_std": round(float(px.std()), 1),
            "plot_blue_px": int((np.abs(px - [31, 119, 180]).sum(-1) < 40).sum()),
            "kept_green_px": int((np.abs(px - [34, 170, 34]).sum(-1) < 30).sum()),
            "dropped_red_px": int((np.abs(px - [204, 34, 34]).sum(-1) < 30).sum())}


def child(name: str, *args) -> dict:
    """One of this file's helpers in a child process. The benchmark process stays small: a child's
    ru_maxrss starts at its parent's peak (Linux carries it over fork and exec), so every figure
    below has this process's peak as its floor (recorded as bench_process_peak_rss_mib)."""
    return measure([sys.executable, __file__, "_child", name, *map(str, args)])


def _child_main(name: str, args: list[str]) -> None:
    if name == "write_shards":
        from conceptprune.report.fixtures import write_shards

        pool, shards, rows, n, per = args[0], args[1], int(args[2]), int(args[3]), int(args[4])
        sel = np.unique(np.linspace(0, rows - 1, n).astype(np.int64))
        print(write_shards(pool, shards, rows=sel, per_shard=per))
    elif name == "tiny_shards":
        print(len(tiny_shards(Path(args[0]), int(args[1]), int(args[2]))))
    elif name == "dropped":  # per step, the first pool row in the shards that the step dropped
        from conceptprune import keeplist as K
        from conceptprune import uids as U
        from conceptprune.pool import Pool
        from conceptprune.report.index import build_index

        idx = build_index(args[1])
        keeps = [K.read_keep_list(p) for p in args[2:]]
        out = [None] * len(keeps)
        for chunk in Pool(args[0]).iter_chunks([]):
            alive = idx.contains(chunk.uids)
            for i, keep in enumerate(keeps):
                kept = K.member(keep, chunk.uids)[0]
                hit = np.flatnonzero(alive & ~kept)
                if out[i] is None and len(hit):
                    out[i] = U.pair_to_uid(*chunk.uids[hit[0]])
                alive &= kept
            if all(out):
                break
        print(json.dumps(out))
    elif name == "screenshot":
        print(json.dumps(screenshot(Path(args[0]), Path(args[1]))))


def report_part(args, work: Path) -> dict:
    pool, k, shards = work / "pool", work / "keep", work / "shards"
    steps = {}
    steps["make_pool"] = cli("make-pool", "--out", pool, "--rows", args.rows, "--files", 8, "--seed", 0,
                             "--embedding-keys", "b32_img")
    steps["clip_score"] = cli("filter", "clip-score", "--pool", pool, "--out", k / "cs.npy", "--arch", "b32",
                              "--fraction", 0.3)
    chain = [k / "cs.npy"]
    if args.semdedup:
        steps["semdedup"] = cli("filter", "semdedup", "--pool", pool, "--within", k / "cs.npy", "--out",
                                k / "sd.npy", "--embedding-key", "b32_img", "--clusters", 100,
                                "--target-fraction", 0.9)
        chain.append(k / "sd.npy")
    steps["dbp"] = cli("filter", "dbp", "--pool", pool, "--within", chain[-1], "--out", k / "dbp.npy",
                       "--embedding-key", "b32_img", "--clusters", 100, "--fraction", 0.5)
    chain.append(k / "dbp.npy")
    r = child("write_shards", pool, shards, args.rows, args.shard_samples, args.shard_per)
    n_shard, shards_s = int(r["stdout"].split()[-1]), r["wall_s"]
    load = os.getloadavg()
    cold = cli("report", *chain, "--shards", shards, "--out", work / "rep")
    warm = cli("report", *chain, "--shards", shards, "--out", work / "rep2")
    load_after = os.getloadavg()
    meta = json.loads((shards / "_uid_index" / "index.json").read_text())
    dropped = json.loads(child("dropped", pool, shards, *chain)["stdout"].strip().splitlines()[-1])
    explain = {}
    for name, uid in zip([p.stem for p in chain], dropped):
        if uid:
            r = cli("explain", uid, "--chain", *chain, "--shards", shards, "--thumb-dir", work / "ex")
            explain[name] = {"uid": uid, "wall_s": r["wall_s"], "peak_rss_mib": r["peak_rss_mib"],
                             "text": r["stdout"].strip().splitlines()}
    r = child("screenshot", work / "rep" / "index.html", work / "shot.png")
    shot = json.loads(r["stdout"].strip().splitlines()[-1])
    thumbs = len(list((work / "rep" / "thumbs").iterdir()))
    return {
        "pool_rows": args.rows, "chain": [p.name for p in chain],
        "kept": [int(np.load(p, mmap_mode="r").shape[0]) for p in chain],
        "shard_samples": n_shard, "shards": len(list(shards.glob("*.tar"))),
        "shards_mb": round(du(shards, "_uid_index") / 2**20, 1), "write_shards_s": round(shards_s, 1),
        "steps": {name: {"wall_s": r["wall_s"], "peak_rss_mib": r["peak_rss_mib"]} for name, r in steps.items()},
        "report_index_absent": {"wall_s": cold["wall_s"], "peak_rss_mib": cold["peak_rss_mib"],
                                "stdout": cold["stdout"].strip()},
        "report_index_reused": {"wall_s": warm["wall_s"], "peak_rss_mib": warm["peak_rss_mib"]},
        "report_size_mb": round(du(work / "rep") / 2**20, 2),
        "report_files": sum(1 for p in (work / "rep").rglob("*") if p.is_file()),
        "thumbnails": thumbs,
        "index_in_report": {k_: meta[k_] for k_ in ("samples", "build_s", "uids_per_s", "memory_budget", "runs",
                                                     "workers")},
        "chromium_screenshot": shot, "explain_dropped_by_each_step": explain,
        "loadavg_before_reports": [round(x, 2) for x in load],
        "loadavg_after_reports": [round(x, 2) for x in load_after],
    }


def index_part(args, work: Path) -> dict:
    r = child("tiny_shards", work / "tiny", args.index_samples, args.per_shard)
    tars, write_s = sorted((work / "tiny").glob("*.tar")), r["wall_s"]
    per = args.per_shard
    sizes = sorted({max(1, len(tars) // 4), max(1, len(tars) // 2), len(tars)})
    rows = []
    for k in sizes:
        folder = subset(tars, k, work / f"sub{k}")
        for budget, workers in [(args.small_budget, 1), (args.large_budget, 1)] + (
                [(args.small_budget, 2)] if k == sizes[-1] else []):
            out = work / f"idx_{k}_{budget}_{workers}"
            load = os.getloadavg()[0]
            r = measure([sys.executable, "-c", BUILD, str(folder), str(out), str(workers), budget])
            st = json.loads(r["stdout"].strip().splitlines()[-1])
            rows.append({"samples": st["samples"], "shards": k, "budget": budget, "workers": workers,
                         "runs": st["runs"], "wall_s": r["wall_s"], "build_s": st["build_s"],
                         "uids_per_s": st["uids_per_s"], "peak_rss_mib": r["peak_rss_mib"],
                         "index_mb": round(du(out) / 2**20, 1), "load1": round(load, 2)})
    k = sizes[-1]
    names = ("uids.npy", "loc.npy")
    a, b, c = (work / f"idx_{k}_{bud}_{w}" for bud, w in ((args.small_budget, 1), (args.large_budget, 1),
                                                           (args.small_budget, 2)))
    identical = all(filecmp.cmp(a / n, b / n, shallow=False) and filecmp.cmp(c / n, b / n, shallow=False)
                    for n in names)
    return {"samples": args.index_samples, "per_shard": per, "shards_gb": round(du(work / "tiny") / 2**30, 2),
            "write_shards_s": round(write_s, 1), "builds": rows,
            "small_budget_files_identical_to_large_budget": identical}


def main():
    if len(sys.argv) > 2 and sys.argv[1] == "_child":
        return _child_main(sys.argv[2], sys.argv[3:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--shard-samples", type=int, default=20_000, help="pool rows with a sample in the shards")
    ap.add_argument("--shard-per", type=int, default=2_000, help="samples a shard in the report's shards")
    ap.add_argument("--semdedup", action="store_true", help="clip-score -> semdedup -> dbp")
    ap.add_argument("--index-samples", type=int, default=2_000_000, help="tiny samples for the index part (0: skip)")
    ap.add_argument("--per-shard", type=int, default=10_000)
    ap.add_argument("--small-budget", default="32M")
    ap.add_argument("--large-budget", default="1G")
    ap.add_argument("--skip-report", action="store_true")
    ap.add_argument("--workdir", default="/work/report_tmp/bench")
    ap.add_argument("--keep", action="store_true", help="keep the workdir")
    ap.add_argument("--out", default=None, help="results file (default bench/results/report.json)")
    args = ap.parse_args()
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    payload = {"benchmark": "report at 1M rows; uid index build", "cpus": os.cpu_count(),
               "loadavg_start": [round(x, 2) for x in os.getloadavg()]}
    try:
        if not args.skip_report:
            payload["report"] = report_part(args, work / "report")
            print(json.dumps(payload["report"], indent=1))
        if args.index_samples:
            payload["index"] = index_part(args, work / "index")
            print(table(payload["index"]["builds"], ["samples", "shards", "budget", "workers", "runs", "wall_s",
                                                      "uids_per_s", "peak_rss_mib", "index_mb", "load1"]))
            print("identical files for every budget and worker count:",
                  payload["index"]["small_budget_files_identical_to_large_budget"])
    finally:
        import resource

        payload["bench_process_peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        payload["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    if args.out:
        Path(args.out).write_text(json.dumps(payload, indent=2) + "\n")
    print("saved", Path(args.out) if args.out else save("report", payload))
    if "index" in payload and not payload["index"]["small_budget_files_identical_to_large_budget"]:
        sys.exit("the index files depend on the memory budget")


if __name__ == "__main__":
    main()
