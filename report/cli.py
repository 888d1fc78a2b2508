"""``conceptprune report`` and ``conceptprune explain`` (argument parsing only)."""

from __future__ import annotations

from conceptprune.checks import int_arg


def register(sub) -> None:
    p = sub.add_parser("report", help="static HTML report of a filter chain (funnel, clusters, thumbnails)",
                       description="Write one self-contained HTML folder showing what a chain of keep-lists "
                                   "did: the funnel, per-cluster tables and plots, thumbnails of kept and "
                                   "dropped members, SemDeDup near-duplicates, and a diff of two chains.")
    p.add_argument("keep_lists", nargs="+", metavar="KEEP.npy", help="the chain's keep-lists, in order")
    p.add_argument("--out", required=True, help="report folder (index.html, PNGs, thumbs/, report.json)")
    p.add_argument("--pool", default=None, help="the pool folder (default: the manifests' pool path)")
    p.add_argument("--shards", default=None, help="webdataset shards for thumbnails (indexed by uid once)")
    p.add_argument("--index", default=None, help="folder of the uid index (default OUT/uid_index; the shards "
                                                  "are only read)")
    p.add_argument("--index-memory", default=None, metavar="SIZE",
                   help="memory for building the uid index (its sorted runs; default 1G, whatever the pool's size)")
    p.add_argument("--compare", nargs="+", default=None, metavar="OTHER.npy",
                   help="another chain to diff against (per cluster: gained / lost)")
    p.add_argument("--thumbs", type=int_arg("--thumbs", min=1), default=3,
                   help="kept and dropped members per cluster, nearest and furthest each (default 3)")
    p.add_argument("--max-clusters", type=int_arg("--max-clusters", min=1), default=30,
                   help="clusters with thumbnails, largest first (default 30)")
    p.add_argument("--overwrite", action="store_true", help="replace the report an existing non-empty --out holds")
    p.set_defaults(func=_report)

    q = sub.add_parser("explain", help="why one sample was kept or dropped by each step of a chain",
                       description="For one uid: at which step of the chain it was dropped or kept, and why.")
    q.add_argument("uid", help="the sample's uid (32 hex digits)")
    q.add_argument("--chain", nargs="+", required=True, metavar="KEEP.npy", help="the chain's keep-lists, in order")
    q.add_argument("--pool", default=None, help="the pool folder (default: the manifests' pool path)")
    q.add_argument("--shards", default=None, help="webdataset shards: show the sample's image and caption")
    q.add_argument("--index", default=None, metavar="DIR",
                   help="folder of the uid index, reused between runs (default: a per-user cache, "
                        "$XDG_CACHE_HOME/conceptprune/uid_index/...; the shards are only read)")
    q.add_argument("--index-memory", default=None, metavar="SIZE",
                   help="memory for building the uid index when it is absent (default 1G)")
    q.add_argument("--thumb-dir", default=None, help="where to copy its image (default INDEX/thumbs)")
    q.add_argument("--json", action="store_true", help="print JSON instead of text")
    q.set_defaults(func=_explain)


def _report(a) -> int:
    from .html import write_report

    res = write_report(a.keep_lists, a.out, pool=a.pool, shards=a.shards, compare=a.compare,
                       thumbs_per=a.thumbs, max_clusters=a.max_clusters, index_dir=a.index,
                       index_memory=a.index_memory, overwrite=a.overwrite)
    b = (res.get("index") or {}).get("build")
    if b:
        print(f"uid index: {b['samples']:,} samples indexed in {b['build_s']:.1f} s ({b['uids_per_s']:,} uids/s, "
              f"memory budget {b['memory_budget'] / 2**20:.0f} MiB, {b['runs']} sorted run(s))")
    print(f"report: {a.out}/index.html ({res['bytes'] / 1e6:.2f} MB, {res['build_s']:.1f} s)")
    return 0


def _explain(a) -> int:
    import json

    from .explain import explain, format_text

    res = explain(a.uid, a.chain, pool=a.pool, shards=a.shards, thumb_dir=a.thumb_dir,
                  index_memory=a.index_memory, index_dir=a.index)
    print(json.dumps(res, indent=2, default=str) if a.json else format_text(res))
    return 0
