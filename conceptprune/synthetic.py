"""Generate a pool in DataComp's exact format with planted, known structure.

Used by tests, benchmarks and the docs. Each file pair is ``<32-hex>.parquet`` +
``<32-hex>.npz`` with DataComp's columns and keys; fp16 L2-normalised embeddings.

Planted structure (written to ``_planted/<name>.parquet``, ignored by pool readers):

- ``concept``: which of ``concepts`` clusters a row was drawn from. Clusters differ in
  size (Zipf-like), spread (angle to their centre) and isolation (concepts come in
  families whose centres are close to each other).
- ``dup_of``: global row of which this row is a near-duplicate (cosine ~0.9999), else -1.
- ``quality``: caption quality in [0, 1]; CLIP scores rise with it, non-English and
  empty captions have low quality.
"""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from . import uids as U
from .atomic import atomic_open
from .checks import check_float, check_int
from .errors import ConfigError
from .npz import NpzWriter
from .progress import progress_bar

EMBEDDING_DIMS = {"l14_img": 768, "l14_txt": 768, "b32_img": 512, "b32_txt": 512}
_NOUNS = ("dog cat car house tree flower bird boat chair table lamp guitar bicycle mountain "
          "beach river bridge castle train airplane horse cow sheep pizza cake apple banana "
          "shoe dress watch phone laptop book clock cup bottle ship tower garden street "
          "kitchen bedroom forest desert island lake snow sunset robot toy painting statue").split()
_GOOD = ["a photo of a {n}", "a {n} in the {p}", "close-up photograph of a {a} {n}",
         "the {a} {n} next to the {p}", "{a} {n} for sale, free shipping",
         "my {a} {n} on a sunny day", "vintage {n} illustration", "an old {n} near the {p}"]
_PLACES = ["park", "city", "garden", "studio", "beach", "market", "museum", "yard"]
_ADJ = ["red", "small", "large", "blue", "wooden", "modern", "antique", "green", "white"]
_FOREIGN = ["ein schöner Hund im Garten bei Sonnenuntergang", "une belle maison près de la plage",
            "un coche rojo aparcado en la calle", "una bella casa vicino al mare",
            "красивый дом у озера летом", "海边的一座美丽房子", "美しい庭の花と木",
            "ein altes Fahrrad vor dem Haus", "la tour du château au coucher du soleil"]
_JUNK = ["", "IMG_0123.JPG", "image", "click here", "DSC0001", "photo", "untitled", "1234"]


@dataclass
class SyntheticPoolConfig:
    rows: int = 10_000
    files: int = 2
    seed: int = 0
    concepts: int = 20
    families: int = 5  # concepts in a family have nearby centres (low isolation)
    duplicate_fraction: float = 0.05
    embedding_keys: tuple[str, ...] = tuple(EMBEDDING_DIMS)
    row_group_size: int = 65_536
    short_uid_fraction: float = 0.0  # uids written with fewer than 32 hex digits
    block_rows: int = 65_536
    spread: tuple[float, float] = (0.4, 1.6)  # noise scale range: cos to centre ~0.93..0.53
    dims: dict = field(default_factory=lambda: dict(EMBEDDING_DIMS))


def make_pool(out: str | Path, config: SyntheticPoolConfig | None = None, *, progress: bool = True,
              overwrite: bool = False) -> list[Path]:
    """Write the pool into ``out`` (created); returns the parquet paths.

    A folder that already holds a pool (``*.parquet``, ``*.npz`` or ``_planted/``) is refused,
    since the two pools would mix; ``overwrite`` removes those files first."""
    cfg = config or SyntheticPoolConfig()
    check_config(cfg)
    out = Path(out)
    _clear_old_pool(out, overwrite)
    (out / "_planted").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(cfg.seed)
    world = _World(cfg, rng)
    bounds = np.linspace(0, cfg.rows, cfg.files + 1).astype(np.int64)
    paths = []
    bar = progress_bar(total=cfg.rows, desc="generating pool", unit="rows", disable=not progress)
    for i in range(cfg.files):
        name = hashlib.sha256(f"{cfg.seed}-{i}".encode()).hexdigest()[:32]
        n = int(bounds[i + 1] - bounds[i])
        _write_file(out, name, int(bounds[i]), n, world, cfg, np.random.default_rng([cfg.seed, i]), bar)
        paths.append(out / f"{name}.parquet")
    bar.close()
    (out / "_planted" / "COMPLETE").write_text(f"{cfg.rows} rows in {cfg.files} files\n")
    return paths


def check_config(cfg: SyntheticPoolConfig) -> None:
    """Every numeric field, before anything is written."""
    check_int("--rows", cfg.rows, min=1)
    check_int("--files", cfg.files, min=1, max=cfg.rows)
    check_int("--seed", cfg.seed, min=0)
    check_int("--concepts", cfg.concepts, min=1)
    check_float("--duplicate-fraction", cfg.duplicate_fraction, min=0.0, max=1.0, max_open=True)
    check_float("--short-uid-fraction", cfg.short_uid_fraction, min=0.0, max=1.0)
    check_int("block_rows", cfg.block_rows, min=1)
    check_int("row_group_size", cfg.row_group_size, min=1)
    unknown = [k for k in cfg.embedding_keys if k not in cfg.dims and k not in EMBEDDING_DIMS]
    if unknown:
        raise ConfigError(f"--embedding-keys: unknown key {unknown[0]!r} (known: {', '.join(EMBEDDING_DIMS)})")


def _clear_old_pool(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a folder")
    if not out.is_dir():
        return
    old = sorted(out.glob("*.parquet")) + sorted(out.glob("*.npz"))
    planted = out / "_planted"
    if not old and not planted.exists():
        return
    if not overwrite:
        raise ConfigError(f"--out {out} already holds a pool ({len(old)} parquet/npz files); the two would "
                          "mix. Use an empty folder, or pass --overwrite to replace it")
    for p in old:
        p.unlink()
    shutil.rmtree(planted, ignore_errors=True)


class _World:
    """Concept centres shared by all files."""

    def __init__(self, cfg: SyntheticPoolConfig, rng: np.random.Generator):
        k = cfg.concepts
        self.weights = 1.0 / np.arange(1, k + 1) ** 0.8  # Zipf-like densities
        rng.shuffle(self.weights)
        self.weights /= self.weights.sum()
        self.spread = rng.uniform(*cfg.spread, size=k)
        self.family = rng.integers(0, max(cfg.families, 1), size=k)
        self.centres = {}
        for key in ("l14", "b32"):
            d = cfg.dims[f"{key}_img"] if f"{key}_img" in cfg.dims else EMBEDDING_DIMS[f"{key}_img"]
            fam = _unit(rng.standard_normal((max(cfg.families, 1), d)))
            own = _unit(rng.standard_normal((k, d)))
            # Half of the families are tight (isolated concepts stay far from all others).
            tight = rng.random(max(cfg.families, 1)) < 0.5
            mix = np.where(tight[self.family], 0.8, 0.0)[:, None]
            self.centres[key] = _unit(mix * fam[self.family] + np.sqrt(1 - mix ** 2) * own)
        self.captions = _caption_bank(rng)


def _caption_bank(rng):
    good = []
    for n in _NOUNS:
        for t in _GOOD:
            good.append(t.format(n=n, a=_ADJ[rng.integers(len(_ADJ))], p=_PLACES[rng.integers(len(_PLACES))]))
    return {"good": good, "foreign": _FOREIGN, "junk": _JUNK}


def near_duplicates(n: int, cfg, rng) -> np.ndarray:
    """For each of ``n`` rows the earlier row of the same generation block it copies, or -1:
    ``cfg.duplicate_fraction`` of the rows, a copy of a copy pointing at the original."""
    dup_of = np.full(n, -1, dtype=np.int64)
    ndup = int(round(cfg.duplicate_fraction * n))
    if ndup and n > 1:
        targets = np.sort(rng.choice(np.arange(1, n), size=min(ndup, n - 1), replace=False))
        block_start = (targets // cfg.block_rows) * cfg.block_rows
        targets, block_start = targets[targets > block_start], block_start[targets > block_start]
        dup_of[targets] = rng.integers(block_start, targets)
        while True:  # follow chains to their original, all rows at once
            chained = dup_of[np.maximum(dup_of[targets], 0)] >= 0
            chained &= dup_of[targets] >= 0
            if not chained.any():
                break
            dup_of[targets[chained]] = dup_of[dup_of[targets[chained]]]
    return dup_of


def _write_file(out: Path, name: str, offset: int, n: int, world: _World, cfg, rng, bar) -> None:
    k = cfg.concepts
    concept = rng.choice(k, size=n, p=world.weights)
    # A near-duplicate copies an earlier row of the same generation block, so the original
    # vector is at hand when the copy is made.
    dup_of = near_duplicates(n, cfg, rng)
    has_dup = dup_of >= 0
    concept[has_dup] = concept[dup_of[has_dup]]
    dup_global = np.where(has_dup, dup_of + offset, -1)

    kind = rng.choice(3, size=n, p=[0.8, 0.1, 0.1])  # good, foreign, junk caption
    quality = np.where(kind == 0, rng.uniform(0.4, 1.0, n), rng.uniform(0.0, 0.3, n))
    kind[has_dup] = kind[dup_of[has_dup]]
    quality[has_dup] = quality[dup_of[has_dup]]
    bank = world.captions
    all_captions = bank["good"] + bank["foreign"] + bank["junk"]
    base = np.cumsum([0, len(bank["good"]), len(bank["foreign"])])
    sizes = np.array([len(bank["good"]), len(bank["foreign"]), len(bank["junk"])])
    cap_idx = base[kind] + (rng.random(n) * sizes[kind]).astype(np.int64)
    cap_idx[has_dup] = cap_idx[dup_of[has_dup]]
    text = pa.array(all_captions, pa.string()).take(pa.array(cap_idx))

    scores = {m: np.clip(0.12 + 0.22 * quality + rng.normal(0, 0.02, n), -1, 1).astype(np.float32)
              for m in ("l14", "b32")}

    uid_arr = U.make_array(rng.integers(0, 2 ** 64, n, dtype=np.uint64, endpoint=False),
                           rng.integers(0, 2 ** 64, n, dtype=np.uint64, endpoint=False))
    lead = rng.random(n) < 0.01  # some uids start with zeros
    uid_arr["f0"][lead] >>= np.uint64(20)
    uid_chars = U.hex_array(uid_arr)
    uid_col = _fixed_strings(uid_chars)
    if cfg.short_uid_fraction > 0:  # same values, written without their leading zeros
        short = rng.random(n) < cfg.short_uid_fraction
        py = uid_col.to_pylist()
        for i in np.flatnonzero(short):
            py[i] = py[i].lstrip("0") or "0"
        uid_col = pa.array(py, pa.string())
    prefix = np.frombuffer(b"http://images.invalid/", np.uint8)
    suffix = np.frombuffer(b".jpg", np.uint8)
    url_chars = np.hstack([np.broadcast_to(prefix, (n, len(prefix))), uid_chars,
                           np.broadcast_to(suffix, (n, len(suffix)))])
    sha_chars = np.hstack([U.hex_array(U.make_array(rng.integers(0, 2 ** 64, n, dtype=np.uint64),
                                                    rng.integers(0, 2 ** 64, n, dtype=np.uint64)))
                           for _ in range(2)])

    width = np.clip(rng.lognormal(6.4, 0.5, n), 32, 8000).astype(np.int64)
    aspect = np.exp(rng.normal(0, 0.35, n))
    aspect[rng.random(n) < 0.04] *= 5.0  # panoramas
    height = np.clip(width / aspect, 32, 8000).astype(np.int64)
    has_face = rng.random(n) < 0.1
    box = np.sort(rng.random((int(has_face.sum()), 2, 2)), axis=2).transpose(0, 2, 1).reshape(-1, 4)
    inner = pa.FixedSizeListArray.from_arrays(pa.array(box.ravel()), 4).cast(pa.list_(pa.float64()))
    face_offsets = np.concatenate([[0], np.cumsum(has_face)]).astype(np.int32)
    faces = pa.ListArray.from_arrays(pa.array(face_offsets), inner)

    table = pa.table({
        "uid": uid_col,
        "url": _fixed_strings(url_chars),
        "text": text,
        "original_width": pa.array(width, pa.int64()),
        "original_height": pa.array(height, pa.int64()),
        "sha256": _fixed_strings(sha_chars),
        "clip_b32_similarity_score": pa.array(scores["b32"], pa.float32()),
        "clip_l14_similarity_score": pa.array(scores["l14"], pa.float32()),
        "face_bboxes": faces,
    })
    keys = list(cfg.embedding_keys)
    if keys:
        arrays = {key: (n, cfg.dims.get(key, EMBEDDING_DIMS[key]), "float16") for key in keys}
        with NpzWriter(out / f"{name}.npz", arrays) as w:
            for a in range(0, n, cfg.block_rows):
                b = min(n, a + cfg.block_rows)
                for key, arr in _embeddings(world, concept[a:b], dup_of[a:b] - a, scores, a, keys, rng).items():
                    w.write(key, a, arr)
                bar.update(b - a)
    else:
        bar.update(n)
    with atomic_open(out / f"{name}.parquet", "wb") as f:
        pq.write_table(table, f, row_group_size=cfg.row_group_size)
    truth = pa.table({"concept": pa.array(concept.astype(np.int32)), "dup_of": pa.array(dup_global),
                      "quality": pa.array(quality.astype(np.float32))})
    pq.write_table(truth, out / "_planted" / f"{name}.parquet")


def _embeddings(world, concept, dup_local, scores, a, keys, rng):
    """Image and text embeddings of one block; ``dup_local`` indexes the block (<0: none)."""
    out = {}
    n = len(concept)
    dups = np.flatnonzero(dup_local >= 0)
    for m in ("l14", "b32"):
        if f"{m}_img" not in keys and f"{m}_txt" not in keys:
            continue
        c = world.centres[m]
        d = c.shape[1]
        noise = rng.standard_normal((n, d), dtype=np.float32) / np.float32(np.sqrt(d))
        img = _unit(c[concept] + world.spread[concept, None].astype(np.float32) * noise)
        if len(dups):  # sources precede copies and are never copies themselves
            tiny = rng.standard_normal((len(dups), d), dtype=np.float32) * np.float32(0.01 / np.sqrt(d))
            img[dups] = _unit(img[dup_local[dups]] + tiny)
        if f"{m}_img" in keys:
            out[f"{m}_img"] = img.astype(np.float16)
        if f"{m}_txt" in keys:  # cos(img, txt) equals the row's CLIP score
            s = scores[m][a:a + n, None]
            u = rng.standard_normal((n, d), dtype=np.float32)
            u -= np.einsum("ij,ij->i", u, img)[:, None] * img
            out[f"{m}_txt"] = _unit(s * img + np.sqrt(np.maximum(0, 1 - s ** 2)) * _unit(u)).astype(np.float16)
    return out


def _fixed_strings(chars: np.ndarray) -> pa.Array:
    n, w = chars.shape
    offsets = np.arange(0, w * n + 1, w, dtype=np.int64)
    return pa.LargeStringArray.from_buffers(n, pa.py_buffer(offsets),
                                            pa.py_buffer(np.ascontiguousarray(chars).tobytes())).cast(pa.string())


def _unit(x):
    x = np.asarray(x, dtype=np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


# -- shards: the images of a generated pool ------------------------------------------------

def _concept_look(concept: int) -> tuple[np.ndarray, int]:
    """A concept's colour and shape (0 disc, 1 square, 2 stripes, 3 cross): rows of one concept
    look alike, so a tiny CLIP trained on the shards has something to learn."""
    r = np.random.default_rng([7919, concept])
    return r.integers(30, 226, 3), int(concept % 4)


def _image(concept: int, source_row: int, own_row: int, seed: int, size: int) -> np.ndarray:
    """An RGB image: the concept's shape in its colour, placed and shaded by ``source_row`` (a
    near-duplicate shares its original's), with a little noise of its own."""
    colour, shape = _concept_look(concept)
    r = np.random.default_rng([seed, source_row])
    bg = r.integers(0, 256, 3)
    yy, xx = np.mgrid[0:size, 0:size] / size
    cy, cx = r.uniform(0.3, 0.7, 2)
    rad = r.uniform(0.18, 0.32)
    if shape == 0:
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 < rad ** 2
    elif shape == 1:
        mask = (abs(yy - cy) < rad) & (abs(xx - cx) < rad)
    elif shape == 2:
        mask = ((xx * 6 + r.uniform(0, 1)) % 1) < 0.5
    else:
        mask = (abs(yy - cy) < rad / 3) | (abs(xx - cx) < rad / 3)
    img = np.where(mask[..., None], colour, bg).astype(np.float32)
    img += r.normal(0, 12, img.shape)  # the original's texture
    img += np.random.default_rng([seed, own_row, 1]).normal(0, 2, img.shape)  # this copy's own
    return np.clip(img, 0, 255).astype(np.uint8)


def _jpeg_bytes(img: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def _planted_columns(parquet: Path, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(concept, dup_of) of a generated pool file; a pool without ``_planted/`` gets one
    concept per uid hash and no duplicates."""
    p = parquet.parent / "_planted" / parquet.name
    if not p.exists():
        return np.full(n, -1, np.int64), np.full(n, -1, np.int64)
    t = pq.read_table(p, columns=["concept", "dup_of"])
    return (t.column("concept").to_numpy().astype(np.int64), t.column("dup_of").to_numpy().astype(np.int64))


def write_shards(pool_dir: str | Path, out: str | Path, *, rows: np.ndarray | None = None, per_shard: int = 1000,
                 image_size: int = 32, seed: int = 0, progress: bool = True) -> int:
    """Webdataset shards of a pool's rows in the form DataComp's download leaves them
    (img2dataset): ``%08d.tar`` holding per sample ``<key>.jpg`` (a small generated JPEG: the
    row's planted concept, a near-duplicate drawn like its original), ``<key>.txt`` (the
    caption) and ``<key>.json`` (uid, url, caption, key, status, sizes, sha256), and beside each
    tar img2dataset's ``%08d_stats.json``, which ``reshard`` requires of a finished shard.
    ``rows``: sorted global pool rows (default all). Returns the sample count. Tars and stats
    are written atomically, the stats file after its tar."""
    import hashlib as _hashlib
    import io
    import json
    import tarfile
    import time

    from .pool import Pool

    check_int("--shard-size", per_shard, min=1)
    check_int("--image-size", image_size, min=8, max=1024)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pool = Pool(pool_dir)
    want = None if rows is None else np.asarray(rows, np.int64)
    total = pool.rows if want is None else len(want)
    width = len(str(per_shard - 1))
    state = {"tar": None, "ctx": None, "count": 0, "shard": 0, "bytes": 0, "t0": time.time()}

    def close_shard():
        state["tar"].close()
        state["ctx"].__exit__(None, None, None)
        n = state["count"]
        stats = {"count": n, "successes": n, "failed_to_download": 0, "failed_to_resize": 0,
                 "duration": round(time.time() - state["t0"], 3), "bytes_downloaded": state["bytes"],
                 "start_time": state["t0"], "end_time": time.time(), "status_dict": {"success": n},
                 "generated_by": "conceptprune make-pool --shards (synthetic images, no download)"}
        with atomic_open(out / f"{state['shard']:08d}_stats.json", "w") as f:
            json.dump(stats, f, indent=1)
        state.update(tar=None, ctx=None, count=0, shard=state["shard"] + 1, bytes=0, t0=time.time())

    def add(name: str, data: bytes):
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), 0, 0o444  # reproducible bytes
        state["tar"].addfile(info, io.BytesIO(data))

    n, planted = 0, {}
    bar = progress_bar(total=total, desc="writing shards", unit="samples", disable=not progress)
    have = set(pool.schema().names)
    columns = [c for c in ("text", "url", "original_width", "original_height") if c in have]
    for chunk in pool.iter_chunks(columns):
        sel = np.arange(len(chunk)) if want is None else \
            want[(want >= chunk.start) & (want < chunk.start + len(chunk))] - chunk.start
        if not len(sel):
            continue
        if chunk.file.parquet not in planted:
            planted.clear()  # one file's columns at a time
            planted[chunk.file.parquet] = _planted_columns(chunk.file.parquet, chunk.local_start + len(chunk))
        concept, dup_of = planted[chunk.file.parquet]
        texts = chunk.pylist("text") if "text" in have else [""] * len(chunk)
        urls = chunk.pylist("url") if "url" in have else [None] * len(chunk)
        ow = chunk.column("original_width") if "original_width" in have else np.full(len(chunk), image_size)
        oh = chunk.column("original_height") if "original_height" in have else np.full(len(chunk), image_size)
        for i in sel:
            if state["tar"] is None:
                state["ctx"] = atomic_open(out / f"{state['shard']:08d}.tar", "wb")
                state["tar"] = tarfile.open(fileobj=state["ctx"].__enter__(), mode="w", format=tarfile.USTAR_FORMAT)
            local = chunk.local_start + int(i)
            row = chunk.start + int(i)
            source = int(dup_of[local]) if dup_of[local] >= 0 else row
            c = int(concept[local]) if concept[local] >= 0 else int(U.hash_uids(chunk.uids[i:i + 1], seed)[0] % 64)
            jpg = _jpeg_bytes(_image(c, source, row, seed, image_size))
            hi, lo = (int(x) for x in chunk.uids[i])
            key = f"{state['shard']:05d}{state['count']:0{width}d}"
            meta = {"uid": U.pair_to_uid(hi, lo), "url": urls[i], "caption": texts[i], "key": key,
                    "status": "success", "error_message": None, "width": image_size, "height": image_size,
                    "original_width": int(ow[i]), "original_height": int(oh[i]), "exif": "{}",
                    "sha256": _hashlib.sha256(jpg).hexdigest()}
            add(f"{key}.jpg", jpg)
            add(f"{key}.txt", (texts[i] or "").encode())
            add(f"{key}.json", json.dumps(meta).encode())
            state["count"] += 1
            state["bytes"] += len(jpg)
            n += 1
            bar.update(1)
            if state["count"] >= per_shard:
                close_shard()
    if state["tar"] is not None:
        close_shard()
    bar.close()
    return n
