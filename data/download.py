"""``conceptprune download``: DataComp metadata from Hugging Face, then images with img2dataset.

Images are fetched with DataComp's exact img2dataset arguments (uid kept in each sample's
json, face boxes blurred, 10k samples a shard, jpg at most 512 px). Shards are numbered as
one img2dataset run over all metadata files in sorted order would number them (each file
gives ceil(rows / 10000) shards), so parts of the download can run as SLURM array tasks:
part r takes a contiguous run of metadata files and starts at that run's first shard id.
A shard is done when its ``_stats.json`` exists; a rerun (or a requeued part) skips it.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from conceptprune.errors import ConfigError
from conceptprune.slurm.stage import Stage

log = logging.getLogger(__name__)

SCALES = ("small", "medium", "large", "xlarge")
# DataComp's download_upstream.py arguments
DATACOMP_IMG2DATASET = dict(
    input_format="parquet", url_col="url", caption_col="text", bbox_col="face_bboxes",
    save_additional_columns=["uid"], image_size=512, resize_mode="keep_ratio_largest",
    resize_only_if_bigger=True, encode_format="jpg", output_format="webdataset",
    number_sample_per_shard=10000, oom_shard_count=8, retries=2, enable_wandb=False,
)


def fetch_metadata(scale: str, metadata_dir: str | Path, with_embeddings: bool = False,
                   revision: str | None = None) -> list[Path]:
    """Download ``mlfoundations/datacomp_{scale}`` parquet (and npz) files (resumable)."""
    if scale not in SCALES:
        raise ConfigError(f"--scale must be one of {', '.join(SCALES)}")
    from huggingface_hub import snapshot_download

    metadata_dir = Path(metadata_dir)
    patterns = ["*.parquet", "**/*.parquet"] + (["*.npz", "**/*.npz"] if with_embeddings else [])
    local = snapshot_download(repo_id=f"mlfoundations/datacomp_{scale}", repo_type="dataset", revision=revision,
                              allow_patterns=patterns, local_dir=metadata_dir / ".hf")
    # flatten: the pool reader wants <hash>.parquet next to <hash>.npz
    found = []
    for p in sorted(Path(local).rglob("*")):
        if p.suffix in (".parquet", ".npz") and ".cache" not in p.parts:
            link = metadata_dir / p.name
            if not link.exists():
                os.symlink(p.resolve(), link)
            if p.suffix == ".parquet":
                found.append(link)
    if not found:
        raise ConfigError(f"no parquet files found in mlfoundations/datacomp_{scale}")
    return found


def shard_plan(metadata_dir: Path, shard_size: int) -> list[tuple[Path, int, int]]:
    """(file, first shard id, number of shards) in img2dataset's order."""
    files = sorted(metadata_dir.glob("*.parquet"))
    if not files:
        raise ConfigError(f"{metadata_dir}: no parquet metadata files")
    plan, start = [], 0
    for f in files:
        cols = pq.read_schema(f).names
        for c in ("url", "text", "uid"):
            if c not in cols:
                raise ConfigError(f"{f}: metadata needs columns url, text and uid (missing {c})")
        n = math.ceil(pq.ParquetFile(f).metadata.num_rows / shard_size)
        plan.append((f, start, n))
        start += n
    return plan


def done_shards(shards_dir: Path) -> set[int]:
    return {int(p.name.split("_")[0]) for p in shards_dir.glob("*_stats.json")}


@dataclass
class DownloadStage(Stage):
    work_dir: str  # the data dir
    metadata_dir: str
    shards_dir: str
    processes: int = 16
    threads: int = 128
    img2dataset_args: dict = field(default_factory=dict)
    name: str = "download"

    def run(self, rank: int, world_size: int) -> dict:
        args = {**DATACOMP_IMG2DATASET, **self.img2dataset_args}
        plan = shard_plan(Path(self.metadata_dir), args["number_sample_per_shard"])
        if args.get("bbox_col") and args["bbox_col"] not in pq.read_schema(plan[0][0]).names:
            log.warning("metadata has no %s column: faces will not be blurred", args["bbox_col"])
            args["bbox_col"] = None
        mine = [plan[i] for i in np.array_split(np.arange(len(plan)), world_size)[rank]]
        if not mine:
            return {"shards": 0, "successes": 0}
        shards_dir = Path(self.shards_dir)
        shards_dir.mkdir(parents=True, exist_ok=True)
        links = Path(self.work_dir) / ".download" / f"part-{rank:05d}-of-{world_size:05d}"
        shutil.rmtree(links, ignore_errors=True)
        links.mkdir(parents=True)
        for f, _, _ in mine:
            os.symlink(f.resolve(), links / f.name)
        ids = [s for _, start, n in mine for s in range(start, start + n)]
        todo = set(ids) - done_shards(shards_dir)
        if todo:
            _img2dataset(str(links), str(shards_dir), mine[0][1], done_shards(shards_dir), self.processes,
                         self.threads, args, tmp=str(shards_dir / f"_tmp_part{rank:05d}"))
        shutil.rmtree(links, ignore_errors=True)
        return _count(shards_dir, ids)


def _count(shards_dir: Path, ids: list[int]) -> dict:
    import json

    successes = count = missing = 0
    for s in ids:
        p = shards_dir / f"{s:08d}_stats.json"
        if not p.exists():
            missing += 1
            continue
        stats = json.loads(p.read_text())
        successes += stats.get("successes", 0)
        count += stats.get("count", 0)
    return {"shards": len(ids), "shards_missing": missing, "successes": successes, "count": count}


def _img2dataset(url_list, output_folder, start_shard_id, done, processes, threads, args, tmp):
    """img2dataset.download, with a start shard id and a private tmp folder so that
    several parts can write into one shard folder at once."""
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # its import asks PyPI for a newer version
    import fsspec
    from img2dataset.blurrer import BoundingBoxBlurrer
    from img2dataset.distributor import multiprocessing_distributor
    from img2dataset.downloader import Downloader
    from img2dataset.logger import LoggerProcess
    from img2dataset.reader import Reader
    from img2dataset.resizer import Resizer
    from img2dataset.writer import WebDatasetSampleWriter

    if args["output_format"] != "webdataset":
        raise ConfigError("conceptprune download writes webdataset shards")
    fs, tmp_dir = fsspec.core.url_to_fs(tmp)
    fs.makedirs(tmp_dir, exist_ok=True)
    config = {**args, "url_list": url_list, "output_folder": output_folder, "processes_count": processes,
              "thread_count": threads}
    logger = LoggerProcess(output_folder, False, "img2dataset", config)
    logger.done_shards = done
    logger.start()
    extra = list(args["save_additional_columns"]) + ([args["bbox_col"]] if args.get("bbox_col") else [])
    try:
        reader = Reader(url_list, args["input_format"], args["url_col"], args["caption_col"], None, None, extra,
                        args["number_sample_per_shard"], done, tmp_dir, start_shard_id)
        resizer = Resizer(image_size=args["image_size"], resize_mode=args["resize_mode"],
                          resize_only_if_bigger=args["resize_only_if_bigger"], upscale_interpolation="lanczos",
                          downscale_interpolation="area", encode_quality=95, encode_format=args["encode_format"],
                          skip_reencode=False, disable_all_reencoding=False, min_image_size=0,
                          max_image_area=float("inf"), max_aspect_ratio=float("inf"),
                          blurrer=BoundingBoxBlurrer() if args.get("bbox_col") else None)
        downloader = Downloader(
            sample_writer_class=WebDatasetSampleWriter, resizer=resizer, thread_count=threads, save_caption=True,
            extract_exif=True, output_folder=output_folder, column_list=reader.column_list,
            timeout=args.get("timeout", 10), number_sample_per_shard=args["number_sample_per_shard"],
            oom_shard_count=args["oom_shard_count"], compute_hash="sha256", verify_hash_type=None,
            encode_format=args["encode_format"], retries=args["retries"], user_agent_token=None,
            disallowed_header_directives=["noai", "noimageai", "noindex", "noimageindex"],
            blurring_bbox_col=args.get("bbox_col"))
        multiprocessing_distributor(processes, downloader, reader, 1000, 1)
    finally:
        logger.join()  # img2dataset's LoggerProcess.join() tells it to stop first
        if fs.exists(tmp_dir):
            fs.rm(tmp_dir, recursive=True)


def download(data_dir: str | Path, *, scale: str | None = None, metadata_dir: str | Path | None = None,
             metadata_only: bool = False, with_embeddings: bool = False, processes: int = 16, threads: int = 128,
             img2dataset_args: dict | None = None, executor=None) -> dict:
    """Metadata (DataComp's from Hugging Face, or the user's own parquet) then images."""
    import json

    from conceptprune.atomic import write_json
    from conceptprune.slurm.stage import Executor

    data_dir = Path(data_dir)
    if metadata_dir is None:
        if scale is None:
            raise ConfigError("give --scale (DataComp metadata from Hugging Face) or --metadata-dir (your own parquet)")
        metadata_dir = data_dir / "metadata"
        metadata_dir.mkdir(parents=True, exist_ok=True)
        fetch_metadata(scale, metadata_dir, with_embeddings)
    metadata_dir = Path(metadata_dir)
    args = {**DATACOMP_IMG2DATASET, **(img2dataset_args or {})}
    plan = shard_plan(metadata_dir, args["number_sample_per_shard"])
    summary = {"metadata_dir": str(metadata_dir), "metadata_files": len(plan), "shards_planned": sum(n for *_, n in plan)}
    if metadata_only:
        return summary
    shards_dir = data_dir / "shards"
    stage = DownloadStage(str(data_dir), str(metadata_dir), str(shards_dir), processes, threads, img2dataset_args or {})
    executor = Executor.given(executor)
    res = executor.finish(executor.submit(stage, executor.parts(len(plan))))
    if res is None:  # detached: the same command, rerun later, sums up the parts
        return {**summary, "detached": True}
    parts = res.summaries
    for key in ("shards", "shards_missing", "successes", "count"):
        summary[key] = int(sum(p.get(key, 0) for p in parts))
    summary["shards_dir"] = str(shards_dir)
    write_json(data_dir / "download.json", summary)
    log.info("downloaded %d of %d samples into %d shards (%s)", summary["successes"], summary["count"],
             summary["shards"], shards_dir)
    return summary
