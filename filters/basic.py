"""DataComp's ``basic`` and ``laion2b`` baseline filters, streamed over the pool.

basic: English caption (fastText lid.176 top-1 'en'), more than 2 words and more than 5
characters, shorter image side >= 200 px, aspect ratio <= 3.
laion2b: English caption and CLIP B/32 score >= 0.28, English by gcld3 as in DataComp's
reproduction (``langid="fasttext"`` for the fastText variant).
"""

from __future__ import annotations

import numpy as np

from conceptprune.keeplist import UidCollector
from conceptprune.pool import Pool

from .base import FilterResult, as_within
from .langid import LanguageId, language_id


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


def basic(pool: Pool, *, within=None, lid_model=None) -> FilterResult:
    within = as_within(within)
    lid = LanguageId(lid_model)
    kept, n = UidCollector(), 0
    reasons = {"not_english": 0, "caption_too_short": 0, "image_too_small_or_thin": 0}
    for chunk in pool.iter_chunks(["text", "original_width", "original_height"], progress="basic filter"):
        cand = within.mask(chunk.uids)
        n += int(cand.sum())
        english, long_enough = caption_mask(chunk.pylist("text"), lid)
        size_ok = image_mask(chunk.column("original_width"), chunk.column("original_height"))
        reasons["not_english"] += int((cand & ~english).sum())
        reasons["caption_too_short"] += int((cand & ~long_enough).sum())
        reasons["image_too_small_or_thin"] += int((cand & ~size_ok).sum())
        kept.add(chunk.uids[cand & english & long_enough & size_ok])
    within.check()
    return FilterResult("basic", kept, {"lid_model": str(lid.path)},
                        {"pool": pool.rows, "candidates": n}, stats={"rejected_by": reasons})


def laion2b(pool: Pool, *, within=None, lid_model=None, threshold: float = 0.28,
            langid: str = "gcld3") -> FilterResult:
    within = as_within(within)
    lid = language_id(langid, lid_model)
    kept, n = UidCollector(), 0
    for chunk in pool.iter_chunks(["text", "clip_b32_similarity_score"], progress="laion2b filter"):
        cand = within.mask(chunk.uids)
        n += int(cand.sum())
        english = np.array([lang == "en" for lang in lid.predict(chunk.pylist("text"))], dtype=bool)
        score_ok = chunk.column("clip_b32_similarity_score") >= np.float32(threshold)
        kept.add(chunk.uids[cand & english & score_ok])
    within.check()
    return FilterResult("laion2b", kept, {"langid": langid, "lid_model": str(lid.path), "threshold": threshold},
                        {"pool": pool.rows, "candidates": n})
