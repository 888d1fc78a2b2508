"""``conceptprune filter <method> --pool DIR --out KEEP.npy [--within PREV.npy] [options]``."""

from __future__ import annotations

import argparse

METHODS = {}  # name -> (help, add_arguments, run)


def method(name: str, help: str):
    def deco(fn):
        METHODS[name] = (help, fn)
        return fn
    return deco


def _common(p: argparse.ArgumentParser, embeddings: bool = False) -> None:
    p.add_argument("--pool", required=True, help="DataComp metadata directory (<name>.parquet + <name>.npz)")
    p.add_argument("--out", required=True, help="output keep-list (.npy); a manifest .json is written beside it")
    p.add_argument("--within", default=None, metavar="PREV.npy",
                   help="only consider uids of this keep-list (chain filters: clip-score -> semdedup -> dbp)")
    if embeddings:
        p.add_argument("--embedding-key", default="l14_img",
                       help="npz array with the image embeddings (default l14_img; b32_img, or a key "
                            "written by 'conceptprune embed')")
        p.add_argument("--embedding-dir", default=None, help="folder of the npz files if not beside the parquet files")
        p.add_argument("--bad-embeddings", choices=["error", "drop"], default="error",
                       help="NaN/zero embeddings: stop with an error (default) or drop those rows (never kept)")


def register(sub) -> None:
    p = sub.add_parser("filter", help="filter a pool into a DataComp keep-list",
                       description="Filter a DataComp pool and write a keep-list (sorted u8,u8 uids) "
                                   "plus a JSON manifest.")
    msub = p.add_subparsers(dest="method", metavar="<method>", required=True)
    for name, (helptext, add) in METHODS.items():
        q = msub.add_parser(name, help=helptext, description=helptext)
        run = add(q)
        q.set_defaults(func=run)


@method("none", "keep every uid of the pool (or of --within)")
def _none(p):
    _common(p)

    def run(a):
        from . import keep_all, run_filter
        run_filter(keep_all, a.pool, a.out, within=a.within)
    return run


@method("random", "keep exactly round(F * N) uids chosen at random (seeded)")
def _random(p):
    _common(p)
    p.add_argument("--fraction", type=float, required=True, help="fraction of candidates to keep, in (0, 1]")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")

    def run(a):
        from . import random_subset, run_filter
        run_filter(random_subset, a.pool, a.out, within=a.within, fraction=a.fraction, seed=a.seed)
    return run


@method("clip-score", "DataComp's CLIP-score filter (top fraction, or score >= threshold)")
def _clip(p):
    _common(p)
    p.add_argument("--model", choices=["l14", "b32"], default="l14", help="which CLIP score column (default l14)")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--fraction", type=float, help="keep the top fraction (threshold at index int(N*F), ties kept)")
    g.add_argument("--threshold", type=float, help="keep score >= threshold")

    def run(a):
        from . import clip_score, run_filter
        run_filter(clip_score, a.pool, a.out, within=a.within, fraction=a.fraction,
                   threshold=a.threshold, model=a.model)
    return run


@method("basic", "DataComp's basic filter: English caption > 2 words and > 5 chars, side >= 200 px, aspect <= 3")
def _basic(p):
    _common(p)
    p.add_argument("--lid-model", default=None,
                   help="fastText language-ID model (default: the bundled lid.176.ftz; DataComp used lid.176.bin)")

    def run(a):
        from . import basic, run_filter
        run_filter(basic, a.pool, a.out, within=a.within, lid_model=a.lid_model)
    return run


@method("laion2b", "DataComp's LAION-2B filter: English caption and CLIP B/32 score >= 0.28")
def _laion(p):
    _common(p)
    p.add_argument("--lid-model", default=None, help="fastText language-ID model (default: bundled lid.176.ftz)")
    p.add_argument("--threshold", type=float, default=0.28, help="minimum CLIP B/32 score (default 0.28)")

    def run(a):
        from . import laion2b, run_filter
        run_filter(laion2b, a.pool, a.out, within=a.within, lid_model=a.lid_model, threshold=a.threshold)
    return run
