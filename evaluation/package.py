"""``conceptprune evaluate package``: DataComp's submission bundle (the upload is explicit)."""

from __future__ import annotations

import shutil
from pathlib import Path

from conceptprune import keeplist as K
from conceptprune.errors import ConfigError

from .compare import load

SCALES = ("small", "medium", "large", "xlarge")


def package(results: str, keep_list: str, scale: str, out: str, checkpoint: str | None = None) -> Path:
    """``OUT/{scale}_scale/results.jsonl`` + ``samples/<keep-list>.npy`` (+ the checkpoint)."""
    if scale not in SCALES:
        raise ConfigError(f"--scale must be one of {', '.join(SCALES)}")
    load(results)  # all 38 tasks, no duplicates
    K.read_keep_list(keep_list)  # a valid keep-list
    d = Path(out) / f"{scale}_scale"
    (d / "samples").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(results, d / "results.jsonl")
    shutil.copyfile(keep_list, d / "samples" / Path(keep_list).name)
    if checkpoint:
        shutil.copyfile(checkpoint, d / Path(checkpoint).name)
    return d


def upload(bundle: str, repo_id: str, private: bool = True) -> str:
    """Upload a bundle to a Hugging Face model repo (needs network and a token; never in tests)."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    return api.upload_folder(folder_path=bundle, repo_id=repo_id, repo_type="model")
