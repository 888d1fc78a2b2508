"""Row-range access to arrays inside ``.npz`` files, and a streaming ``.npz`` writer.

DataComp ships one npz per parquet (keys ``b32_img``, ``l14_img``, ...). A 128M-row pool
has ~750 GB of them, so nothing here loads a whole array: stored (uncompressed) members are
read with positioned reads at their byte offset; compressed members are decompressed as a
forward stream. Plain reads (not mmap) keep the process RSS bounded by the chunk, because
page-cache pages of a mapping would count towards it.
"""

from __future__ import annotations

import os
import shutil
import struct
import tempfile
import zipfile
import zlib
from pathlib import Path

import numpy as np
from numpy.lib import format as npformat

from .atomic import atomic_open
from .errors import PoolError


_CAST_POOL = None


def row_parallel(fn, n: int, min_rows: int = 2048) -> None:
    """Call fn(start, stop) over row ranges on all cores (numpy releases the GIL in the
    casts and reductions used here; the single-threaded cast of fp16 embeddings is the
    slowest step of reading them)."""
    global _CAST_POOL
    workers = min(os.cpu_count() or 1, 8)
    if n < min_rows or workers == 1:
        fn(0, n)
        return
    if _CAST_POOL is None:
        from concurrent.futures import ThreadPoolExecutor

        _CAST_POOL = ThreadPoolExecutor(workers, thread_name_prefix="rows")
    bounds = np.linspace(0, n, workers + 1).astype(int)
    list(_CAST_POOL.map(lambda i: fn(bounds[i], bounds[i + 1]), range(workers)))


def to_float32(x: np.ndarray, norms: np.ndarray | None = None) -> np.ndarray:
    """Cast 2-D rows to float32 (in parallel); fills ``norms`` with the row norms if given."""
    if x.dtype == np.float32 and norms is None:
        return x
    out = np.empty(x.shape, dtype=np.float32)

    def part(a, b):
        np.copyto(out[a:b], x[a:b])
        if norms is not None:
            norms[a:b] = np.einsum("ij,ij->i", out[a:b], out[a:b])

    row_parallel(part, len(x))
    if norms is not None:
        with np.errstate(invalid="ignore"):
            np.sqrt(norms, out=norms)
    return out


def npz_keys(path: str | os.PathLike) -> list[str]:
    with _open_zip(path) as zf:
        return [n[:-4] for n in zf.namelist() if n.endswith(".npy")]


def _open_zip(path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise PoolError(f"{path}: not a readable .npz file ({e}); re-download or re-embed it") from None


def _pread_exact(fd: int, nbytes: int, offset: int, what: str) -> bytearray:
    """Exactly nbytes at offset (positioned reads, so no shared file position)."""
    buf = bytearray(nbytes)
    view, got = memoryview(buf), 0
    while got < nbytes:
        k = os.preadv(fd, [view[got:]], offset + got)
        if k == 0:
            raise PoolError(f"{what}: file ends early (truncated?)")
        got += k
    return buf


class _Closing:
    """Context manager and finaliser around ``close()``."""

    def close(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


class NpzArray(_Closing):
    """One 2-D array inside an npz, read by row ranges."""

    def __init__(self, path: str | os.PathLike, key: str):
        self.path = Path(path)
        self.key = key
        with _open_zip(self.path) as zf:
            member = f"{key}.npy"
            try:
                info = zf.getinfo(member)
            except KeyError:
                keys = [n[:-4] for n in zf.namelist() if n.endswith(".npy")]
                raise PoolError(f"{self.path}: no array {key!r} (it has: {', '.join(keys) or 'none'})") from None
            try:
                with zf.open(info) as f:
                    shape, fortran, dtype = _read_header(f)
                    header_len = f.tell()
            except (ValueError, zipfile.BadZipFile, EOFError, OSError) as e:
                raise PoolError(f"{self.path}[{key}]: corrupt array header ({e})") from None
        if fortran or len(shape) != 2:
            raise PoolError(f"{self.path}[{key}]: expected a C-ordered 2-D array, got shape "
                            f"{shape}{' (Fortran order)' if fortran else ''}")
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self.row_bytes = self.shape[1] * self.dtype.itemsize
        self._info = info
        self._stored = info.compress_type == zipfile.ZIP_STORED
        self._fd: int | None = None
        self._stream = None
        self._stream_row = 0
        # CRC-32 of the member, accumulated over reads that run contiguously from row 0:
        # a full sequential pass (every pool read of a whole file) ends with the zip check
        self._crc_rows = 0  # rows covered so far; -1 once reads stop being contiguous
        self._crc = 0
        if self._stored:
            self._data_offset = _member_data_offset(self.path, info) + header_len
            expected = header_len + self.shape[0] * self.row_bytes
            if info.file_size < expected:
                raise PoolError(f"{self.path}[{key}]: truncated ({info.file_size} bytes, "
                                f"header says {expected})")
        self._header_len = header_len

    @property
    def rows(self) -> int:
        return self.shape[0]

    @property
    def dim(self) -> int:
        return self.shape[1]

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) as a new array of the stored dtype."""
        if not 0 <= start <= stop <= self.rows:
            raise IndexError(f"rows [{start}, {stop}) outside {self.rows}")
        n = stop - start
        nbytes = n * self.row_bytes
        if self._stored:
            if self._fd is None:
                self._fd = os.open(self.path, os.O_RDONLY)
            buf = _pread_exact(self._fd, nbytes, self._data_offset + start * self.row_bytes,
                               f"{self.path}[{self.key}] rows {start}-{stop}")
            self._crc_update(start, stop, buf)
        else:
            buf = self._read_stream(start, nbytes)
        return np.frombuffer(buf, dtype=self.dtype).reshape(n, self.dim)

    def _crc_update(self, start: int, stop: int, buf) -> None:
        """Extend the running CRC-32 when this read continues the previous one; at the last
        row compare it with the zip directory's (a corrupt member raises PoolError)."""
        if start == 0:
            self._crc_rows = 0  # a (new) pass from the top
        if self._crc_rows != start or stop == start:
            self._crc_rows = -1 if self._crc_rows != start else self._crc_rows
            return
        if start == 0:
            head = _pread_exact(self._fd, self._header_len, self._data_offset - self._header_len,
                                f"{self.path}[{self.key}] header")
            self._crc = zlib.crc32(head)
        self._crc = zlib.crc32(buf, self._crc)
        self._crc_rows = stop
        if stop == self.rows:
            tail = self._info.file_size - self._header_len - self.rows * self.row_bytes
            if tail > 0:
                self._crc = zlib.crc32(_pread_exact(self._fd, tail, self._data_offset + self.rows * self.row_bytes,
                                                    f"{self.path}[{self.key}] tail"), self._crc)
            self._crc_rows = -1  # checked once
            if self._crc != self._info.CRC:
                raise PoolError(f"{self.path}: member {self.key}.npy fails its zip CRC-32 check (the data is "
                                "corrupt); re-download or re-embed this file")

    def read_rows(self, rows: np.ndarray) -> np.ndarray:
        """Rows at the given sorted local indices (contiguous runs are read together)."""
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) == 0:
            return np.empty((0, self.dim), dtype=self.dtype)
        if not self._stored:  # compressed: stream over the span once
            block = self.read(int(rows[0]), int(rows[-1]) + 1)
            return block[rows - rows[0]]
        # one read per span of rows less than 128 apart: a syscall costs about as much as
        # reading ~50 extra rows of a 768-d fp16 array
        breaks = np.flatnonzero(np.diff(rows) > 128) + 1
        # and at most 8192 rows a read, so memory stays at a block whatever the density
        long_ = np.flatnonzero(np.diff(rows // 8192) > 0) + 1
        breaks = np.union1d(breaks, long_).astype(np.int64)
        starts = np.concatenate([[0], breaks])
        ends = np.concatenate([breaks, [len(rows)]])
        parts = []
        for a, b in zip(starts, ends):
            lo = int(rows[a])
            block = self.read(lo, int(rows[b - 1]) + 1)
            parts.append(block[rows[a:b] - lo])
        return np.concatenate(parts)

    def _read_stream(self, start: int, nbytes: int) -> bytes:
        if self._stream is None or start < self._stream_row:
            self._close_stream()
            self._zip = _open_zip(self.path)
            self._stream = self._zip.open(self._info)
            self._stream.read(self._header_len)
            self._stream_row = 0
        try:
            skip = (start - self._stream_row) * self.row_bytes
            while skip > 0:
                skip -= len(self._stream.read(min(skip, 1 << 24)))
            data = self._stream.read(nbytes)
        except Exception as e:  # zlib.error, BadZipFile, EOFError, OSError
            raise PoolError(f"{self.path}[{self.key}]: corrupt compressed data ({e})") from None
        if len(data) != nbytes:
            raise PoolError(f"{self.path}[{self.key}]: data ends early (truncated npz)")
        self._stream_row = start + nbytes // self.row_bytes
        if self._stream_row == self.rows:  # read to the end: zipfile then checks the CRC-32
            try:
                while self._stream.read(1 << 20):
                    pass
            except Exception as e:
                raise PoolError(f"{self.path}: member {self.key}.npy fails its zip check ({e}); "
                                "re-download or re-embed this file") from None
        return data

    def _close_stream(self):
        if self._stream is not None:
            self._stream.close()
            self._zip.close()
            self._stream = None

    def close(self):
        self._close_stream()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _read_header(f):
    version = npformat.read_magic(f)
    if version == (1, 0):
        return npformat.read_array_header_1_0(f)
    if version == (2, 0):
        return npformat.read_array_header_2_0(f)
    return npformat._read_array_header(f, version)  # 3.0: no public reader


def _member_data_offset(path: Path, info: zipfile.ZipInfo) -> int:
    """Byte offset of a stored member's data: local header (30 bytes) + name + extra."""
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)
    if len(local) != 30 or local[:4] != b"PK\x03\x04":
        raise PoolError(f"{path}: corrupt zip local header for {info.filename}")
    name_len, extra_len = struct.unpack("<HH", local[26:30])
    return info.header_offset + 30 + name_len + extra_len


def verify_npz(path: str | os.PathLike, skip: tuple[str, ...] = ()) -> int:
    """Read every member of an npz once and check its CRC-32; returns the members checked.
    A failing member raises PoolError naming the file and the member."""
    path = Path(path)
    checked = 0
    with _open_zip(path) as zf:
        for info in zf.infolist():
            if info.filename.endswith(".npy") and info.filename[:-4] in skip:
                continue
            try:
                with zf.open(info) as f:
                    while f.read(1 << 24):
                        pass
            except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as e:
                raise PoolError(f"{path}: member {info.filename} fails its zip check ({e}); "
                                "re-download or re-embed this file") from None
            checked += 1
    return checked


class NpzWriter:
    """Write an npz whose arrays are filled row block by row block.

    Each array goes to a temporary ``.npy`` first; ``close()`` stores them (uncompressed,
    so readers can seek) into the npz atomically. Memory stays at one block.
    """

    def __init__(self, path: str | os.PathLike, arrays: dict[str, tuple[int, int, str]]):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmpdir = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.", dir=self.path.parent))
        self._files = {}
        self._meta = {}
        for key, (rows, dim, dtype) in arrays.items():
            dtype = np.dtype(dtype)
            p = self._tmpdir / f"{key}.npy"
            f = open(p, "wb")
            npformat.write_array_header_2_0(
                f, {"descr": npformat.dtype_to_descr(dtype), "fortran_order": False, "shape": (rows, dim)})
            self._meta[key] = (rows, dim, dtype, f.tell())
            f.truncate(f.tell() + rows * dim * dtype.itemsize)
            self._files[key] = f

    def write(self, key: str, start: int, block: np.ndarray) -> None:
        rows, dim, dtype, off = self._meta[key]
        block = np.ascontiguousarray(block, dtype=dtype)
        if block.ndim != 2 or block.shape[1] != dim or start + len(block) > rows:
            raise ValueError(f"{key}: block {block.shape} at {start} does not fit ({rows}, {dim})")
        f = self._files[key]
        f.seek(off + start * dim * dtype.itemsize)
        f.write(block.tobytes())

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        try:
            with atomic_open(self.path, "wb") as out:
                with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
                    for key in self._meta:
                        zf.write(self._tmpdir / f"{key}.npy", arcname=f"{key}.npy")
        finally:
            shutil.rmtree(self._tmpdir, ignore_errors=True)

    def abort(self) -> None:
        for f in self._files.values():
            f.close()
        shutil.rmtree(self._tmpdir, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *rest):
        if exc_type is None:
            self.close()
        else:
            self.abort()


class NpyColumn(_Closing):
    """A ``.npy`` file (1-D, or 2-D rows) read and written by row ranges with positioned I/O.

    ``create`` preallocates the file, so parts of it can be filled in any order and a
    resumed writer continues where it stopped.
    """

    def __init__(self, path: str | os.PathLike, mode: str = "r"):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            try:
                shape, fortran, dtype = _read_header(f)
            except ValueError as e:
                raise PoolError(f"{self.path}: corrupt .npy header ({e})") from None
            self.offset = f.tell()
        self.shape, self.dtype = tuple(shape), np.dtype(dtype)
        self.row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        self._fd = os.open(self.path, os.O_RDWR if mode == "r+" else os.O_RDONLY)

    @classmethod
    def create(cls, path: str | os.PathLike, rows: int, dtype, dim: int | None = None) -> "NpyColumn":
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        shape = (rows,) if dim is None else (rows, dim)
        dtype = np.dtype(dtype)
        with open(path, "wb") as f:
            npformat.write_array_header_1_0(f, {"descr": npformat.dtype_to_descr(dtype), "fortran_order": False,
                                                "shape": shape})
            f.truncate(f.tell() + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize)
        return cls(path, "r+")

    @property
    def rows(self) -> int:
        return self.shape[0]

    def read(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        stop = self.rows if stop is None else stop
        n = stop - start
        buf = _pread_exact(self._fd, n * self.row_bytes, self.offset + start * self.row_bytes,
                           f"{self.path} rows {start}-{stop}")
        return np.frombuffer(buf, dtype=self.dtype).reshape((n,) + self.shape[1:])

    def write(self, start: int, block: np.ndarray) -> None:
        data = np.ascontiguousarray(block, dtype=self.dtype).tobytes()
        os.pwrite(self._fd, data, self.offset + start * self.row_bytes)

    def sync(self) -> None:
        os.fsync(self._fd)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
