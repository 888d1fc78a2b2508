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

from .chain import Chain, load_chain, locate_rows, near_duplicates, semdedup_results


def _in(arr: np.ndarray, q: np.ndarray) -> bool:
    return bool(K.member(arr, q)[0][0])


def _in_pool(chain: Chain, q: np.ndarray) -> bool:
    return any(K.member(q, chunk.uids)[0].any() for chunk in chain.pool().iter_chunks())


def _row(chain: Chain, q: np.ndarray, columns: list[str]) -> dict | None:
    """The pool row of uid ``q`` (the columns asked for), None when the pool lacks it."""
    for chunk in chain.pool().iter_chunks(columns):
        found = K.member(q, chunk.uids)[0]
        if found.any():
            i = int(np.flatnonzero(found)[0])
            return {c: chunk.table.column(c)[i].as_py() for c in columns}
    return None


class StepView:
    """What a filter's explain hook (its ``FilterSpec.explain``) may ask of one step of a chain:
    the step's parameters and outputs, the pool row of a uid, the step's candidates, its
    clustering and its stored SemDeDup results."""

    def __init__(self, chain: Chain, i: int):
        self.chain, self.i, self.step = chain, i, chain.steps[i]
        self.params, self.stats, self.table = self.step.params, self.step.stats, self.step.table
        self.clustering_dir, self.pool_dir = self.step.clustering_dir, chain.pool_dir

    def row(self, q: np.ndarray, columns: list[str]) -> dict | None:
        """The uid's pool row (those columns); None when the pool or the row is missing."""
        return None if self.pool_dir is None else _row(self.chain, q, columns)

    def candidates(self) -> np.ndarray | None:
        return self.chain.candidates(self.i)

    def kept(self, uids: np.ndarray) -> bool:
        return _in(self.step.keep, uids)

    def clustering(self):
        return self.step.clustering()

    def locate(self, q: np.ndarray):
        return locate_rows(self.step, q)

    def eps(self) -> float | None:
        return self.step.eps()

    def semdedup_results(self):
        return semdedup_results(self.step, self.candidates())

    def near_duplicate(self, q: np.ndarray):
        partner, sim, _ = near_duplicates(self.chain, self.step, self.candidates(), q)
        return partner, sim


def _explain_step(chain: Chain, i: int, q, kept: bool) -> dict:
    """The step's filter's own explanation (its registered hook), else its parameters."""
    from conceptprune.filters.registry import load

    spec = load().get(chain.steps[i].method)
    if spec is None or spec.explain is None:
        return {"params": chain.steps[i].params}
    return spec.explain(StepView(chain, i), q, kept)


def explain(uid: str, chain_paths, *, pool=None, shards=None, thumb_dir=None, index_memory=None,
            index_dir=None) -> dict:
    """``index_dir``: the uid index's folder (default a per-user cache, never inside --shards);
    the image is copied to ``thumb_dir`` (default INDEX/thumbs)."""
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
            if fate.startswith("kept"):  # no step kept it: it was never in this step's --within list
                fate = f"not a candidate of step {i + 1} ({s.method}: not in its --within list {s.within})"
            continue
        kept = _in(s.keep, q)
        rec["status"] = "kept" if kept else "dropped"
        rec.update(_explain_step(chain, i, q, kept))
        steps.append(rec)
        if not kept and fate.startswith("kept"):
            fate = f"dropped at step {i + 1} ({s.method})"
    out = {"uid": uid, "fate": fate, "steps": steps}
    if shards:
        from .index import build_index

        index = build_index(shards, index_dir, memory=index_memory)
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


def _safe(text) -> str:
    """Text from the data (web captions, file names) for a terminal: control characters (ANSI and
    OSC escapes, bells, carriage returns) shown escaped, as --json does."""
    return "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in str(text))


def format_text(res: dict) -> str:
    lines = [f"uid {res['uid']}: {_safe(res['fate'])}"]
    for s in res["steps"]:
        why = s.get("why") or ""
        lines.append(_safe(f"  {s['step']}. {s['method']:<11} {s['status']:<8} {why}".rstrip()))
    if "sample" in res:
        smp = res["sample"]
        lines.append("  sample: not in the shards" if smp is None else
                     f"  image: {_safe(smp['image'])}\n  caption: {_safe(smp['caption'])}")
    return "\n".join(lines)
