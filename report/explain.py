"""``conceptprune explain UID --chain KEEP.npy...``: one sample's path through a filter chain.

For every step: was the sample a candidate (in its --within list), was it kept, and why:
CLIP score against the threshold; DBP's cluster, distance rank and budget; SemDeDup's M_j
against 1 - eps and the near-duplicate that removed it; basic and laion2b: each of their
checks on the row (language, caption length, image size; the B/32 score and threshold),
recomputed with the language identifier named in the step's manifest. With --shards, its image (copied
out by the uid index, without unpacking the tar) and caption.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from conceptprune import keeplist as K
from conceptprune import uids as U
from conceptprune.errors import ConfigError

from .chain import Chain, Step, load_chain, locate_rows, near_duplicates, semdedup_results


def _in(arr: np.ndarray, q: np.ndarray) -> bool:
    return bool(K.member(arr, q)[0][0])


def _pool_value(chain: Chain, q: np.ndarray, column: str):
    pool = chain.pool()
    for chunk in pool.iter_chunks([column]):
        found = K.member(q, chunk.uids)[0]
        if found.any():
            return chunk.column(column)[int(np.flatnonzero(found)[0])].item()
    return None


def _in_pool(chain: Chain, q: np.ndarray) -> bool:
    return any(K.member(q, chunk.uids)[0].any() for chunk in chain.pool().iter_chunks())


def _clip(chain: Chain, step: Step, q, kept: bool) -> dict:
    col = step.params.get("column") or "clip_l14_similarity_score"
    thr = step.params.get("threshold")
    score = _pool_value(chain, q, col) if chain.pool_dir is not None else None
    d = {"score": score, "threshold": thr, "column": col}
    if score is not None and thr is not None:
        d["why"] = (f"{col} {score:.5f} {'>=' if kept else '<'} threshold {thr:.5f}")
    return d


def _row(chain: Chain, q: np.ndarray, columns: list[str]) -> dict | None:
    """The pool row of uid ``q`` (the columns asked for), None when the pool lacks it."""
    for chunk in chain.pool().iter_chunks(columns):
        found = K.member(q, chunk.uids)[0]
        if found.any():
            i = int(np.flatnonzero(found)[0])
            return {c: chunk.table.column(c)[i].as_py() for c in columns}
    return None


def _num(x) -> str:
    return "missing" if x is None else f"{x:.5f}"


def _failed(checks: dict) -> str:
    bad = [k for k, ok in checks.items() if not ok]
    return "fails: " + ", ".join(bad) if bad else "passes every check"


def _basic(chain: Chain, step: Step, q, kept: bool) -> dict:
    from conceptprune.filters.basic import caption_mask, image_mask
    from conceptprune.filters.langid import LanguageId

    if chain.pool_dir is None:
        return {"why": "pool folder not found"}
    r = _row(chain, q, ["text", "original_width", "original_height"])
    if r is None:
        return {"why": "not in the pool"}
    text, w, h = r["text"] or "", r["original_width"], r["original_height"]
    lid = LanguageId(step.params.get("lid_model"))
    english, long_enough = caption_mask([text], lid)
    lang = lid.predict([text])[0]
    checks = {"english": bool(english[0]), "caption_long_enough": bool(long_enough[0]),
              "image_size_ok": bool(image_mask(np.array([w]), np.array([h]))[0])}
    return {"language": lang, "words": len(text.split()), "chars": len(text),
            "width": w, "height": h, "checks": checks,
            "why": f"language {lang!r}, {len(text.split())} words, {len(text)} characters, "
                   f"image {w}x{h} (shorter side >= 200, aspect <= 3): {_failed(checks)}"}


def _laion2b(chain: Chain, step: Step, q, kept: bool) -> dict:
    from conceptprune.filters.langid import language_id

    if chain.pool_dir is None:
        return {"why": "pool folder not found"}
    col = "clip_b32_similarity_score"
    r = _row(chain, q, ["text", col])
    if r is None:
        return {"why": "not in the pool"}
    kind = step.params.get("langid", "gcld3")
    lid = language_id(kind, None if kind == "gcld3" else step.params.get("lid_model"))
    lang = lid.predict([r["text"] or ""])[0]
    thr = step.params.get("threshold", 0.28)
    score = r[col]
    checks = {"english": lang == "en",
              "score_above_threshold": bool(score is not None and np.float32(score) >= np.float32(thr))}
    return {"language": lang, "langid": kind, "score": score, "threshold": thr, "column": col, "checks": checks,
            "why": f"language {lang!r} ({kind}), {col} {_num(score)} vs threshold {thr}: {_failed(checks)}"}


def _cluster_rank(chain: Chain, i: int, step: Step, cluster: int, dist: float, q) -> tuple[int, int]:
    """(1-based rank of the sample in its cluster in the step's keep order, candidates in the cluster)."""
    cand = chain.candidates(i)
    keep_order = step.params.get("keep", "hard")
    hi, lo = (int(x) for x in q[0])
    before = n = 0
    for _s, uids, c, d in step.clustering().iter_assignment():
        m = c == cluster
        if cand is not None:
            m &= K.member(cand, uids)[0]
        if not m.any():
            continue
        dd, uu = d[m], uids[m]
        n += int(m.sum())
        uh, ul = U.split(uu)
        smaller_uid = (uh < hi) | ((uh == hi) & (ul < lo))
        if keep_order == "easy":
            before += int(((dd < dist) | ((dd == dist) & smaller_uid)).sum())
        else:  # hard (random: the rank by distance is still shown)
            before += int(((dd > dist) | ((dd == dist) & smaller_uid)).sum())
    return before + 1, n


def _dbp(chain: Chain, i: int, step: Step, q, kept: bool) -> dict:
    if step.clustering_dir is None:
        return {"why": "clustering folder not found"}
    _, cl, dist = locate_rows(step, q)
    c, d = int(cl[0]), float(dist[0])
    out = {"cluster": c, "distance": d}
    if c < 0:
        out["why"] = "invalid embedding: never a candidate of a cluster"
        return out
    rank, n = _cluster_rank(chain, i, step, c, d, q)
    out.update(rank=rank, cluster_candidates=n, keep=step.params.get("keep", "hard"))
    if step.table is not None:
        row = step.table[step.table["cluster"] == c].iloc[0]
        out.update(budget=int(row["kept"]), P=float(row["P"]), complexity=float(row["complexity"]),
                   d_intra=float(row["d_intra"]), d_inter=float(row["d_inter"]))
        if out["keep"] == "random":
            out["why"] = f"cluster {c}: budget {out['budget']} of {n}, members chosen by seeded hash"
        else:
            order = "furthest" if out["keep"] == "hard" else "nearest"
            out["why"] = (f"cluster {c} (P_j {out['P']:.4g}, complexity {out['complexity']:.4g}): "
                          f"distance {d:.5f} ranks {rank} of {n} ({order} first); budget N_j = {out['budget']}"
                          f" -> {'kept' if kept else 'dropped'}")
    return out


def _semdedup(chain: Chain, i: int, step: Step, q, kept: bool) -> dict:
    cand = chain.candidates(i)
    eps = step.eps()
    out = {"eps": eps}
    for res in semdedup_results(step, cand):
        m = (res["hi"] == q[0]["f0"]) & (res["lo"] == q[0]["f1"])
        if m.any():
            r = res[m][0]
            out.update(cluster=int(r["cluster"]), distance=float(r["dist"]), M=float(r["M"]))
            break
    else:
        out["why"] = "no stored SemDeDup result for this uid"
        return out
    if eps is not None:
        out["why"] = (f"M_j {out['M']:.5f} {'<=' if kept else '>'} 1 - eps = {1 - eps:.5f} "
                      f"(cluster {out['cluster']})")
    if not kept and chain.pool_dir is not None:
        partner, sim, _ = near_duplicates(chain, step, cand, q)
        pu = U.pair_to_uid(*partner[0])
        out.update(removed_by=pu, similarity=float(sim[0]),
                   removed_by_kept=_in(step.keep, partner[0].reshape(1)))
        out["why"] += f"; near duplicate of {pu} (cos {sim[0]:.5f})"
    return out


def explain(uid: str, chain_paths, *, pool=None, shards=None, thumb_dir=None, index_memory=None) -> dict:
    try:
        q = U.uids_to_array([uid])
    except Exception:
        raise ConfigError(f"{uid!r} is not a uid (32 hex digits)") from None
    uid = U.pair_to_uid(*q[0])
    chain = load_chain(chain_paths, pool)
    steps, fate = [], "kept by every step"
    first = chain.steps[0]
    if chain.candidates(0) is None and not _in(first.keep, q) and chain.pool_dir is not None \
            and not _in_pool(chain, q):
        return {"uid": uid, "fate": f"not in the pool {chain.pool_dir}", "steps": []}
    for i, s in enumerate(chain.steps):
        cand = chain.candidates(i)
        rec = {"step": i + 1, "method": s.method, "file": str(s.path)}
        if cand is not None and not _in(cand, q):
            rec["status"] = "not a candidate (dropped earlier)"
            steps.append(rec)
            continue
        kept = _in(s.keep, q)
        rec["status"] = "kept" if kept else "dropped"
        if s.method == "clip-score":
            rec.update(_clip(chain, s, q, kept))
        elif s.method == "dbp":
            rec.update(_dbp(chain, i, s, q, kept))
        elif s.method == "semdedup":
            rec.update(_semdedup(chain, i, s, q, kept))
        elif s.method == "basic":
            rec.update(_basic(chain, s, q, kept))
        elif s.method == "laion2b":
            rec.update(_laion2b(chain, s, q, kept))
        else:
            rec["params"] = s.params
        steps.append(rec)
        if not kept and fate.startswith("kept"):
            fate = f"dropped at step {i + 1} ({s.method})"
    out = {"uid": uid, "fate": fate, "steps": steps}
    if shards:
        from .index import build_index

        index = build_index(shards, memory=index_memory)
        sample = index.read(uid)
        if sample is None:
            out["sample"] = None
        else:
            ext = next((e for e in sample.parts if e.lower() in ("jpg", "jpeg", "png", "webp")), None)
            d = Path(thumb_dir) if thumb_dir else index.folder / "thumbs"
            path = None
            if ext:
                d.mkdir(parents=True, exist_ok=True)
                path = d / f"{uid}.{ext.lower()}"
                path.write_bytes(sample.parts[ext])
            out["sample"] = {"image": str(path) if path else None,
                             "caption": sample.parts.get("txt", b"").decode("utf-8", "replace")}
    return out


def format_text(res: dict) -> str:
    lines = [f"uid {res['uid']}: {res['fate']}"]
    for s in res["steps"]:
        why = s.get("why") or ""
        lines.append(f"  {s['step']}. {s['method']:<11} {s['status']:<8} {why}".rstrip())
    if "sample" in res:
        smp = res["sample"]
        lines.append("  sample: not in the shards" if smp is None else
                     f"  image: {smp['image']}\n  caption: {smp['caption']}")
    return "\n".join(lines)
