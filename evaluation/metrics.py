"""Metrics of DataComp's suite that clip_benchmark does not compute: WILDS, fairness
(worst-group) and WinoGAViL. Pure functions of logits, labels and group metadata."""

from __future__ import annotations

import numpy as np

from .tasks import FMOW_REGIONS, Task


def topk_correct(logits: np.ndarray, target: np.ndarray, k: int) -> np.ndarray:
    k = min(k, logits.shape[1])
    top = np.argpartition(-logits, k - 1, axis=1)[:, :k]
    return (top == target[:, None]).any(axis=1)


def group_accuracy(correct: np.ndarray, groups: np.ndarray) -> dict[int, float]:
    return {int(g): float(correct[groups == g].mean()) for g in np.unique(groups)}


def wilds_metrics(task: Task, logits: np.ndarray, target: np.ndarray, meta: np.ndarray) -> dict:
    from sklearn.metrics import f1_score

    pred = logits.argmax(axis=1)
    correct = pred == target
    out = {"acc1": float(correct.mean())}
    if task.key == "wilds/iwildcam":
        # WILDS's F1-macro_all: macro F1 over the classes present in the labels
        out["F1-macro_all"] = float(f1_score(target, pred, average="macro", labels=np.unique(target)))
    elif task.key == "wilds/camelyon17":
        per = group_accuracy(correct, meta[:, 0])
        out.update({f"acc_hospital:{g}": v for g, v in per.items()})
    elif task.key == "wilds/fmow":
        region = meta[:, 0]
        per = group_accuracy(correct, region)
        named = {FMOW_REGIONS[g] if 0 <= g < len(FMOW_REGIONS) else str(g): v for g, v in per.items()}
        out.update({f"acc_region:{name}": v for name, v in named.items()})
        real = [v for g, v in per.items() if FMOW_REGIONS[g] != "Other"] if per else []
        out["acc_worst_region"] = float(min(real)) if real else float("nan")
    return out


def fairness_metrics(task: Task, logits: np.ndarray, target: np.ndarray, meta: np.ndarray) -> dict:
    top1 = logits.argmax(axis=1) == target
    top5 = topk_correct(logits, target, 5)
    out = {"acc1": float(top1.mean()), "acc5": float(top5.mean())}
    for col, name in task.metadata.items():
        groups = meta[:, col]
        for label, correct in (("acc", top1), ("acc_top5", top5)):
            per = group_accuracy(correct, groups)
            out.update({f"{label}_{name}:{g}": v for g, v in per.items()})
            out[f"{label}_{name}_wg"] = float(min(per.values()))
    if task.key == "fairness/dollar_street":
        out["acc_top5_wg"] = out["acc_top5_income_group_wg"]
    elif task.key == "fairness/geode":
        out["acc_wg"] = out["acc_region_wg"]
    return out


def article(cue: str) -> str:
    return f"An {cue}" if cue[:1].lower() in "aeiou" else f"A {cue}"


def jaccard(pred: set, gold: set) -> float:
    return len(pred & gold) / len(pred | gold) if pred | gold else 1.0


def winogavil_metrics(scores: list[tuple[int, float]]) -> dict:
    """scores: (number of candidates, Jaccard) per sample."""
    out = {}
    arr = np.array(scores, dtype=float).reshape(-1, 2)
    for n in sorted({int(c) for c in arr[:, 0]}):
        out[f"jaccard_score_{n}"] = float(arr[arr[:, 0] == n, 1].mean())
    for lo, hi in ((5, 6), (10, 12)):
        sel = (arr[:, 0] >= lo) & (arr[:, 0] <= hi)
        out[f"jaccard_score_{lo}-{hi}"] = float(arr[sel, 1].mean()) if sel.any() else float("nan")
    out["jaccard_score"] = float(arr[:, 1].mean()) if len(arr) else float("nan")
    return out
