"""Core commands: ``make-pool``, ``pool info|validate``, ``keep-list info|union|intersect|diff|concat|sort|from-uids``."""

from __future__ import annotations

import argparse
import json

from .checks import float_arg, int_arg
from .errors import ConfigError


SETOP_HELP = {
    "union": "uids in any list; a uid as many times as the list that lists it most (max)",
    "intersect": "uids in every list, as many times as the FIRST list lists them (the others act as sets)",
    "diff": "uids of the first list in none of the others, as many times as the first lists them",
    "concat": "all entries of all lists: multiplicities add up (upsampling by combining lists)",
}
KEEP_LIST_EPILOG = ("A keep-list is DataComp's subset file: a sorted np.dtype('u8,u8') array (.npy, or a raw "
                    "memory-mapped array). A uid listed k times is written k times by DataComp's resharder "
                    "(upsampling); filters' --within takes such a list as its set. Outputs refuse an existing "
                    "file unless --overwrite, and never overwrite an input.")


def register(sub) -> None:
    p = sub.add_parser("make-pool", help="write a synthetic pool in DataComp's exact format",
                       description="Write a synthetic DataComp pool (parquet + npz pairs) with planted "
                                   "concept clusters, near-duplicates and score/caption structure. "
                                   "The ground truth goes to DIR/_planted/.")
    p.add_argument("--out", required=True, help="output directory (refused if it already holds a pool)")
    p.add_argument("--rows", type=int_arg("--rows", 1), required=True, help="number of rows")
    p.add_argument("--files", type=int_arg("--files", 1), default=2,
                   help="number of parquet/npz pairs, <= rows (default 2)")
    p.add_argument("--seed", type=int_arg("--seed", 0), default=0, help="random seed (default 0)")
    p.add_argument("--concepts", type=int_arg("--concepts", 1), default=20, help="planted concept clusters (default 20)")
    p.add_argument("--duplicate-fraction", type=float_arg("--duplicate-fraction", 0.0, 1.0, max_open=True),
                   default=0.05, help="fraction of rows that are near-duplicates of another row (default 0.05)")
    p.add_argument("--embedding-keys", default="l14_img,l14_txt,b32_img,b32_txt",
                   help="npz arrays to write, comma-separated; '' writes no npz (default: all four)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the pool (parquet, npz, _planted/) already in --out")
    p.add_argument("--shards", metavar="DIR", default=None,
                   help="also write webdataset shards for every row into DIR, as DataComp's download leaves them "
                        "(%%08d.tar with <key>.jpg/.txt/.json, %%08d_stats.json): small generated JPEGs that "
                        "show each row's planted concept. The offline stand-in for `download`: reshard, train, "
                        "report and explain read them")
    p.add_argument("--shard-size", type=int_arg("--shard-size", 1), default=1000,
                   help="samples a shard with --shards (default 1000; DataComp's download: 10000)")
    p.add_argument("--image-size", type=int_arg("--image-size", 8, 1024), default=32,
                   help="side of the generated square JPEGs in pixels with --shards (default 32)")
    p.set_defaults(func=_make_pool)

    p = sub.add_parser("pool", help="inspect or validate a pool")
    psub = p.add_subparsers(dest="action", metavar="<action>", required=True)
    q = psub.add_parser("info", help="files, rows, columns, embedding keys")
    q.add_argument("pool")
    q.set_defaults(func=_pool_info)
    q = psub.add_parser("validate", help="check uids (format, duplicates), row counts, every parquet page, npz "
                                         "checksums and embeddings")
    q.add_argument("pool")
    q.add_argument("--embedding-key", default=None, help="also check this npz array (e.g. l14_img)")
    q.add_argument("--skip-checksums", action="store_true",
                   help="skip the full read of every file: decoding every parquet column and checking the "
                        "CRC-32 of every npz member")
    q.set_defaults(func=_pool_validate)

    p = sub.add_parser("keep-list", help="inspect and combine keep-lists (sorted u8,u8 uid .npy)",
                       description="Inspect and combine keep-lists. " + KEEP_LIST_EPILOG)
    ksub = p.add_subparsers(dest="action", metavar="<action>", required=True)
    q = ksub.add_parser("info", help="entries, distinct uids, multiplicities, validity, manifest")
    q.add_argument("keep_list")
    q.add_argument("--uids", type=int_arg("--uids", 0), default=0, metavar="N", help="also print the first N uids")
    q.set_defaults(func=_kl_info)
    for name, helptext in SETOP_HELP.items():
        q = ksub.add_parser(name, help=helptext, description=f"{helptext}. {KEEP_LIST_EPILOG}")
        q.add_argument("inputs", nargs="+", help="keep-lists")
        _out_args(q)
        q.set_defaults(func=_kl_setop, op=name)
    q = ksub.add_parser("sort", help="sort an unsorted keep-list (e.g. from other tools); repeats are kept "
                                     "(DataComp upsamples them) unless --unique")
    q.add_argument("input")
    _out_args(q)
    q.add_argument("--unique", action="store_true", help="list each uid once")
    q.set_defaults(func=_kl_sort)
    q = ksub.add_parser("from-uids", help="build a keep-list from a text file of hex uids, one a line; "
                                          "a uid on several lines is listed as often unless --unique")
    q.add_argument("input")
    _out_args(q)
    q.add_argument("--unique", action="store_true", help="list each uid once")
    q.set_defaults(func=_kl_from_uids)


def _out_args(q) -> None:
    q.add_argument("--out", required=True, help="output keep-list (.npy); never one of the inputs")
    q.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    q.add_argument("--allow-empty", action="store_true",
                   help="write an empty keep-list when the result is empty (default: an error, nothing written)")


def _make_pool(args: argparse.Namespace) -> None:
    from .synthetic import SyntheticPoolConfig, make_pool

    keys = tuple(k for k in args.embedding_keys.split(",") if k)
    cfg = SyntheticPoolConfig(rows=args.rows, files=args.files, seed=args.seed, concepts=args.concepts,
                              duplicate_fraction=args.duplicate_fraction, embedding_keys=keys)
    shards = _check_shards_out(args) if args.shards else None
    paths = make_pool(args.out, cfg, overwrite=args.overwrite)
    print(f"wrote {len(paths)} file pairs, {args.rows} rows -> {args.out}")
    if shards is not None:
        from .synthetic import write_shards

        n = write_shards(args.out, shards, per_shard=args.shard_size, image_size=args.image_size, seed=args.seed)
        print(f"wrote {-(-n // args.shard_size)} shards, {n} samples -> {shards}")


def _check_shards_out(args) -> "Path":
    """--shards: not inside the pool (its tars would not be pool files, but `pool` globs stay
    clean), and holding no shards yet unless --overwrite (then they are replaced)."""
    from pathlib import Path

    shards, pool = Path(args.shards).resolve(), Path(args.out).resolve()
    if shards == pool or pool in shards.parents or shards in pool.parents:
        raise ConfigError(f"--shards {args.shards} may not be, contain or lie inside the pool folder --out {args.out}")
    if shards.exists() and not shards.is_dir():
        raise ConfigError(f"--shards {args.shards} is a file, not a folder")
    old = sorted(shards.glob("*.tar")) + sorted(shards.glob("*_stats.json")) if shards.is_dir() else []
    if old and not args.overwrite:
        raise ConfigError(f"--shards {args.shards} already holds {len(old)} shard files; use an empty folder "
                          "or pass --overwrite to replace them")
    for p in old:
        p.unlink()
    return shards


def _pool_info(args) -> None:
    from .pool import Pool

    pool = Pool(args.pool)
    info = pool.describe()
    info["columns"] = pool.schema().names
    info["embedding_keys"] = pool.embedding_keys()
    print(json.dumps(info, indent=2))


def _pool_validate(args) -> None:
    from .npz import verify_npz
    from .pool import Pool, verify_parquet

    pool = Pool(args.pool, embedding_key=args.embedding_key)
    n = pool.check_unique_uids()
    if args.embedding_key:  # reading every row of the key also verifies its CRC-32
        for _ in pool.iter_chunks(uids=True, embeddings=True, progress="checking embeddings"):
            pass
    npz = [f.npz for f in pool.files if f.npz is not None]
    if not args.skip_checksums:
        for f in pool.files:
            verify_parquet(f.parquet)
        for path in npz:
            verify_npz(path, skip=(args.embedding_key,) if args.embedding_key else ())
    print(f"ok: {len(pool.files)} files, {n} rows, uids valid and unique"
          + (f", {args.embedding_key} ({pool.dim}-d) finite and non-zero" if args.embedding_key else "")
          + ("" if args.skip_checksums else ", every parquet column decodes"
             + (f", CRC-32 of every array in {len(npz)} npz files ok" if npz else "")))


def _kl_info(args) -> None:
    from . import keeplist as K
    from . import uids as U

    arr = K.read_keep_list(args.keep_list, multiset=True)
    stats = K.describe(arr)
    # entries (the rows DataComp's resharder writes) and distinct uids, each under one name: a
    # separate "count" beside them read as a third number for a multiset
    out = {"path": args.keep_list, **stats, "valid": True,
           "manifest": K.read_manifest(args.keep_list), "manifest_matches": K.manifest_matches(args.keep_list)}
    if args.uids:
        out["first_uids"] = U.array_to_uids(arr[: args.uids])
    print(json.dumps(out, indent=2))


def _kl_write(args, arr, method: str, params: dict, counts: dict, inputs: dict) -> None:
    from . import keeplist as K
    from .manifest import base_manifest

    if len(arr) == 0 and not getattr(args, "allow_empty", False):  # the filters' rule: empty is an error
        raise ConfigError(f"keep-list {method}: the result is empty (inputs: {counts.get('in')} entries); "
                          f"nothing written to {args.out}. Pass --allow-empty to write an empty keep-list")
    manifest = base_manifest("keep-list", command=getattr(args, "command_line", None), method=method, params=params,
                             counts=counts)
    K.write_keep_list(args.out, arr, manifest, multiset=True)


def _kl_check_out(args, inputs: list[str]) -> None:
    from . import keeplist as K

    K.check_output(args.out, inputs={f"#{i + 1}": p for i, p in enumerate(inputs)}, overwrite=args.overwrite)


def _kl_setop(args) -> None:
    from . import keeplist as K

    _kl_check_out(args, args.inputs)
    lists = [K.read_keep_list(p, multiset=True) for p in args.inputs]
    result = K.combine(args.op, lists)
    _kl_write(args, result, args.op, {"inputs": args.inputs}, {"in": [int(len(x)) for x in lists]}, {})
    stats = K.describe(result)
    print(f"{args.op}: {stats['entries']} entries ({stats['distinct']} distinct uids) -> {args.out}")


def _kl_sort(args) -> None:
    from . import keeplist as K

    _kl_check_out(args, [args.input])
    arr = K.read_any_order(args.input)
    fixed = K.union(arr) if args.unique else K.sort_uids(arr)
    _kl_write(args, fixed, "sort", {"input": args.input, "unique": args.unique}, {"in": int(len(arr))}, {})
    stats = K.describe(fixed)
    print(f"sorted {len(arr)} entries into {stats['entries']} entries ({stats['distinct']} distinct uids) "
          f"-> {args.out}")


def _kl_from_uids(args) -> None:
    from . import keeplist as K
    from . import uids as U
    from .errors import KeepListError

    _kl_check_out(args, [args.input])
    try:
        with open(args.input) as f:
            lines = [(i, line.strip()) for i, line in enumerate(f, 1) if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise KeepListError(f"{args.input}: cannot read as text ({e})") from None
    try:
        arr = U.uids_to_array([u for _, u in lines])
    except ValueError:
        bad = next(i for i, u in lines if not U._HEX_RE.fullmatch(u))
        raise KeepListError(f"{args.input}: line {bad}: not a 128-bit hex uid: {dict(lines)[bad]!r}") from None
    arr = K.union(arr) if args.unique else K.sort_uids(arr)
    _kl_write(args, arr, "from-uids", {"input": args.input, "unique": args.unique}, {"in": len(lines)}, {})
    stats = K.describe(arr)
    print(f"{stats['entries']} entries ({stats['distinct']} distinct uids) -> {args.out}")
