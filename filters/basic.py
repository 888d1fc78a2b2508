"""DataComp's ``basic`` and ``laion2b`` baseline filters, streamed over the pool.

basic: English caption (fastText lid.176 top-1 'en'), more than 2 words and more than 5
characters, shorter image side >= 200 px, aspect ratio <= 3.
laion2b: English caption and CLIP B/32 score >= 0.28, English by gcld3 as in DataComp's
reproduction (``langid="fasttext"`` for the fastText variant).
"""

from __future__ import annotations

import numpy as np

from conceptprune.pool import Pool

from .base import FilterResult
from .langid import LanguageId, language_id
from .rows import RowRule, run_rows, work_dir_for


def caption_mask(texts: list, lid: LanguageId) -> tuple[np.ndarray, np.ndarray]:
    """(english, long_enough) masks for a batch of captions."""
    texts = [t or "" for t in texts]
    english = np.array([lang == "en" for lang in lid.predict(texts)], dtype=bool)
    long_enough = np.array([len(t.split()) > 2 and len(t) > 5 for t in texts], dtype=bool)
    return english, long_enough


def image_mask(width: np.ndarray, height: np.ndarray) -> np.ndarray:
    w = np.asarray(width, dtype=np.float64)
    h = np.asarray(height, dtype=np.float64)
    short, long_ = np.minimum(w, h), np.maximum(w, h)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(short > 0, long_ / np.where(short > 0, short, 1), np.inf)
    return (short >= 200) & (ratio <= 3)


class BasicRule(RowRule):
    columns = ("text", "original_width", "original_height")

    def __init__(self, lid_model=None):
        self.lid_model = str(lid_model) if lid_model else None
        self.lid_path = str(LanguageId(lid_model).path)  # fails here, before any part runs

    def judge(self, chunk, cand):
        if getattr(self, "_lid", None) is None:
            self._lid = LanguageId(self.lid_model)
        english, long_enough = caption_mask(chunk.pylist("text"), self._lid)
        size_ok = image_mask(chunk.column("original_width"), chunk.column("original_height"))
        return english & long_enough & size_ok, {
            "not_english": (cand & ~english).sum(), "caption_too_short": (cand & ~long_enough).sum(),
            "image_too_small_or_thin": (cand & ~size_ok).sum()}


def basic(pool: Pool, *, within=None, lid_model=None, executor=None, out=None) -> FilterResult:
    rule = BasicRule(lid_model)
    res = run_rows(pool, rule, within, executor, work_dir_for(out, pool, "basic"), name="basic")
    reasons = {k: res.counters.get(k, 0) for k in ("not_english", "caption_too_short", "image_too_small_or_thin")}
    return FilterResult("basic", res.kept, {"lid_model": rule.lid_path},
                        {"pool": pool.rows, "candidates": res.candidates}, stats={"rejected_by": reasons})


class Laion2bRule(RowRule):
    columns = ("text", "clip_b32_similarity_score")

    def __init__(self, langid: str, lid_model, threshold: float):
        self.langid, self.lid_model, self.threshold = langid, str(lid_model) if lid_model else None, threshold
        self.lid_path = str(language_id(langid, lid_model).path)  # fails here, before any part runs

    def judge(self, chunk, cand):
        if getattr(self, "_lid", None) is None:
            self._lid = language_id(self.langid, self.lid_model)
        english = np.array([lang == "en" for lang in self._lid.predict(chunk.pylist("text"))], dtype=bool)
        return english & (chunk.column("clip_b32_similarity_score") >= np.float32(self.threshold)), {}


def laion2b(pool: Pool, *, within=None, lid_model=None, threshold: float = 0.28,
            langid: str = "gcld3", executor=None, out=None) -> FilterResult:
    rule = Laion2bRule(langid, lid_model, threshold)
    res = run_rows(pool, rule, within, executor, work_dir_for(out, pool, "laion2b"), name="laion2b")
    return FilterResult("laion2b", res.kept, {"langid": langid, "lid_model": rule.lid_path, "threshold": threshold},
                        {"pool": pool.rows, "candidates": res.candidates})


from conceptprune.checks import float_arg  # noqa: E402

from .registry import FilterSpec, Param, register  # noqa: E402


def _failed(checks: dict) -> str:
    bad = [k for k, ok in checks.items() if not ok]
    return "fails: " + ", ".join(bad) if bad else "passes every check"


def _num(x) -> str:
    return "missing" if x is None else f"{x:.5f}"


def _explain_basic(view, q, kept: bool) -> dict:
    """Each of basic's checks on the row, with the step's language identifier."""
    if view.pool_dir is None:
        return {"why": "pool folder not found"}
    r = view.row(q, ["text", "original_width", "original_height"])
    if r is None:
        return {"why": "not in the pool"}
    text, w, h = r["text"] or "", r["original_width"], r["original_height"]
    lid = LanguageId(view.params.get("lid_model"))
    english, long_enough = caption_mask([text], lid)
    lang = lid.predict([text])[0]
    checks = {"english": bool(english[0]), "caption_long_enough": bool(long_enough[0]),
              "image_size_ok": bool(image_mask(np.array([w]), np.array([h]))[0])}
    return {"language": lang, "words": len(text.split()), "chars": len(text),
            "width": w, "height": h, "checks": checks,
            "why": f"language {lang!r}, {len(text.split())} words, {len(text)} characters, "
                   f"image {w}x{h} (shorter side >= 200, aspect <= 3): {_failed(checks)}"}


def _explain_laion2b(view, q, kept: bool) -> dict:
    """The language and the B/32 score against the step's threshold."""
    if view.pool_dir is None:
        return {"why": "pool folder not found"}
    col = "clip_b32_similarity_score"
    r = view.row(q, ["text", col])
    if r is None:
        return {"why": "not in the pool"}
    kind = view.params.get("langid", "gcld3")
    lid = language_id(kind, None if kind == "gcld3" else view.params.get("lid_model"))
    lang = lid.predict([r["text"] or ""])[0]
    thr = view.params.get("threshold", 0.28)
    score = r[col]
    checks = {"english": lang == "en",
              "score_above_threshold": bool(score is not None and np.float32(score) >= np.float32(thr))}
    return {"language": lang, "langid": kind, "score": score, "threshold": thr, "column": col, "checks": checks,
            "why": f"language {lang!r} ({kind}), {col} {_num(score)} vs threshold {thr}: {_failed(checks)}"}


register(FilterSpec(
    "basic", "DataComp's basic filter: English caption > 2 words and > 5 chars, side >= 200 px, aspect <= 3",
    basic, runs_as="rows", explain=_explain_basic,
    params=(Param("--lid-model", help="fastText language-ID model (default: the bundled lid.176.ftz; DataComp "
                                      "used lid.176.bin)"),)))
register(FilterSpec(
    "laion2b", "DataComp's LAION-2B filter: English caption (gcld3) and CLIP B/32 score >= 0.28",
    laion2b, runs_as="rows", explain=_explain_laion2b,
    params=(Param("--langid", choices=("gcld3", "fasttext"), default="gcld3",
                  help="language identifier (default gcld3, DataComp's for laion2b; fasttext: lid.176)"),
            Param("--lid-model", help="with --langid fasttext: the model (default: bundled lid.176.ftz)"),
            Param("--threshold", float_arg("--threshold"), default=0.28,
                  help="minimum CLIP B/32 score (default 0.28)"))))
