"""`conceptprune report` and `explain` on a real chain (clip-score -> semdedup -> dbp) made with the
real CLI from a generated pool, with webdataset shards for half of its rows."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conceptprune import keeplist as K
from conceptprune import uids as U
from conceptprune.cli import main
from conceptprune.synthetic import SyntheticPoolConfig, make_pool


def _cli(*args) -> None:
    assert main(["--quiet", "--log-level", "warning", *map(str, args)]) == 0, args


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    from conceptprune.report.fixtures import write_shards

    d = tmp_path_factory.mktemp("chain")
    pool = d / "pool"
    make_pool(pool, SyntheticPoolConfig(rows=3000, files=2, seed=3, concepts=8, embedding_keys=("b32_img",),
                                        dims={"b32_img": 512}), progress=False)
    k = d / "k"
    _cli("filter", "clip-score", "--pool", pool, "--out", k / "cs.npy", "--fraction", 0.7, "--arch", "b32")
    _cli("filter", "semdedup", "--pool", pool, "--within", k / "cs.npy", "--out", k / "sd.npy",
         "--embedding-key", "b32_img", "--clusters", 8, "--target-fraction", 0.8)
    _cli("filter", "dbp", "--pool", pool, "--within", k / "sd.npy", "--out", k / "dbp.npy",
         "--embedding-key", "b32_img", "--clusters", 8, "--fraction", 0.5, "--neighbors", 3)
    _cli("filter", "random", "--pool", pool, "--out", k / "rand.npy", "--fraction", 0.28, "--seed", 1)
    shards = d / "shards"
    write_shards(pool, shards, rows=np.arange(0, 3000, 2), per_shard=400)
    out = d / "rep"
    _cli("report", k / "cs.npy", k / "sd.npy", k / "dbp.npy", "--shards", shards, "--out", out,
         "--compare", k / "rand.npy")
    return {"dir": d, "pool": pool, "k": k, "shards": shards, "out": out,
            "chain": [k / "cs.npy", k / "sd.npy", k / "dbp.npy"]}


def _table(page: str, tid: str) -> list[list[str]]:
    """Rows of a table of the page: each cell's exact value (data-v) or its text."""
    body = re.search(rf'<table id="{tid}">.*?<tbody>(.*?)</tbody>', page, re.S).group(1)
    rows = []
    for tr in re.findall(r"<tr>(.*?)</tr>", body, re.S):
        rows.append([m[0] if m[0] else m[1] for m in re.findall(r'<td(?: data-v="([^"]*)")?[^>]*>(.*?)</td>', tr, re.S)])
    return rows


def _shard_samples(shards) -> dict:
    """uid -> (jpg bytes, caption), read independently with tarfile."""
    out = {}
    for p in sorted(shards.glob("*.tar")):
        with tarfile.open(p) as tf:
            members = {m.name: tf.extractfile(m).read() for m in tf.getmembers()}
        for name, data in members.items():
            if name.endswith(".json"):
                key = name[:-5]
                out[json.loads(data)["uid"]] = (members[key + ".jpg"], members[key + ".txt"].decode())
    return out


def test_funnel_and_cluster_tables_match_the_keep_lists(chain):
    page = (chain["out"] / "index.html").read_text()
    assert "http://" not in page and "https://" not in page  # nothing from the network
    funnel = _table(page, "funnel")
    assert [r[0] for r in funnel] == ["pool", "clip-score", "semdedup", "dbp"]
    assert int(funnel[0][3]) == 3000
    assert [int(r[3]) for r in funnel[1:]] == [len(K.read_keep_list(p)) for p in chain["chain"]]
    for tag, name in (("step2", "sd"), ("step3", "dbp")):
        rows = _table(page, f"clusters-{tag}")
        t = pd.read_parquet(chain["k"] / f"{name}.clusters.parquet")
        assert len(rows) == len(t) and len(t) == 8
        cols = [c for c in ("cluster", "size", "d_intra", "d_inter", "complexity", "P", "budget_target", "kept")
                if c in t]
        for r, (_, ref) in zip(rows, t.iterrows()):
            for j, c in enumerate(cols):
                want = ref[c]
                got = float(r[j])
                assert (np.isnan(want) and np.isnan(got)) or got == float(want), (tag, c, got, want)
    for png in ("funnel.png", "step3_frac_vs_complexity.png", "step3_budget_vs_size.png", "step3_centroid_map.png",
                "diff.png"):
        assert png in page and Image.open(chain["out"] / png).size[0] > 100
    groups = json.loads((chain["out"] / "report.json").read_text())["semdedup"]["step2"]
    cs, sd = K.read_keep_list(chain["k"] / "cs.npy"), K.read_keep_list(chain["k"] / "sd.npy")
    assert len(groups) == 8
    for g in groups:  # the similarity to the member that removed it is its stored M_j, above 1 - eps
        assert g["similarity"] == pytest.approx(g["M"], abs=1e-5)
        r, by = U.uids_to_array([g["removed"]]), U.uids_to_array([g["by"]])
        assert not K.member(sd, r)[0][0] and K.member(cs, by)[0][0]
        assert K.member(sd, by)[0][0] == g["by_kept"]
    diff = json.loads((chain["out"] / "report.json").read_text())["diff"]
    rows = diff["per_cluster"]["rows"]
    assert sum(r[2] for r in rows) == len(K.read_keep_list(chain["k"] / "dbp.npy"))
    assert sum(r[3] for r in rows) == len(K.read_keep_list(chain["k"] / "rand.npy"))


def test_thumbnails_are_the_shard_members_of_the_right_uids(chain):
    from conceptprune.report.chain import load_step, locate_rows

    page = (chain["out"] / "index.html").read_text()
    samples = _shard_samples(chain["shards"])
    imgs = re.findall(r'<img class="(kept|dropped)" src="([^"]+)"[^>]*data-uid="([0-9a-f]{32})"', page)
    assert len(imgs) > 40
    dbp_keep = K.read_keep_list(chain["k"] / "dbp.npy")
    sd_keep = K.read_keep_list(chain["k"] / "sd.npy")
    for cls, src, uid in imgs:
        data = (chain["out"] / src).read_bytes()
        assert data == samples[uid][0]
        Image.open(io.BytesIO(data)).load()  # a real image
    # the DBP grid: kept/dropped as in the keep-list, members of the row's cluster, candidates of the step
    section = page.split('id="thumbs-step3"')[1].split("</table>")[0]
    step = load_step(chain["k"] / "dbp.npy")
    for tr in re.findall(r"<tr>(.*?)</tr>", section.split("<tbody>")[1], re.S):
        c = int(re.search(r'data-v="(\d+)"', tr).group(1))
        for cls, uid in re.findall(r'class="(kept|dropped)"[^>]*data-uid="([0-9a-f]{32})"', tr):
            q = U.uids_to_array([uid])
            assert bool(K.member(dbp_keep, q)[0][0]) == (cls == "kept")
            assert K.member(sd_keep, q)[0][0]
            assert int(locate_rows(step, q)[1][0]) == c


def test_index_is_reused_and_reads_samples_by_byte_range(chain):
    from conceptprune.report.index import build_index

    idx = build_index(chain["shards"], chain["out"] / "uid_index")
    assert idx.build_s == 0 and len(idx) == 1500  # reused, built by the report (under its --out)
    samples = _shard_samples(chain["shards"])
    for uid in list(samples)[::97]:
        s = idx.read(uid)
        assert s.parts["jpg"] == samples[uid][0] and s.parts["txt"].decode() == samples[uid][1]
    assert idx.read("0" * 32) is None


def test_report_renders_in_headless_chromium(chain, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("no Chromium on this machine (apt-get install chromium)")
    shot = tmp_path / "shot.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                    "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}", "--hide-scrollbars",
                    "--window-size=1280,2600", f"--screenshot={shot}", (chain["out"] / "index.html").as_uri()],
                   check=True, capture_output=True, timeout=120)
    px = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert px.std() > 20, "blank screenshot"
    blue = (np.abs(px - [31, 119, 180]).sum(-1) < 40).sum()  # matplotlib's blue: the plots loaded
    green = (np.abs(px - [34, 170, 34]).sum(-1) < 30).sum()  # the kept thumbnails' border
    red = (np.abs(px - [204, 34, 34]).sum(-1) < 30).sum()
    assert blue > 2000 and green > 500 and red > 500, (blue, green, red)


def _explain(chain, uid, capsys) -> dict:
    _cli("explain", uid, "--chain", *chain["chain"], "--shards", chain["shards"], "--json",
         "--thumb-dir", chain["dir"] / "ex", "--index", chain["out"] / "uid_index")
    return json.loads(capsys.readouterr().out)


def test_explain_names_the_step_and_the_reason(chain, capsys):
    pool = pd.concat([pd.read_parquet(p) for p in sorted(chain["pool"].glob("*.parquet"))], ignore_index=True)
    uids = U.uids_to_array(pool["uid"].tolist())
    cs, sd, db = (K.read_keep_list(p) for p in chain["chain"])
    samples = _shard_samples(chain["shards"])
    in_shards = np.array([u in samples for u in pool["uid"]])
    pick = {}
    for name, mask in (("clip", ~K.member(cs, uids)[0]),
                       ("semdedup", K.member(cs, uids)[0] & ~K.member(sd, uids)[0]),
                       ("dbp", K.member(sd, uids)[0] & ~K.member(db, uids)[0]),
                       ("kept", K.member(db, uids)[0])):
        pick[name] = int(np.flatnonzero(mask & in_shards)[0])

    r = _explain(chain, pool["uid"][pick["clip"]], capsys)
    s = r["steps"][0]
    assert r["fate"] == "dropped at step 1 (clip-score)" and s["status"] == "dropped"
    assert s["score"] == pytest.approx(float(pool["clip_b32_similarity_score"][pick["clip"]])) and s["score"] < s["threshold"]
    assert [x["status"] for x in r["steps"][1:]] == ["not a candidate (dropped earlier)"] * 2
    smp = r["sample"]
    assert open(smp["image"], "rb").read() == samples[pool["uid"][pick["clip"]]][0]
    assert smp["caption"] == pool["text"][pick["clip"]]

    r = _explain(chain, pool["uid"][pick["semdedup"]], capsys)
    s = r["steps"][1]
    assert r["fate"] == "dropped at step 2 (semdedup)"
    assert s["M"] > 1 - s["eps"] and s["similarity"] == pytest.approx(s["M"], abs=1e-5)
    assert K.member(cs, U.uids_to_array([s["removed_by"]]))[0][0]  # a fellow candidate removed it

    r = _explain(chain, pool["uid"][pick["dbp"]], capsys)
    s = r["steps"][2]
    assert r["fate"] == "dropped at step 3 (dbp)" and s["rank"] > s["budget"]
    t = pd.read_parquet(chain["k"] / "dbp.clusters.parquet")
    assert s["budget"] == int(t["kept"][s["cluster"]]) and s["cluster_candidates"] == int(t["size"][s["cluster"]])

    r = _explain(chain, pool["uid"][pick["kept"]], capsys)
    assert r["fate"] == "kept by every step" and [x["status"] for x in r["steps"]] == ["kept"] * 3
    assert r["steps"][2]["rank"] <= r["steps"][2]["budget"]
    assert r["steps"][0]["score"] >= r["steps"][0]["threshold"]

    capsys.readouterr()
    _cli("explain", "0123456789abcdef0123456789abcdef", "--chain", *chain["chain"], "--json")
    assert json.loads(capsys.readouterr().out)["fate"].startswith("not in the pool")
    assert main(["explain", "xyz", "--chain", str(chain["chain"][0])]) == 2


def test_index_rebuilds_when_a_shard_changes_and_bad_inputs_are_one_line_errors(chain, tmp_path, capsys):
    from conceptprune.report.fixtures import write_shards
    from conceptprune.report.index import build_index

    shards = tmp_path / "shards"
    write_shards(chain["pool"], shards, rows=np.arange(0, 40), per_shard=15)
    a = build_index(shards, tmp_path / "idx", workers=2)
    assert len(a) == 40 and len(a.shards) == 3
    write_shards(chain["pool"], shards, rows=np.arange(100, 130), per_shard=15)  # rewrites shards 0 and 1
    b = build_index(shards, tmp_path / "idx")
    assert b.build_s > 0 and len(b) == 30 + 10  # 30 new samples + the old third shard's 10
    pool = pd.concat([pd.read_parquet(p) for p in sorted(chain["pool"].glob("*.parquet"))], ignore_index=True)
    assert b.read(pool["uid"][105]).parts["txt"].decode() == pool["text"][105]
    assert b.read(pool["uid"][5]) is None and b.read(pool["uid"][35]) is not None

    bare = tmp_path / "bare.npy"
    np.save(bare, K.read_keep_list(chain["k"] / "cs.npy"))
    capsys.readouterr()
    assert main(["report", str(bare), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert "no manifest" in err and len(err.splitlines()) == 1
    assert main(["report", str(chain["k"] / "cs.npy"), "--shards", str(tmp_path / "none"),
                 "--out", str(tmp_path / "r")]) == 2
    assert "not a folder" in capsys.readouterr().err


def test_explain_reasons_agree_with_the_keep_lists(chain, capsys):
    """Every reason explain gives is checked against the data: DBP's rank is the sample's place
    in its cluster (hardest first) and the cluster's kept members are exactly the ranks within
    the budget; SemDeDup's near duplicate has the stated cosine, above 1 - eps, in the embeddings."""
    from conceptprune.report.chain import load_step, locate_rows
    from tests.conftest import read_embeddings

    pool = pd.concat([pd.read_parquet(p) for p in sorted(chain["pool"].glob("*.parquet"))], ignore_index=True)
    uids = U.uids_to_array(pool["uid"].tolist())
    cs, sd, db = (K.read_keep_list(p) for p in chain["chain"])
    step = load_step(chain["k"] / "dbp.npy")
    _, cl, dist = locate_rows(step, sd)
    in_sd, in_db = K.member(sd, uids)[0], K.member(db, uids)[0]
    for row in np.flatnonzero(in_sd & ~in_db)[:3].tolist() + np.flatnonzero(in_db)[:2].tolist():
        s = _explain(chain, pool["uid"][row], capsys)["steps"][2]
        j = int(K.member(sd, uids[row:row + 1])[1][0])
        members = np.flatnonzero(cl == cl[j])
        hi, lo = U.split(sd[members])
        order = members[np.lexsort((lo, hi, -dist[members]))]  # furthest first, ties by uid
        assert s["cluster"] == int(cl[j]) and s["distance"] == pytest.approx(float(dist[j]))
        assert s["rank"] == int(np.flatnonzero(order == j)[0]) + 1 and s["cluster_candidates"] == len(members)
        kept_ranks = np.flatnonzero(K.member(db, sd[order])[0]) + 1
        assert kept_ranks.tolist() == list(range(1, s["budget"] + 1))
        assert (s["status"] == "kept") == (s["rank"] <= s["budget"]) == bool(in_db[row])

    emb = read_embeddings(chain["pool"], "b32_img")
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    for row in np.flatnonzero(K.member(cs, uids)[0] & ~in_sd)[:3]:
        s = _explain(chain, pool["uid"][row], capsys)["steps"][1]
        by = int(np.flatnonzero(pool["uid"] == s["removed_by"])[0])
        assert s["status"] == "dropped" and "near duplicate of " + s["removed_by"] in s["why"]
        assert float(emb[row] @ emb[by]) == pytest.approx(s["similarity"], abs=2e-3)
        assert s["M"] > 1 - s["eps"] and s["similarity"] == pytest.approx(s["M"], abs=1e-5)


def test_explain_basic_and_laion2b_checks(chain, tmp_path, capsys):
    """The per-row baselines: explain recomputes each check with the manifest's language model;
    a candidate passes them all exactly when the step kept it."""
    k = tmp_path
    _cli("filter", "basic", "--pool", chain["pool"], "--out", k / "basic.npy")
    _cli("filter", "laion2b", "--pool", chain["pool"], "--within", k / "basic.npy", "--out", k / "l2b.npy")
    pool = pd.concat([pd.read_parquet(p) for p in sorted(chain["pool"].glob("*.parquet"))], ignore_index=True)
    uids = U.uids_to_array(pool["uid"].tolist())
    b, l2 = K.member(K.read_keep_list(k / "basic.npy"), uids)[0], K.member(K.read_keep_list(k / "l2b.npy"), uids)[0]
    picks = {"basic": np.flatnonzero(~b)[:4], "laion2b": np.flatnonzero(b & ~l2)[:4], "kept": np.flatnonzero(l2)[:2]}
    assert all(len(v) for v in picks.values()), {n: len(v) for n, v in picks.items()}
    for fate, rows in picks.items():
        for row in rows.tolist():
            capsys.readouterr()
            _cli("explain", pool["uid"][row], "--chain", k / "basic.npy", k / "l2b.npy", "--json")
            r = json.loads(capsys.readouterr().out)
            s1, s2 = r["steps"]
            text = pool["text"][row] or ""
            assert (s1["words"], s1["chars"]) == (len(text.split()), len(text))
            assert (s1["width"], s1["height"]) == (pool["original_width"][row], pool["original_height"][row])
            assert all(s1["checks"].values()) == bool(b[row]) and s1["status"] == ("kept" if b[row] else "dropped")
            if fate == "basic":
                assert r["fate"] == "dropped at step 1 (basic)" and "fails: " in s1["why"]
                assert s2["status"] == "not a candidate (dropped earlier)"
                continue
            assert s2["score"] == pytest.approx(float(pool["clip_b32_similarity_score"][row]))
            assert s2["threshold"] == 0.28 and s2["langid"] == "gcld3"
            assert all(s2["checks"].values()) == bool(l2[row])
            assert r["fate"] == ("kept by every step" if fate == "kept" else "dropped at step 2 (laion2b)")


def _tar_reference(tars) -> tuple[bytes, bytes]:
    """uids.npy and loc.npy as np.save writes them, from an independent read with tarfile: a
    sample's range runs from its first member's header to its last member's padded data; sorted
    by uid (stable, so ties stay in shard order) and the first of equal uids kept."""
    from conceptprune.report.index import LOC_DTYPE

    recs = []
    for s, p in enumerate(tars):
        with tarfile.open(p) as tf:
            groups = {}
            for m in tf.getmembers():
                key = m.name.rpartition("/")[2].partition(".")[0]
                g = groups.setdefault(key, {"start": m.offset, "uid": ""})
                g["end"] = m.offset_data + -(-m.size // 512) * 512
                if m.name.endswith(".json"):
                    g["uid"] = json.loads(tf.extractfile(m).read()).get("uid", "")
            recs += [(g["uid"], s, g["start"], g["end"] - g["start"]) for g in groups.values() if g["uid"]]
    u = U.uids_to_array([r[0] for r in recs])
    loc = np.array([r[1:] for r in recs], dtype=LOC_DTYPE)
    hi, lo = U.split(u)
    o = np.lexsort((lo, hi))
    u, loc = u[o], loc[o]
    keep = ~K.duplicate_mask(u)
    out = []
    for arr in (u[keep], loc[keep]):
        buf = io.BytesIO()
        np.save(buf, arr)
        out.append(buf.getvalue())
    return out[0], out[1]


def test_index_external_sort_is_byte_identical_for_any_budget(tmp_path, capsys):
    """Several sorted runs (a tiny budget), one run, one or three scanning workers: the same
    files, equal to an independent tarfile reading; repeated uids keep the first sample in
    shard order; a GNU-format shard (not plain) is read member by member; lookups are on the
    memory-mapped files."""
    from conceptprune.tars import Sample, ShardWriter
    from conceptprune.report.index import build_index

    shards = tmp_path / "shards"
    shards.mkdir()
    rng = np.random.default_rng(5)
    seen = []
    for s in range(6):
        w = ShardWriter(shards / f"{s:05d}.tar")
        for i in range(700):
            if seen and rng.random() < 0.03:
                uid = seen[int(rng.integers(len(seen)))]  # the same uid in another sample
            else:
                uid = "".join(rng.choice(list("0123456789abcdef"), 32))
            parts = {"jpg": bytes(int(rng.integers(1, 1500))), "json": json.dumps({"uid": uid}).encode()}
            if i % 97 == 5:
                parts["json"] = b'{"caption": "no uid"}'
            else:
                seen.append(uid)
            w.write(Sample(f"{s:05d}{i:05d}", parts))
        w.close()
    with tarfile.open(shards / "00006.tar", "w", format=tarfile.GNU_FORMAT) as tf:
        for i in range(30):
            for ext, data in (("jpg", b"img"), ("json", json.dumps({"uid": seen[i * 7]}).encode())):
                info = tarfile.TarInfo(f"{'long' * 30}{i}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    tars = sorted(shards.glob("*.tar"))
    ref_u, ref_l = _tar_reference(tars)
    built = {}
    for memory, workers in (("64K", 1), ("64K", 3), ("1G", 1)):
        idx = build_index(shards, tmp_path / f"i{memory}{workers}", workers=workers, memory=memory)
        built[memory, workers] = idx
        assert (idx.folder / "uids.npy").read_bytes() == ref_u, (memory, workers)
        assert (idx.folder / "loc.npy").read_bytes() == ref_l, (memory, workers)
        assert not list(idx.folder.glob(".runs-*")) and not list(idx.folder.glob(".*tmp*"))
    assert built["64K", 1].stats["runs"] >= 4 and built["1G", 1].stats["runs"] == 1
    assert built["64K", 1].stats["duplicates"] > 0
    idx = build_index(shards, tmp_path / "i64K1")  # reused: memory-mapped, found by binary search
    assert idx.build_s == 0 and isinstance(idx.uids, np.memmap) and isinstance(idx.loc, np.memmap)
    want = U.uids_to_array(sorted(set(seen)))
    extra = U.uids_to_array(["f" * 32, "0" * 32, "a" * 32])
    found, pos = idx.lookup(np.concatenate([want, extra]))
    assert found[:len(want)].all() and not found[len(want):].any()
    assert (idx.uids[pos[:len(want)]] == want).all()
    first = {}
    for s, p in enumerate(tars):  # the sample read for a repeated uid is its first one in shard order
        with tarfile.open(p) as tf:
            for m in tf.getmembers():
                if m.name.endswith(".json"):
                    u = json.loads(tf.extractfile(m).read()).get("uid")
                    if u and u not in first:
                        first[u] = (s, m.name)
    for u in [x for x in seen if seen.count(x) > 1][:10]:
        assert int(idx.loc[idx.lookup(U.uids_to_array([u]))[1][0]]["shard"]) == first[u][0]
    with pytest.raises(Exception, match="index-memory"):
        build_index(shards, tmp_path / "bad", memory="lots")
    assert main(["report", "x.npy", "--shards", str(shards), "--index-memory", "1", "--out", str(tmp_path / "r")]) == 2


def test_an_index_build_removes_the_runs_a_killed_build_left(tmp_path):
    """A build killed mid-sort leaves its ``.runs-PID-*`` folder; the next build removes it,
    but not the runs of a build whose process still lives."""
    from conceptprune.tars import Sample, ShardWriter
    from conceptprune.report.index import build_index

    shards = tmp_path / "shards"
    shards.mkdir()
    w = ShardWriter(shards / "00000.tar")
    for i in range(20):
        w.write(Sample(f"{i:05d}", {"jpg": b"x", "json": json.dumps({"uid": f"{i:032x}"}).encode()}))
    w.close()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    folder = tmp_path / "index"
    orphan, live = folder / f".runs-{gone.pid}-abc", folder / f".runs-{os.getpid()}-def"
    for d in (orphan, live):
        d.mkdir(parents=True)
        (d / "run000000.u.npy").write_bytes(b"partial")
    idx = build_index(shards, folder, workers=1)
    assert idx.stats["samples"] == 20
    assert not orphan.exists() and live.exists()
