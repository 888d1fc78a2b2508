"""A uid -> (shard, byte offset, byte size) index of webdataset tar shards.

Built once by scanning the tar headers of every shard (the json member of each sample holds
its uid); stored as two aligned ``.npy`` arrays sorted by uid (``uids.npy``: DataComp's
``u8,u8``; ``loc.npy``: shard number, offset, size) plus ``index.json`` naming the shards
with their sizes and mtimes, so a later run reuses it while the shards are unchanged.

The build is an external sort, so its memory does not grow with the pool: the scanned
samples are collected into runs of at most ``memory`` bytes (default 1 GiB; 64 bytes a
sample: the record and its sort), each sorted and written beside the index, then merged
k ways in numpy blocks into the final arrays. The order is (uid, shard, offset), so the
files are the same for any budget and any number of scanning workers; a uid found in
several samples keeps the first in shard order. A lookup is a vectorised binary search on
the memory-mapped arrays (no Python dict, no full load: 128M rows are 4.1 GB of files),
and a sample is then read back by one ``pread`` of its members' bytes, without unpacking the tar.
"""

from __future__ import annotations

import io
import json
import logging
import mmap
import os
import re
import shutil
import tempfile
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from conceptprune import uids as U
from conceptprune.atomic import StagedFile, write_json
from conceptprune.tars import Sample, tar_members, index_plain, split_name
from conceptprune.errors import ConfigError, PoolError

log = logging.getLogger(__name__)

LOC_DTYPE = np.dtype([("shard", "<i4"), ("offset", "<u8"), ("size", "<u4")])  # 16 bytes a sample
INDEX_DIR = "_uid_index"
FORMAT = 2
DEFAULT_MEMORY = "1G"
RUN_BYTES_PER_ROW = 64  # a run's record (32 B) plus its sort: contiguous keys (16 B) and the order (8 B), rounded up
MERGE_BYTES_PER_ROW = 128  # a merge block's record, its keys, the emitted copy and its order
FENCE = 4096  # every FENCE-th uid is kept in memory to start each lookup's binary search


def parse_memory(text: str | int) -> int:
    """Bytes of ``"1G"``, ``"512M"``, ``"64K"`` or a plain number (powers of 1024)."""
    if isinstance(text, int):
        n = text
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?\s*", str(text), re.I)
        if not m:
            raise ConfigError(f"--index-memory {text!r}: expected a size such as 1G, 512M or 65536")
        n = int(float(m.group(1)) * 1024 ** " KMGT".index(m.group(2).upper() or " "))
    if n < 1 << 16:
        raise ConfigError(f"--index-memory {text!r}: at least 64K")
    return n


def _shard_list(shards: Path) -> list[Path]:
    if not shards.is_dir():
        raise ConfigError(f"--shards {shards}: not a folder")
    tars = sorted(shards.glob("*.tar"))
    if not tars:
        raise ConfigError(f"--shards {shards}: holds no .tar shard")
    return tars


def _signature(tars: list[Path]) -> list[list]:
    """Each shard's name and content fingerprint (size, mtime, hashes of both ends): a shard
    rewritten in place, even to the same size and mtime, is indexed again."""
    from conceptprune.pool import file_fingerprint

    return [[p.name, p.stat().st_size, file_fingerprint(p)] for p in tars]


class _Tell:
    """A file wrapper whose position is the bytes consumed so far (tars.tar_members reads sequentially)."""

    def __init__(self, f):
        self.f, self.pos = f, 0

    def read(self, n: int) -> bytes:
        b = self.f.read(n)
        self.pos += len(b)
        return b


def _json_uid(sample: Sample) -> str:
    try:
        return sample.uid()
    except ValueError:  # a json that is not JSON: no uid, as reshard reads it
        return ""


def _valid_uid(uid: str) -> bool:
    try:
        U.uid_to_pair(uid)
    except (ValueError, TypeError):
        return False
    return True


def _skipped(path: Path, n: int, first: str) -> None:
    if n:  # as reshard does: such a sample is left out and counted, the shard is still indexed
        log.warning("%s: %d sample(s) skipped, their json's uid is not 32 hex digits (first: %r)", path, n, first)


def _scan_members(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The member-by-member scan (any tar ``iter_samples`` reads): each sample's byte range
    covers all its members (their extension headers included)."""
    uids, offs, sizes = [], [], []
    key, start, end, uid = None, 0, 0, ""
    bad = []
    with open(path, "rb", buffering=1 << 20) as raw:
        f = _Tell(raw)
        prev_end = 0
        for name, kind, data, _raw, _others in tar_members(f, path):
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
                uid = _json_uid(Sample(k, {"json": data}))
                if uid and not _valid_uid(uid):
                    bad.append(uid)
                    uid = ""
        if key is not None and uid:
            uids.append(uid); offs.append(start); sizes.append(end - start)  # noqa: E702
    _skipped(path, len(bad), bad[0] if bad else "")
    arr = U.uids_to_array(uids) if uids else np.empty(0, U.UID_DTYPE)
    return arr, np.asarray(offs, np.uint64), np.asarray(sizes, np.uint64), len(bad)


def _scan_plain(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """The same from the tar's headers alone (``tars.index_plain``), or None when the tar is not plain."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return None
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            index = index_plain(path, buf)
            if index is None:
                return None
            try:
                ok, pairs = index.uid_pairs()
                bad = []
                for i in np.flatnonzero(~ok & (index.json_member >= 0)).tolist():
                    uid = _json_uid(index.sample(i))  # no uid (not indexed), or one that is not hex (counted)
                    if uid and not _valid_uid(uid):
                        bad.append(uid)
                _skipped(path, len(bad), bad[0] if bad else "")
                start = np.asarray(index.start, np.uint64)
                end = np.asarray(index.end, np.uint64)
                return pairs[ok].copy(), start[ok], end[ok] - start[ok], len(bad)
            finally:
                del index


def scan_shard(path: Path, with_skipped: bool = False):
    """(uids, offsets, sizes) of the samples of one tar whose json holds a uid, in tar order
    (``with_skipped``: and the number of samples whose uid is not hex, left out)."""
    path = Path(path)
    got = _scan_plain(path)
    arr, offs, sizes, bad = got if got is not None else _scan_members(path)
    if len(sizes) and sizes.max() >= 1 << 32:
        raise PoolError(f"{path}: a sample of {int(sizes.max())} bytes (the index holds sizes below 4 GiB)")
    return (arr, offs, sizes, bad) if with_skipped else (arr, offs, sizes)


# -- lookups ---------------------------------------------------------------------------------------------

def _lower_bound(get, lo: np.ndarray, hi: np.ndarray, qhi: np.ndarray, qlo: np.ndarray) -> np.ndarray:
    """Per query, the first position in [lo, hi) whose key is >= (qhi, qlo) (hi where none);
    ``get(positions)`` gives the keys there. All queries bisect together, one gather a step."""
    lo, hi = lo.copy(), hi.copy()
    while True:
        act = np.flatnonzero(lo < hi)
        if not len(act):
            return lo
        mid = (lo[act] + hi[act]) >> 1
        h, l_ = get(mid)
        less = (h < qhi[act]) | ((h == qhi[act]) & (l_ < qlo[act]))
        lo[act[less]] = mid[less] + 1
        hi[act[~less]] = mid[~less]


@dataclass
class ShardIndex:
    folder: Path  # the index folder
    shards: list[Path]
    uids: np.ndarray  # sorted u8,u8, memory-mapped
    loc: np.ndarray  # LOC_DTYPE, aligned with uids, memory-mapped
    build_s: float = 0.0  # 0 when reused
    stats: dict = field(default_factory=dict)  # the build's figures (runs, budget, ...); empty when reused

    def __post_init__(self):
        f = self.uids[::FENCE]  # every FENCE-th key in memory: 128M rows -> 500 KB
        self._fhi, self._flo = (np.ascontiguousarray(x) for x in U.split(f))

    def __len__(self) -> int:
        return len(self.uids)

    def _keys(self, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        rec = self.uids[pos]  # a gather from the mapped file: only those records are read
        return U.split(rec)

    def lookup(self, query: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(found mask, positions in the index, -1 where absent) of query uids."""
        query = np.asarray(query)
        n, m = len(self.uids), len(query)
        found, index = np.zeros(m, bool), np.full(m, -1, np.int64)
        if n == 0 or m == 0:
            return found, index
        qhi, qlo = (np.ascontiguousarray(x, dtype=np.uint64) for x in U.split(query))
        nf = len(self._fhi)
        p = _lower_bound(lambda i: (self._fhi[i], self._flo[i]), np.zeros(m, np.int64),
                         np.full(m, nf, np.int64), qhi, qlo)
        lo = np.maximum(p - 1, 0) * FENCE  # fence p-1 < query <= fence p
        hi = np.minimum(p * FENCE, n)
        pos = _lower_bound(self._keys, lo, hi, qhi, qlo)
        inside = np.flatnonzero(pos < n)
        h, l_ = self._keys(pos[inside])
        hit = inside[(h == qhi[inside]) & (l_ == qlo[inside])]
        found[hit], index[hit] = True, pos[hit]
        return found, index

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
        for name, kind, body, _raw, _o in tar_members(io.BytesIO(data), path):
            if kind != "file":
                continue
            k, ext = split_name(name)
            sample = sample or Sample(k)
            sample.parts[ext] = body
        return sample


def default_folder(shards: Path) -> Path:
    """Where an index goes when no folder is given: a cache folder of this user
    (``$CONCEPTPRUNE_CACHE``, else ``$XDG_CACHE_HOME/conceptprune``, else ``~/.cache/conceptprune``),
    one subfolder per shards folder. Never inside the shards, which are an input and may be read-only."""
    import hashlib

    root = os.environ.get("CONCEPTPRUNE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "conceptprune")
    tag = hashlib.sha1(str(shards.resolve()).encode()).hexdigest()[:16]
    return Path(root) / "uid_index" / f"{shards.resolve().name}-{tag}"


def _load(folder: Path, tars: list[Path], build_s: float = 0.0, stats: dict | None = None) -> ShardIndex:
    uids = np.load(folder / "uids.npy", mmap_mode="r")
    loc = np.load(folder / "loc.npy", mmap_mode="r")
    n = (stats or {}).get("samples")
    if uids.dtype != U.UID_DTYPE or loc.dtype != LOC_DTYPE or len(uids) != len(loc) or (n is not None and len(uids) != n):
        raise ValueError(f"uids.npy/loc.npy of {len(uids)}/{len(loc)} rows, index.json says {n}")
    return ShardIndex(folder, tars, uids, loc, build_s, stats or {})


def _load_existing(folder: Path, tars: list[Path], sig: list) -> ShardIndex | None:
    """The index in ``folder`` if it is complete, readable and of these shards; None to (re)build.
    A damaged index (unreadable index.json, truncated arrays) is logged and rebuilt."""
    meta_path = folder / "index.json"
    if not meta_path.exists():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        if not isinstance(meta, dict):
            raise ValueError("not a JSON object")
        if meta.get("format") != FORMAT or meta.get("shards") != sig:
            log.info("%s: the shards changed; rebuilding the uid index", folder)
            return None
        stats = {k: meta[k] for k in ("samples", "skipped") if k in meta}
        return _load(folder, tars, 0.0, stats)
    except (OSError, ValueError, UnicodeDecodeError) as e:
        log.warning("%s: damaged uid index (%s); rebuilding it", folder, e)
        return None


# -- the external sort ------------------------------------------------------------------------------------

def _scans(tars: list[Path], workers: int):
    """(shard number, scan) in shard order; ``workers`` processes scan ahead, at most 2 per worker."""
    if workers <= 1:
        for i, p in enumerate(tars):
            yield i, scan_shard(p, True)
        return
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(workers) as ex:
        pending: deque = deque()
        nxt = 0
        while nxt < len(tars) or pending:
            while nxt < len(tars) and len(pending) < 2 * workers:
                pending.append((nxt, ex.submit(scan_shard, tars[nxt], True)))
                nxt += 1
            i, fut = pending.popleft()
            yield i, fut.result()


class _RunWriter:
    """Collects scanned samples (in shard order) into a buffer of ``rows`` records; each full
    buffer is sorted by uid (stably: ties stay in shard order) and written as one run."""

    def __init__(self, tmp: Path, rows: int):
        self.tmp, self.cap = tmp, rows
        self.u = np.empty(rows, U.UID_DTYPE)
        self.l = np.empty(rows, LOC_DTYPE)
        self.n, self.runs, self.total = 0, [], 0

    def add(self, shard: int, uids: np.ndarray, offs: np.ndarray, sizes: np.ndarray) -> None:
        i = 0
        while i < len(uids):
            k = min(len(uids) - i, self.cap - self.n)
            s = slice(self.n, self.n + k)
            self.u[s] = uids[i:i + k]
            self.l["shard"][s], self.l["offset"][s], self.l["size"][s] = shard, offs[i:i + k], sizes[i:i + k]
            self.n += k
            i += k
            if self.n == self.cap:
                self.flush()

    def flush(self) -> None:
        if not self.n:
            return
        u, l_ = self.u[:self.n], self.l[:self.n]
        hi, lo = U.split(u)
        order = np.lexsort((lo, hi))  # stable: equal uids keep their shard order
        base = self.tmp / f"run{len(self.runs):06d}"
        with open(f"{base}.uids", "wb") as fu, open(f"{base}.loc", "wb") as fl:
            for a in range(0, self.n, 1 << 20):
                o = order[a:a + (1 << 20)]
                fu.write(u[o].tobytes())
                fl.write(l_[o].tobytes())
        self.runs.append((base, self.n))
        self.total += self.n
        self.n = 0


class _RunReader:
    """A window of ``block`` records of one sorted run, refilled from its files as it is consumed."""

    def __init__(self, base: Path, n: int, block: int):
        self.base, self.n, self.block, self.pos = base, n, block, 0
        self.fill()

    def fill(self) -> None:
        k = min(self.block, self.n - self.pos)
        self.u = np.fromfile(f"{self.base}.uids", U.UID_DTYPE, count=k, offset=self.pos * U.UID_DTYPE.itemsize)
        self.l = np.fromfile(f"{self.base}.loc", LOC_DTYPE, count=k, offset=self.pos * LOC_DTYPE.itemsize)
        self.hi, self.lo = (np.ascontiguousarray(x) for x in U.split(self.u))
        self.pos += k

    @property
    def more_on_disk(self) -> bool:
        return self.pos < self.n

    def count_upto(self, fhi, flo, inclusive: bool) -> int:
        """How many buffered records have a uid below (or, inclusive, at most) (fhi, flo)."""
        a = int(np.searchsorted(self.hi, fhi, "left"))
        b = int(np.searchsorted(self.hi, fhi, "right"))
        return a + int(np.searchsorted(self.lo[a:b], flo, "right" if inclusive else "left"))

    def take(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        u, l_ = self.u[:k], self.l[:k]
        self.u, self.l, self.hi, self.lo = self.u[k:], self.l[k:], self.hi[k:], self.lo[k:]
        if not len(self.u) and self.more_on_disk:
            self.fill()
        return u, l_


class _NpyWriter:
    """One ``.npy`` written as a stream (a header for at most ``n_max`` rows, fixed up to the
    real count at the end: numpy pads its header to a length that does not depend on the
    count), staged and renamed by ``commit``: the same bytes as ``np.save`` of the whole array."""

    def __init__(self, path: Path, dtype: np.dtype, n_max: int):
        self.dtype, self.n = dtype, 0
        self.staged = StagedFile(path, "wb")
        self.hlen = self._header(n_max)

    def _header(self, n: int) -> int:
        self.staged.file.seek(0)
        np.lib.format.write_array_header_1_0(
            self.staged.file, {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False,
                               "shape": (n,)})
        return self.staged.file.tell()

    def write(self, arr: np.ndarray) -> None:
        self.staged.file.write(np.ascontiguousarray(arr).tobytes())
        self.n += len(arr)

    def commit(self) -> None:
        end = self.staged.file.tell()
        if self._header(self.n) != self.hlen:
            raise AssertionError("numpy's .npy header changed length with the row count")
        self.staged.file.seek(end)
        self.staged.commit()

    def discard(self) -> None:
        self.staged.discard()


def _merge(runs: list[tuple[Path, int]], total: int, folder: Path, memory: int) -> tuple[int, int]:
    """k-way merge of the sorted runs into uids.npy / loc.npy (first of equal uids kept);
    returns (rows written, duplicates dropped)."""
    block = max(1024, memory // (MERGE_BYTES_PER_ROW * max(1, len(runs))))
    readers = [_RunReader(b, n, block) for b, n in runs]
    wu = _NpyWriter(folder / "uids.npy", U.UID_DTYPE, total)
    wl = _NpyWriter(folder / "loc.npy", LOC_DTYPE, total)
    dups, last = 0, None
    try:
        while True:
            live = [(j, r) for j, r in enumerate(readers) if len(r.u)]
            if not live:
                break
            waiting = [(r.hi[-1], r.lo[-1], j) for j, r in live if r.more_on_disk]
            if waiting:  # everything up to the smallest last-buffered key is final: (uid, run) order
                fhi, flo, fj = min(waiting)
                takes = [(r, r.count_upto(fhi, flo, inclusive=j <= fj)) for j, r in live]
            else:
                takes = [(r, len(r.u)) for _j, r in live]
            pieces = [r.take(k) for r, k in takes if k]
            u = np.concatenate([p[0] for p in pieces])
            l_ = np.concatenate([p[1] for p in pieces])
            hi, lo = U.split(u)
            order = np.lexsort((lo, hi))  # stable over pieces in run order: (uid, run, position)
            u, l_ = u[order], l_[order]
            hi, lo = U.split(u)
            keep = np.ones(len(u), bool)
            keep[1:] = (hi[1:] != hi[:-1]) | (lo[1:] != lo[:-1])
            if last is not None and hi[0] == last[0] and lo[0] == last[1]:
                keep[0] = False
            last = (hi[-1], lo[-1])
            d = int((~keep).sum())
            if d:
                dups += d
                u, l_ = u[keep], l_[keep]
            wu.write(u)
            wl.write(l_)
        wu.commit()
        wl.commit()
    except BaseException:
        wu.discard()
        wl.discard()
        raise
    return wu.n, dups


def _remove_orphan_runs(folder: Path) -> None:
    """Delete the sorted-run folders (``.runs-PID-*``) of builds whose process is gone (a
    killed build leaves its runs behind); those of a build still running stay."""
    for d in folder.glob(".runs-*"):
        m = re.fullmatch(r"\.runs-(\d+)-.*", d.name)
        if m and not _alive(int(m.group(1))):
            log.info("%s: removing the sorted runs of an interrupted index build", d)
            shutil.rmtree(d, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def build_index(shards: str | os.PathLike, folder: str | os.PathLike | None = None, *,
                fallback: str | os.PathLike | None = None, workers: int | None = None,
                memory: str | int | None = None) -> ShardIndex:
    """Load the index of ``shards`` from ``folder`` (default ``SHARDS/_uid_index``), building
    it when absent or when the shards changed (``workers`` processes scan the shards,
    default one per CPU; ``memory`` bounds the build's sort buffers, default 1G)."""
    shards = Path(shards)
    tars = _shard_list(shards)
    budget = parse_memory(memory if memory is not None else DEFAULT_MEMORY)
    folder = Path(folder) if folder else Path(fallback) if fallback else default_folder(shards)
    from conceptprune.paths import is_within

    if is_within(folder, shards):
        raise ConfigError(f"--index {folder} is inside --shards {shards}: the shards are an input, read only; "
                          "give a folder elsewhere")
    sig = _signature(tars)
    meta_path = folder / "index.json"
    got = _load_existing(folder, tars, sig)
    if got is not None:
        return got
    t0 = time.time()
    workers = max(1, min(workers or os.cpu_count() or 1, len(tars)))
    run_rows = max(1024, budget // RUN_BYTES_PER_ROW)
    log.info("building the uid index of %d shards in %s (memory budget %.0f MiB: runs of %d samples, %d workers)",
             len(tars), folder, budget / 2**20, run_rows, workers)
    folder.mkdir(parents=True, exist_ok=True)
    meta_path.unlink(missing_ok=True)  # written last again: until then the folder holds no index
    _remove_orphan_runs(folder)
    tmp = Path(tempfile.mkdtemp(prefix=f".runs-{os.getpid()}-", dir=folder))
    try:
        runs = _RunWriter(tmp, min(run_rows, 1 << 16))
        skipped = 0
        for i, (u, o, s, bad) in _scans(tars, workers):
            skipped += bad
            if runs.cap < run_rows and runs.n + len(u) > runs.cap:  # grow the buffer only as far as needed
                cap = min(run_rows, max(2 * runs.cap, runs.n + len(u)))
                runs.u = np.resize(runs.u, cap)
                runs.l = np.resize(runs.l, cap)
                runs.cap = cap
            runs.add(i, u, o, s)
        runs.flush()
        runs.u = runs.l = None
        scan_s = time.time() - t0
        n, dups = _merge(runs.runs, runs.total, folder, budget)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if skipped:
        log.warning("%s: %d sample(s) left out of the uid index: their uid is not 32 hex digits", shards, skipped)
    if dups:  # the same sample in two shards: the first in shard order is the one read
        log.warning("%s: %d uids appear in more than one sample; the first is indexed", shards, dups)
    build_s = time.time() - t0
    stats = {"samples": n, "skipped": skipped, "build_s": round(build_s, 3), "scan_s": round(scan_s, 3), "workers": workers,
             "memory_budget": budget, "runs": len(runs.runs), "duplicates": dups,
             "uids_per_s": round(runs.total / max(build_s, 1e-9))}
    write_json(meta_path, {"format": FORMAT, "shards_dir": str(shards.resolve()), "shards": sig, **stats})
    return _load(folder, tars, build_s, stats)
