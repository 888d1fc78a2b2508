"""Every command block of README.md is a test (issue 28).

The README's fenced blocks are read in order; a block whose lines start with ``conceptprune``
(or ``make``, ``python``, ``pip``) is a command block, any other block is printed output and not
run. Each command runs as printed, in one temporary folder, offline (``HF_HUB_OFFLINE=1``),
except where the SUBSTITUTIONS table below says otherwise: it lists, with the reason, the only
rewrites made (what cannot run offline on 2 CPU cores: DataComp's servers, GPUs, SLURM, long
training). Every entry must be used by the README (an unused one fails the test: the README
changed and the table must follow it), and every command must be covered by a check from
CHECKS that compares its outputs with what the README says about them. A README edit that
breaks a command, a flag or a claimed output breaks this test.

Run it with ``-s`` to see each block, what was substituted, how long it took and what was
checked. ``CONCEPTPRUNE_README_ROWS`` sets the pool's size (default 4000; the README's
per-step times are from a run at 20000).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
ROWS = int(os.environ.get("CONCEPTPRUNE_README_ROWS", "4000"))
COMMAND_WORDS = ("conceptprune", "make", "python", "python3", "pip")


# -- reading the README ----------------------------------------------------------------------


@dataclass
class Block:
    line: int  # 1-based line of the opening fence
    lang: str
    commands: list[str]  # one logical command a line (comments dropped, continuations joined)
    text: str


def readme_blocks(text: str) -> list[Block]:
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        m = re.match(r"^```(\w*)\s*$", lines[i])
        if not m:
            i += 1
            continue
        start, lang, body = i + 1, m.group(1), []
        i += 1
        while i < len(lines) and not lines[i].startswith("```"):
            body.append(lines[i])
            i += 1
        i += 1
        logical, pending = [], ""
        for raw in body:
            line = pending + raw.strip()
            if line.endswith("\\"):
                pending = line[:-1] + " "
                continue
            pending = ""
            if line and not line.startswith("#"):
                logical.append(line)
        commands = []
        for line in logical:
            try:
                words = shlex.split(line, comments=True)
            except ValueError:  # printed output with an odd quote
                words = []
            if words and words[0] in COMMAND_WORDS:
                commands.append(shlex.join(words))
        if commands and len(commands) != len(logical):
            raise AssertionError(f"README.md:{start}: a block mixes commands and other lines; every line of a "
                                 "command block must be a command (or a comment)")
        blocks.append(Block(start, lang, commands, "\n".join(body)))
    return blocks


# -- what cannot run here, and why -----------------------------------------------------------


@dataclass
class Sub:
    """Replace ``pattern`` (a regex on one README command) by ``repl`` (``re.sub`` syntax), or
    skip the command when ``repl`` is None; ``before``: commands run first (setup the README's
    command assumes exists, e.g. files DataComp would have served)."""

    pattern: str
    repl: str | None
    reason: str
    before: tuple[str, ...] = ()
    used: int = field(default=0, compare=False)


MAKE_POOL = f"conceptprune make-pool --rows {ROWS} --out data/metadata --shards data/shards"
SUBSTITUTIONS = [
    Sub(r"^make (demo|test)$", None, "`make demo` is tests/test_demo.py (quick form); `make test` is this suite"),
    Sub(r"^python3 -m venv .*|^pip install .*", None, "installs the stack: CI's `make install` does exactly this"),
    Sub(r"^conceptprune download --scale medium --data-dir data --with-embeddings$",
        # the README's own offline line (its next block), run here in place of download
        "{offline_make_pool}",
        "no internet: the README's offline line `make-pool --shards` writes the pool and shards download would"),
    Sub(r"^conceptprune make-pool --rows 20000 (--out data/metadata --shards data/shards)$", None,
        "already run in place of `download` (first line of the loop)"),
    Sub(r"--workers 16$", "--workers 2", "2 CPU cores here"),
    Sub(r"--scale medium --output runs --nodes 2 --gpus-per-node 8 --partition gpu$",
        "--scale tiny --output runs --name medium-dbp --samples-seen 512",
        "no GPUs and no SLURM partition here: the 1.7M-parameter CPU model, 512 samples seen, under the "
        "run name the README's next lines use (runs/medium-dbp)"),
    Sub(r"^conceptprune evaluate download --data-dir evalsets$",
        "python -c 'import sys; sys.path.insert(0, \"{tests}\"); from pathlib import Path; "
        "from test_eval_metrics import build_sets, _folder; build_sets(Path(\"evalsets\"), _folder)'",
        "no internet: all 40 tasks as tiny sets in DataComp's folder layout and data form "
        "(tests/test_eval_metrics.build_sets), so `evaluate` runs as printed"),
    Sub(r"--scale medium --within clip\.npy$", "--centroids centroids.npy --reference reference.npy --within clip.npy",
        "DataComp's medium centroids and ImageNet features (GBs, from its servers): centroids of this pool by the "
        "README's own `image-based-centroids` recipe, and 40 of the pool's image embeddings as the reference",
        before=("conceptprune filter image-based-centroids --pool data/metadata --out centroids.npy --clusters 20",
                "python -c 'import numpy as np, glob; "
                "np.save(\"reference.npy\", np.load(sorted(glob.glob(\"data/metadata/*.npz\"))[0])"
                "[\"l14_img\"][:40].astype(np.float32))'")),
    Sub(r"^(conceptprune explain) 8cf96373877132b88540650b85739a38 ", r"\1 {semdedup_dropped} ",
        "the README's example uid is from another pool: a uid SemDeDup dropped in this run"),
    Sub(r"^(conceptprune compare) runs/mine/eval/eval_results\.jsonl (.*) --out cmp$",
        r"\1 results/dbp/eval_results.jsonl \2 --out cmp_against",
        "the README's example run is the loop's run here (results/dbp), written beside the loop's cmp/"),
    Sub(r"^conceptprune (reshard|status) .*(OUT|K\.npy)", None,
        "the SLURM block runs in test_readme_slurm_block on the localhost test cluster"),
    Sub(r"^(conceptprune filter negcliploss) --pool POOL ", r"\1 --pool data/metadata ",
        "POOL is a placeholder: the loop's pool"),
    Sub(r"^(conceptprune filter normsim) --pool POOL (.*) --target target24_train_l14\.npy --norm inf --keep-count "
        r"'<int\(0\.2' 'N\)>'$", r"\1 --pool data/metadata \2 --target target.npy --norm inf --keep-count {keep20}",
        "the paper's target (the 24 tasks' train splits, L/14) is not here: 50 of the pool's image embeddings; "
        "N is the pool's row count",
        before=("python -c 'import numpy as np, glob; "
                "np.save(\"target.npy\", np.load(sorted(glob.glob(\"data/metadata/*.npz\"))[-1])"
                "[\"l14_img\"][-50:].astype(np.float32))'",)),
    Sub(r"^conceptprune run loop\.toml --executor slurm --detach --partition cpu$", "conceptprune run loop.toml --executor local",
        "no SLURM partition here: the same pipeline on local processes, its file the README's loop.toml block with "
        "scale medium -> tiny (256 samples seen) and without the step's GPU cluster table",
        before=("python -c 'import sys; sys.path.insert(0, \"{tests}\"); from test_readme import write_pipeline_file; "
                "write_pipeline_file(\"loop.toml\")'",)),
    Sub(r"^conceptprune run loop\.toml --executor slurm$", None,
        "collecting a detached pipeline needs SLURM: tests/test_pipeline.py does it on the localhost test cluster"),
]


def write_pipeline_file(dest: str) -> None:
    """The README's loop.toml block, made to run here (see the substitution's reason)."""
    block = next(b for b in readme_blocks(README.read_text()) if b.lang == "toml" and "[[step]]" in b.text)
    text = block.text.replace('scale = "medium"', 'scale = "tiny"\nsamples_seen = 256')
    text = "\n".join(l for l in text.splitlines() if not l.startswith("cluster ="))
    Path(dest).write_text(text + "\n")


def substitute(cmd: str, ctx: dict) -> tuple[list[str], list[str]]:
    """(commands to run, notes): the README command after every matching substitution."""
    notes, before = [], []
    for sub in SUBSTITUTIONS:
        if not re.search(sub.pattern, cmd):
            continue
        sub.used += 1
        if sub.repl is None:
            return [], [f"skipped: {sub.reason}"]
        new = re.sub(sub.pattern, sub.repl, cmd).format(**ctx)
        notes.append(f"substituted: {cmd!r} -> {new!r} ({sub.reason})")
        return [b.format(**ctx) for b in sub.before] + [new], notes  # one substitution a command
    return [cmd], notes


# -- checks: what the README says each command leaves or prints ------------------------------


def _pool_scores(d: Path, column: str) -> tuple[np.ndarray, np.ndarray]:
    import pyarrow.parquet as pq

    from conceptprune.pool import Pool

    pool = Pool(d)
    uids = pool.read_uids()
    scores = np.concatenate([pq.read_table(f.parquet, columns=[column]).column(0).to_numpy() for f in pool.files])
    return uids, scores.astype(np.float32)


def _keep(d: Path, name: str) -> np.ndarray:
    from conceptprune.keeplist import read_keep_list

    return read_keep_list(d / name)


def _args(cmd: str) -> dict:
    words = shlex.split(cmd)
    out = {}
    for i, w in enumerate(words):
        if w.startswith("--"):
            out[w[2:]] = words[i + 1] if i + 1 < len(words) and not words[i + 1].startswith("--") else True
    return out


def check_make_pool(d, cmd, out, ctx):
    a = _args(cmd)
    meta, shards = d / a["out"], d / a["shards"]
    assert sorted(meta.glob("*.parquet")) and len(list(meta.glob("*.npz"))) == len(list(meta.glob("*.parquet")))
    tars = sorted(shards.glob("*.tar"))
    assert tars and all(t.with_name(t.stem + "_stats.json").exists() for t in tars)
    assert f"{int(a['rows'])} samples -> " in out
    return f"{len(tars)} shards with _stats.json, a parquet + npz pair per file"


def check_clip_score(d, cmd, out, ctx):
    a = _args(cmd)
    col = f"clip_{a.get('arch', 'l14')}_similarity_score"
    uids, s = _pool_scores(d / a["pool"], col)
    thr = np.sort(s)[::-1][int(len(s) * float(a["fraction"]))]  # DataComp's rule, as the README states it
    keep = _keep(d, a["out"])
    assert len(keep) == int((s >= thr).sum())
    man = json.loads((d / a["out"]).with_suffix(".json").read_text())
    assert man["method"] == "clip-score" and man["counts"]["out"] == len(keep)
    return f"{len(keep)} kept = rows with {col} >= sorted[int(N*F)] ({thr:.5f}); manifest beside it"


def _cluster_outputs(d, name, keep):
    import pandas as pd

    stem = (d / name).with_suffix("")
    t = pd.read_parquet(f"{stem}.clusters.parquet")
    for c in ("cluster", "size", "d_intra", "d_inter", "complexity", "P", "kept"):  # the README's list
        assert c in t.columns, c
    assert int(t["kept"].sum()) == len(keep) and Path(f"{stem}.clusters.png").exists()
    return t


def check_semdedup(d, cmd, out, ctx):
    a = _args(cmd)
    keep, within = _keep(d, a["out"]), _keep(d, a["within"])
    assert len(keep) == round(float(a["target-fraction"]) * len(within))
    from conceptprune import keeplist as K

    dropped = np.setdiff1d(within.view("V16"), keep.view("V16")).view(within.dtype)
    from conceptprune import uids as U

    ctx["semdedup_dropped"] = U.pair_to_uid(int(dropped[0]["f0"]), int(dropped[0]["f1"]))
    assert K.intersect(keep, within).shape == keep.shape  # a subset of --within
    _cluster_outputs(d, a["out"], keep)
    return (f"{len(keep)} = round({a['target-fraction']} x {len(within)}) kept, a subset of --within; "
            "clusters.parquet columns and png")


def check_dbp(d, cmd, out, ctx):
    a = _args(cmd)
    keep, within = _keep(d, a["out"]), _keep(d, a["within"])
    assert len(keep) == round(float(a["fraction"]) * len(within))
    t = _cluster_outputs(d, a["out"], keep)
    assert len(t) == int(a["clusters"]) and "budget_target" in t.columns  # documented beside the README's list
    return f"{len(keep)} = round({a['fraction']} x {len(within)}) kept; {len(t)} clusters in clusters.parquet"


def check_reshard(d, cmd, out, ctx):
    a = _args(cmd)
    o = d / a["out"]
    names = {p.name for p in o.iterdir()}
    assert {"sizes.json", "sample_ids.npy", "meta.json"} <= names
    tars = sorted(o.glob("*.tar"))
    assert tars and all(re.fullmatch(r"\d{8}\.tar", t.name) and t.with_name(t.stem + "_stats.json").exists()
                        for t in tars)
    assert names == {"sizes.json", "sample_ids.npy", "meta.json"} | {t.name for t in tars} | \
        {t.stem + "_stats.json" for t in tars}  # "Nothing else is inside O"
    meta = json.loads((o / "meta.json").read_text())
    assert meta["kept_samples"] == len(_keep(d, a["keep"])) and meta["missing_from_shards"] == 0
    for key in ("output_shard_count", "processed_count", "output_count"):  # DataComp's keys
        assert key in meta, key
    return f"{len(tars)} tars + _stats.json, sizes.json, sample_ids.npy, meta.json ({meta['kept_samples']} kept)"


def check_train(d, cmd, out, ctx):
    a = _args(cmd)
    run = d / a["output"] / a.get("name", f"{a['scale']}-{Path(a['data']).name}")
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "finished" and (run / "info.pkl").exists()
    assert (run / "checkpoints" / "epoch_latest.pt").exists()
    return f"{run.relative_to(d)}: run.json finished, info.pkl, checkpoints/epoch_latest.pt"


def check_evalsets(d, cmd, out, ctx):
    from conceptprune.evaluation.tasks import TASKS

    assert len(TASKS) == 40 and (d / "evalsets").is_dir()
    return "40 tiny sets written"


def check_evaluate(d, cmd, out, ctx):
    a = _args(cmd)
    o = d / a["out"]
    rows = [json.loads(x) for x in (o / "eval_results.jsonl").read_text().splitlines()]
    assert len(rows) == 40 and len({r["key"] for r in rows}) == 40  # DataComp's 40 tasks, each once
    assert sum(r["metrics"].get("main_metric") is not None for r in rows) == 38  # 38 with a main metric
    assert (o / "eval_run.json").exists()
    return "40 rows in eval_results.jsonl (38 with a main metric), eval_run.json"


def check_compare(d, cmd, out, ctx):
    o = d / _args(cmd)["out"]
    names = {p.name for p in o.iterdir()}
    assert {"comparison.md", "per_task.csv"} <= names and any(n.endswith(".png") for n in names)
    return "Markdown, per-task CSV and plots in " + str(o.relative_to(d))


def check_package(d, cmd, out, ctx):
    a = _args(cmd)
    s = d / a["out"] / f"{a['scale']}_scale"
    assert (s / "results.jsonl").exists() and (s / "samples" / Path(a["keep-list"]).name).exists()
    return f"{s.relative_to(d)}/results.jsonl and samples/{Path(a['keep-list']).name}"


def check_image_based(d, cmd, out, ctx):
    a = _args(cmd)
    from conceptprune import keeplist as K

    keep, within = _keep(d, a["out"]), _keep(d, a["within"])
    assert 0 < len(keep) <= len(within) and len(K.intersect(keep, within)) == len(keep)
    return f"{len(keep)} kept, all within {a['within']}"


def check_centroids(d, cmd, out, ctx):
    c = np.load(d / _args(cmd)["out"])
    assert c.shape == (int(_args(cmd)["clusters"]), 768)
    return f"centroids {c.shape}"


def check_kl_intersect(d, cmd, out, ctx):
    from conceptprune import keeplist as K

    words = shlex.split(cmd)
    a, b = _keep(d, words[3]), _keep(d, words[4])
    assert np.array_equal(_keep(d, _args(cmd)["out"]), K.intersect(a, b))
    return "the intersection of the two lists"


def check_kl_info(d, cmd, out, ctx):
    info = json.loads(out)
    arr = _keep(d, shlex.split(cmd)[3])
    assert info["entries"] == info["distinct"] == len(arr) and "count" not in info
    assert info["multiplicities"] == ({"1": len(arr)} if len(arr) else {}) and info["manifest"]["method"]
    return f"entries = distinct = {len(arr)}, the multiplicity histogram and the manifest"


def check_report(d, cmd, out, ctx):
    o = d / _args(cmd)["out"]
    assert (o / "index.html").exists() and (o / "report.json").exists() and any((o / "thumbs").iterdir())
    funnel = json.loads((o / "report.json").read_text())["funnel"]
    steps = [w for w in shlex.split(cmd)[2:] if w.endswith(".npy")][:3]
    assert [f["step"] for f in funnel] == ["pool", "clip-score", "semdedup", "dbp"]
    assert [f["kept"] for f in funnel[1:]] == [len(_keep(d, s)) for s in steps]
    return "index.html, report.json (funnel = the keep-lists' sizes), thumbs/"


def check_explain(d, cmd, out, ctx):
    assert f"uid {ctx['semdedup_dropped']}: dropped at step 2 (semdedup)" in out, out
    assert "near duplicate of" in out and "is what --target-fraction 0.8 needed" in out, out
    return "dropped at step 2 (semdedup), with the near duplicate and the eps the target size forced"


def check_python(d, cmd, out, ctx):
    return "ran (setup)"


def check_negcliploss(d, cmd, out, ctx):
    kept = _keep(d, _args(cmd)["out"])
    assert len(kept) == int(ROWS * float(_args(cmd)["fraction"])), len(kept)  # exactly int(N F)
    return f"{len(kept)} kept = int(N x {_args(cmd)['fraction']})"


def check_normsim(d, cmd, out, ctx):
    from conceptprune import keeplist as K

    a = _args(cmd)
    kept, within = _keep(d, a["out"]), _keep(d, a["within"])
    assert len(kept) == int(a["keep-count"]) == int(0.2 * ROWS) and len(K.intersect(kept, within)) == len(kept)
    return f"{len(kept)} kept = int(0.2 N), all within {a['within']} (sequential, not an intersection)"


def check_pipeline(d, cmd, out, ctx):
    from conceptprune import keeplist as K

    steps = json.loads(out)
    assert list(steps) == ["clip", "reshard", "train", "evaluate"], steps
    described = json.loads((d / "loop" / "pipeline.json").read_text())
    assert [s["after"] for s in described["steps"]] == [[], ["clip"], ["reshard"], ["train"]]
    kept = len(K.read_keep_list(d / "work" / "clip.npy"))
    assert json.loads((d / "work" / "shards_clip" / "meta.json").read_text())["kept_samples"] <= kept
    assert (d / "runs" / "clip30" / "info.pkl").exists()
    rows = (d / "runs" / "clip30" / "eval" / "eval_results.jsonl").read_text().splitlines()
    assert len(rows) == 40
    return f"4 steps in order (pipeline.json), clip.npy ({kept}), shards_clip, runs/clip30, 40 evaluation rows"


def check_status(d, cmd, out, ctx):
    for step in ("clip", "reshard", "train", "evaluate"):
        assert step in out, out
    return "every step of the pipeline is listed"


CHECKS = [
    (r"^conceptprune make-pool ", check_make_pool),
    (r"^conceptprune filter clip-score ", check_clip_score),
    (r"^conceptprune filter semdedup ", check_semdedup),
    (r"^conceptprune filter dbp ", check_dbp),
    (r"^conceptprune reshard ", check_reshard),
    (r"^conceptprune train ", check_train),
    (r"^python -c .*build_sets", check_evalsets),
    (r"^conceptprune evaluate --model ", check_evaluate),
    (r"^conceptprune compare ", check_compare),
    (r"^conceptprune evaluate package ", check_package),
    (r"^conceptprune filter image-based-centroids ", check_centroids),
    (r"^conceptprune filter image-based ", check_image_based),
    (r"^conceptprune keep-list intersect ", check_kl_intersect),
    (r"^conceptprune keep-list info ", check_kl_info),
    (r"^conceptprune report ", check_report),
    (r"^conceptprune explain ", check_explain),
    (r"^conceptprune filter negcliploss ", check_negcliploss),
    (r"^conceptprune filter normsim ", check_normsim),
    (r"^conceptprune run ", check_pipeline),
    (r"^conceptprune status \.$", check_status),
    (r"^python -c ", check_python),
]


# -- running ---------------------------------------------------------------------------------


def _env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "CONCEPTPRUNE_PROGRESS": "0", "PYTHONUNBUFFERED": "1"}


def run(cmd: str, cwd: Path) -> tuple[str, float]:
    words = shlex.split(cmd)
    if words[0] == "conceptprune":
        words = [sys.executable, "-m", "conceptprune.cli"] + words[1:]
    elif words[0] == "python":
        words = [sys.executable] + words[1:]
    t0 = time.time()
    p = subprocess.run(words, cwd=cwd, capture_output=True, text=True, env=_env(), timeout=600)
    took = time.time() - t0
    if p.returncode != 0:
        raise AssertionError(f"README command failed (rc {p.returncode}): {cmd}\n{p.stderr[-3000:]}")
    return p.stdout, took


def test_readme_blocks_run_as_printed(tmp_path):
    blocks = readme_blocks(README.read_text())
    offline = [c for b in blocks for c in b.commands if c.startswith("conceptprune make-pool ")]
    assert offline, "the README lost its offline line (make-pool --shards), which stands in for download"
    ctx = {"tests": str(Path(__file__).parent), "keep20": int(0.2 * ROWS),
           "offline_make_pool": re.sub(r"--rows \d+", f"--rows {ROWS}", offline[0])}
    for sub in SUBSTITUTIONS:
        sub.used = 0
    log, times = [], []
    for b in blocks:
        if not b.commands:
            continue
        log.append(f"\n== README.md:{b.line} ({b.lang or 'plain'} block, {len(b.commands)} commands)")
        for cmd in b.commands:
            todo, notes = substitute(cmd, ctx)
            log.append(f"  $ {cmd}")
            log.extend(f"    {n}" for n in notes)
            for c in todo:
                check = next((fn for pat, fn in CHECKS if re.search(pat, c)), None)
                assert check is not None, f"README.md:{b.line}: no check for {c!r}: add one to CHECKS"
                out, took = run(c, tmp_path)
                what = check(tmp_path, c, out, ctx)
                times.append((c, took))
                log.append(f"    ran{' (setup)' if c != todo[-1] else ''} {c!r} in {took:.1f} s; checked: {what}")
    unused = [s.pattern for s in SUBSTITUTIONS if not s.used]
    print("\n".join(log))
    print(f"\nREADME commands run: {len(times)} in {sum(t for _, t in times):.1f} s")
    assert not unused, f"substitutions that no README command uses any more (update the table): {unused}"
    (Path(os.environ.get("CONCEPTPRUNE_README_TIMES", tmp_path / "times.json"))).write_text(
        json.dumps([{"command": c, "seconds": round(t, 2)} for c, t in times], indent=1))


def test_a_broken_readme_command_fails(tmp_path):
    """The mechanism itself: a flag the CLI does not know fails the run, and a README block with
    a command no check covers is refused."""
    with pytest.raises(AssertionError, match="README command failed"):
        run("conceptprune make-pool --rows 10 --out p --no-such-flag", tmp_path)
    blocks = readme_blocks("```bash\nconceptprune filter dbp --pool p \\\n  --out x.npy   # note\n```\n"
                           "```\nwrote 2 files\n```\n")
    assert blocks[0].commands == ["conceptprune filter dbp --pool p --out x.npy"] and not blocks[1].commands
    with pytest.raises(AssertionError, match="mixes commands"):
        readme_blocks("```bash\nconceptprune status OUT\nsome output\n```\n")


def test_readme_slurm_block(slurm_cluster, tmp_path):
    """The job-layer block (detach, status, collect) on the localhost SLURM cluster, with its
    placeholders S, K.npy and OUT filled in and 2 workers instead of 64."""
    block = next(b for b in readme_blocks(README.read_text()) if any("--detach" in c for c in b.commands))
    fill = {"S": "data/shards", "K.npy": "keep.npy", "OUT": "out", "OUT.state": "out.state", "64": "2"}
    run(f"conceptprune make-pool --rows 300 --out data/metadata --shards data/shards --shard-size 100", tmp_path)
    run("conceptprune filter random --pool data/metadata --out keep.npy --fraction 0.5", tmp_path)
    outs = []
    for cmd in block.commands:
        words = [fill.get(w, w) for w in shlex.split(cmd)]
        print(f"  $ {cmd}\n    substituted: {shlex.join(words)!r} (placeholders; 2 workers on the test cluster)")
        out, took = run(shlex.join(words + (["--time", "10"] if "--executor" in words else [])), tmp_path)
        outs.append(out)
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["kept_samples"] == 150 and not (tmp_path / "out.state").exists()
