"""``conceptprune evaluate download``: all 40 evaluation sets from their Hugging Face repositories.

- The 37 webdataset sets (``djghosh/wds_*_test``) go, file for file, into ``DATA_DIR/wds_<name>_test/``
  (DataComp's own folder names) with ``huggingface_hub.snapshot_download``: an interrupted download
  resumes, a file already there with the right sha256 (e.g. from DataComp's ``download_evalsets.py``)
  is kept. Every file is then checked against the repository's listing (sha256 for LFS files, the
  git blob id for the others) and the folder is marked complete with ``.complete.json``.
- The three ``nlphuji/*`` sets (read by DataComp through ``datasets.load_dataset(name, split="test")``,
  whose loading scripts recent ``datasets`` releases no longer run) are fetched as parquet: the
  repository's own parquet files of the test split if it has them, else the Hub's parquet
  conversion (revision ``refs/convert/parquet``), else (Flickr, MSCOCO) the test csv and image zip
  the loading script reads, each file checked like the above; then converted
  once into ``DATA_DIR/<key with / -> ->/`` (see ``hf_sets``). If ``DATA_DIR/hf_cache`` already holds
  DataComp's copy, that is converted instead, without network.

``HF_ENDPOINT`` (or ``--endpoint``) points at a mirror; ``HF_HUB_OFFLINE=1`` forbids the network.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
from pathlib import Path

from conceptprune.atomic import file_digest, write_json
from conceptprune.errors import ConfigError
from conceptprune.paths import inside, relative

from . import layout
from .hf_sets import iter_table_rows, write_set
from .tasks import Task, select

log = logging.getLogger(__name__)

PARQUET_EXPORT = "refs/convert/parquet"


def _sha256(path: Path) -> str:
    return file_digest(path, "sha256")


def _git_blob_id(path: Path) -> str:
    """git's object id of a file (what the Hub lists as a non-LFS file's ``oid``)."""
    h = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _api(endpoint: str | None):
    from huggingface_hub import HfApi

    return HfApi(endpoint=endpoint or os.environ.get("HF_ENDPOINT") or None)


def _listing(api, repo: str, revision: str | None) -> tuple[str, list]:
    """(commit, files) of a dataset repository at a revision."""
    from huggingface_hub.hf_api import RepoFile

    info = api.dataset_info(repo, revision=revision or "main")
    files = [f for f in api.list_repo_tree(repo, repo_type="dataset", recursive=True, revision=info.sha)
             if isinstance(f, RepoFile)]
    for f in files:  # a mirror's listing names the files we read, write and delete: all inside, checked first
        relative(f.path, f"{repo} listing at {revision or 'main'}", "the data folder")
    return info.sha, files


def verify(dest: Path, files: list, where: str) -> dict[str, str]:
    """Check every listed file under ``dest``; a wrong one is removed and reported."""
    out, bad = {}, []
    local = [inside(dest, f.path, f"{where} listing") for f in files]  # every path checked before any delete
    for f, p in zip(files, local):
        if not p.is_file():
            bad.append(f"{f.path} (missing)")
            continue
        if f.lfs is not None:
            got, want = _sha256(p), f.lfs.sha256
        else:
            got, want = _git_blob_id(p), f.blob_id
        if got != want:
            p.unlink()
            bad.append(f"{f.path} (checksum)")
            continue
        out[f.path] = got
    if bad:
        raise ConfigError(f"{where}: {len(bad)} file(s) failed verification and were removed: "
                          f"{', '.join(bad[:5])}; run the download again")
    return out


# -- the 37 webdataset sets ------------------------------------------------------------------------


def download_wds(task: Task, data_dir: Path, revision: str | None, endpoint: str | None) -> dict:
    from huggingface_hub import snapshot_download

    dest = data_dir / task.datacomp_folder
    api = _api(endpoint)
    commit, files = _listing(api, task.source, revision)
    snapshot_download(task.source, repo_type="dataset", revision=commit, local_dir=dest, endpoint=api.endpoint)
    record = {"task": task.key, "source": task.source, "revision": revision or "main", "commit": commit,
              "files": verify(dest, files, task.key)}
    write_json(dest / layout.MARKER, record)
    return record


# -- the three nlphuji sets ------------------------------------------------------------------------


_SPLIT_FILE = re.compile(r"(^|/)test(/|[-_.])|-test[-.]")


def test_parquet(files: list) -> list:
    """The parquet files of the test split in a listing (``<config>/test/0000.parquet``,
    ``data/test-00000-of-00001.parquet``, ``<config>/<name>-test.parquet``), of one config."""
    pq = sorted((f for f in files if f.path.endswith(".parquet") and _SPLIT_FILE.search(f.path)),
                key=lambda f: f.path)
    if not pq:
        return []
    configs = sorted({f.path.split("/", 1)[0] if "/" in f.path else "" for f in pq})
    if len(configs) > 1:
        log.warning("several configs hold a test split (%s); using %s", ", ".join(configs), configs[0])
    return [f for f in pq if (f.path.split("/", 1)[0] if "/" in f.path else "") == configs[0]]


def _fetch(api, task: Task, commit: str, files: list, dest: Path) -> dict[str, str]:
    from huggingface_hub import hf_hub_download

    for f in files:
        hf_hub_download(task.source, f.path, repo_type="dataset", revision=commit, local_dir=dest,
                        endpoint=api.endpoint)
    return verify(dest, files, task.key)


def raw_retrieval_files(files: list) -> list:
    """The files a retrieval set's loading script reads: one test csv (``test_1k_flickr.csv``,
    ``test_5k_mscoco_2014.csv``) and one image zip; [] unless exactly that."""
    csvs = [f for f in files if f.path.endswith(".csv") and "test" in f.path.rsplit("/", 1)[-1]]
    zips = [f for f in files if f.path.endswith(".zip")]
    return csvs + zips if len(csvs) == 1 and len(zips) == 1 else []


def fetch_source(task: Task, stage: Path, revision: str | None, endpoint: str | None) -> tuple[dict, object]:
    """Download the test split into ``stage``: parquet (the repository's own, else the Hub's
    conversion), else, for a retrieval set, the csv + image zip its loading script reads.
    Returns (record, rows)."""
    from huggingface_hub.errors import RevisionNotFoundError

    from .hf_sets import iter_csv_zip_rows

    api = _api(endpoint)
    tried, listings = [], {}
    for rev in ([revision] if revision else ["main", PARQUET_EXPORT]):
        try:
            listings[rev] = commit, files = _listing(api, task.source, rev)
        except RevisionNotFoundError:
            tried.append(f"{rev} (no such revision)")
            continue
        chosen = test_parquet(files)
        if not chosen:
            tried.append(f"{rev} ({len(files)} files, no test parquet)")
            continue
        dest = stage / rev.replace("/", "_")
        record = {"via": "parquet", "revision": rev, "commit": commit, "files": _fetch(api, task, commit, chosen, dest)}
        return record, iter_table_rows([dest / f.path for f in chosen])
    first = revision or "main"
    raw = raw_retrieval_files(listings[first][1]) if task.type == "retrieval" and first in listings else []
    if raw:
        commit = listings[first][0]
        dest = stage / "raw"
        record = {"via": "csv+zip", "revision": first, "commit": commit, "files": _fetch(api, task, commit, raw, dest)}
        log.warning("%s: no parquet; built from the csv and zip the loading script reads (%s)", task.key,
                    ", ".join(f.path for f in raw))
        return record, iter_csv_zip_rows(dest / raw[0].path, dest / raw[1].path, task.key)
    raise ConfigError(f"{task.key}: {task.source} has no parquet files of the test split at "
                      f"{'; '.join(tried)}. Download it with DataComp's download_evalsets.py "
                      "(an older `datasets`) into DATA_DIR/hf_cache: it is converted from there")


def download_hf(task: Task, data_dir: Path, revision: str | None, endpoint: str | None) -> dict:
    kind = "winogavil" if task.type == "winogavil" else "retrieval"
    dest = data_dir / task.folder
    if layout.hf_cache_files(data_dir, task):
        layout.convert_from_hf_cache(data_dir, task)
        import json

        return json.loads((dest / layout.MARKER).read_text())
    stage = data_dir / layout.STAGE / task.folder
    record, rows = fetch_source(task, stage, revision, endpoint)
    n = write_set(kind, rows, dest, task.key)
    record = {"task": task.key, "source": task.source, **record, "rows": n}
    if task.size and n != task.size:
        log.warning("%s: %d rows, DataComp's tasklist says %d", task.key, n, task.size)
        record["expected_rows"] = task.size
    write_json(dest / layout.MARKER, record)
    shutil.rmtree(stage, ignore_errors=True)
    if not any(stage.parent.iterdir()):
        stage.parent.rmdir()
    return record


# -- all -------------------------------------------------------------------------------------------


def download_task(task: Task, data_dir: Path, revision: str | None = None, endpoint: str | None = None) -> dict:
    d, state, _ = layout.locate(data_dir, task)
    if state == "present" and (d / layout.MARKER).is_file():
        import json

        return json.loads((d / layout.MARKER).read_text())
    if task.is_hf_dataset:
        return download_hf(task, data_dir, revision, endpoint)
    if not task.datacomp_folder:
        raise ConfigError(f"{task.key}: no download source known ({task.source or 'none'})")
    return download_wds(task, data_dir, revision, endpoint)


def download(data_dir: str | Path, tasks: list[str] | None = None, revision: str | None = None,
             endpoint: str | None = None) -> dict:
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    out, errors = {}, {}
    for task in select(tasks):
        try:
            out[task.key] = download_task(task, data_dir, revision, endpoint)
            log.info("%s: ready in %s", task.key, layout.locate(data_dir, task)[0])
        except Exception as e:  # one set failing does not stop the others
            errors[task.key] = f"{type(e).__name__}: {e}"
            log.error("%s: %s", task.key, e)
    return {"downloaded": sorted(out), "errors": errors}


def dry_run(data_dir: str | Path, tasks: list[str] | None = None) -> list[dict]:
    """Each task's source, size and local state; touches nothing."""
    rows = []
    for t in select(tasks):
        d, state, detail = layout.locate(data_dir, t)
        rows.append({"key": t.key, "name": t.name, "source": t.source, "examples": t.size, "state": state,
                     "detail": detail, "path": str(d), "bytes": layout.local_bytes(d)})
    return rows


def format_rows(rows: list[dict]) -> str:
    lines = [f"{'key':51s} {'source':58s} {'examples':>8s} {'on disk':>9s}  state"]
    for r in rows:
        size = f"{r['bytes'] / 2**20:.1f}M" if r["bytes"] else "-"
        state = r["state"] + (f" ({r['detail']})" if r["detail"] else "")
        lines.append(f"{r['key']:51s} {r['source']:58s} {r['examples'] or 0:8d} {size:>9s}  {state}")
    counts = {}
    for r in rows:
        counts[r["state"]] = counts.get(r["state"], 0) + 1
    lines.append(", ".join(f"{n} {s}" for s, n in sorted(counts.items())) + f" (of {len(rows)})")
    return "\n".join(lines)
