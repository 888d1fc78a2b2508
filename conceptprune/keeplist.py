"""DataComp keep-lists ("subset files"): sorted, unique ``np.dtype("u8,u8")`` uid arrays.

DataComp's resharder checks only the dtype and then uses ``searchsorted``, so an unsorted
list silently selects the wrong samples. Everything written here is sorted and unique, and
everything read here is validated. Each keep-list gets a JSON manifest beside it
(``KEEP.npy`` -> ``KEEP.json``).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from . import uids as U
from .atomic import atomic_open, write_json
from .errors import KeepListError


def manifest_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path.with_suffix(".json") if path.suffix == ".npy" else Path(f"{path}.json")


def sort_uids(arr: np.ndarray) -> np.ndarray:
    """Sorted copy in DataComp's order (hi, then lo), as plain ``u8,u8``."""
    hi, lo = U.split(arr)
    order = np.lexsort((lo, hi))
    return U.make_array(hi[order], lo[order])


def duplicate_mask(sorted_arr: np.ndarray) -> np.ndarray:
    """True at every position whose uid equals the previous one (input sorted)."""
    hi, lo = U.split(sorted_arr)
    dup = np.zeros(len(sorted_arr), dtype=bool)
    dup[1:] = (hi[1:] == hi[:-1]) & (lo[1:] == lo[:-1])
    return dup


def normalise(arr: np.ndarray, *, what: str = "keep-list") -> np.ndarray:
    """Sort; raise KeepListError naming the first duplicated uid."""
    arr = sort_uids(arr)
    dup = duplicate_mask(arr)
    if dup.any():
        i = int(np.flatnonzero(dup)[0])
        raise KeepListError(f"{what}: uid {U.pair_to_uid(*arr[i])} is listed more than once "
                            f"({int(dup.sum())} duplicate entries in all)")
    return arr


def write_keep_list(path: str | os.PathLike, arr: np.ndarray, manifest: dict | None = None) -> Path:
    """Write a sorted, unique keep-list atomically (and its manifest, if given)."""
    path = Path(path)
    if path.suffix != ".npy":
        raise KeepListError(f"{path}: a keep-list file must end in .npy")
    arr = normalise(arr, what=str(path))
    if manifest is not None:
        manifest = dict(manifest)
        manifest.setdefault("counts", {})["out"] = int(len(arr))
        write_json(manifest_path(path), manifest)
    with atomic_open(path, "wb") as f:
        np.save(f, arr, allow_pickle=False)
    return path


def read_keep_list(path: str | os.PathLike) -> np.ndarray:
    """Load and validate a keep-list: dtype ``u8,u8``, one dimension, sorted, unique."""
    path = Path(path)
    if not path.exists():
        raise KeepListError(f"{path}: keep-list not found")
    try:
        arr = np.load(path, allow_pickle=False)
    except Exception as e:  # numpy raises several types for a damaged file
        raise KeepListError(f"{path}: not a readable .npy file ({e})") from None
    if arr.ndim != 1:
        raise KeepListError(f"{path}: expected a 1-D array, got shape {arr.shape}")
    if arr.dtype.names is None or len(arr.dtype.names) != 2 or any(
            arr.dtype.fields[n][0] != np.dtype("<u8") for n in arr.dtype.names):
        raise KeepListError(f"{path}: dtype is {arr.dtype}, expected DataComp's "
                            f"np.dtype('u8,u8') (two little-endian uint64 fields)")
    hi, lo = U.split(arr)
    if len(arr) > 1:
        increasing = (hi[1:] > hi[:-1]) | ((hi[1:] == hi[:-1]) & (lo[1:] > lo[:-1]))
        if not increasing.all():
            i = int(np.flatnonzero(~increasing)[0]) + 1
            same = hi[i] == hi[i - 1] and lo[i] == lo[i - 1]
            if same:
                raise KeepListError(f"{path}: uid {U.pair_to_uid(hi[i], lo[i])} is listed more "
                                    f"than once (entry {i}); DataComp would upsample it")
            raise KeepListError(f"{path}: not sorted at entry {i}; DataComp's resharder uses "
                                "searchsorted and would select the wrong samples "
                                "(fix: conceptprune keep-list sort)")
    return U.make_array(hi, lo)


def read_manifest(path: str | os.PathLike) -> dict | None:
    mp = manifest_path(path)
    if not mp.exists():
        return None
    with open(mp) as f:
        return json.load(f)


def member(sorted_keep: np.ndarray, query: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each query uid: is it in ``sorted_keep``, and at which index (-1 if not)."""
    khi, klo = U.split(sorted_keep)
    qhi, qlo = U.split(query)
    if len(sorted_keep) == 0:
        return np.zeros(len(query), bool), np.full(len(query), -1, np.int64)
    left = np.searchsorted(khi, qhi, side="left")
    right = np.searchsorted(khi, qhi, side="right")
    found = np.zeros(len(query), dtype=bool)
    index = np.full(len(query), -1, dtype=np.int64)
    single = right - left == 1
    cand = left[single]
    hit = klo[cand] == qlo[single]
    found[np.flatnonzero(single)[hit]] = True
    index[np.flatnonzero(single)[hit]] = cand[hit]
    # Several keep entries share a high word (short uids, or a chance collision): search
    # the low word inside each run.
    for q in np.flatnonzero(right - left > 1):
        lo_run = klo[left[q]:right[q]]
        j = int(np.searchsorted(lo_run, qlo[q]))
        if j < len(lo_run) and lo_run[j] == qlo[q]:
            found[q] = True
            index[q] = left[q] + j
    return found, index


def union(*lists: np.ndarray) -> np.ndarray:
    merged = sort_uids(np.concatenate(lists)) if lists else np.empty(0, U.UID_DTYPE)
    return merged[~duplicate_mask(merged)]


def intersect(first: np.ndarray, *others: np.ndarray) -> np.ndarray:
    """uids of ``first`` present in every other list (result sorted)."""
    out = union(first)
    for o in others:
        out = out[member(sort_uids(o), out)[0]]
    return out


def difference(first: np.ndarray, *others: np.ndarray) -> np.ndarray:
    """uids of ``first`` present in none of the others (result sorted)."""
    out = union(first)
    for o in others:
        out = out[~member(sort_uids(o), out)[0]]
    return out


class UidCollector:
    """Collects selected uids chunk by chunk and writes them as a sorted keep-list with
    bounded memory.

    Up to ``spill_rows`` uids stay in memory. Beyond that they are spilled to 256 temporary
    files by the top byte of the uid (a range partition), so sorting each bucket in turn
    yields the global order, and a duplicate can only sit inside one bucket.
    """

    BUCKET_SHIFT = np.uint64(56)

    def __init__(self, spill_rows: int = 1 << 18, spill_dir: str | os.PathLike | None = None):
        self.spill_rows = spill_rows
        self.spill_parent = Path(spill_dir) if spill_dir else None
        self._buf: list[np.ndarray] = []
        self._buf_rows = 0
        self._count = 0
        self._dir: Path | None = None

    def __len__(self) -> int:
        return self._count

    def add(self, arr: np.ndarray) -> None:
        if len(arr) == 0:
            return
        self._buf.append(U.make_array(*U.split(arr)))
        self._buf_rows += len(arr)
        self._count += len(arr)
        if self._buf_rows >= self.spill_rows:
            self._spill()

    def _spill(self) -> None:
        if not self._buf:
            return
        data = np.concatenate(self._buf)
        self._buf, self._buf_rows = [], 0
        if self._dir is None:
            parent = self.spill_parent or Path(tempfile.gettempdir())
            parent.mkdir(parents=True, exist_ok=True)
            self._dir = Path(tempfile.mkdtemp(prefix=".uid-spill-", dir=parent))
        bucket = (data["f0"] >> self.BUCKET_SHIFT).astype(np.intp)
        order = np.argsort(bucket, kind="stable")
        data, counts = data[order], np.bincount(bucket, minlength=256)
        ends = np.cumsum(counts)
        for b in np.flatnonzero(counts):
            with open(self._dir / f"{b:03d}.bin", "ab") as f:
                f.write(data[ends[b] - counts[b]: ends[b]].tobytes())

    def sorted_blocks(self, what: str = "keep-list"):
        """Sorted, duplicate-checked blocks in global order."""
        if self._dir is None:
            yield normalise(np.concatenate(self._buf) if self._buf else np.empty(0, U.UID_DTYPE), what=what)
            return
        self._spill()
        for b in range(256):
            p = self._dir / f"{b:03d}.bin"
            if p.exists():
                yield normalise(np.fromfile(p, dtype=U.UID_DTYPE), what=what)

    def to_array(self) -> np.ndarray:
        """All uids, sorted (materialised in memory)."""
        blocks = list(self.sorted_blocks())
        return np.concatenate(blocks) if blocks else np.empty(0, U.UID_DTYPE)

    def write(self, path: str | os.PathLike, manifest: dict | None = None) -> Path:
        """Write the sorted keep-list atomically, streaming bucket by bucket."""
        from numpy.lib import format as npformat

        path = Path(path)
        if path.suffix != ".npy":
            raise KeepListError(f"{path}: a keep-list file must end in .npy")
        if self._dir is None:  # small: the plain path
            return write_keep_list(path, np.concatenate(self._buf) if self._buf else
                                   np.empty(0, U.UID_DTYPE), manifest)
        if manifest is not None:
            manifest = dict(manifest)
            manifest.setdefault("counts", {})["out"] = int(self._count)
        with atomic_open(path, "wb") as f:
            npformat.write_array_header_1_0(f, {"descr": npformat.dtype_to_descr(U.UID_DTYPE),
                                                "fortran_order": False, "shape": (self._count,)})
            for block in self.sorted_blocks(what=str(path)):
                f.write(block.tobytes())
            if manifest is not None:  # the manifest lands before the keep-list it describes
                write_json(manifest_path(path), manifest)
        return path

    def cleanup(self) -> None:
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __del__(self):
        self.cleanup()
