"""The demo end to end in a CI-sized configuration (the full one is `make demo`)."""

import json
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from conceptprune.apps.demo import ARMS, DemoConfig, run_demo, summarize, verdict


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("quick") / "demo"
    # every filter runs; of the subset arms only DBP is trained (random and CLIP score train the
    # same way, on their own reshard): 4 trainings instead of 8 keep the test short
    return out, run_demo(DemoConfig(out=str(out), quick=True, only=("dbp",)))


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
    arms = ["full", "dbp"]
    assert list(rep["summary"]) == arms and rep["seeds"] == [0, 1]
    c, kept = rep["counts"], rep["kept"]
    assert c["downloaded"] == c["pool"] == kept["full"]
    # the subsets have exactly the same size
    assert kept["random"] == kept["clip-score"] == kept["dbp"] == c["semdedup -> clip score -> dbp"] \
        < c["after clip score"] <= c["after semdedup"]
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
    assert list(again["results"]) == ["full"] and again["kept"] == first["kept"]
    filters = sorted(k for k in first["fingerprints"] if k.startswith("filters/"))
    assert filters == sorted(k for k in again["fingerprints"] if k.startswith("filters/")) and len(filters) == 5
    for key in filters + ["runs/full-s0"]:
        assert again["fingerprints"][key] == first["fingerprints"][key], key
    assert again["results"]["full"]["0"] == first["results"]["full"]["0"]


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
