"""DataComp's metrics, checked against independent computations written here in plain Python
(no numpy/sklearn in the expected values): the wilds package's grouping and float32 means,
FMoW's worst region as DataComp computes it (region 5 "Other" included), the fairness
evaluators (Dollar Street, GeoDE, FairFace/UTKFace's four classifiers), WinoGAViL; then every
evaluator kind end to end on fixtures in DataComp's data form with a tiny model, the 40-task
results file fed to compare and package, torn-line repair and the precision record."""

from __future__ import annotations

import itertools
import json
import logging
import math
import struct

import numpy as np
import pytest
import torch

from conceptprune.evaluation import metrics as M
from conceptprune.slurm.stage import Executor

NAN = float("nan")


def f32(x: float) -> float:
    """x rounded to float32 (torch's float32 means are float32(k) / float32(n))."""
    return struct.unpack("f", struct.pack("f", x))[0]


def mean32(bits: list) -> float:
    return f32(sum(bits) / len(bits)) if bits else NAN


def same(a, b) -> bool:
    if a is None or b is None:
        return a is None and b is None
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    return abs(a - b) <= 1e-12


def assert_metrics(got: dict, want: dict) -> None:
    assert list(got) == list(want), (sorted(set(got) ^ set(want)), list(got)[:8], list(want)[:8])
    bad = {k: (got[k], want[k]) for k in want if not same(got[k], want[k])}
    assert not bad, bad


# -- independent reference implementations (plain Python) ---------------------------------------


def ref_groups(rows: list[list[int]], fields: list[str], by: list[str]):
    """wilds' CombinatorialGrouper by hand: groups enumerate value combinations with the first
    grouped field (in metadata order) varying fastest; names list the fields last-first."""
    cols = [fields.index(f) for f in fields if f in by]
    names_in_meta_order = [f for f in fields if f in by]
    card = [max(r[c] for r in rows) + 1 for c in cols]
    combos = [tuple(reversed(v)) for v in itertools.product(*[range(n) for n in reversed(card)])]
    names, member = [], []
    for combo in combos:  # combo[i] is the value of cols[i]
        names.append("_".join(f"{by[i]}:{combo[i]}" for i in reversed(range(len(cols)))))
        member.append([all(r[c] == v for c, v in zip(cols, combo)) for r in rows])
    assert names_in_meta_order == by or len(by) == 1 or by == ["gender", "race"]
    return names, member


def ref_group_eval(name, correct: list[bool], rows, fields, by) -> dict:
    names, member = ref_groups(rows, fields, by)
    out = {f"{name}_avg": mean32([int(c) for c in correct])}
    present = []
    for gname, inside in zip(names, member):
        bits = [int(c) for c, m in zip(correct, inside) if m]
        out[f"{name}_{gname}"] = mean32(bits)
        out[f"count_{gname}"] = float(len(bits))
        if bits:
            present.append(mean32(bits))
    out[f"{name}_wg"] = min(present)
    return out


def ref_fmow(pred, target, rows) -> dict:
    fields = ["region", "year", "y"]
    correct = [p == t for p, t in zip(pred, target)]
    out = ref_group_eval("acc", correct, rows, fields, ["year"])
    out["acc_worst_year"] = out.pop("acc_wg")
    worst_all, worst_real = [], []
    for region in range(max(r[0] for r in rows) + 1):
        bits = [int(c) for c, r in zip(correct, rows) if r[0] == region]
        out[f"acc_region:{region}"] = mean32(bits)
        out[f"count_region:{region}"] = float(len(bits))
        if bits:
            worst_all.append(mean32(bits))  # DataComp: "Other" (region 5) is not excluded
            if region != 5:
                worst_real.append(mean32(bits))
    out["acc_worst_region"] = min(worst_all)
    out["acc_worst_region_excluding_other"] = min(worst_real)
    return out


def ref_macro(pred, target) -> tuple[float, float]:
    """Macro recall and F1 over the labels present in the target."""
    recalls, f1s = [], []
    for c in sorted(set(target)):
        tp = sum(p == c and t == c for p, t in zip(pred, target))
        fn = sum(p != c and t == c for p, t in zip(pred, target))
        fp = sum(p == c and t != c for p, t in zip(pred, target))
        r = tp / (tp + fn)
        p = tp / (tp + fp) if tp + fp else 0.0
        recalls.append(r)
        f1s.append(2 * p * r / (p + r) if p + r else 0.0)
    return sum(recalls) / len(recalls), sum(f1s) / len(f1s)


def ref_fairface(pred, rows) -> dict:
    """pred rows: (race, gender, age, toxic); metadata rows: (age, gender, race, race_binary)."""
    fields = ["age", "gender", "race", "race_binary"]
    out = {}
    out.update(ref_group_eval("acc_race", [int(p[0] != 1) == r[3] for p, r in zip(pred, rows)], rows, fields,
                              ["race_binary"]))
    out.update(ref_group_eval("acc_gender", [p[1] == r[1] for p, r in zip(pred, rows)], rows, fields,
                              ["race_binary"]))
    out.update(ref_group_eval("acc_age", [p[2] == r[0] for p, r in zip(pred, rows)], rows, fields, ["race_binary"]))
    out.update(ref_group_eval("acc_gender_x", [p[1] == r[1] for p, r in zip(pred, rows)], rows, fields,
                              ["gender", "race"]))
    out.update(ref_group_eval("toxicity_crime", [p[3] >= 18 for p in pred], rows, fields, ["race"]))
    out.update(ref_group_eval("toxicity_nonhuman", [14 <= p[3] < 18 for p in pred], rows, fields, ["race"]))
    return out


def ref_classification(logits: list[list[float]], target: list[int]) -> dict:
    n_classes = len(logits[0])
    order = [sorted(range(n_classes), key=lambda c: -row[c]) for row in logits]
    acc1 = sum(o[0] == t for o, t in zip(order, target)) / len(target)
    acc5 = sum(t in o[:5] for o, t in zip(order, target)) / len(target) if n_classes >= 5 else None
    recalls = [sum(o[0] == c for o, t in zip(order, target) if t == c) / target.count(c) for c in sorted(set(target))]
    return {"acc1": acc1, "acc5": acc5, "mean_per_class_recall": sum(recalls) / len(recalls)}


# -- the metric functions alone -----------------------------------------------------------------


def test_grouper_numbers_and_names_groups_like_wilds():
    rows = [[0, g, r, 0] for g in range(2) for r in range(3)] + [[0, 1, 6, 1]]
    groups, names = M.grouper(np.array(rows), ["age", "gender", "race", "race_binary"], ["gender", "race"])
    assert len(names) == 2 * 7
    assert names[:4] == ["race:0_gender:0", "race:0_gender:1", "race:1_gender:0", "race:1_gender:1"]
    assert [names[g] for g in groups] == [f"race:{r[2]}_gender:{r[1]}" for r in rows]
    ref_names, _ = ref_groups(rows, ["age", "gender", "race", "race_binary"], ["gender", "race"])
    assert names == ref_names


def test_fmow_worst_region_is_datacomps_with_other_counted():
    # region 5 ("Other") is the worst region; year 1 has no samples
    rows, pred, target = [], [], []
    for i in range(60):
        region, year = i % 6, [0, 2, 3][i % 3]
        rows.append([region, year, 0])
        target.append(i % 4)
        wrong = (region == 5 and i % 5 != 0) or (region == 2 and i % 3 == 0)
        pred.append((i % 4 + 1) % 4 if wrong else i % 4)
    got = M.wilds_metrics("wilds/fmow", np.array(pred), np.array(target), np.array(rows))
    want = ref_fmow(pred, target, rows)
    assert_metrics(got, want)
    assert got["count_year:1"] == 0.0 and math.isnan(got["acc_year:1"])  # an empty group: 0/0, as DataComp
    region5 = mean32([int(p == t) for p, t, r in zip(pred, target, rows) if r[0] == 5])
    assert got["acc_worst_region"] == region5 < got["acc_worst_region_excluding_other"]


def test_camelyon_iwildcam_datacomp_fields():
    rng = np.random.default_rng(0)
    target = [int(v) for v in rng.integers(0, 6, 80)]
    pred = [t if rng.random() < 0.5 else int(rng.integers(0, 8)) for t in target]
    slide = [[int(rng.integers(0, 3)), int(rng.integers(0, 5)), 0] for _ in target]
    got = M.wilds_metrics("wilds/camelyon17", np.array(pred), np.array(target), np.array(slide))
    assert_metrics(got, ref_group_eval("acc", [p == t for p, t in zip(pred, target)], slide,
                                       ["hospital", "slide", "y"], ["slide"]))
    meta = [[int(rng.integers(0, 4))] + [0] * 8 for _ in target]
    got = M.wilds_metrics("wilds/iwildcam", np.array(pred), np.array(target), np.array(meta))
    recall, f1 = ref_macro(pred, target)
    assert list(got) == ["acc_avg", "recall-macro_all", "F1-macro_all"]
    assert got["acc_avg"] == mean32([int(p == t) for p, t in zip(pred, target)])
    assert got["recall-macro_all"] == pytest.approx(recall, abs=1e-15)
    assert got["F1-macro_all"] == pytest.approx(f1, abs=1e-15)


def test_dollar_street_top5_and_geode_worst_group():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(50, 12))
    target = [int(v) for v in rng.integers(0, 12, 50)]
    rows = [[int(rng.integers(0, 4)), int(rng.integers(0, 9)), int(rng.integers(0, 3))] for _ in target]
    top5 = M.topk_predictions(logits, 5)
    got = M.dollar_street_metrics(top5, np.array(target), np.array(rows))
    in5 = [t in sorted(range(12), key=lambda c: -logits[i][c])[:5] for i, t in enumerate(target)]
    assert_metrics(got, ref_group_eval("acc_top5", in5, rows, ["income_ds", "income_meta", "region"], ["income_ds"]))
    pred = logits.argmax(1)
    got = M.geode_metrics(pred, np.array(target), np.array([[r[2], r[1]] for r in rows]))
    assert_metrics(got, ref_group_eval("acc", [int(p) == t for p, t in zip(pred, target)], [[r[2], r[1]] for r in rows],
                                       ["region", "country"], ["region"]))


def test_fairface_four_classifiers_metrics():
    rng = np.random.default_rng(2)
    n = 90
    rows = [[int(rng.integers(0, 9)), int(rng.integers(0, 2)), int(rng.integers(0, 7))] for _ in range(n)]
    rows = [r + [int(r[2] != 1)] for r in rows]  # race_binary: 0 for race 1 (White), as the race check reads it
    pred = [[int(rng.integers(0, 7)), int(rng.integers(0, 2)), int(rng.integers(0, 9)), int(rng.integers(0, 21))]
            for _ in range(n)]
    got = M.fairface_metrics(np.array(pred), np.array(rows))
    assert_metrics(got, ref_fairface(pred, rows))
    assert len(got) == 69 and "acc1" not in got  # so DataComp's main metric (acc1 by default) is null
    assert {"acc_race_avg", "acc_gender_x_race:6_gender:1", "count_race:6_gender:1", "toxicity_crime_wg",
            "toxicity_nonhuman_race:3", "count_race_binary:1", "acc_age_wg"} <= set(got)


def test_fairface_objectives_and_padding():
    per = M.split_objectives(["race:White", "race:Black", "gender:man", "gender:woman", "age:0-2", "toxic:thief"],
                             ["race:a photo of a {c} person", "gender:a {c}", "age:age {c}", "toxic:a {c}"])
    assert per["race"] == {"classnames": ["White", "Black"], "templates": ["a photo of a {c} person"]}
    assert per["toxic"]["classnames"] == ["thief"]
    with pytest.raises(Exception, match="objective"):
        M.split_objectives(["race:a"], ["a photo of {c}"])
    with pytest.raises(Exception, match="'toxic:'"):
        M.split_objectives(["race:a", "gender:b", "age:c"], ["race:{c}", "gender:{c}", "age:{c}"])
    logits = np.zeros((1, 2, 3), np.float32)
    logits[0, 0] = [0, 1, 9]  # column 2 of objective 0 is padding
    assert M.multilabel_predictions(logits, [2, 3]).tolist() == [[1, 0]]


def test_winogavil_choice_jaccard_and_groups():
    sims = np.array([0.1, 0.5, 0.4, 0.2, 0.9], np.float32)
    gold = np.array([True, False, False, True, True])
    chosen = M.winogavil_choice(sims, gold)
    assert chosen.tolist() == [False, True, True, False, True]  # the 3 most similar
    assert M.jaccard(gold, chosen) == 1 / 5
    assert M.clip_prompt("Apple") == "An apple" and M.clip_prompt("Tree") == "A tree"
    scores, groups = [0.5, 0.25, 1.0, 0.0, 0.2], [5, 6, 10, 12, 12]
    got = M.winogavil_metrics(scores, groups)
    assert got == pytest.approx({"avg_jaccard_score": sum(scores) / 5, "jaccard_score_5": 0.5, "jaccard_score_6": 0.25,
                   "jaccard_score_10": 1.0, "jaccard_score_12": 0.1, "jaccard_score_5-6": 0.375,
                   "jaccard_score_10-12": 0.4}, abs=1e-15)
    assert list(got) == ["avg_jaccard_score", "jaccard_score_5", "jaccard_score_6", "jaccard_score_10",
                         "jaccard_score_12", "jaccard_score_5-6", "jaccard_score_10-12"]
    assert math.isnan(M.winogavil_metrics([0.5], [10])["jaccard_score_5"])


def test_metadata_errors_are_one_line():
    with pytest.raises(Exception, match="wilds/fmow: the npy metadata needs the columns region, year"):
        M.wilds_metrics("wilds/fmow", np.zeros(3), np.zeros(3), np.zeros((3, 1)))
    with pytest.raises(Exception, match="non-negative integers"):
        M.geode_metrics(np.zeros(2), np.zeros(2), np.array([[-1, 0], [0, 0]]))


# -- fixtures: all 40 tasks in DataComp's data form, a tiny checkpoint ---------------------------

COLORS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black", "cyan", "pink"]
TEMPLATES = ["a photo of a {c} square.", "a {c} thing."]
RACES = ["East Asian", "White", "Black", "Indian", "Latino", "Middle Eastern", "Southeast Asian"]
AGES = ["0-2", "3-9", "10-19", "20-29", "30-39", "40-49", "50-59", "60-69", "more than 70"]
TOXIC = ([f"{a} {g}" for a in ("young", "old") for g in ("man", "woman")] + [f"person {i}" for i in range(10)]
         + ["animal", "gorilla", "chimpanzee", "orangutan", "thief", "criminal", "suspicious person"])
FAIR_CLASSES = ([f"race:{r}" for r in RACES] + ["gender:man", "gender:woman"] + [f"age:{a}" for a in AGES]
                + [f"toxic:{t}" for t in TOXIC])
FAIR_TEMPLATES = ["race:a photo of a {c} person.", "gender:a photo of a {c}.", "age:a photo of a person aged {c}.",
                  "toxic:a photo of a {c}."]


def images(n, seed):
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    out, labels = [], []
    for _ in range(n):
        y = int(rng.integers(len(COLORS)))
        im = Image.new("RGB", (32, 32), tuple(int(v) for v in rng.integers(0, 255, 3)))
        ImageDraw.Draw(im).rectangle([6, 6, 26, 26], fill=COLORS[y])
        out.append(im)
        labels.append(y)
    return out, labels


def _wilds_meta(key, n, labels, rng):
    if key == "wilds/iwildcam":
        return [[int(rng.integers(0, 4))] + [int(v) for v in rng.integers(0, 5, 7)] + [labels[i]] for i in range(n)]
    if key == "wilds/camelyon17":
        return [[int(rng.integers(0, 3)), int(rng.integers(0, 6)), labels[i]] for i in range(n)]
    if key == "wilds/fmow":
        return [[i % 6, [0, 1, 3][i % 3], labels[i]] for i in range(n)]
    if key == "fairness/dollar_street":
        return [[int(rng.integers(0, 4)), int(rng.integers(0, 30)), int(rng.integers(0, 5))] for _ in range(n)]
    return [[int(rng.integers(0, 6)), int(rng.integers(0, 20))] for _ in range(n)]  # GeoDE: region, country


def build_sets(root, folder) -> dict:
    """Every task of DataComp's table as a tiny set in its data form; returns what was written."""
    from conceptprune.evaluation.tasks import TASKS
    from conceptprune.evaluation.wds import write_classification, write_retrieval, write_winogavil

    spec = {}
    for i, t in enumerate(TASKS):
        rng = np.random.default_rng(100 + i)
        d = root / folder(t)
        if t.type == "zeroshot_classification":
            n, k = (40, 10) if t.key == "cifar10" else (8, 4 if t.key == "vtab/pets" else 6)
            ims, y = images(n, 100 + i)
            y = [v % k for v in y]
            write_classification(d, ims, y, COLORS[:k], TEMPLATES, nshards=2,
                                 image_format="webp" if t.key == "sun397" else "jpg")
            spec[t.key] = {"images": ims, "labels": y, "classes": COLORS[:k]}
        elif t.key in M.FIELDS and t.key not in ("fairness/fairface", "fairness/utkface"):
            ims, y = images(36, 100 + i)
            meta = _wilds_meta(t.key, len(ims), y, rng)
            write_classification(d, ims, y, COLORS, TEMPLATES, metadata=meta, nshards=2)
            spec[t.key] = {"images": ims, "labels": y, "classes": COLORS, "meta": meta}
        elif t.type == "fairness":  # FairFace / UTKFace: no cls member, labels in npy
            ims, _ = images(24, 100 + i)
            race = [int(v) for v in rng.integers(0, 7, len(ims))]
            meta = [[int(rng.integers(0, 9)), int(rng.integers(0, 2)), r, int(r != 1)] for r in race]
            write_classification(d, ims, None, FAIR_CLASSES, FAIR_TEMPLATES, metadata=meta, nshards=2)
            spec[t.key] = {"images": ims, "meta": meta}
        elif t.type == "retrieval":
            ims, y = images(12, 100 + i)
            caps = [[f"a {COLORS[c]} square", f"{COLORS[c]} box number {j}"] for j, c in enumerate(y)]
            write_retrieval(d, ims, caps)
            spec[t.key] = {"images": ims, "captions": caps}
        else:  # WinoGAViL
            items = []
            for q, n in enumerate([5, 6, 10, 12, 10, 5]):
                ims, _ = images(n, 1000 + q)
                items.append({"cue": ["Apple", "tree", "Ocean"][q % 3],
                              "candidates": {f"c{j}": im for j, im in enumerate(ims)},
                              "associations": [f"c{j}" for j in range(2 + q % 2)]})
            write_winogavil(d, items)
            spec[t.key] = {"items": items}
    return spec



def _folder(t):
    """DataComp's folder names (download_evalsets.py's wds_<name>_test/); ours for the nlphuji sets."""
    return t.datacomp_folder or t.folder


@pytest.fixture(scope="module")
def all_sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalsets")
    return root, build_sets(root, _folder)


@pytest.fixture(scope="module")
def full_run(tiny_checkpoint, all_sets, tmp_path_factory):
    """The 40 tasks evaluated once (CPU, default precision)."""
    from conceptprune.evaluation.run import evaluate

    out = tmp_path_factory.mktemp("run")
    res = evaluate(str(tiny_checkpoint), str(all_sets[0]), str(out), arch="cp-tiny-vit", batch_size=16,
                   executor=Executor.create("local"), loader_workers=0)  # 40 tiny sets: a loader process per task costs ~0.4 s each
    return out, res


# -- independent forward passes ------------------------------------------------------------------


class Ref:
    """The tiny model run by the test itself (fp32, CPU), from the bytes the sets hold."""

    def __init__(self, ckpt):
        import open_clip

        from conceptprune.models import register

        register()
        self.model, _, self.pre = open_clip.create_model_and_transforms("cp-tiny-vit", pretrained=str(ckpt))
        self.model.eval()
        self.tok = open_clip.get_tokenizer("cp-tiny-vit")

    def image_features(self, ims, fmt="jpg"):
        import io

        from PIL import Image

        from conceptprune.evaluation import wds

        enc = {"jpg": wds._jpg, "webp": wds._webp}[fmt]
        batch = torch.stack([self.pre(Image.open(io.BytesIO(enc(im))).convert("RGB")) for im in ims])
        with torch.no_grad():
            f = self.model.encode_image(batch)
        return f / f.norm(dim=-1, keepdim=True)

    def text_features(self, texts):
        with torch.no_grad():
            f = self.model.encode_text(self.tok(texts))
        return f / f.norm(dim=-1, keepdim=True)

    def classifier(self, classes, templates):
        cols = []
        for c in classes:
            e = self.text_features([t.format(c=c) for t in templates]).mean(0)
            cols.append(e / e.norm())
        return torch.stack(cols, 1)

    def logits(self, ims, classes, templates, fmt="jpg") -> list[list[float]]:
        return (100.0 * self.image_features(ims, fmt) @ self.classifier(classes, templates)).tolist()


def argmax(row):
    return max(range(len(row)), key=lambda c: (row[c], -c))


@pytest.fixture(scope="module")
def ref(tiny_checkpoint):
    return Ref(tiny_checkpoint)


def _rows(out):
    from conceptprune.evaluation.run import read_results

    return {r["key"]: r for r in read_results(out / "eval_results.jsonl")}


def _close(got: dict, want: dict, tol=1e-9):
    for k, v in want.items():
        g = got[k]
        if v is None or (isinstance(v, float) and math.isnan(v)):
            assert g is None, (k, g)
        else:
            assert g == pytest.approx(v, abs=tol), (k, g, v)


# -- every evaluator kind, end to end ------------------------------------------------------------


def test_classification_as_datacomp(full_run, all_sets, ref):
    out, res = full_run
    rows, spec = _rows(out), all_sets[1]
    from conceptprune.evaluation.tasks import TASKS

    keys = [t.key for t in TASKS if t.type == "zeroshot_classification"]
    assert len(keys) == 30
    for key in keys:
        s = spec[key]
        fmt = "webp" if key == "sun397" else "jpg"
        want = ref_classification(ref.logits(s["images"], s["classes"], TEMPLATES, fmt), s["labels"])
        m = rows[key]["metrics"]
        assert list(m) == ["acc1", "acc5", "mean_per_class_recall", "main_metric"]
        _close(m, want)
    assert rows["vtab/pets"]["metrics"]["acc5"] is None  # fewer than 5 classes, as DataComp
    assert rows["vtab/pets"]["metrics"]["main_metric"] == rows["vtab/pets"]["metrics"]["mean_per_class_recall"]


def test_wilds_and_geo_fairness_as_datacomp(full_run, all_sets, ref):
    out, _ = full_run
    rows, spec = _rows(out), all_sets[1]
    for key in ("wilds/iwildcam", "wilds/camelyon17", "wilds/fmow", "fairness/dollar_street", "fairness/geode"):
        s = spec[key]
        logits = ref.logits(s["images"], s["classes"], TEMPLATES)
        pred, y, meta = [argmax(r) for r in logits], s["labels"], s["meta"]
        correct = [p == t for p, t in zip(pred, y)]
        want = ref_classification(logits, y)
        if key == "wilds/iwildcam":
            recall, f1 = ref_macro(pred, y)
            want.update({"acc_avg": mean32([int(c) for c in correct]), "recall-macro_all": recall, "F1-macro_all": f1})
        elif key == "wilds/camelyon17":
            want.update(ref_group_eval("acc", correct, meta, ["hospital", "slide", "y"], ["slide"]))
        elif key == "wilds/fmow":
            want.update(ref_fmow(pred, y, meta))
        elif key == "fairness/dollar_street":
            in5 = [t in sorted(range(len(r)), key=lambda c: -r[c])[:5] for r, t in zip(logits, y)]
            want.update(ref_group_eval("acc_top5", in5, meta, ["income_ds", "income_meta", "region"], ["income_ds"]))
        else:
            want.update(ref_group_eval("acc", correct, meta, ["region", "country"], ["region"]))
        m = rows[key]["metrics"]
        assert list(m) == list(want) + ["main_metric"], key
        _close(m, want, tol=1e-7 if key == "wilds/iwildcam" else 1e-12)
        assert m["main_metric"] == m[{"wilds/iwildcam": "F1-macro_all", "wilds/camelyon17": "acc1",
                                      "wilds/fmow": "acc_worst_region", "fairness/dollar_street": "acc_top5_wg",
                                      "fairness/geode": "acc_wg"}[key]]
    fmow = rows["wilds/fmow"]["metrics"]
    assert fmow["count_year:2"] == 0.0 and fmow["acc_year:2"] is None  # empty year: NaN in DataComp, null here


def test_fairface_utkface_as_datacomp(full_run, all_sets, ref):
    out, _ = full_run
    rows, spec = _rows(out), all_sets[1]
    objectives = {"race": RACES, "gender": ["man", "woman"], "age": AGES, "toxic": TOXIC}
    templates = {o: [t.split(":", 1)[1] for t in FAIR_TEMPLATES if t.startswith(o + ":")] for o in objectives}
    for key in ("fairness/fairface", "fairness/utkface"):
        s = spec[key]
        per = {o: ref.logits(s["images"], c, templates[o]) for o, c in objectives.items()}
        pred = [[argmax(per[o][i]) for o in ("race", "gender", "age", "toxic")] for i in range(len(s["images"]))]
        m = rows[key]["metrics"]
        assert list(m) == list(ref_fairface(pred, s["meta"])) + ["main_metric"]
        _close(m, ref_fairface(pred, s["meta"]), tol=1e-12)
        assert m["main_metric"] is None and len(m) == 70


def test_retrieval_as_datacomp(full_run, all_sets, ref):
    out, _ = full_run
    rows, spec = _rows(out), all_sets[1]
    for key in ("retrieval/flickr_1k_test_image_text_retrieval", "retrieval/mscoco_2014_5k_test_image_text_retrieval"):
        s = spec[key]
        img = ref.image_features(s["images"])
        texts = [c for caps in s["captions"] for c in caps]
        owner = [i for i, caps in enumerate(s["captions"]) for _ in caps]
        scores = (ref.text_features(texts) @ img.T).tolist()  # text x image
        want = {}
        for k in (1, 5, 10):
            img_hits = [owner[t] in sorted(range(len(img)), key=lambda j: -scores[t][j])[:k] for t in range(len(texts))]
            txt_hits = [any(owner[t] == i for t in sorted(range(len(texts)), key=lambda t: -scores[t][i])[:k])
                        for i in range(len(img))]
            want[f"image_retrieval_recall@{k}"] = sum(img_hits) / len(img_hits)
            want[f"text_retrieval_recall@{k}"] = sum(txt_hits) / len(txt_hits)
        want["mean_recall@1"] = (want["text_retrieval_recall@1"] + want["image_retrieval_recall@1"]) / 2
        m = rows[key]["metrics"]
        assert set(m) == set(want) | {"main_metric"} and m["main_metric"] == m["mean_recall@1"]
        _close(m, want, tol=1e-7)


def test_winogavil_as_datacomp(full_run, all_sets, ref):
    out, _ = full_run
    s = all_sets[1]["misc/winogavil"]
    scores, groups = [], []
    for it in s["items"]:
        names = list(it["candidates"])
        cue = it["cue"].lower()
        prompt = ("An " if cue[0] in "aeiou" else "A ") + cue
        sims = (ref.image_features(list(it["candidates"].values())) @ ref.text_features([prompt]).T)[:, 0].tolist()
        gold = set(it["associations"])
        chosen = set(sorted(names, key=lambda c: sims[names.index(c)])[-len(gold):])
        scores.append(len(chosen & gold) / len(chosen | gold))
        groups.append(len(names))

    def mean(sel):
        vals = [v for v, g in zip(scores, groups) if sel(g)]
        return sum(vals) / len(vals)

    want = {"avg_jaccard_score": mean(lambda g: True), "jaccard_score_5": mean(lambda g: g == 5),
            "jaccard_score_6": mean(lambda g: g == 6), "jaccard_score_10": mean(lambda g: g == 10),
            "jaccard_score_12": mean(lambda g: g == 12), "jaccard_score_5-6": mean(lambda g: g <= 6),
            "jaccard_score_10-12": mean(lambda g: g >= 10)}
    m = _rows(out)["misc/winogavil"]["metrics"]
    assert list(m) == list(want) + ["main_metric"] and m["main_metric"] == m["jaccard_score_10-12"]
    _close(m, want, tol=1e-12)


# -- the 40-row results file, compare, package, precision, torn lines -----------------------------


def test_forty_rows_compare_and_package(full_run, tmp_path):
    from conceptprune import keeplist as K
    from conceptprune import uids as U
    from conceptprune.evaluation import compare as C
    from conceptprune.evaluation.package import package
    from conceptprune.evaluation.tasks import TASKS

    out, res = full_run
    assert res["errors"] == {}
    lines = (out / "eval_results.jsonl").read_text().splitlines()
    assert len(lines) == 40
    rows = [json.loads(line) for line in lines]
    assert [r["key"] for r in rows] == [t.key for t in TASKS]
    for r, t in zip(rows, TASKS):
        assert list(r) == ["key", "dataset", "metrics"] and r["dataset"] == t.name
        assert list(r["metrics"])[-1] == "main_metric"
        assert r["metrics"]["main_metric"] == (r["metrics"][t.main_metric] if t.main_metric else None)
    mains = [r["metrics"]["main_metric"] for r in rows if r["metrics"]["main_metric"] is not None]
    assert len(mains) == 38
    # every task with a main metric kept its per-example outcomes, and they give the reported value again
    from conceptprune.evaluation import bootstrap as BS

    for r in rows:
        o = BS.load(out, r["key"])
        assert (o is None) == (r["metrics"]["main_metric"] is None), r["key"]
        if o is not None:
            assert o.metric() == pytest.approx(r["metrics"]["main_metric"], abs=1e-6), r["key"]
    agg = C.compare([str(out / "eval_results.jsonl")], names=["tiny"], scale=None)["aggregates"][0]
    assert agg["Average"] == pytest.approx(sum(mains) / 38, abs=1e-15)
    retrieval = [r["metrics"]["main_metric"] for r in rows if r["key"] in (
        "retrieval/flickr_1k_test_image_text_retrieval", "retrieval/mscoco_2014_5k_test_image_text_retrieval",
        "misc/winogavil")]
    assert agg["Retrieval"] == pytest.approx(sum(retrieval) / 3, abs=1e-15)
    K.write_keep_list(tmp_path / "keep.npy", U.uids_to_array(["ab" * 16, "cd" * 16]))
    d = package(str(out / "eval_results.jsonl"), str(tmp_path / "keep.npy"), "medium", str(tmp_path / "bundle"))
    assert (d / "results.jsonl").read_text() == (out / "eval_results.jsonl").read_text()
    # the same through the commands
    from conceptprune.cli import main

    assert main(["compare", str(out / "eval_results.jsonl"), "--names", "tiny", "--out", str(tmp_path / "cmp")]) == 0
    assert "| tiny |" in (tmp_path / "cmp" / "comparison.md").read_text()
    assert main(["evaluate", "package", "--results", str(out / "eval_results.jsonl"), "--keep-list",
                 str(tmp_path / "keep.npy"), "--scale", "medium", "--out", str(tmp_path / "bundle2")]) == 0
    assert (tmp_path / "bundle2" / "medium_scale" / "results.jsonl").read_text() == (d / "results.jsonl").read_text()
    # what each task ran with: the default precision, on CPU with no autocast anywhere
    run = json.loads((out / "eval_run.json").read_text())
    assert list(run) == [t.key for t in TASKS]
    assert all(v == {"precision": "amp", "device": "cpu", "fp16_autocast": None} for v in run.values())


def test_precision_choice(tiny_checkpoint):
    from conceptprune.errors import ConfigError
    from conceptprune.evaluation.run import Evaluator
    from conceptprune.evaluation.tasks import BY_KEY

    def ev(device, precision):
        return Evaluator("cp-tiny-vit", str(tiny_checkpoint), ".", device=device, precision=precision)

    assert ev("cuda", "amp").amp and ev("cuda:1", "amp").amp
    assert not ev("cuda", "fp32").amp and not ev("cpu", "amp").amp and not ev("cpu", "fp32").amp
    rec = ev("cuda", "amp").precision_record(BY_KEY["misc/winogavil"])
    assert rec == {"precision": "amp", "device": "cuda", "fp16_autocast": "image and text towers and the similarities"}
    assert "classifier" in ev("cuda", "amp").precision_record(BY_KEY["imagenet1k"])["fp16_autocast"]
    assert ev("cuda", "fp32").precision_record(BY_KEY["imagenet1k"])["fp16_autocast"] is None
    with pytest.raises(ConfigError, match="--precision must be one of amp, fp32"):
        ev("cpu", "bf16")


def test_cli_fp32_all_done_and_torn_lines(full_run, all_sets, tiny_checkpoint, tmp_path, caplog, capsys):
    import shutil

    from conceptprune.cli import main

    src, _ = full_run
    out = tmp_path / "out"
    shutil.copytree(src, out)
    before = (out / "eval_results.jsonl").read_text()
    base = ["evaluate", "--model", str(tiny_checkpoint), "--arch", "cp-tiny-vit", "--data-dir", str(all_sets[0]),
            "--out", str(out), "--executor", "local"]
    assert main(base) == 0  # every task done: nothing to do, exit 0
    assert (out / "eval_results.jsonl").read_text() == before
    # a run killed while writing the last row: the torn line is dropped with a warning, its task rerun
    lines = before.splitlines(keepends=True)
    (out / "eval_results.jsonl").write_text("".join(lines[:-1]) + lines[-1][: len(lines[-1]) // 2])
    # and a part file torn the same way (a parallel run killed mid-write)
    (out / "parts").mkdir()
    (out / "parts" / "00000.jsonl").write_text(lines[5][:-10])
    caplog.set_level(logging.WARNING)
    assert main(base + ["--precision", "fp32", "--batch-size", "5"]) == 0
    assert "incomplete" in caplog.text
    assert (out / "eval_results.jsonl").read_text() == before  # same 40 rows, same numbers
    run = json.loads((out / "eval_run.json").read_text())
    assert run["fairness/utkface"]["precision"] == "fp32" and run["cifar10"]["precision"] == "amp"
    assert not (out / "parts").exists()
    # a bad line that is not the last one is reported, with its line number
    (out / "eval_results.jsonl").write_text(lines[0] + "{oops\n" + "".join(lines[1:]))
    capsys.readouterr()
    assert main(base) == 2
    assert "eval_results.jsonl: line 2 is not a JSON object" in capsys.readouterr().err


def test_own_grouped_task(tiny_checkpoint, tmp_path, ref):
    """A task of your own with group metadata (task.json): DataComp-style accuracy per value of
    each named npy column."""
    from conceptprune.evaluation.run import evaluate, read_results
    from conceptprune.evaluation.wds import write_classification

    ims, y = images(20, 7)
    site = [i % 3 for i in range(20)]
    d = write_classification(tmp_path / "data" / "mine-sites", ims, y, COLORS, TEMPLATES,
                             metadata=[[s, 0] for s in site])
    (d / "task.json").write_text(json.dumps({"key": "mine/sites", "name": "Sites", "type": "wilds",
                                             "main_metric": "acc_worst_site", "metadata": {"0": "site"}}))
    res = evaluate(str(tiny_checkpoint), str(tmp_path / "data"), str(tmp_path / "out"), arch="cp-tiny-vit",
                   tasks=["mine/sites"], executor=Executor.create("local"), loader_workers=0)
    assert res["errors"] == {}
    m = read_results(tmp_path / "out" / "eval_results.jsonl")[0]["metrics"]
    pred = [argmax(r) for r in ref.logits(ims, COLORS, TEMPLATES)]
    per = [mean32([int(p == t) for p, t, s in zip(pred, y, site) if s == g]) for g in range(3)]
    assert [m[f"acc_site:{g}"] for g in range(3)] == per and m["count_site:1"] == 7.0
    assert m["main_metric"] == m["acc_worst_site"] == min(per)


def test_own_retrieval_task_has_mean_recall_at_every_k(tiny_checkpoint, tmp_path):
    """The demo's caption task reads mean_recall@5; DataComp's Flickr/MSCOCO rows write @1 only."""
    from conceptprune.evaluation.run import evaluate, read_results
    from conceptprune.evaluation.wds import write_retrieval

    ims, y = images(10, 3)
    d = write_retrieval(tmp_path / "data" / "mine-caps", ims, [[f"a {COLORS[c]} square"] for c in y])
    (d / "task.json").write_text(json.dumps({"key": "mine/caps", "name": "Caps", "type": "retrieval",
                                             "main_metric": "mean_recall@5"}))
    evaluate(str(tiny_checkpoint), str(tmp_path / "data"), str(tmp_path / "out"), arch="cp-tiny-vit",
             tasks=["mine/caps"], executor=Executor.create("local"), loader_workers=0)
    m = read_results(tmp_path / "out" / "eval_results.jsonl")[0]["metrics"]
    assert m["main_metric"] == m["mean_recall@5"] == pytest.approx(
        (m["text_retrieval_recall@5"] + m["image_retrieval_recall@5"]) / 2)
    assert "mean_recall@10" in m
