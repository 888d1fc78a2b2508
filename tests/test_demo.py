"""The demo end to end in a CI-sized configuration (the full one is `make demo`)."""

import json
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from conceptprune.apps.demo import DemoConfig, run_demo


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("quick") / "demo"
    return out, run_demo(DemoConfig(out=str(out), quick=True))


def test_quick_demo_runs_every_stage_and_writes_the_report(quick_demo):
    out, report = quick_demo
    assert report == out / "report.html"
    html = report.read_text()
    for piece in ("<table>", "accuracy.png", "dbp_clusters.png", "prototypes.png", "Pipeline"):
        assert piece in html
    for png in ("accuracy.png", "dbp_clusters.png", "prototypes.png"):
        assert (out / png).stat().st_size > 5000
    rep = json.loads((out / "report.json").read_text())
    assert set(rep["results"]) == {"full", "random", "dbp"}
    c = rep["counts"]
    assert c["downloaded"] == c["pool"] and c["semdedup -> dbp"] == c["random"] < c["after clip score"] <= c["after semdedup"]
    for run in ("full", "random", "dbp"):  # every stage produced its artefact through the normal paths
        assert json.loads((out / "runs" / run / "run.json").read_text())["status"] == "finished"
        assert 0.0 <= rep["results"][run]["demo/digits"]["acc1"] <= 1.0
    assert (out / "data" / "shards_dbp" / "meta.json").exists()
    assert (out / "filters" / "dbp.clusters.parquet").exists()


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
