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
