"""Issue 27 ("nothing lost, round two"): hostile input and races on downloads, submission,
reports, filters' reusable state and the keep-list tools.

Each test names the item it guards; each failed on the code before its fix. The download and
submission tests talk to real loopback HTTP servers through the real clients.
"""

from __future__ import annotations

import hashlib
import json
import threading
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from conceptprune.cli import main
from conceptprune.slurm.stage import Executor
from tests.test_eval_data import FakeHub, _jpeg, _parquet, _image_type, online, wds_repo  # noqa: F401


def _cli(capsys, *argv):
    capsys.readouterr()
    rc = main(["--quiet", *map(str, argv)])
    out, err = capsys.readouterr()
    return rc, out, err.strip().splitlines()


def _refused(capsys, *argv, match: str) -> str:
    """The command fails with exit code 2 and exactly one stderr line containing ``match``."""
    rc, out, err = _cli(capsys, *argv)
    assert rc == 2 and len(err) == 1 and match in err[0], (rc, out, err)
    return err[0]


class _Proxy:
    """A loopback mirror in front of a FakeHub that rewrites chosen answers: ``edit(path, body)``
    returns the body to send (a hostile or broken mirror)."""

    def __init__(self, upstream: str, edit):
        self.upstream, self.edit = upstream, edit

    def __enter__(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _go(self, head=False):
                req = urllib.request.Request(proxy.upstream + self.path, method=self.command,
                                             headers={k: v for k, v in self.headers.items() if k.lower() == "range"})
                try:
                    with urllib.request.urlopen(req) as r:
                        code, headers, body = r.status, dict(r.headers), r.read()
                except urllib.error.HTTPError as e:
                    code, headers, body = e.code, dict(e.headers), e.read()
                body = proxy.edit(self.path, body)
                self.send_response(code)
                for k, v in headers.items():
                    if k.lower() not in ("content-length", "transfer-encoding", "connection", "date", "server"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(body) if not head else headers.get("Content-Length", 0)))
                self.end_headers()
                if not head:
                    self.wfile.write(body)

            def do_GET(self):
                self._go()

            def do_HEAD(self):
                self._go(head=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


# -- 1: a listing path that leaves --data-dir ---------------------------------------------------


def test_1_download_never_touches_a_file_a_listing_puts_outside_the_data_dir(online, tmp_path):
    from conceptprune.evaluation.download import download

    data = tmp_path / "a" / "data"
    data.mkdir(parents=True)
    victim = tmp_path / "a" / "victim.txt"  # beside the data folder: wds_cifar10_test/../../victim.txt
    victim.write_text("mine")
    extra = {"type": "file", "path": "../../victim.txt", "size": 6, "oid": "0" * 40}
    seen = {"n": 0}

    def edit(path, body):  # the first tree listing (the one the checksums are taken from) names ../../victim.txt
        if "/tree/" in path and seen["n"] == 0:
            seen["n"] += 1
            return json.dumps(json.loads(body) + [extra]).encode()
        return body

    with FakeHub({"djghosh/wds_cifar10_test": {"main": wds_repo(1)}}) as hub, _Proxy(hub.url, edit) as mirror:
        res = download(data, ["cifar10"], endpoint=mirror.url)
    assert victim.read_text() == "mine"
    assert "../../victim.txt" in res["errors"]["cifar10"] and "would leave" in res["errors"]["cifar10"]
    assert not (data / "wds_cifar10_test").exists()  # refused before anything was fetched


# -- 2: an image given as a path reference in a downloaded table --------------------------------


def test_2_downloaded_row_with_an_image_path_is_refused_not_read(online, tmp_path):
    import pyarrow as pa

    from conceptprune.evaluation.download import download

    secret = tmp_path / "secret.jpg"
    secret.write_bytes(_jpeg(1))
    images = [{"bytes": _jpeg(2), "path": None}, {"bytes": None, "path": str(secret)}]
    table = pa.table({"image": pa.array(images, _image_type()),
                      "caption": pa.array([["a"], ["b"]], pa.list_(pa.string()))})
    repo = {"main": {"README.md": b"# card\n", "data/test-00000-of-00001.parquet": _parquet(table)}}
    key = "retrieval/flickr_1k_test_image_text_retrieval"
    with FakeHub({"nlphuji/flickr_1k_test_image_text_retrieval": repo}) as hub:
        err = download(tmp_path / "data", [key], endpoint=hub.url)["errors"][key]
    assert "row 1" in err and "path" in err, err
    assert not (tmp_path / "data" / "retrieval-flickr_1k_test_image_text_retrieval").exists()


# -- 3, 18: evaluate submit --------------------------------------------------------------------


def _datacomp_run(root: Path, checkpoint) -> Path:
    """A run folder as DataComp's train.py leaves it: info.pkl (plain values) and a checkpoint."""
    import pickle

    import torch

    run = root / "run"
    (run / "checkpoints").mkdir(parents=True)
    torch.save({"epoch": 1}, run / "checkpoints" / "epoch_latest.pt")
    info = {"scale": "small", "checkpoint": checkpoint(run), "data_dir": Path("/d"),
            "scale_config": {"batch_size": 4096, "learning_rate": 5e-4, "train_num_samples": 12_800_000,
                             "warmup": 500, "model": "ViT-B-32", "beta2": None}}
    (run / "info.pkl").write_bytes(pickle.dumps(info))
    return run


def _submission(tmp_path):
    from tests.test_dropin import _keep, _results_file, _uid

    res = _results_file(tmp_path / "eval_results.jsonl")
    keep = _keep(tmp_path / "mine.npy", [_uid(0, 1), _uid(0, 2)])
    return res, keep


SUBMIT_ARGS = dict(method_name="my filter", author="Alice", email="a@example.org", hf_username="alice",
                   hf_repo_name="my-entry", track="filtering")


def test_3_submit_uploads_only_the_runs_own_checkpoint(tmp_path):
    from conceptprune.errors import ConceptPruneError
    from conceptprune.evaluation.package import submit

    secret = tmp_path / "secret.txt"
    secret.write_text("root:x:0:0\n")
    run = _datacomp_run(tmp_path, lambda run: secret)
    res, keep = _submission(tmp_path)
    with pytest.raises(ConceptPruneError, match="outside"):
        submit(str(run), str(res), [str(keep)], str(tmp_path / "sub"), upload_checkpoint=True, **SUBMIT_ARGS)
    assert not (tmp_path / "sub").exists()
    # inside the run folder but not a checkpoint
    (run / "checkpoints" / "notes.txt").write_text("hello")
    run2 = _datacomp_run(tmp_path / "b", lambda run: run / "checkpoints" / "notes.txt")
    (run2 / "checkpoints" / "notes.txt").write_text("hello")
    with pytest.raises(ConceptPruneError, match="not a checkpoint"):
        submit(str(run2), str(res), [str(keep)], str(tmp_path / "sub"), upload_checkpoint=True, **SUBMIT_ARGS)
    # the run's own checkpoint goes in
    run3 = _datacomp_run(tmp_path / "c", lambda run: run / "checkpoints" / "epoch_latest.pt")
    done = submit(str(run3), str(res), [str(keep)], str(tmp_path / "sub"), upload_checkpoint=True, **SUBMIT_ARGS)
    assert (Path(done["bundle"]) / "checkpoint.pt").read_bytes() == (run3 / "checkpoints" / "epoch_latest.pt").read_bytes()


@pytest.mark.parametrize("field,value", [("hf_username", "alice/x"), ("hf_repo_name", "entry?x=1"),
                                         ("hf_repo_name", "a#b"), ("hf_username", "../admin"),
                                         ("hf_repo_name", "x" * 97)])
def test_3_submit_refuses_names_that_are_not_hugging_face_names(tmp_path, capsys, field, value):
    run = _datacomp_run(tmp_path, lambda run: run / "checkpoints" / "epoch_latest.pt")
    res, keep = _submission(tmp_path)
    args = {**SUBMIT_ARGS, field: value}
    _refused(capsys, "evaluate", "submit", "--run", run, "--results", res, "--keep-list", keep,
             "--out", tmp_path / "sub", "--method-name", args["method_name"], "--author", args["author"],
             "--email", args["email"], "--hf-username", args["hf_username"], "--hf-repo-name", args["hf_repo_name"],
             "--track", "filtering", match="--" + field.replace("_", "-"))
    assert not (tmp_path / "sub").exists()


def test_18_submit_checks_the_notification_before_any_upload_and_reruns_record_once(tmp_path, monkeypatch):
    import huggingface_hub.constants

    from tests.test_dropin import _HubAndDb
    from conceptprune.evaluation.package import submit

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # the stand-in is on loopback
    run = _datacomp_run(tmp_path, lambda run: run / "checkpoints" / "epoch_latest.pt")
    res, keep = _submission(tmp_path)
    rows = [json.loads(x) for x in res.read_text().splitlines()]
    for r in rows:  # ImageNet's main metric, but no acc1 entry
        if r["key"] == "imagenet1k":
            r["metrics"] = {"main_metric": 0.5}
    res.write_text("".join(json.dumps(r) + "\n" for r in rows))
    hub = _HubAndDb()
    args = dict(SUBMIT_ARGS, hf_endpoint=hub.url, db_url=hub.url + "/db", token="hf_test", do_upload=True,
                notify_url=hub.url + "/hook")
    done = submit(str(run), str(res), [str(keep)], str(tmp_path / "sub"), **args)
    assert len(hub.commits) == 1 and "/hook" in hub.records and "ImageNet accuracy: 0.500" in hub.records["/hook"]["text"]
    assert [k for k in hub.records if k.startswith("/db/")] == [f"/db/{done['key']}.json"]
    # the same submission again: nothing is committed or recorded a second time
    again = submit(str(run), str(res), [str(keep)], str(tmp_path / "sub"), **args)
    assert again["key"] == done["key"] and len(hub.commits) == 1
    assert sum(1 for m, p in hub.requests if m == "PUT") == 2
    # a notification that cannot be built stops the submission before any network call
    for r in rows:
        if r["key"] == "imagenet1k":
            r["metrics"] = {}
    res.write_text("".join(json.dumps(r) + "\n" for r in rows))
    n = len(hub.requests)
    with pytest.raises(Exception, match="imagenet1k"):
        submit(str(run), str(res), [str(keep)], str(tmp_path / "sub2"), **args)
    assert len(hub.requests) == n


def test_20_submit_out_equal_to_an_input_is_one_line(tmp_path, capsys):
    run = _datacomp_run(tmp_path, lambda run: run / "checkpoints" / "epoch_latest.pt")
    res, keep = _submission(tmp_path)
    before = res.read_bytes()
    for out in (res, tmp_path / "o"):
        if out != res:  # the results file already where the bundle puts it
            (out / "small_scale").mkdir(parents=True)
            res = Path(__import__("shutil").copy(res, out / "small_scale" / "results.jsonl"))
        _refused(capsys, "evaluate", "submit", "--run", run, "--results", res, "--keep-list", keep, "--out", out,
                 "--method-name", "m", "--author", "a", "--email", "e@x.org", "--hf-username", "alice",
                 "--hf-repo-name", "r", "--track", "filtering", match=str(out))
        assert res.read_bytes() == before


def test_20_info_pkl_without_model_is_one_line(tmp_path, capsys):
    import pickle

    run = _datacomp_run(tmp_path, lambda run: run / "checkpoints" / "epoch_latest.pt")
    info = pickle.loads((run / "info.pkl").read_bytes())
    del info["scale_config"]["model"]
    (run / "info.pkl").write_bytes(pickle.dumps(info))
    res, keep = _submission(tmp_path)
    _refused(capsys, "evaluate", "submit", "--run", run, "--results", res, "--keep-list", keep, "--out", tmp_path / "o",
             "--method-name", "m", "--author", "a", "--email", "e@x.org", "--hf-username", "alice",
             "--hf-repo-name", "r", "--track", "filtering", match="model")


# -- 5, 6: a filter's reusable parts ---------------------------------------------------------------

import os  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

from conceptprune import keeplist as K  # noqa: E402
from conceptprune import uids as U  # noqa: E402


def _tiny_pool(path, rows=600, files=2, seed=1):
    from conceptprune.synthetic import SyntheticPoolConfig, make_pool

    make_pool(path, SyntheticPoolConfig(rows=rows, files=files, seed=seed, concepts=4, block_rows=100,
                                        embedding_keys=("l14_img",)), progress=False)
    return path


def _pool_uids(pool) -> list[str]:
    import pyarrow.parquet as pq

    return [u for f in sorted(Path(pool).glob("*.parquet")) for u in pq.read_table(f, columns=["uid"])["uid"].to_pylist()]


def _save_list(path, uids) -> Path:
    arr = U.uids_to_array(list(uids))
    arr.sort()
    np.save(path, arr)
    return path


def test_6_rows_filter_never_reuses_parts_of_a_within_list_changed_in_place(tmp_path, capsys):
    pool = _tiny_pool(tmp_path / "pool")
    uids = _pool_uids(pool)
    within = _save_list(tmp_path / "prev.npy", uids[:300] + ["f" * 32])  # one uid not in the pool
    out = tmp_path / "keep.npy"
    argv = ("filter", "clip-score", "--pool", pool, "--out", out, "--threshold", "-1", "--within", within)
    _refused(capsys, *argv, match="not in the pool")
    _save_list(within, uids[300:])  # the list fixed in place: other uids, same path
    rc, _, err = _cli(capsys, *argv)
    assert rc == 0, err
    assert set(U.array_to_uids(K.read_keep_list(out))) == set(uids[300:])


_RACE = r"""
import sys
from conceptprune.cli import main
from conceptprune.slurm.stage import Executor
sys.exit(main(sys.argv[1:]))
"""


def test_5_two_filters_given_one_out_run_one_after_the_other(tmp_path):
    """Run A is stopped in the middle of its parts; run B, same --out, other parameters, must wait
    for it (it shared A's KEEP.parts/ and removed them), then each run's list is its own."""
    pool = _tiny_pool(tmp_path / "pool", rows=4000, files=4)
    out = tmp_path / "keep.npy"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]) + os.pathsep + os.environ.get("PYTHONPATH", "")}

    def start(threshold):
        return subprocess.Popen([sys.executable, "-c", _RACE, "--quiet", "filter", "clip-score", "--pool", str(pool),
                                 "--out", str(out), "--threshold", str(threshold), "--overwrite", "--workers", "2",
                                 "--executor", "local"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                start_new_session=True)

    a = start(0.25)
    parts = out.with_suffix(".parts")
    t0 = time.time()
    while not any(parts.rglob("*.kept.bin")) and a.poll() is None and time.time() - t0 < 120:
        time.sleep(0.002)
    os.killpg(a.pid, signal.SIGSTOP)  # A and its workers, half-way through the parts
    try:
        assert not out.exists(), "A finished before it could be stopped; the race was not set up"
        b = start(0.3)
        t0, waited = time.time(), ""
        while b.poll() is None and time.time() - t0 < 120:
            if (lock := out.parent / f".{out.name}.lock").exists() and "waiting" in (waited := _peek(b)):
                break
            time.sleep(0.1)
        assert b.poll() is None, f"B ran while A held the output: rc {b.returncode} {b.stderr.read()}"
    finally:
        os.killpg(a.pid, signal.SIGCONT)
    ra = a.communicate(timeout=120)
    rb = b.communicate(timeout=120)
    assert a.returncode == 0 and b.returncode == 0, (ra, rb)
    man = json.loads(K.manifest_path(out).read_text())
    assert man["params"]["threshold"] == 0.3  # B ran last, on its own parts
    want = _pool_scores_at_least(pool, 0.3)
    assert set(U.array_to_uids(K.read_keep_list(out))) == want


def _peek(proc) -> str:
    """What a running process wrote to stderr so far (non-blocking)."""
    import fcntl as F

    fd = proc.stderr.fileno()
    F.fcntl(fd, F.F_SETFL, F.fcntl(fd, F.F_GETFL) | os.O_NONBLOCK)
    try:
        chunk = os.read(fd, 1 << 16).decode(errors="replace")
    except BlockingIOError:
        chunk = ""
    proc._peeked = getattr(proc, "_peeked", "") + chunk
    return proc._peeked


def _pool_scores_at_least(pool, t) -> set[str]:
    import pyarrow.parquet as pq

    out = set()
    for f in sorted(Path(pool).glob("*.parquet")):
        tab = pq.read_table(f, columns=["uid", "clip_l14_similarity_score"]).to_pydict()
        out |= {u for u, s in zip(tab["uid"], tab["clip_l14_similarity_score"]) if s >= t}
    return out


def _blur_inputs(tmp_path, boxes):
    """One shard of 3 samples and metadata parquet with face boxes (``boxes``: one list a uid)."""
    import io as _io

    import pandas as pd
    from PIL import Image

    from conceptprune.tars import Sample, ShardWriter

    d = tmp_path / "shards"
    d.mkdir(exist_ok=True)
    u = [f"{i + 1:032x}" for i in range(len(boxes))]
    buf = _io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, format="JPEG")
    w = ShardWriter(d / "00000000.tar")
    for i in range(len(boxes)):
        w.write(Sample(f"{i:03d}", {"jpg": buf.getvalue(), "txt": b"x", "json": json.dumps({"uid": u[i]}).encode()}))
    w.close()
    (d / "00000000_stats.json").write_text("{}")
    meta = tmp_path / "metadata"
    meta.mkdir(exist_ok=True)
    pd.DataFrame({"uid": u, "face_bboxes": boxes}).to_parquet(meta / "0.parquet")
    return d, meta, _save_list(tmp_path / "k.npy", u)


def test_6_reshard_blur_state_is_keyed_by_the_metadata_content_not_its_path(tmp_path):
    from conceptprune.data.reshard import reshard
    from conceptprune.errors import ConfigError

    d, meta, keep = _blur_inputs(tmp_path, [[[0.0, 0.0, 0.5, 0.5]], [], []])
    m = reshard(d, keep, tmp_path / "out", executor=Executor.create("inline"), blur_metadata=meta)
    assert m["blurred"] == 1
    _blur_inputs(tmp_path, [[[0.0, 0.0, 0.5, 0.5]], [[0.1, 0.1, 0.9, 0.9]], [[0.2, 0.2, 0.4, 0.4]]])  # in place
    with pytest.raises(ConfigError, match="not empty"):  # was: 'already complete', the old blur returned
        reshard(d, keep, tmp_path / "out", executor=Executor.create("inline"), blur_metadata=meta)
    assert reshard(d, keep, tmp_path / "out", executor=Executor.create("inline"), blur_metadata=meta, overwrite=True)["blurred"] == 3


# -- 7, 8, 9, 14: report and explain over a chain ----------------------------------------------------


def _experiment(root: Path, capsys, seed=1, rows=600):
    """An experiment folder as a user makes it, from inside it: pool/, a.npy (clip-score), b.npy (within a)."""
    root.mkdir(parents=True, exist_ok=True)
    _tiny_pool(root / "pool", rows=rows, seed=seed)
    cwd = os.getcwd()
    os.chdir(root)
    try:
        for argv in (("filter", "clip-score", "--pool", "pool", "--out", "a.npy", "--threshold", "0.2"),
                     ("filter", "clip-score", "--pool", "pool", "--out", "b.npy", "--threshold", "0.3",
                      "--within", "a.npy")):
            rc, _, err = _cli(capsys, *argv)
            assert rc == 0, err
    finally:
        os.chdir(cwd)
    return root


def test_7_report_resolves_manifest_paths_next_to_the_manifest_not_the_cwd(tmp_path, capsys, monkeypatch):
    from conceptprune.report.chain import load_chain

    a = _experiment(tmp_path / "expA", capsys, seed=1, rows=600)
    _experiment(tmp_path / "expB", capsys, seed=2, rows=900)
    monkeypatch.chdir(tmp_path / "expB")  # another experiment's folder: its pool/ and a.npy
    chain = load_chain([a / "a.npy", a / "b.npy"])
    assert chain.pool_dir.resolve() == (a / "pool").resolve() and chain.pool_rows == 600
    assert chain.steps[1].within.resolve() == (a / "a.npy").resolve()


def test_8_report_refuses_a_list_its_manifest_does_not_describe(tmp_path, capsys):
    import shutil

    a = _experiment(tmp_path / "exp", capsys)
    shutil.copy(a / "a.npy", a / "b.npy")  # a list copied over b.npy: b's manifest no longer describes it
    _refused(capsys, "report", a / "a.npy", a / "b.npy", "--out", tmp_path / "r", match="b.npy")


def test_8_report_refuses_steps_in_the_wrong_order_or_from_other_pools(tmp_path, capsys):
    a = _experiment(tmp_path / "expA", capsys, seed=1)
    b = _experiment(tmp_path / "expB", capsys, seed=2, rows=900)
    _refused(capsys, "report", a / "b.npy", a / "a.npy", "--out", tmp_path / "r", match="a.npy")
    _refused(capsys, "report", a / "a.npy", b / "b.npy", "--out", tmp_path / "r", match="pool")
    _refused(capsys, "report", a / "a.npy", "--compare", b / "a.npy", "--out", tmp_path / "r", match="pool")


def test_9_explain_never_says_kept_when_no_step_kept_it(tmp_path, capsys):
    a = _experiment(tmp_path / "exp", capsys)
    outside = sorted(set(_pool_uids(a / "pool")) - set(U.array_to_uids(K.read_keep_list(a / "a.npy"))))[0]
    for extra in ((), ("--json",)):
        rc, out, err = _cli(capsys, "explain", outside, "--chain", a / "b.npy", *extra)
        assert rc == 0, err
        assert "kept by every step" not in out and "not a candidate" in out, out


def test_14_funnel_counts_entries_and_distinct_uids_of_an_upsampled_list(tmp_path, capsys):
    from conceptprune.report.html import funnel
    from conceptprune.report.chain import load_chain

    a = _experiment(tmp_path / "exp", capsys)
    rc, _, err = _cli(capsys, "keep-list", "concat", a / "b.npy", a / "b.npy", "--out", a / "up.npy")
    n = len(K.read_keep_list(a / "b.npy"))
    up = K.read_keep_list(a / "up.npy", multiset=True)
    assert rc == 0 and len(up) == 2 * n, (err, len(up), n)
    row = funnel(load_chain([a / "up.npy"]))[-1]
    assert (row["entries"], row["kept"]) == (2 * n, n)


# -- 4, 19, 20: the uid index and thumbnails never go into the input shards ---------------------


def _shards_of(pool, out, rows=40):
    from conceptprune.synthetic import write_shards

    write_shards(pool, out, rows=np.arange(rows), per_shard=15, progress=False)
    return out


def _tree(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.stat().st_mtime_ns for p in folder.rglob("*")}


def test_4_report_and_explain_leave_the_input_shards_as_they_were(tmp_path, capsys):
    a = _experiment(tmp_path / "exp", capsys)
    shards = _shards_of(a / "pool", tmp_path / "shards")
    before = _tree(shards)
    rc, _, err = _cli(capsys, "report", a / "a.npy", a / "b.npy", "--shards", shards, "--out", tmp_path / "r")
    assert rc == 0, err
    assert (tmp_path / "r" / "uid_index" / "index.json").is_file()  # under --out
    uid = _pool_uids(a / "pool")[3]
    rc, out, err = _cli(capsys, "explain", uid, "--chain", a / "a.npy", "--shards", shards, "--index", tmp_path / "cache",
                        "--json")
    assert rc == 0, err
    res = json.loads(out)
    assert res["sample"]["image"].startswith(str(tmp_path / "cache")) and (tmp_path / "cache" / "index.json").is_file()
    assert _tree(shards) == before


def test_19_non_hex_uid_in_a_shard_is_skipped_and_counted_not_fatal(tmp_path, capsys, caplog):
    from conceptprune.report.index import build_index
    from conceptprune.tars import Sample, ShardWriter

    a = _experiment(tmp_path / "exp", capsys)
    shards = _shards_of(a / "pool", tmp_path / "shards", rows=15)
    w = ShardWriter(shards / "00000009.tar")
    w.write(Sample("bad", {"jpg": _jpeg(1), "txt": b"x", "json": json.dumps({"uid": "not-a-uid"}).encode()}))
    w.close()
    idx = build_index(shards, tmp_path / "idx")
    assert len(idx) == 15 and idx.stats["skipped"] == 1
    assert "1 sample(s) left out" in caplog.text


def test_19_explain_escapes_control_characters_of_captions(tmp_path, capsys):
    from conceptprune.tars import Sample, ShardWriter

    a = _experiment(tmp_path / "exp", capsys)
    shards = tmp_path / "shards"
    shards.mkdir()
    uid = _pool_uids(a / "pool")[0]
    w = ShardWriter(shards / "00000000.tar")
    w.write(Sample("s0", {"jpg": _jpeg(1), "txt": b"cap \x1b]0;owned\x07 \x1b[31mred\x1b[0m",
                          "json": json.dumps({"uid": uid}).encode()}))
    w.close()
    rc, out, err = _cli(capsys, "explain", uid, "--chain", a / "a.npy", "--shards", shards, "--index", tmp_path / "i")
    assert rc == 0, err
    assert "\x1b" not in out and "\x07" not in out and "\\x1b" in out


def test_20_a_damaged_uid_index_is_rebuilt(tmp_path, capsys):
    from conceptprune.report.index import build_index

    a = _experiment(tmp_path / "exp", capsys)
    shards = _shards_of(a / "pool", tmp_path / "shards")
    folder = tmp_path / "idx"
    build_index(shards, folder)
    for damage in (lambda: (folder / "index.json").write_text("{not json"),
                   lambda: (folder / "index.json").write_text("[1, 2]"),
                   lambda: (folder / "loc.npy").write_bytes((folder / "loc.npy").read_bytes()[:200])):
        damage()
        idx = build_index(shards, folder)
        assert len(idx) == 40 and idx.read(_pool_uids(a / "pool")[7]) is not None


# -- 13: empty results -----------------------------------------------------------------------------


def test_13_keep_list_tools_refuse_an_empty_result_unless_allow_empty(tmp_path, capsys):
    a = _save_list(tmp_path / "a.npy", [f"{i:032x}" for i in range(1, 5)])
    (tmp_path / "empty.txt").write_text("\n")
    _refused(capsys, "keep-list", "diff", a, a, "--out", tmp_path / "d.npy", match="empty")
    _refused(capsys, "keep-list", "from-uids", tmp_path / "empty.txt", "--out", tmp_path / "f.npy", match="empty")
    assert not (tmp_path / "d.npy").exists() and not (tmp_path / "f.npy").exists()
    rc, _, err = _cli(capsys, "keep-list", "diff", a, a, "--out", tmp_path / "d.npy", "--allow-empty")
    assert rc == 0 and len(K.read_keep_list(tmp_path / "d.npy")) == 0, err


def test_13_reshard_refuses_an_empty_list_and_a_list_that_matches_no_sample(tmp_path, capsys):
    d, meta, keep = _blur_inputs(tmp_path, [[], [], []])
    empty = tmp_path / "empty.npy"
    np.save(empty, np.empty(0, U.UID_DTYPE))
    other = _save_list(tmp_path / "other.npy", [f"{i:032x}" for i in range(100, 150)])  # another pool's uids
    _refused(capsys, "reshard", "--shards", d, "--keep", empty, "--out", tmp_path / "o1", "--executor", "inline",
             match="empty")
    err = _refused(capsys, "reshard", "--shards", d, "--keep", other, "--out", tmp_path / "o2", "--executor", "inline",
                   match="none of its 50 uids")
    assert "3 samples" in err
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()
    assert not any(tmp_path.glob("o2*"))  # nor its job state
    rc, _, err = _cli(capsys, "reshard", "--shards", d, "--keep", other, "--out", tmp_path / "o3", "--executor", "inline",
                      "--allow-empty")
    assert rc == 0, err


# -- 17: reshard --blur ----------------------------------------------------------------------------


def test_17_blur_skips_and_counts_bad_boxes_and_never_asks_pypi(tmp_path, monkeypatch, caplog):
    from conceptprune.data.reshard import reshard

    monkeypatch.delenv("NO_ALBUMENTATIONS_UPDATE", raising=False)
    nan = float("nan")
    d, meta, keep = _blur_inputs(tmp_path, [[[0.0, 0.0, 0.5, 0.5]], [[nan, 0.1, 0.5, 0.5]],
                                            [[0.1, 0.2], [0.2, 0.2, 0.6, float("inf")], [0.1, 0.1, 0.4, 0.4]]])
    m = reshard(d, keep, tmp_path / "out", executor=Executor.create("inline"), blur_metadata=meta)
    assert m["blurred"] == 2 and m["kept_samples"] == 3
    assert "3 face box(es) skipped" in caplog.text and "uid 00000000000000000000000000000002" in caplog.text
    assert os.environ.get("NO_ALBUMENTATIONS_UPDATE") == "1"


# -- 16: an output that will not fit ------------------------------------------------------------


def _big_sample_shard(tmp_path, size=1 << 20):
    from conceptprune.tars import Sample, ShardWriter

    d = tmp_path / "shards"
    d.mkdir()
    uid = f"{1:032x}"
    w = ShardWriter(d / "00000000.tar")
    w.write(Sample("000", {"jpg": os.urandom(size), "txt": b"x", "json": json.dumps({"uid": uid}).encode()}))
    w.close()
    (d / "00000000_stats.json").write_text(json.dumps({"count": 1, "successes": 1}))
    return d, uid


def _limited(limit=4 << 20):
    """preexec_fn: no file beyond ``limit`` bytes (EFBIG, as on a full disk): a test of a refusal never
    fills the real disk, on any code."""
    import resource

    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_16_reshard_refuses_an_output_larger_than_the_free_space(tmp_path):
    import shutil

    d, uid = _big_sample_shard(tmp_path)
    free = shutil.disk_usage(tmp_path).free
    keep = tmp_path / "up.npy"
    np.save(keep, np.repeat(U.uids_to_array([uid]), free // (1 << 20) * 2 + 10))  # one uid, upsampled past the disk
    r = subprocess.run([sys.executable, "-c", _RACE, "--quiet", "reshard", "--shards", str(d), "--keep", str(keep),
                        "--out", str(tmp_path / "o"), "--executor", "inline"],
                       capture_output=True, text=True, preexec_fn=_limited(), timeout=120)
    err = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(err) == 1 and "free" in err[0] and "--force" in err[0], r.stderr
    assert not any(tmp_path.glob("o*"))


def test_16_a_full_disk_names_the_file_and_leaves_no_state(tmp_path):
    d, uid = _big_sample_shard(tmp_path, size=300_000)
    keep = tmp_path / "up.npy"
    np.save(keep, np.repeat(U.uids_to_array([uid]), 8))  # 2.4 MB of output, the limit is 1 MiB

    r = subprocess.run([sys.executable, "-c", _RACE, "--quiet", "reshard", "--shards", str(d), "--keep", str(keep),
                        "--out", str(tmp_path / "o"), "--executor", "inline", "--shard-size", "100"],
                       capture_output=True, text=True, preexec_fn=_limited(1 << 20), timeout=120)
    err = [x for x in r.stderr.strip().splitlines() if " INFO " not in x]
    assert r.returncode == 2 and len(err) == 1 and "cannot write" in err[0] and ".tar" in err[0], r.stderr
    assert not any(tmp_path.glob("o*")), list(tmp_path.iterdir())


# -- 15: a truncated --lid-model is one line, in bounded memory, never a crash -----------------


@pytest.mark.parametrize("size", [20, 100_000])
def test_15_truncated_lid_model_is_refused_before_it_is_loaded(small_pool, tmp_path, capsys, size):
    from conceptprune.filters.langid import bundled_model_path

    bad = tmp_path / f"lid_{size}.ftz"
    bad.write_bytes(bundled_model_path().read_bytes()[:size])  # 20 B: SIGFPE in-process; 100 kB: 4.3 GB, bad_alloc
    line = _refused(capsys, "filter", "basic", "--pool", small_pool, "--out", tmp_path / "b.npy", "--lid-model", bad,
                    match=f"--lid-model {bad}: not a usable fastText model ({size} bytes")
    assert not (tmp_path / "b.npy").exists(), line
    # the probe runs in a child under a memory cap: not gigabytes (measured in a fresh process, whose
    # children are the probe alone; this session's own children include trainings)
    code = ("import resource, sys\nfrom conceptprune.filters.langid import LanguageId\ntry:\n    LanguageId(sys.argv[1])\n"
            "except Exception as e:\n    print(type(e).__name__)\n"
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    r = subprocess.run([sys.executable, "-c", code, str(bad)], capture_output=True, text=True, timeout=300)
    name, kib = r.stdout.split()
    assert name == "ConfigError" and int(kib) < 1_200_000, r.stdout + r.stderr
    # a good model at another path still loads (checked once, then remembered)
    good = tmp_path / "lid.176.ftz"
    good.write_bytes(bundled_model_path().read_bytes())
    from conceptprune.filters.langid import LanguageId

    assert LanguageId(good).predict(["the cat sat on the mat", "le chat est sur la table"]) == ["en", "fr"]


# -- 20, the rest: bad values are one line naming the file or flag ---------------------------------


def test_20_more_bad_inputs_are_one_line(small_pool, tmp_path, capsys):
    bad = tmp_path / "ids.txt"
    bad.write_bytes(b"\xff\xfe\x00n01440764\n")
    _refused(capsys, "filter", "text-based", "--pool", small_pool, "--out", tmp_path / "t.npy", "--synsets", bad,
             match=f"{bad}, line 1: not UTF-8 text")
    run = tmp_path / "runs" / "x"
    run.mkdir(parents=True)
    (run / "run.json").write_text("{bad")
    _refused(capsys, "evaluate", "--model", run, "--data-dir", tmp_path, "--out", tmp_path / "e",
             match=f"{run / 'run.json'}: not a training run's record")
    ckpt = tmp_path / "m.pt"
    ckpt.write_bytes(b"x")
    _refused(capsys, "evaluate", "--model", ckpt, "--data-dir", tmp_path, "--out", tmp_path / "e", "--device", "bogus",
             match="--device 'bogus': not a torch device")
    for flag in ("--workers", "--cpus-per-task", "--nodes", "--tasks-per-node"):
        _refused(capsys, "train", "--data", tmp_path, "--scale", "tiny", "--output", tmp_path / "r", "--dry-run",
                 flag, "0", match=f"{flag} must be >= 1, got 0")
