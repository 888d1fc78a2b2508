"""Webdataset shards for a generated pool (tests, benchmarks): one small JPEG, the caption and
a json with the uid per sample, in DataComp's layout (``<key>.jpg``, ``.txt``, ``.json``)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np

from conceptprune import uids as U
from conceptprune.tars import Sample, ShardWriter
from conceptprune.pool import Pool


def _jpeg(hi: int, lo: int, size: int = 24) -> bytes:
    from PIL import Image

    rng = np.random.default_rng([hi & 0xFFFFFFFF, lo & 0xFFFFFFFF])
    base = rng.integers(0, 256, 3)
    img = np.clip(base + rng.integers(-40, 40, (size, size, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=80)
    return buf.getvalue()


def write_shards(pool_dir, out, *, rows: np.ndarray | None = None, per_shard: int = 1000) -> int:
    """Shards for the pool rows ``rows`` (sorted global rows; default all); returns the sample count."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pool = Pool(pool_dir)
    want = None if rows is None else np.asarray(rows, np.int64)
    writer, n, shard = None, 0, 0
    for chunk in pool.iter_chunks(["text"]):
        sel = np.arange(len(chunk)) if want is None else \
            want[(want >= chunk.start) & (want < chunk.start + len(chunk))] - chunk.start
        texts = chunk.table.column("text").to_pylist()
        for i in sel:
            if writer is None:
                writer = ShardWriter(out / f"{shard:08d}.tar")
            hi, lo = (int(x) for x in chunk.uids[i])
            uid = U.pair_to_uid(hi, lo)
            key = f"{shard:05d}{writer.count:04d}"
            parts = {"jpg": _jpeg(hi, lo), "txt": (texts[i] or "").encode(),
                     "json": json.dumps({"uid": uid, "caption": texts[i], "key": key}).encode()}
            writer.write(Sample(key, parts, raw=None))
            n += 1
            if writer.count >= per_shard:
                writer.close()
                writer, shard = None, shard + 1
    if writer is not None:
        writer.close()
    return n
