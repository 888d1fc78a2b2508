"""Evaluation on generated miniature datasets in the real layouts, with a tiny random model:
every metric against an independent computation; results format, resume, compare, package."""

import json
import shutil

import numpy as np
import pytest
import torch

from conceptprune.evaluation import compare as C
from conceptprune.evaluation.package import package
from conceptprune.evaluation.run import EvaluationError, evaluate, read_results
from conceptprune.evaluation.tasks import AGGREGATES, BY_KEY, TASKS
from conceptprune.evaluation.wds import write_classification, write_retrieval, write_winogavil
from conceptprune.slurm.stage import Executor

COLORS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black", "cyan", "pink"]


def _images(n, seed):
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    out, labels = [], []
    for _ in range(n):
        y = int(rng.integers(len(COLORS)))
        im = Image.new("RGB", (32, 32), tuple(int(v) for v in rng.integers(0, 255, 3)))
        ImageDraw.Draw(im).rectangle([6, 6, 26, 26], fill=COLORS[y])
        out.append(im)
        labels.append(y)
    return out, np.array(labels)



@pytest.fixture(scope="module")
def eval_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalsets")
    templates = ["a photo of a {c} square.", "a {c} thing."]
    classes = [f"{c}" for c in COLORS]
    ims, y = _images(60, 1)
    write_classification(root / "cifar10", ims, y, classes, templates, nshards=3)
    ims, y = _images(40, 2)
    write_classification(root / "vtab-pets", ims, y % 4, classes[:4], templates)  # < 5 classes: acc5 is NaN
    ims, y = _images(30, 3)
    write_retrieval(root / "retrieval-flickr_1k_test_image_text_retrieval", ims,
                    [[f"a {COLORS[c]} square", f"{COLORS[c]} box number {i}"] for i, c in enumerate(y)])
    ims, y = _images(50, 4)
    region = np.arange(50) % 6  # 5 real regions + "Other"
    write_classification(root / "wilds-fmow", ims, y, classes, templates,
                         metadata=np.stack([region, np.arange(50) % 3], 1))  # region, year (DataComp's npy)
    ims, y = _images(40, 5)
    write_classification(root / "wilds-iwildcam", ims, y, classes, templates, metadata=(np.arange(40) % 3)[:, None])
    ims, y = _images(40, 6)
    write_classification(root / "fairness-dollar_street", ims, y, classes, templates,
                         metadata=(np.arange(40) % 4)[:, None])
    ims, y = _images(30, 7)
    write_classification(root / "fairness-geode", ims, y, classes, templates, metadata=(np.arange(30) % 3)[:, None])
    items = []
    for q in range(6):
        ims, y = _images(10 if q % 2 else 12, 10 + q)
        cands = {f"c{i}": im for i, im in enumerate(ims)}
        items.append({"cue": ["apple", "tree", "ocean"][q % 3], "candidates": cands,
                      "associations": [f"c{i}" for i in range(3)]})
    write_winogavil(root / "misc-winogavil", items)
    return root


EVAL_TASKS = ["cifar10", "vtab/pets", "retrieval/flickr_1k_test_image_text_retrieval", "wilds/fmow",
              "wilds/iwildcam", "fairness/dollar_street", "fairness/geode", "misc/winogavil"]


def _model(ckpt):
    import open_clip

    from conceptprune.models import register

    register()
    model, _, pre = open_clip.create_model_and_transforms("cp-tiny-vit", pretrained=str(ckpt))
    return model.eval(), pre, open_clip.get_tokenizer("cp-tiny-vit")


def _stored(im):
    """The image as the evaluator reads it back: through the writer's JPEG encoding."""
    import io

    from PIL import Image

    from conceptprune.evaluation.wds import _jpg

    return Image.open(io.BytesIO(_jpg(im))).convert("RGB")


def _features(model, pre, images):
    with torch.no_grad():
        return torch.nn.functional.normalize(model.encode_image(torch.stack([pre(_stored(i)) for i in images])), dim=-1)


def _classifier(model, tok, classes, templates):
    from clip_benchmark.metrics.zeroshot_classification import zero_shot_classifier
    return zero_shot_classifier(model, tok, classes, templates, "cpu", amp=False)


def test_registry():
    assert len(TASKS) == 40 and sum(t.main_metric is not None for t in TASKS) == 38
    assert {n: sum(f(t) for t in TASKS) for n, f in AGGREGATES.items()} == \
        {"ImageNet": 1, "ImageNet dist. shifts": 6, "VTAB": 13, "Retrieval": 3, "Average": 38}
    assert BY_KEY["vtab/caltech101"].main_metric == "mean_per_class_recall"
    assert BY_KEY["fairness/fairface"].main_metric is None and BY_KEY["wilds/fmow"].main_metric == "acc_worst_region"


def test_metrics_equal_independent_computations(tiny_checkpoint, eval_data, tmp_path):
    from clip_benchmark.datasets.builder import build_dataset
    from clip_benchmark.metrics import zeroshot_classification, zeroshot_retrieval
    from sklearn.metrics import balanced_accuracy_score, f1_score

    res = evaluate(str(tiny_checkpoint), str(eval_data), str(tmp_path / "out"), arch="cp-tiny-vit",
                   tasks=EVAL_TASKS, batch_size=16, executor=Executor.create("local"))
    assert res["errors"] == {}
    rows = {r["key"]: r for r in read_results(tmp_path / "out" / "eval_results.jsonl")}
    assert sorted(rows) == sorted(EVAL_TASKS)
    for key, r in rows.items():
        assert set(r) == {"key", "dataset", "metrics"} and r["dataset"] == BY_KEY[key].name
        assert r["metrics"]["main_metric"] == r["metrics"][BY_KEY[key].main_metric]
    model, pre, tok = _model(tiny_checkpoint)

    # classification: clip_benchmark called directly on the same data
    ds = build_dataset("wds/cifar10", root=str(eval_data / "cifar10"), transform=pre, split="test", download=False)
    direct = zeroshot_classification.evaluate(model, torch.utils.data.DataLoader(ds.batched(7), batch_size=None),
                                              tok, ds.classes, ds.templates, "cpu", amp=False)
    for m in ("acc1", "acc5", "mean_per_class_recall"):
        assert rows["cifar10"]["metrics"][m] == pytest.approx(direct[m], abs=1e-9)
    assert rows["vtab/pets"]["metrics"]["acc5"] is None  # fewer than 5 classes
    # mean_per_class_recall is sklearn's balanced accuracy, by hand
    ims, y = _images(60, 1)
    clf = _classifier(model, tok, COLORS, ["a photo of a {c} square.", "a {c} thing."])
    pred = (_features(model, pre, ims) @ clf).argmax(1).numpy()
    assert rows["cifar10"]["metrics"]["mean_per_class_recall"] == pytest.approx(balanced_accuracy_score(y, pred))

    # retrieval: clip_benchmark directly
    rd = build_dataset("wds/retrieval", root=str(eval_data / "retrieval-flickr_1k_test_image_text_retrieval"),
                       transform=pre, split="test", download=False, task="zeroshot_retrieval")
    d = zeroshot_retrieval.evaluate(model, torch.utils.data.DataLoader(rd.batched(8), batch_size=None), tok, "cpu",
                                    amp=False, recall_k_list=[1, 5, 10])
    m = rows["retrieval/flickr_1k_test_image_text_retrieval"]["metrics"]
    for k in (1, 5, 10):
        assert m[f"image_retrieval_recall@{k}"] == pytest.approx(d[f"image_retrieval_recall@{k}"])
        assert m[f"text_retrieval_recall@{k}"] == pytest.approx(d[f"text_retrieval_recall@{k}"])
    assert m["mean_recall@1"] == pytest.approx((d["image_retrieval_recall@1"] + d["text_retrieval_recall@1"]) / 2)

    # WILDS FMoW: worst region as DataComp computes it (region 5, "Other", counted), and without "Other"
    ims, y = _images(50, 4)
    pred = (_features(model, pre, ims) @ clf).argmax(1).numpy()
    region = np.arange(50) % 6
    per = [np.mean(pred[region == g] == y[region == g]) for g in range(6)]
    assert rows["wilds/fmow"]["metrics"]["acc_worst_region"] == pytest.approx(min(per))
    assert rows["wilds/fmow"]["metrics"]["acc_worst_region_excluding_other"] == pytest.approx(min(per[:5]))
    # iWildCam: macro F1 over the classes present
    ims, y = _images(40, 5)
    pred = (_features(model, pre, ims) @ clf).argmax(1).numpy()
    assert rows["wilds/iwildcam"]["metrics"]["F1-macro_all"] == pytest.approx(
        f1_score(y, pred, average="macro", labels=np.unique(y)))
    # Dollar Street: worst income group, top-5
    ims, y = _images(40, 6)
    logits = (_features(model, pre, ims) @ clf).numpy()
    top5 = (np.argsort(-logits, 1)[:, :5] == y[:, None]).any(1)
    grp = np.arange(40) % 4
    assert rows["fairness/dollar_street"]["metrics"]["acc_top5_wg"] == pytest.approx(
        min(top5[grp == g].mean() for g in range(4)))
    # GeoDE: worst region, top-1
    ims, y = _images(30, 7)
    pred = (_features(model, pre, ims) @ clf).argmax(1).numpy()
    grp = np.arange(30) % 3
    assert rows["fairness/geode"]["metrics"]["acc_wg"] == pytest.approx(
        min(np.mean(pred[grp == g] == y[grp == g]) for g in range(3)))
    # WinoGAViL: Jaccard of the top-|gold| candidates, by hand
    scores = {10: [], 12: []}
    for q in range(6):
        ims, _ = _images(10 if q % 2 else 12, 10 + q)
        cue = ["apple", "tree", "ocean"][q % 3]
        prompt = ("An " if cue[0] in "aeiou" else "A ") + cue.lower()
        with torch.no_grad():
            t = torch.nn.functional.normalize(model.encode_text(tok([prompt])), dim=-1)
        sims = (_features(model, pre, ims) @ t.T).squeeze(1).numpy()
        pred = set(np.argsort(-sims, kind="stable")[:3].tolist())
        scores[len(ims)].append(len(pred & {0, 1, 2}) / len(pred | {0, 1, 2}))
    w = rows["misc/winogavil"]["metrics"]
    assert w["jaccard_score_10-12"] == pytest.approx(np.mean(scores[10] + scores[12]))
    assert w["jaccard_score_10"] == pytest.approx(np.mean(scores[10]))


def test_resume_never_duplicates_and_failures_are_recorded(tiny_checkpoint, eval_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(eval_data, data)
    out = tmp_path / "out"
    evaluate(str(tiny_checkpoint), str(data), str(out), arch="cp-tiny-vit", tasks=["cifar10"], executor=Executor.create("local"))
    before = (out / "eval_results.jsonl").read_text()
    # an empty shard and a missing folder fail; the other tasks still run
    (data / "wilds-iwildcam" / "test" / "0.tar").write_bytes(b"")
    res = evaluate(str(tiny_checkpoint), str(data), str(out), arch="cp-tiny-vit",
                   tasks=["cifar10", "vtab/pets", "wilds/iwildcam", "vtab/dtd"], executor=Executor.create("local"))
    assert set(res["errors"]) == {"wilds/iwildcam", "vtab/dtd"}
    assert "empty" in res["errors"]["wilds/iwildcam"] and "not found" in res["errors"]["vtab/dtd"]
    assert json.loads((out / "eval_errors.json").read_text()).keys() == res["errors"].keys()
    rows = read_results(out / "eval_results.jsonl")
    assert [r["key"] for r in rows] == ["cifar10", "vtab/pets"]  # registry order, once each
    assert (out / "eval_results.jsonl").read_text().startswith(before)  # cifar10 was not evaluated again


def test_checkpoint_architecture_mismatch(tiny_checkpoint, eval_data, tmp_path):
    with pytest.raises(EvaluationError, match="does not match --arch ViT-B-32"):
        evaluate(str(tiny_checkpoint), str(eval_data), str(tmp_path / "o"), arch="ViT-B-32", tasks=["cifar10"],
                 executor=Executor.auto())


def _fake_results(path, drop=None, dup=None, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for t in TASKS:
        if t.key == drop:
            continue
        v = None if t.main_metric is None else float(rng.uniform(0.1, 0.9))
        rows.append({"key": t.key, "dataset": t.name, "metrics": {t.main_metric or "acc1": v, "main_metric": v}})
        if t.key == dup:
            rows.append(rows[-1])
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {r["key"]: r["metrics"]["main_metric"] for r in rows}


def test_compare_aggregates_exactly(tmp_path):
    vals = _fake_results(tmp_path / "a.jsonl")
    _fake_results(tmp_path / "b.jsonl", seed=1)
    res = C.compare([str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")], names=["a", "b"], out=str(tmp_path / "cmp"))
    agg = res["aggregates"][0]
    shifts = ["imagenet_sketch", "imagenetv2", "imagenet-a", "imagenet-o", "imagenet-r", "objectnet"]
    vtab = [t.key for t in TASKS if t.key.startswith("vtab/")] + ["sun397"]  # DataComp's SUN397 has no vtab/ prefix
    retr = ["retrieval/flickr_1k_test_image_text_retrieval", "retrieval/mscoco_2014_5k_test_image_text_retrieval",
            "misc/winogavil"]
    assert agg["ImageNet"] == vals["imagenet1k"]
    assert agg["ImageNet dist. shifts"] == pytest.approx(np.mean([vals[k] for k in shifts]))
    assert len(vtab) == 13 and agg["VTAB"] == pytest.approx(np.mean([vals[k] for k in vtab]))
    assert agg["Retrieval"] == pytest.approx(np.mean([vals[k] for k in retr]))
    assert agg["Average"] == pytest.approx(np.mean([v for v in vals.values() if v is not None]))
    # the baselines' aggregates are recomputed from their per-task rows in open_clip's table (0.3278 there)
    assert any(r["run"] == "baseline: CLIP score L/14 top 30%" and r["Average"] == pytest.approx(0.3278, abs=1e-4)
               for r in res["aggregates"])
    for f in ("comparison.md", "aggregates.csv", "per_task.csv", "aggregates.png", "per_task_delta.png"):
        assert (tmp_path / "cmp" / f).stat().st_size > 100
    _fake_results(tmp_path / "missing.jsonl", drop="vtab/svhn")
    with pytest.raises(Exception, match="vtab/svhn"):
        C.compare([str(tmp_path / "missing.jsonl")])
    _fake_results(tmp_path / "dup.jsonl", dup="mnist")
    with pytest.raises(Exception, match="mnist appears more than once"):
        C.compare([str(tmp_path / "dup.jsonl")])


def test_package_bundle(tmp_path):
    from conceptprune import keeplist as K
    from conceptprune import uids as U

    _fake_results(tmp_path / "r.jsonl")
    K.write_keep_list(tmp_path / "keep.npy", U.uids_to_array(["ab" * 16, "cd" * 16]))
    d = package(str(tmp_path / "r.jsonl"), str(tmp_path / "keep.npy"), "medium", str(tmp_path / "bundle"))
    assert d == tmp_path / "bundle" / "medium_scale"
    assert (d / "results.jsonl").read_text() == (tmp_path / "r.jsonl").read_text()
    assert (d / "samples" / "keep.npy").read_bytes() == (tmp_path / "keep.npy").read_bytes()
