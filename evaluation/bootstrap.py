"""Per-example outcomes of an evaluation and the paired bootstrap over them.

``evaluate`` keeps, per task, what each example contributed to the main metric, in
``eval_outcomes/<task folder>.npz`` beside ``eval_results.jsonl`` (a few bytes an example):

- classification: ``pred`` (top-1 class) and ``target``: acc1, mean_per_class_recall (sklearn's
  balanced accuracy: the mean recall over the classes present) and iWildCam's F1-macro_all
  (sklearn's macro F1 over the labels present in the targets, 0 where undefined);
- grouped tasks: also ``correct`` (top-1; Dollar Street: top-5) and ``group`` (FMoW: region,
  Dollar Street: income_ds, GeoDE: region): the worst group's accuracy over non-empty groups
  (FMoW's region 5 counts, as in DataComp's code);
- retrieval: ``text_hit@K`` per image (one of its captions in the top K), ``image_hit@K`` per
  caption and ``caption_image``: mean_recall@K = (text R@K + image R@K) / 2 (DataComp's main metric
  is K = 1); the unit resampled is the image with its captions (the gallery stays whole);
- WinoGAViL: ``score`` (the example's Jaccard) and ``group`` (its number of candidates).

Each file's ``meta`` (JSON) holds the task key, its main metric, the value evaluate reported, the
checkpoint's sha256 and the number of examples.

The bootstrap: for task ``key`` the resamples come from ``numpy.random.default_rng([seed,
zlib.crc32(key)])``, each resample draws ``integers(0, n, n)`` example indices, and the metric is
recomputed on the resample as DataComp defines it (worst groups, macro F1 and Jaccard groups
included, not approximated). Two runs on the same examples share the draws (paired); the 95%
interval is the 2.5th and 97.5th percentile (numpy's linear interpolation) of the resampled
differences (resamples that leave a metric undefined are left out; over 5% of them: no interval). The 38-task average is resampled the same way: each resample's average over tasks.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from conceptprune.errors import ConfigError

OUTCOMES = "eval_outcomes"
FORMAT = 1

# main metric -> (arrays it needs, function of (arrays, weights))


def _acc(a, w):
    return float((w * (a["pred"] == a["target"])).sum() / w.sum())


def _balanced(a, w):
    t = a["target"]
    k = int(t.max()) + 1
    tot = np.bincount(t, weights=w, minlength=k)
    hit = np.bincount(t, weights=w * (a["pred"] == t), minlength=k)
    present = tot > 0
    return float((hit[present] / tot[present]).mean())


def _macro_f1(a, w):
    p, t = a["pred"], a["target"]
    k = int(max(p.max(), t.max())) + 1
    tp = np.bincount(t, weights=w * (p == t), minlength=k)
    true = np.bincount(t, weights=w, minlength=k)  # tp + fn
    pred = np.bincount(p, weights=w, minlength=k)  # tp + fp
    labels = true > 0  # sklearn: labels=np.unique(target)
    denom = true[labels] + pred[labels]
    f1 = np.where(denom > 0, 2 * tp[labels] / np.where(denom > 0, denom, 1), 0.0)
    return float(f1.mean())


def _worst_group(a, w):
    g = a["group"]
    k = int(g.max()) + 1
    tot = np.bincount(g, weights=w, minlength=k)
    hit = np.bincount(g, weights=w * a["correct"], minlength=k)
    present = tot > 0
    return float((hit[present] / tot[present]).min())


def _retrieval(k: int):
    def mean_recall(a, w):
        wc = w[a["caption_image"]]
        text = (w * a[f"text_hit@{k}"]).sum() / w.sum()
        image = (wc * a[f"image_hit@{k}"]).sum() / wc.sum()
        return float(0.5 * (text + image))

    return mean_recall


def _jaccard_10_12(a, w):
    sel = a["group"] >= 10
    return float((w[sel] * a["score"][sel]).sum() / w[sel].sum())


METRICS = {
    "acc1": (("pred", "target"), _acc),
    "mean_per_class_recall": (("pred", "target"), _balanced),
    "F1-macro_all": (("pred", "target"), _macro_f1),
    "acc_worst_region": (("correct", "group"), _worst_group),
    "acc_top5_wg": (("correct", "group"), _worst_group),
    "acc_wg": (("correct", "group"), _worst_group),
    "jaccard_score_10-12": (("score", "group"), _jaccard_10_12),
}
for _k in (1, 5, 10):  # DataComp's retrieval main metric is mean_recall@1; your own tasks may take @5, @10
    METRICS[f"mean_recall@{_k}"] = ((f"text_hit@{_k}", f"image_hit@{_k}", "caption_image"), _retrieval(_k))
# arrays that identify the examples: two runs are paired only if these agree
IDENTITY = ("target", "group", "caption_image")


@dataclass
class Outcomes:
    key: str
    main_metric: str
    arrays: dict
    meta: dict

    @property
    def n(self) -> int:
        """Resampling units: images for retrieval, examples otherwise."""
        first = next((k for k in self.arrays if k.startswith("text_hit@")), None) or next(iter(self.arrays))
        return len(self.arrays[first])

    def metric(self, weights=None) -> float:
        w = np.ones(self.n) if weights is None else weights
        return METRICS[self.main_metric][1](self.arrays, w)


def path_for(results_dir: str | Path, key: str) -> Path:
    return Path(results_dir) / OUTCOMES / f"{key.replace('/', '-')}.npz"


def save(results_dir: str | Path, key: str, main_metric: str | None, arrays: dict, *, value, checkpoint_sha256) -> Path | None:
    """Write one task's outcomes atomically; None (nothing written) when its main metric is not one
    the bootstrap recomputes (FairFace, UTKFace, your own grouped tasks)."""
    if main_metric not in METRICS:
        return None
    need, _ = METRICS[main_metric]
    arrays = {k: np.asarray(arrays[k]) for k in need if k in arrays}
    if set(arrays) != set(need):
        return None
    small = {}
    for k, v in arrays.items():
        if v.dtype == bool:
            small[k] = v
        elif np.issubdtype(v.dtype, np.integer):
            small[k] = v.astype(np.int32)
        else:
            small[k] = v.astype(np.float32)
    meta = {"format": FORMAT, "key": key, "main_metric": main_metric, "value": value,
            "checkpoint_sha256": checkpoint_sha256, "n": int(len(next(iter(small.values()))))}
    from conceptprune.atomic import atomic_open

    p = path_for(results_dir, key)
    p.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(p, "wb") as f:
        np.savez_compressed(f, meta=np.array(json.dumps(meta)), **small)
    return p


def load(results_dir: str | Path, key: str) -> Outcomes | None:
    p = path_for(results_dir, key)
    if not p.exists():
        return None
    with np.load(p, allow_pickle=False) as z:
        meta = json.loads(str(z["meta"]))
        arrays = {k: z[k] for k in z.files if k != "meta"}
    if meta.get("main_metric") not in METRICS:
        raise ConfigError(f"{p}: unknown main metric {meta.get('main_metric')!r}")
    for k in ("pred", "target", "group", "caption_image"):
        if k in arrays:
            arrays[k] = arrays[k].astype(np.int64)
    return Outcomes(meta["key"], meta["main_metric"], arrays, meta)


def load_all(results_file: str | Path, keys) -> dict:
    """key -> Outcomes for the tasks that have them, beside a results file."""
    d = Path(results_file).parent
    out = {}
    for k in keys:
        o = load(d, k)
        if o is not None:
            out[k] = o
    return out


def check_paired(a: Outcomes, b: Outcomes, where: str) -> None:
    if a.main_metric != b.main_metric or a.n != b.n or any(
            k in a.arrays and not np.array_equal(a.arrays[k], b.arrays.get(k)) for k in IDENTITY):
        raise ConfigError(f"{where}: task {a.key}: the two runs were not evaluated on the same examples "
                          f"({a.n} vs {b.n}, or other labels or groups); a paired comparison needs the same set")


def rng_for(seed: int, key: str) -> np.random.Generator:
    return np.random.default_rng([int(seed), zlib.crc32(key.encode())])


def resampled(outcomes: list, seed: int, n_resamples: int) -> np.ndarray:
    """(len(outcomes), n_resamples) metric values: the same example draws for every run of one task."""
    first = outcomes[0]
    rng = rng_for(seed, first.key)
    out = np.empty((len(outcomes), n_resamples))
    for b in range(n_resamples):
        w = np.bincount(rng.integers(0, first.n, first.n), minlength=first.n).astype(np.float64)
        for i, o in enumerate(outcomes):
            out[i, b] = o.metric(w)
    return out


def interval(samples: np.ndarray) -> tuple[float, float]:
    """The 2.5th and 97.5th percentiles. A resample can leave a metric undefined (no example of a
    WinoGAViL group, say: NaN, as DataComp's own empty group): those resamples are left out, and
    if they are more than 5% there is no interval (NaN: the verdict says "no interval")."""
    s = np.asarray(samples, dtype=np.float64)
    ok = ~np.isnan(s)
    if ok.mean() < 0.95:
        return float("nan"), float("nan")
    lo, hi = np.percentile(s[ok], [2.5, 97.5])
    return float(lo), float(hi)


def verdict(lo, hi) -> str:
    if lo is None or hi is None or np.isnan(lo) or np.isnan(hi):
        return "no interval"
    if lo > 0:
        return "better"
    if hi < 0:
        return "worse"
    return "within noise"
