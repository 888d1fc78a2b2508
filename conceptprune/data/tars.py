"""Reading and writing webdataset tar shards sample by sample, without extracting anything."""

from __future__ import annotations

import io
import json
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

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
        """The json's "uid" ('' if none). A regex when "uid" occurs once (DataComp's jsons are
        flat), since parsing every json was a tenth of reshard's time."""
        raw = self.parts.get("json")
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


def _members(f, path) -> Iterator[tuple]:
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
        for name, kind, data, raw, others in _members(f, path):
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

    def close(self) -> None:
        self._tar.close()
        self._ctx.__exit__(None, None, None)

    def abort(self) -> None:
        self._tar.close()
        try:
            self._ctx.__exit__(RuntimeError, RuntimeError("aborted"), None)
        except RuntimeError:
            pass
