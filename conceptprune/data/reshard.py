"""``conceptprune reshard``: cut the samples of a keep-list out of downloaded shards.

A drop-in for DataComp's resharder output: contiguous ``%08d.tar`` shards with
``%08d_stats.json``, ``sizes.json`` (read by open_clip), the keep-list copied to
``sample_ids.npy`` and ``meta.json`` with counts (kept, keep-list uids missing from the
shards because their download failed, per worker). Input shards without ``_stats.json``
(an unfinished download) are skipped with a warning, as DataComp's resharder does.

Workers take contiguous runs of input shards and write their own numbered parts; a final
step renames them into one contiguous sequence. Finished workers are skipped on a rerun.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from conceptprune import keeplist as K
from conceptprune import uids as U
from conceptprune.atomic import write_json
from conceptprune.errors import ConfigError, PoolError
from conceptprune.progress import progress_bar
from conceptprune.slurm.stage import Stage, run_stage

from .tars import ShardWriter, iter_samples

log = logging.getLogger(__name__)
STATE = ".reshard.json"


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


@dataclass
class ReshardStage(Stage):
    work_dir: str  # the output folder
    inputs: list
    keep_path: str
    shard_size: int = 10_000
    name: str = "reshard"

    def part_dir(self, rank: int, world_size: int) -> Path:
        return Path(self.work_dir) / ".parts" / f"{rank:05d}-of-{world_size:05d}"

    def run(self, rank: int, world_size: int) -> dict:
        keep = K.read_keep_list(self.keep_path)
        mine = [self.inputs[i] for i in np.array_split(np.arange(len(self.inputs)), world_size)[rank]]
        out = self.part_dir(rank, world_size)
        shutil.rmtree(out, ignore_errors=True)  # an interrupted earlier try of this part
        out.mkdir(parents=True)
        seen = np.zeros(len(keep), dtype=bool)
        counts = {"samples_read": 0, "kept": 0, "unsafe_members": 0, "no_uid": 0}
        written, unsafe = [], []
        state = {"writer": None}

        def flush(batch):
            uids, ok = [], []
            for sample in batch:
                try:
                    uids.append(U.uid_to_pair(sample.uid()))
                    ok.append(True)
                except (ValueError, json.JSONDecodeError):
                    ok.append(False)
            counts["no_uid"] += ok.count(False)
            batch = [s_ for s_, good in zip(batch, ok) if good]
            if not batch:
                return
            found, idx = K.member(keep, np.array(uids, dtype=U.UID_DTYPE))
            seen[idx[found]] = True
            for sample, hit in zip(batch, found):
                if not hit:
                    continue
                if state["writer"] is None:
                    state["writer"] = ShardWriter(out / f"{len(written):08d}.tar")
                state["writer"].write(sample)
                counts["kept"] += 1
                if state["writer"].count == self.shard_size:
                    state["writer"].close()
                    written.append(state["writer"].count)
                    state["writer"] = None

        bar = progress_bar(total=len(mine), desc=f"reshard {rank + 1}/{world_size}", unit="shards")
        try:
            for shard in mine:
                batch = []
                for sample in iter_samples(shard, unsafe):
                    counts["samples_read"] += 1
                    batch.append(sample)
                    if len(batch) == 512:
                        flush(batch)
                        batch = []
                flush(batch)
                bar.update(1)
            if state["writer"] is not None:
                state["writer"].close()
                written.append(state["writer"].count)
                state["writer"] = None
        finally:
            if state["writer"] is not None:
                state["writer"].abort()
            bar.close()
        counts["unsafe_members"] = len(unsafe)
        if unsafe:
            log.warning("reshard part %d: rejected %d tar members with unsafe names (e.g. %r)", rank, len(unsafe),
                        unsafe[0])
        np.save(out / "seen.npy", np.flatnonzero(seen))
        return {**counts, "input_shards": len(mine), "output_sizes": written}


def reshard(shards: str | Path, keep: str | Path, out: str | Path, *, shard_size: int = 10_000, workers: int = 1,
            overwrite: bool = False, executor: str = "auto", options=None) -> dict:
    """Run the reshard stage and assemble its output; returns the meta.json content."""
    out = Path(out)
    keep = Path(keep)
    if shard_size < 1:
        raise ConfigError("--shard-size must be >= 1")
    keep_uids = K.read_keep_list(keep)
    complete, incomplete = list_input_shards(shards)
    for t in incomplete:
        log.warning("skipping %s: no %s_stats.json (unfinished download)", t, t.stem)
    state = {"shards": str(Path(shards).resolve()), "inputs": [t.name for t in complete],
             "keep_sha1": hashlib.sha1(keep.read_bytes()).hexdigest(), "shard_size": shard_size}
    _prepare_output(out, state, overwrite)
    if (out / "meta.json").exists():
        log.info("%s is already complete", out)
        return json.loads((out / "meta.json").read_text())
    stage = ReshardStage(str(out), [str(t) for t in complete], str(keep), shard_size)
    world = max(1, min(workers, len(complete)))
    result = run_stage(stage, world, executor=executor, options=options)
    return _assemble(out, stage, world, result.summaries, keep, keep_uids, complete, incomplete)


def _prepare_output(out: Path, state: dict, overwrite: bool) -> None:
    state_file = out / STATE
    if out.exists() and any(out.iterdir()):
        if overwrite:
            shutil.rmtree(out)
        elif not state_file.exists() or json.loads(state_file.read_text()) != state:
            raise ConfigError(f"--out {out} is not empty (and not an unfinished reshard of the same inputs); "
                              "choose an empty folder or pass --overwrite")
    out.mkdir(parents=True, exist_ok=True)
    write_json(state_file, state)


def _assemble(out, stage, world, summaries, keep, keep_uids, complete, incomplete) -> dict:
    sizes, n = {}, 0
    for rank in range(world):
        part = stage.part_dir(rank, world)
        for i, count in enumerate(summaries[rank]["output_sizes"]):
            name = f"{n:08d}.tar"
            src = part / f"{i:08d}.tar"
            if src.exists():  # not yet moved by an interrupted assemble
                src.rename(out / name)
            write_json(out / f"{n:08d}_stats.json", {"count": count, "successes": count})
            sizes[name] = count
            n += 1
    seen = np.zeros(len(keep_uids), dtype=bool)
    for rank in range(world):
        seen[np.load(stage.part_dir(rank, world) / "seen.npy")] = True
    shutil.copyfile(keep, out / "sample_ids.npy")
    write_json(out / "sizes.json", sizes)
    total = {k: int(sum(s[k] for s in summaries)) for k in ("samples_read", "kept", "unsafe_members", "no_uid")}
    meta = {
        "keep_list": str(keep), "keep_list_uids": int(len(keep_uids)), "kept_samples": total["kept"],
        "missing_from_shards": int((~seen).sum()), "samples_read": total["samples_read"],
        "output_shards": n, "shard_size": stage.shard_size, "input_shards": len(complete),
        "skipped_input_shards": [t.name for t in incomplete], "unsafe_members_rejected": total["unsafe_members"],
        "samples_without_uid": total["no_uid"], "workers": world,
        "per_worker": [{"rank": r, **{k: summaries[r][k] for k in ("input_shards", "samples_read", "kept")}}
                       for r in range(world)],
    }
    write_json(out / "meta.json", meta)
    shutil.rmtree(out / ".parts", ignore_errors=True)
    log.info("resharded %d samples into %d shards (%d keep-list uids missing from the shards) -> %s",
             meta["kept_samples"], n, meta["missing_from_shards"], out)
    return meta
