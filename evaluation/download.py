"""``conceptprune evaluate download``: the evaluation sets from their Hugging Face repos.

Resumable (huggingface_hub resumes partial files), checksummed (each LFS file's sha256 is
compared with the repo's), and marked complete with ``.complete.json``, after which
evaluation reads only local files. Sets whose repo is not in clip_benchmark's "wds" layout
must be converted first (``clip_benchmark_export_wds``) into ``DATA_DIR/<folder>``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from conceptprune.atomic import write_json
from conceptprune.errors import ConfigError

from .tasks import Task, select

log = logging.getLogger(__name__)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def download_task(task: Task, data_dir: Path, revision: str | None = None) -> dict:
    from huggingface_hub import HfApi, snapshot_download

    dest = data_dir / task.folder
    done = dest / ".complete.json"
    if done.exists():
        return json.loads(done.read_text())
    if not task.source.startswith("djghosh/wds_"):
        raise ConfigError(f"{task.key}: {task.source} is not in the wds layout; convert it with "
                          f"clip_benchmark_export_wds into {dest}")
    snapshot_download(task.source, repo_type="dataset", local_dir=dest, revision=revision)
    files = {}
    for info in HfApi().list_repo_tree(task.source, repo_type="dataset", recursive=True, revision=revision,
                                        expand=True):
        lfs = getattr(info, "lfs", None)
        if lfs is None:
            continue
        got = _sha256(dest / info.path)
        want = lfs.sha256 if hasattr(lfs, "sha256") else lfs["sha256"]
        if got != want:
            (dest / info.path).unlink()
            raise ConfigError(f"{task.key}: {info.path} failed its checksum (removed; run the download again)")
        files[info.path] = got
    record = {"task": task.key, "source": task.source, "revision": revision, "files": files}
    write_json(done, record)
    return record


def download(data_dir: str | Path, tasks: list[str] | None = None, revision: str | None = None) -> dict:
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    out, errors = {}, {}
    for task in select(tasks):
        try:
            out[task.key] = download_task(task, data_dir, revision)
            log.info("%s: ready in %s", task.key, data_dir / task.folder)
        except Exception as e:  # one set failing does not stop the others
            errors[task.key] = str(e)
            log.error("%s: %s", task.key, e)
    return {"downloaded": sorted(out), "errors": errors}
