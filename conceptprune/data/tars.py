"""Reading and writing webdataset tar shards sample by sample, without extracting anything."""

from __future__ import annotations

import io
import json
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Iterator

from conceptprune.atomic import atomic_open
from conceptprune.errors import PoolError


@dataclass
class Sample:
    key: str
    parts: dict = field(default_factory=dict)  # extension -> bytes, in tar order

    def json(self) -> dict:
        raw = self.parts.get("json")
        return json.loads(raw) if raw else {}


def is_unsafe(name: str) -> bool:
    p = PurePosixPath(name)
    return name.startswith("/") or ".." in p.parts or name.startswith("\\")


def split_name(name: str) -> tuple[str, str]:
    """webdataset's rule: key = path up to the first dot of the file name, extension = the rest."""
    d, base = os.path.split(name)
    stem, _, ext = base.partition(".")
    return (f"{d}/{stem}" if d else stem), ext


def iter_samples(path: str | Path, unsafe: list | None = None) -> Iterator[Sample]:
    """Samples of a tar in order. Members with unsafe names (absolute, '..') are never
    returned: their names are appended to ``unsafe``."""
    try:
        tf = tarfile.open(path, mode="r|*")
    except (tarfile.TarError, OSError) as e:
        raise PoolError(f"{path}: not a readable tar shard ({e})") from None
    current: Sample | None = None
    try:
        for m in tf:
            if not m.isfile():
                continue
            if is_unsafe(m.name):
                if unsafe is not None:
                    unsafe.append(m.name)
                continue
            key, ext = split_name(m.name)
            data = tf.extractfile(m).read()
            if current is None or key != current.key:
                if current is not None:
                    yield current
                current = Sample(key)
            current.parts[ext] = data
        if current is not None:
            yield current
    except (tarfile.TarError, EOFError, OSError) as e:
        raise PoolError(f"{path}: corrupt or truncated tar shard ({e})") from None
    finally:
        tf.close()


class ShardWriter:
    """Writes samples into one tar atomically (temporary file, renamed on close)."""

    def __init__(self, path: str | Path):
        self._ctx = atomic_open(path, "wb")
        self._f = self._ctx.__enter__()
        self._tar = tarfile.open(fileobj=self._f, mode="w", format=tarfile.USTAR_FORMAT)
        self.count = 0

    def write(self, sample: Sample) -> None:
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
