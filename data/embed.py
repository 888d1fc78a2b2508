"""``conceptprune embed``: image (and text) embeddings for every sample of webdataset shards.

Output per input shard: ``<shard>.parquet`` (uid, key, url, text, sizes) and ``<shard>.npz``
with L2-normalised fp16 arrays ``<prefix>img`` (and ``<prefix>txt``), so the output folder is
a pool that every filter reads exactly like DataComp's (``--embedding-key img``). Models:
any open_clip name (``ViT-B-32``, ``cp-tiny-vit``, ``local-dir:PATH``) with an optional
``--pretrained`` tag or checkpoint path, or a timm name prefixed ``timm:`` (e.g.
``timm:vit_large_patch14_dinov2.lvd142m``, the DBP paper's encoder family). GPU when
present. Parts are shard lists; a shard whose parquet exists is done and is skipped.
"""

from __future__ import annotations

import io
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from conceptprune.atomic import atomic_open
from conceptprune.errors import ConfigError, PoolError
from conceptprune.npz import NpzWriter
from conceptprune.progress import progress_bar
from conceptprune.slurm.stage import Stage

from conceptprune.tars import iter_samples

log = logging.getLogger(__name__)
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


class Encoder:
    def __init__(self, model: str, pretrained: str | None = None, device: str = "auto"):
        import torch

        self.device = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                                   ("cpu" if device == "auto" else device))
        self.kind = "timm" if model.startswith("timm:") else "open_clip"
        if self.kind == "timm":
            import timm

            name = model[len("timm:"):]
            self.model = timm.create_model(name, pretrained=bool(pretrained), num_classes=0)
            cfg = timm.data.resolve_data_config({}, model=self.model)
            self.preprocess = timm.data.create_transform(**cfg)
            self.tokenizer = None
        else:
            import open_clip

            from conceptprune.models import register

            register()
            if model not in open_clip.list_models() and not model.startswith(("local-dir:", "hf-hub:")):
                raise ConfigError(f"--model {model!r}: not an open_clip model (prefix timm models with 'timm:')")
            self.model, _, self.preprocess = open_clip.create_model_and_transforms(model, pretrained=pretrained)
            self.tokenizer = open_clip.get_tokenizer(model)
        self.model.eval().to(self.device)

    def _normed(self, x):
        import torch

        x = torch.nn.functional.normalize(x.float(), dim=-1)
        return x.cpu().numpy().astype(np.float16)

    def images(self, tensors) -> np.ndarray:
        import torch

        with torch.no_grad(), torch.autocast(self.device.type, enabled=self.device.type == "cuda"):
            x = torch.stack(tensors).to(self.device)
            out = self.model(x) if self.kind == "timm" else self.model.encode_image(x)
        return self._normed(out)

    def texts(self, captions: list[str]) -> np.ndarray:
        import torch

        if self.tokenizer is None:
            raise ConfigError("--text needs an open_clip model (timm models have no text tower)")
        with torch.no_grad(), torch.autocast(self.device.type, enabled=self.device.type == "cuda"):
            out = self.model.encode_text(self.tokenizer(captions).to(self.device))
        return self._normed(out)


def _decode(sample, preprocess):
    return _decode_bytes(_image_bytes(sample), preprocess)


def _image_bytes(sample) -> bytes | None:
    for ext in IMAGE_EXTS:
        if ext in sample.parts:
            return sample.parts[ext]
    return None


def _decode_bytes(data: bytes | None, preprocess):
    from PIL import Image

    if data is None:
        return None
    try:
        with Image.open(io.BytesIO(data)) as im:
            return preprocess(im.convert("RGB"))
    except Exception:  # a broken image: the sample is left out and counted
        return None


_WORKER_PREPROCESS = None


def _init_decode_worker(preprocess) -> None:
    global _WORKER_PREPROCESS
    import signal

    import torch

    # a forked worker inherits its parent's handlers: inside a submitit job SIGTERM is "bypassed",
    # so Pool.terminate() (SIGTERM) would never end the worker and close() would wait forever
    signal.signal(signal.SIGTERM, signal.SIG_DFL)

    torch.set_num_threads(1)
    _WORKER_PREPROCESS = preprocess


def _decode_in_worker(data: bytes | None):
    return _decode_bytes(data, _WORKER_PREPROCESS)


class _Decoders:
    """Images decoded and preprocessed in worker processes, as a DataLoader's workers do
    (decode threads reached 0.6x of a DataLoader on 2 CPUs: preprocessing holds the GIL), in order,
    tensors passed through shared memory; threads where fork is unavailable."""

    def __init__(self, preprocess, workers: int):
        import multiprocessing

        self.preprocess = preprocess
        self.pool = self.threads = None
        if workers > 1 and "fork" in multiprocessing.get_all_start_methods():
            import torch.multiprocessing as tmp

            self.pool = tmp.get_context("fork").Pool(workers, _init_decode_worker, (preprocess,))
        else:
            self.threads = ThreadPoolExecutor(max(workers, 1))

    def submit(self, batch: list):
        """A handle whose ``get()`` is the batch's tensors (None: not decodable), in order."""
        data = [_image_bytes(s) for s in batch]
        if self.pool is not None:
            return self.pool.map_async(_decode_in_worker, data, chunksize=max(1, len(data) // 8))
        futures = [self.threads.submit(_decode_bytes, d, self.preprocess) for d in data]
        return _Futures(futures)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()
        if self.threads is not None:
            self.threads.shutdown()


def _usable_cpus() -> int:
    """CPUs this process may run on (a SLURM task's allocation, not the whole node)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


class _Futures:
    def __init__(self, futures):
        self.futures = futures

    def get(self) -> list:
        return [f.result() for f in self.futures]


@dataclass
class EmbedStage(Stage):
    work_dir: str  # output folder
    shards_dir: str
    model: str
    pretrained: str | None = None
    batch_size: int = 256
    text: bool = False
    key_prefix: str = ""
    device: str = "auto"
    threads: int = 0  # decode workers (processes where fork exists, else threads); 0: one per usable CPU
    name: str = "embed"

    def shards(self) -> list[Path]:
        shards = sorted(Path(self.shards_dir).glob("*.tar"))
        if not shards:
            raise ConfigError(f"--shards {self.shards_dir}: no .tar shards")
        return shards

    def run(self, rank: int, world_size: int) -> dict:
        mine = self.shards()[rank::world_size]
        out = Path(self.work_dir)
        out.mkdir(parents=True, exist_ok=True)
        encoder = decoders = None
        totals = {"shards": 0, "embedded": 0, "undecodable": 0, "skipped_done": 0}
        try:
            for shard in progress_bar(mine, desc=f"embed {rank + 1}/{world_size}", unit="shards"):
                if (out / f"{shard.stem}.parquet").exists():
                    totals["skipped_done"] += 1
                    continue
                encoder = encoder or Encoder(self.model, self.pretrained, self.device)
                decoders = decoders or _Decoders(encoder.preprocess, self.threads or _usable_cpus())
                n, bad = self._embed_shard(shard, out, encoder, decoders)
                totals["shards"] += 1
                totals["embedded"] += n
                totals["undecodable"] += bad
        finally:
            if decoders is not None:
                decoders.close()
        return totals

    def _embed_shard(self, shard: Path, out: Path, encoder: Encoder, decoders: "_Decoders") -> tuple[int, int]:
        """Encode batch by batch as the shard streams past: the decode threads work on the next
        batch while the model runs on this one (memory: two batches of images)."""
        key_img, key_txt = f"{self.key_prefix}img", f"{self.key_prefix}txt"
        rows, blocks, bad = [], {key_img: [], key_txt: []}, 0
        def encode(batch, decoded):
            nonlocal bad
            kept, tensors = [], []
            for sample, tensor in zip(batch, decoded.get()):
                if tensor is None:
                    bad += 1
                    continue
                meta = sample.json()
                if not meta.get("uid"):
                    raise PoolError(f"{shard}: sample {sample.key} has no uid in its json")
                kept.append({"uid": meta["uid"], "key": sample.key, "url": meta.get("url"),
                             "text": (sample.parts.get("txt") or b"").decode("utf-8", "replace"),
                             "original_width": meta.get("original_width"),
                             "original_height": meta.get("original_height"), "shard": shard.name})
                tensors.append(tensor)
            if not kept:
                return
            rows.extend(kept)
            blocks[key_img].append(encoder.images(tensors))
            if self.text:
                blocks[key_txt].append(encoder.texts([r["text"] for r in kept]))

        pending, batch = [], []  # batches being decoded, oldest first
        for sample in iter_samples(shard):
            batch.append(sample)
            if len(batch) == self.batch_size:
                pending.append((batch, decoders.submit(batch)))
                batch = []
                if len(pending) > 1:
                    encode(*pending.pop(0))
        pending.append((batch, decoders.submit(batch)))
        for item in pending:
            encode(*item)
        n = len(rows)
        keys = [key_img] + ([key_txt] if self.text else [])
        dims = {k: (blocks[k][0].shape[1] if blocks[k] else 0) for k in keys}
        with NpzWriter(out / f"{shard.stem}.npz", {k: (n, dims[k], "float16") for k in keys}) as w:
            for k in keys:  # npz first: the parquet marks the pair done
                at = 0
                for b in blocks[k]:
                    w.write(k, at, b)
                    at += len(b)
        table = pa.Table.from_pylist(rows, schema=pa.schema([
            ("uid", pa.string()), ("key", pa.string()), ("url", pa.string()), ("text", pa.string()),
            ("original_width", pa.int64()), ("original_height", pa.int64()), ("shard", pa.string())]))
        if self.text and n:
            img = np.concatenate(blocks[key_img]).astype(np.float32)
            txt = np.concatenate(blocks[key_txt]).astype(np.float32)
            table = table.append_column(f"{self.key_prefix}similarity_score",
                                        pa.array(np.einsum("ij,ij->i", img, txt), pa.float32()))
        with atomic_open(out / f"{shard.stem}.parquet", "wb") as f:
            pq.write_table(table, f)
        return n, bad


@dataclass(frozen=True)
class EmbedConfig:
    """``conceptprune embed``'s settings: which shards, which model, where the pool goes."""

    shards: str  # folder of .tar shards
    out: str  # output folder (a pool: <shard>.parquet + <shard>.npz)
    model: str  # open_clip name, local-dir:PATH or timm:NAME
    pretrained: str | None = None
    batch_size: int = 256
    text: bool = False  # also embed captions (open_clip models)
    key_prefix: str = ""
    device: str = "auto"

    def stage(self) -> EmbedStage:
        return EmbedStage(self.out, self.shards, self.model, self.pretrained, self.batch_size, self.text,
                          self.key_prefix, self.device)


def embed(cfg: EmbedConfig, *, executor=None) -> dict | None:
    """Embed every shard (one part a shard at most); the totals, or None when the executor
    detached (the same call, rerun once its jobs are done, returns them)."""
    from conceptprune.slurm.stage import Executor

    if cfg.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {cfg.batch_size}")
    executor = executor if executor is not None else Executor.create("inline")
    stage = cfg.stage()
    res = executor.finish(executor.submit(stage, executor.parts(len(stage.shards()))))
    if res is None:
        return None
    return {k: sum(s[k] for s in res.summaries) for k in res.summaries[0]}
