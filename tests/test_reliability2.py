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
