"""A chain of keep-lists read back with everything its filters left on disk.

Each keep-list's manifest names its method, parameters, counts, ``--within`` list, pool and
(for the cluster filters) the clustering folder; the cluster filters also leave
``KEEP.clusters.parquet`` and SemDeDup its per-row results (``M_j`` per candidate) under
``CLUSTERING/semdedup/<candidate set>/m``. Paths in manifests are as the filter was given
them (often relative to where it ran); they are resolved against the working directory,
then the keep-list's folder.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from conceptprune import keeplist as K
from conceptprune import uids as U
from conceptprune.errors import ConfigError

log = logging.getLogger(__name__)



def runs_on_clustering(method: str) -> bool:
    """Whether a step's filter ran on a clustering folder (the filter registry says; a method no
    longer registered: no)."""
    from conceptprune.filters.registry import load

    spec = load().get(method)
    return spec is not None and spec.runs_as == "clustering"


def resolve(p: str | None, near: Path) -> Path | None:
    """A path from a manifest: absolute, else relative to the cwd, else to ``near``'s folder."""
    if not p:
        return None
    q = Path(p)
    for c in ([q] if q.is_absolute() else [Path.cwd() / q, near.parent / q, near.parent / q.name]):
        if c.exists():
            return c
    return None


@dataclass
class Step:
    path: Path
    keep: np.ndarray  # sorted set of uids
    manifest: dict
    within: Path | None = None
    table: object = None  # KEEP.clusters.parquet as a DataFrame, if any
    clustering_dir: Path | None = None
    _clustering: object = field(default=None, repr=False)

    @property
    def method(self) -> str:
        return self.manifest.get("method", "?")

    @property
    def params(self) -> dict:
        return self.manifest.get("params") or {}

    @property
    def counts(self) -> dict:
        return self.manifest.get("counts") or {}

    @property
    def stats(self) -> dict:
        return self.manifest.get("stats") or {}

    @property
    def name(self) -> str:
        return f"{self.method} ({self.path.name})"

    def clustering(self):
        if self._clustering is None and self.clustering_dir is not None:
            from conceptprune.filters.clustering import Clustering

            self._clustering = Clustering(self.clustering_dir)
        return self._clustering

    def eps(self) -> float | None:
        """SemDeDup's eps: the one asked, else the one a target fraction ended at."""
        e = self.params.get("eps")
        return float(e) if e is not None else self.stats.get("eps_used")

    def semdedup_dir(self, candidates: np.ndarray | None) -> Path | None:
        """The stored per-row SemDeDup results of this step (``.../semdedup/<within id>/m``)."""
        if self.method != "semdedup" or self.clustering_dir is None:
            return None
        wid = "all" if candidates is None else hashlib.sha1(candidates.tobytes()).hexdigest()[:16]
        rule = self.params.get("rule", "paper")
        name = wid + ("" if rule == "paper" else f"-{rule}-{self.params.get('eps'):g}")
        d = self.clustering_dir / "semdedup" / name / "m"
        if d.is_dir():
            return d
        found = sorted(self.clustering_dir.glob("semdedup/*/m"))  # e.g. --within not the previous step
        if len(found) == 1:
            return found[0]
        return None


@dataclass
class Chain:
    steps: list[Step]
    pool_dir: Path | None
    pool_rows: int
    embedding_key: str | None

    def candidates(self, i: int) -> np.ndarray | None:
        """The uids step ``i`` chose from (its --within list; None: the whole pool)."""
        w = self.steps[i].within
        if w is None:
            return None
        for s in self.steps[:i]:
            if s.path.resolve() == w.resolve():
                return s.keep
        return K.read_keep_list(w)

    def pool(self, embeddings: bool = False):
        from conceptprune.pool import Pool

        if self.pool_dir is None:
            raise ConfigError("this needs the pool: pass --pool DIR (the manifests' pool path was not found)")
        key = self.embedding_key if embeddings else None
        if embeddings and not key:
            raise ConfigError("no embedding key recorded in the manifests")
        return Pool(self.pool_dir, embedding_key=key)

    def final(self) -> np.ndarray:
        return self.steps[-1].keep


def load_step(path: str | os.PathLike) -> Step:
    path = Path(path)
    keep = K.read_keep_list(path)
    man = K.read_manifest(path)
    if man is None:
        raise ConfigError(f"{path}: no manifest ({K.manifest_path(path).name}) beside it; the report needs "
                          "the filter's manifest")
    step = Step(path, keep, man)
    within = (man.get("within") or {}).get("path")
    step.within = resolve(within, path)
    if within and step.within is None:
        raise ConfigError(f"{path}: its --within list {within} was not found (relative to the cwd or {path.parent})")
    tp = path.with_suffix(".clusters.parquet")
    if tp.exists():
        import pandas as pd

        step.table = pd.read_parquet(tp)
    if runs_on_clustering(step.method):
        cd = resolve(step.params.get("clustering"), path) or (path.with_suffix(".clustering")
                                                              if path.with_suffix(".clustering").is_dir() else None)
        if cd is not None and (cd / "clustering.json").exists():
            step.clustering_dir = cd
        elif step.params.get("clustering"):  # (image-based with DataComp's centroids has none)
            log.warning("%s: clustering folder %s not found; per-row cluster views are skipped",
                        path, step.params.get("clustering"))
    return step


def load_chain(paths, pool: str | os.PathLike | None = None) -> Chain:
    if not paths:
        raise ConfigError("give at least one keep-list")
    steps = [load_step(p) for p in paths]
    pools = [s.manifest.get("pool") or {} for s in steps]
    pool_dir = Path(pool) if pool else None
    if pool_dir is not None and not pool_dir.is_dir():
        raise ConfigError(f"--pool {pool_dir}: not a folder")
    if pool_dir is None:
        for s, pd_ in zip(steps, pools):
            pool_dir = resolve(pd_.get("path") if isinstance(pd_.get("path"), str) else None, s.path)
            if pool_dir:
                break
    rows = next((int(p["rows"]) for p in pools if p.get("rows")), None)
    if rows is None:
        rows = int(steps[0].counts.get("pool") or 0)
    key = next((p.get("embedding_key") for p in pools if p.get("embedding_key")), None)
    return Chain(steps, pool_dir, rows, key)


# -- per-row views over a clustering ------------------------------------------------------


def _extremes(cluster, kept, dist, uids, n: int):
    """Per (kept, cluster) group, the n nearest and n furthest rows (ties by uid)."""
    hi, lo = U.split(uids)
    order = np.lexsort((lo, hi, dist, cluster, kept))
    cluster, kept, dist, uids = cluster[order], kept[order], dist[order], uids[order]
    g = kept.astype(np.int64) * (1 << 40) + cluster.astype(np.int64)
    starts = np.flatnonzero(np.r_[True, g[1:] != g[:-1]])
    size = np.diff(np.r_[starts, len(g)])
    gid = np.repeat(np.arange(len(starts)), size)
    rank = np.arange(len(g)) - starts[gid]
    sel = (rank < n) | (rank >= size[gid] - n)
    return cluster[sel], kept[sel], dist[sel], uids[sel]


def cluster_examples(step: Step, candidates: np.ndarray | None, n: int, available=None):
    """(cluster, kept, dist, uid) of the n nearest and n furthest kept and dropped candidates
    of every cluster, streamed over the assignment (memory O(k n)). ``available(uids)``
    restricts the choice (e.g. to uids present in the shards)."""
    cl = step.clustering()
    state = None
    candidates = None if candidates is None else K.UidIndex(candidates)
    keep = K.UidIndex(step.keep)
    for _start, uids, cluster, dist in cl.iter_assignment():
        m = cluster >= 0
        if candidates is not None:
            m &= K.member(candidates, uids)[0]
        if available is not None:
            m &= available(uids)
        if not m.any():
            continue
        block = (cluster[m], K.member(keep, uids[m])[0], dist[m], uids[m])
        if state is not None:
            block = tuple(np.concatenate([a, b]) for a, b in zip(state, block))
        state = _extremes(*block, n)
    return state


def kept_per_cluster(step: Step, lists: list[np.ndarray], candidates: np.ndarray | None = None) -> np.ndarray:
    """k x len(lists) counts: members of each list in each cluster of step's clustering."""
    cl = step.clustering()
    out = np.zeros((cl.k, len(lists)), np.int64)
    candidates = None if candidates is None else K.UidIndex(candidates)
    lists = [K.UidIndex(lst) for lst in lists]
    for _start, uids, cluster, _dist in cl.iter_assignment():
        m = cluster >= 0
        if candidates is not None:
            m &= K.member(candidates, uids)[0]
        for j, lst in enumerate(lists):
            hit = m & K.member(lst, uids)[0]
            out[:, j] += np.bincount(cluster[hit], minlength=cl.k)
    return out


def locate_rows(step: Step, query: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(global pool row, cluster, dist) of each query uid (row -1 if absent), from the assignment."""
    cl = step.clustering()
    q = K.sort_uids(query)
    rows = np.full(len(q), -1, np.int64)
    clus = np.full(len(q), -1, np.int32)
    dist = np.full(len(q), np.nan, np.float32)
    for start, uids, cluster, d in cl.iter_assignment():
        found, idx = K.member(q, uids)
        if found.any():
            at = idx[found]
            rows[at] = start + np.flatnonzero(found)
            clus[at], dist[at] = cluster[found], d[found]
    # back to the caller's order
    _, pos = K.member(q, query)
    return rows[pos], clus[pos], dist[pos]


# -- SemDeDup: who removed whom -----------------------------------------------------------


def semdedup_results(step: Step, candidates: np.ndarray | None):
    d = step.semdedup_dir(candidates)
    if d is None:
        return
    for p in sorted(d.glob("b*.npy")):
        yield np.load(p)


def near_duplicates(chain: Chain, step: Step, candidates, removed: np.ndarray):
    """For removed uids: (partner uid array, similarity) where partner = argmax_{i<j} S_ij in
    the SemDeDup order of j's cluster (distance to the centroid descending, then uid), with
    the embeddings as SemDeDup used them (normalised by the pool, in float32; float16-rounded
    for results of SemDeDup's format 1)."""
    want = K.sort_uids(removed)
    parts = []
    for res in semdedup_results(step, candidates):  # bucket by bucket: only the wanted clusters stay
        found = K.member(want, U.make_array(res["hi"], res["lo"]))[0]
        if found.any():
            parts.append(res[np.isin(res["cluster"], np.unique(res["cluster"][found]))])
    if not parts:
        return None
    members = np.concatenate(parts)  # in SemDeDup's order inside each cluster
    muids = U.make_array(members["hi"], members["lo"])
    prow, _, _ = locate_rows(step, muids)
    if (prow < 0).any():
        raise ConfigError(f"{step.clustering_dir}: some SemDeDup members are not in the assignment")
    pool = chain.pool(embeddings=True)
    order = np.argsort(prow)
    emb = np.empty((len(prow), pool.dim), np.float32)
    emb[order] = pool.read_embedding_rows(prow[order])[0]
    import json

    done = (step.semdedup_dir(candidates).parent / "semdedup.json")
    fmt = json.loads(done.read_text()).get("format", 1) if done.exists() else 1
    if fmt < 2:  # results of format 1 compared fp16-rounded unit vectors; format 2 float32 ones
        emb = emb.astype(np.float16).astype(np.float32)
    partner = np.empty(len(removed), U.UID_DTYPE)
    sim = np.full(len(removed), np.nan, np.float32)
    for qi, u in enumerate(removed):
        j = int(np.flatnonzero((members["hi"] == u["f0"]) & (members["lo"] == u["f1"]))[0])
        c = members["cluster"][j]
        same = np.flatnonzero(members["cluster"][:j] == c)
        if not len(same):
            partner[qi] = u
            continue
        s = emb[same] @ emb[j]
        b = int(np.argmax(s))
        partner[qi] = muids[same[b]]
        sim[qi] = s[b]
    return partner, sim, members
