"""Evaluation data: DataComp's task table, the download of the sets (from a loopback Hugging Face
Hub), DataComp's own folder layout, --dry-run / --list-tasks."""

from __future__ import annotations

import pytest

from conceptprune.evaluation.tasks import AGGREGATES, BY_KEY, TASKS
from conceptprune.slurm.stage import Executor

# DataComp's tasklist.yml (mlfoundations/datacomp @ 4a8df19), key -> (name, size, main metric, tags).
# DataComp defaults a missing main_metric to acc1; FairFace and UTKFace write no acc1, so their
# main metric is null in every results file: None here.
DATACOMP = {
    'vtab/caltech101': ('Caltech-101', 6085, 'mean_per_class_recall', ('vtab_natural',)),
    'cifar10': ('CIFAR-10', 10000, 'acc1', ()),
    'vtab/cifar100': ('CIFAR-100', 10000, 'acc1', ('vtab_natural',)),
    'vtab/clevr_count_all': ('CLEVR Counts', 15000, 'acc1', ('vtab_structured',)),
    'vtab/clevr_closest_object_distance': ('CLEVR Distance', 15000, 'acc1', ('vtab_structured',)),
    'country211': ('Country211', 21100, 'acc1', ()),
    'vtab/dtd': ('Describable Textures', 1880, 'acc1', ('vtab_natural',)),
    'vtab/eurosat': ('EuroSAT', 5400, 'acc1', ('vtab_specialized',)),
    'fgvc_aircraft': ('FGVC Aircraft', 3333, 'mean_per_class_recall', ()),
    'food101': ('Food-101', 25250, 'acc1', ()),
    'gtsrb': ('GTSRB', 12630, 'acc1', ()),
    'imagenet1k': ('ImageNet 1k', 50000, 'acc1', ()),
    'imagenet_sketch': ('ImageNet Sketch', 50889, 'acc1', ()),
    'imagenetv2': ('ImageNet v2', 10000, 'acc1', ()),
    'imagenet-a': ('ImageNet-A', 7500, 'acc1', ()),
    'imagenet-o': ('ImageNet-O', 2000, 'acc1', ()),
    'imagenet-r': ('ImageNet-R', 30000, 'acc1', ()),
    'vtab/kitti_closest_vehicle_distance': ('KITTI Vehicle Distance', 711, 'acc1', ('vtab_structured',)),
    'mnist': ('MNIST', 10000, 'acc1', ()),
    'objectnet': ('ObjectNet', 18574, 'acc1', ()),
    'vtab/flowers': ('Oxford Flowers-102', 6149, 'mean_per_class_recall', ('vtab_natural',)),
    'vtab/pets': ('Oxford-IIIT Pet', 3669, 'mean_per_class_recall', ('vtab_natural',)),
    'voc2007': ('Pascal VOC 2007', 14976, 'acc1', ()),
    'vtab/pcam': ('PatchCamelyon', 32768, 'acc1', ('vtab_specialized',)),
    'renderedsst2': ('Rendered SST2', 1821, 'acc1', ()),
    'vtab/resisc45': ('RESISC45', 6300, 'acc1', ('vtab_specialized',)),
    'cars': ('Stanford Cars', 8041, 'acc1', ()),
    'stl10': ('STL-10', 8000, 'acc1', ()),
    'sun397': ('SUN397', 108754, 'acc1', ('vtab_natural',)),
    'vtab/svhn': ('SVHN', 26032, 'acc1', ('vtab_natural',)),
    'retrieval/flickr_1k_test_image_text_retrieval': ('Flickr', 1000, 'mean_recall@1', ('retrieval',)),
    'retrieval/mscoco_2014_5k_test_image_text_retrieval': ('MSCOCO', 5000, 'mean_recall@1', ('retrieval',)),
    'misc/winogavil': ('WinoGAViL', 3563, 'jaccard_score_10-12', ('retrieval',)),
    'wilds/iwildcam': ('iWildCam', 42791, 'F1-macro_all', ('wilds',)),
    'wilds/camelyon17': ('Camelyon17', 85054, 'acc1', ('wilds',)),
    'wilds/fmow': ('FMoW', 22108, 'acc_worst_region', ('wilds',)),
    'fairness/dollar_street': ('Dollar Street', 3503, 'acc_top5_wg', ('fairness',)),
    'fairness/geode': ('GeoDE', 12488, 'acc_wg', ('fairness',)),
    'fairness/fairface': ('FairFace', 10954, None, ('fairness',)),
    'fairness/utkface': ('UTKFace', 23703, None, ('fairness',)),
}
# DataComp's aggregate_scores.py groups (by dataset name)
SHIFTS = {"ImageNet Sketch", "ImageNet v2", "ImageNet-A", "ImageNet-O", "ImageNet-R", "ObjectNet"}
VTAB = {"Caltech-101", "CIFAR-100", "CLEVR Counts", "CLEVR Distance", "Describable Textures", "EuroSAT",
        "KITTI Vehicle Distance", "Oxford Flowers-102", "Oxford-IIIT Pet", "PatchCamelyon", "RESISC45", "SVHN",
        "SUN397"}


# -- the task table ------------------------------------------------------------------------------


def test_task_table_is_datacomps():
    assert [t.key for t in TASKS] == list(DATACOMP)  # same 40 keys, same order
    assert len(TASKS) == 40 and sum(t.main_metric is not None for t in TASKS) == 38
    for t in TASKS:
        assert (t.name, t.size, t.main_metric, t.tags) == DATACOMP[t.key], t.key


def test_sources_follow_datacomps_download_rule():
    sun = BY_KEY["sun397"]
    assert (sun.source, sun.size, sun.type) == ("djghosh/wds_sun397_test", 108754, "zeroshot_classification")
    assert "vtab/sun397" not in BY_KEY
    fair = {k: BY_KEY[k].source for k in DATACOMP if k.startswith("fairness/")}
    assert fair == {"fairness/dollar_street": "djghosh/wds_dollar_street_test",
                    "fairness/geode": "djghosh/wds_geode_test",
                    "fairness/fairface": "djghosh/wds_fairface_test",
                    "fairness/utkface": "djghosh/wds_utkface_test"}
    assert BY_KEY["wilds/fmow"].source == "djghosh/wds_wilds-fmow_test"
    assert BY_KEY["vtab/kitti_closest_vehicle_distance"].datacomp_folder == "wds_vtab-kitti_closest_vehicle_distance_test"
    hf = [t for t in TASKS if t.is_hf_dataset]
    assert [t.source for t in hf] == ["nlphuji/flickr_1k_test_image_text_retrieval",
                                      "nlphuji/mscoco_2014_5k_test_image_text_retrieval", "nlphuji/winogavil"]
    assert all(t.datacomp_folder is None for t in hf)
    assert sum(t.source.startswith("djghosh/wds_") for t in TASKS) == 37


@pytest.mark.parametrize("name, members", [("ImageNet", {"ImageNet 1k"}), ("ImageNet dist. shifts", SHIFTS),
                                           ("VTAB", VTAB), ("Retrieval", {"Flickr", "MSCOCO", "WinoGAViL"})])
def test_aggregates_match_datacomps_groups(name, members):
    assert {t.name for t in TASKS if AGGREGATES[name](t)} == members


def test_average_covers_the_38_main_metrics():
    assert {t.name for t in TASKS if AGGREGATES["Average"](t)} == {
        v[0] for v in DATACOMP.values() if v[2] is not None}


# -- a loopback Hugging Face Hub -------------------------------------------------------------------
# Serves dataset repositories in the Hub's HTTP form (the endpoints huggingface_hub calls: repo info at
# a revision, recursive tree listing, HEAD/GET of resolve/ with Range), so the real huggingface_hub
# code downloads from it.

import hashlib  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import threading  # noqa: E402
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer  # noqa: E402
from pathlib import Path  # noqa: E402
from urllib.parse import unquote, urlsplit  # noqa: E402

import numpy as np  # noqa: E402

LFS_SUFFIXES = (".tar", ".parquet", ".zip", ".arrow")


class FakeHub:
    """repos: {repo_id: {revision: {path: bytes}}}."""

    def __init__(self, repos: dict, cut: str | None = None):
        self.repos = repos
        self.cut = cut  # a file path whose first GET stops half-way (a dropped connection)
        self.requests: list[str] = []
        self.commits = {}
        for repo, revs in repos.items():
            for rev, files in revs.items():
                sha = hashlib.sha1(json.dumps([repo, rev, sorted(files)]).encode()).hexdigest()
                self.commits[(repo, rev)] = self.commits[(repo, sha)] = (sha, files)

    def entry(self, path: str, data: bytes) -> dict:
        blob = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        e = {"type": "file", "path": path, "size": len(data), "oid": blob}
        if path.endswith(LFS_SUFFIXES):
            e["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 132}
        return e

    def __enter__(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _send(self, code, body=b"", headers=None, head=False):
                self.send_response(code)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if not head:
                    self.wfile.write(body)

            def _route(self, head=False):
                path = urlsplit(self.path).path
                hub.requests.append(f"{self.command} {unquote(path)}")
                parts = path.strip("/").split("/")
                if parts[:2] == ["api", "datasets"] and len(parts) > 5 and parts[4] in ("revision", "tree"):
                    repo, rev = "/".join(parts[2:4]), unquote(parts[5])
                    if (repo, rev) not in hub.commits:
                        return self._send(404, b"{}", {"X-Error-Code": "RevisionNotFound"})
                    sha, files = hub.commits[(repo, rev)]
                    if parts[4] == "revision":
                        body = {"id": repo, "sha": sha, "private": False,
                                "siblings": [{"rfilename": p} for p in sorted(files)]}
                    else:
                        body = [hub.entry(p, files[p]) for p in sorted(files)]
                    return self._send(200, json.dumps(body).encode(), {"Content-Type": "application/json"})
                if parts[0] == "datasets" and parts[3] == "resolve":
                    repo, rev, fp = "/".join(parts[1:3]), unquote(parts[4]), unquote("/".join(parts[5:]))
                    if (repo, rev) not in hub.commits or fp not in hub.commits[(repo, rev)][1]:
                        return self._send(404, b"", {"X-Error-Code": "EntryNotFound"})
                    sha, files = hub.commits[(repo, rev)]
                    data, e = files[fp], hub.entry(fp, files[fp])
                    etag = e["lfs"]["oid"] if "lfs" in e else e["oid"]
                    h = {"X-Repo-Commit": sha, "ETag": f'"{etag}"', "Accept-Ranges": "bytes"}
                    rng = self.headers.get("Range")
                    if rng:
                        hub.requests.append(f"Range {rng} {fp}")
                    if fp == hub.cut and not head and not rng:
                        hub.cut = None
                        self.send_response(200)
                        for k, v in h.items():
                            self.send_header(k, v)
                        self.send_header("Content-Length", str(len(data)))
                        self.end_headers()
                        self.wfile.write(data[: len(data) // 2])
                        self.wfile.flush()
                        self.close_connection = True
                        return None
                    if rng and not head:
                        start = int(rng.split("=")[1].split("-")[0])
                        h["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
                        return self._send(206, data[start:], h)
                    return self._send(200, data, h, head=head)
                return self._send(404, b"")

            def do_GET(self):
                self._route()

            def do_HEAD(self):
                self._route(head=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def online(monkeypatch, tmp_path):
    """The tests run with HF_HUB_OFFLINE=1; the loopback Hub needs huggingface_hub online (its
    constant is read at import) and a private cache."""
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hf_home" / "hub"))
    monkeypatch.setattr(c, "HF_HUB_DISABLE_TELEMETRY", True, raising=False)


# -- tiny data in the real forms ------------------------------------------------------------------


def _jpeg(seed: int, size=(12, 10)) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def _png(seed: int) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (9, 9), dtype=np.uint8), mode="L").save(buf, format="PNG")
    return buf.getvalue()


def _tar(samples: dict[str, dict[str, bytes]]) -> bytes:
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for key, parts in samples.items():
            for ext, data in parts.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def wds_repo(n_shards=2, per=3) -> dict[str, bytes]:
    """A djghosh/wds_*_test repository: metadata files and test/{i}.tar with webp/jpg + cls."""
    files = {"classnames.txt": b"cat\ndog\n", "zeroshot_classification_templates.txt": b"a photo of a {c}.\n",
             "test/nshards.txt": f"{n_shards}\n".encode(), ".gitattributes": b"*.tar filter=lfs\n"}
    for s in range(n_shards):
        files[f"test/{s}.tar"] = _tar({f"s{s}{i:04d}": {"jpg": _jpeg(10 * s + i), "cls": str(i % 2).encode()}
                                      for i in range(per)})
    return files


def _parquet(table) -> bytes:
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def _image_type():
    """The Arrow type of a `datasets` Image value."""
    import pyarrow as pa

    return pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def retrieval_table(n=4):
    import pyarrow as pa

    images = [{"bytes": _jpeg(100 + i) if i % 2 == 0 else _png(100 + i), "path": f"{i}.jpg"} for i in range(n)]
    captions = [[f"caption {i} {j}" for j in range(1 + i % 3)] for i in range(n)]
    captions[1][0] = "a caption\nwith a line break"
    return pa.table({"image": pa.array(images, _image_type()), "filename": [f"{i}.jpg" for i in range(n)],
                     "caption": pa.array(captions, pa.list_(pa.string())),
                     "img_id": [str(i) for i in range(n)]}), images, captions


def winogavil_table():
    import pyarrow as pa

    words = ["moon", "wolf", "cheese", "sun", "tree", "fish", "desert", "wave", "car", "shell", "book", "ice cream"]
    rows = [("werewolf", words[:5], ["moon", "wolf"]), ("Ocean", words[3:9], ["fish", "wave"]),
            ("apple", words[:10], ["tree", "cheese", "sun"]), ("ice", words, ["ice cream", "moon"])]
    imgs = [[{"bytes": _jpeg(200 + 10 * r + j), "path": None} for j in range(len(c))] for r, (_, c, _) in
            enumerate(rows)]
    t = pa.table({"candidate_images": pa.array(imgs, pa.list_(_image_type())),
                  "cue": [r[0] for r in rows], "candidates": [r[1] for r in rows],
                  "associations": [r[2] for r in rows], "num_associations": [len(r[2]) for r in rows],
                  "ID": list(range(1, 5))})
    return t, rows, imgs


# -- download from the loopback Hub ---------------------------------------------------------------


def test_download_wds_set_into_datacomps_folder_verified(online, tmp_path):
    from conceptprune.evaluation import layout
    from conceptprune.evaluation.download import download

    repo = wds_repo()
    data = tmp_path / "data"
    with FakeHub({"djghosh/wds_cifar10_test": {"main": repo}}) as hub:
        res = download(data, ["cifar10"], endpoint=hub.url)
        assert res == {"downloaded": ["cifar10"], "errors": {}}
        dest = data / "wds_cifar10_test"  # DataComp's folder name
        for path, content in repo.items():
            assert (dest / path).read_bytes() == content, path
        rec = json.loads((dest / ".complete.json").read_text())
        assert rec["files"]["test/1.tar"] == hashlib.sha256(repo["test/1.tar"]).hexdigest()
        assert layout.locate(data, BY_KEY["cifar10"])[1] == "present"

        # a damaged shard is caught by the checksum, removed, and fetched again on the next run
        (dest / ".complete.json").unlink()
        bad = bytearray(repo["test/0.tar"])
        bad[600] ^= 0xFF
        (dest / "test/0.tar").write_bytes(bytes(bad))
        res = download(data, ["cifar10"], endpoint=hub.url)
        assert "failed verification" in res["errors"]["cifar10"] and not (dest / "test/0.tar").exists()
        assert layout.locate(data, BY_KEY["cifar10"])[1] == "partial"
        assert download(data, ["cifar10"], endpoint=hub.url)["errors"] == {}
        assert (dest / "test/0.tar").read_bytes() == repo["test/0.tar"]


def test_download_fairness_set_uses_datacomps_repo_name(online, tmp_path):
    from conceptprune.evaluation.download import download

    with FakeHub({"djghosh/wds_geode_test": {"main": wds_repo(1)}}) as hub:
        assert download(tmp_path, ["fairness/geode"], endpoint=hub.url)["errors"] == {}
    assert (tmp_path / "wds_geode_test" / "test" / "0.tar").is_file()
    assert any(r.startswith("GET /datasets/djghosh/wds_geode_test/resolve/") for r in hub.requests)


FLICKR = "retrieval/flickr_1k_test_image_text_retrieval"
SCRIPT = b"import datasets  # a loading script, which datasets >= 4 refuses to run\n"


def _read_retrieval(folder: Path):
    """Through clip_benchmark's own wds reader (what the evaluator uses)."""
    from clip_benchmark.datasets.builder import build_dataset

    ds = build_dataset("wds/x", root=str(folder), transform=lambda im: np.asarray(im.convert("RGB")),
                       split="test", download=False, task="zeroshot_retrieval")
    return list(ds)


def _rgb(data: bytes):
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def test_download_retrieval_set_from_the_hubs_parquet_conversion(online, tmp_path):
    from conceptprune.evaluation import layout
    from conceptprune.evaluation.download import download

    table, images, captions = retrieval_table(5)
    repo = {"main": {"flickr_1k_test_image_text_retrieval.py": SCRIPT, "README.md": b"# card\n"},
            "refs/convert/parquet": {"TEST/test/0000.parquet": _parquet(table.slice(0, 3)),
                                     "TEST/test/0001.parquet": _parquet(table.slice(3))}}
    with FakeHub({"nlphuji/flickr_1k_test_image_text_retrieval": repo}) as hub:
        assert download(tmp_path, [FLICKR], endpoint=hub.url)["errors"] == {}
    dest = tmp_path / "retrieval-flickr_1k_test_image_text_retrieval"
    rec = json.loads((dest / ".complete.json").read_text())
    assert (rec["via"], rec["revision"], rec["rows"]) == ("parquet", "refs/convert/parquet", 5)
    assert sorted(rec["files"]) == ["TEST/test/0000.parquet", "TEST/test/0001.parquet"]
    assert (dest / "dataset_type.txt").read_text() == "retrieval\n"
    got = _read_retrieval(dest)
    assert len(got) == 5
    for (img, caps), src, want in zip(got, images, captions):
        assert np.array_equal(img, _rgb(src["bytes"]))  # same pixels: bytes are copied, not re-encoded
        assert caps == [" ".join(c.splitlines()) for c in want]
    assert got[1][1][0] == "a caption with a line break"
    assert layout.locate(tmp_path, BY_KEY[FLICKR])[1] == "present"
    assert not (tmp_path / ".downloads").exists()  # the staged parquet is gone once converted


def test_download_winogavil_from_the_repos_own_parquet(online, tmp_path):
    from conceptprune.tars import iter_samples
    from conceptprune.evaluation.download import download

    table, rows, imgs = winogavil_table()
    repo = {"main": {"README.md": b"# card\n", "data/test-00000-of-00001.parquet": _parquet(table)}}
    with FakeHub({"nlphuji/winogavil": repo}) as hub:
        assert download(tmp_path, ["misc/winogavil"], endpoint=hub.url)["errors"] == {}
        assert not any("convert" in r for r in hub.requests)  # the repo's own files came first
    dest = tmp_path / "misc-winogavil"
    assert json.loads((dest / ".complete.json").read_text())["revision"] == "main"
    samples = [s for i in range(int((dest / "test/nshards.txt").read_text())) for s in
               iter_samples(dest / "test" / f"{i}.tar")]
    assert len(samples) == 4
    for s, (cue, cands, assoc), ims in zip(samples, rows, imgs):
        q = json.loads(s.parts["json"])
        assert (q["cue"], q["candidates"], q["associations"]) == (cue, cands, assoc)
        assert [s.parts[f"{c}.jpg"] for c in cands] == [im["bytes"] for im in ims]


def test_download_reports_a_set_without_parquet(online, tmp_path):
    from conceptprune.evaluation.download import download

    with FakeHub({"nlphuji/winogavil": {"main": {"winogavil.py": SCRIPT}}}) as hub:
        err = download(tmp_path, ["misc/winogavil"], endpoint=hub.url)["errors"]["misc/winogavil"]
    assert "no parquet files of the test split" in err and "refs/convert/parquet (no such revision)" in err
    assert not (tmp_path / "misc-winogavil").exists()
    (tmp_path / ".downloads" / "misc-winogavil").mkdir(parents=True)  # as an interrupted fetch leaves it
    from conceptprune.evaluation.download import dry_run

    row = next(r for r in dry_run(tmp_path) if r["key"] == "misc/winogavil")
    assert (row["state"], row["detail"]) == ("partial", "interrupted download")


def test_download_offline_fails_cleanly(tmp_path):
    from conceptprune.evaluation.download import download

    res = download(tmp_path, ["cifar10"], endpoint="http://127.0.0.1:9")  # HF_HUB_OFFLINE=1 in tests
    assert list(res["errors"]) == ["cifar10"] and "offline" in res["errors"]["cifar10"].lower()


# -- DataComp's own download folder ----------------------------------------------------------------


def _arrow_stream(path: Path, table) -> None:
    """What `datasets` writes into its cache (an Arrow IPC stream)."""
    import pyarrow as pa

    path.parent.mkdir(parents=True, exist_ok=True)
    with pa.OSFile(str(path), "wb") as f, pa.ipc.new_stream(f, table.schema) as w:
        w.write_table(table)


def datacomp_download_folder(root: Path) -> dict:
    """A folder as DataComp's download_evalsets.py leaves it: wds_<name>_test/ (no marker) and the
    nlphuji sets in hf_cache/ (a datasets cache whose image values point into downloads/extracted/,
    as a loading script that yields file paths leaves them)."""
    import pyarrow as pa

    for name in ("wds_cifar10_test", "wds_dollar_street_test"):
        for path, content in wds_repo().items():
            if path != ".gitattributes":
                (root / name / path).parent.mkdir(parents=True, exist_ok=True)
                (root / name / path).write_bytes(content)
    hf = root / "hf_cache"
    extracted = hf / "downloads" / "extracted" / "5d2a" / "images_flickr_1k_test"
    extracted.mkdir(parents=True)
    table, images, captions = retrieval_table(4)
    for i, im in enumerate(images):
        (extracted / f"{i}.jpg").write_bytes(im["bytes"])
    paths = [{"bytes": None, "path": str(extracted / f"{i}.jpg")} for i in range(4)]
    table = table.set_column(0, "image", pa.array(paths, _image_type()))
    name = "flickr_1k_test_image_text_retrieval"
    _arrow_stream(hf / f"nlphuji___{name}" / "TEST" / "1.1.0" / "0a1b2c" / f"{name}-test.arrow", table)
    wino, rows, imgs = winogavil_table()
    _arrow_stream(hf / "nlphuji___winogavil" / "TEST" / "1.1.0" / "3c4d" / "winogavil-test.arrow", wino)
    (hf / "nlphuji___winogavil" / "TEST" / "1.1.0" / "3c4d" / "dataset_info.json").write_text("{}")
    return {"images": images, "captions": captions, "wino": (rows, imgs)}


def test_datacomp_folder_is_resolved_without_renaming(tmp_path):
    from conceptprune.tars import iter_samples
    from conceptprune.evaluation import layout
    from conceptprune.evaluation.download import dry_run

    made = datacomp_download_folder(tmp_path / "made")
    data = tmp_path / "moved"
    (tmp_path / "made").rename(data)  # the cache's absolute image paths now point nowhere
    states = {r["key"]: (r["state"], Path(r["path"]).name) for r in dry_run(data)}
    assert states["cifar10"] == ("present", "wds_cifar10_test")
    assert states["fairness/dollar_street"] == ("present", "wds_dollar_street_test")
    assert states[FLICKR] == ("convertible", "retrieval-flickr_1k_test_image_text_retrieval")
    assert states["misc/winogavil"][0] == "convertible"
    assert sum(s == "missing" for s, _ in states.values()) == 36

    assert layout.task_dir(data, BY_KEY["cifar10"]) == data / "wds_cifar10_test"
    flickr = layout.task_dir(data, BY_KEY[FLICKR])  # converted once, from hf_cache
    got = _read_retrieval(flickr)
    assert [c for _, c in got] == [[" ".join(x.splitlines()) for x in c] for c in made["captions"]]
    assert all(np.array_equal(img, _rgb(src["bytes"])) for (img, _), src in zip(got, made["images"]))
    assert json.loads((flickr / ".complete.json").read_text())["via"] == "hf_cache"
    wino = layout.task_dir(data, BY_KEY["misc/winogavil"])
    samples = list(iter_samples(wino / "test" / "0.tar"))
    assert [json.loads(s.parts["json"])["cue"] for s in samples] == ["werewolf", "Ocean", "apple", "ice"]
    assert {r["key"]: r["state"] for r in dry_run(data)}[FLICKR] == "present"
    assert sorted(p.name for p in data.iterdir()) == sorted(
        ["hf_cache", "wds_cifar10_test", "wds_dollar_street_test", "retrieval-flickr_1k_test_image_text_retrieval",
         "misc-winogavil"])  # nothing renamed, nothing duplicated



def test_datacomp_folder_is_evaluated(tmp_path, tiny_checkpoint):
    from conceptprune.evaluation.run import evaluate, read_results

    datacomp_download_folder(tmp_path / "dc")
    keys = ["cifar10", FLICKR, "misc/winogavil"]
    res = evaluate(str(tiny_checkpoint), str(tmp_path / "dc"), str(tmp_path / "out"), arch="cp-tiny-vit",
                   tasks=keys, batch_size=4, executor=Executor.create("local"))
    assert res["errors"] == {}
    rows = {r["key"]: r for r in read_results(tmp_path / "out" / "eval_results.jsonl")}
    assert sorted(rows) == sorted(keys)
    assert 0 <= rows[FLICKR]["metrics"]["mean_recall@1"] <= 1
    assert rows["misc/winogavil"]["metrics"]["main_metric"] is not None

    # the same result from a renamed copy in our own naming: the DataComp folder was read as is
    import shutil

    shutil.copytree(tmp_path / "dc" / "wds_cifar10_test", tmp_path / "ours" / "cifar10")
    again = evaluate(str(tiny_checkpoint), str(tmp_path / "ours"), str(tmp_path / "out2"), arch="cp-tiny-vit",
                     tasks=["cifar10"], batch_size=4, executor=Executor.create("local"))
    assert again["errors"] == {}
    assert read_results(tmp_path / "out2" / "eval_results.jsonl")[0]["metrics"] == rows["cifar10"]["metrics"]


# -- the command line ------------------------------------------------------------------------------


def test_cli_dry_run_lists_every_task_with_source_size_state(tmp_path, capsys):
    from conceptprune.cli import main

    datacomp_download_folder(tmp_path)
    (tmp_path / "wds_dollar_street_test" / "test" / "1.tar").unlink()  # an interrupted download
    assert main(["evaluate", "download", "--data-dir", str(tmp_path), "--dry-run"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 42  # header, 40 tasks, summary
    rows = {line.split()[0]: line for line in out[1:41]}
    assert sorted(rows) == sorted(DATACOMP)
    assert rows["sun397"].split()[1:3] == ["djghosh/wds_sun397_test", "108754"] and rows["sun397"].endswith("missing")
    assert "present (2 shards, not checksummed here)" in rows["cifar10"]
    assert "partial (1 of 2 shards missing)" in rows["fairness/dollar_street"]
    assert "convertible" in rows["misc/winogavil"] and "nlphuji/winogavil" in rows["misc/winogavil"]
    assert out[-1] == "2 convertible, 36 missing, 1 partial, 1 present (of 40)"
    assert not (tmp_path / "misc-winogavil").exists()  # a dry run converts nothing


def test_cli_list_tasks_shows_source_and_state(tmp_path, capsys):
    from conceptprune.cli import main

    assert main(["evaluate", "--list-tasks"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 42 and out[-1] == "40 tasks, 38 with a main metric"
    assert "djghosh/wds_utkface_test" in next(line for line in out if line.startswith("fairness/utkface"))
    datacomp_download_folder(tmp_path)
    assert main(["evaluate", "--list-tasks", "--data-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert next(line for line in out if line.startswith("cifar10 ")).endswith("present")
    assert out[-1] == f"2 present in {tmp_path}"


def test_cli_download_through_an_endpoint(online, tmp_path, capsys):
    from conceptprune.cli import main

    table, _, _ = retrieval_table(3)
    repos = {"djghosh/wds_mnist_test": {"main": wds_repo(1, 2)},
             "nlphuji/mscoco_2014_5k_test_image_text_retrieval": {
                 "main": {"mscoco_2014_5k_test_image_text_retrieval.py": SCRIPT},
                 "refs/convert/parquet": {"TEST/mscoco_2014_5k_test_image_text_retrieval-test.parquet": _parquet(table)}}}
    with FakeHub(repos) as hub:
        argv = ["evaluate", "download", "--data-dir", str(tmp_path), "--endpoint", hub.url,
                "--tasks", "mnist", "retrieval/mscoco_2014_5k_test_image_text_retrieval"]
        assert main(argv) == 0
        res = json.loads(capsys.readouterr().out)
        assert res == {"downloaded": ["mnist", "retrieval/mscoco_2014_5k_test_image_text_retrieval"], "errors": {}}
        n = len(hub.requests)
        assert main(argv) == 0  # complete sets: nothing fetched again
        assert len(hub.requests) == n
    assert len(_read_retrieval(tmp_path / "retrieval-mscoco_2014_5k_test_image_text_retrieval")) == 3


def test_download_over_a_datacomp_folder_keeps_its_shards(online, tmp_path):
    from conceptprune.evaluation.download import download

    datacomp_download_folder(tmp_path)
    before = (tmp_path / "wds_cifar10_test" / "test" / "0.tar").stat().st_mtime_ns
    with FakeHub({"djghosh/wds_cifar10_test": {"main": wds_repo()}}) as hub:
        assert download(tmp_path, ["cifar10"], endpoint=hub.url)["errors"] == {}
    assert not [r for r in hub.requests if r.startswith("GET") and r.endswith(".tar")]  # checked, not fetched
    assert [r for r in hub.requests if r.startswith("HEAD") and r.endswith("test/0.tar")]
    assert (tmp_path / "wds_cifar10_test" / "test" / "0.tar").stat().st_mtime_ns == before
    assert (tmp_path / "wds_cifar10_test" / ".complete.json").is_file()
    assert not (tmp_path / "cifar10").exists()


def test_download_retrieval_set_from_the_scripts_raw_files(online, tmp_path):
    """No parquet anywhere: the csv (Karpathy-style, captions as a JSON list in `raw`) and the image
    zip that the loading script reads."""
    import csv
    import zipfile

    from conceptprune.evaluation.download import download

    _, images, captions = retrieval_table(4)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["sentids", "imgid", "tokens", "raw", "sentid", "filename", "split"])
    for i, caps in enumerate(captions):
        w.writerow([json.dumps(list(range(len(caps)))), i, json.dumps([c.split() for c in caps]), json.dumps(caps),
                    json.dumps(0), f"{1000 + i}.jpg", "test"])
    zbuf = io.BytesIO()
    with zipfile.ZipFile(zbuf, "w") as z:
        z.writestr("__MACOSX/images_flickr_1k_test/._1000.jpg", b"junk")
        for i, im in reversed(list(enumerate(images))):
            z.writestr(f"images_flickr_1k_test/{1000 + i}.jpg", im["bytes"])
    repo = {"main": {"flickr_1k_test_image_text_retrieval.py": SCRIPT, "test_1k_flickr.csv": buf.getvalue().encode(),
                     "images_flickr_1k_test.zip": zbuf.getvalue()}}
    with FakeHub({"nlphuji/flickr_1k_test_image_text_retrieval": repo}) as hub:
        assert download(tmp_path, [FLICKR], endpoint=hub.url)["errors"] == {}
    dest = tmp_path / "retrieval-flickr_1k_test_image_text_retrieval"
    rec = json.loads((dest / ".complete.json").read_text())
    assert (rec["via"], rec["rows"]) == ("csv+zip", 4)
    got = _read_retrieval(dest)
    assert [c for _, c in got] == [[" ".join(x.splitlines()) for x in c] for c in captions]
    assert all(np.array_equal(img, _rgb(src["bytes"])) for (img, _), src in zip(got, images))


def test_download_resumes_a_cut_transfer(online, tmp_path, monkeypatch):
    import huggingface_hub.constants as c

    from conceptprune.evaluation.download import download

    monkeypatch.setattr(c, "DOWNLOAD_CHUNK_SIZE", 1024)  # 10 MiB otherwise: these shards are one chunk
    repo = wds_repo(2, 40)
    with FakeHub({"djghosh/wds_mnist_test": {"main": repo}}, cut="test/1.tar") as hub:
        errors = [download(tmp_path, ["mnist"], endpoint=hub.url)["errors"] for _ in range(2)]
    assert errors[-1] == {}  # within the first call (huggingface_hub retries) or on the rerun
    half = len(repo["test/1.tar"]) // 2
    assert [r for r in hub.requests if r.startswith("Range")] == [f"Range bytes={half}- test/1.tar"]  # resumed
    assert (tmp_path / "wds_mnist_test" / "test" / "1.tar").read_bytes() == repo["test/1.tar"]
