"""The demo end to end in a CI-sized configuration (the full one is `make demo`)."""

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conceptprune.apps.demo import ARMS, DemoConfig, build_target, run_demo, summarize, train_ckpt, verdict
from conftest import uid_set


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("quick") / "demo"
    # every filter of the DBP chain and the baselines runs; of the subset arms only DBP and
    # negCLIPLoss -> NormSim (filtered only when asked for) are trained (random and CLIP score
    # train the same way, on their own reshard): 6 trainings instead of 10 keep the test short
    return out, run_demo(DemoConfig(out=str(out), quick=True, only=("dbp", "negclip")))


def test_quick_demo_trains_each_arm_with_two_seeds_and_writes_the_report(quick_demo):
    out, report = quick_demo
    assert report == out / "report.html"
    html = report.read_text()
    for piece in ("<table>", "accuracy.png", "dbp_clusters.png", "prototypes.png", "Pipeline",
                  'src="chain_report/index.html"', "Does DBP add anything over CLIP score?"):
        assert piece in html
    assert (out / "chain_report" / "index.html").exists()
    for png in ("accuracy.png", "dbp_clusters.png", "prototypes.png"):
        assert (out / png).stat().st_size > 5000
    rep = json.loads((out / "report.json").read_text())
    arms = ["full", "dbp", "negclip"]
    assert list(rep["summary"]) == arms and rep["seeds"] == [0, 1]
    c, kept = rep["counts"], rep["kept"]
    assert c["downloaded"] == c["pool"] == kept["full"]
    # the subsets have exactly the same size
    assert kept["random"] == kept["clip-score"] == kept["dbp"] == kept["negclip"] \
        == c["semdedup -> clip score -> dbp"] < c["after clip score"] <= c["after semdedup"]
    for arm in arms:  # every stage produced its artefact through the normal paths
        for seed in (0, 1):
            run = json.loads((out / "runs" / f"{arm}-s{seed}" / "run.json").read_text())
            assert run["status"] == "finished" and run["seed"] == seed
            assert run["recipe"]["samples_seen"] == DemoConfig(quick=True).scaled().samples_seen
        s = rep["summary"][arm]["demo/digits"]
        values = [rep["results"][arm][str(seed)]["demo/digits"]["acc1"] for seed in (0, 1)]
        assert s["values"] == values and s["min"] <= s["mean"] <= s["max"] and 0.0 <= s["min"] <= s["max"] <= 1.0
        assert ARMS[arm] in "\n".join(rep["table"])
    # the two seeds are two different trainings
    assert rep["fingerprints"]["runs/dbp-s0"] != rep["fingerprints"]["runs/dbp-s1"]
    assert (out / "data" / "shards_dbp" / "meta.json").exists() and not (out / "data" / "shards_random").exists()
    assert (out / "filters" / "dbp.clusters.parquet").exists()


def test_a_rerun_gives_the_same_keep_lists_checkpoints_and_numbers(quick_demo, tmp_path):
    """Same seed, another run, in a third of the time (one training seed, no subset arm trained:
    download, the full-pool training, embedding and every filter are redone): every keep-list,
    the full-pool checkpoint and its numbers are identical."""
    out, _ = quick_demo
    first = json.loads((out / "report.json").read_text())
    run_demo(DemoConfig(out=str(tmp_path / "again"), quick=True, train_seeds=1, only=()))
    again = json.loads((tmp_path / "again" / "report.json").read_text())
    assert list(again["results"]) == ["full"] and again["kept"] == {k: v for k, v in first["kept"].items()
                                                                    if k != "negclip"}
    # the negCLIPLoss -> NormSim arm is not filtered when not asked for (only=()); the rest is identical
    filters = sorted(k for k in again["fingerprints"] if k.startswith(("filters/", "targets/")))
    assert len(filters) == 5 and not any("negclip" in k or "target" in k for k in filters)
    assert set(filters) < set(first["fingerprints"]) and "negclip" not in again["kept"]
    for key in filters + ["runs/full-s0"]:
        assert again["fingerprints"][key] == first["fingerprints"][key], key
    assert again["results"]["full"]["0"] == first["results"]["full"]["0"]


def _reference_negcliploss(emb, tau=0.01):
    """negCLIPLoss in float64, one batch a file (B >= every file's rows): s_i - R_i."""
    import pandas as pd

    uids, scores = [], []
    for pq in sorted(emb.glob("*.parquet")):
        z = np.load(pq.with_suffix(".npz"))
        f, g = z["img"].astype(np.float64), z["txt"].astype(np.float64)
        s = f @ g.T
        lse = lambda a, axis: a.max(axis) + np.log(np.exp(a - a.max(axis, keepdims=True)).sum(axis))  # noqa: E731
        scores.append(np.diag(s) - tau / 2 * (lse(s / tau, 1) + lse(s / tau, 0)))
        uids.append(pd.read_parquet(pq, columns=["uid"])["uid"].to_numpy())
    return np.concatenate(uids), np.concatenate(scores)


def _embeddings(emb, key):
    return np.concatenate([np.load(p.with_suffix(".npz"))[key].astype(np.float64)
                           for p in sorted(emb.glob("*.parquet"))])


def _top(uids, scores, k, band=1e-5):
    """The top-k uids, and those within ``band`` of the cut (either side is fine there)."""
    order = np.argsort(-scores, kind="stable")
    cut = scores[order[k - 1]]
    return set(uids[order[:k]]), set(uids[np.abs(scores - cut) <= band])


def test_quick_demo_negcliploss_then_normsim_arm(quick_demo, tmp_path):
    """The arm keeps exactly the other arms' size, is trained with both seeds and the same samples
    seen, and its list is negCLIPLoss (top round(1.5 x size)) and then NormSim-inf within it
    against the printed-digit target: equal to the two filters called here, and to a float64
    recomputation of both scores."""
    from conceptprune import keeplist as K
    from conceptprune.filters import negcliploss, normsim
    from conceptprune.pool import Pool
    from conceptprune.slurm.stage import Executor

    out, _ = quick_demo
    rep = json.loads((out / "report.json").read_text())
    size = rep["kept"]["dbp"]
    assert rep["kept"]["negclip"] == size == rep["kept"]["random"] == rep["kept"]["clip-score"]
    assert "negCLIPLoss -> NormSim" in "\n".join(rep["table"]) and set(rep["results"]["negclip"]) == {"0", "1"}
    for seed in (0, 1):
        run = json.loads((out / "runs" / f"negclip-s{seed}" / "run.json").read_text())
        assert run["status"] == "finished" and run["seed"] == seed
        assert run["recipe"]["samples_seen"] == DemoConfig(quick=True).scaled().samples_seen
        assert run["recipe"]["samples_seen"] == json.loads((out / "runs" / f"dbp-s{seed}" / "run.json")
                                                           .read_text())["recipe"]["samples_seen"]
    # the target: printed digits embedded by the full-pool model, named and described without 'test'
    target = out / "targets" / "printed_digits.npy"
    t = np.load(target)
    manifest = json.loads(target.with_suffix(".json").read_text())
    assert t.shape[0] == 10 * DemoConfig(quick=True).scaled().target_per_digit == manifest["rows"]
    assert np.allclose(np.linalg.norm(t, axis=1), 1, atol=2e-3) and "test" not in json.dumps(manifest).lower()
    assert (target.parent / manifest["checkpoint"]).resolve() == Path(train_ckpt(out / "runs" / "full-s0")).resolve()
    assert manifest["checkpoint_sha256"] == rep["fingerprints"]["runs/full-s0"]
    assert not json.loads((out / "filters" / "negclip.json").read_text())["stats"].get("warnings")
    # rebuilt from the same checkpoint and seed: the same target, bit for bit
    again = build_target(tmp_path / "target.npy", train_ckpt(out / "runs" / "full-s0"), DemoConfig(quick=True).scaled())
    assert np.array_equal(np.load(again), t)

    emb, n = out / "embeddings", rep["kept"]["full"]
    first = min(n, round(DemoConfig().negclip_first * size))
    inline = Executor.create("inline")
    nc = negcliploss(Pool(emb), keep_count=first, arch="embed", seed=0, executor=inline)
    K.write_keep_list(tmp_path / "first.npy", K.sort_uids(np.asarray(nc.uids)))
    ns = normsim(Pool(emb), target=str(target), norm="inf", keep_count=size, arch="embed",
                 within=tmp_path / "first.npy", executor=inline)
    demo_first = uid_set(K.read_keep_list(out / "filters" / "negcliploss.npy"))
    demo_final = uid_set(K.read_keep_list(out / "filters" / "negclip.npy"))
    assert len(demo_first) == first == rep["counts"]["negcliploss"] and len(demo_final) == size
    assert demo_first == uid_set(nc.uids) and demo_final == uid_set(ns.uids) and demo_final <= demo_first
    # independent float64 scores: negCLIPLoss's top `first`, then NormSim-inf's top `size` of those
    uids, score = _reference_negcliploss(emb)
    top, tied = _top(uids, score, first)
    assert demo_first ^ top <= tied
    cand = np.isin(uids, list(demo_first))
    ns_ref = np.abs(_embeddings(emb, "img")[cand] @ t.astype(np.float64).T).max(axis=1)
    top, tied = _top(uids[cand], ns_ref, size)
    assert demo_final ^ top <= tied


def test_summary_and_verdict():
    s = summarize([0.2, 0.4])
    assert s == {"values": [0.2, 0.4], "mean": pytest.approx(0.3), "std": pytest.approx(0.1414, abs=1e-4),
                 "min": 0.2, "max": 0.4}
    summary = {"dbp": {"demo/digits": summarize([0.35, 0.4])}, "clip-score": {"demo/digits": summarize([0.3, 0.32])}}
    assert "+0.065" in verdict(summary) and "every SemDeDup -> CLIP score -> DBP seed is above" in verdict(summary)
    summary["clip-score"] = {"demo/digits": summarize([0.3, 0.36])}
    assert "overlap" in verdict(summary)
    assert verdict({"dbp": summary["dbp"]}) == ""


def test_report_renders_in_headless_chromium(quick_demo, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        pytest.skip("no Chromium on this machine (apt-get install chromium)")
    _, report = quick_demo
    shot = tmp_path / "report.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    "--window-size=1280,2400", f"--screenshot={shot}", report.as_uri()],
                   check=True, capture_output=True, timeout=180)
    px = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    # the accuracy plot's bars are matplotlib's default blue: they only show if the images loaded
    blue = (np.abs(px - [31, 119, 180]).sum(-1) < 40).sum()
    assert blue > 2000, f"the plots did not render ({blue} plot-blue pixels)"
