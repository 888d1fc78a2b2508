"""Evaluation wall time on 6 generated tasks: ``conceptprune evaluate`` (model loaded once, all
tasks in one process) vs. clip_benchmark's CLI run once per task on the same model and data.
Usage: python bench/bench_evaluate.py [--samples 2000]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import measure, save, table  # noqa: E402

TASKS = ["cifar10", "mnist", "stl10", "gtsrb", "vtab/eurosat", "vtab/dtd"]


def make_sets(root: Path, samples: int) -> None:
    from PIL import Image

    from conceptprune.evaluation.wds import write_classification

    rng = np.random.default_rng(0)
    names = [f"class {i}" for i in range(10)]
    for key in TASKS:
        ims = [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(samples)]
        write_classification(root / key.replace("/", "-"), ims, rng.integers(0, 10, samples), names,
                             ["a photo of a {c}.", "a {c}."], nshards=2)


def make_model(d: Path) -> None:
    import open_clip
    import torch

    from conceptprune.models import CONFIG_DIR, register

    register()
    torch.manual_seed(0)
    d.mkdir(parents=True, exist_ok=True)
    model = open_clip.create_model("cp-tiny-vit")
    torch.save(model.state_dict(), d / "open_clip_pytorch_model.bin")
    cfg = json.loads((CONFIG_DIR / "cp-tiny-vit.json").read_text())
    (d / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--samples", type=int, default=2000, help="test images per task")
    ap.add_argument("--workdir", default="/tmp/cp-bench-eval")
    args = ap.parse_args()
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    make_sets(work / "data", args.samples)
    make_model(work / "model")
    arch = f"local-dir:{work / 'model'}"
    env = {"HF_HUB_OFFLINE": "1"}
    ours = measure([sys.executable, "-m", "conceptprune.cli", "--quiet", "evaluate", "--model",
                    str(work / "model" / "open_clip_pytorch_model.bin"), "--arch", arch, "--data-dir",
                    str(work / "data"), "--out", str(work / "ours"), "--tasks", *TASKS, "--batch-size", "256",
                    "--executor", "local"], env=env)
    base_wall, per_task = 0.0, []
    (work / "cb").mkdir()
    for key in TASKS:
        folder = key.replace("/", "-")
        r = measure([sys.executable, "-m", "clip_benchmark.cli", "eval", "--dataset", f"wds/{folder}",
                     "--dataset_root", str(work / "data" / folder), "--model", arch, "--pretrained", "none",
                     "--task", "zeroshot_classification", "--batch_size", "256", "--no_amp", "--num_workers", "1",
                     "--output", str(work / "cb" / f"{folder}.json")], env=env)
        base_wall += r["wall_s"]
        per_task.append({"task": key, "clip_benchmark_wall_s": r["wall_s"]})
    ours_rows = {json.loads(l)["key"]: json.loads(l) for l in (work / "ours" / "eval_results.jsonl").read_text().splitlines()}
    agree = all(abs(ours_rows[k]["metrics"]["acc1"] - json.loads((work / "cb" / f"{k.replace('/', '-')}.json")
                                                                     .read_text())["metrics"]["acc1"]) < 1e-9
                for k in TASKS)
    rows = [{"what": "conceptprune evaluate (6 tasks, one process)", "wall_s": ours["wall_s"],
             "peak_rss_mib": ours["peak_rss_mib"]},
            {"what": "clip_benchmark CLI, once per task", "wall_s": round(base_wall, 2)}]
    print(table(rows, ["what", "wall_s", "peak_rss_mib"]))
    print(f"speed-up x{base_wall / ours['wall_s']:.2f}; acc1 identical on every task: {agree}")
    print("saved", save("evaluate", {"tasks": TASKS, "samples_per_task": args.samples, "results": rows,
                                     "per_task": per_task, "ratio_baseline_over_ours": round(base_wall / ours["wall_s"], 3),
                                     "same_acc1": agree}))


if __name__ == "__main__":
    main()
