"""``conceptprune download | embed | reshard``."""

from __future__ import annotations

import json


def register(sub) -> None:
    from conceptprune.slurm.options import add_cluster_args

    p = sub.add_parser("download", help="fetch DataComp metadata and download the images (img2dataset)",
                       description="DataComp metadata from Hugging Face (or your own parquet with url, text, uid), "
                                   "then the images with img2dataset and DataComp's arguments. Resumable.")
    p.add_argument("--data-dir", required=True, help="folder for metadata/ and shards/")
    p.add_argument("--scale", choices=["small", "medium", "large", "xlarge"], help="DataComp pool to fetch")
    p.add_argument("--metadata-dir", help="your own metadata parquet folder instead of DataComp's (url, text, uid)")
    p.add_argument("--metadata-only", action="store_true", help="fetch the metadata, not the images")
    p.add_argument("--with-embeddings", action="store_true", help="also fetch DataComp's npz embeddings")
    p.add_argument("--processes", type=int, default=16, help="img2dataset processes per part (default 16)")
    p.add_argument("--threads", type=int, default=128, help="img2dataset threads per process (default 128)")
    p.add_argument("--shard-size", type=int, default=10000, help="samples per shard (default 10000, DataComp's)")
    p.add_argument("--timeout", type=int, default=10, help="seconds per image request (default 10)")
    add_cluster_args(p)
    p.set_defaults(func=_download)

    p = sub.add_parser("embed", help="embed the images (and captions) of webdataset shards",
                       description="Image (and text) embeddings per shard as <shard>.parquet + <shard>.npz, "
                                   "a pool every filter reads (--embedding-key img).")
    p.add_argument("--shards", required=True, help="folder of .tar shards")
    p.add_argument("--out", required=True, help="output folder (a pool)")
    p.add_argument("--model", required=True,
                   help="open_clip name (ViT-B-32, cp-tiny-vit, local-dir:PATH) or timm:NAME (e.g. a DINOv2)")
    p.add_argument("--pretrained", default=None, help="open_clip pretrained tag or checkpoint path (timm: any value)")
    p.add_argument("--batch-size", type=int, default=256, help="images per forward pass (default 256)")
    p.add_argument("--text", action="store_true", help="also embed captions (open_clip models)")
    p.add_argument("--key-prefix", default="", help="prefix of the npz keys (default: keys img, txt)")
    p.add_argument("--device", default="auto", help="torch device (default: cuda when present)")
    add_cluster_args(p)
    p.set_defaults(func=_embed)

    from conceptprune.checks import int_arg, seed_arg

    p = sub.add_parser("reshard", help="write the samples of a keep-list into new shards (DataComp's resharder)",
                       description="Stream the downloaded shards, keep the samples whose uid is in the keep-list, "
                                   "write contiguous shards + _stats.json, sizes.json, sample_ids.npy, meta.json.")
    p.add_argument("--shards", required=True, help="downloaded shards (<n>.tar with <n>_stats.json)")
    p.add_argument("--keep", required=True, help="keep-list (.npy)")
    p.add_argument("--out", required=True, help="output folder (empty, or an unfinished reshard of the same inputs)")
    p.add_argument("--shard-size", type=int_arg("--shard-size", 1), default=10000,
                   help="samples per output shard (default 10000)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace whatever --out holds (never allowed when --out is, holds or lies in an input)")
    p.add_argument("--shuffle-buffer", type=int_arg("--shuffle-buffer", 0), default=0, metavar="N",
                   help="shuffle each worker's output through a buffer of N samples, seeded by --seed "
                        "(DataComp's --shuffle-bufsize; default 0: input order)")
    p.add_argument("--seed", type=seed_arg(), default=0, help="seed of --shuffle-buffer (default 0)")
    p.add_argument("--blur", metavar="METADATA", default=None,
                   help="blur the faces boxed in this metadata parquet folder's face_bboxes column and re-encode "
                        "those images as WebP (DataComp's --apply-blur)")
    p.add_argument("--datacomp-keys", action="store_true",
                   help="name every output sample <uid>-<j> as DataComp's resharder does (default: the sample's own "
                        "key, and <key>-<j> for the extra copies of a uid listed more than once)")
    add_cluster_args(p)
    p.add_argument("--allow-empty", action="store_true",
                   help="accept an empty keep-list, or one of which no uid is in the shards (default: an error)")
    p.add_argument("--force", action="store_true",
                   help="write even if the estimated output is larger than the free space")
    p.set_defaults(func=_reshard)


def _download(a) -> None:
    from conceptprune.slurm.stage import executor_from_args

    from .download import download

    summary = download(a.data_dir, scale=a.scale, metadata_dir=a.metadata_dir, metadata_only=a.metadata_only,
                       with_embeddings=a.with_embeddings, processes=a.processes, threads=a.threads,
                       img2dataset_args={"number_sample_per_shard": a.shard_size, "timeout": a.timeout},
                       executor=executor_from_args(a))
    print(json.dumps(summary, indent=2))


def _embed(a) -> None:
    from conceptprune.slurm.stage import executor_from_args

    from .embed import EmbedConfig, embed

    cfg = EmbedConfig(a.shards, a.out, a.model, a.pretrained, a.batch_size, a.text, a.key_prefix, a.device)
    totals = embed(cfg, executor=executor_from_args(a))
    if totals is not None:  # (detached: the same command, rerun later, prints the totals)
        print(json.dumps(totals, indent=2))


def _reshard(a) -> None:
    from conceptprune.slurm.stage import executor_from_args

    from .reshard import reshard

    meta = reshard(a.shards, a.keep, a.out, shard_size=a.shard_size, overwrite=a.overwrite,
                   executor=executor_from_args(a), shuffle_buffer=a.shuffle_buffer, seed=a.seed,
                   datacomp_keys=a.datacomp_keys, blur_metadata=a.blur, allow_empty=a.allow_empty,
                   force=a.force)
    if meta is not None:
        print(json.dumps({k: meta[k] for k in ("kept_samples", "missing_from_shards", "output_shards")}, indent=2))
