"""Core commands: ``make-pool``, ``pool info|validate``, ``keep-list info|intersect|union|diff|sort``."""

from __future__ import annotations

import argparse
import json


def register(sub) -> None:
    p = sub.add_parser("make-pool", help="write a synthetic pool in DataComp's exact format",
                       description="Write a synthetic DataComp pool (parquet + npz pairs) with planted "
                                   "concept clusters, near-duplicates and score/caption structure. "
                                   "The ground truth goes to DIR/_planted/.")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--rows", type=int, required=True, help="number of rows")
    p.add_argument("--files", type=int, default=2, help="number of parquet/npz pairs (default 2)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--concepts", type=int, default=20, help="planted concept clusters (default 20)")
    p.add_argument("--duplicate-fraction", type=float, default=0.05,
                   help="fraction of rows that are near-duplicates of another row (default 0.05)")
    p.add_argument("--embedding-keys", default="l14_img,l14_txt,b32_img,b32_txt",
                   help="npz arrays to write, comma-separated; '' writes no npz (default: all four)")
    p.set_defaults(func=_make_pool)

    p = sub.add_parser("pool", help="inspect or validate a pool")
    psub = p.add_subparsers(dest="action", metavar="<action>", required=True)
    q = psub.add_parser("info", help="files, rows, columns, embedding keys")
    q.add_argument("pool")
    q.set_defaults(func=_pool_info)
    q = psub.add_parser("validate", help="check uids (format, duplicates), row counts and embeddings")
    q.add_argument("pool")
    q.add_argument("--embedding-key", default=None, help="also check this npz array (e.g. l14_img)")
    q.set_defaults(func=_pool_validate)

    p = sub.add_parser("keep-list", help="inspect and combine keep-lists (sorted u8,u8 uid .npy)")
    ksub = p.add_subparsers(dest="action", metavar="<action>", required=True)
    q = ksub.add_parser("info", help="count, validity, manifest")
    q.add_argument("keep_list")
    q.add_argument("--uids", type=int, default=0, metavar="N", help="also print the first N uids")
    q.set_defaults(func=_kl_info)
    for name, helptext in (("intersect", "uids in every list"), ("union", "uids in any list"),
                           ("diff", "uids of the first list that are in none of the others")):
        q = ksub.add_parser(name, help=helptext)
        q.add_argument("inputs", nargs="+", help="keep-lists")
        q.add_argument("--out", required=True, help="output keep-list (.npy)")
        q.set_defaults(func=_kl_setop, op=name)
    q = ksub.add_parser("sort", help="repair an unsorted or duplicated keep-list (e.g. from other tools)")
    q.add_argument("input")
    q.add_argument("--out", required=True, help="output keep-list (.npy)")
    q.set_defaults(func=_kl_sort)
    q = ksub.add_parser("from-uids", help="build a keep-list from a text file of hex uids, one a line")
    q.add_argument("input")
    q.add_argument("--out", required=True, help="output keep-list (.npy)")
    q.set_defaults(func=_kl_from_uids)


def _make_pool(args: argparse.Namespace) -> None:
    from .synthetic import SyntheticPoolConfig, make_pool

    keys = tuple(k for k in args.embedding_keys.split(",") if k)
    cfg = SyntheticPoolConfig(rows=args.rows, files=args.files, seed=args.seed, concepts=args.concepts,
                              duplicate_fraction=args.duplicate_fraction, embedding_keys=keys)
    paths = make_pool(args.out, cfg)
    print(f"wrote {len(paths)} file pairs, {args.rows} rows -> {args.out}")


def _pool_info(args) -> None:
    from .pool import Pool

    pool = Pool(args.pool)
    info = pool.describe()
    info["columns"] = pool.schema().names
    info["embedding_keys"] = pool.embedding_keys()
    print(json.dumps(info, indent=2))


def _pool_validate(args) -> None:
    from .pool import Pool

    pool = Pool(args.pool, embedding_key=args.embedding_key)
    n = pool.check_unique_uids()
    if args.embedding_key:
        for _ in pool.iter_chunks(uids=True, embeddings=True, progress="checking embeddings"):
            pass
    print(f"ok: {len(pool.files)} files, {n} rows, uids valid and unique"
          + (f", {args.embedding_key} ({pool.dim}-d) finite and non-zero" if args.embedding_key else ""))


def _kl_info(args) -> None:
    from . import keeplist as K
    from . import uids as U

    arr = K.read_keep_list(args.keep_list)
    out = {"path": args.keep_list, "count": int(len(arr)), "valid": True,
           "manifest": K.read_manifest(args.keep_list)}
    if args.uids:
        out["first_uids"] = U.array_to_uids(arr[: args.uids])
    print(json.dumps(out, indent=2))


def _kl_setop(args) -> None:
    from . import keeplist as K
    from .manifest import base_manifest

    lists = [K.read_keep_list(p) for p in args.inputs]
    fn = {"intersect": K.intersect, "union": K.union, "diff": K.difference}[args.op]
    result = fn(*lists)
    K.write_keep_list(args.out, result, base_manifest(
        "keep-list", method=args.op, params={"inputs": args.inputs},
        counts={"in": [int(len(x)) for x in lists]}))
    print(f"{args.op}: {len(result)} uids -> {args.out}")


def _kl_sort(args) -> None:
    import numpy as np

    from . import keeplist as K
    from . import uids as U
    from .errors import KeepListError
    from .manifest import base_manifest

    try:
        arr = np.load(args.input, allow_pickle=False)
    except Exception as e:
        raise KeepListError(f"{args.input}: not a readable .npy file ({e})") from None
    if arr.dtype.names is None or len(arr.dtype.names) != 2:
        raise KeepListError(f"{args.input}: dtype {arr.dtype} is not a pair of uint64 fields")
    fixed = K.union(U.make_array(*U.split(arr)))
    K.write_keep_list(args.out, fixed, base_manifest("keep-list", method="sort", params={"input": args.input},
                                                     counts={"in": int(len(arr))}))
    print(f"sorted {len(arr)} entries into {len(fixed)} unique uids -> {args.out}")


def _kl_from_uids(args) -> None:
    from . import keeplist as K
    from . import uids as U
    from .errors import KeepListError
    from .manifest import base_manifest

    with open(args.input) as f:
        lines = [line.strip() for line in f if line.strip()]
    try:
        arr = U.uids_to_array(lines)
    except ValueError as e:
        raise KeepListError(f"{args.input}: {e}") from None
    K.write_keep_list(args.out, arr, base_manifest("keep-list", method="from-uids", params={"input": args.input},
                                                   counts={"in": len(lines)}))
    print(f"{len(arr)} uids -> {args.out}")
