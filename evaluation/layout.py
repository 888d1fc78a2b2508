"""Where each task's data lives under ``--data-dir``, and in what state.

Accepted, with no renaming:

- DataComp's own download (``download_evalsets.py``): ``wds_<name>_test/`` per webdataset set
  (``<name>`` = the key with ``fairness/`` stripped and '/' -> '-'), and the three nlphuji sets in
  ``hf_cache/`` (a Hugging Face ``datasets`` cache; converted once, on first use, into our folder);
- ours (``conceptprune evaluate download``): the same ``wds_<name>_test/`` folders (so DataComp's
  ``evaluate.py`` can read them too), and the nlphuji sets converted into ``<key with / -> ->/``
  (``retrieval-flickr_1k_test_image_text_retrieval/``, ``retrieval-mscoco_2014_5k_test_image_text_retrieval/``,
  ``misc-winogavil/``), see ``hf_sets``;
- ``<key with / -> ->/`` for any task (earlier versions of this toolkit, and your own tasks).

A folder finished by ``evaluate download`` holds ``.complete.json`` (what was fetched, with checksums).
"""

from __future__ import annotations

import logging
from pathlib import Path

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # (tasks.table() imports this module)
    from .tasks import Task

log = logging.getLogger(__name__)

MARKER = ".complete.json"
STAGE = ".downloads"  # where the nlphuji sources wait for their conversion


def candidates(data_dir: str | Path, task: Task) -> list[Path]:
    """Folders that may hold the task, in order of preference."""
    d = Path(data_dir)
    out = [d / task.datacomp_folder] if task.datacomp_folder else []
    return out + [d / task.folder]


def hf_cache_files(data_dir: str | Path, task: Task) -> list[Path]:
    from .hf_sets import hf_cache_files as find

    if not task.is_hf_dataset:
        return []
    return find(Path(data_dir) / "hf_cache", task.source.split("/", 1)[1])


def shards_state(d: Path) -> tuple[str, str]:
    """('present' | 'partial' | 'missing', detail) of a wds folder, from the files alone."""
    if not d.is_dir():
        return "missing", ""
    nshards = d / "test" / "nshards.txt"
    if not nshards.is_file():
        return "partial", "no test/nshards.txt"
    try:
        n = int(nshards.read_text().strip())
    except ValueError:
        return "partial", "unreadable test/nshards.txt"
    absent = [i for i in range(n) if not (d / "test" / f"{i}.tar").is_file()
              or (d / "test" / f"{i}.tar").stat().st_size == 0]
    if absent:
        return "partial", f"{len(absent)} of {n} shards missing"
    if any(d.glob(".cache/huggingface/download/**/*.incomplete")):
        return "partial", "interrupted download"
    return "present", f"{n} shards" + ("" if (d / MARKER).is_file() else ", not checksummed here")


def locate(data_dir: str | Path, task: Task) -> tuple[Path, str, str]:
    """(folder, state, detail); state is present, partial, convertible (DataComp's hf_cache holds
    it) or missing; folder is where the task is or would go."""
    found = None
    for d in candidates(data_dir, task):
        if d.is_dir():
            state, detail = shards_state(d)
            if state == "present":
                return d, state, detail
            found = found or (d, state, detail)
    if task.is_hf_dataset and hf_cache_files(data_dir, task):
        return Path(data_dir) / task.folder, "convertible", "in hf_cache (converted on first use)"
    if found:
        return found
    if task.is_hf_dataset and (Path(data_dir) / STAGE / task.folder).is_dir():
        return Path(data_dir) / task.folder, "partial", "interrupted download"
    return candidates(data_dir, task)[0], "missing", ""


def convert_from_hf_cache(data_dir: str | Path, task: Task) -> Path:
    """Convert DataComp's ``hf_cache`` copy of an nlphuji set into our folder (once)."""
    from conceptprune.atomic import write_json

    from .hf_sets import iter_table_rows, write_set

    files = hf_cache_files(data_dir, task)
    dest = Path(data_dir) / task.folder
    kind = "winogavil" if task.type == "winogavil" else "retrieval"
    log.info("%s: converting %s into %s", task.key, files[0].parent, dest)
    n = write_set(kind, iter_table_rows(files), dest, task.key, base=Path(data_dir) / "hf_cache")
    write_json(dest / MARKER, {"task": task.key, "source": task.source, "via": "hf_cache",
                               "files": [str(f) for f in files], "rows": n})
    if task.size and n != task.size:
        log.warning("%s: %d rows, DataComp's tasklist says %d", task.key, n, task.size)
    return dest


def task_dir(data_dir: str | Path, task: Task) -> Path:
    """The task's folder under ``data_dir`` (DataComp's name or ours); an nlphuji set found only in
    DataComp's ``hf_cache`` is converted first. A folder that is not there is returned as the
    place it would go (the caller reports it)."""
    d, state, _ = locate(data_dir, task)
    if state == "convertible":
        return convert_from_hf_cache(data_dir, task)
    return d


def local_bytes(d: Path) -> int:
    if not d.is_dir():
        return 0
    return sum(p.stat().st_size for p in d.rglob("*") if p.is_file() and ".cache" not in p.parts)
