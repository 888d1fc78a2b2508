"""``conceptprune reshard``: cut the samples of a keep-list out of downloaded shards.

A drop-in for DataComp's resharder (``resharder.py``): contiguous ``%08d.tar`` shards with
``%08d_stats.json``, ``sizes.json`` (read by open_clip), the keep-list copied to
``sample_ids.npy`` and ``meta.json`` with DataComp's keys (``output_shard_count`` and
``output_shard_format`` are what DataComp's ``train.py`` reads) plus our counts (kept,
keep-list uids missing from the shards because their download failed, per worker). Input
shards without ``_stats.json`` (an unfinished download) are skipped with a warning, as
DataComp's resharder does.

DataComp's semantics, and where we differ (README "reshard"):

- a uid listed k times in the keep-list is written k times (upsampling). DataComp names every
  output sample ``<uid>-<j>``; we keep the sample's own key (so the default output is the input
  members byte for byte) and name the extra copies ``<key>-<j>``, j >= 1; ``datacomp_keys``
  names every sample ``<uid>-<j>`` as DataComp does. Keep-lists may be memory-mapped raw
  arrays (no ``.npy`` header), as DataComp's resharder accepts.
- ``shuffle_buffer`` N: each worker's output passes through a buffer of N samples, like
  DataComp's ``--shuffle-bufsize``, but seeded (``seed``, rank): a rerun writes the same bytes.
- ``blur``: faces boxed in the metadata's ``face_bboxes`` column are blurred with img2dataset's
  blurrer and the image re-encoded as WebP (quality 100), the sample's image member becoming
  ``.webp``, as DataComp's ``--apply-blur``; DataComp maps shards to parquets by a JSON file,
  we find each kept uid's boxes in the metadata folder.
- a sample without an image (``jpg``, ``jpeg``, ``png``, ``webp``: what open_clip's loader needs)
  is not written and is counted; DataComp's resharder writes it, and open_clip drops it while
  training. Links, devices and FIFOs inside input tars are dropped and counted.

Job state (completion markers, per-worker parts, SLURM logs) lives beside the output, in
``<out>.state/``, never inside it; the output is assembled there with ``meta.json`` written
last and moved into place by one rename, then the state folder is removed. A reshard killed
at any moment leaves either no ``<out>`` or the finished one; a rerun resumes from the
markers. ``--out`` may neither be nor contain nor lie inside an input.
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import random
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from conceptprune import keeplist as K
from conceptprune import uids as U
from conceptprune.atomic import WriteError, file_digest, is_write_failure, write_error, write_json
from conceptprune.checks import check_seed
from conceptprune.errors import ConfigError, PoolError
from conceptprune.progress import progress_bar
from conceptprune.slurm.stage import Executor, Stage

from conceptprune.tars import IMAGE_EXTS, Sample, ShardWriter, index_plain, iter_samples

log = logging.getLogger(__name__)
STATE = ".reshard.json"
OUTPUT_SHARD_FORMAT = "{:08d}.tar"  # DataComp's defaults, recorded in meta.json
OUTPUT_STATS_FORMAT = "{:08d}_stats.json"
_REFERENCE_ENV = "CONCEPTPRUNE_RESHARD_REFERENCE"  # private: "1" forces the member-by-member path
_COUNTS = ("samples_read", "kept", "unsafe_members", "special_members", "no_uid", "without_image",
           "samples_with_dropped_members", "blurred")


def state_dir(out: str | Path) -> Path:
    """Where a reshard into ``out`` keeps its job state: beside ``out``, never inside it."""
    out = Path(out)
    return out.parent / f"{out.name}.state"


# -- the keep-list, with multiplicities ---------------------------------------------------------


def read_keep_counts(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(sorted distinct uids, how many times each is listed) of a keep-list (``.npy`` or
    DataComp's raw memory-mapped array; sorted, as DataComp's searchsorted needs)."""
    return K.multiplicities(K.read_keep_list(path, multiset=True))


# -- input and output folders -------------------------------------------------------------------


def list_input_shards(shards_dir: str | Path) -> tuple[list[Path], list[Path]]:
    """(shards with _stats.json, shards without it). A stats file without its tar is an error."""
    d = Path(shards_dir)
    if not d.is_dir():
        raise ConfigError(f"--shards {d}: folder not found")
    tars = sorted(d.glob("*.tar"))
    stats = {p.name[: -len("_stats.json")] for p in d.glob("*_stats.json")}
    missing = sorted(stats - {t.stem for t in tars})
    if missing:
        raise PoolError(f"{d}: shard {missing[0]}.tar is missing but its _stats.json exists "
                        f"({len(missing)} such shards)")
    complete = [t for t in tars if t.stem in stats]
    incomplete = [t for t in tars if t.stem not in stats]
    if not complete:
        raise ConfigError(f"--shards {d}: no finished shards (<n>.tar with <n>_stats.json)")
    return complete, incomplete


def check_no_overlap(out: Path, inputs: dict[str, Path]) -> None:
    """Outputs never overlap inputs: ``out`` (and its state folder) may not be, contain or lie
    inside an input, whatever --overwrite says (it would delete or mix into the input)."""
    for where in (out, state_dir(out)):
        o = where.resolve()
        for flag, p in inputs.items():
            r = Path(p).resolve()
            if r == o or o in r.parents:
                raise ConfigError(f"--out {out}: {where} is or contains {flag} {p}; choose another output folder "
                                  "(nothing was deleted)")
            if r in o.parents:
                raise ConfigError(f"--out {out} lies inside {flag} {p}; choose an output folder outside the inputs")


# -- the workers ------------------------------------------------------------------------------------


def _buffer_shuffle(items: Iterator, size: int, rng: random.Random) -> Iterator:
    """A shuffle buffer of ``size`` items: once full, each new item takes the place of a random
    one, which is emitted; the rest is emitted in random order at the end."""
    buf: list = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        k = rng.randrange(size)
        yield buf[k]
        buf[k] = item
    rng.shuffle(buf)
    yield from buf


def blur_sample(sample: Sample, boxes: list, blurrer) -> Sample | None:
    """The sample with the faces in ``boxes`` (relative x0, y0, x1, y1) blurred by img2dataset's
    blurrer, its image re-encoded as WebP quality 100 (DataComp's --apply-blur); None when the
    image does not decode."""
    import cv2

    ext = next(e for e in sample.parts if e.lower() in IMAGE_EXTS)
    img = cv2.imdecode(np.frombuffer(sample.parts[ext], np.uint8), cv2.IMREAD_UNCHANGED)
    if img is None:
        return None
    ok, enc = cv2.imencode(".webp", blurrer(img, boxes), [int(cv2.IMWRITE_WEBP_QUALITY), 100])
    if not ok:
        return None
    parts = {("webp" if e == ext else e): (enc.tobytes() if e == ext else v) for e, v in sample.parts.items()}
    return Sample(sample.key, parts, raw=None)


def _load_boxes(path: str | None) -> dict:
    if not path:
        return {}
    import pyarrow.parquet as pq

    t = pq.read_table(path).to_pydict()
    return {(int(h), int(l_)): b for h, l_, b in zip(t["hi"], t["lo"], t["face_bboxes"])}


def _open_plain(shard: str):
    """(open file, its map, its TarIndex) of a plain tar; (None, None, None) for any other
    (unreadable, empty, or needing the member-by-member reader, which reports what is wrong)."""
    f = buf = None
    try:
        f = open(shard, "rb")
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        index = index_plain(shard, buf)
    except (OSError, ValueError):
        index = None
    if index is None:
        if buf is not None:
            buf.close()
        if f is not None:
            f.close()
        return None, None, None
    return f, buf, index


class _PartWriter:
    """One worker's output shards, ``shard_size`` samples each. A full shard is closed (fsynced
    and renamed) in a background thread while the next one is written; ``close`` waits."""

    def __init__(self, out: Path, shard_size: int):
        self.out, self.shard_size = out, shard_size
        self.written: list[int] = []
        self.writer: ShardWriter | None = None
        self.total = 0
        self._closing: threading.Thread | None = None
        self._errors: list[BaseException] = []

    def _current(self) -> ShardWriter:
        if self.writer is None:
            self.writer = ShardWriter(self.out / f"{len(self.written):08d}.tar")
        return self.writer

    def _rotate(self) -> None:
        if self.writer.count == self.shard_size:
            self._wait()  # at most one shard closing at a time
            self._closing = threading.Thread(target=self._close_one, args=(self.writer,), name="close-shard")
            self._closing.start()
            self.written.append(self.writer.count)
            self.writer = None

    def _close_one(self, writer: ShardWriter) -> None:
        try:
            writer.close()
        except BaseException as e:  # raised in the worker by _wait
            self._errors.append(e)

    def _wait(self, check: bool = True) -> None:
        if self._closing is not None:
            self._closing.join()
            self._closing = None
        if check and self._errors:
            raise self._errors[0]

    def sample(self, sample: Sample, key: str | None) -> None:
        self._current().write(sample, key)
        self.total += 1
        self._rotate()

    def spans(self, buf, start: np.ndarray, end: np.ndarray) -> None:
        """Whole samples given as byte ranges ``[start[k], end[k])`` of the mapped tar ``buf``, in
        order; adjacent ranges within one output shard go out as one range."""
        i = 0
        while i < len(start):
            writer = self._current()
            n = min(len(start) - i, self.shard_size - writer.count)
            s, e = start[i:i + n], end[i:i + n]
            cut = np.flatnonzero(s[1:] != e[:-1])  # a run ends where the next range does not follow it
            writer.write_spans(buf, s[np.append(0, cut + 1)].tolist(), e[np.append(cut, n - 1)].tolist(), n)
            i += n
            self.total += n
            self._rotate()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.written.append(self.writer.count)
            self.writer = None
        self._wait()

    def abort(self) -> None:
        self._wait(check=False)  # an error of its own would hide the one being raised
        if self.writer is not None:
            self.writer.abort()
            self.writer = None


@dataclass
class ReshardStage(Stage):
    work_dir: str  # the state folder beside the output
    inputs: list
    keep_path: str
    shard_size: int = 10_000
    name: str = "reshard"
    shuffle_buffer: int = 0
    seed: int = 0
    datacomp_keys: bool = False
    boxes_path: str | None = None  # face boxes of kept uids (blur), written by reshard()

    def part_dir(self, rank: int, world_size: int) -> Path:
        return Path(self.work_dir) / "parts" / f"{rank:05d}-of-{world_size:05d}"

    def run(self, rank: int, world_size: int) -> dict:
        keep, multiplicity = read_keep_counts(self.keep_path)
        mine = [self.inputs[i] for i in np.array_split(np.arange(len(self.inputs)), world_size)[rank]]
        out = self.part_dir(rank, world_size)
        shutil.rmtree(out, ignore_errors=True)  # an interrupted earlier try of this part
        out.mkdir(parents=True)
        seen = np.zeros(len(keep), dtype=bool)
        counts = dict.fromkeys(_COUNTS, 0)
        unsafe, special = [], []
        boxes = _load_boxes(self.boxes_path)
        bar = progress_bar(total=len(mine), desc=f"reshard {rank + 1}/{world_size}", unit="shards")
        parts = _PartWriter(out, self.shard_size)
        try:
            self._write(mine, keep, multiplicity, seen, counts, unsafe, special, boxes, bar, parts, rank)
        except OSError as e:
            if not is_write_failure(e):
                raise
            name = out / f"{len(parts.written):08d}.tar"
            parts.abort()
            shutil.rmtree(out, ignore_errors=True)  # what this part wrote: the space is given back
            raise write_error(name, e) from None
        finally:
            parts.abort()
            bar.close()
        return self._summary(rank, mine, counts, parts, unsafe, special, seen, out)

    def _write(self, mine, keep, multiplicity, seen, counts, unsafe, special, boxes, bar, parts, rank) -> None:
        if self._fast():
            self._copy_pass(mine, keep, multiplicity, seen, counts, unsafe, special, parts, bar)
        else:
            selected = self._select(mine, keep, multiplicity, seen, counts, unsafe, special, boxes, bar)
            if self.shuffle_buffer > 0:
                selected = _buffer_shuffle(selected, self.shuffle_buffer, random.Random(f"{self.seed}:{rank}"))
            for sample, key in selected:
                parts.sample(sample, key)
        parts.close()

    def _summary(self, rank, mine, counts, parts, unsafe, special, seen, out) -> dict:
        counts["kept"] = parts.total
        counts["unsafe_members"], counts["special_members"] = len(unsafe), len(special)
        if unsafe:
            log.warning("reshard part %d: rejected %d tar members with unsafe names (e.g. %r)", rank, len(unsafe),
                        unsafe[0])
        if special:
            log.warning("reshard part %d: dropped %d links, devices or FIFOs (e.g. %r)", rank, len(special),
                        special[0])
        np.save(out / "seen.npy", np.flatnonzero(seen))
        return {**counts, "input_shards": len(mine), "output_sizes": parts.written}

    def _fast(self) -> bool:
        """Whether samples may be copied as byte ranges (the default options). The environment
        variable is private: the benchmark byte-compares the fast output with the reference path."""
        return (not self.shuffle_buffer and not self.datacomp_keys and not self.boxes_path
                and os.environ.get(_REFERENCE_ENV) != "1")

    def _copy_pass(self, shards, keep, multiplicity, seen, counts, unsafe, special, parts, bar) -> None:
        """The default options: each plain tar indexed by its headers, kept samples copied as
        contiguous byte ranges; any other tar goes through the member-by-member path."""
        for shard in shards:
            f, buf, index = _open_plain(shard)
            if index is not None:
                with f, buf:
                    self._copy_indexed(index, buf, keep, multiplicity, seen, counts, parts)
            else:
                for copy in self._shard_copies(shard, keep, multiplicity, seen, counts, unsafe, special, {}, None):
                    parts.sample(*copy)
            bar.update(1)

    def _copy_indexed(self, index, buf, keep, multiplicity, seen, counts, parts) -> None:
        """The kept samples of an indexed tar, in order, as byte ranges; a uid listed k > 1 times
        is copied as is once, then written k - 1 times more under new names (new headers)."""
        counts["samples_read"] += len(index)
        has_uid, pairs = index.uid_pairs()
        counts["no_uid"] += int((~has_uid).sum())
        rows = np.flatnonzero(has_uid)
        found, at = K.member(keep, pairs[rows])
        rows, at = rows[found], at[found]
        image = index.has_image[rows]
        counts["without_image"] += int((~image).sum())
        rows, at = rows[image], at[image]
        seen[at] = True
        done = 0
        for x in np.flatnonzero(multiplicity[at] > 1).tolist():
            parts.spans(buf, index.start[rows[done:x + 1]], index.end[rows[done:x + 1]])
            sample = index.sample(int(rows[x]))
            for j in range(1, int(multiplicity[at[x]])):
                parts.sample(sample, f"{sample.key}-{j}")
            done = x + 1
        parts.spans(buf, index.start[rows[done:]], index.end[rows[done:]])

    def _select(self, shards, keep, multiplicity, seen, counts, unsafe, special, boxes, bar) -> Iterator:
        """(sample, key) for each copy to write, in input order (key None: the sample's own)."""
        blurrer = None
        if boxes:
            os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # its import asks PyPI for a newer version
            from img2dataset.blurrer import BoundingBoxBlurrer

            blurrer = BoundingBoxBlurrer()
        for shard in shards:
            yield from self._shard_copies(shard, keep, multiplicity, seen, counts, unsafe, special, boxes, blurrer)
            bar.update(1)

    def _shard_copies(self, shard, keep, multiplicity, seen, counts, unsafe, special, boxes, blurrer) -> Iterator:
        """(sample, key) for each copy to write from one shard read member by member, in
        batches of 512 samples."""
        batch = []
        for sample in iter_samples(shard, unsafe, special):
            counts["samples_read"] += 1
            counts["samples_with_dropped_members"] += sample.dropped > 0
            batch.append(sample)
            if len(batch) == 512:
                yield from self._copies(batch, keep, multiplicity, seen, counts, boxes, blurrer, shard)
                batch = []
        yield from self._copies(batch, keep, multiplicity, seen, counts, boxes, blurrer, shard)

    def _copies(self, batch, keep, multiplicity, seen, counts, boxes, blurrer, shard) -> Iterator:
        uids, pairs = [], []
        for sample in batch:
            try:
                uid = sample.uid()
                pairs.append(U.uid_to_pair(uid))
                uids.append(uid)
            except (ValueError, json.JSONDecodeError):
                uids.append(None)
        counts["no_uid"] += uids.count(None)
        batch = [s for s, u in zip(batch, uids) if u is not None]
        uids = [u for u in uids if u is not None]
        if not batch:
            return
        found, idx = K.member(keep, np.array(pairs, dtype=U.UID_DTYPE))
        for sample, uid, pair, hit, i in zip(batch, uids, pairs, found, idx):
            if not hit:
                continue
            if not sample.has_image():
                counts["without_image"] += 1
                continue
            if blurrer is not None and boxes.get(pair):
                blurred = blur_sample(sample, boxes[pair], blurrer)
                if blurred is None:
                    raise PoolError(f"{shard}: sample {sample.key} (uid {uid}): its image does not decode for --blur")
                sample = blurred
                counts["blurred"] += 1
            seen[i] = True
            for j in range(int(multiplicity[i])):
                if self.datacomp_keys:
                    yield sample, f"{uid}-{j}"
                else:
                    yield sample, (None if j == 0 else f"{sample.key}-{j}")


# -- the command ----------------------------------------------------------------------------------


@dataclass
class ReshardOptions:
    shard_size: int = 10_000
    shuffle_buffer: int = 0
    seed: int = 0
    datacomp_keys: bool = False
    blur_metadata: str | None = None  # folder (or file) of metadata parquet with uid and face_bboxes

    def check(self) -> None:
        if self.shard_size < 1:
            raise ConfigError("--shard-size must be >= 1")
        if self.shuffle_buffer < 0:
            raise ConfigError("--shuffle-buffer must be >= 0 (0: no shuffle)")
        check_seed("--seed", self.seed)


def reshard(shards: str | Path, keep: str | Path, out: str | Path, *, shard_size: int = 10_000,
            overwrite: bool = False, executor: "Executor | None" = None, shuffle_buffer: int = 0, seed: int = 0,
            datacomp_keys: bool = False, blur_metadata: str | Path | None = None,
            allow_empty: bool = False, force: bool = False) -> dict | None:
    """Run the reshard stage and assemble its output; returns the meta.json content (None when
    the executor detaches: the same call, rerun once the jobs are done, assembles it)."""
    opts = ReshardOptions(shard_size, shuffle_buffer, seed, datacomp_keys,
                          str(blur_metadata) if blur_metadata else None)
    opts.check()
    from conceptprune.locks import output_lock

    with output_lock(out, f"resharding into {out}"):  # one reshard at a time writes OUT and OUT.state/
        return _reshard(shards, keep, out, overwrite, executor, opts, allow_empty, force)


def _reshard(shards, keep, out, overwrite: bool, executor, opts: "ReshardOptions",
             allow_empty: bool = False, force: bool = False) -> dict | None:
    out, keep = Path(out), Path(keep)
    executor = Executor.given(executor)
    inputs = {"--shards": Path(shards), "--keep": keep}
    if opts.blur_metadata:
        inputs["--blur"] = Path(opts.blur_metadata)
    check_no_overlap(out, inputs)
    keep_uids, multiplicity = read_keep_counts(keep)
    if len(keep_uids) == 0 and not allow_empty:
        raise ConfigError(f"--keep {keep}: an empty keep-list; nothing to reshard (--allow-empty writes no shards)")
    complete, incomplete = list_input_shards(shards)
    for t in incomplete:
        log.warning("skipping %s: no %s_stats.json (unfinished download)", t, t.stem)
    if not force:
        _check_space(out, complete, int(multiplicity.sum()))
    state = {"shards": str(Path(shards).resolve()), "inputs": [t.name for t in complete],
             "keep_sha1": _sha1(keep), "shard_size": opts.shard_size}
    if opts.shuffle_buffer or opts.datacomp_keys or opts.blur_metadata:  # the default state stays as it was
        state.update(shuffle_buffer=opts.shuffle_buffer, seed=opts.seed, datacomp_keys=opts.datacomp_keys,
                     blur_metadata=str(Path(opts.blur_metadata).resolve()) if opts.blur_metadata else None)
    if opts.blur_metadata:  # keyed by content: metadata rewritten in place is other work
        state["blur_metadata_files"] = _metadata_fingerprints(Path(opts.blur_metadata))
    done = _prepare_output(out, state, overwrite)
    if done is not None:
        return done
    sd = state_dir(out)
    boxes = _face_boxes(Path(opts.blur_metadata), keep_uids, sd / "face_bboxes.parquet") if opts.blur_metadata else None
    stage = ReshardStage(str(sd), [str(t) for t in complete], str(keep), opts.shard_size,
                         shuffle_buffer=opts.shuffle_buffer, seed=opts.seed, datacomp_keys=opts.datacomp_keys,
                         boxes_path=str(boxes) if boxes else None)
    world = executor.parts(len(complete))
    try:
        result = executor.finish(executor.submit(stage, world))
    except WriteError:  # a full disk: the parts written so far are removed, the space given back
        _remove_state(sd)
        raise
    if result is None:
        return None
    found = sum(int(s.get("kept", 0)) for s in result.summaries)
    if found == 0 and len(keep_uids) and not allow_empty:  # another pool's list: nothing matches
        read = sum(int(s.get("samples_read", 0)) for s in result.summaries)
        _remove_state(state_dir(out))
        raise ConfigError(f"--keep {keep}: none of its {len(keep_uids)} uids is in the {read} samples of --shards "
                          f"{shards} (a list of another pool?); nothing written (--allow-empty accepts it)")
    meta = _assemble(out, stage, world, result.summaries, keep, keep_uids, multiplicity, complete, incomplete, state,
                     opts)
    _remove_state(sd)
    return meta


def _check_space(out: Path, complete: list[Path], entries: int) -> None:
    """Refuse, before any work, an output that will not fit: ``entries`` samples of the input
    shards' mean size (their bytes over the samples their ``_stats.json`` count) against the free
    space where ``out`` goes. An upsampled list (one uid 10^7 times) is caught here."""
    samples = 0
    for t in complete:
        try:
            st = json.loads((t.parent / f"{t.stem}_stats.json").read_text())
            samples += int(st.get("successes", st.get("count", 0)) or 0)
        except (OSError, ValueError, TypeError, AttributeError):
            return  # no usable counts: no estimate (the write itself stops cleanly on a full disk)
    if samples <= 0 or entries <= 0:
        return
    estimate = entries * (sum(t.stat().st_size for t in complete) / samples)
    where = out
    while not where.exists() and where != where.parent:
        where = where.parent
    free = shutil.disk_usage(where).free
    if estimate > free:
        raise ConfigError(f"--out {out}: the output would take about {estimate / 2**30:.1f} GiB ({entries} entries "
                          f"of the shards' mean sample, {estimate / entries / 1024:.1f} KiB), {free / 2**30:.1f} GiB "
                          "are free there; pass --force to try anyway")


def _remove_state(sd: Path) -> None:
    """Remove the job state beside the finished output (a local job may still be closing its
    log files there for a moment after its result arrived)."""
    for _ in range(50):
        shutil.rmtree(sd, ignore_errors=True)
        if not sd.exists():
            return
        time.sleep(0.1)
    log.warning("could not remove the reshard's job folder %s; delete it by hand", sd)


def _sha1(path: Path) -> str:
    return file_digest(path, "sha1")


def _prepare_output(out: Path, state: dict, overwrite: bool) -> dict | None:
    """The finished meta.json when ``out`` already holds this reshard; else make way for it."""
    sd = state_dir(out)
    meta_path = out / "meta.json"
    if not overwrite and meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("reshard_state") == state:
            if (sd / STATE).is_file():  # killed after the final rename
                _remove_state(sd)
            log.info("%s is already complete", out)
            return meta
    if out.is_file() or (out.is_dir() and any(out.iterdir())):
        if not overwrite:
            raise ConfigError(f"--out {out} is not empty; choose an empty or new folder or pass --overwrite")
        if out.is_dir():
            shutil.rmtree(out)
        else:
            out.unlink()
    if sd.exists():
        if not (sd / STATE).is_file():
            raise ConfigError(f"{sd} exists and is not a reshard's job folder; move it away (reshard keeps its "
                              "job state there)")
        if overwrite or json.loads((sd / STATE).read_text()) != state:
            if not overwrite:
                raise ConfigError(f"{sd} holds an unfinished reshard of other inputs or options into --out {out}; "
                                  "rerun that one, or pass --overwrite to discard it")
            shutil.rmtree(sd)
    sd.mkdir(parents=True, exist_ok=True)
    write_json(sd / STATE, state)
    return None


def _metadata_files(metadata: Path) -> list[Path]:
    files = sorted(metadata.glob("*.parquet")) if metadata.is_dir() else [metadata]
    if not files or not all(f.is_file() for f in files):
        raise ConfigError(f"--blur {metadata}: no metadata parquet found")
    return files


def _metadata_fingerprints(metadata: Path) -> dict[str, str]:
    """name -> content fingerprint (size, mtime, hashes of both ends) of each metadata file."""
    from conceptprune.pool import file_fingerprint

    return {f.name: file_fingerprint(f) for f in _metadata_files(metadata)}


def _face_boxes(metadata: Path, keep_uids: np.ndarray, dest: Path) -> Path:
    """The face boxes of the kept uids that have any, from metadata parquet (uid, face_bboxes)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    files = _metadata_files(metadata)
    bad, first_bad = 0, ""
    his, los, boxes = [], [], []
    for f in files:
        try:
            t = pq.read_table(f, columns=["uid", "face_bboxes"])
        except (KeyError, pa.ArrowInvalid, OSError) as e:
            raise PoolError(f"{f}: cannot read columns uid and face_bboxes ({e})") from None
        t = t.filter(pc.fill_null(pc.greater(pc.list_value_length(t["face_bboxes"]), 0), False))
        if not len(t):
            continue
        arr = U.arrow_uids_to_array(t["uid"].combine_chunks(), source=str(f))
        found, _ = K.member(keep_uids, arr)
        rows = np.flatnonzero(found)
        his.append(U.split(arr)[0][rows])
        los.append(U.split(arr)[1][rows])
        for r in rows:
            good = []
            for box in t["face_bboxes"][int(r)].as_py():
                if _valid_box(box):
                    good.append(box)
                else:  # one bad box costs that box, not the reshard
                    bad += 1
                    first_bad = first_bad or f"{f} row of uid {t['uid'][int(r)].as_py()}: {box!r}"
            boxes.append(good)
    table = pa.table({"hi": pa.array(np.concatenate(his) if his else [], pa.uint64()),
                      "lo": pa.array(np.concatenate(los) if los else [], pa.uint64()),
                      "face_bboxes": pa.array(boxes, pa.list_(pa.list_(pa.float64())))})
    tmp = dest.with_suffix(".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, dest)
    log.info("--blur: %d kept uids have face boxes", len(table))
    if bad:
        log.warning("--blur: %d face box(es) skipped (not 4 finite numbers with x0 < x1, y0 < y1 in [0, 1]); "
                    "first: %s", bad, first_bad)
    return dest


def _valid_box(box) -> bool:
    """A face box as DataComp's metadata holds it: relative x0, y0, x1, y1, finite, inside the image."""
    import math

    if not isinstance(box, (list, tuple)) or len(box) != 4:
        return False
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in box):
        return False
    x0, y0, x1, y1 = box
    return 0.0 <= x0 < x1 <= 1.0 and 0.0 <= y0 < y1 <= 1.0


def _assemble(out, stage, world, summaries, keep, keep_uids, multiplicity, complete, incomplete, state, opts) -> dict:
    """Move the parts into one contiguous sequence in the state folder, write meta.json last,
    then rename the folder into place (a kill leaves no half-made ``out``)."""
    sd = Path(stage.work_dir)
    dest = sd / "assembled"
    dest.mkdir(exist_ok=True)
    sizes, n = {}, 0
    for rank in range(world):
        part = stage.part_dir(rank, world)
        for i, count in enumerate(summaries[rank]["output_sizes"]):
            name = OUTPUT_SHARD_FORMAT.format(n)
            src = part / f"{i:08d}.tar"
            if src.exists():  # not yet moved by an interrupted assemble
                src.rename(dest / name)
            write_json(dest / OUTPUT_STATS_FORMAT.format(n), {"count": count, "successes": count})
            sizes[name] = count
            n += 1
    seen = np.zeros(len(keep_uids), dtype=bool)
    for rank in range(world):
        seen[np.load(stage.part_dir(rank, world) / "seen.npy")] = True
    shutil.copyfile(keep, dest / "sample_ids.npy")
    with open(dest / "sample_ids.npy", "rb") as f:  # on disk before the rename that publishes it, as the rest
        os.fsync(f.fileno())
    write_json(dest / "sizes.json", sizes)
    total = {k: int(sum(s.get(k, 0) for s in summaries)) for k in _COUNTS}
    meta = {
        "keep_list": str(keep), "keep_list_uids": int(len(keep_uids)), "keep_list_entries": int(multiplicity.sum()),
        "kept_samples": total["kept"], "missing_from_shards": int((~seen).sum()),
        "samples_read": total["samples_read"], "output_shards": n, "shard_size": stage.shard_size,
        "input_shards": len(complete), "skipped_input_shards": [t.name for t in incomplete],
        "unsafe_members_rejected": total["unsafe_members"], "special_members_dropped": total["special_members"],
        "samples_with_dropped_members": total["samples_with_dropped_members"],
        "samples_without_image": total["without_image"], "samples_without_uid": total["no_uid"],
        "workers": world, "shuffle_buffer": opts.shuffle_buffer, "seed": opts.seed,
        "datacomp_keys": opts.datacomp_keys, "blurred": total["blurred"],
        "per_worker": [{"rank": r, **{k: summaries[r][k] for k in ("input_shards", "samples_read", "kept")}}
                       for r in range(world)],
        # DataComp's resharder keys (its arguments as strings, its counters as numbers)
        "input_dir": str(state["shards"]), "output_dir": str(out), "subset_file": str(keep),
        "num_workers": str(world), "shuffle_bufsize": str(opts.shuffle_buffer),
        "apply_blur": str(bool(opts.blur_metadata)), "output_shard_format": OUTPUT_SHARD_FORMAT,
        "output_shard_stats_format": OUTPUT_STATS_FORMAT, "processed_count": total["samples_read"],
        "output_count": total["kept"], "blur_count": total["blurred"], "output_shard_count": n,
        "worker_success": world, "cwd": str(Path.cwd()),
        "reshard_state": state,
    }
    write_json(dest / "meta.json", meta)  # last: a folder without it is unfinished
    if out.is_dir():
        out.rmdir()  # empty (checked before the run); fails loudly if something was put there since
    os.rename(dest, out)
    log.info("resharded %d samples into %d shards (%d keep-list uids missing from the shards) -> %s",
             meta["kept_samples"], n, meta["missing_from_shards"], out)
    return meta
