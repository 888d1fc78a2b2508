"""A uid -> (shard, byte offset, byte size) index of webdataset tar shards.

Built once by scanning the tar headers of every shard (the json member of each sample holds
its uid); stored as two aligned ``.npy`` arrays sorted by uid (``uids.npy``: DataComp's
``u8,u8``; ``loc.npy``: shard number, offset, size) plus ``index.json`` naming the shards
with their sizes and mtimes, so a later run reuses it while the shards are unchanged. A
lookup is a ``searchsorted`` (no Python dict of uids: 128M rows take 4.1 GB of arrays).
A sample is then read back by one ``pread`` of its members' bytes, without unpacking the tar.
"""

from __future__ import annotations

import io
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from conceptprune import keeplist as K
from conceptprune import uids as U
from conceptprune.atomic import atomic_open, write_json
from conceptprune.data.tars import Sample, _members, split_name
from conceptprune.errors import ConfigError, PoolError

log = logging.getLogger(__name__)

LOC_DTYPE = np.dtype([("shard", "<i4"), ("offset", "<u8"), ("size", "<u4")])  # 16 bytes a sample
INDEX_DIR = "_uid_index"
FORMAT = 2


def _shard_list(shards: Path) -> list[Path]:
    if not shards.is_dir():
        raise ConfigError(f"--shards {shards}: not a folder")
    tars = sorted(shards.glob("*.tar"))
    if not tars:
        raise ConfigError(f"--shards {shards}: holds no .tar shard")
    return tars


def _signature(tars: list[Path]) -> list[list]:
    return [[p.name, p.stat().st_size, int(p.stat().st_mtime_ns)] for p in tars]


class _Tell:
    """A file wrapper whose position is the bytes consumed so far (tars._members reads sequentially)."""

    def __init__(self, f):
        self.f, self.pos = f, 0

    def read(self, n: int) -> bytes:
        b = self.f.read(n)
        self.pos += len(b)
        return b


def scan_shard(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(uids, offsets, sizes) of the samples of one tar whose json holds a uid: each sample's
    byte range covers all its members (their extension headers included)."""
    uids, offs, sizes = [], [], []
    key, start, end, uid = None, 0, 0, ""
    with open(path, "rb", buffering=1 << 20) as raw:
        f = _Tell(raw)
        prev_end = 0
        for name, kind, data, _raw, _others in _members(f, path):
            m_start, prev_end = prev_end, f.pos
            if kind == "dir":
                continue
            k, ext = split_name(name)
            if k != key:
                if key is not None and uid:
                    uids.append(uid); offs.append(start); sizes.append(end - start)  # noqa: E702
                key, start, uid = k, m_start, ""
            end = prev_end
            if ext == "json" and kind == "file":
                uid = Sample(k, {"json": data}).uid()
        if key is not None and uid:
            uids.append(uid); offs.append(start); sizes.append(end - start)  # noqa: E702
    try:
        arr = U.uids_to_array(uids)
    except Exception as e:
        raise PoolError(f"{path}: a sample's json holds a uid that is not 32 hex digits ({e})") from None
    sizes = np.asarray(sizes, np.uint64)
    if len(sizes) and sizes.max() >= 1 << 32:
        raise PoolError(f"{path}: a sample of {int(sizes.max())} bytes (the index holds sizes below 4 GiB)")
    return arr, np.asarray(offs, np.uint64), sizes


@dataclass
class ShardIndex:
    folder: Path  # the index folder
    shards: list[Path]
    uids: np.ndarray  # sorted u8,u8
    loc: np.ndarray  # LOC_DTYPE, aligned with uids
    build_s: float = 0.0  # 0 when reused

    def __len__(self) -> int:
        return len(self.uids)

    def lookup(self, query: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(found mask, positions in the index, -1 where absent) of query uids."""
        return K.member(self.uids, query)

    def contains(self, query: np.ndarray) -> np.ndarray:
        return self.lookup(query)[0]

    def read(self, uid: str | np.ndarray) -> Sample | None:
        """The sample of one uid (None if no shard holds it), read by its byte range."""
        q = U.uids_to_array([uid]) if isinstance(uid, str) else np.asarray(uid).reshape(1)
        found, pos = self.lookup(q)
        if not found[0]:
            return None
        rec = self.loc[pos[0]]
        path = self.shards[int(rec["shard"])]
        with open(path, "rb") as f:
            data = os.pread(f.fileno(), int(rec["size"]), int(rec["offset"]))
        sample = None
        for name, kind, body, _raw, _o in _members(io.BytesIO(data), path):
            if kind != "file":
                continue
            k, ext = split_name(name)
            sample = sample or Sample(k)
            sample.parts[ext] = body
        return sample


def index_folder(shards: Path, fallback: Path | None) -> Path:
    """``SHARDS/_uid_index`` when the shards' folder is writable, else ``fallback``."""
    target = shards / INDEX_DIR
    if os.access(shards, os.W_OK) or target.exists():
        return target
    if fallback is None:
        raise ConfigError(f"{shards} is read-only; give a folder for the uid index")
    return fallback


def build_index(shards: str | os.PathLike, folder: str | os.PathLike | None = None, *,
                fallback: str | os.PathLike | None = None, workers: int | None = None) -> ShardIndex:
    """Load the index of ``shards`` from ``folder`` (default ``SHARDS/_uid_index``), building
    it when absent or when the shards changed (``workers`` processes scan the shards;
    default: one per CPU)."""
    shards = Path(shards)
    tars = _shard_list(shards)
    folder = Path(folder) if folder else index_folder(shards, Path(fallback) if fallback else None)
    sig = _signature(tars)
    meta_path = folder / "index.json"
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("format") == FORMAT and meta.get("shards") == sig:
            return ShardIndex(folder, tars, np.load(folder / "uids.npy"), np.load(folder / "loc.npy"))
        log.info("%s: the shards changed; rebuilding the uid index", folder)
    t0 = time.time()
    parts_u, parts_l = [], []
    workers = max(1, min(workers or os.cpu_count() or 1, len(tars)))
    if workers > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(workers) as ex:  # one shard per task, results in shard order
            scans = list(ex.map(scan_shard, tars, chunksize=max(1, len(tars) // (8 * workers))))
    else:
        scans = (scan_shard(p) for p in tars)
    for i, (u, o, s) in enumerate(scans):
        loc = np.empty(len(u), LOC_DTYPE)
        loc["shard"], loc["offset"], loc["size"] = i, o, s
        parts_u.append(u)
        parts_l.append(loc)
    uids = np.concatenate(parts_u) if parts_u else np.empty(0, U.UID_DTYPE)
    loc = np.concatenate(parts_l) if parts_l else np.empty(0, LOC_DTYPE)
    del parts_u, parts_l
    hi, lo = U.split(uids)
    order = np.lexsort((lo, hi))
    uids, loc = uids[order], loc[order]
    dup = K.duplicate_mask(uids)
    if dup.any():  # the same sample in two shards: the first in shard order is the one read
        log.warning("%s: %d uids appear in more than one sample; the first is indexed", shards, int(dup.sum()))
        uids, loc = uids[~dup], loc[~dup]
    build_s = time.time() - t0
    folder.mkdir(parents=True, exist_ok=True)
    for name, arr in (("uids.npy", uids), ("loc.npy", loc)):
        with atomic_open(folder / name, "wb") as f:
            np.save(f, arr)
    write_json(meta_path, {"format": FORMAT, "shards_dir": str(shards.resolve()), "shards": sig,
                           "samples": int(len(uids)), "build_s": round(build_s, 3), "workers": workers,
                           "uids_per_s": round(len(uids) / max(build_s, 1e-9))})
    return ShardIndex(folder, tars, uids, loc, build_s)
