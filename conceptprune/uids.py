"""DataComp uids: 128-bit ids written as hex strings, stored in keep-lists as two uint64.

``hi, lo = divmod(int(uid, 16), 1 << 64)``; shorter strings are left-padded with zeros.
The vectorised path decodes a whole Arrow string column without creating Python objects.
"""

from __future__ import annotations

import re
import sys

import numpy as np

from .errors import PoolError

UID_DTYPE = np.dtype("u8,u8")  # DataComp's keep-list dtype: f0 = high 64 bits, f1 = low
_HEX_RE = re.compile(r"[0-9a-fA-F]{1,32}")
_MASK64 = (1 << 64) - 1

# ASCII -> nibble value; 255 marks a byte that is not a hex digit.
_NIBBLE = np.full(256, 255, dtype=np.uint8)
for _i, _c in enumerate(b"0123456789abcdef"):
    _NIBBLE[_c] = _i
for _i, _c in enumerate(b"ABCDEF"):
    _NIBBLE[_c] = 10 + _i
_HEX_CHARS = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)


def uid_to_pair(uid: str) -> tuple[int, int]:
    """Hex uid -> (hi, lo). Raises ValueError on anything but 1-32 hex digits."""
    if not isinstance(uid, str) or not _HEX_RE.fullmatch(uid):
        raise ValueError(f"not a 128-bit hex uid: {uid!r}")
    return divmod(int(uid, 16), 1 << 64)


def pair_to_uid(hi: int, lo: int) -> str:
    """(hi, lo) -> 32-character lowercase hex, zero-padded (DataComp's canonical form)."""
    return f"{int(hi) & _MASK64:016x}{int(lo) & _MASK64:016x}"


def uids_to_array(uids) -> np.ndarray:
    """A sequence of hex uids -> structured ``u8,u8`` array (same order, not sorted)."""
    pa = sys.modules.get("pyarrow")  # imported only where Arrow is used (not by reshard, say)
    if pa is not None and isinstance(uids, (pa.Array, pa.ChunkedArray)):
        return arrow_uids_to_array(uids)
    out = np.empty(len(uids), dtype=UID_DTYPE)
    for i, u in enumerate(uids):
        out[i] = uid_to_pair(u)
    return out


def array_to_uids(arr: np.ndarray) -> list[str]:
    """Structured ``u8,u8`` array -> list of 32-character hex uids."""
    hi, lo = split(arr)
    return [pair_to_uid(h, l) for h, l in zip(hi.tolist(), lo.tolist())]


def split(arr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The (hi, lo) uint64 columns of a uid array, whatever its field names."""
    names = arr.dtype.names
    return arr[names[0]], arr[names[1]]


def make_array(hi: np.ndarray, lo: np.ndarray) -> np.ndarray:
    out = np.empty(len(hi), dtype=UID_DTYPE)
    out["f0"] = hi
    out["f1"] = lo
    return out


def hex_array(arr: np.ndarray) -> np.ndarray:
    """Vectorised inverse: uid array -> (n, 32) uint8 ASCII hex (for writing parquet)."""
    hi, lo = split(arr)
    n = len(arr)
    out = np.empty((n, 32), dtype=np.uint8)
    for half, col in ((hi, 0), (lo, 16)):
        v = half.astype(np.uint64, copy=True)
        for i in range(15, -1, -1):
            out[:, col + i] = _HEX_CHARS[(v & np.uint64(15)).astype(np.intp)]
            v >>= np.uint64(4)
    return out


def arrow_uids_to_array(col, *, source: str = "uids", row_offset: int = 0) -> np.ndarray:
    """Decode an Arrow string column of hex uids.

    Raises PoolError naming ``source`` and the row (``row_offset`` + index) of the first
    null, non-hex or over-long uid.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    n = len(col)
    if n == 0:
        return np.empty(0, dtype=UID_DTYPE)
    if col.null_count:
        bad = int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0])
        raise PoolError(f"{source}: row {row_offset + bad}: uid is null")
    if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)
            or pa.types.is_binary(col.type) or pa.types.is_large_binary(col.type)):
        raise PoolError(f"{source}: uid column has type {col.type}, expected hex strings")
    lengths = pc.binary_length(col).to_numpy()
    if lengths.min() == 32 and lengths.max() == 32:
        chars = _fixed_width_chars(col, 32)
        nib = _NIBBLE[chars]
        if (nib == 255).any():
            bad = int(np.flatnonzero((nib == 255).any(axis=1))[0])
            raise PoolError(f"{source}: row {row_offset + bad}: uid {col[bad].as_py()!r} "
                            "is not a 128-bit hex string")
        # two nibbles a byte, and the 16 bytes of a row read as two big-endian 64-bit words
        words = np.ascontiguousarray((nib[:, 0::2] << 4) | nib[:, 1::2]).view(">u8")
        out = np.empty(n, dtype=UID_DTYPE)
        out["f0"], out["f1"] = words[:, 0], words[:, 1]
        return out
    # Rare path: uids of other lengths (shorter ones are left-padded with zeros).
    out = np.empty(n, dtype=UID_DTYPE)
    for i, u in enumerate(col.to_pylist()):
        if isinstance(u, bytes):
            u = u.decode("ascii", "replace")
        try:
            out[i] = uid_to_pair(u)
        except ValueError:
            raise PoolError(f"{source}: row {row_offset + i}: uid {u!r} is not a 128-bit "
                            "hex string (1-32 hex digits)") from None
    return out


def arrow_from_array(arr: np.ndarray) -> pa.Array:
    """uid array -> Arrow string column of 32-character hex (vectorised)."""
    import pyarrow as pa

    chars = hex_array(arr)
    n = len(arr)
    offsets = np.arange(0, 32 * n + 1, 32, dtype=np.int64)
    return pa.LargeStringArray.from_buffers(
        n, pa.py_buffer(offsets), pa.py_buffer(chars.tobytes())).cast(pa.string())


def _fixed_width_chars(col: pa.Array, width: int) -> np.ndarray:
    """(n, width) uint8 view of a string column whose values all have ``width`` bytes."""
    import pyarrow as pa

    bufs = col.buffers()
    off_dtype = np.int64 if (pa.types.is_large_string(col.type)
                             or pa.types.is_large_binary(col.type)) else np.int32
    offsets = np.frombuffer(bufs[1], dtype=off_dtype)[col.offset: col.offset + len(col) + 1]
    data = np.frombuffer(bufs[2], dtype=np.uint8)
    start = int(offsets[0])
    return data[start: start + width * len(col)].reshape(len(col), width)


def hash_uids(arr: np.ndarray, seed: int) -> np.ndarray:
    """A seeded 64-bit hash of each uid (splitmix64): a random key that depends only on
    the uid and the seed, never on row order, files or workers."""
    hi, lo = split(arr)
    with np.errstate(over="ignore"):
        h = _splitmix64(lo ^ _splitmix64(np.uint64(seed & _MASK64) ^ hi))
    return h


def _splitmix64(x):
    x = np.asarray(x, dtype=np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))
