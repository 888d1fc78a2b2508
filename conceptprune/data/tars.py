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
    raw: list = field(default_factory=list, repr=False)  # the members' tar bytes, when read from a tar

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


def _octal(field: bytes) -> int:
    field = field.rstrip(b"\0 ").lstrip(b" ")
    if field and field[0] & 0x80:  # base-256 (GNU) for large sizes
        return int.from_bytes(field, "big") & ~(1 << (8 * len(field) - 1))
    return int(field or b"0", 8)


def _members(f, path):
    """(name, is_regular_file, data, raw bytes) of each tar member, headers parsed by hand:
    tarfile's Python header parsing was most of reshard's time."""
    long_name = None
    pax_path = None
    pending_raw = []
    while True:
        hdr = f.read(_BLOCK)
        if len(hdr) < _BLOCK:
            if hdr.strip(b"\0"):
                raise PoolError(f"{path}: truncated tar header")
            return
        if hdr == _ZERO:
            return
        chk = hdr[148:156]
        if sum(hdr) - sum(chk) + 256 != _octal(chk):  # the checksum counts its own field as spaces
            raise PoolError(f"{path}: corrupt tar header (bad checksum)")
        size = _octal(hdr[124:136])
        padded = (size + _BLOCK - 1) // _BLOCK * _BLOCK
        body = f.read(padded)
        if len(body) < padded:
            raise PoolError(f"{path}: truncated tar shard")
        kind = hdr[156:157]
        data = body[:size]
        if kind == b"L":  # GNU long name for the next member
            long_name = data.rstrip(b"\0").decode("utf-8", "surrogateescape")
            pending_raw.append(hdr + body)
            continue
        if kind in (b"x", b"g"):  # pax headers; 'path' renames the next member
            if kind == b"x":
                for rec in data.split(b"\n"):
                    if b" path=" in rec:
                        pax_path = rec.split(b" path=", 1)[1].decode("utf-8", "surrogateescape")
            pending_raw.append(hdr + body)
            continue
        name = hdr[0:100].rstrip(b"\0").decode("utf-8", "surrogateescape")
        if hdr[257:262] == b"ustar" and hdr[345:500].strip(b"\0"):
            name = hdr[345:500].rstrip(b"\0").decode("utf-8", "surrogateescape") + "/" + name
        name = pax_path or long_name or name
        raw = b"".join(pending_raw) + hdr + body
        long_name = pax_path = None
        pending_raw = []
        yield name, kind in (b"0", b"\0", b"7"), data, raw


def iter_samples(path: str | Path, unsafe: list | None = None) -> Iterator[Sample]:
    """Samples of a tar in order. Members with unsafe names (absolute, '..') are never
    returned: their names are appended to ``unsafe``."""
    try:
        f = open(path, "rb", buffering=1 << 20)
    except OSError as e:
        raise PoolError(f"{path}: not a readable tar shard ({e})") from None
    current: Sample | None = None
    with f:
        for name, regular, data, raw in _members(f, path):
            if not regular:
                continue
            if is_unsafe(name):
                if unsafe is not None:
                    unsafe.append(name)
                continue
            key, ext = split_name(name)
            if current is None or key != current.key:
                if current is not None:
                    yield current
                current = Sample(key)
            current.parts[ext] = data
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

    def write(self, sample: Sample) -> None:
        if sample.raw:  # copied as read: the members' original headers and blocks
            self._tar.fileobj.write(b"".join(sample.raw))
            self._tar.offset += sum(len(r) for r in sample.raw)
        else:
            for ext, data in sample.parts.items():
                info = tarfile.TarInfo(f"{sample.key}.{ext}")
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
