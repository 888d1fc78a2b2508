"""DataComp drop-in (issue 16) and reshard/tar/training safety (issue 19): reshard with upsampled
keep-lists, shuffle and blur; output DataComp's train.py and open_clip read; outputs that never
overlap inputs; atomic assembly; the tar parser reading what tar reads; training artefacts
(info.pkl), recipe details and the submission record/upload. No network: real tars, real
open_clip, a loopback stand-in for the Hugging Face Hub and the leaderboard database."""

import io
import json
import logging
import os
import pickle
import signal
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from conceptprune import keeplist as K
from conceptprune import uids as U
from conceptprune.data.reshard import read_keep_counts, reshard, state_dir
from conceptprune.tars import Sample, ShardWriter, iter_samples
from conceptprune.errors import ConfigError, KeepListError, PoolError
from conceptprune.slurm.stage import Executor

ROOT = Path(__file__).resolve().parents[1]


def _jpg(i: int, size=(32, 32)) -> bytes:
    from PIL import Image, ImageDraw

    im = Image.new("RGB", size, (200, 200, 200))
    ImageDraw.Draw(im).ellipse([4, 4, size[0] - 4, size[1] - 4], fill=((i * 40) % 256, 80, 160))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _uid(s: int, i: int) -> str:
    return f"{s + 1:016x}{i * 7919 + 3:016x}"


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """3 shards x 12 samples (jpg, txt, json with the uid)."""
    d = tmp_path_factory.mktemp("in") / "shards"
    d.mkdir()
    for s in range(3):
        w = ShardWriter(d / f"{s:08d}.tar")
        for i in range(12):
            w.write(Sample(f"{s:04d}{i:04d}", {"jpg": _jpg(i), "txt": f"a circle {i}".encode(),
                                                "json": json.dumps({"uid": _uid(s, i)}).encode()}))
        w.close()
        (d / f"{s:08d}_stats.json").write_text(json.dumps({"count": 12, "successes": 12}))
    return d


def _samples(folder: Path) -> list[tuple[str, str, dict]]:
    """(key, uid, {ext: bytes}) of every sample in the folder's shards, read with tarfile."""
    out = []
    for t in sorted(folder.glob("*.tar")):
        with tarfile.open(t) as tf:
            cur = None
            for m in tf.getmembers():
                key, ext = m.name.split(".", 1)
                if cur is None or cur[0] != key:
                    cur = (key, {})
                    out.append(cur)
                cur[1][ext] = tf.extractfile(m).read()
    return [(k, json.loads(p["json"])["uid"], p) for k, p in out]


def _keep(path: Path, uids: list[str]) -> Path:
    arr = U.uids_to_array(uids)
    arr.sort()
    np.save(path, arr)
    return path


# -- issue 16.3: upsampled and memory-mapped keep-lists ------------------------------------------------


def test_upsampled_keep_list_writes_each_uid_as_often_as_listed(shards, tmp_path):
    listed = [_uid(0, 1)] + [_uid(0, 2)] * 2 + [_uid(1, 5)] * 3 + [_uid(2, 11)] + ["f" * 32] * 2
    keep = _keep(tmp_path / "keep.npy", listed)
    m = reshard(shards, keep, tmp_path / "out", shard_size=4, executor=Executor.create("inline"))
    got = _samples(tmp_path / "out")
    assert Counter(u for _, u, _ in got) == Counter(u for u in listed if u != "f" * 32)
    assert m["kept_samples"] == 7 and m["keep_list_uids"] == 5 and m["keep_list_entries"] == 9
    assert m["missing_from_shards"] == 1
    keys = [k for k, _, _ in got]
    assert len(set(keys)) == len(keys)  # every copy is its own sample for webdataset
    assert keys[:3] == ["00000001", "00000002", "00000002-1"]
    assert [p["jpg"] for k, _, p in got if k.startswith("00000002")] == [_jpg(2)] * 2
    # DataComp's resharder names every sample <uid>-<j>
    reshard(shards, keep, tmp_path / "dc", shard_size=4, executor=Executor.create("inline"), datacomp_keys=True)
    assert [k for k, _, _ in _samples(tmp_path / "dc")][:3] == [f"{_uid(0, 1)}-0", f"{_uid(0, 2)}-0",
                                                                f"{_uid(0, 2)}-1"]
    # a raw memory-mapped array (no .npy header), as DataComp's resharder accepts
    raw = tmp_path / "keep.mmap"
    raw.write_bytes(np.load(keep).tobytes())
    uniq, counts = read_keep_counts(raw)
    assert len(uniq) == 5 and counts.tolist() == [1, 2, 3, 1, 2]
    assert reshard(shards, raw, tmp_path / "out_raw", shard_size=4, executor=Executor.create("inline"))["kept_samples"] == 7
    # unsorted stays an error (DataComp would silently select the wrong samples)
    bad = tmp_path / "unsorted.npy"
    np.save(bad, np.load(keep)[::-1])
    with pytest.raises(KeepListError, match="not sorted at entry 2"):
        reshard(shards, bad, tmp_path / "out_bad", executor=Executor.create("inline"))


# -- issue 16.4: output DataComp's train.py and open_clip read as their own -------------------------


def _datacomp_train_data(parent: Path) -> str:
    """What DataComp's train.py builds from ``--data_dir PARENT`` for a subfolder made by its
    resharder: it reads output_shard_count and output_shard_format from the subfolder's meta.json."""
    parts = []
    for sub in sorted(p for p in parent.iterdir() if p.is_dir()):
        meta = json.loads((sub / "meta.json").read_text())
        fmt, n = meta["output_shard_format"], meta["output_shard_count"]
        first, last = fmt.format(0).replace(".tar", ""), fmt.format(n - 1).replace(".tar", "")
        parts.append(str(sub / f"{{{first}..{last}}}.tar"))
    return "::".join(parts)


def test_output_is_read_by_datacomp_rules_and_open_clip_without_warnings(shards, tmp_path, caplog):
    keep = _keep(tmp_path / "keep.npy", [_uid(s, i) for s in range(3) for i in range(0, 12, 2)])
    parent = tmp_path / "data"
    m = reshard(shards, keep, parent / "filtered", shard_size=5, executor=Executor.create("local", workers=2))
    out = parent / "filtered"
    names = sorted(p.name for p in out.iterdir())
    assert not [n for n in names if n.startswith(".")] and all((out / n).is_file() for n in names)
    assert names == sorted([f"{i:08d}.tar" for i in range(5)] + [f"{i:08d}_stats.json" for i in range(5)]
                           + ["meta.json", "sample_ids.npy", "sizes.json"])  # worker 0: 5+5+2, worker 1: 5+1
    assert sorted(p.name for p in parent.iterdir()) == ["filtered"]  # no job state left beside it
    assert m["output_shard_count"] == 5 and m["output_shard_format"] == "{:08d}.tar"
    assert m["output_count"] == m["kept_samples"] == 18 and m["processed_count"] == 36
    train_data = _datacomp_train_data(parent)
    assert train_data == str(out / "{00000000..00000004}.tar")

    from open_clip_train.data import get_wds_dataset
    from open_clip_train.params import parse_args

    import open_clip
    from conceptprune.models import register

    register()
    _, _, preprocess = open_clip.create_model_and_transforms("cp-tiny-vit")
    args = parse_args(["--train-data", train_data, "--train-num-samples", "18", "--batch-size", "1",
                       "--workers", "0", "--dataset-type", "webdataset"])
    args.world_size, args.rank = 1, 0
    caplog.set_level(logging.WARNING)
    data = get_wds_dataset(args, preprocess, is_train=True, epoch=0, tokenizer=open_clip.get_tokenizer("cp-tiny-vit"))
    assert sum(images.shape[0] for images, _ in data.dataloader) == 18
    assert not [r for r in caplog.records if "webdataset error" in r.getMessage()]


# -- issue 19.1: --overwrite never deletes an input -----------------------------------------------------


def test_overwrite_never_deletes_or_overlaps_the_inputs(shards, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(shards, data / "shards")
    keep = _keep(data / "keep.npy", [_uid(0, 1)])
    before = sorted(p.name for p in (data / "shards").iterdir())
    for out, what in ((data / "shards", "is or contains --shards"), (data, "is or contains --shards"),
                      (tmp_path, "is or contains --shards"), (data / "shards" / "sub", "lies inside --shards")):
        with pytest.raises(ConfigError, match=what):
            reshard(data / "shards", keep, out, overwrite=True, executor=Executor.create("inline"))
    other = tmp_path / "keeps"
    other.mkdir()
    keep2 = _keep(other / "k.npy", [_uid(0, 1)])
    with pytest.raises(ConfigError, match="is or contains --keep"):
        reshard(data / "shards", keep2, other, overwrite=True, executor=Executor.create("inline"))
    assert sorted(p.name for p in (data / "shards").iterdir()) == before and keep.exists() and keep2.exists()
    # a non-empty --out, a foreign <out>.state folder, an unfinished reshard of other inputs: refused
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "mine.txt").write_text("x")
    with pytest.raises(ConfigError, match="is not empty; choose an empty or new folder or pass --overwrite"):
        reshard(data / "shards", keep, tmp_path / "full", executor=Executor.create("inline"))
    (tmp_path / "o.state").mkdir()
    with pytest.raises(ConfigError, match="o.state exists and is not a reshard's job folder"):
        reshard(data / "shards", keep, tmp_path / "o", executor=Executor.create("inline"))
    (tmp_path / "o.state" / ".reshard.json").write_text("{}")
    with pytest.raises(ConfigError, match="holds an unfinished reshard of other inputs"):
        reshard(data / "shards", keep, tmp_path / "o", executor=Executor.create("inline"))
    assert reshard(data / "shards", keep, tmp_path / "o", executor=Executor.create("inline"), overwrite=True)["kept_samples"] == 1
    assert (tmp_path / "full" / "mine.txt").exists() and not (tmp_path / "o.state").exists()


# -- issue 19.10: a reshard killed while assembling leaves nothing train accepts ------------------------


def test_kill_during_assemble_leaves_no_folder_and_train_refuses_unfinished(shards, tmp_path):
    from conceptprune.training.launch import resolve_data

    keep = _keep(tmp_path / "keep.npy", [_uid(s, i) for s in range(3) for i in range(0, 12, 3)])
    out = tmp_path / "out"
    code = (
        "import os, signal\n"
        "import conceptprune.data.reshard as R\n"
        "real = R.write_json\n"
        "def killing(path, obj):\n"
        "    if str(path).endswith('00000001_stats.json'):\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    real(path, obj)\n"
        "R.write_json = killing\n"
        "from conceptprune.slurm.stage import Executor\n"
        f"R.reshard(r'{shards}', r'{keep}', r'{out}', shard_size=3, executor=Executor.create('inline'))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, cwd=ROOT)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert not out.exists()  # the half-assembled output sits in the state folder, never at --out
    assert (state_dir(out) / "assembled" / "00000000.tar").exists()
    out.mkdir()  # what a user might point train at
    with pytest.raises(ConfigError, match="no .tar shards"):
        resolve_data([str(out)])
    out.rmdir()
    m = reshard(shards, keep, out, shard_size=3, executor=Executor.create("inline"))  # the rerun finishes it
    clean = reshard(shards, keep, tmp_path / "clean", shard_size=3, executor=Executor.create("inline"))
    assert m["kept_samples"] == clean["kept_samples"] == 12 and not state_dir(out).exists()
    for t in sorted(clean_t for clean_t in (tmp_path / "clean").glob("*.tar")):
        assert (out / t.name).read_bytes() == t.read_bytes()
    # a folder a reshard started (older versions assembled in place) without meta.json is refused
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "00000000.tar").write_bytes((out / "00000000.tar").read_bytes())
    (partial / "sample_ids.npy").write_bytes(keep.read_bytes())
    with pytest.raises(ConfigError, match="unfinished reshard"):
        resolve_data([str(partial)])


# -- issue 19.12: the tar parser reads exactly what tar reads ------------------------------------------


def _crafted(path: Path, members: list) -> Path:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        for m in members:
            info, data = m
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def _info(name, data=b"", kind=tarfile.REGTYPE, pax=None, link=""):
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mtime = kind, link, 0
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    if pax:
        info.pax_headers = pax
    return info, (data if kind == tarfile.REGTYPE else None)


def test_pax_path_is_read_only_from_a_real_path_record(tmp_path):
    uid = "ab" * 16
    comment = {"comment": "x path=../../evil.jpg"}  # text inside a comment record, not a path record
    t = _crafted(tmp_path / "a.tar", [
        _info("000.jpg", _jpg(0), pax=comment),
        _info("000.json", json.dumps({"uid": uid}).encode()),
        _info("001.jpg", _jpg(1), pax={"path": "../../001.jpg"}),  # a real pax path: unsafe
        _info("001.json", json.dumps({"uid": uid}).encode()),
    ])
    unsafe = []
    got = list(iter_samples(t, unsafe))
    with tarfile.open(t) as tf:
        tar_names = [m.name for m in tf.getmembers()]
    assert tar_names == ["000.jpg", "000.json", "../../001.jpg", "001.json"]
    assert [(s.key, sorted(s.parts)) for s in got] == [("000", ["jpg", "json"]), ("001", ["json"])]
    assert unsafe == ["../../001.jpg"]


def test_links_devices_fifos_are_dropped_and_counted_and_imageless_samples_not_kept(tmp_path):
    d = tmp_path / "shards"
    d.mkdir()
    u = [f"{i + 1:032x}" for i in range(4)]
    _crafted(d / "00000000.tar", [
        _info("000.jpg", _jpg(0)), _info("000.json", json.dumps({"uid": u[0]}).encode()),
        _info("001.jpg", kind=tarfile.SYMTYPE, link="/etc/passwd"),
        _info("001.json", json.dumps({"uid": u[1]}).encode()),
        _info("002.jpg", kind=tarfile.LNKTYPE, link="000.jpg"), _info("002.json", json.dumps({"uid": u[2]}).encode()),
        _info("003.jpg", _jpg(3)), _info("003.fifo", kind=tarfile.FIFOTYPE), _info("003.dev", kind=tarfile.CHRTYPE),
        _info("003.json", json.dumps({"uid": u[3]}).encode()),
    ])
    (d / "00000000_stats.json").write_text("{}")
    keep = _keep(tmp_path / "k.npy", u)
    m = reshard(d, keep, tmp_path / "out", executor=Executor.create("inline"))
    assert m["special_members_dropped"] == 4 and m["samples_with_dropped_members"] == 3
    assert m["samples_without_image"] == 2 and m["kept_samples"] == 2 and m["missing_from_shards"] == 2
    with tarfile.open(tmp_path / "out" / "00000000.tar") as tf:
        assert [(x.name, x.isreg()) for x in tf.getmembers()] == [
            ("000.jpg", True), ("000.json", True), ("003.jpg", True), ("003.json", True)]


def test_garbage_tar_header_is_one_line_naming_the_shard(shards, tmp_path):
    d = tmp_path / "shards"
    d.mkdir()
    good = (shards / "00000000.tar").read_bytes()
    (d / "00000000.tar").write_bytes(good[:1024] + b"\x07garbage!" * 64 + good[1536:])
    (d / "00000000_stats.json").write_text("{}")
    keep = _keep(tmp_path / "k.npy", [_uid(0, 0)])
    with pytest.raises(PoolError) as e:
        reshard(d, keep, tmp_path / "out", executor=Executor.create("inline"))
    assert str(d / "00000000.tar") in str(e.value) and "\n" not in str(e.value)
    hdr = bytearray(good[:512])
    hdr[124:136] = b"9x9x9x9x9x9\0"  # not octal; with a checksum that matches
    hdr[148:156] = b" " * 8
    hdr[148:156] = b"%06o\0 " % sum(hdr)
    (d / "00000000.tar").write_bytes(bytes(hdr) + good[512:])
    with pytest.raises(PoolError, match="00000000.tar: tar header at byte 0 is corrupt"):
        list(iter_samples(d / "00000000.tar"))
    (d / "00000000.tar").write_bytes(good[:700])
    with pytest.raises(PoolError, match="00000000.tar: member at byte 0 is truncated"):
        list(iter_samples(d / "00000000.tar"))
    pax = tmp_path / "pax.tar"
    _crafted(pax, [_info("000.jpg", b"x", pax={"comment": "y"})])
    raw = bytearray(pax.read_bytes())
    at = raw.index(b"13 comment=y\n")
    raw[at:at + 2] = b"99"  # a record length past the end of the pax data
    hdr = raw[:512]
    hdr[148:156] = b" " * 8
    raw[148:156] = b"%06o\0 " % sum(hdr)
    pax.write_bytes(bytes(raw))
    with pytest.raises(PoolError, match="pax.tar: tar header at byte 0: corrupt pax header record at byte 0"):
        list(iter_samples(pax))


# -- issue 16.4: shuffle buffer and face blur -----------------------------------------------------


def test_shuffle_buffer_is_seeded_and_keeps_every_sample(shards, tmp_path):
    keep = _keep(tmp_path / "keep.npy", [_uid(s, i) for s in range(3) for i in range(12)])
    reshard(shards, keep, tmp_path / "p", executor=Executor.create("inline"))
    reshard(shards, keep, tmp_path / "a", executor=Executor.create("inline"), shuffle_buffer=8, seed=1)
    reshard(shards, keep, tmp_path / "b", executor=Executor.create("inline"), shuffle_buffer=8, seed=1)
    reshard(shards, keep, tmp_path / "c", executor=Executor.create("inline"), shuffle_buffer=8, seed=2)
    order = {n: [k for k, _, _ in _samples(tmp_path / n)] for n in "pabc"}
    assert order["a"] == order["b"] and order["a"] != order["p"] and order["a"] != order["c"]
    assert sorted(order["a"]) == sorted(order["p"]) == sorted(order["c"])
    assert (tmp_path / "a" / "00000000.tar").read_bytes() == (tmp_path / "b" / "00000000.tar").read_bytes()
    assert json.loads((tmp_path / "a" / "meta.json").read_text())["shuffle_bufsize"] == "8"


def test_blur_uses_the_metadata_face_boxes(tmp_path):
    import cv2
    import pandas as pd

    d = tmp_path / "shards"
    d.mkdir()
    u = [f"{i + 1:032x}" for i in range(3)]
    yy, xx = np.mgrid[0:64, 0:64]
    img = np.stack([xx * 3, yy * 3, (xx + yy) * 2], axis=-1).astype(np.uint8)  # smooth, except:
    img[:32, :32] = np.where(((yy[:32, :32] // 2 + xx[:32, :32] // 2) % 2)[..., None] == 1, 255, 0)  # a "face"
    jpg = cv2.imencode(".jpg", img, [int(cv2.IMWRITE_JPEG_QUALITY), 100])[1].tobytes()
    w = ShardWriter(d / "00000000.tar")
    for i in range(3):
        w.write(Sample(f"{i:03d}", {"jpg": jpg, "txt": b"x", "json": json.dumps({"uid": u[i]}).encode()}))
    w.close()
    (d / "00000000_stats.json").write_text("{}")
    meta = tmp_path / "metadata"
    meta.mkdir()
    pd.DataFrame({"uid": u, "face_bboxes": [[[0.0, 0.0, 0.5, 0.5]], [], [[0.5, 0.5, 1.0, 1.0]]]}).to_parquet(
        meta / "0.parquet")
    keep = _keep(tmp_path / "k.npy", u[:2])
    m = reshard(d, keep, tmp_path / "out", executor=Executor.create("inline"), blur_metadata=meta)
    got = {uid: parts for _, uid, parts in _samples(tmp_path / "out")}
    assert m["blurred"] == 1 and m["apply_blur"] == "True"
    assert sorted(got[u[0]]) == ["json", "txt", "webp"] and got[u[1]]["jpg"] == jpg  # no boxes: as it was
    blurred = cv2.imdecode(np.frombuffer(got[u[0]]["webp"], np.uint8), cv2.IMREAD_UNCHANGED).astype(int)
    orig = cv2.imdecode(np.frombuffer(jpg, np.uint8), cv2.IMREAD_UNCHANGED).astype(int)
    inside = np.abs(blurred[4:28, 4:28] - orig[4:28, 4:28]).mean()
    outside = np.abs(blurred[44:, 44:] - orig[44:, 44:]).mean()
    assert inside > 40 and outside < 3, (inside, outside)
    with pytest.raises(ConfigError, match="is or contains --blur"):
        reshard(d, keep, meta, executor=Executor.create("inline"), blur_metadata=meta, overwrite=True)


# -- issue 16.5: package, leaderboard record, upload to a loopback stand-in ------------------------------


class _HubAndDb:
    """A loopback stand-in for the Hugging Face Hub's commit API (preupload + commit of regular
    files) and the leaderboard database (PUT <key>.json)."""

    def __init__(self):
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.commits, self.records, self.requests = [], {}, []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def _body(self):
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _json(self, obj, code=200):
                body = json.dumps(obj).encode()
                self.send_response(code)
                if code == 404:  # what the Hub sends for a missing repository
                    self.send_header("X-Error-Code", "RepoNotFound")
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self):
                import base64

                body = self._body()
                outer.requests.append(("POST", self.path))
                parts = self.path.split("?")[0].split("/")  # /api/models/<user>/<repo>/<op>/<revision>
                repo = "/".join(parts[3:5])
                if repo != "alice/my-entry":
                    return self._json({"error": "Repository not found"}, 404)
                if parts[5] == "preupload":
                    files = json.loads(body)["files"]
                    return self._json({"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                                 for f in files]})
                if parts[5] == "commit":
                    lines = [json.loads(x) for x in body.decode().splitlines() if x.strip()]
                    files = {x["value"]["path"]: base64.b64decode(x["value"]["content"])
                             for x in lines if x["key"] == "file"}
                    outer.commits.append({"repo": repo, "summary": lines[0]["value"]["summary"], "files": files})
                    return self._json({"commitUrl": f"{outer.url}/{repo}/commit/0123abcd", "commitOid": "0123abcd"})
                self._json({"error": "unknown"}, 404)

            def do_PUT(self):
                outer.requests.append(("PUT", self.path))
                outer.records[self.path] = json.loads(self._body())
                self._json({"ok": True})

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def _results_file(path: Path) -> Path:
    from conceptprune.evaluation.tasks import TASKS

    rows = [{"key": t.key, "dataset": t.name,
             "metrics": {"acc1": 0.25, "main_metric": None if t.main_metric is None else round(0.1 + i / 100, 4)}}
            for i, t in enumerate(TASKS)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _medium_run(tmp_path: Path, shards: Path) -> Path:
    import torch

    from conceptprune.training.launch import TrainConfig, train, write_info_pkl

    rec = train(TrainConfig([str(shards)], "medium", str(tmp_path / "runs"), name="m"),
                executor=Executor.plan("slurm"), dry_run=True)
    run = tmp_path / "runs" / "m"
    (run / "checkpoints").mkdir(parents=True)
    torch.save({"epoch": 8}, run / "checkpoints" / "epoch_latest.pt")
    (run / "run.json").write_text(json.dumps({**rec, "status": "finished"}))
    write_info_pkl(run)  # what train writes when a run ends (and what package/submit read)
    return run


def test_package_names_the_checkpoint_checkpoint_pt(tmp_path):
    from conceptprune.evaluation.package import package

    res = _results_file(tmp_path / "eval_results.jsonl")
    keep = _keep(tmp_path / "mine.npy", [_uid(0, 1)])
    (tmp_path / "epoch_8.pt").write_bytes(b"weights")
    d = package(str(res), [str(keep)], "medium", str(tmp_path / "bundle"), str(tmp_path / "epoch_8.pt"))
    files = sorted(p.relative_to(tmp_path / "bundle").as_posix() for p in d.rglob("*") if p.is_file())
    assert files == ["medium_scale/checkpoint.pt", "medium_scale/results.jsonl", "medium_scale/samples/mine.npy"]


def test_submit_builds_datacomps_record_and_uploads_only_when_asked(shards, tmp_path, monkeypatch):
    import huggingface_hub.constants

    from conceptprune.evaluation.package import read_info_pkl, submit, training_info
    from conceptprune.evaluation.tasks import TASKS

    run = _medium_run(tmp_path, shards)
    res = _results_file(tmp_path / "eval_results.jsonl")
    keep = _keep(tmp_path / "mine.npy", [_uid(0, 1), _uid(0, 2)])
    stand_in = _HubAndDb()
    args = dict(method_name="my filter", author="Alice", email="a@example.org", hf_username="alice",
                hf_repo_name="my-entry", track="filtering", upload_checkpoint=True, hf_endpoint=stand_in.url,
                db_url=stand_in.url + "/db", token="hf_test")
    done = submit(str(run), str(res), [str(keep)], str(tmp_path / "sub"), **args)
    assert stand_in.requests == []  # nothing leaves the machine without --upload
    record = json.loads((tmp_path / "sub" / "leaderboard_record.json").read_text())
    fields = ["scale", "model", "dataset_size", "checkpoint", "batch_size", "learning_rate", "method_name", "author",
              "email", "hf_username", "hf_repo_name", "timestamp", "track", "writeup"]
    names = [t.name for t in TASKS if t.main_metric is not None]
    assert list(record) == fields + names  # DataComp's submit_to_firebase fields, then each main metric by name
    assert (record["scale"], record["model"], record["batch_size"], record["learning_rate"]) == \
        ("medium", "ViT-B-32", 4096, 5e-4)
    assert record["dataset_size"] == 128_000_000  # DataComp's fallback: the scale's samples seen
    assert record["checkpoint"] == str((run / "checkpoints" / "epoch_latest.pt").resolve())
    assert record["ImageNet 1k"] == round(0.1 + [t.key for t in TASKS].index("imagenet1k") / 100, 4)
    assert "FairFace" not in record and record["writeup"] is None
    files = sorted(p.relative_to(tmp_path / "sub").as_posix() for p in (tmp_path / "sub").rglob("*") if p.is_file())
    assert files == ["leaderboard_record.json", "medium_scale/checkpoint.pt", "medium_scale/results.jsonl",
                     "medium_scale/samples/mine.npy"]

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # the stand-in is on loopback
    done = submit(str(run), str(res), [str(keep)], str(tmp_path / "sub2"), do_upload=True,
                  dataset_size="keep-list", **args)
    (commit,) = stand_in.commits
    assert commit["repo"] == "alice/my-entry" and commit["summary"] == "Upload artifacts (medium scale)"
    assert sorted(commit["files"]) == ["medium_scale/checkpoint.pt", "medium_scale/results.jsonl",
                                       "medium_scale/samples/mine.npy"]
    assert commit["files"]["medium_scale/samples/mine.npy"] == keep.read_bytes()
    sent = json.loads((tmp_path / "sub2" / "leaderboard_record.json").read_text())
    key = f"alice__my-entry__{sent['timestamp']}".replace(".", "_")
    assert stand_in.records == {f"/db/{key}.json": sent} and done["key"] == key and sent["dataset_size"] == 2
    # a repository that does not exist: one clear line, and no record is sent
    from conceptprune.evaluation.package import SubmissionError

    with pytest.raises(SubmissionError, match="bob/other not found"):
        submit(str(run), str(res), [str(keep)], str(tmp_path / "sub3"), do_upload=True,
               **{**args, "hf_username": "bob", "hf_repo_name": "other"})
    assert len(stand_in.records) == 1
    # DataComp's own info.pkl is read too, without running code from it
    dc = tmp_path / "datacomp_run"
    dc.mkdir()
    info = {"scale": "small", "checkpoint": Path("/x/epoch_latest.pt"), "data_dir": Path("/d"),
            "scale_config": {"batch_size": 4096, "learning_rate": 5e-4, "train_num_samples": 12_800_000,
                             "warmup": 500, "model": "ViT-B-32", "beta2": None}}
    (dc / "info.pkl").write_bytes(pickle.dumps(info))
    assert training_info(dc) == info
    (dc / "info.pkl").write_bytes(pickle.dumps({"scale_config": {}, "x": os.system}))
    with pytest.raises(ConfigError, match="refusing to build"):
        read_info_pkl(dc / "info.pkl")


def test_a_member_unsafe_under_any_reading_of_its_headers_is_rejected(tmp_path):
    """A GNU long name and a pax path for one member: tar programs differ on which wins, so the
    member is rejected when either is unsafe (here Python's tarfile would say 000.jpg)."""
    data = _jpg(0)
    long_name = tarfile.TarInfo("././@LongLink")
    evil = b"../../evil.jpg\0"
    long_name.type, long_name.size = tarfile.GNUTYPE_LONGNAME, len(evil)
    with tarfile.open(tmp_path / "t.tar", "w", format=tarfile.GNU_FORMAT) as tf:
        tf.addfile(long_name, io.BytesIO(evil))  # the GNU long name record of the next member
    buf = bytearray((tmp_path / "t.tar").read_bytes()[:1024])  # header + data block, no end marker
    info = tarfile.TarInfo("000.jpg")
    info.size, info.pax_headers = len(data), {"path": "000.jpg"}
    pax_member = info.tobuf(tarfile.PAX_FORMAT)  # a pax header (path=000.jpg), then the member header
    block = data + bytes(-len(data) % 512)
    (tmp_path / "t.tar").write_bytes(bytes(pax_member[:-512]) + bytes(buf) + pax_member[-512:] + block
                                     + bytes(1024))
    with tarfile.open(tmp_path / "t.tar") as tf:
        assert tf.getnames() == ["000.jpg"]  # Python: the outermost record, the pax path
    unsafe = []
    assert list(iter_samples(tmp_path / "t.tar", unsafe)) == [] and unsafe == ["../../evil.jpg"]
