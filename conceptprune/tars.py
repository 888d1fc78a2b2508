"""Reading and writing webdataset tar shards sample by sample, without extracting anything."""

from __future__ import annotations

import errno
import io
import json
import mmap
import os
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from conceptprune.atomic import atomic_open
from conceptprune.errors import PoolError


@dataclass
class Sample:
    key: str
    parts: dict = field(default_factory=dict)  # extension -> bytes, in tar order
    raw: list | None = field(default_factory=list, repr=False)  # the members' tar bytes (None: rewrite them)
    dropped: int = 0  # members of this sample dropped when read (links, devices, FIFOs)

    def has_image(self) -> bool:
        return any(ext.lower() in IMAGE_EXTS for ext in self.parts)

    def json(self) -> dict:
        raw = self.parts.get("json")
        return json.loads(raw) if raw else {}

    def uid(self) -> str:
        """The json's "uid" ('' if none); see :func:`json_uid`."""
        return json_uid(self.parts.get("json"))


def json_uid(raw: bytes | None) -> str:
    """The "uid" of a sample's json bytes ('' if none). A regex when "uid" occurs once (DataComp's
    jsons are flat), since parsing every json was a tenth of reshard's time."""
    if not raw:
        return ""
    m = _UID.search(raw) if raw.count(b'"uid"') == 1 else None  # a nested "uid" goes to the parser
    if m:
        return m.group(1).decode()
    obj = json.loads(raw)
    uid = obj.get("uid") if isinstance(obj, dict) else None
    return uid if isinstance(uid, str) else ""


_UID = re.compile(rb'"uid"\s*:\s*"([0-9A-Fa-f]{32})"')


def is_unsafe(name: str) -> bool:
    """Absolute, or with a '..' component (string tests: this runs for every member)."""
    return (name.startswith(("/", "\\")) or name == ".." or name.startswith("../") or name.endswith("/..")
            or "/../" in name)


def split_name(name: str) -> tuple[str, str]:
    """webdataset's rule: key = path up to the first dot of the file name, extension = the rest."""
    d, slash, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return d + slash + stem, ext


_BLOCK = 512
_ZERO = bytes(_BLOCK)
IMAGE_EXTS = frozenset({"jpg", "jpeg", "png", "webp"})  # what open_clip's loader counts as an image
_REGULAR = frozenset({b"0", b"\0", b"7"})
_SPECIAL = frozenset({b"1", b"2", b"3", b"4", b"6"})  # hard link, symlink, char/block device, FIFO
_KNOWN = _REGULAR | _SPECIAL | {b"5", b"L", b"K", b"S", b"x", b"g", b"X"}
_NO_DATA = _SPECIAL | {b"5"}  # tar reads no data blocks after these headers


def _nts(field: bytes) -> str:
    """tar's string fields end at the first NUL (what tar itself reads, not what follows it)."""
    return field.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _number(field: bytes) -> int:
    """A numeric header field: octal text up to the first NUL, or GNU base-256."""
    if field[:1] in (b"\x80", b"\xff"):
        n = int.from_bytes(field[1:], "big")
        return n - 256 ** (len(field) - 1) if field[:1] == b"\xff" else n
    return int(field.split(b"\0", 1)[0].strip() or b"0", 8)


def _checksum_ok(hdr: bytes) -> bool:
    """The stored checksum equals the header's byte sum with its own field counted as spaces
    (unsigned, or signed as some old tars wrote it)."""
    stored = _number(hdr[148:156])
    unsigned = sum(hdr) - sum(hdr[148:156]) + 256
    if stored == unsigned:
        return True
    signed = sum(b - 256 if b > 127 else b for b in hdr[:148] + hdr[156:]) + 256
    return stored == signed


def _pax_records(data: bytes, where: str) -> dict:
    """The records of a pax header, each read by its length prefix: ``"<len> <key>=<value>\\n"``
    where <len> counts the whole record. A text that merely contains " path=" inside another
    record's value is that record's value, as tar reads it."""
    out, pos = {}, 0
    while pos < len(data) and data[pos:pos + 1] != b"\0":
        space = data.find(b" ", pos, pos + 24)
        length = int(data[pos:space]) if space > pos and data[pos:space].isdigit() else 0
        record = data[pos:pos + length]
        eq = record.find(b"=", space - pos + 1)
        if length <= 0 or len(record) < length or not record.endswith(b"\n") or eq < 0:
            raise PoolError(f"{where}: corrupt pax header record at byte {pos}")
        key = record[space - pos + 1:eq].decode("utf-8", "surrogateescape")
        out[key] = record[eq + 1:-1].decode("utf-8", "surrogateescape")
        pos += length
    return out


def tar_members(f, path) -> Iterator[tuple]:
    """``(name, kind, data, raw, other_names)`` of each tar member as Python's tarfile (and so
    ``extractall``) reads it: kind "file", "dir" or "special" (a link, device or FIFO); raw the
    member's tar bytes with its extension headers (None: its header must be rewritten). Headers parsed by
    hand (tarfile's Python header parsing was most of reshard's time). Names come from the
    ustar name and prefix, GNU long names and pax ``path`` records only; pax ``size`` is honoured;
    global pax headers apply to every later member. Links, devices and FIFOs carry no data.
    Where tar programs could differ (which of several name records wins, whether a prefix field
    counts), the names they could read are kept in ``other_names``: a member is only safe when
    all of them are."""
    pending: list[tuple[bytes, dict | str]] = []  # extension headers of the next member, in order
    pending_raw: list[bytes] = []
    global_pax: dict = {}
    offset = start = 0

    def where() -> str:  # only formatted for an error message
        return f"{path}: tar header at byte {start}"

    while True:
        start = offset
        hdr = f.read(_BLOCK)
        if len(hdr) < _BLOCK:
            if hdr.strip(b"\0"):
                raise PoolError(f"{where()} is truncated")
            return
        if hdr == _ZERO:
            return
        try:
            if not _checksum_ok(hdr):
                raise PoolError(f"{where()} is corrupt (bad checksum)")
            size = _number(hdr[124:136])
        except ValueError:
            raise PoolError(f"{where()} is corrupt (not a tar header)") from None
        kind = hdr[156:157]
        sized = [v["size"] for k, v in pending if k == b"x" and "size" in v] if pending else ()
        if sized and (kind in _REGULAR or kind not in _KNOWN):  # the outermost pax size wins
            try:
                size = int(sized[0])
            except ValueError:
                raise PoolError(f"{where()}: pax size {sized[0]!r} is not a number") from None
        if size < 0:
            raise PoolError(f"{where()} is corrupt (negative size)")
        padded = 0 if kind in _NO_DATA else (size + _BLOCK - 1) // _BLOCK * _BLOCK
        body = f.read(padded)
        if len(body) < padded:
            raise PoolError(f"{path}: member at byte {offset} is truncated")
        offset += _BLOCK + padded
        data = body[:size]
        if kind == b"S":
            raise PoolError(f"{where()}: GNU sparse members are not supported")
        if kind in (b"L", b"K"):
            pending.append((kind, _nts(data)))
            pending_raw.append(hdr + body)
            continue
        if kind in (b"x", b"X", b"g"):
            records = _pax_records(data, where())
            if any(k.startswith("GNU.sparse.") for k in records):
                raise PoolError(f"{where()}: GNU sparse members are not supported")
            if kind == b"g":
                if "size" in records:
                    raise PoolError(f"{where()}: a global pax header may not set a size")
                global_pax.update(records)
            else:
                pending.append((b"x", {**global_pax, **records}))
                pending_raw.append(hdr + body)
            continue
        name = _nts(hdr[0:100])
        prefix = _nts(hdr[345:500]) if hdr[345] else ""
        if kind == b"\0" and name.endswith("/"):
            kind = b"5"
        others = ()
        if prefix or pending or global_pax:
            name, others = _renamed(name, prefix, pending, global_pax)
            raw = None if "path" in global_pax else b"".join(pending_raw) + hdr + body
            pending, pending_raw = [], []
        else:
            raw = hdr + body
        if kind == b"5":
            yield name.rstrip("/"), "dir", b"", raw, others
        elif kind in _SPECIAL:
            yield name, "special", b"", raw, others
        else:  # a regular file, or an unknown type, which tar extracts as one
            yield name, "file", data, raw, others


def _renamed(name: str, prefix: str, pending: list, global_pax: dict) -> tuple[str, tuple]:
    """The member's name after its prefix field, global pax path and extension headers (the
    outermost wins, as in Python's tarfile), and the other names tar programs could read."""
    candidates = [name]
    if prefix:
        name = prefix + "/" + name
        candidates.append(name)
    if "path" in global_pax:
        name = global_pax["path"].rstrip("/")
        candidates.append(name)
    for ext_kind, value in reversed(pending):
        if ext_kind == b"L":
            name = value
        elif ext_kind == b"x" and "path" in value:
            name = value["path"].rstrip("/")
        else:
            continue
        candidates.append(name)
    return name, tuple(c for c in candidates if c != name)


def iter_samples(path: str | Path, unsafe: list | None = None, special: list | None = None) -> Iterator[Sample]:
    """Samples of a tar in order. Members with unsafe names (absolute, '..') are never returned:
    their names are appended to ``unsafe``. Links, devices and FIFOs are dropped too, their names
    appended to ``special``, and the sample they belong to counts them in ``Sample.dropped``.
    Directory entries are skipped."""
    try:
        f = open(path, "rb", buffering=1 << 20)
    except OSError as e:
        raise PoolError(f"{path}: not a readable tar shard ({e})") from None
    current: Sample | None = None
    with f:
        for name, kind, data, raw, others in tar_members(f, path):
            if kind == "dir":
                continue
            if is_unsafe(name) or (others and any(map(is_unsafe, others))):  # unsafe to any tar program
                if unsafe is not None:
                    unsafe.append(next(n for n in (name, *others) if is_unsafe(n)))
                continue
            key, ext = split_name(name)
            if current is None or key != current.key:
                if current is not None:
                    yield current
                current = Sample(key)
            if kind == "special":
                if special is not None:
                    special.append(name)
                current.dropped += 1
                continue
            current.parts[ext] = data
            if raw is None or current.raw is None:
                current.raw = None  # rewritten from its parts
            else:
                current.raw.append(raw)
        if current is not None:
            yield current


# -- the fast path: an offset index of a plain tar, samples copied as byte ranges -------------------

_NIBBLE = np.full(256, 255, dtype=np.uint8)
for _i, _c in enumerate(b"0123456789abcdef"):
    _NIBBLE[_c] = _i
for _i, _c in enumerate(b"ABCDEF"):
    _NIBBLE[_c] = 10 + _i
_BYTE_WEIGHTS = (1 << (8 * np.arange(4))).astype(np.uint32)
# ustar's magic "ustar" (bytes 257-261 of a header) as seen in the block's 33rd little-endian word
_MAGIC_MASK = np.uint64(0x0000FFFFFFFFFF00)
_MAGIC_WORD = np.uint64(int.from_bytes(b"\0ustar\0\0", "little") & 0x0000FFFFFFFFFF00)
_SHIFTS = (4 * np.arange(15, -1, -1)).astype(np.uint64)
_PAD = 48  # NULs after the joined jsons: every look-ahead of the uid scan stays inside the buffer


@dataclass
class TarIndex:
    """The samples of a *plain* tar (regular ustar members only: no extension headers, prefix
    fields, links, directories or unsafe names; what webdataset's writers and our own write),
    found from its headers alone. Sample ``i`` is the byte range ``[start[i], end[i])`` of the
    tar: exactly the members ``iter_samples`` would return for it, in order."""

    path: str
    buf: mmap.mmap
    name: np.ndarray  # (members, width) uint8: each member's name, NUL-padded
    offsets: np.ndarray  # member header offsets
    sizes: np.ndarray  # member data sizes
    ext_at: np.ndarray  # where each name's extension starts (len(name) + 1 when it has none)
    first: np.ndarray  # first member of each sample, plus the member count at the end
    start: np.ndarray  # byte range of each sample (int64)
    end: np.ndarray
    has_image: np.ndarray  # bool per sample
    json_member: np.ndarray  # each sample's last ``.json`` member (-1: none)

    def __len__(self) -> int:
        return len(self.start)

    def _data(self, m: int) -> bytes:
        o = int(self.offsets[m]) + _BLOCK
        return self.buf[o:o + int(self.sizes[m])]

    def sample(self, i: int) -> Sample:
        """Sample i with its parts read, as ``iter_samples`` returns it."""
        dec = lambda b: b.decode("utf-8", "surrogateescape")  # noqa: E731
        first = int(self.first[i])
        parts = {}
        for m in range(first, int(self.first[i + 1])):
            parts[dec(self.name[m].tobytes().rstrip(b"\0")[int(self.ext_at[m]):])] = self._data(m)
        key = self.name[first, :int(self.ext_at[first]) - 1].tobytes()
        return Sample(dec(key), parts, raw=[self.buf[int(self.start[i]):int(self.end[i])]])

    def uid_pairs(self) -> tuple[np.ndarray, np.ndarray]:
        """(whether sample i has a uid, the uids as a ``u8,u8`` array), as ``uid_to_pair(json_uid(
        sample.parts["json"]))`` reads them (a sample whose json has none, or is not JSON, has none).
        The usual json (one "uid", spelled ``"uid": "<32 hex>"``) is read by array operations;
        any other is given to ``json_uid``."""
        from conceptprune import uids as U

        n = len(self)
        ok = np.zeros(n, dtype=bool)
        hi = np.zeros(n, dtype=np.uint64)
        lo = np.zeros(n, dtype=np.uint64)
        rows = np.flatnonzero(self.json_member >= 0)
        members = self.json_member[rows]
        fast, hexes = self._scan_uids(members)
        if len(hexes):
            nib = _NIBBLE[hexes].astype(np.uint64)
            r = rows[fast]
            ok[r] = True
            hi[r] = np.bitwise_or.reduce(nib[:, :16] << _SHIFTS, axis=1)
            lo[r] = np.bitwise_or.reduce(nib[:, 16:] << _SHIFTS, axis=1)
        for k in np.flatnonzero(~fast).tolist():  # anything else: the parser decides
            try:
                h, l_ = U.uid_to_pair(json_uid(self._data(int(members[k]))))
            except ValueError:
                continue
            ok[rows[k]], hi[rows[k]], lo[rows[k]] = True, h, l_
        return ok, U.make_array(hi, lo)

    def _scan_uids(self, members: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(which json ``members`` hold exactly one ``"uid"`` followed by ``: "<32 hex>"`` or
        ``:"<32 hex>"``, those 32 hex digits as an (k, 32) uint8 array): ``_UID.search`` finds
        exactly these in such a json. The jsons are joined with a NUL after each (no match of
        the pattern spans one) and searched as one byte array."""
        sizes = self.sizes[members]
        offsets = (self.offsets[members] + _BLOCK).tolist()
        blob = b"\0".join([self.buf[o:o + n] for o, n in zip(offsets, sizes.tolist())]) + bytes(_PAD)
        b = np.frombuffer(blob, np.uint8)
        starts = np.cumsum(sizes + 1) - (sizes + 1)  # each json's first byte in the blob
        q = np.flatnonzero(b[:-_PAD] == 0x22)
        for k, c in enumerate(b'uid"', 1):  # the literal "uid"
            q = q[b[q + k] == c]
        json_of = np.searchsorted(starts, q, side="right") - 1
        once = np.bincount(json_of, minlength=len(members))[json_of] == 1  # bytes.count(b'"uid"') == 1
        q, json_of = q[once], json_of[once]
        value = q + 6 + (b[q + 6] == 0x20)  # the value's opening quote, after ':' and at most one space
        usual = (b[q + 5] == 0x3A) & (b[value] == 0x22) & (b[value + 33] == 0x22)
        hexes = b[(value + 1)[:, None] + np.arange(32)]
        usual &= (_NIBBLE[hexes] != 255).all(axis=1)
        fast = np.zeros(len(members), dtype=bool)
        fast[json_of[usual]] = True
        return fast, hexes[usual]


def index_plain(path: str | Path, buf: mmap.mmap) -> TarIndex | None:
    """The :class:`TarIndex` of a mapped tar, or None when it is not plain or is damaged: the
    caller then reads it with :func:`iter_samples`, which handles (or reports) everything else.
    Nothing is parsed member by member in Python: the blocks carrying ustar's magic are the
    candidate headers, their size fields give each one's successor, the chain from block 0
    is followed, and its headers' checksums, types and names are checked all at once."""
    if not len(buf) or len(buf) % _BLOCK:
        return None
    a = np.frombuffer(buf, np.uint8)
    try:
        blocks = a.reshape(-1, _BLOCK)
        nblocks = len(blocks)
        cand = np.flatnonzero((a.view("<u8")[32::_BLOCK // 8] & _MAGIC_MASK) == _MAGIC_WORD)  # "ustar" at 257
        heads = np.take(blocks, cand, axis=0)
        size, good = _octal(heads[:, 124:135])
        good &= heads[:, 135] == 0
        size[~good] = 0
        succ = np.where(good, cand + 1 + (size + _BLOCK - 1) // _BLOCK, 1 << 62)
        if len(cand) and cand[0] == 0 and (succ[:-1] == cand[1:]).all():
            chain, b = np.arange(len(cand)), int(succ[-1])  # the usual case: every candidate is a header
        else:  # a candidate inside some member's data: follow the chain from block 0
            chain, b = _follow(cand, succ.tolist(), nblocks)
        if b > nblocks or (b < nblocks and blocks[b].any()):
            return None  # truncated, or a header that is not a plain ustar one: iter_samples decides
    finally:
        del a
        blocks = None
    if len(chain) < len(cand):
        heads, size = heads[chain], size[chain]
    offsets = cand[chain] * _BLOCK
    checked = _plain_names(heads)
    if checked is None:
        return None
    return _group(str(path), buf, *checked, offsets, size)


def _octal(fields: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(the value of each row of octal digits as int64, whether the row is all octal digits)."""
    digits = fields - np.uint8(0x30)  # wraps below '0': anything but '0'-'7' is > 7
    good = digits.max(axis=1) <= 7
    weights = 8.0 ** np.arange(fields.shape[1] - 1, -1, -1)  # float64 products: exact below 2**53
    return (digits @ weights).astype(np.int64), good


def _follow(cand: np.ndarray, succ: list, nblocks: int) -> tuple[np.ndarray, int]:
    """The candidates on the header chain from block 0, and the block after the last."""
    row = dict(zip(cand.tolist(), range(len(cand))))
    chain = []
    b = 0
    while b < nblocks:
        r = row.get(b)
        if r is None:
            break
        chain.append(r)
        b = succ[r]
    return np.array(chain, dtype=np.int64), b


def _plain_names(h: np.ndarray) -> tuple | None:
    """(name fields cut to the longest name, name lengths) of headers ``h`` (m, 512) if every
    one is a plain regular member with a valid checksum and a safe name that ends at its
    first NUL; else None."""
    if not len(h):
        return h[:, :1], np.zeros(0, dtype=np.int64)
    if not np.isin(h[:, 156], (0x30, 0, 0x37)).all() or h[:, 345].any():
        return None
    stored, good = _octal(h[:, 148:154])
    if not good.all() or h[:, 154].any() or (h[:, 155] != 0x20).any():
        return None
    if (h.sum(axis=1, dtype=np.uint32).astype(np.int64) - h[:, 148:156].sum(axis=1, dtype=np.int64) + 256
            != stored).any():
        return None
    used = np.flatnonzero(h[:, :100].any(axis=0))
    if not len(used):
        return None  # every name is empty
    name = np.ascontiguousarray(h[:, :int(used[-1]) + 1])  # the columns after it are NUL in every name
    length = np.char.str_len(name.view(f"S{name.shape[1]}").ravel())  # up to the last non-NUL byte
    if (length == 0).any() or np.count_nonzero(name) != length.sum():
        return None  # an empty name, or a NUL inside one (a row never has more non-NULs than its length)
    if np.isin(name[:, 0], (0x2F, 0x5C)).any() or (name[np.arange(len(name)), length - 1] == 0x2F).any():
        return None  # absolute, or a directory
    if b".." in name.tobytes():
        return None  # '..' anywhere (iter_samples decides which are unsafe)
    return name, length


def _lower(x: np.ndarray) -> np.ndarray:
    return np.where((x >= 0x41) & (x <= 0x5A), x | 0x20, x)


def _group(path, buf, name: np.ndarray, length: np.ndarray, offsets: np.ndarray, size: np.ndarray) -> TarIndex:
    """Consecutive members with one key form a sample (webdataset's rule, as ``split_name``:
    key = the path up to the first dot of the file name)."""
    m, width = name.shape
    if not m:
        none = np.zeros(0, dtype=np.int64)
        return TarIndex(path, buf, name, none, none, none, np.zeros(1, np.int64), none, none,
                        np.zeros(0, dtype=bool), none)
    col = np.arange(width)
    rows = np.arange(m)
    if b"/" in name.tobytes():
        slash = np.where(name == 0x2F, col, -1).max(axis=1)
        dots = (name == 0x2E) & (col > slash[:, None])
    else:
        dots = name == 0x2E
    first_dot = np.argmax(dots, axis=1)
    keylen = np.where(dots[rows, first_dot], first_dot, length)
    ext_at = keylen + 1  # == length + 1 when there is no extension
    new = np.ones(m, dtype=bool)
    if m > 1:
        k = int(keylen.max())
        differs = name[1:, :k] != name[:-1, :k]
        if (keylen != keylen[0]).any():
            differs &= col[:k] < keylen[1:, None]
        new[1:] = (keylen[1:] != keylen[:-1]) | differs.any(axis=1)
    first = np.flatnonzero(new)
    extlen = np.maximum(length - ext_at, 0)
    ext = name[rows[:, None], np.minimum(ext_at[:, None] + np.arange(4), width - 1)]
    ext = np.where(np.arange(4) < extlen[:, None], ext, 0)
    low = _lower(ext)
    as_int = lambda e: int.from_bytes(e.ljust(4, b"\0"), "little")  # noqa: E731
    code = low.astype(np.uint32) @ _BYTE_WEIGHTS
    raw_code = ext.astype(np.uint32) @ _BYTE_WEIGHTS
    image = np.isin(code, [as_int(e) for e in (b"jpg", b"png", b"jpeg", b"webp")]) & (extlen <= 4)
    image &= ~((extlen == 3) & np.isin(code, [as_int(b"jpeg"), as_int(b"webp")]))  # lengths must match
    is_json = (raw_code == as_int(b"json")) & (extlen == 4)
    sample_of = np.cumsum(new) - 1
    nsamples = len(first)
    has_image = np.zeros(nsamples, dtype=bool)
    has_image[sample_of[image]] = True
    json_member = np.full(nsamples, -1, dtype=np.int64)
    jm = np.flatnonzero(is_json)
    if len(jm):  # the last json member of each sample (Sample.parts keeps the last)
        last_json = np.append(sample_of[jm][1:] != sample_of[jm][:-1], True)
        json_member[sample_of[jm][last_json]] = jm[last_json]
    ends = offsets + _BLOCK + (size + _BLOCK - 1) // _BLOCK * _BLOCK
    last = np.append(first[1:], m) - 1
    return TarIndex(path, buf, name, offsets, size, ext_at, np.append(first, m), offsets[first], ends[last],
                    has_image, json_member)


def _iov_max() -> int:
    try:
        return max(16, min(1024, os.sysconf("SC_IOV_MAX")))
    except (AttributeError, ValueError, OSError):
        return 16  # POSIX's minimum


_IOV_MAX = _iov_max()


def write_views(fd: int, views: list) -> None:
    """Write the buffers ``views`` to ``fd`` in order: one writev call per ``_IOV_MAX`` of them,
    going on after a short write from the byte it stopped at."""
    i = 0
    while i < len(views):
        batch = views[i:i + _IOV_MAX]
        done = os.writev(fd, batch)
        i += len(batch)
        if done < sum(map(len, batch)):
            k, written = stopped_at([len(v) for v in batch], done)
            _write_rest(fd, batch[k], written)
            i -= len(batch) - k - 1


def stopped_at(lengths: list, done: int) -> tuple[int, int]:
    """Where a write of buffers of these ``lengths`` that wrote ``done`` bytes (fewer than all)
    stopped: (which buffer, how many of its bytes were written)."""
    for k, n in enumerate(lengths):
        if done < n:
            return k, done
        done -= n
    raise ValueError(f"{done} bytes more than the buffers hold were written")


def _write_rest(fd: int, view: memoryview, done: int) -> None:
    while done < len(view):
        with view[done:] as rest:  # released even when the write fails
            n = os.write(fd, rest)
        if n <= 0:
            raise OSError(errno.EIO, f"write of {len(view) - done} bytes wrote nothing")
        done += n


class ShardWriter:
    """Writes samples into one tar atomically (temporary file, renamed on close)."""

    def __init__(self, path: str | Path):
        self._ctx = atomic_open(path, "wb")
        self._f = self._ctx.__enter__()
        self._tar = tarfile.open(fileobj=self._f, mode="w", format=tarfile.USTAR_FORMAT)
        self.count = 0

    def write(self, sample: Sample, key: str | None = None) -> None:
        """Append a sample: its members' bytes as read when it came from a tar and keeps its key,
        else new headers for its parts (named ``key`` when given; mtime 0, mode 0444)."""
        if sample.raw and (key is None or key == sample.key):  # the original headers and blocks
            self._tar.fileobj.write(b"".join(sample.raw))
            self._tar.offset += sum(len(r) for r in sample.raw)
        else:
            for ext, data in sample.parts.items():
                info = tarfile.TarInfo(f"{key or sample.key}.{ext}")
                info.size, info.mtime, info.mode = len(data), 0, 0o444  # reproducible bytes
                self._tar.addfile(info, io.BytesIO(data))
        self.count += 1

    def write_spans(self, buf, starts: list, ends: list, samples: int) -> None:
        """Append ``samples`` whole samples stored as the byte ranges ``[starts[k], ends[k])`` of
        the mapped tar ``buf``, in order: the kernel copies them from the mapping (see
        :func:`write_views`); no byte passes through Python."""
        self._f.flush()
        base = memoryview(buf)
        views = [base[s:e] for s, e in zip(starts, ends)]
        try:
            write_views(self._f.fileno(), views)
        finally:  # the map can be closed only once no view of it is left
            for v in views:
                v.release()
            base.release()
        self._tar.offset += sum(ends) - sum(starts)
        self.count += samples

    def close(self) -> None:
        self._tar.close()
        self._ctx.__exit__(None, None, None)

    def abort(self) -> None:
        self._tar.close()
        try:
            self._ctx.__exit__(RuntimeError, RuntimeError("aborted"), None)
        except RuntimeError:
            pass
