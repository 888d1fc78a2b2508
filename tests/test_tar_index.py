"""reshard's fast path (issue 17.1): the header-only offset index of a plain tar reads the same
samples, bytes and uids as the member-by-member reader, gives way to it for every tar that is
not plain, and a reshard through it writes byte-identical output (multiplicities, a non-plain
shard and samples without uid or image included)."""

import filecmp
import io
import json
import mmap
import tarfile
from pathlib import Path

import numpy as np
import pytest

from conceptprune import uids as U
from conceptprune.data.reshard import reshard
from conceptprune.data.tars import Sample, ShardWriter, copy_range, index_plain, iter_samples

UID = "0123456789abcdef0123456789ABCDEF"


def _tar(path: Path, members: list[tuple[str, bytes]], fmt=tarfile.USTAR_FORMAT) -> Path:
    with tarfile.open(path, "w", format=fmt) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 0
            tf.addfile(info, io.BytesIO(data))
    return path


def _index(path: Path):
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        index = index_plain(path, buf)
        if index is None:
            return None
        ok, pairs = index.uid_pairs()
        samples = [index.sample(i) for i in range(len(index))]
        return index, ok, pairs, samples


def _reference_uid(sample: Sample):
    try:
        return U.uid_to_pair(sample.uid())
    except ValueError:
        return None


TRICKY = [  # one plain tar with every case the index must read as iter_samples does
    ("a.jpg", b"\xff\xd8jpeg"), ("a.txt", b"caption"), ("a.json", json.dumps({"uid": UID}).encode()),
    ("b.JPG", b"upper"), ("b.json", b'{"x": {"uid": "ffffffffffffffffffffffffffffffff"}, "uid": "' + b"1" * 32 + b'"}'),
    ("c.png", b"png"), ("c.json", b"not json"),
    ("d.webp", b"w"), ("d.json", b'{"uid": "abc"}'),  # short uid: the parser's answer (1-32 hex digits)
    ("e.txt", b"no image"), ("e.json", json.dumps({"uid": "e" * 32}).encode()),
    ("f.jpeg", b"j"),  # no json
    ("g.jpg", b"g"), ("g.json", b'{"uid": "' + b"2" * 32 + b'"}'), ("g.json", b'{"uid": "' + b"3" * 32 + b'"}'),
    ("dir.v1/h.jpg", b"h"), ("dir.v1/h.seg.json", b"{}"), ("dir.v1/h.json", b'{"uid":"' + b"4" * 32 + b'"}'),
    ("noext", b"x"), ("i.jpgx", b"not an image"), ("i.json", b'[1, 2]'),
    ("j.jpg", b""), ("j.json", b'{"uid": "' + b"5" * 32 + b'", "other": "\\"uid\\""}'),
    ("k.jpg", b"k"), ("k.json", b'{"uid": "' + b"6" * 31 + b'g"}'),
    ("l.jpg", b"k"), ("l.json", b'{"uid": \n "' + b"7" * 32 + b'"}'),
]


def test_index_reads_what_iter_samples_reads(tmp_path):
    path = _tar(tmp_path / "t.tar", TRICKY)
    got = _index(path)
    assert got is not None
    index, ok, pairs, samples = got
    ref = list(iter_samples(path))
    assert [s.key for s in samples] == [s.key for s in ref]
    for i, (s, r) in enumerate(zip(samples, ref)):
        assert s.parts == r.parts and list(s.parts) == list(r.parts)
        assert s.raw == [b"".join(r.raw)]
        assert index.has_image[i] == r.has_image()
        want = _reference_uid(r)
        assert bool(ok[i]) == (want is not None), r.key
        if want is not None:
            assert tuple(int(x) for x in pairs[i]) == want, r.key
    data = path.read_bytes()
    assert b"".join(data[index.start[i]:index.end[i]] for i in range(len(index))) == data[:index.end[-1]]


@pytest.mark.parametrize("case", ["gnu_long", "pax", "dir", "dotdot", "absolute", "bad_checksum", "truncated",
                                  "nul_in_json", "empty", "v7"])
def test_anything_not_plain_is_left_to_iter_samples(tmp_path, case):
    """The index gives way (None) to the member-by-member reader, which reads or reports it."""
    p = tmp_path / "t.tar"
    base = [("a.jpg", b"x"), ("a.json", json.dumps({"uid": UID}).encode())]
    if case == "gnu_long":
        _tar(p, [("d" * 120 + ".jpg", b"x")], tarfile.GNU_FORMAT)
    elif case == "pax":
        _tar(p, [("caf\u00e9" * 30 + ".jpg", b"x")], tarfile.PAX_FORMAT)
    elif case == "dir":
        with tarfile.open(p, "w", format=tarfile.USTAR_FORMAT) as tf:
            tf.addfile(_dir("sub"))
            info = tarfile.TarInfo("sub/a.jpg")
            info.size = 1
            tf.addfile(info, io.BytesIO(b"x"))
    elif case == "dotdot":
        _tar(p, base + [("../evil.jpg", b"x")])
    elif case == "absolute":
        _tar(p, base + [("/evil.jpg", b"x")])
    elif case == "bad_checksum":
        _tar(p, base)
        raw = bytearray(p.read_bytes())
        raw[0] ^= 1
        p.write_bytes(bytes(raw))
    elif case == "truncated":
        _tar(p, [("a.jpg", b"x" * 5000)])
        p.write_bytes(p.read_bytes()[:2048])
    elif case == "nul_in_json":  # plain, but the uid scan leaves this json to the parser
        _tar(p, [("a.jpg", b"x"), ("a.json", b'{"uid": "' + UID.encode() + b'"}\0')])
        index, ok, pairs, _ = _index(p)
        want = _reference_uid(next(iter_samples(p)))  # the regex finds it; no parser involved
        assert want is not None and bool(ok[0]) and tuple(int(x) for x in pairs[0]) == want
        return
    elif case == "empty":
        p.write_bytes(bytes(10240))
        index, ok, _, samples = _index(p)
        assert len(index) == 0 and samples == [] and list(iter_samples(p)) == []
        return
    elif case == "v7":
        _tar(p, base, tarfile.USTAR_FORMAT)
        raw = bytearray(p.read_bytes())
        raw[257:265] = bytes(8)  # no ustar magic: a v7 header (checksum fixed below)
        raw[148:156] = b" " * 8
        raw[148:156] = b"%06o\0 " % sum(raw[:512])
        p.write_bytes(bytes(raw))
    assert _index(p) is None


def _dir(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    return info


def test_copy_range_fallbacks(tmp_path, monkeypatch):
    src = tmp_path / "src"
    src.write_bytes(bytes(range(256)) * 100)
    import conceptprune.data.tars as T

    for mode in ("copy_file_range", "sendfile", "readwrite"):
        monkeypatch.setattr(T, "_COPY_MODE", [mode])
        dst = tmp_path / f"dst_{mode}"
        with open(src, "rb") as fi, open(dst, "wb") as fo:
            fo.write(b"head")
            fo.flush()
            copy_range(fi.fileno(), fo.fileno(), 1000, 20000)
        assert dst.read_bytes() == b"head" + src.read_bytes()[1000:21000]


def _pool(d: Path) -> list[str]:
    """3 plain shards (one with a sample without image, one without uid) and one GNU-format
    shard with a long name (read member by member)."""
    d.mkdir()
    uids = []
    for s in range(4):
        if s == 3:
            members = []
            for i in range(5):
                uid = f"{s + 1:016x}{i + 1:016x}"
                uids.append(uid)
                members += [(f"{'long' * 30}{s}{i}.jpg", b"img%d" % i),
                            (f"{'long' * 30}{s}{i}.json", json.dumps({"uid": uid}).encode())]
            _tar(d / f"{s:08d}.tar", members, tarfile.GNU_FORMAT)
        else:
            w = ShardWriter(d / f"{s:08d}.tar")
            for i in range(9):
                uid = f"{s + 1:016x}{i + 1:016x}"
                uids.append(uid)
                parts = {"jpg": b"img%d" % i, "txt": b"t", "json": json.dumps({"uid": uid}).encode()}
                if (s, i) == (0, 4):
                    del parts["jpg"]
                if (s, i) == (1, 2):
                    parts["json"] = b"{}"
                w.write(Sample(f"{s:04d}{i:04d}", parts))
            w.close()
        (d / f"{s:08d}_stats.json").write_text(json.dumps({"count": 9, "successes": 9}))
    return uids


@pytest.mark.parametrize("shard_size", [2, 7, 1000])
def test_fast_reshard_is_byte_identical_to_the_reference(tmp_path, monkeypatch, shard_size):
    uids = _pool(tmp_path / "in")
    keep = [u for i, u in enumerate(uids) if i % 3 != 1] + [uids[0], uids[0], uids[5], uids[20], uids[4]]  # upsampled; 4 has no image
    arr = np.sort(U.uids_to_array(keep))
    np.save(tmp_path / "keep.npy", arr)
    fast = reshard(tmp_path / "in", tmp_path / "keep.npy", tmp_path / "fast", shard_size=shard_size,
                   executor="debug")
    monkeypatch.setenv("CONCEPTPRUNE_RESHARD_REFERENCE", "1")
    ref = reshard(tmp_path / "in", tmp_path / "keep.npy", tmp_path / "ref", shard_size=shard_size,
                  executor="debug")
    for k in ("kept_samples", "samples_read", "samples_without_image", "samples_without_uid", "output_shards"):
        assert fast[k] == ref[k], k
    assert fast["samples_without_uid"] == 1 and fast["samples_without_image"] == 1
    assert fast["kept_samples"] == len(keep) - 2
    names = sorted(p.name for p in (tmp_path / "ref").iterdir() if p.name != "meta.json")
    assert names == sorted(p.name for p in (tmp_path / "fast").iterdir() if p.name != "meta.json")
    for n in names:
        assert filecmp.cmp(tmp_path / "ref" / n, tmp_path / "fast" / n, shallow=False), n
