"""`conceptprune embed` against a bare open_clip inference loop on the same shards: same model,
batch size and preprocessing, images decoded in DataLoader worker processes (webdataset, as
open_clip's own loader does), image features L2-normalised and kept. Samples/s and the ratio
(bare wall / embed wall; >= 0.9 is the target). Defaults run on a CPU with the ~1.7M-parameter
``cp-tiny-vit``; for a GPU run pass e.g. ``--model ViT-B-32 --batch-size 256 --device cuda``.
Usage: python bench/bench_embed.py [--shards 4 --per-shard 512 --image-size 256]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import measure, save, table  # noqa: E402

BARE = r'''
import sys, time, json
import numpy as np, torch, open_clip, webdataset as wds
from conceptprune.models import register
register()
shards, model_name, ckpt, batch, workers, device, out = sys.argv[1:8]
batch, workers = int(batch), int(workers)
model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=ckpt)
model.eval().to(device)
ds = (wds.WebDataset(sorted(shards.split(",")), shardshuffle=False).decode("pil")
      .to_tuple("jpg;png;jpeg;webp", "json").map_tuple(preprocess, lambda m: m["uid"]).batched(batch))
loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers)
feats, uids = [], []
with torch.no_grad():
    for images, batch_uids in loader:
        f = model.encode_image(images.to(device))
        feats.append(torch.nn.functional.normalize(f.float(), dim=-1).cpu().numpy().astype(np.float16))
        uids += list(batch_uids)
np.save(out, np.concatenate(feats))
json.dump(uids, open(out + ".uids.json", "w"))
print(json.dumps({"n": len(uids)}))
'''


def make_shards(out: Path, shards: int, per_shard: int, size: int) -> int:
    from PIL import Image

    from conceptprune.tars import Sample, ShardWriter

    rng = np.random.default_rng(0)
    out.mkdir(parents=True, exist_ok=True)
    jpgs = []
    for _ in range(16):  # smooth random images (JPEG-compressible, like photos), decoded at full size
        small = rng.integers(0, 255, (size // 16, size // 16, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(small).resize((size, size), Image.BICUBIC).save(buf, format="JPEG", quality=90)
        jpgs.append(buf.getvalue())
    for s in range(shards):
        w = ShardWriter(out / f"{s:08d}.tar")
        for i in range(per_shard):
            uid = f"{s:016x}{i:016x}"
            w.write(Sample(f"{s:05d}{i:05d}", {"jpg": jpgs[(s * 7 + i) % 16], "txt": f"caption {i}".encode(),
                                                "json": json.dumps({"uid": uid}).encode()}))
        w.close()
    return shards * per_shard


def checkpoint(model: str, path: Path) -> Path:
    """One set of weights for both runs (a randomly initialised model differs per process)."""
    import open_clip
    import torch

    from conceptprune.models import register

    register()
    torch.manual_seed(0)
    torch.save({"state_dict": open_clip.create_model(model).state_dict()}, path)
    return path


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--per-shard", type=int, default=512)
    ap.add_argument("--image-size", type=int, default=256, help="side of the generated JPEGs (default 256)")
    ap.add_argument("--model", default="cp-tiny-vit")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--workers", type=int, default=2, help="loader worker processes of the bare loop "
                                                          "(embed decodes in its own threads)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--workdir", default="/tmp/cp-bench-embed")
    ap.add_argument("--name", default="embed", help="results file name (bench/results/<name>.json)")
    args = ap.parse_args()
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    n = make_shards(work / "in", args.shards, args.per_shard, args.image_size)
    env = {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "")}
    env = {k: v for k, v in env.items() if v}
    load_before = os.getloadavg()
    tars = ",".join(str(p) for p in sorted((work / "in").glob("*.tar")))
    ckpt = checkpoint(args.model, work / "model.pt")
    bare = measure([sys.executable, "-c", BARE, tars, args.model, str(ckpt), str(args.batch_size), str(args.workers),
                    args.device, str(work / "bare.npy")], env=env)
    ours = measure([sys.executable, "-m", "conceptprune.cli", "--quiet", "embed", "--shards", str(work / "in"),
                    "--out", str(work / "out"), "--model", args.model, "--pretrained", str(ckpt),
                    "--batch-size", str(args.batch_size), "--device", args.device, "--workers", "1",
                    "--executor", "local"], env=env)
    load_after = os.getloadavg()
    import pyarrow.parquet as pq

    ref = np.load(work / "bare.npy").astype(np.float32)
    ref_uids = json.loads((work / "bare.npy.uids.json").read_text())
    emb = np.concatenate([np.load(p)["img"] for p in sorted((work / "out").glob("*.npz"))]).astype(np.float32)
    uids = [u for p in sorted((work / "out").glob("*.parquet")) for u in pq.read_table(p)["uid"].to_pylist()]
    assert len(emb) == len(ref) == n and sorted(uids) == sorted(ref_uids), (len(emb), len(ref), n)
    order = {u: i for i, u in enumerate(ref_uids)}
    max_diff = float(np.abs(emb - ref[[order[u] for u in uids]]).max())  # the loader interleaves its workers
    rows = [{"what": f"bare open_clip loop ({args.workers} loader workers)", "wall_s": bare["wall_s"],
             "samples_per_s": round(n / bare["wall_s"], 1), "peak_rss_mib": bare["peak_rss_mib"]},
            {"what": "conceptprune embed", "wall_s": ours["wall_s"],
             "samples_per_s": round(n / ours["wall_s"], 1), "peak_rss_mib": ours["peak_rss_mib"],
             "ratio_to_bare": round(bare["wall_s"] / ours["wall_s"], 3)}]
    print(f"{n} samples ({args.image_size}px JPEG) in {args.shards} shards, model {args.model}, batch "
          f"{args.batch_size}, device {args.device}; max |embed - bare| = {max_diff:.2e} (fp16 outputs)")
    print(table(rows, ["what", "wall_s", "samples_per_s", "peak_rss_mib", "ratio_to_bare"]))
    print("load average before/after:", load_before, load_after)
    print("saved", save(args.name, {"samples": n, "model": args.model, "batch_size": args.batch_size,
                                    "image_size": args.image_size, "device": args.device, "workers": args.workers,
                                    "max_abs_diff_to_bare": max_diff, "cpus": os.cpu_count(),
                                    "loadavg_before": [round(x, 2) for x in load_before],
                                    "loadavg_after": [round(x, 2) for x in load_after], "results": rows}))


if __name__ == "__main__":
    main()
