"""compare against published results (issue 24): the shipped reference table read and checked on
its real contents, per-task deltas and aggregates against an independent computation, the paired
bootstrap against an independent one and the analytic interval, a leaderboard rank,
comparison.html in headless Chromium, per-example outcomes from evaluate, openclip:ARCH/TAG."""

import csv
import json
import logging
import os
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

from conceptprune.errors import ConfigError
from conceptprune.slurm.stage import Executor
from conceptprune.evaluation import baselines as B
from conceptprune.evaluation import bootstrap as BS
from conceptprune.evaluation.compare import compare
from conceptprune.evaluation.tasks import BY_KEY, TASKS

from test_evaluation import EVAL_TASKS, eval_data  # noqa: F401 (the fixture)

REF = B.REFERENCE
MAIN = [t for t in TASKS if t.main_metric is not None]
SHIFTS = ["imagenet_sketch", "imagenetv2", "imagenet-a", "imagenet-o", "imagenet-r", "objectnet"]
VTAB = [t.key for t in TASKS if t.key.startswith("vtab/")] + ["sun397"]
RETR = ["retrieval/flickr_1k_test_image_text_retrieval", "retrieval/mscoco_2014_5k_test_image_text_retrieval",
        "misc/winogavil"]
# what the shipped files' rows fail (found by the reader and by the independent check below); none fails
# the average or the [0, 1] check: the stored averages are within the files' rounding of the means
EXPECTED_PROBLEMS = {
    "ViT-B-16/commonpool_l_image_s1b_b8k": ["disagrees with its leaderboard entry"],
    "ViT-B-16/commonpool_l_text_s1b_b8k": ["disagrees with its leaderboard entry"],
    "ViT-B-32/commonpool_s_image_s13m_b4k": ["the same 38 task values as line 118",
                                            "disagrees with its leaderboard entry"],
    "ViT-B-32/datacomp_s_s13m_b4k": ["the same 38 task values as line 117"],
    "ViT-B-32/commonpool_s_basic_s13m_b4k": ["disagrees with its leaderboard entry"],
    "ViT-B-32/commonpool_s_s13m_b4k": ["disagrees with its leaderboard entry"],
}


def _raw_csv(path=REF / "openclip_results.csv"):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_reference_reader_on_the_shipped_files():
    ref = B.load(warn=False)
    raw = _raw_csv()
    assert len(ref.models) == len(raw) == 121
    sources = json.loads((REF / "sources.json").read_text())["files"]
    assert sources["openclip_results.csv"]["commit"].startswith("89fb801")
    assert set(sources) == {"openclip_results.csv", *(f"{k}_{s}.tsv" for k in ("filter", "byod") for s in B.SCALES)}
    # every row's average checked here independently: mean of the 38 task columns vs the stored one
    failing_average, failing_range = [], []
    for r, m in zip(raw, ref.models):
        vals = [float(r[t.name]) for t in MAIN]
        assert m.name == f"{r['name']}/{r['pretrained']}" and [m.tasks[t.key] for t in MAIN] == vals
        if abs(np.mean(vals) - float(r["Average perf. on 38 datasets"])) > 1e-4 + 1e-9:
            failing_average.append(m.name)
        if not all(0 <= v <= 1 for v in vals):
            failing_range.append(m.name)
    assert failing_average == [] and failing_range == []
    flagged = {m.name: list(m.problems) for m in ref.models if m.problems}
    assert set(flagged) == set(EXPECTED_PROBLEMS), flagged
    for name, parts in EXPECTED_PROBLEMS.items():
        assert len(flagged[name]) == len(parts) and all(p in f for p, f in zip(parts, flagged[name])), flagged[name]
    # leaderboards: every line of every file, as written
    for s in B.SCALES:
        for kind, track in (("filter", "filtering"), ("byod", "byod")):
            lines = [x.split("\t") for x in (REF / f"{kind}_{s}.tsv").read_text().splitlines() if x.strip()]
            got = ref.board(s, track)
            assert [e.entry for e in got] == [x[1].strip() for x in lines]
            assert [e.average for e in got] == [float(x[3]) for x in lines]
    # DataComp's baselines at all four scales come from their checkpoints' per-task rows
    counts = {s: len(ref.datacomp_baselines(s)) for s in B.SCALES}
    assert counts == {"small": 7, "medium": 7, "large": 7, "xlarge": 4}
    clip_m = next(r for r in B.rows("medium") if r["tag"] == "commonpool_m_clip_s128m_b4k")
    assert clip_m["Average"] == pytest.approx(0.3278, abs=1e-4) and clip_m["ImageNet"] == 0.2725
    assert clip_m["kept"] == 38_000_000  # from the medium leaderboard's baseline entry


def test_reader_names_bad_rows_and_reads_columns_by_name(tmp_path, caplog):
    raw = _raw_csv()
    cols = list(raw[0])
    cols = [c for c in cols if c not in ("params (M)", "FLOPs (B)")] + ["FLOPs (B)", "params (M)"]  # moved
    raw[3]["Average perf. on 38 datasets"] = "0.9999"  # corrupted average
    raw[7]["MNIST"] = "1.2"  # outside [0, 1]
    d = tmp_path / "ref"
    d.mkdir()
    with open(d / "openclip_results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(raw)
    shutil.copy(REF / "filter_medium.tsv", d / "filter_medium.tsv")
    with caplog.at_level(logging.WARNING):
        ref = B.load(d)
    bad = {m.name: m.problems for m in ref.models if any("average" in p or "outside" in p for p in m.problems)}
    n3, n7 = f"{raw[3]['name']}/{raw[3]['pretrained']}", f"{raw[7]['name']}/{raw[7]['pretrained']}"
    assert set(bad) == {n3, n7}
    assert "stored average 0.9999 is not the mean" in bad[n3][0] and "MNIST=1.2" in " ".join(bad[n7])
    assert f"line 5 ({n3})" in caplog.text and f"line 9 ({n7})" in caplog.text  # named, and still there
    assert ref.models[3].average == 0.9999 and ref.models[0].params_m == float(raw[0]["params (M)"])
    del raw[0]["Flickr"]
    with open(d / "openclip_results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[c for c in cols if c != "Flickr"])
        w.writeheader()
        w.writerows(raw[:1])
    with pytest.raises(ConfigError, match="Flickr"):
        B.load(d)


def _results(path: Path, seed: int, keys=None) -> dict:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    vals = {}
    with open(path, "w") as f:
        for t in TASKS:
            if keys is not None and t.key not in keys:
                continue
            v = None if t.main_metric is None else round(float(rng.uniform(0.1, 0.9)), 6)
            vals[t.key] = v
            f.write(json.dumps({"key": t.key, "dataset": t.name, "metrics": {"main_metric": v}}) + "\n")
    return vals


def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_per_task_deltas_and_aggregates_against_a_baseline(tmp_path, capsys):
    from conceptprune.cli import main

    vals = _results(tmp_path / "mine" / "eval_results.jsonl", 0)
    name = "ViT-B-32/commonpool_m_clip_s128m_b4k"
    main(["compare", str(tmp_path / "mine" / "eval_results.jsonl"), "--against", name,
          "Density-based Self-supervised Prototypes Pruning", "--baselines", "medium", "--out", str(tmp_path / "c")])
    printed = capsys.readouterr().out
    base = next(r for r in _raw_csv() if f"{r['name']}/{r['pretrained']}" == name)
    bvals = {t.key: float(base[t.name]) for t in MAIN}
    rows = {r["key"]: r for r in _read_csv(tmp_path / "c" / "per_task.csv")}
    col = f"delta mine - {name}"
    for t in MAIN:
        r = rows[t.key]
        assert float(r[name]) == bvals[t.key]
        assert float(r[col]) == pytest.approx(vals[t.key] - bvals[t.key], abs=1e-12)
        noise = 0.002  # no per-example outcomes: DataComp's seed noise alone
        assert float(r[f"{col} lo"]) == pytest.approx(vals[t.key] - bvals[t.key] - noise)
        want = "better" if vals[t.key] - bvals[t.key] > noise else "worse" if vals[t.key] - bvals[t.key] < -noise \
            else "within noise"
        assert r[f"{col} verdict"] == want
    avg = rows["average"]
    mine_avg, base_avg = np.mean([vals[t.key] for t in MAIN]), np.mean(list(bvals.values()))
    assert float(avg[col]) == pytest.approx(mine_avg - base_avg)
    assert float(avg[col + " hi"]) == pytest.approx(mine_avg - base_avg + 0.006)
    agg = {r["run"]: r for r in _read_csv(tmp_path / "c" / "aggregates.csv")}
    for who, v in (("mine", vals), (name, bvals)):
        a = agg[who]
        assert float(a["ImageNet"]) == pytest.approx(v["imagenet1k"])
        assert float(a["ImageNet dist. shifts"]) == pytest.approx(np.mean([v[k] for k in SHIFTS]))
        assert float(a["VTAB"]) == pytest.approx(np.mean([v[k] for k in VTAB]))
        assert float(a["Retrieval"]) == pytest.approx(np.mean([v[k] for k in RETR]))
        assert float(a["Average"]) == pytest.approx(np.mean([v[t.key] for t in MAIN]))
    dbp = agg["Density-based Self-supervised Prototypes Pruning"]  # a leaderboard entry: ImageNet and average
    assert (float(dbp["ImageNet"]), float(dbp["Average"]), dbp["VTAB"]) == (0.334, 0.345, "nan")
    assert "would rank" in printed and "baseline: image-based and CLIP score" in agg
    with pytest.raises(ConfigError, match="no OpenCLIP model/pretrained or leaderboard entry"):
        compare([str(tmp_path / "mine" / "eval_results.jsonl")], against=["ViT-B-32/no_such_tag"])


def test_baselines_list_and_update(tmp_path, capsys):
    from conceptprune.cli import main

    main(["baselines", "list", "--scale", "medium", "--search", "clip_s128m"])
    out = capsys.readouterr().out
    assert "ViT-B-32/commonpool_m_clip_s128m_b4k" in out and "0.2725" in out and "89fb801" in out
    assert "commonpool_s_" not in out
    d = tmp_path / "ref"
    shutil.copytree(REF, d)
    newer = tmp_path / "filter_medium.tsv"
    newer.write_text((REF / "filter_medium.tsv").read_text().rstrip("\n")
                     + "\n12-01-2026\tMy filter\t0.350\t0.391\t20000000\tme\t\n"
                     + "12-02-2026\tBroken entry\t35.0\t0.39\t-\tme\t\n")
    res = B.update(newer, folder=d, source={"commit": "f" * 40})
    assert res["rows"] == 25 and len(res["problems"]) == 1 and "Broken entry" in res["problems"][0]
    ref = B.load(d, warn=False)
    assert [e.entry for e in ref.board("medium")][-2:] == ["My filter", "Broken entry"]
    assert json.loads((d / "sources.json").read_text())["files"]["filter_medium.tsv"]["commit"] == "f" * 40
    assert B.rank(0.392, "medium", ref=ref)[0] == 2 and B.rank(0.3905, "medium", ref=ref)[0] == 3  # 0.402, 0.391
    with pytest.raises(ConfigError, match="not a reference file name"):
        B.update(tmp_path / "other.tsv", folder=d)


def test_leaderboard_rank():
    lines = [x.split("\t") for x in (REF / "filter_medium.tsv").read_text().splitlines() if x.strip()]
    avgs = sorted((float(x[3]) for x in lines), reverse=True)
    for a in (0.5, 0.3455, 0.345, 0.2, avgs[3]):
        want = 1 + sum(v >= a for v in avgs)
        assert B.rank(a, "medium") == (want, len(avgs) + 1)
    assert B.rank(0.3455, "medium")[0] == 1 + sum(v >= 0.3455 for v in avgs) == 13  # 12 entries above 0.3455


def _outcome_run(d: Path, correct: np.ndarray, n_classes: int, seed: int, key="cifar10",
                 group=None) -> float:
    """A results file with one task and its per-example outcomes (top-1 predictions)."""
    rng = np.random.default_rng(seed)
    target = np.arange(len(correct)) % n_classes
    pred = np.where(correct, target, (target + 1 + rng.integers(0, n_classes - 1, len(target))) % n_classes)
    arrays = {"pred": pred, "target": target, "correct": correct, "group": group if group is not None else target}
    o = BS.Outcomes(key, BY_KEY[key].main_metric, {k: np.asarray(v) for k, v in arrays.items()}, {})
    value = o.metric()
    d.mkdir(parents=True, exist_ok=True)
    with open(d / "eval_results.jsonl", "a") as f:
        f.write(json.dumps({"key": key, "dataset": BY_KEY[key].name, "metrics": {"main_metric": value}}) + "\n")
    BS.save(d, key, BY_KEY[key].main_metric, arrays, value=value, checkpoint_sha256="0" * 64)
    return value


def test_paired_bootstrap_against_an_independent_one_and_the_analytic_interval(tmp_path):
    n, seed, R = 3000, 7, 2000
    rng = np.random.default_rng(0)
    a = rng.random(n) < 0.62
    b = np.where(rng.random(n) < 0.8, a, rng.random(n) < 0.55)  # correlated, as two models on one test set
    region = np.arange(n) % 6
    _outcome_run(tmp_path / "A", a, 10, 1)
    _outcome_run(tmp_path / "B", b, 10, 2)
    _outcome_run(tmp_path / "A", a, 10, 1, key="wilds/fmow", group=region)
    _outcome_run(tmp_path / "B", b, 10, 2, key="wilds/fmow", group=region)
    res = compare([str(tmp_path / "A" / "eval_results.jsonl"), str(tmp_path / "B" / "eval_results.jsonl")],
                  names=["A", "B"], scale=None, partial=True, seed=seed, resamples=R, out=str(tmp_path / "c"))
    rows = {r["key"]: r for r in res["per_task"]}
    col = "delta B - A"
    # independent paired bootstrap, the documented draws: default_rng([seed, crc32(key)]).integers(0, n, n)
    for key, stat in (("cifar10", lambda c, idx: c[idx].mean()),
                      ("wilds/fmow", lambda c, idx: min(c[idx][region[idx] == g].mean() for g in range(6)))):
        r = np.random.default_rng([seed, zlib.crc32(key.encode())])
        diffs = []
        for _ in range(R):
            idx = r.integers(0, n, n)
            diffs.append(stat(b, idx) - stat(a, idx))
        lo, hi = np.percentile(diffs, [2.5, 97.5])
        assert rows[key][col + " lo"] == pytest.approx(lo, abs=1e-12)
        assert rows[key][col + " hi"] == pytest.approx(hi, abs=1e-12)
        assert rows[key][col + " interval"] == "paired bootstrap"
    # plain accuracy: the analytic paired interval, d +- 1.96 sd(b - a) / sqrt(n)
    d = b.astype(float) - a
    se = d.std() / np.sqrt(n)
    assert rows["cifar10"][col + " lo"] == pytest.approx(d.mean() - 1.96 * se, abs=0.12 * se)
    assert rows["cifar10"][col + " hi"] == pytest.approx(d.mean() + 1.96 * se, abs=0.12 * se)
    assert rows["cifar10"][col + " verdict"] == ("worse" if d.mean() + 1.96 * se < 0 else "within noise")
    settings = json.loads((tmp_path / "c" / "comparison.json").read_text())
    assert (settings["seed"], settings["resamples"]) == (seed, R)
    # against a published baseline: the run's own bootstrap, widened by the seed noise on each side
    name = "ViT-B-32/commonpool_m_clip_s128m_b4k"
    res = compare([str(tmp_path / "A" / "eval_results.jsonl")], names=["A"], against=[name], scale=None,
                  partial=True, seed=seed, resamples=R)
    row = next(r for r in res["per_task"] if r["key"] == "cifar10")
    base = float(next(r for r in _raw_csv() if f"{r['name']}/{r['pretrained']}" == name)["CIFAR-10"])
    r = np.random.default_rng([seed, zlib.crc32(b"cifar10")])
    own = [a[r.integers(0, n, n)].mean() - base for _ in range(R)]
    lo, hi = np.percentile(own, [2.5, 97.5])
    col = f"delta A - {name}"
    assert (row[col + " lo"], row[col + " hi"]) == (pytest.approx(lo - 0.002), pytest.approx(hi + 0.002))
    assert row[col + " interval"] == "run's bootstrap + seed noise 0.002"
    # resamples that leave a metric undefined (an empty WinoGAViL group: NaN) are left out; over 5%: none
    x = np.arange(200.0)
    assert BS.interval(np.r_[x, [np.nan] * 5]) == tuple(np.percentile(x, [2.5, 97.5]))
    assert np.isnan(BS.interval(np.r_[x, [np.nan] * 20])[0]) and BS.verdict(float("nan"), float("nan")) == "no interval"
    # the metrics recomputed per resample are DataComp's (sklearn's macro F1 and balanced accuracy)
    from sklearn.metrics import balanced_accuracy_score, f1_score

    t = rng.integers(0, 7, 500)
    p = np.where(rng.random(500) < 0.5, t, rng.integers(0, 9, 500))
    idx = rng.integers(0, 500, 500)
    w = np.bincount(idx, minlength=500).astype(float)
    arr = {"pred": p, "target": t}
    assert BS.METRICS["F1-macro_all"][1](arr, w) == pytest.approx(
        f1_score(t[idx], p[idx], average="macro", labels=np.unique(t[idx])))
    assert BS.METRICS["mean_per_class_recall"][1](arr, w) == pytest.approx(balanced_accuracy_score(t[idx], p[idx]))


def test_comparison_html_renders_in_headless_chromium(tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    _results(tmp_path / "r1" / "eval_results.jsonl", 1)
    _results(tmp_path / "r2" / "eval_results.jsonl", 2)
    res = compare([str(tmp_path / "r1" / "eval_results.jsonl"), str(tmp_path / "r2" / "eval_results.jsonl")],
                  against=["ViT-B-32/commonpool_m_clip_s128m_b4k"], out=str(tmp_path / "c"))
    page = (tmp_path / "c" / "comparison.html").read_text()
    for png in ("per_task_delta.png", "imagenet_vs_average.png", "aggregates.png"):
        assert f"src='{png}'" in page and (tmp_path / "c" / png).stat().st_size > 5000
    assert "r2 - r1" in page and ("within noise" in page or "better" in page or "worse" in page)
    assert not list((tmp_path / "c").glob(".*tmp*"))  # atomic writes left nothing behind
    if browser is None:
        pytest.skip("no Chromium on this machine (apt-get install chromium)")
    from PIL import Image

    shot = tmp_path / "shot.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                    "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}", "--hide-scrollbars",
                    "--window-size=1280,3000", f"--screenshot={shot}", Path(res["html"]).as_uri()],
                   check=True, capture_output=True, timeout=120)
    px = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert px.std() > 20, "blank screenshot"
    blue = (np.abs(px - [31, 119, 180]).sum(-1) < 40).sum()  # matplotlib's blue: the plots loaded
    red = (np.abs(px - [214, 39, 40]).sum(-1) < 40).sum()  # worse bars / the runs' stars
    cells = (np.abs(px - [212, 244, 212]).sum(-1) < 12).sum() + (np.abs(px - [248, 208, 208]).sum(-1) < 12).sum()
    assert blue > 2000 and red > 300 and cells > 500, (blue, red, cells)


def test_evaluate_keeps_per_example_outcomes(tiny_checkpoint, eval_data, tmp_path):  # noqa: F811
    from conceptprune.atomic import file_digest
    from conceptprune.evaluation.run import evaluate

    out = tmp_path / "e"
    res = evaluate(str(tiny_checkpoint), str(eval_data), str(out), arch="cp-tiny-vit", tasks=EVAL_TASKS,
                   executor=Executor.create("inline"), precision="fp32", loader_workers=0)
    sha = file_digest(tiny_checkpoint)
    for r in res["results"]:
        o = BS.load(out, r["key"])
        assert o is not None, r["key"]
        assert o.meta["checkpoint_sha256"] == sha and o.meta["value"] == r["metrics"]["main_metric"]
        assert o.metric() == pytest.approx(r["metrics"]["main_metric"], abs=1e-6), r["key"]
    flickr = BS.load(out, "retrieval/flickr_1k_test_image_text_retrieval")
    assert len(flickr.arrays["text_hit@1"]) == 30 and len(flickr.arrays["image_hit@1"]) == 60
    r = next(x for x in res["results"] if x["key"] == "retrieval/flickr_1k_test_image_text_retrieval")["metrics"]
    assert set(flickr.arrays) == {"text_hit@1", "image_hit@1", "caption_image"}  # what mean_recall@1 needs
    assert flickr.arrays["text_hit@1"].mean() == pytest.approx(r["text_retrieval_recall@1"])
    assert flickr.arrays["image_hit@1"].mean() == pytest.approx(r["image_retrieval_recall@1"])


def _hf_cache_with(cache: Path, repo: str, checkpoint: Path) -> None:
    """The Hugging Face Hub cache layout: models--ORG--NAME/{refs/main, snapshots/REV/FILE}."""
    rev = "0123456789abcdef0123456789abcdef01234567"
    d = cache / f"models--{repo.replace('/', '--')}"
    (d / "refs").mkdir(parents=True)
    (d / "refs" / "main").write_text(rev)
    (d / "snapshots" / rev).mkdir(parents=True)
    shutil.copy(checkpoint, d / "snapshots" / rev / "open_clip_pytorch_model.bin")


SCRIPT = """
import sys
from open_clip import pretrained as P
from conceptprune.models import register
register()
# a tiny released-style checkpoint: an entry of open_clip's registry with a Hub repo, as open_clip's own are
P._PRETRAINED.setdefault("cp-tiny-vit", {})["cptest"] = P._pcfg(hf_hub="conceptprune-test/tiny-vit/")
from conceptprune.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_evaluate_openclip_checkpoint_by_name_offline(tiny_checkpoint, eval_data, tmp_path):  # noqa: F811
    import torch

    cache = tmp_path / "hub"
    sd = torch.load(tiny_checkpoint, map_location="cpu")["state_dict"]
    torch.save(sd, tmp_path / "plain.bin")
    _hf_cache_with(cache, "conceptprune-test/tiny-vit", tmp_path / "plain.bin")
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-c", SCRIPT, "evaluate", "--model", "openclip:cp-tiny-vit/cptest",
                          "--data-dir", str(eval_data), "--out", str(tmp_path / "o"), "--tasks", "cifar10",
                          "--precision", "fp32"], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    direct = tmp_path / "d"
    from conceptprune.evaluation.run import evaluate

    evaluate(str(tiny_checkpoint), str(eval_data), str(direct), arch="cp-tiny-vit", tasks=["cifar10"],
             executor=Executor.create("inline"), precision="fp32", loader_workers=0)
    by_name = json.loads((tmp_path / "o" / "eval_results.jsonl").read_text())
    assert by_name["metrics"] == json.loads((direct / "eval_results.jsonl").read_text())["metrics"]
    from conceptprune.atomic import file_digest

    assert BS.load(tmp_path / "o", "cifar10").meta["checkpoint_sha256"] == file_digest(tmp_path / "plain.bin")
    # a released checkpoint that is not cached, offline: one line naming it and the cache
    run = subprocess.run([sys.executable, "-m", "conceptprune.cli", "evaluate", "--model",
                          "openclip:ViT-B-32/commonpool_m_clip_s128m_b4k", "--data-dir", str(eval_data), "--out",
                          str(tmp_path / "x")], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode != 0 and not (tmp_path / "x").exists()
    err = [x for x in run.stderr.splitlines() if x.strip()]
    assert len(err) == 1 and "commonpool_m_clip_s128m_b4k" in err[0] and str(cache) in err[0], run.stderr
