"""The GPU check (issue 17.6), one command: on a CUDA machine

  python bench/gpu_check.py            (writes bench/results/gpu.json)

runs, each beside its baseline in the same process tree:

1. ``search``: the clustering's assignment pass at 4M x 768 (DBP's, k = 100 as in
   bench/results/dbp_k100.json): exact inner-product top-2 search of every row, on the GPU
   through the assignment's own ``torch_search.centroid_index`` (faiss-gpu when importable,
   else torch on CUDA), against the CPU
   floor (faiss IndexFlatIP on all cores, or torch on the CPU, timed on a slice and scaled);
   rows/s and the ratio, and whether the assignments of a checked slice equal the CPU's.
2. ``semdedup``: SemDeDup's pairwise pass (M_j = max_{i<j} <e_i, e_j>) over one 20000-row
   cluster with planted near-duplicates, ``pairwise.exact_column_max`` on the GPU (bf16 GEMM +
   exact recheck from the threshold, and exact everywhere) vs the plain float32 pass on the
   CPU; M must equal the exact CPU computation bit for bit.
3. ``train``: ViT-B/32 (DataComp's small scale) through ``conceptprune train`` vs open_clip's
   main with the same argv on the same synthetic shards; steady samples/s from open_clip's log.
4. ``evaluate``: ``conceptprune evaluate`` over generated tasks; images/s.

It needs no package index: missing pure-Python packages (open_clip_torch, webdataset, ...)
are installed from bench/wheels (made here by bench/prepare_gpu_wheels.sh and carried to the
machine) with ``pip install --no-index --find-links``. ``--device cpu --tiny`` runs a small
version of every step on the CPU (tests/test_bench_smoke.py does, so the check cannot rot).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))
from common import RESULTS, measure, python  # noqa: E402

NEEDED = {"open_clip": "open_clip_torch", "webdataset": "webdataset", "braceexpand": "braceexpand",  # module: wheel
          "ftfy": "ftfy", "wcwidth": "wcwidth", "regex": "regex", "submitit": "submitit",
          "cloudpickle": "cloudpickle", "clip_benchmark": "clip-benchmark", "yaml": "pyyaml", "pandas": "pandas",
          "dateutil": "python-dateutil", "pytz": "pytz", "tzdata": "tzdata", "six": "six"}
INDIRECT = {"six", "pytz", "tzdata"}  # needed only by some pandas/dateutil builds
FULL = {"rows": 4_000_000, "dim": 768, "clusters": 100, "cpu_rows": 200_000, "cluster_rows": 20_000,
        "scale": "small", "train_samples": 4096 * 12, "train_shards": (8, 2000), "max_batch": 1024,
        "eval_samples": 5000, "eval_model": "ViT-B-32"}
TINY = {"rows": 20_000, "dim": 32, "clusters": 16, "cpu_rows": 5_000, "cluster_rows": 1_000,
        "scale": "tiny", "train_samples": 256, "train_shards": (2, 200), "max_batch": 64,
        "eval_samples": 64, "eval_model": "cp-tiny-vit"}


def ensure_packages(wheels: Path) -> list[str]:
    """Install what is missing from the local wheel folder (no index); the names installed."""
    missing = [pkg for mod, pkg in NEEDED.items() if importlib.util.find_spec(mod) is None]
    if not wheels.is_dir() and set(missing) <= INDIRECT:
        return []  # only dependencies of dependencies that this environment does not need (e.g. six)
    if not missing:
        return []
    if not wheels.is_dir():
        sys.exit(f"missing {missing} and no wheel folder {wheels}: run bench/prepare_gpu_wheels.sh where "
                 "there is a package index and carry the folder here")
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--find-links", str(wheels),
                    *missing], check=True)
    importlib.invalidate_caches()
    return missing


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def step_search(cfg: dict, device: str) -> dict:
    """Top-2 inner-product search of every row against k centroids (the assignment pass),
    through the index the assignment itself takes (``torch_search.centroid_index``: faiss-gpu,
    else torch on CUDA); on the CPU check the torch index stands in for it."""
    from filters.clustering import nearest_centroids
    from filters.torch_search import TorchIPIndex, centroid_index

    rng = np.random.default_rng(0)
    c = rng.standard_normal((cfg["clusters"], cfg["dim"]), dtype=np.float32)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    x = rng.standard_normal((cfg["rows"], cfg["dim"]), dtype=np.float32)
    try:
        import faiss
    except ImportError:
        faiss = None
    if device.startswith("cuda"):
        gpu = centroid_index(c, "yes")
        backend = "torch CUDA" if isinstance(gpu, TorchIPIndex) else "faiss-gpu"
    else:
        gpu, backend = TorchIPIndex(c, device), "torch CPU"
    gpu.search(x[:1000], 2)  # warm-up (CUDA context, kernels)
    _sync(device)
    t = time.perf_counter()
    gpu.search(x, 2)
    _sync(device)
    dev_s = time.perf_counter() - t
    if faiss is not None:
        cpu = faiss.IndexFlatIP(cfg["dim"])
        cpu.add(c)
        cpu_backend = f"faiss CPU ({faiss.omp_get_max_threads()} threads)"
    else:
        cpu = TorchIPIndex(c, "cpu")
        cpu_backend = "torch CPU"
    part = x[:cfg["cpu_rows"]]
    t = time.perf_counter()
    cpu.search(part, 2)
    cpu_rate = len(part) / (time.perf_counter() - t)
    norms = np.linalg.norm(part, axis=1)
    c64 = c.astype(np.float64)
    same = bool((nearest_centroids(gpu, c64, part, norms, None) == nearest_centroids(cpu, c64, part, norms, None)).all())
    rate = len(x) / dev_s
    return {"backend": backend, "rows": len(x), "dim": cfg["dim"], "clusters": cfg["clusters"],
            "device_s": round(dev_s, 3), "rows_per_s": round(rate), "cpu_floor": cpu_backend,
            "cpu_rows_per_s": round(cpu_rate), "ratio_to_cpu": round(rate / cpu_rate, 2),
            "assignment_equals_cpu_on_rows": cfg["cpu_rows"] if same else 0, "assignment_equal": same}


def step_semdedup(cfg: dict, device: str) -> dict:
    """SemDeDup's pairwise pass over one cluster: the fast path on ``device`` (pairwise.py's
    auto precision, M exact from the eps threshold 0.95, and everywhere) against the plain
    float32 pass on the CPU (numpy's BLAS); M must equal the exact float32 CPU computation."""
    from filters.pairwise import PairwiseConfig, column_max_upper, exact_column_max

    rng = np.random.default_rng(1)
    e = rng.standard_normal((cfg["cluster_rows"], cfg["dim"]), dtype=np.float32)
    e += 4 * rng.standard_normal(cfg["dim"], dtype=np.float32)  # one cluster: similar rows
    e[1::50] = e[::50][:len(e[1::50])] + 0.05 * rng.standard_normal((len(e[1::50]), cfg["dim"]), dtype=np.float32)
    e /= np.linalg.norm(e, axis=1, keepdims=True)  # near-duplicates every 50 rows
    threshold = 0.95
    fast = PairwiseConfig("auto", device)
    exact_from = {"eps": threshold, "everywhere": -np.inf}
    exact_column_max(e[:512], fast)  # warm-up
    out = {"rows": len(e), "dim": cfg["dim"], "threshold": threshold}
    want = exact_column_max(e, PairwiseConfig("fp32", "cpu"))
    for name, floor in exact_from.items():
        _sync(device)
        t = time.perf_counter()
        got = exact_column_max(e, fast, floor)
        _sync(device)
        high = want >= threshold
        equal = bool((got == want).all()) if floor == -np.inf else bool((got[high] == want[high]).all()
                                                                          and ((got > threshold) == (want > threshold)).all())
        out[name] = {"precision": fast.resolved(exact_everywhere=floor == -np.inf).precision,
                     "device_s": round(time.perf_counter() - t, 4), "equal_to_exact_cpu": equal}
    t = time.perf_counter()
    plain = column_max_upper(e)
    out["cpu_plain_fp32_s"] = round(time.perf_counter() - t, 4)
    out["ratio_to_cpu"] = round(out["cpu_plain_fp32_s"] / out["eps"]["device_s"], 2)
    out["max_abs_diff_to_cpu"] = float(np.abs(plain[1:] - want[1:]).max()) if len(e) > 1 else 0.0
    out["removed_at_threshold"] = int((want > threshold).sum())
    return out


def step_train(cfg: dict, device: str, work: Path) -> dict:
    from bench_reshard import make_shards
    from bench_train import DIRECT, steady_rate

    shards, per = cfg["train_shards"]
    make_shards(work / "shards", shards, per)
    env = {"CUDA_VISIBLE_DEVICES": ""} if device == "cpu" else {}
    name = "ours"
    ours = measure([sys.executable, "-m", "conceptprune.cli", "--quiet", "train", "--data", str(work / "shards"),
                    "--scale", cfg["scale"], "--output", str(work / "runs"), "--name", name, "--executor", "local",
                    "--samples-seen", str(cfg["train_samples"]), "--checkpoints", "1",
                    "--max-batch-per-gpu", str(cfg["max_batch"])], env=env)
    rec = json.loads((work / "runs" / name / "run.json").read_text())
    argv = list(rec["open_clip_argv"])
    argv[argv.index("--name") + 1] = "direct"
    (work / "argv.json").write_text(json.dumps(argv))
    direct = measure(python(DIRECT) + [str(work / "argv.json")], env=env)
    r_ours, r_direct = steady_rate(work / "runs" / name / "out.log"), steady_rate(work / "runs" / "direct" / "out.log")
    return {"scale": cfg["scale"], "samples_seen": cfg["train_samples"], "ours_samples_per_s": r_ours,
            "open_clip_samples_per_s": r_direct, "ratio": round(r_ours / r_direct, 3) if r_direct else None,
            "ours_wall_s": ours["wall_s"], "open_clip_wall_s": direct["wall_s"]}


def step_evaluate(cfg: dict, device: str, work: Path) -> dict:
    import open_clip
    import torch

    from bench_evaluate import TASKS, make_sets
    from conceptprune.models import CONFIG_DIR, register

    tasks = TASKS[:2]
    make_sets(work / "data", cfg["eval_samples"])
    register()
    torch.manual_seed(0)
    model_dir = work / "model"
    model_dir.mkdir(parents=True, exist_ok=True)
    name = cfg["eval_model"]
    torch.save(open_clip.create_model(name).state_dict(), model_dir / "open_clip_pytorch_model.bin")
    model_cfg = (json.loads((CONFIG_DIR / f"{name}.json").read_text()) if name == "cp-tiny-vit"
                 else open_clip.get_model_config(name))
    (model_dir / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg}))
    r = measure([sys.executable, "-m", "conceptprune.cli", "--quiet", "evaluate", "--model",
                 str(model_dir / "open_clip_pytorch_model.bin"), "--arch", f"local-dir:{model_dir}", "--data-dir",
                 str(work / "data"), "--out", str(work / "eval"), "--tasks", *tasks, "--batch-size", "256",
                 "--device", device, "--executor", "local"], env={"HF_HUB_OFFLINE": "1"})
    images = cfg["eval_samples"] * len(tasks)
    return {"model": name, "tasks": tasks, "images": images, "wall_s": r["wall_s"],
            "images_per_s_incl_startup": round(images / r["wall_s"], 1), "peak_rss_mib": r["peak_rss_mib"]}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    ap.add_argument("--tiny", action="store_true", help="small sizes (seconds on a CPU)")
    ap.add_argument("--steps", default="search,semdedup,train,evaluate")
    ap.add_argument("--wheels", default=str(HERE / "wheels"), help="folder of wheels for a machine with no index")
    ap.add_argument("--workdir", default="/tmp/cp-gpu-check")
    ap.add_argument("--out", default=None, help="results file (default bench/results/gpu.json; with --device cpu "
                                                "bench/results/gpu_cpu_check.json)")
    args = ap.parse_args(argv)
    installed = ensure_packages(Path(args.wheels))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device here (use --device cpu --tiny for the CPU version)")
    cfg = TINY if args.tiny else FULL
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    out = {"device": args.device, "tiny": args.tiny, "installed_from_wheels": installed,
           "torch": torch.__version__, "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
           "cpus": os.cpu_count(), "loadavg": [round(v, 2) for v in os.getloadavg()], "steps": {}}
    steps = {"search": lambda: step_search(cfg, args.device), "semdedup": lambda: step_semdedup(cfg, args.device),
             "train": lambda: step_train(cfg, args.device, work / "train"),
             "evaluate": lambda: step_evaluate(cfg, args.device, work / "evaluate")}
    for name in [s for s in args.steps.split(",") if s]:
        if name not in steps:
            ap.error(f"--steps: unknown step {name!r}; choose from {sorted(steps)}")
        t = time.perf_counter()
        out["steps"][name] = {**steps[name](), "step_wall_s": round(time.perf_counter() - t, 2)}
        print(name, json.dumps(out["steps"][name]), flush=True)
    dest = Path(args.out) if args.out else RESULTS / ("gpu.json" if args.device != "cpu" else "gpu_cpu_check.json")
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(out, indent=2) + "\n")
    print("saved", dest)
    return out


if __name__ == "__main__":
    main()
