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
from conceptprune.tars import Sample, ShardWriter, index_plain, iter_samples, stopped_at
from conceptprune.slurm.stage import Executor

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
    # the spellings the array scan reads, and the ones it leaves to json_uid
    ("m.jpg", b"m"), ("m.json", b'{"uid":"' + b"8" * 32 + b'"}'),
    ("n.jpg", b"n"), ("n.json", b'{"uid" : "' + b"9" * 32 + b'"}'),
    ("o.jpg", b"o"), ("o.json", b'{"uid":  "' + b"a" * 32 + b'"}'),
    ("p.jpg", b"p"), ("p.json", b'{"uid": "' + b"b" * 33 + b'"}'),  # 33 digits: not a uid
    ("q.jpg", b"q"), ("q.json", b'{"a": "\0", "uid": "' + b"c" * 32 + b'"}'),  # a NUL before it
    ("r.jpg", b"r"), ("r.json", b'{"uid": "' + b"d" * 31 + b'"}'),  # 31 digits: the parser's uid
    ("s.jpg", b"s"), ("s.json", b'{"uid": "'),  # cut short: the next member must not complete it
    ("t.jpg", b"t"), ("t.json", b'"' + b"e" * 32 + b'"}'),
    ("u.jpg", b"u"), ("u.json", b'{"uid": "' + b"F" * 32 + b'", "x": "\"uid\": \"' + b"0" * 32 + b'\""}'),
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


def test_write_views_writes_every_buffer_in_order(tmp_path):
    """More buffers than one writev call takes, of mixed sizes (an empty one too), from a map
    that can be closed afterwards (no view of it is left)."""
    src = tmp_path / "src"
    src.write_bytes(np.random.default_rng(0).integers(0, 256, 300_000, dtype=np.uint8).tobytes())
    rng = np.random.default_rng(1)
    cuts = np.sort(rng.integers(0, 300_000, 6001))
    spans = list(zip(cuts[0::2].tolist(), cuts[1::2].tolist())) + [(5, 5)]
    with open(src, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        w = ShardWriter(tmp_path / "out.tar")
        w.write_spans(buf, [s for s, _ in spans], [e for _, e in spans], len(spans))
        w.close()
    data = src.read_bytes()
    want = b"".join(data[s:e] for s, e in spans)
    out = (tmp_path / "out.tar").read_bytes()
    assert out[:len(want)] == want and not out[len(want):].strip(b"\0")


def test_a_short_write_goes_on_from_the_byte_it_stopped_at():
    assert stopped_at([3, 0, 5, 2], 0) == (0, 0)
    assert stopped_at([3, 0, 5, 2], 3) == (2, 0)  # the empty buffer counts as written
    assert stopped_at([3, 0, 5, 2], 7) == (2, 4)
    assert stopped_at([3, 0, 5, 2], 9) == (3, 1)
    with pytest.raises(ValueError):
        stopped_at([3, 5], 8)


def test_write_views_at_the_file_size_limit(tmp_path):
    """The writev that reaches the file-size limit writes short, the write of the rest fails:
    an OSError (EFBIG) is raised, and the file holds the buffers' first bytes in order."""
    script = f"""
import errno, os, resource, signal
from conceptprune.tars import write_views
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (10_000, 10_000))
data = bytes(range(256)) * 100
fd = os.open({str(tmp_path / "limited")!r}, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
try:
    write_views(fd, [memoryview(data)[i:i + 700] for i in range(0, len(data), 700)])
except OSError as e:
    print(errno.errorcode[e.errno])
"""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "EFBIG"
    assert (tmp_path / "limited").read_bytes() == (bytes(range(256)) * 100)[:10_000]


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
                   executor=Executor.create("inline"))
    monkeypatch.setenv("CONCEPTPRUNE_RESHARD_REFERENCE", "1")
    ref = reshard(tmp_path / "in", tmp_path / "keep.npy", tmp_path / "ref", shard_size=shard_size,
                  executor=Executor.create("inline"))
    for k in ("kept_samples", "samples_read", "samples_without_image", "samples_without_uid", "output_shards"):
        assert fast[k] == ref[k], k
    assert fast["samples_without_uid"] == 1 and fast["samples_without_image"] == 1
    assert fast["kept_samples"] == len(keep) - 2
    names = sorted(p.name for p in (tmp_path / "ref").iterdir() if p.name != "meta.json")
    assert names == sorted(p.name for p in (tmp_path / "fast").iterdir() if p.name != "meta.json")
    for n in names:
        assert filecmp.cmp(tmp_path / "ref" / n, tmp_path / "fast" / n, shallow=False), n
