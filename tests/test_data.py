"""download (real img2dataset against a loopback HTTP server) -> embed (tiny random open_clip)
-> reshard, with no internet."""

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conceptprune import keeplist as K
from conceptprune import uids as U
from conceptprune.data.download import download
from conceptprune.data.reshard import reshard
from conceptprune.errors import ConfigError, PoolError
from conceptprune.pool import Pool
from conceptprune.slurm.stage import Executor

N = 60
BROKEN = {5, 17, 33}  # 404
SLOW = {21}  # answers after the client's timeout
NOT_IMAGE = {40}  # HTML


def _image_bytes(i: int) -> bytes:
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(i)
    im = Image.new("RGB", (48 + i % 7, 40 + i % 5), tuple(int(v) for v in rng.integers(0, 255, 3)))
    d = ImageDraw.Draw(im)
    d.ellipse([5, 5, 30, 30], fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    buf = io.BytesIO()
    im.save(buf, format="JPEG")
    return buf.getvalue()


class _Handler(BaseHTTPRequestHandler):
    log = Counter()

    def do_GET(self):
        i = int(self.path.strip("/").split(".")[0])
        _Handler.log[i] += 1
        if i in BROKEN:
            self.send_error(404)
            return
        if i in SLOW:
            time.sleep(3)
        if i in NOT_IMAGE:
            body, ctype = b"<html><body>not an image</body></html>", "text/html"
        else:
            body, ctype = _image_bytes(i), "image/jpeg"
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def log_message(self, *args):
        pass


@pytest.fixture
def image_server():
    _Handler.log = Counter()
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}", _Handler.log
    srv.shutdown()


def _metadata(folder: Path, base_url: str, n=N, files=2):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    uids = [f"{int(h):016x}{int(l):016x}" for h, l in zip(rng.integers(0, 2**63, n), rng.integers(0, 2**63, n))]
    df = pd.DataFrame({
        "uid": uids, "url": [f"{base_url}/{i}.jpg" for i in range(n)],
        "text": [f"a photo of thing number {i}" for i in range(n)],
        "original_width": [48] * n, "original_height": [40] * n,
        "face_bboxes": [[[0.1, 0.1, 0.5, 0.5]] if i % 10 == 0 else [] for i in range(n)],
    })
    for k, part in enumerate(np.array_split(np.arange(n), files)):
        df.iloc[part].to_parquet(folder / f"{k:032x}.parquet", index=False)
    return df


def _tar_uids(paths):
    out = []
    for p in paths:
        with tarfile.open(p) as tf:
            for m in tf.getmembers():
                if m.name.endswith(".json"):
                    out.append(json.loads(tf.extractfile(m).read())["uid"])
    return out


I2D = {"number_sample_per_shard": 8, "timeout": 1, "retries": 0}


def test_download_embed_reshard_end_to_end(tmp_path, image_server):
    base, log = image_server
    meta = _metadata(tmp_path / "meta", base)
    summary = download(tmp_path / "data", metadata_dir=tmp_path / "meta", processes=1, threads=4,
                       img2dataset_args=I2D, executor=Executor.create("local"))
    shards = tmp_path / "data" / "shards"
    tars = sorted(shards.glob("*.tar"))
    assert len(tars) == 8 and summary["shards"] == 8  # 2 files x ceil(30 / 8), numbered across files
    bad = BROKEN | SLOW | NOT_IMAGE
    downloaded = set(_tar_uids(tars))
    assert downloaded == {meta.uid[i] for i in range(N) if i not in bad}
    assert summary["successes"] == N - len(bad) and summary["count"] == N
    with tarfile.open(tars[0]) as tf:  # DataComp's layout: jpg, txt, json with the uid
        exts = Counter(m.name.rsplit(".", 1)[1] for m in tf.getmembers())
    assert exts["jpg"] == exts["txt"] == exts["json"] > 0

    # embed with a tiny random open_clip model (the command's Python function): the output is a
    # pool the filters read
    from conceptprune.data.embed import EmbedConfig, EmbedStage, embed

    totals = embed(EmbedConfig(str(shards), str(tmp_path / "emb"), "cp-tiny-vit", batch_size=16, text=True),
                   executor=Executor.create("local", workers=2))
    assert totals["embedded"] == N - len(bad) and totals["shards"] == len(tars)
    pool = Pool(tmp_path / "emb", embedding_key="img")
    assert pool.rows == N - len(bad) and pool.dim == 32
    assert set(U.array_to_uids(pool.read_uids())) == downloaded
    for chunk in pool.iter_chunks(["similarity_score"], embeddings=True):
        assert np.allclose(np.linalg.norm(chunk.embeddings, axis=1), 1, atol=1e-5)
    again = Executor.create("local").run(EmbedStage(str(tmp_path / "emb"), str(shards), "cp-tiny-vit"), 2)
    assert again.ran == []

    # reshard a keep-list: half of the metadata uids, some of which never downloaded
    keep_hex = [meta.uid[i] for i in range(0, N, 2)]
    K.write_keep_list(tmp_path / "keep.npy", U.uids_to_array(keep_hex))
    out = tmp_path / "resharded"
    m = reshard(shards, tmp_path / "keep.npy", out, shard_size=7, executor=Executor.create("local", workers=2))
    expected = set(keep_hex) & downloaded
    out_tars = sorted(out.glob("*.tar"))
    assert sorted(_tar_uids(out_tars)) == sorted(expected)
    assert [p.name for p in out_tars] == [f"{i:08d}.tar" for i in range(len(out_tars))]
    assert m["kept_samples"] == len(expected) and m["missing_from_shards"] == len(set(keep_hex) - downloaded)
    sizes = json.loads((out / "sizes.json").read_text())
    assert sum(sizes.values()) == len(expected) and all(v <= 7 for v in sizes.values())
    for t in out_tars:
        assert json.loads((out / f"{t.stem}_stats.json").read_text())["count"] == sizes[t.name]
    assert (out / "sample_ids.npy").read_bytes() == (tmp_path / "keep.npy").read_bytes()

    # open_clip's own webdataset loader reads the output
    from open_clip_train.data import get_wds_dataset
    from open_clip_train.params import parse_args

    from conceptprune.models import register

    register()
    import open_clip

    _, _, preprocess = open_clip.create_model_and_transforms("cp-tiny-vit")
    args = parse_args(["--train-data", str(out / ("{00000000..%08d}.tar" % (len(out_tars) - 1))),
                       "--train-num-samples", str(len(expected)), "--batch-size", "2", "--workers", "1",
                       "--dataset-type", "webdataset"])
    args.world_size, args.rank = 1, 0
    data = get_wds_dataset(args, preprocess, is_train=True, epoch=0, tokenizer=open_clip.get_tokenizer("cp-tiny-vit"))
    seen = sum(images.shape[0] for images, texts in data.dataloader)
    assert seen >= len(expected) - 2  # open_clip drops a last partial batch per worker

    # resume/refusal rules
    again = reshard(shards, tmp_path / "keep.npy", out, shard_size=7, executor=Executor.create("local", workers=2))
    assert again == m
    with pytest.raises(ConfigError, match="not empty"):
        reshard(shards, tmp_path / "keep.npy", tmp_path / "meta", executor=Executor.create("local"))


def test_download_killed_midway_resumes_without_refetching(tmp_path, image_server):
    base, log = image_server
    _metadata(tmp_path / "meta", base, n=96, files=1)
    shards = tmp_path / "data" / "shards"
    code = (
        "import sys; from conceptprune.data.download import download\n"
        "from conceptprune.slurm.stage import Executor\n"
        f"download(r'{tmp_path / 'data'}', metadata_dir=r'{tmp_path / 'meta'}', processes=1, threads=1,\n"
        f"         img2dataset_args={I2D!r}, executor=Executor.create('local'))\n")
    proc = subprocess.Popen([sys.executable, "-c", code], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.time()
    while len(list(shards.glob("*_stats.json"))) < 3 and time.time() - t0 < 120:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = {int(p.name.split("_")[0]) for p in shards.glob("*_stats.json")}
    assert 3 <= len(finished) < 12, finished
    before = Counter(log)
    summary = download(tmp_path / "data", metadata_dir=tmp_path / "meta", processes=1, threads=4,
                       img2dataset_args=I2D, executor=Executor.create("local"))
    assert summary["shards"] == 12 and summary["shards_missing"] == 0
    refetched = {i for i in log if log[i] > before[i]}
    done_rows = {s * 8 + j for s in finished for j in range(8)}
    assert not refetched & done_rows  # finished shards were not downloaded again
    assert len(_tar_uids(sorted(shards.glob("*.tar")))) == 96 - len([i for i in BROKEN | SLOW | NOT_IMAGE if i < 96])


def test_reshard_rejects_unsafe_members_and_missing_shards(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    uid = "ab" * 16

    def add(tf, name, data):
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))

    with tarfile.open(shards / "00000000.tar", "w") as tf:
        add(tf, "000.jpg", _image_bytes(0))
        add(tf, "000.json", json.dumps({"uid": uid}).encode())
        add(tf, "000.txt", b"ok")
        add(tf, "../evil.json", json.dumps({"uid": uid}).encode())
        add(tf, "/abs/evil.txt", b"x")
    (shards / "00000000_stats.json").write_text("{}")
    K.write_keep_list(tmp_path / "k.npy", U.uids_to_array([uid]))
    m = reshard(shards, tmp_path / "k.npy", tmp_path / "out", executor=Executor.create("inline"))
    assert m["unsafe_members_rejected"] == 2 and m["kept_samples"] == 1
    with tarfile.open(tmp_path / "out" / "00000000.tar") as tf:
        assert sorted(tf.getnames()) == ["000.jpg", "000.json", "000.txt"]
    assert not (tmp_path / "evil.json").exists()
    (shards / "00000001_stats.json").write_text("{}")
    with pytest.raises(PoolError, match="00000001.tar is missing"):
        reshard(shards, tmp_path / "k.npy", tmp_path / "out2", executor=Executor.create("inline"))


def test_sample_uid_reads_flat_jsons_fast_and_odd_ones_by_parsing():
    from conceptprune.tars import Sample

    uid = "0123456789abcdef0123456789ABCDEF"
    assert Sample("k", {"json": json.dumps({"caption": "x", "uid": uid}).encode()}).uid() == uid
    assert Sample("k", {"json": b'{"uid" : "%s"}' % uid.encode()}).uid() == uid
    # two "uid" keys (one nested): the parser decides, and the top-level one wins
    nested = {"meta": {"uid": "f" * 32}, "uid": uid}
    assert Sample("k", {"json": json.dumps(nested).encode()}).uid() == uid
    assert Sample("k", {"json": json.dumps({"meta": {"uid": "f" * 32}, "x": {"uid": 1}}).encode()}).uid() == ""
    assert Sample("k", {"json": b"[1, 2]"}).uid() == ""
    assert Sample("k", {"json": b'{"uid": 7}'}).uid() == ""
    assert Sample("k", {"txt": b"no json"}).uid() == ""
    with pytest.raises(json.JSONDecodeError):
        Sample("k", {"json": b'{"uid": "abc", broken'}).uid()
