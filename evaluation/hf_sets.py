"""The three ``nlphuji/*`` sets that DataComp reads with Hugging Face ``datasets``
(``load_dataset(name, split="test")``), converted once into the webdataset layout the evaluator reads.

DataComp's rows: retrieval sets have ``image`` (an image) and ``caption`` (a list of captions);
WinoGAViL has ``candidate_images`` (a list of images, one per entry of ``candidates``), ``cue``,
``candidates`` and ``associations``. Those rows are read here from whichever form is at hand:

- parquet files (the repository's own, or the Hub's conversion under ``refs/convert/parquet``):
  an image is a struct ``{bytes, path}`` with the encoded bytes;
- the Arrow files of a Hugging Face ``datasets`` cache (what DataComp's ``download_evalsets.py``
  leaves in ``<data_dir>/hf_cache/nlphuji___<name>/<config>/<version>/<hash>/<name>-test*.arrow``):
  an image is ``{bytes, path}`` where ``path`` may point into ``hf_cache/downloads/extracted/``.

Output (``write_set``), clip_benchmark's "wds" layout, one folder per task (``<key with / -> ->``):

- retrieval: ``dataset_type.txt`` = ``retrieval``, ``test/nshards.txt``, ``test/{i}.tar``; per row a
  sample ``r<row:07d>`` with the image bytes exactly as in the source (``.jpg``/``.png``/``.webp`` by
  content) and ``.txt``: the captions, one per line, in their order;
- WinoGAViL: ``dataset_type.txt`` = ``winogavil``; per row a sample ``q<row:06d>`` with ``.json``
  (``cue``, ``candidates``, ``associations``) and ``<candidate>.jpg`` per candidate holding that
  candidate's image bytes exactly as in the source (PIL reads them by content, whatever the suffix).

Rows keep the source order. The images are never re-encoded, so a model sees the same pixels as
through ``datasets``.
"""

from __future__ import annotations

import io
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from conceptprune.errors import ConfigError

ROWS_PER_SHARD = 1000


# -- reading rows ----------------------------------------------------------------------------------


def _image_bytes(value, where: str, base: Path | None = None) -> bytes:
    """Encoded bytes of a ``datasets`` Image value ({bytes, path}, raw bytes, or a path).

    A path is followed only when converting a ``datasets`` cache (``base``, its folder), and only
    to a file inside that cache: a downloaded table's rows must carry their bytes (a row naming a
    local file would copy that file into an evaluation set)."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    path = value
    if isinstance(value, dict):
        if value.get("bytes"):
            return bytes(value["bytes"])
        path = value.get("path")
    if not path:
        raise ConfigError(f"{where}: an image has neither bytes nor a path")
    if base is None:
        raise ConfigError(f"{where}: the image is a path reference ({path!r}), not bytes; a downloaded "
                          "set must carry its images")
    p = _locate(Path(path), base)
    if p is None:
        raise ConfigError(f"{where}: image file {path} not found inside {base}")
    return p.read_bytes()


def _locate(path: Path, base: Path) -> Path | None:
    """The file itself if it lies inside the cache ``base``, or, for a cache that was moved, the
    same path below ``base`` (the part after ``downloads/``)."""
    from conceptprune.paths import UnsafePathError, inside, is_within

    if path.is_file() and is_within(path, base):
        return path
    parts = path.parts
    if "downloads" in parts:
        last = len(parts) - 1 - parts[::-1].index("downloads")
        try:
            moved = inside(base / "downloads", "/".join(parts[last + 1:]), "image path")
        except UnsafePathError:
            return None
        if moved.is_file():
            return moved
    return None


def iter_table_rows(files: list[Path]) -> Iterator[dict]:
    """Rows of parquet (``.parquet``) or Arrow-stream (``.arrow``, a ``datasets`` cache) files, in order."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    for f in files:
        if f.suffix == ".parquet":
            pf = pq.ParquetFile(f)
            batches = pf.iter_batches(batch_size=64)
        else:
            try:
                reader = pa.ipc.open_stream(pa.memory_map(str(f)))
            except pa.ArrowInvalid:
                reader = pa.ipc.open_file(pa.memory_map(str(f)))
                batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
            else:
                batches = iter(reader)
        for batch in batches:
            yield from batch.to_pylist()


# -- writing the layout ----------------------------------------------------------------------------


def _suffix(data: bytes) -> str:
    if data[:3] == b"\xff\xd8\xff":
        return "jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return ""


def _as_list(v, where: str) -> list[str]:
    if isinstance(v, str):
        return [v]
    if not isinstance(v, (list, tuple)) or not all(isinstance(s, str) for s in v):
        raise ConfigError(f"{where}: expected a list of strings, got {type(v).__name__}")
    return list(v)


def retrieval_sample(i: int, row: dict, where: str, base: Path | None):
    from conceptprune.tars import Sample

    if "image" not in row or "caption" not in row:
        raise ConfigError(f"{where}: row {i} lacks 'image' or 'caption' (columns: {', '.join(sorted(row))})")
    img = _image_bytes(row["image"], f"{where} row {i}", base)
    ext = _suffix(img)
    if not ext:  # not jpg/png/webp: store it losslessly as png
        from PIL import Image

        buf = io.BytesIO()
        Image.open(io.BytesIO(img)).save(buf, format="PNG")
        img, ext = buf.getvalue(), "png"
    caps = [" ".join(c.splitlines()) for c in _as_list(row["caption"], f"{where} row {i} caption")]
    return Sample(f"r{i:07d}", {ext: img, "txt": "\n".join(caps).encode()})


def winogavil_sample(i: int, row: dict, where: str, base: Path | None):
    from conceptprune.tars import Sample

    need = ("candidate_images", "cue", "candidates", "associations")
    if any(k not in row for k in need):
        raise ConfigError(f"{where}: row {i} lacks one of {', '.join(need)} (columns: {', '.join(sorted(row))})")
    cands = _as_list(row["candidates"], f"{where} row {i} candidates")
    images = row["candidate_images"]
    if len(images) != len(cands) or len(set(cands)) != len(cands):
        raise ConfigError(f"{where}: row {i} has {len(images)} candidate images for {len(cands)} candidates "
                          "(or repeated candidates)")
    if any("/" in c for c in cands):
        raise ConfigError(f"{where}: row {i}: a candidate name contains '/'")
    q = {"cue": row["cue"], "candidates": cands, "associations": _as_list(row["associations"], where)}
    parts = {"json": json.dumps(q).encode()}
    for c, im in zip(cands, images):
        parts[f"{c}.jpg"] = _image_bytes(im, f"{where} row {i}", base)
    return Sample(f"q{i:06d}", parts)


def write_set(kind: str, rows: Iterator[dict], dest: Path, where: str, base: Path | None = None) -> int:
    """Convert rows into ``dest`` (built beside it, renamed into place when complete). Returns the
    number of rows."""
    from conceptprune.tars import ShardWriter

    make = {"retrieval": retrieval_sample, "winogavil": winogavil_sample}[kind]
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "test").mkdir(parents=True)
    n, shard, writer = 0, 0, None
    try:
        for i, row in enumerate(rows):
            if writer is None:
                writer = ShardWriter(tmp / "test" / f"{shard}.tar")
            writer.write(make(i, row, where, base))
            n += 1
            if writer.count == ROWS_PER_SHARD:
                writer.close()
                writer, shard = None, shard + 1
        if writer is not None:
            writer.close()
            shard += 1
        if n == 0:
            raise ConfigError(f"{where}: no rows")
        (tmp / "test" / "nshards.txt").write_text(f"{shard}\n")
        (tmp / "dataset_type.txt").write_text(f"{kind}\n")
    except BaseException:
        if writer is not None:
            writer.abort()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(tmp, dest)
    return n


# -- DataComp's hf_cache ---------------------------------------------------------------------------


def hf_cache_files(hf_cache: Path, name: str) -> list[Path]:
    """The test-split Arrow files of ``nlphuji/<name>`` in a ``datasets`` cache (newest build if
    there are several)."""
    root = hf_cache / f"nlphuji___{name}"
    if not root.is_dir():
        return []
    builds: dict[Path, list[Path]] = {}
    for f in root.rglob(f"{name}-test*.arrow"):  # <config>/<version>/<hash>/ (datasets 2.x)
        builds.setdefault(f.parent, []).append(f)
    if not builds:
        return []
    newest = max(builds, key=lambda d: max(p.stat().st_mtime for p in builds[d]))
    return sorted(builds[newest])


# -- the raw files of a retrieval set's loading script ---------------------------------------------


def iter_csv_zip_rows(csv_path: Path, zip_path: Path, where: str) -> Iterator[dict]:
    """Rows from a retrieval set's csv (Karpathy-style: ``filename`` and ``raw``, the captions as a
    JSON list) and its image zip (an image is found by its file name anywhere in the zip)."""
    import csv
    import posixpath
    import zipfile

    with zipfile.ZipFile(zip_path) as z:
        members = {}
        for name in z.namelist():
            if not name.endswith("/") and "__MACOSX" not in name:
                members.setdefault(posixpath.basename(name), name)
        with open(csv_path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if not {"filename", "raw"} <= set(reader.fieldnames or ()):
                raise ConfigError(f"{where}: {csv_path.name} lacks the columns filename and raw "
                                  f"(has {', '.join(reader.fieldnames or ())})")
            for i, r in enumerate(reader, start=2):
                try:
                    caps = json.loads(r["raw"])
                except json.JSONDecodeError:
                    raise ConfigError(f"{where}: {csv_path.name} line {i}: raw is not a JSON list") from None
                if r["filename"] not in members:
                    raise ConfigError(f"{where}: {csv_path.name} line {i}: {r['filename']} is not in {zip_path.name}")
                yield {"image": {"bytes": z.read(members[r["filename"]]), "path": None}, "caption": caps}
