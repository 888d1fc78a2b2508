"""The demo end to end in a CI-sized configuration (the full one is `make demo`)."""

import json

from conceptprune.demo import DemoConfig, run_demo


def test_quick_demo_runs_every_stage_and_writes_the_report(tmp_path):
    report = run_demo(DemoConfig(out=str(tmp_path / "demo"), quick=True))
    out = tmp_path / "demo"
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
