"""`conceptprune report` and `explain` on a real chain (clip-score -> semdedup -> dbp) made with the
real CLI from a generated pool, with webdataset shards for half of its rows."""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
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
    _cli("filter", "clip-score", "--pool", pool, "--out", k / "cs.npy", "--fraction", 0.7, "--model", "b32")
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

    idx = build_index(chain["shards"])
    assert idx.build_s == 0 and len(idx) == 1500  # reused, built by the report
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
         "--thumb-dir", chain["dir"] / "ex")
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
    a = build_index(shards, workers=2)
    assert len(a) == 40 and len(a.shards) == 3
    write_shards(chain["pool"], shards, rows=np.arange(100, 130), per_shard=15)  # rewrites shards 0 and 1
    b = build_index(shards)
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
