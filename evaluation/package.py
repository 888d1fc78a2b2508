"""``conceptprune evaluate package | upload | submit``: DataComp's submission, as its evaluate.py
``--submit`` makes it.

- The bundle: ``OUT/{scale}_scale/results.jsonl``, ``samples/<keep-list name>`` (one or more)
  and, optionally, the checkpoint as ``checkpoint.pt`` (DataComp's ``path_in_repo`` names).
- The leaderboard record: DataComp's fields exactly (scale, model, dataset_size, checkpoint,
  batch_size, learning_rate, method_name, author, email, hf_username, hf_repo_name, timestamp,
  track, writeup) plus one ``<task name>: main metric`` per task with one. ``dataset_size`` is
  DataComp's: the ``--dataset-size`` text, else the scale's samples seen (its code falls back to
  ``train_num_samples``, not to the size of the filtered pool); ``dataset_size="keep-list"`` puts
  the number of keep-list entries instead (what the field means).
- Upload, only when asked: one Hugging Face commit of the bundle to ``hf_username/hf_repo_name``
  (the repository must exist, as with DataComp), then the record PUT as JSON to the leaderboard
  database at ``<db>/<hf_username>__<hf_repo_name>__<timestamp>.json`` (dots as underscores).
  DataComp's script also posts a Slack message to the organisers' webhook; that address is
  not built in here (``notify_url`` sends the same message to a URL you give).

The training facts come from the run folder: ``run.json`` (ours) or DataComp's ``info.pkl``,
read with an unpickler that builds nothing but plain values and paths.
"""

from __future__ import annotations

import io
import json
import pickle
import re
import shutil
import time
import urllib.error
import urllib.request
from pathlib import Path

from conceptprune import keeplist as K
from conceptprune.atomic import write_json
from conceptprune.errors import ConceptPruneError, ConfigError

from .compare import load, run_folder_of, run_record

SCALES = ("small", "medium", "large", "xlarge")
TRACKS = ("filtering", "byod")
DATACOMP_DB = "https://laion-tng-default-rtdb.firebaseio.com"
RECORD = "leaderboard_record.json"


class SubmissionError(ConceptPruneError):
    pass


# -- the bundle ---------------------------------------------------------------------------------


# DataComp's architecture of each scale (its training/scale configs; ../docs/datacomp.md)
SCALE_ARCH = {"small": "ViT-B-32", "medium": "ViT-B-32", "large": "ViT-B-16", "xlarge": "ViT-L-14"}


def check_run_scale(results, scale: str, checkpoint: str | None = None, force: bool = False) -> str | None:
    """The training run the results come from (their folder or one of its two parents; else the
    checkpoint's) records a scale and an architecture: either disagreeing with ``scale`` is
    returned and logged as a warning (not with ``force``). Nothing recorded: None."""
    import logging

    run = run_folder_of(results)
    if run is None and checkpoint:
        run = run_folder_of(Path(checkpoint).resolve().parent / "x")
    rec = run_record(run)
    if not rec and run is not None and (run / "info.pkl").is_file():
        try:
            info = read_info_pkl(run / "info.pkl")
            rec = {"scale": info.get("scale"), "recipe": {"model": info["scale_config"].get("model")}}
        except ConfigError:
            rec = {}
    got_scale = rec.get("scale")
    got_arch = (rec.get("recipe") or {}).get("model") if isinstance(rec.get("recipe"), dict) else None
    wrong = []
    if isinstance(got_scale, str) and got_scale != scale:
        wrong.append(f"scale {got_scale}")
    if isinstance(got_arch, str) and got_arch != SCALE_ARCH[scale]:
        wrong.append(f"architecture {got_arch} (DataComp's {scale} is {SCALE_ARCH[scale]})")
    if not wrong:
        return None
    msg = (f"--scale {scale}: the results {results} come from the run {run}, trained at "
           f"{' with '.join(wrong)}")
    if not force:
        logging.getLogger(__name__).warning("%s: DataComp's %s track expects %s; check --scale", msg, scale,
                                            SCALE_ARCH[scale])
    return msg


def package(results: str, keep_list: str | list, scale: str, out: str, checkpoint: str | None = None,
            force: bool = False) -> Path:
    """``OUT/{scale}_scale/results.jsonl`` + ``samples/<keep-list>`` (+ ``checkpoint.pt``). A run
    recorded at another scale or architecture than ``scale`` gets a warning (``force``: none)."""
    if scale not in SCALES:
        raise ConfigError(f"--scale must be one of {', '.join(SCALES)}")
    keep_lists = [keep_list] if isinstance(keep_list, (str, Path)) else list(keep_list)
    if not keep_lists:
        raise ConfigError("--keep-list: at least one keep-list (the samples trained on) is required")
    load(results)  # all 38 tasks, no duplicates
    names = [Path(k).name for k in keep_lists]
    if len(set(names)) != len(names):
        raise ConfigError(f"--keep-list: two keep-lists share the file name {names[0]!r} in samples/")
    for k in keep_lists:
        K.read_keep_list(k)  # a valid keep-list
    if checkpoint and not Path(checkpoint).is_file():
        raise ConfigError(f"--checkpoint {checkpoint}: not found")
    check_run_scale(results, scale, checkpoint, force)
    _check_out(out, scale, [results, *keep_lists, *([checkpoint] if checkpoint else [])])
    d = Path(out) / f"{scale}_scale"
    (d / "samples").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(results, d / "results.jsonl")
    for k in keep_lists:
        shutil.copyfile(k, d / "samples" / Path(k).name)
    if checkpoint:
        shutil.copyfile(checkpoint, d / "checkpoint.pt")
    return d


def upload(bundle: str, repo_id: str, private: bool = True) -> str:
    """Upload a bundle to a Hugging Face model repo (needs network and a token; never in tests)."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    return api.upload_folder(folder_path=bundle, repo_id=repo_id, repo_type="model")


# -- the training facts ---------------------------------------------------------------------------


class _PlainUnpickler(pickle.Unpickler):
    """Builds dicts, lists, numbers, strings and paths only (DataComp's info.pkl holds no more)."""

    ALLOWED = {("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("pathlib", "Path"),
               ("pathlib", "WindowsPath"), ("pathlib", "PureWindowsPath")}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            import pathlib

            return getattr(pathlib, name)
        raise pickle.UnpicklingError(f"refusing to build {module}.{name}")


def read_info_pkl(path: str | Path) -> dict:
    try:
        info = _PlainUnpickler(io.BytesIO(Path(path).read_bytes())).load()
    except Exception as e:
        raise ConfigError(f"{path}: not a DataComp info.pkl of plain values ({e})") from None
    if not isinstance(info, dict) or not isinstance(info.get("scale_config"), dict):
        raise ConfigError(f"{path}: not a DataComp info.pkl (no scale_config)")
    return info


def training_info(run: str | Path) -> dict:
    """DataComp's training facts (scale, checkpoint, scale_config) of a run folder."""
    run = Path(run)
    if (run / "info.pkl").is_file():  # DataComp's form; our train writes it when the run ends
        return read_info_pkl(run / "info.pkl")
    if (run / "run.json").is_file():
        raise ConfigError(f"--run {run}: the run has not finished (no info.pkl yet: train writes it at the end); "
                          f"'conceptprune status {run}' shows where it stands")
    raise ConfigError(f"--run {run}: neither run.json nor DataComp's info.pkl in this folder")


# -- the record -----------------------------------------------------------------------------------


def leaderboard_record(results: str | Path, info: dict, *, method_name: str, author: str, email: str,
                       hf_username: str, hf_repo_name: str, track: str, writeup: str | None = None,
                       dataset_size: str | None = None, keep_lists: list | None = None,
                       timestamp: str | None = None) -> dict:
    """DataComp's leaderboard record (its evaluate.py ``submit_to_firebase`` fields)."""
    for flag, v in (("--method-name", method_name), ("--author", author), ("--email", email),
                    ("--hf-username", hf_username), ("--hf-repo-name", hf_repo_name)):
        if not v or not str(v).strip():
            raise ConfigError(f"{flag} is required for a submission")
    check_hf_name("--hf-username", hf_username)
    check_hf_name("--hf-repo-name", hf_repo_name)
    if track not in TRACKS:
        raise ConfigError(f"--track must be one of {', '.join(TRACKS)}")
    if "scale" not in info or info["scale"] not in SCALES:
        raise ConfigError(f"the run's scale {info.get('scale')!r} is not a DataComp scale ({', '.join(SCALES)})")
    rows = load(results)
    config = info["scale_config"]
    missing = [k for k in ("model", "train_num_samples", "batch_size", "learning_rate") if k not in config]
    if missing or "checkpoint" not in info:
        raise ConfigError(f"the run's training facts lack {', '.join(missing or ['checkpoint'])} "
                          "(a DataComp info.pkl holds scale, checkpoint and scale_config)")
    if dataset_size == "keep-list":
        if not keep_lists:
            raise ConfigError("--dataset-size keep-list needs the keep-list(s)")
        dataset_size = sum(len(K.read_keep_list(k, multiset=True)) for k in keep_lists)
    record = {
        "scale": info["scale"], "model": config["model"],
        "dataset_size": dataset_size or config["train_num_samples"],
        "checkpoint": str(info["checkpoint"]), "batch_size": config["batch_size"],
        "learning_rate": config["learning_rate"], "method_name": method_name, "author": author, "email": email,
        "hf_username": hf_username, "hf_repo_name": hf_repo_name,
        "timestamp": timestamp or time.strftime("%Y-%m-%d_%H:%M:%S", time.gmtime()),
        "track": track, "writeup": writeup,
    }
    for row in rows.values():
        v = row["metrics"].get("main_metric")
        if v is not None:
            record[row["dataset"]] = v
    return record


_HF_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?")


def check_hf_name(flag: str, value: str) -> str:
    """A Hugging Face user or repository name (letters, digits, ``-``, ``_``, ``.``; at most 96;
    no ``--`` or ``..``): it goes into the Hub's repository id and the database URL as is."""
    v = str(value)
    if not _HF_NAME.fullmatch(v) or "--" in v or ".." in v:
        raise ConfigError(f"{flag} {value!r} is not a Hugging Face name (letters, digits, '-', '_', '.'; "
                          "starts and ends with a letter or digit; at most 96 characters)")
    return v


def run_checkpoint(run: str | Path, info: dict) -> Path:
    """The checkpoint the run's record names, accepted only inside the run folder and only if it
    is a PyTorch checkpoint (a zip archive with ``data.pkl``): ``info.pkl``/``run.json`` are
    inputs, and ``--upload-checkpoint`` publishes the file."""
    import zipfile

    from conceptprune.paths import check_inside

    where = f"--upload-checkpoint: the checkpoint named by {run}"
    path = check_inside(str(info.get("checkpoint", "")), run, where)
    if not path.is_file():
        raise ConfigError(f"{where} ({path}) is not there")
    try:
        with zipfile.ZipFile(path) as z:
            ok = any(n == "data.pkl" or n.endswith("/data.pkl") for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        ok = False
    if not ok:
        raise ConfigError(f"{where} ({path}) is not a checkpoint (torch.save's zip archive)")
    return path


def record_key(record: dict) -> str:
    return f"{record['hf_username']}__{record['hf_repo_name']}__{record['timestamp']}".replace(".", "_")


def notification(record: dict, results: dict, where: str = "the results") -> str:
    """DataComp's Slack message for a submission."""
    import numpy as np

    avg = float(np.mean([r["metrics"]["main_metric"] for r in results.values()
                         if r["metrics"].get("main_metric") is not None]))
    m = results.get("imagenet1k", {}).get("metrics", {})
    imagenet = m.get("acc1", m.get("main_metric"))
    if isinstance(imagenet, bool) or not isinstance(imagenet, (int, float)):
        raise ConfigError(f"{where}: imagenet1k has no accuracy (acc1 or main_metric) for the notification")
    msg = (f"New submission ({record['scale']} scale, {record['track']} track): {record['method_name']}. "
           f"ImageNet accuracy: {imagenet:.3f}. Average performance {avg:.3f}. "
           f"From {record['author']} ({record['email']}), more details at "
           f"https://huggingface.co/{record['hf_username']}/{record['hf_repo_name']}.")
    return msg + (f" Writeup: {record['writeup']}" if record.get("writeup") else "")


# -- submit ---------------------------------------------------------------------------------------


def submit(run: str, results: str, keep_lists: list, out: str, *, method_name: str, author: str, email: str,
           hf_username: str, hf_repo_name: str, track: str, writeup: str | None = None,
           dataset_size: str | None = None, upload_checkpoint: bool = False, do_upload: bool = False,
           hf_endpoint: str | None = None, token: str | None = None, db_url: str = DATACOMP_DB,
           skip_hf: bool = False, skip_db: bool = False, notify_url: str | None = None) -> dict:
    """Build the bundle and the record in ``out``; with ``do_upload``, push both as DataComp does."""
    info = training_info(run)
    record = leaderboard_record(results, info, method_name=method_name, author=author, email=email,
                                hf_username=hf_username, hf_repo_name=hf_repo_name, track=track, writeup=writeup,
                                dataset_size=dataset_size, keep_lists=keep_lists)
    # everything is checked before the first file is written or the first request is sent
    ckpt = str(run_checkpoint(run, info)) if upload_checkpoint else None
    message = notification(record, load(results), str(results)) if notify_url else None
    _check_out(out, info["scale"], [results, *keep_lists])
    state_path = Path(out) / SUBMITTED
    state = _read_state(state_path)
    content = _content_digest(record, results, keep_lists, ckpt)
    if state.get("content") == content:  # the same submission again: same key, finished steps skipped
        record["timestamp"] = state["timestamp"]
    else:
        state = {"content": content, "timestamp": record["timestamp"], "steps": {}}
    bundle = package(results, keep_lists, info["scale"], out, ckpt)
    write_json(Path(out) / RECORD, record)
    done = {"bundle": str(bundle), "record": str(Path(out) / RECORD), "key": record_key(record)}
    if not do_upload:
        return done
    steps = state["steps"]

    def step(name: str, value) -> None:
        steps[name] = value
        write_json(state_path, state)  # after each step: a rerun resumes after it

    if not skip_hf:
        if "hub" not in steps:
            step("hub", _push_bundle(bundle, f"{hf_username}/{hf_repo_name}", info["scale"], hf_endpoint, token))
        done["commit"] = steps["hub"]
    if not skip_db:
        url = f"{db_url.rstrip('/')}/{record_key(record)}.json"
        if steps.get("db") != url:
            _put_json(url, record, "the leaderboard database")
            step("db", url)
        done["db"] = url
    if notify_url and steps.get("notify") != notify_url:
        _put_json(notify_url, {"text": message}, "the notification hook")
        step("notify", notify_url)
    return done


SUBMITTED = ".submission_state.json"


def _check_out(out: str | Path, scale: str, inputs: list) -> None:
    """``--out`` is a folder, and no input lies where the bundle is written."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: a file, not a folder")
    bundle = out / f"{scale}_scale"
    from conceptprune.paths import is_within

    for p in inputs:
        if is_within(p, bundle) or is_within(p, out / RECORD) or is_within(p, out / SUBMITTED):
            raise ConfigError(f"--out {out}: the bundle would overwrite the input {p}; choose another folder")


def _read_state(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        state = None
    if not isinstance(state, dict) or not isinstance(state.get("steps"), dict) or "timestamp" not in state:
        raise ConfigError(f"{path}: damaged submission state (not the JSON this command writes); "
                          "remove it only if nothing of this submission was uploaded")
    return state


def _content_digest(record: dict, results, keep_lists: list, ckpt: str | None) -> str:
    """What is submitted, less the timestamp: the record's fields and the bundle's files' bytes."""
    import hashlib

    from conceptprune.atomic import file_digest

    fields = {k: v for k, v in record.items() if k != "timestamp"}
    files = [file_digest(p) for p in [results, *keep_lists, *([ckpt] if ckpt else [])]]
    return hashlib.sha256(json.dumps([fields, files], sort_keys=True, default=str).encode()).hexdigest()


def _push_bundle(bundle: Path, repo_id: str, scale: str, endpoint: str | None, token: str | None) -> str:
    """One commit with the bundle's files under ``{scale}_scale/`` (DataComp's push_files_to_hub)."""
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    ops = [CommitOperationAdd(path_in_repo=f"{scale}_scale/{p.relative_to(bundle).as_posix()}", path_or_fileobj=str(p))
           for p in sorted(bundle.rglob("*")) if p.is_file()]
    api = HfApi(endpoint=endpoint, token=token)
    try:
        info = api.create_commit(repo_id=repo_id, operations=ops, commit_message=f"Upload artifacts ({scale} scale)")
    except RepositoryNotFoundError:
        raise SubmissionError(f"Hugging Face repository {repo_id} not found (create it first, as for DataComp's "
                              "evaluate.py, and check your token)") from None
    except HfHubHTTPError as e:
        raise SubmissionError(f"upload to {repo_id} failed: {str(e).splitlines()[0]}") from None
    return info.commit_url


def _put_json(url: str, obj: dict, what: str) -> None:
    req = urllib.request.Request(url, data=json.dumps(obj).encode(), method="PUT",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            status = resp.status
    except urllib.error.HTTPError as e:
        status = e.code
    except (urllib.error.URLError, OSError) as e:
        raise SubmissionError(f"cannot reach {what} at {url} ({getattr(e, 'reason', e)})") from None
    if status != 200:
        raise SubmissionError(f"{what} at {url} answered HTTP {status}; the submission is not recorded")
