"""Reading a DataComp pool: ``<name>.parquet`` + ``<name>.npz`` pairs, streamed in chunks.

Row i of the npz is row i of the parquet. Files are taken in sorted name order and rows get
global indices in that order, so every stage (and every rank of a stage) agrees on what
"row 1234567" is. Memory is bounded by the chunk, never by the pool.
"""

from __future__ import annotations

import hashlib
import logging
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from . import uids as U
from .errors import PoolError
from .npz import NpzArray, npz_keys, row_parallel, to_float32
from .progress import progress_bar

log = logging.getLogger(__name__)

DATACOMP_COLUMNS = ("uid", "url", "text", "original_width", "original_height", "sha256",
                    "clip_b32_similarity_score", "clip_l14_similarity_score", "face_bboxes")
DEFAULT_CHUNK_ROWS = 65_536
BAD_EMBEDDING_POLICIES = ("error", "drop")


@dataclass(frozen=True)
class PoolFile:
    stem: str
    parquet: Path
    npz: Path | None
    rows: int
    offset: int  # global index of this file's first row


@dataclass
class Chunk:
    """Rows [start, start + len) of the pool, all from one file."""

    file: PoolFile
    start: int
    local_start: int
    length: int
    uids: np.ndarray | None = None
    table: pa.Table | None = None
    embeddings: np.ndarray | None = None  # float32, L2-normalised (unless normalize=False); 0 where invalid
    valid: np.ndarray | None = None  # False for rows dropped under bad_embeddings="drop"
    norms: np.ndarray | None = None  # row norms before normalising (1 for invalid rows)

    def __len__(self) -> int:
        return self.length

    def column(self, name: str) -> np.ndarray:
        return self.table.column(name).to_numpy(zero_copy_only=False)

    def pylist(self, name: str) -> list:
        return self.table.column(name).to_pylist()

    def where(self, local_row: int) -> str:
        return f"{self.file.parquet.name}: row {self.local_start + local_row}"


@dataclass
class EmbeddingReport:
    """What was wrong with the embeddings read so far and what was done about it."""

    policy: str = "error"
    nan_or_inf: int = 0
    zero: int = 0
    examples: list[str] = field(default_factory=list)

    @property
    def bad(self) -> int:
        return self.nan_or_inf + self.zero

    def as_dict(self) -> dict:
        return {"policy": self.policy, "nan_or_inf": self.nan_or_inf, "zero": self.zero,
                "action": "rows dropped (never kept)" if self.bad else "none needed",
                "examples": self.examples[:5]}


class Pool:
    """A DataComp pool directory (or a list of parquet files).

    ``embedding_key`` names the npz array to use (``l14_img``, ``b32_img`` or a key written
    by ``conceptprune embed``); ``embedding_dir`` holds the npz files if they are not next
    to the parquet files.
    """

    def __init__(self, root: str | os.PathLike | Sequence[str | os.PathLike], *,
                 embedding_key: str | None = None, embedding_dir: str | os.PathLike | None = None,
                 bad_embeddings: str = "error"):
        if bad_embeddings not in BAD_EMBEDDING_POLICIES:
            raise PoolError(f"bad_embeddings must be one of {BAD_EMBEDDING_POLICIES}")
        self.root = Path(root) if isinstance(root, (str, os.PathLike)) else None
        self.embedding_key = embedding_key
        self.bad_embeddings = bad_embeddings
        self.report = EmbeddingReport(policy=bad_embeddings)
        parquets = self._discover(root)
        emb_dir = Path(embedding_dir) if embedding_dir else None
        files, offset = [], 0
        for p in parquets:
            npz = (emb_dir or p.parent) / f"{p.stem}.npz"
            rows = _parquet_rows(p)
            files.append(PoolFile(p.stem, p, npz if npz.exists() else None, rows, offset))
            offset += rows
        self.files: list[PoolFile] = files
        self.rows = offset
        self.dim: int | None = None
        self.embedding_dtype: np.dtype | None = None
        if embedding_key:
            self._check_embeddings(embedding_key)

    @staticmethod
    def _discover(root) -> list[Path]:
        if isinstance(root, (str, os.PathLike)):
            root = Path(root)
            if root.is_file():
                return [root]
            if not root.is_dir():
                raise PoolError(f"{root}: pool directory not found")
            found = sorted(root.glob("*.parquet"))
            if not found:
                raise PoolError(f"{root}: no .parquet files (expected DataComp metadata: "
                                "<hash>.parquet with a same-named .npz)")
            return found
        paths = sorted(Path(p) for p in root)
        for p in paths:
            if not p.is_file():
                raise PoolError(f"{p}: parquet file not found")
        if not paths:
            raise PoolError("no pool files given")
        return paths

    def _check_embeddings(self, key: str) -> None:
        dims = set()
        for f in self.files:
            if f.npz is None:
                raise PoolError(f"{f.parquet}: no embeddings file {f.stem}.npz beside it "
                                f"(needed for --embedding-key {key}; `conceptprune download` fetches it with "
                                "--with-embeddings, --embedding-dir names another folder)")
            arr = NpzArray(f.npz, key)
            arr.close()
            if arr.rows != f.rows:
                raise PoolError(f"{f.npz}[{key}] has {arr.rows} rows but {f.parquet.name} has "
                                f"{f.rows}: row i of the npz must be row i of the parquet")
            dims.add((arr.dim, arr.dtype))
        if len(dims) > 1:
            raise PoolError(f"embedding {key!r} differs between files: {sorted(map(str, dims))}")
        if dims:
            self.dim, self.embedding_dtype = next(iter(dims))

    # -- description ----------------------------------------------------------------------

    def describe(self) -> dict:
        d = {"path": str(self.root) if self.root else [str(f.parquet) for f in self.files],
             # as typed (relative to where the command ran) and absolute, so that a manifest read from
             # another folder still finds its pool
             "absolute_path": str(Path(self.root).resolve()) if self.root else
             [str(f.parquet.resolve()) for f in self.files],
             "files": len(self.files), "rows": self.rows}
        if self.embedding_key:
            d.update(embedding_key=self.embedding_key, dim=self.dim)
        return d

    def schema(self) -> pa.Schema:
        try:
            return pq.read_schema(self.files[0].parquet)
        except (pa.ArrowException, OSError) as e:
            raise PoolError(f"{self.files[0].parquet}: not a readable parquet file ({e})") from None

    def embedding_keys(self) -> list[str]:
        return npz_keys(self.files[0].npz) if self.files and self.files[0].npz else []

    def split(self, rank: int, world_size: int) -> tuple[int, int]:
        """Contiguous row range of part ``rank`` of ``world_size``."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        return self.rows * rank // world_size, self.rows * (rank + 1) // world_size

    # -- streaming ------------------------------------------------------------------------

    def iter_chunks(self, columns: Sequence[str] = (), *, uids: bool = True,
                    embeddings: bool = False, start: int = 0, stop: int | None = None,
                    chunk_rows: int = DEFAULT_CHUNK_ROWS, progress: str | bool | None = None,
                    normalize: bool = True) -> Iterator[Chunk]:
        """Chunks of rows [start, stop): uids, the named parquet columns and (optionally)
        the float32 embeddings, validated as they are read and L2-normalised (or, with
        ``normalize=False``, left as stored with their norms in ``chunk.norms``)."""
        stop = self.rows if stop is None else stop
        if embeddings and not self.embedding_key:
            raise PoolError("embeddings requested but no embedding key chosen")
        cols = list(dict.fromkeys((["uid"] if uids else []) + list(columns)))
        bar = progress_bar(total=stop - start, desc=progress if isinstance(progress, str) else "reading pool",
                           unit="rows", disable=not progress)
        try:
            for f in self.files:
                lo, hi = max(start, f.offset), min(stop, f.offset + f.rows)
                if lo >= hi:
                    continue
                emb = NpzArray(f.npz, self.embedding_key) if embeddings else None
                try:
                    for local, table in _iter_parquet(f.parquet, cols, lo - f.offset, hi - f.offset, chunk_rows):
                        chunk = Chunk(file=f, start=f.offset + local, local_start=local, length=table.num_rows)
                        if uids:
                            chunk.uids = U.arrow_uids_to_array(table.column("uid"), source=str(f.parquet),
                                                               row_offset=local)
                        chunk.table = table
                        if emb is not None:
                            chunk.embeddings, chunk.valid, chunk.norms = self._embeddings(emb, chunk, normalize)
                        yield chunk
                        bar.update(chunk.length)
                finally:
                    if emb is not None:
                        emb.close()
        finally:
            bar.close()

    def read_embedding_rows(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Embeddings of the given sorted global rows: (float32 normalised, valid mask)."""
        if not self.embedding_key:
            raise PoolError("no embedding key chosen")
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), self.dim), dtype=np.float32)
        valid = np.ones(len(rows), dtype=bool)
        for f in self.files:
            a, b = np.searchsorted(rows, [f.offset, f.offset + f.rows])
            if a == b:
                continue
            with NpzArray(f.npz, self.embedding_key) as arr:
                raw = arr.read_rows(rows[a:b] - f.offset)
            local = rows[a:b] - f.offset
            x, ok, _ = self._normalise(to_float32(raw),
                                    lambda i: f"{f.npz.name}[{self.embedding_key}] row {int(local[i])}")
            out[a:b] = x
            if ok is not None:
                valid[a:b] = ok
        return out, valid

    def _embeddings(self, arr: NpzArray, chunk: Chunk, normalize: bool = True):
        norms = np.empty(chunk.length, dtype=np.float32)
        x = to_float32(arr.read(chunk.local_start, chunk.local_start + chunk.length), norms)

        def where(i):
            uid = U.pair_to_uid(*chunk.uids[i]) if chunk.uids is not None else "?"
            return f"{arr.path.name}[{arr.key}] row {chunk.local_start + i} (uid {uid})"
        return self._normalise(x, where, normalize, norms)

    def _normalise(self, x: np.ndarray, where, normalize: bool = True, norms: np.ndarray | None = None):
        """Check rows, L2-normalise them in place; bad rows raise (policy error) or are zeroed
        and masked. Returns (x, valid or None, norms)."""
        if norms is None:
            with np.errstate(over="ignore", invalid="ignore"):
                norms = np.sqrt(np.einsum("ij,ij->i", x, x))
        finite = np.isfinite(norms)
        zero = finite & (norms < 1e-6)
        bad = ~finite | zero
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            kind = "NaN or infinite" if not finite[i] else "all zeros"
            place = where(i)
            if self.bad_embeddings == "error":
                raise PoolError(f"{place}: embedding is {kind}; {int(bad.sum())} such rows in this chunk. "
                                "Re-embed, or pass --bad-embeddings drop to leave them out (never kept)")
            self.report.nan_or_inf += int((~finite).sum())
            self.report.zero += int(zero.sum())
            if len(self.report.examples) < 5:
                self.report.examples.append(f"{place}: {kind}")
            log.warning("%s: embedding is %s; dropping %d bad rows of this chunk", place, kind, int(bad.sum()))
            x[bad] = 0.0
            norms[bad] = 1.0
        if normalize:
            row_parallel(lambda a, b: np.divide(x[a:b], norms[a:b, None], out=x[a:b]), len(x))
        return x, (~bad if bad.any() else None), norms

    def read_uids(self, *, start: int = 0, stop: int | None = None, progress: str | bool | None = None) -> np.ndarray:
        """All uids of rows [start, stop) in row order (16 bytes a row)."""
        stop = self.rows if stop is None else stop
        out = np.empty(stop - start, dtype=U.UID_DTYPE)
        for c in self.iter_chunks(start=start, stop=stop, progress=progress):
            out[c.start - start: c.start - start + len(c)] = c.uids
        return out

    def check_unique_uids(self, progress: str | bool | None = "checking uids") -> int:
        """Raise PoolError naming a duplicated uid and where it occurs; returns the row count."""
        from .keeplist import duplicate_mask

        all_uids = self.read_uids(progress=progress)
        hi, lo = U.split(all_uids)
        order = np.lexsort((lo, hi))
        dup = duplicate_mask(all_uids[order])
        if dup.any():
            k = int(np.flatnonzero(dup)[0])
            rows = [int(order[k - 1]), int(order[k])]
            places = ", ".join(self.locate(r) for r in sorted(rows))
            raise PoolError(f"uid {U.pair_to_uid(*all_uids[rows[0]])} occurs more than once ({places}); "
                            f"{int(dup.sum())} duplicate rows in all")
        return len(all_uids)

    def locate(self, row: int) -> str:
        """'file.parquet: row i' for a global row index."""
        for f in self.files:
            if f.offset <= row < f.offset + f.rows:
                return f"{f.parquet.name}: row {row - f.offset}"
        raise IndexError(row)


# hashed from each end of every file: the parquet footer (schema, row groups, statistics) sits
# at its end; an npz's content is covered by the CRC-32s in its zip directory
FINGERPRINT_EDGE_BYTES = 64 << 10


def file_fingerprint(path: str | os.PathLike) -> str:
    """A cheap content fingerprint of one file: size, mtime (ns), blake2b of the first and last
    64 KiB and, for a zip (npz), of its central directory (every member's name, sizes and CRC-32,
    so a rewrite of any member changes it even when both ends of the file stay the same)."""
    path = Path(path)
    try:
        st = path.stat()
        h = hashlib.blake2b(digest_size=16)
        h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
        with open(path, "rb") as f:
            h.update(f.read(FINGERPRINT_EDGE_BYTES))
            if st.st_size > FINGERPRINT_EDGE_BYTES:
                f.seek(max(FINGERPRINT_EDGE_BYTES, st.st_size - FINGERPRINT_EDGE_BYTES))
                h.update(f.read(FINGERPRINT_EDGE_BYTES))
    except OSError as e:
        raise PoolError(f"{path}: cannot read ({e.strerror or e})") from None
    if path.suffix == ".npz":
        try:
            with zipfile.ZipFile(path) as zf:
                for info in zf.infolist():
                    h.update(f"{info.filename}:{info.CRC}:{info.compress_size}:{info.file_size}\n".encode())
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            raise PoolError(f"{path}: not a readable .npz file ({e})") from None
    return h.hexdigest()


def file_fingerprints(pool: "Pool") -> dict[str, str]:
    """{file path: file_fingerprint} of every parquet and npz the pool reads (for messages
    that name the file that changed)."""
    out = {}
    for f in pool.files:
        out[str(f.parquet)] = file_fingerprint(f.parquet)
        if f.npz is not None:
            out[str(f.npz)] = file_fingerprint(f.npz)
    return out


def pool_fingerprint(pool: "Pool") -> str:
    """One hex string that changes when the pool's data changes: every parquet and npz
    (name, size, mtime, a blake2b of both ends and of the npz's zip directory), the row
    counts, the embedding key and its dimension. Reads ~128 KiB a file; cheap next to any
    pass over the pool. Copying a pool without keeping mtimes changes it (a safe miss)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"rows={pool.rows};key={pool.embedding_key};dim={pool.dim}\n".encode())
    for f in pool.files:
        h.update(f"{f.parquet.name}:{f.rows}:{file_fingerprint(f.parquet)}\n".encode())
        if f.npz is not None:
            h.update(f"{f.npz.name}:{file_fingerprint(f.npz)}\n".encode())
    return h.hexdigest()


def verify_parquet(path: str | os.PathLike, batch_rows: int = DEFAULT_CHUNK_ROWS) -> int:
    """Decode every column of every row group once (page CRCs are checked where the writer
    stored them); a damaged page raises PoolError naming the file. Returns the rows read."""
    path = Path(path)
    kw = {"page_checksum_verification": True} if _HAS_PAGE_CRC else {}
    rows = 0
    try:
        pf = pq.ParquetFile(path, **kw)
        for batch in pf.iter_batches(batch_size=batch_rows, use_threads=False):
            rows += batch.num_rows
    except (pa.ArrowException, OSError) as e:
        raise PoolError(f"{path}: corrupt parquet data near row {rows} ({e}); re-download this file") from None
    return rows


def _page_crc_supported() -> bool:
    import inspect

    try:
        return "page_checksum_verification" in inspect.signature(pq.ParquetFile).parameters
    except (TypeError, ValueError):  # pragma: no cover
        return False


_HAS_PAGE_CRC = _page_crc_supported()


def _parquet_rows(path: Path) -> int:
    try:
        return pq.ParquetFile(path).metadata.num_rows
    except (pa.ArrowException, OSError) as e:
        raise PoolError(f"{path}: not a readable parquet file ({e})") from None


def _iter_parquet(path: Path, columns: list[str], start: int, stop: int, chunk_rows: int):
    """(local_start, table) pieces of rows [start, stop) of one parquet file."""
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise PoolError(f"{path}: not a readable parquet file ({e})") from None
    names = pf.schema_arrow.names
    missing = [c for c in columns if c not in names]
    if missing:
        raise PoolError(f"{path}: no column {missing[0]!r} (it has: {', '.join(names)})")
    md = pf.metadata
    groups, pos, first = [], 0, None
    for g in range(md.num_row_groups):
        n = md.row_group(g).num_rows
        if pos + n > start and pos < stop:
            groups.append(g)
            first = pos if first is None else first
        pos += n
    if not groups:
        return
    pos = first
    try:
        for batch in pf.iter_batches(batch_size=chunk_rows, row_groups=groups, columns=columns, use_threads=False):
            b0, b1 = pos, pos + batch.num_rows
            pos = b1
            lo, hi = max(b0, start), min(b1, stop)
            if lo < hi:
                yield lo, pa.Table.from_batches([batch.slice(lo - b0, hi - lo)])
            if pos >= stop:
                break
    except (pa.ArrowException, OSError) as e:  # a damaged page header is an OSError ("thrift")
        raise PoolError(f"{path}: corrupt parquet data near row {pos} ({e}); re-download this file") from None
