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
    res = run_rows(pool, rule, within, executor, work_dir_for(out, pool, "basic"))
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
    res = run_rows(pool, rule, within, executor, work_dir_for(out, pool, "laion2b"))
    return FilterResult("laion2b", res.kept, {"langid": langid, "lid_model": rule.lid_path, "threshold": threshold},
                        {"pool": pool.rows, "candidates": res.candidates})


basic.uses_rows = laion2b.uses_rows = True
