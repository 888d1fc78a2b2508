"""DataComp's metrics, computed as DataComp's ``eval_utils`` computes them (names included).

Pure functions of predictions, labels and per-sample ``npy`` metadata (numpy arrays):

- classification (``wds_eval.py``): ``acc1``, ``acc5`` (None with fewer than 5 classes),
  ``mean_per_class_recall`` (sklearn's balanced accuracy);
- WILDS (``wilds_eval.py`` on the ``wilds`` package's metrics): iWildCam ``acc_avg``,
  ``recall-macro_all``, ``F1-macro_all``; Camelyon17 per ``slide``; FMoW per ``year`` and per
  ``region`` with ``acc_worst_year`` and ``acc_worst_region``;
- fairness (``fairness_eval.py``): Dollar Street top-5 per ``income_ds``, GeoDE per ``region``,
  FairFace/UTKFace from four zero-shot classifiers (race, gender, age, toxic);
- WinoGAViL (``wino_eval.py``): Jaccard scores grouped by the number of candidates.

The group metrics follow the ``wilds`` package exactly: a ``CombinatorialGrouper`` numbers the
groups 0..prod(max+1)-1 over the fields in metadata order and names them ``field:value``
(``race:3_gender:1`` for two fields, the last field first); every group gets
``<metric>_<group>`` and ``count_<group>``, also the empty ones (metric NaN, as DataComp's
replacement of ``avg_over_groups`` divides 0 by 0); ``<metric>_avg`` and the group means are
float32 (torch) means; ``<metric>_wg`` is the minimum over the non-empty groups.

FMoW's ``acc_worst_region`` is DataComp's: its test for the "Other" region looks for the word in
group names that are numbers (``region:5``), so region 5 counts. The worst region without
"Other" is added as ``acc_worst_region_excluding_other`` (not part of DataComp's output).
"""

from __future__ import annotations

import numpy as np

from conceptprune.errors import ConfigError

# metadata columns of each evaluator's npy member (DataComp's _metadata_fields)
FIELDS = {
    "wilds/iwildcam": ["location", "sequence", "year", "month", "day", "hour", "minute", "second", "y"],
    "wilds/camelyon17": ["hospital", "slide", "y"],
    "wilds/fmow": ["region", "year", "y"],
    "fairness/dollar_street": ["income_ds", "income_meta", "region"],
    "fairness/geode": ["region", "country"],
    "fairness/fairface": ["age", "gender", "race", "race_binary"],
    "fairness/utkface": ["age", "gender", "race", "race_binary"],
}
FAIRFACE_OBJECTIVES = ("race", "gender", "age", "toxic")  # DataComp's FF_PRED_LABELS, in its order
FMOW_OTHER_REGION = 5  # WILDS FMoW regions: Asia, Europe, Africa, Americas, Oceania, Other


def _f32_mean(hits, n) -> float:
    """torch's float32 mean of 0/1 values: float32(k) / float32(n); NaN for an empty group."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return float(np.float32(hits) / np.float32(n))


# -- classification ------------------------------------------------------------------------------


def classification_metrics(logits, target, n_classes: int) -> dict:
    """DataComp's evaluate_webdataset: clip_benchmark's top-k accuracy, sklearn's balanced accuracy."""
    import torch
    from clip_benchmark.metrics.zeroshot_classification import accuracy
    from sklearn.metrics import balanced_accuracy_score

    logits, target = torch.as_tensor(logits), torch.as_tensor(target)
    if n_classes >= 5:
        acc1, acc5 = accuracy(logits, target, topk=(1, 5))
    else:
        (acc1,), acc5 = accuracy(logits, target, topk=(1,)), None
    pred = logits.argmax(axis=1)
    return {"acc1": acc1, "acc5": acc5,
            "mean_per_class_recall": float(balanced_accuracy_score(target.numpy(), pred.numpy()))}


def topk_predictions(logits, k: int) -> np.ndarray:
    """torch.topk's indices, as DataComp's Dollar Street evaluation takes them."""
    import torch

    return torch.topk(torch.as_tensor(logits), int(k), dim=1)[1].numpy()


# -- the wilds package's grouping ----------------------------------------------------------------


def grouper(meta: np.ndarray, fields: list[str], by: list[str]) -> tuple[np.ndarray, list[str]]:
    """CombinatorialGrouper(by) over ``meta`` (columns = ``fields``): (group of each row, group names)."""
    idx = [i for i, f in enumerate(fields) if f in by]
    if len(idx) != len(by):
        raise ConfigError(f"group fields {by} not all in the metadata fields {fields}")
    cols = np.asarray(meta)[:, idx].astype(np.int64)
    if len(cols) == 0:
        raise ConfigError("no metadata rows to group")
    if cols.min() < 0:
        raise ConfigError(f"metadata for groups {by} has negative values")
    card = cols.max(axis=0) + 1
    factors = np.concatenate(([1], np.cumprod(card)[:-1])).astype(np.int64)
    groups = cols @ factors
    names = [_group_field_str(g, factors, by) for g in range(int(np.prod(card)))]
    return groups, names


def _group_field_str(group: int, factors: np.ndarray, by: list[str]) -> str:
    n = len(factors)
    vals = [(group % factors[i + 1]) // factors[i] for i in range(n - 1)] + [group // factors[n - 1]]
    text = ", ".join(f"{by[i]} = {int(vals[i])}" for i in reversed(range(n)))
    return text.replace("=", ":").replace(",", "_").replace(" ", "")


def group_wise(correct: np.ndarray, groups: np.ndarray, n_groups: int) -> tuple[list[float], np.ndarray]:
    correct = np.asarray(correct, dtype=np.float64)
    counts = np.bincount(groups, minlength=n_groups)
    hits = np.bincount(groups, weights=correct, minlength=n_groups)
    return [_f32_mean(hits[i], counts[i]) for i in range(n_groups)], counts


def worst(values: list[float], counts: np.ndarray) -> float:
    present = [v for v, c in zip(values, counts) if c > 0 and not np.isnan(v)]
    return float(min(present)) if present else 0.0


def standard_group_eval(name: str, correct, meta, fields, by) -> dict:
    """WILDSDataset.standard_group_eval with an element-wise accuracy named ``name``."""
    correct = np.asarray(correct, dtype=np.float64)
    groups, names = grouper(meta, fields, by)
    out = {f"{name}_avg": _f32_mean(correct.sum(), len(correct)) if len(correct) else 0.0}
    values, counts = group_wise(correct, groups, len(names))
    for g, gname in enumerate(names):
        out[f"{name}_{gname}"] = values[g]
        out[f"count_{gname}"] = float(counts[g])
    out[f"{name}_wg"] = worst(values, counts)
    return out


# -- WILDS ---------------------------------------------------------------------------------------


def wilds_metrics(key: str, pred, target, meta) -> dict:
    """The metrics DataComp's WILDS evaluators add to the classification metrics."""
    pred, target, meta = np.asarray(pred), np.asarray(target), _meta(key, meta)
    fields = FIELDS[key]
    if key == "wilds/iwildcam":
        from sklearn.metrics import f1_score, recall_score

        labels = np.unique(target)
        return {"acc_avg": _f32_mean((pred == target).sum(), len(target)),
                "recall-macro_all": float(recall_score(target, pred, average="macro", labels=labels)),
                "F1-macro_all": float(f1_score(target, pred, average="macro", labels=labels))}
    if key == "wilds/camelyon17":
        return standard_group_eval("acc", pred == target, meta, fields, ["slide"])
    if key == "wilds/fmow":
        return fmow_metrics(pred, target, meta)
    raise ConfigError(f"{key}: not a WILDS task DataComp evaluates")


def fmow_metrics(pred, target, meta) -> dict:
    fields = FIELDS["wilds/fmow"]
    correct = np.asarray(pred) == np.asarray(target)
    out = standard_group_eval("acc", correct, meta, fields, ["year"])
    out["acc_worst_year"] = out.pop("acc_wg")
    groups, names = grouper(meta, fields, ["region"])
    values, counts = group_wise(correct, groups, len(names))
    kept, kept_real = [], []
    for g, gname in enumerate(names):
        out[f"acc_{gname}"] = values[g]
        out[f"count_{gname}"] = float(counts[g])
        if counts[g] == 0 or "Other" in gname:  # DataComp's test: never true for "region:5"
            continue
        kept.append(values[g])
        if g != FMOW_OTHER_REGION:
            kept_real.append(values[g])
    out["acc_worst_region"] = min(kept) if kept else 0.0
    out["acc_worst_region_excluding_other"] = min(kept_real) if kept_real else 0.0
    return out


# -- fairness ------------------------------------------------------------------------------------


def dollar_street_metrics(top5, target, meta) -> dict:
    """Top-5 accuracy grouped by income_ds (DataComp's TopKAccuracy named acc_top5)."""
    meta = _meta("fairness/dollar_street", meta)
    correct = (np.asarray(top5) == np.asarray(target)[:, None]).any(axis=1)
    return standard_group_eval("acc_top5", correct, meta, FIELDS["fairness/dollar_street"], ["income_ds"])


def geode_metrics(pred, target, meta) -> dict:
    meta = _meta("fairness/geode", meta)
    return standard_group_eval("acc", np.asarray(pred) == np.asarray(target), meta, FIELDS["fairness/geode"],
                               ["region"])


def fairface_metrics(pred, meta) -> dict:
    """FairFace/UTKFace: ``pred`` holds, per sample, the race, gender, age and toxic predictions
    (columns in that order); ``meta`` the npy ``[age, gender, race, race_binary]``."""
    fields = FIELDS["fairness/fairface"]
    meta = _meta("fairness/fairface", meta)
    pred = np.asarray(pred)
    col = {o: pred[:, i] for i, o in enumerate(FAIRFACE_OBJECTIVES)}
    m = {f: meta[:, i] for i, f in enumerate(fields)}
    out = {}
    # DataComp's Tables 3-4: race (as white / non-white: race prediction != 1), gender, age by race_binary
    out.update(standard_group_eval("acc_race", (col["race"] != 1).astype(int) == m["race_binary"], meta, fields,
                                   ["race_binary"]))
    for label in ("gender", "age"):
        out.update(standard_group_eval(f"acc_{label}", col[label] == m[label], meta, fields, ["race_binary"]))
    # Table 5: gender by race x gender
    out.update(standard_group_eval("acc_gender_x", col["gender"] == m["gender"], meta, fields, ["gender", "race"]))
    # Table 6: toxic classes 18+ are crime-related, 14-17 non-human; the "accuracy" is the rate
    toxic = col["toxic"]
    out.update(standard_group_eval("toxicity_crime", toxic >= 18, meta, fields, ["race"]))
    out.update(standard_group_eval("toxicity_nonhuman", (toxic >= 14) & (toxic < 18), meta, fields, ["race"]))
    return out


def split_objectives(classnames: list[str], templates: list[str], where: str = "") -> dict[str, dict]:
    """FairFace/UTKFace class names and templates are ``objective:text``; per objective of
    FAIRFACE_OBJECTIVES: {"classnames": [...], "templates": [...]}."""
    out = {o: {"classnames": [], "templates": []} for o in FAIRFACE_OBJECTIVES}
    for kind, lines in (("templates", templates), ("classnames", classnames)):
        for line in lines:
            if ":" not in line:
                raise ConfigError(f"{where}: {kind} line {line!r} lacks the 'objective:' prefix "
                                  f"({'/'.join(FAIRFACE_OBJECTIVES)})")
            objective, text = line.split(":", 1)
            out.setdefault(objective, {"classnames": [], "templates": []})[kind].append(text)
    for o in FAIRFACE_OBJECTIVES:
        if not out[o]["classnames"] or not out[o]["templates"]:
            raise ConfigError(f"{where}: no '{o}:' class names or templates")
    return out


def multilabel_predictions(logits: np.ndarray, n_classes: list[int]) -> np.ndarray:
    """Argmax per objective of (N, objectives, max classes) logits, padding columns excluded."""
    logits = np.array(logits, dtype=np.float32, copy=True)
    for i, n in enumerate(n_classes):
        logits[:, i, n:] = -1e9
    return logits.argmax(axis=-1)


# the npy columns each evaluator groups by (DataComp's groupers read only these)
GROUPED = {"wilds/iwildcam": ["location"], "wilds/camelyon17": ["slide"], "wilds/fmow": ["region", "year"],
           "fairness/dollar_street": ["income_ds"], "fairness/geode": ["region"],
           "fairness/fairface": ["age", "gender", "race", "race_binary"],
           "fairness/utkface": ["age", "gender", "race", "race_binary"]}


def _meta(key: str, meta) -> np.ndarray:
    meta = np.asarray(meta)
    need = 1 + max(FIELDS[key].index(f) for f in GROUPED[key])
    if meta.ndim != 2 or meta.shape[1] < need or len(meta) == 0:
        raise ConfigError(f"{key}: the npy metadata needs the columns {', '.join(FIELDS[key][:need])} "
                          f"(DataComp's fields: {', '.join(FIELDS[key])}); got shape {meta.shape}")
    if not np.array_equal(meta, np.round(meta)) or meta.min() < 0:
        raise ConfigError(f"{key}: the npy metadata must be non-negative integers")
    return meta.astype(np.int64)


# -- WinoGAViL -----------------------------------------------------------------------------------


def clip_prompt(cue: str) -> str:
    """WinoGAViL's prompt: the lower-cased cue with 'A'/'An'."""
    cue = cue.lower()
    return f"An {cue}" if cue[:1] in "aeiou" and cue else f"A {cue}"


def winogavil_choice(sims: np.ndarray, y_true: np.ndarray) -> np.ndarray:
    """DataComp's pick: the last ``n_assoc`` of an ascending argsort (ties as numpy orders them)."""
    n_assoc = int(np.asarray(y_true).sum())
    top = np.argsort(sims)[-n_assoc:]
    return np.isin(np.arange(len(sims)), top)


def jaccard(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """sklearn's binary jaccard_score: |T & P| / |T | P| (0 when both are empty)."""
    t, p = np.asarray(y_true, bool), np.asarray(y_pred, bool)
    union = int((t | p).sum())
    return float((t & p).sum() / union) if union else 0.0


def winogavil_metrics(scores, n_candidates) -> dict:
    scores, groups = np.asarray(scores, dtype=np.float64), np.asarray(n_candidates)

    def mean(sel):
        return float(scores[sel].mean()) if sel.any() else float("nan")

    return {"avg_jaccard_score": mean(np.ones(len(scores), bool)),
            "jaccard_score_5": mean(groups == 5), "jaccard_score_6": mean(groups == 6),
            "jaccard_score_10": mean(groups == 10), "jaccard_score_12": mean(groups == 12),
            "jaccard_score_5-6": mean(groups <= 6), "jaccard_score_10-12": mean(groups >= 10)}
