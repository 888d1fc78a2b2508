"""DataComp keep-lists ("subset files"): sorted ``np.dtype("u8,u8")`` uid arrays.

DataComp's resharder checks only the dtype and then uses ``searchsorted``, so an unsorted
list silently selects the wrong samples: everything read here is validated and an unsorted
list is an error. A uid listed k times (sorted, so its copies are adjacent) is a multiset:
DataComp's resharder writes that sample k times (upsampling). Reading accepts that;
``read_keep_list(path)`` returns the set of uids, ``read_keep_list(path, multiset=True)``
every entry, ``multiplicities(arr)`` the distinct uids and their counts. Filters write
sets; ``keep-list union|intersect|diff|concat|sort|from-uids`` keep multiplicities (see
``combine``). Accepted files: ``np.save`` output (``.npy``, also of a ``np.memmap``) and
DataComp's "memory-mapped format", a raw headerless array of 16-byte records
(``np.memmap(path, np.dtype("u8,u8"), mode="w+", shape=(n,))``).

Each keep-list gets a JSON manifest beside it (``KEEP.npy`` -> ``KEEP.json``) that records
the keep-list's sha256: ``publish`` writes the new list under a temporary name first, then
the extra outputs and the manifest, and renames the list into place last, removing an old
list before the new manifest appears, so an old list never sits beside a new manifest.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
from numpy.lib import format as npformat

from . import uids as U
from .atomic import StagedFile, _json_default, file_digest, is_write_failure, staged_name, write_error
from .errors import ConfigError, KeepListError

NPY_MAGIC = b"\x93NUMPY"
SET_OPS = ("union", "intersect", "diff", "concat")


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
    """Sort; raise KeepListError naming the first duplicated uid (for outputs that must be
    sets, such as a filter's)."""
    arr = sort_uids(arr)
    dup = duplicate_mask(arr)
    if dup.any():
        i = int(np.flatnonzero(dup)[0])
        raise KeepListError(f"{what}: uid {U.pair_to_uid(*arr[i])} is listed more than once "
                            f"({int(dup.sum())} duplicate entries in all)")
    return arr


def multiplicities(sorted_arr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(distinct uids, how often each is listed) of a sorted keep-list."""
    if len(sorted_arr) == 0:
        return sorted_arr[:0].copy(), np.zeros(0, np.int64)
    starts = np.flatnonzero(~duplicate_mask(sorted_arr))
    counts = np.diff(np.append(starts, len(sorted_arr))).astype(np.int64)
    return sorted_arr[starts], counts


def describe(arr: np.ndarray) -> dict:
    """Entries, distinct uids and the multiplicity histogram of a sorted keep-list."""
    _, counts = multiplicities(arr)
    hist = np.bincount(counts) if len(counts) else np.zeros(1, np.int64)
    return {"entries": int(len(arr)), "distinct": int(len(counts)),
            "repeated_uids": int((counts > 1).sum()), "max_multiplicity": int(counts.max()) if len(counts) else 0,
            "multiplicities": {str(k): int(v) for k, v in enumerate(hist) if k and v}}


# -- reading ------------------------------------------------------------------------------


def _load(path: Path) -> np.ndarray:
    """The file's array, memory-mapped, with its dtype and shape checked."""
    if not path.exists():
        raise KeepListError(f"{path}: keep-list not found")
    if path.is_dir():
        raise KeepListError(f"{path}: is a folder, not a keep-list file")
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
        size = path.stat().st_size
    except OSError as e:
        raise KeepListError(f"{path}: cannot read ({e.strerror or e})") from None
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        raise KeepListError(f"{path}: is a zip archive (an .npz?), not a keep-list; a keep-list is one "
                            "np.dtype('u8,u8') array saved with np.save (not np.savez)")
    if head.startswith(b"PAR1"):
        raise KeepListError(f"{path}: is a parquet file, not a keep-list (.npy of np.dtype('u8,u8'))")
    if not head.startswith(NPY_MAGIC):
        return _load_raw(path, head, size)
    try:
        with open(path, "rb") as f:
            version = npformat.read_magic(f)
            shape, fortran, dtype = (npformat.read_array_header_1_0(f) if version == (1, 0) else
                                     npformat.read_array_header_2_0(f) if version == (2, 0) else
                                     npformat._read_array_header(f, version))
    except Exception as e:  # numpy raises several types for a damaged header
        raise KeepListError(f"{path}: not a readable .npy file ({e})") from None
    if dtype.hasobject:
        raise KeepListError(f"{path}: holds Python objects (pickled data), not DataComp's np.dtype('u8,u8'); "
                            "it is never unpickled")
    _check_dtype(path, dtype)
    if len(shape) != 1:
        raise KeepListError(f"{path}: expected a 1-D array, got shape {shape}")
    if shape[0] == 0:
        return np.empty(0, U.UID_DTYPE)
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as e:
        raise KeepListError(f"{path}: not a readable .npy file ({e})") from None


def _load_raw(path: Path, head: bytes, size: int) -> np.ndarray:
    """DataComp's "memory-mapped format": raw 16-byte (u8, u8) records, no header."""
    if head and all(c in b"0123456789abcdefABCDEF \t\r\n," for c in head):
        raise KeepListError(f"{path}: looks like a text file of uids, not a keep-list "
                            "(conceptprune keep-list from-uids converts one)")
    if size % U.UID_DTYPE.itemsize:
        raise KeepListError(f"{path}: neither an .npy file (no NUMPY header) nor a raw memory-mapped "
                            f"u8,u8 array ({size} bytes is not a multiple of 16)")
    if size == 0:  # DataComp's np.memmap refuses it too; an empty list is an .npy with a header
        raise KeepListError(f"{path}: empty file (0 bytes), not a keep-list (a truncated write?)")
    return np.memmap(path, dtype=np.dtype("<u8,<u8"), mode="r")


def _check_dtype(path, dtype: np.dtype) -> None:
    if dtype.names is None or len(dtype.names) != 2 or any(
            dtype.fields[n][0] != np.dtype("<u8") for n in dtype.names):
        raise KeepListError(f"{path}: dtype is {dtype}, expected DataComp's "
                            f"np.dtype('u8,u8') (two little-endian uint64 fields)")


def read_keep_list(path: str | os.PathLike, *, multiset: bool = False) -> np.ndarray:
    """Load and validate a keep-list (dtype ``u8,u8``, 1-D, sorted ascending).

    A uid listed several times is legal (DataComp upsamples it): by default the set of uids
    is returned (each once); ``multiset=True`` returns every entry, repeats included, in
    file order (which is sorted)."""
    path = Path(path)
    raw = _load(path)
    hi, lo = U.split(raw)
    arr = U.make_array(hi, lo)  # a plain in-memory copy; the mapping is released
    del raw, hi, lo
    hi, lo = U.split(arr)
    if len(arr) > 1:
        order_ok = (hi[1:] > hi[:-1]) | ((hi[1:] == hi[:-1]) & (lo[1:] >= lo[:-1]))
        if not order_ok.all():
            i = int(np.flatnonzero(~order_ok)[0]) + 1
            raise KeepListError(f"{path}: not sorted at entry {i}; DataComp's resharder uses "
                                "searchsorted and would select the wrong samples "
                                "(fix: conceptprune keep-list sort)")
    if multiset:
        return arr
    dup = duplicate_mask(arr)
    return arr[~dup] if dup.any() else arr


def read_any_order(path: str | os.PathLike) -> np.ndarray:
    """Every entry of a keep-list file as stored, in any order (dtype and shape checked):
    for repairing lists made by other tools (``keep-list sort``)."""
    raw = _load(Path(path))
    return U.make_array(*U.split(raw))


def read_manifest(path: str | os.PathLike) -> dict | None:
    mp = manifest_path(path)
    if not mp.exists():
        return None
    try:
        with open(mp) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise KeepListError(f"{mp}: not a readable manifest ({e})") from None


def file_sha256(path: str | os.PathLike) -> str:
    return file_digest(path, "sha256")


def manifest_matches(path: str | os.PathLike) -> bool | None:
    """Does the manifest beside ``path`` describe this very file (its recorded sha256)?
    None when there is no manifest or it predates the recorded hash."""
    m = read_manifest(path)
    rec = (m or {}).get("keep_list") or {}
    if not rec.get("sha256"):
        return None
    return rec["sha256"] == file_sha256(path)


# -- outputs ------------------------------------------------------------------------------


def _same_file(a: Path, b: Path) -> bool:
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return a.resolve() == b.resolve()


def check_output(out: str | os.PathLike, *, inputs: dict[str, str | os.PathLike | None] | None = None,
                 overwrite: bool = False, flag: str = "--out") -> Path:
    """Refuse an output before any work: not ``.npy``; the same file as an input (or the
    input's manifest); an existing file without ``overwrite``; a folder that cannot be written."""
    out = Path(out)
    if out.suffix != ".npy":
        raise KeepListError(f"{flag} {out}: a keep-list file must end in .npy")
    for name, p in (inputs or {}).items():
        if p is None:
            continue
        p = Path(p)
        if _same_file(out, p) or _same_file(manifest_path(out), p):
            raise ConfigError(f"{flag} {out} is also the input {name} {p}: the input would be overwritten; "
                              "write to another file")
    if out.is_dir():
        raise ConfigError(f"{flag} {out} is a folder")
    if out.exists() and not overwrite:
        raise ConfigError(f"{flag} {out} already exists; pass --overwrite to replace it (and its manifest)")
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} {out}: cannot write into {parent}")
    return out


class _HashingWriter:
    """File-like wrapper that hashes what it writes (np.save then takes the write() path)."""

    def __init__(self, f):
        self.f, self.h, self.bytes = f, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.h.update(data)
        self.bytes += len(data)
        return self.f.write(data)


def publish(path: str | os.PathLike, write_body: Callable, manifest: dict | None,
            extras: dict[str, Callable[[Path], None]] | None = None, *, entries: int,
            distinct: int | None = None) -> Path:
    """Write a keep-list with its manifest and extra outputs in a crash-safe order.

    1. the keep-list's bytes go to a temporary file (fsynced), hashed on the way;
    2. each extra output ``suffix -> writer(path)`` is written to a temporary name, and so
       is the manifest (with the new list's sha256, entries and distinct uids);
    3. only then is anything replaced, by removals and renames only: the old keep-list is
       removed, the extras and the manifest are renamed, and the keep-list is renamed into
       place last. A failure in 1-2 (a full disk included) changes nothing on disk; a kill
       during 3 leaves no keep-list, never an old list beside a new manifest.
    ``manifest=None`` removes a manifest left by an earlier list at this path."""
    path = Path(path)
    if path.suffix != ".npy":
        raise KeepListError(f"{path}: a keep-list file must end in .npy")
    staged = StagedFile(path, "wb")
    extra_tmp: list[tuple[Path, Path]] = []
    try:
        w = _HashingWriter(staged.file)
        try:
            write_body(w)
        except OSError as e:
            if is_write_failure(e):
                raise write_error(path, e) from None
            raise
        staged.finish()
        for suffix, writer in (extras or {}).items():
            final = path.with_suffix(suffix)
            tmp = staged_name(final)
            extra_tmp.append((tmp, final))
            try:
                writer(tmp)
            except OSError as e:
                if is_write_failure(e):
                    raise write_error(final, e) from None
                raise
        staged_manifest = None
        if manifest is not None:
            manifest = dict(manifest)
            counts = dict(manifest.get("counts") or {})
            counts["out"] = int(entries)
            manifest["counts"] = counts
            manifest["keep_list"] = {"file": path.name, "sha256": w.h.hexdigest(), "bytes": w.bytes,
                                     "entries": int(entries),
                                     "distinct": int(entries if distinct is None else distinct)}
            staged_manifest = StagedFile(manifest_path(path), "w")
            extra_tmp.append((staged_manifest.tmp, manifest_path(path)))
            json.dump(manifest, staged_manifest.file, indent=2, default=_json_default)
            staged_manifest.file.write("\n")
            staged_manifest.finish()
        # -- commit: renames only from here on
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        if manifest is None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(manifest_path(path))
        for tmp, final in extra_tmp:  # the manifest is the last of these
            os.replace(tmp, final)
        extra_tmp = []
        return staged.commit()
    except BaseException as e:
        staged.discard()
        for tmp, _ in extra_tmp:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        if is_write_failure(e):
            raise write_error(path, e) from None
        raise


def write_keep_list(path: str | os.PathLike, arr: np.ndarray, manifest: dict | None = None, *,
                    multiset: bool = False, extras: dict | None = None) -> Path:
    """Write a sorted keep-list atomically (and its manifest and extras, if given; see
    ``publish``). A set unless ``multiset``: then repeated uids stay (DataComp upsamples them)."""
    path = Path(path)
    if path.suffix != ".npy":
        raise KeepListError(f"{path}: a keep-list file must end in .npy")
    arr = sort_uids(arr) if multiset else normalise(arr, what=str(path))
    distinct = int(len(arr) - duplicate_mask(arr).sum()) if multiset else len(arr)
    return publish(path, lambda f: np.save(f, arr, allow_pickle=False), manifest, extras,
                   entries=len(arr), distinct=distinct)


# -- set operations -----------------------------------------------------------------------


class UidIndex:
    """A sorted uid array prepared for many ``member`` queries: its high and low words as
    contiguous columns. numpy's searchsorted copies a strided column (a field of the uid
    array) on every call: against 3.84M candidates that was 11 of the 37 ms a 16k-row chunk
    took, O(list) work per chunk of a pass over the pool."""

    def __init__(self, sorted_keep: np.ndarray):
        self.uids = sorted_keep
        hi, lo = U.split(sorted_keep)
        self.hi, self.lo = np.ascontiguousarray(hi), np.ascontiguousarray(lo)

    def __len__(self) -> int:
        return len(self.uids)


def member(sorted_keep: "np.ndarray | UidIndex", query: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each query uid: is it in ``sorted_keep``, and at which index (-1 if not). Pass a
    ``UidIndex`` when querying the same list many times."""
    index_ = sorted_keep if isinstance(sorted_keep, UidIndex) else UidIndex(sorted_keep)
    khi, klo = index_.hi, index_.lo
    qhi, qlo = U.split(query)
    n = len(index_)
    if n == 0:
        return np.zeros(len(query), bool), np.full(len(query), -1, np.int64)
    # the queries in sorted order: each binary search then starts where the last one ended, on
    # memory the cache still holds (2.5x faster for 16k random queries into 3.84M uids)
    order = np.argsort(qhi, kind="stable")
    left = np.empty(len(query), dtype=np.int64)
    left[order] = np.searchsorted(khi, qhi[order], side="left")
    same_hi = khi[np.minimum(left, n - 1)] == qhi
    same_hi &= left < n
    run = same_hi & (left + 1 < n)
    run &= khi[np.minimum(left + 1, n - 1)] == qhi  # several keep entries share this high word
    found = np.zeros(len(query), dtype=bool)
    index = np.full(len(query), -1, dtype=np.int64)
    single = np.flatnonzero(same_hi & ~run)
    hit = single[klo[left[single]] == qlo[single]]
    found[hit] = True
    index[hit] = left[hit]
    # Several keep entries share a high word (short uids, or a chance collision): search
    # the low word inside each run.
    for q in np.flatnonzero(run):
        right = int(np.searchsorted(khi, qhi[q], side="right"))
        lo_run = klo[left[q]:right]
        j = int(np.searchsorted(lo_run, qlo[q]))
        if j < len(lo_run) and lo_run[j] == qlo[q]:
            found[q] = True
            index[q] = left[q] + j
    return found, index


def union(*lists: np.ndarray) -> np.ndarray:
    """The set of uids in any list (sorted, each once)."""
    merged = sort_uids(np.concatenate(lists)) if lists else np.empty(0, U.UID_DTYPE)
    return merged[~duplicate_mask(merged)]


def intersect(first: np.ndarray, *others: np.ndarray) -> np.ndarray:
    """uids of ``first`` present in every other list (result sorted, a set)."""
    out = union(first)
    for o in others:
        out = out[member(union(o), out)[0]]
    return out


def difference(first: np.ndarray, *others: np.ndarray) -> np.ndarray:
    """uids of ``first`` present in none of the others (result sorted, a set)."""
    out = union(first)
    for o in others:
        out = out[~member(union(o), out)[0]]
    return out


def combine(op: str, lists: list[np.ndarray]) -> np.ndarray:
    """Set operations on keep-lists with multiplicities (sorted multisets in, one out):

    - ``union``: every uid of any list, as many times as the list that lists it most (max);
    - ``intersect``: uids in every list, as many times as the FIRST list lists them (the
      other lists act as sets: a filter on the first);
    - ``diff``: uids of the first list in none of the others, as many times as the first
      lists them (the others act as sets: every copy is removed);
    - ``concat``: all entries of all lists (multiplicities add up: upsampling by combination).
    On sets (every uid once) union, intersect and diff are the plain set operations."""
    if op not in SET_OPS:
        raise ConfigError(f"unknown keep-list operation {op!r} (one of {', '.join(SET_OPS)})")
    if not lists:
        return np.empty(0, U.UID_DTYPE)
    if op == "concat":
        return sort_uids(np.concatenate(lists))
    if op == "union":
        parts = [multiplicities(sort_uids(a)) for a in lists]
        uids = np.concatenate([p[0] for p in parts])
        counts = np.concatenate([p[1] for p in parts])
        hi, lo = U.split(uids)
        order = np.lexsort((-counts, lo, hi))  # per uid, its largest count first
        uids, counts = uids[order], counts[order]
        first = ~duplicate_mask(uids)
        return np.repeat(U.make_array(*U.split(uids[first])), counts[first])
    first = sort_uids(lists[0])
    keep = np.ones(len(first), dtype=bool)
    for o in lists[1:]:
        found = member(union(o), first)[0]
        keep &= found if op == "intersect" else ~found
    return first[keep]


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

    def write(self, path: str | os.PathLike, manifest: dict | None = None, extras: dict | None = None) -> Path:
        """Write the sorted keep-list atomically, streaming bucket by bucket (see ``publish``)."""
        path = Path(path)
        if path.suffix != ".npy":
            raise KeepListError(f"{path}: a keep-list file must end in .npy")
        if self._dir is None:  # small: the plain path
            return write_keep_list(path, np.concatenate(self._buf) if self._buf else
                                   np.empty(0, U.UID_DTYPE), manifest, extras=extras)

        def body(f):
            npformat.write_array_header_1_0(f, {"descr": npformat.dtype_to_descr(U.UID_DTYPE),
                                                "fortran_order": False, "shape": (self._count,)})
            for block in self.sorted_blocks(what=str(path)):
                f.write(block.tobytes())
        return publish(path, body, manifest, extras, entries=self._count)

    def cleanup(self) -> None:
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __del__(self):
        self.cleanup()
