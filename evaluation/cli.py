"""``conceptprune evaluate [download|package|upload]`` and ``conceptprune compare``."""

from __future__ import annotations

import json


def register(sub) -> None:
    from conceptprune.checks import renamed_flag
    from conceptprune.slurm.options import add_cluster_args

    p = sub.add_parser("evaluate", help="run DataComp's evaluation on a trained model: 40 tasks, 38 with a main metric",
                       description="Evaluate a training run (or a checkpoint) on DataComp's suite; results go to "
                                   "OUTPUT/eval_results.jsonl in DataComp's format (a rerun resumes). "
                                   "Actions: download (the evaluation sets), package (a submission bundle), upload, "
                                   "submit (bundle + leaderboard record).")
    p.add_argument("--list-tasks", action="store_true",
                   help="print the 40 tasks (source, size; with --data-dir also each one's state there) and exit")
    p.add_argument("--model", help="training run folder (run.json), an open_clip checkpoint file, or a released "
                                   "OpenCLIP checkpoint as openclip:ARCH/PRETRAINED (e.g. "
                                   "openclip:ViT-B-32/commonpool_m_clip_s128m_b4k; open_clip's pretrained registry, "
                                   "weights from the Hugging Face cache)")
    p.add_argument("--arch", help="open_clip architecture (default: the run's, else ViT-B-32)")
    p.add_argument("--data-dir", help="folder of evaluation sets: made by 'evaluate download' or by DataComp's "
                                      "download_evalsets.py (wds_<name>_test/ + hf_cache/), as is")
    p.add_argument("--out", help="results folder")
    renamed_flag(p, "--output", "--out")
    p.add_argument("--tasks", nargs="+", help="task keys (default: all 40)")
    p.add_argument("--batch-size", type=int, default=64, help="images per batch (default 64)")
    p.add_argument("--device", default="auto", help="torch device (default: cuda when present)")
    p.add_argument("--precision", choices=["amp", "fp32"], default="amp",
                   help="amp (default): fp16 autocast where DataComp uses it on CUDA (zero-shot classifiers, "
                        "retrieval, WinoGAViL), fp32 on CPU; fp32: never autocast. Recorded in eval_run.json")
    add_cluster_args(p)
    p.set_defaults(func=_evaluate)
    acts = p.add_subparsers(dest="action", metavar="<action>")
    q = acts.add_parser("download", help="fetch the evaluation sets from Hugging Face (resumable, checksummed)",
                        description="The 37 webdataset sets into DATA_DIR/wds_<name>_test/ (DataComp's names), the "
                                    "three nlphuji sets as parquet converted into DATA_DIR/<key with / -> ->/; a "
                                    "DataComp download already in DATA_DIR is kept (its hf_cache is converted).")
    q.add_argument("--data-dir", required=True, help="where the sets go (may already hold DataComp's download)")
    q.add_argument("--tasks", nargs="+", help="task keys (default: all 40)")
    q.add_argument("--revision", help="dataset revision (default: main; nlphuji sets fall back to the Hub's "
                                      "parquet conversion)")
    q.add_argument("--endpoint", help="Hugging Face endpoint or mirror (default: $HF_ENDPOINT, else huggingface.co)")
    q.add_argument("--dry-run", action="store_true",
                   help="list every task with its source, size and state (present/partial/missing) and exit")
    q.set_defaults(func=_download)
    q = acts.add_parser("package", help="build DataComp's submission bundle")
    q.add_argument("--results", required=True, help="eval_results.jsonl (all 38 tasks)")
    q.add_argument("--keep-list", required=True, action="append",
                   help="the keep-list that was trained on (repeat for several; DataComp's --samples)")
    q.add_argument("--scale", required=True, choices=["small", "medium", "large", "xlarge"], help="DataComp scale")
    q.add_argument("--out", required=True, help="bundle folder")
    q.add_argument("--checkpoint", help="also include this checkpoint (as checkpoint.pt, DataComp's name)")
    q.add_argument("--force", action="store_true", help="no warning when the run's recorded scale or "
                                                        "architecture is not --scale's")
    q.set_defaults(func=_package)
    _register_submit(acts)
    q = acts.add_parser("upload", help="upload a bundle to a Hugging Face model repo (needs a token)")
    q.add_argument("--bundle", required=True, help="folder made by 'evaluate package'")
    q.add_argument("--repo", required=True, help="Hugging Face repo id (user/name)")
    q.add_argument("--public", action="store_true", help="make the repo public (default private)")
    q.set_defaults(func=_upload)

    p = sub.add_parser("compare", help="results files per task and in aggregates next to published baselines, "
                                       "with 95%% intervals and verdicts",
                       description="Each results file per task and in DataComp's aggregates (ImageNet, ImageNet dist. "
                                   "shifts, VTAB, Retrieval, Average over 38) next to the DataComp baselines of a "
                                   "scale and any OpenCLIP checkpoint or leaderboard entry (--against); every "
                                   "difference gets a 95%% interval and a verdict (better, worse, within noise): a "
                                   "paired bootstrap between your runs, the run's bootstrap widened by DataComp's "
                                   "seed noise against a published result. Prints where each run would rank on "
                                   "the scale's leaderboard.")
    p.add_argument("results", nargs="+", help="eval_results.jsonl files (their eval_outcomes/ is used when present)")
    p.add_argument("--names", nargs="+", help="a name per results file (default: its folder)")
    p.add_argument("--against", nargs="+", default=[], metavar="NAME",
                   help="OpenCLIP MODEL/PRETRAINED (e.g. ViT-B-32/commonpool_m_clip_s128m_b4k) or a DataComp "
                        "leaderboard entry ('SCALE:entry' where several scales have it); "
                        "'conceptprune baselines list' lists them")
    p.add_argument("--scale", choices=["small", "medium", "large", "xlarge", "none"], default=None,
                   help="DataComp's baselines and leaderboard of this scale (default medium; none: neither)")
    p.add_argument("--baselines", default=None, help="older name of --scale (medium, ..., or none)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0; recorded)")
    p.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples (default 1000; recorded)")
    p.add_argument("--out", help="write comparison.md, comparison.html, aggregates.csv, per_task.csv, "
                                 "comparison.json and plots here")
    p.add_argument("--partial", action="store_true", help="allow results files without all 38 tasks (averages "
                                                           "over fewer are shown as n/38)")
    p.add_argument("--overwrite", action="store_true", help="replace what an existing non-empty --out holds")
    p.set_defaults(func=_compare)
    register_baselines(sub)


def _evaluate(a) -> int:
    from conceptprune.errors import ConfigError

    from .tasks import table

    if a.list_tasks:
        print(table(a.data_dir))
        return 0
    if not (a.model and a.data_dir and a.out):
        raise ConfigError("evaluate needs --model, --data-dir and --out (or --list-tasks)")
    from conceptprune.slurm.stage import executor_from_args

    from .run import evaluate

    res = evaluate(a.model, a.data_dir, a.out, arch=a.arch, tasks=a.tasks, batch_size=a.batch_size,
                   device=a.device, executor=executor_from_args(a), precision=a.precision)
    for r in res["results"]:
        v = r["metrics"]["main_metric"]
        print(f"{r['dataset']:28s} {'-' if v is None else f'{v:.4f}'}")
    for k, e in res["errors"].items():
        print(f"{k:28s} FAILED: {e}")
    return 1 if res["errors"] else 0


def _download(a) -> int:
    from .download import download, dry_run, format_rows

    if a.dry_run:
        print(format_rows(dry_run(a.data_dir, a.tasks)))
        return 0
    res = download(a.data_dir, a.tasks, a.revision, a.endpoint)
    print(json.dumps(res, indent=2))
    return 1 if res["errors"] else 0


def _package(a) -> None:
    from .package import package

    print(f"bundle: {package(a.results, a.keep_list, a.scale, a.out, a.checkpoint, force=a.force)}")


def _upload(a) -> None:
    from .package import upload

    print(upload(a.bundle, a.repo, private=not a.public))


def _register_submit(acts) -> None:
    q = acts.add_parser(
        "submit", help="DataComp's leaderboard submission: bundle + record (uploaded only with --upload)",
        description="Build DataComp's submission bundle and leaderboard record (the fields DataComp's evaluate.py "
                    "--submit sends) into --out. With --upload, push the bundle to the Hugging Face repo "
                    "HF_USERNAME/HF_REPO_NAME in one commit and PUT the record to DataComp's leaderboard database.")
    q.add_argument("--run", required=True, help="training run folder (run.json, or DataComp's info.pkl)")
    q.add_argument("--results", required=True, help="eval_results.jsonl (all 38 tasks)")
    q.add_argument("--keep-list", required=True, action="append", help="the keep-list(s) trained on (DataComp's "
                                                                        "--samples); repeat for several")
    q.add_argument("--out", required=True, help="folder for the bundle and leaderboard_record.json")
    q.add_argument("--method-name", required=True, help="shown publicly on the leaderboard")
    q.add_argument("--author", required=True, help="shown publicly")
    q.add_argument("--email", required=True, help="contact, not shown publicly")
    q.add_argument("--hf-username", required=True, help="Hugging Face user or organisation of the repo")
    q.add_argument("--hf-repo-name", required=True, help="Hugging Face model repo (must exist)")
    q.add_argument("--track", required=True, choices=["filtering", "byod"], help="competition track")
    q.add_argument("--writeup", help="link to a paper or blog post (public)")
    q.add_argument("--dataset-size", default=None,
                   help="DataComp's free-text dataset size (default, as DataComp: the scale's samples seen); "
                        "'keep-list': the number of keep-list entries")
    q.add_argument("--upload-checkpoint", action="store_true", help="include the run's checkpoint as checkpoint.pt")
    q.add_argument("--upload", action="store_true", help="really upload (network and a Hugging Face token)")
    q.add_argument("--skip-hf", action="store_true", help="with --upload: do not push the bundle")
    q.add_argument("--skip-db", action="store_true", help="with --upload: do not send the record")
    q.add_argument("--hf-endpoint", help="Hugging Face endpoint (default: $HF_ENDPOINT, else huggingface.co)")
    q.add_argument("--db-url", default=None, help="leaderboard database (default: DataComp's)")
    q.add_argument("--notify-url", help="also PUT DataComp's submission message as {\"text\": ...} to this URL")
    q.set_defaults(func=_submit)


def _submit(a) -> None:
    from .package import DATACOMP_DB, submit

    res = submit(a.run, a.results, a.keep_list, a.out, method_name=a.method_name, author=a.author, email=a.email,
                 hf_username=a.hf_username, hf_repo_name=a.hf_repo_name, track=a.track, writeup=a.writeup,
                 dataset_size=a.dataset_size, upload_checkpoint=a.upload_checkpoint, do_upload=a.upload,
                 hf_endpoint=a.hf_endpoint, db_url=a.db_url or DATACOMP_DB, skip_hf=a.skip_hf, skip_db=a.skip_db,
                 notify_url=a.notify_url)
    print(json.dumps(res, indent=2))
    if not a.upload:
        print("nothing was uploaded; pass --upload to submit")


def _compare(a) -> None:
    from conceptprune.errors import ConfigError

    from .compare import compare

    if a.scale is not None and a.baselines is not None and a.scale != a.baselines:
        raise ConfigError(f"--scale {a.scale} and --baselines {a.baselines} disagree (--baselines is --scale's old name)")
    scale = a.scale or a.baselines or "medium"
    res = compare(a.results, scale=None if scale == "none" else scale, names=a.names, out=a.out,
                  partial=a.partial, against=a.against, seed=a.seed, resamples=a.resamples, overwrite=a.overwrite)
    print(res["markdown"])
    if a.out:
        print(f"written to {a.out}: comparison.md, comparison.html, aggregates.csv, per_task.csv, comparison.json, "
              + ", ".join(res.get("plots", [])))


def register_baselines(sub) -> None:
    p = sub.add_parser("baselines", help="the published results compare knows: OpenCLIP checkpoints, DataComp "
                                         "leaderboards",
                       description="The reference table shipped with conceptprune: every row of open_clip's "
                                   "docs/openclip_results.csv and DataComp's leaderboards (datacomp_site "
                                   "dcclip/data/*.tsv), each file with its source commit (sources.json).")
    acts = p.add_subparsers(dest="action", metavar="<action>", required=True)
    q = acts.add_parser("list", help="list the checkpoints and leaderboard entries")
    q.add_argument("--scale", choices=["small", "medium", "large", "xlarge"], help="only this DataComp scale")
    q.add_argument("--search", help="only names (or teams) containing this text (any case)")
    q.set_defaults(func=_baselines_list)
    q = acts.add_parser("update", help="replace a reference file by a newer copy of its source",
                        description="FILE is named as in its source repository: openclip_results.csv (open_clip "
                                    "docs/), filter_<scale>.tsv or byod_<scale>.tsv (datacomp_site dcclip/data/). It "
                                    "is read with the same checks, then copied into the package's reference folder; "
                                    "sources.json records --repository/--commit.")
    q.add_argument("file")
    q.add_argument("--commit", help="the source commit the file was taken from (recorded)")
    q.add_argument("--repository", help="the source repository (default: as recorded before)")
    q.set_defaults(func=_baselines_update)


def _baselines_list(a) -> None:
    from .baselines import listing

    print(listing(a.scale, a.search))


def _baselines_update(a) -> None:
    from .baselines import update

    src = {k: v for k, v in (("commit", a.commit), ("repository", a.repository)) if v}
    res = update(a.file, source=src or None)
    print(json.dumps(res, indent=2))
