"""A chain of keep-lists read back with everything its filters left on disk.

Each keep-list's manifest names its method, parameters, counts, ``--within`` list, pool and
(for the cluster filters) the clustering folder; the cluster filters also leave
``KEEP.clusters.parquet`` and SemDeDup its per-row results (``M_j`` per candidate) under
``CLUSTERING/semdedup/<candidate set>/m``. Paths in manifests are as the filter was given
them (often relative to where it ran); they are resolved against the keep-list's folder,
then the working directory, and each candidate is checked against what the manifest
recorded (a pool's rows, a --within list's size, a clustering's rows): another
experiment's same-named folder is never taken. A list its manifest does not describe
(sha256), steps from different pools or out of order are refused.
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


def resolve(p: str | None, near: Path, verify=None, what: str = "path") -> Path | None:
    """A path from ``near``'s manifest: absolute, else relative to the manifest's folder, then to
    the current directory, then its name in the manifest's folder. ``verify(candidate)`` returns
    None when the candidate is what the manifest describes, else why not: the first that
    verifies is taken (a same-named folder of another experiment under the cwd is not); if some
    exist but none verifies, that is an error naming the manifest."""
    if not p:
        return None
    q = Path(p)
    tried = []
    for c in ([q] if q.is_absolute() else [near.parent / q, Path.cwd() / q, near.parent / q.name]):
        if not c.exists():
            continue
        why = verify(c) if verify is not None else None
        if why is None:
            return c
        tried.append(f"{c} ({why})")
    if tried:
        raise ConfigError(f"{K.manifest_path(near)}: its {what} {p} was not found; "
                          f"not the one it describes: {'; '.join(dict.fromkeys(tried))}")
    return None


def _pool_check(rows):
    def check(c: Path) -> str | None:
        from conceptprune.pool import Pool

        if rows is None:
            return None
        try:
            n = Pool(c).rows
        except Exception as e:  # not a pool at all
            return f"not a pool: {e}"
        return None if n == int(rows) else f"{n} rows, the manifest says {rows}"
    return check


def _within_check(count):
    def check(c: Path) -> str | None:
        if count is None:
            return None
        n = len(K.read_keep_list(c))
        return None if n == int(count) else f"{n} uids, the manifest says {count}"
    return check


def _clustering_check(rows):
    def check(c: Path) -> str | None:
        import json

        try:
            meta = json.loads((c / "clustering.json").read_text())
            n = int(meta["pool"]["rows"])
        except (OSError, ValueError, KeyError, TypeError):
            return "no readable clustering.json"
        return None if rows is None or n == int(rows) else f"a clustering of {n} rows, the pool has {rows}"
    return check


@dataclass
class Step:
    path: Path
    keep: np.ndarray  # sorted set of uids
    manifest: dict
    entries: int = 0  # the list's entries (an upsampled list repeats uids)
    pool_dir: Path | None = None  # the pool its manifest names, found and checked
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
    entries = K.read_keep_list(path, multiset=True)
    keep = entries[np.r_[True, entries[1:] != entries[:-1]]] if len(entries) else entries
    man = K.read_manifest(path)
    if man is None:
        raise ConfigError(f"{path}: no manifest ({K.manifest_path(path).name}) beside it; the report needs "
                          "the filter's manifest")
    if K.manifest_matches(path) is False:
        raise ConfigError(f"{path}: its manifest {K.manifest_path(path).name} describes another file (sha256 "
                          "differs): the list was replaced after the filter wrote it; the report would show "
                          "that filter's parameters for it")
    step = Step(path, keep, man, entries=int(len(entries)))
    pool = man.get("pool") or {}
    rows = pool.get("rows")
    if isinstance(pool.get("path"), str):
        step.pool_dir = resolve(pool["path"], path, _pool_check(rows), "pool")
    within = man.get("within") or {}
    step.within = resolve(within.get("path"), path, _within_check(within.get("count")), "--within list")
    if within.get("path") and step.within is None:
        raise ConfigError(f"{path}: its --within list {within['path']} was not found (relative to {path.parent} "
                          "or the cwd)")
    tp = path.with_suffix(".clusters.parquet")
    if tp.exists():
        import pandas as pd

        step.table = pd.read_parquet(tp)
    if runs_on_clustering(step.method):
        check = _clustering_check(rows)
        own = path.with_suffix(".clustering")
        cd = resolve(step.params.get("clustering"), path, check, "clustering") or \
            (own if own.is_dir() and check(own) is None else None)
        if cd is not None and (cd / "clustering.json").exists():
            step.clustering_dir = cd
        elif step.params.get("clustering"):  # (image-based with DataComp's centroids has none)
            log.warning("%s: clustering folder %s not found; per-row cluster views are skipped",
                        path, step.params.get("clustering"))
    return step


def _pool_of(step: Step) -> tuple:
    """What identifies a step's pool: the folder found (resolved), else the manifest's rows."""
    rows = (step.manifest.get("pool") or {}).get("rows")
    return (step.pool_dir.resolve() if step.pool_dir else None, int(rows) if rows is not None else None)


def same_pool(a: Step, b: Step) -> bool:
    (da, ra), (db, rb) = _pool_of(a), _pool_of(b)
    return (da is None or db is None or da == db) and (ra is None or rb is None or ra == rb)


def load_chain(paths, pool: str | os.PathLike | None = None) -> Chain:
    if not paths:
        raise ConfigError("give at least one keep-list")
    steps = [load_step(p) for p in paths]
    for s in steps[1:]:  # one chain: one pool
        if not same_pool(steps[0], s):
            raise ConfigError(f"{s.path} was made from another pool than {steps[0].path} "
                              f"({_pool_of(s)[0] or _pool_of(s)[1]} vs {_pool_of(steps[0])[0] or _pool_of(steps[0])[1]}); "
                              "a report shows one chain over one pool")
    where = {s.path.resolve(): i for i, s in enumerate(steps)}
    for i, s in enumerate(steps):  # ... in its order: a step's --within list comes before it
        j = where.get(s.within.resolve()) if s.within is not None else None
        if j is not None and j >= i:
            raise ConfigError(f"{s.path} chose from {s.within}, which comes {'at' if j == i else 'after'} it in the "
                              "chain; give the keep-lists in the order they were made")
        if i and s.within is not None and j is None and not _same_list(s.within, steps[i - 1].path):
            log.warning("%s chose from %s, not from the step before it (%s)", s.path, s.within, steps[i - 1].path)
    pools = [s.manifest.get("pool") or {} for s in steps]
    pool_dir = Path(pool) if pool else None
    if pool_dir is not None and not pool_dir.is_dir():
        raise ConfigError(f"--pool {pool_dir}: not a folder")
    if pool_dir is not None:
        rows = next((p.get("rows") for p in pools if p.get("rows")), None)
        why = _pool_check(rows)(pool_dir)
        if why:
            raise ConfigError(f"--pool {pool_dir}: not the pool of {steps[0].path} ({why})")
    if pool_dir is None:
        pool_dir = next((s.pool_dir for s in steps if s.pool_dir is not None), None)
    rows = next((int(p["rows"]) for p in pools if p.get("rows")), None)
    if rows is None:
        rows = int(steps[0].counts.get("pool") or 0)
    key = next((p.get("embedding_key") for p in pools if p.get("embedding_key")), None)
    return Chain(steps, pool_dir, rows, key)


def _same_list(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or K.file_sha256(a) == K.file_sha256(b)
    except OSError:
        return False


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
