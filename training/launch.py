"""``conceptprune train``: open_clip's own training, as a stage of the job layer.

A run is one :class:`TrainStage` part, run by one job of ``nodes x tasks_per_node`` tasks on
whatever executor the command has (SLURM, local processes, inline), submitted like any other
stage (``after=`` earlier ones: afterok on SLURM) and done when the executor's marker says so.
Every task runs ``open_clip_train.main.main(argv)`` with the rendezvous from the job
environment (``slurm.dist``). The part runner is checkpointable: on preemption or at the time
limit the job is requeued, and with the fixed ``--name`` and ``--resume latest`` each start
resumes from the newest loadable checkpoint (see :func:`repair_latest`). ``DIR/<name>/run.json``
records the recipe, the data (and the keep-list behind it) and the world size, and, once the
run is done, its final checkpoint; ``conceptprune evaluate`` reads it.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import shlex
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from conceptprune import __version__
from conceptprune.atomic import write_json
from conceptprune.errors import ConceptPruneError, ConfigError
from conceptprune.manifest import git_revision
from conceptprune.progress import progress_bar
from conceptprune.slurm import jobs as J
from conceptprune.slurm.options import ClusterOptions
from conceptprune.slurm.progress import read_progress, write_progress
from conceptprune.slurm.stage import Executor, Stage, StageSubmission

from .recipe import Recipe, batch_plan, recipe

log = logging.getLogger(__name__)


class TrainingError(ConceptPruneError):
    pass


@dataclass
class TrainConfig:
    data: list
    scale: str
    output: str
    name: str | None = None
    seed: int = 0
    max_batch_per_gpu: int | None = None
    samples_seen: int | None = None  # a deviation from the recipe, recorded in run.json
    checkpoints: int | None = None
    extra_args: list = field(default_factory=list)
    keep_checkpoints: str = "latest"  # DataComp's: the latest (and the final epoch); "all": every epoch


# -- data ------------------------------------------------------------------------------------


def resolve_data(sources: list[str]) -> tuple[str, list[dict]]:
    """open_clip's --train-data (sources joined by '::') and a description of each source."""
    if not sources:
        raise ConfigError("--data is required (a folder of webdataset shards, e.g. the output of reshard)")
    patterns, described = [], []
    for src in sources:
        p = Path(src)
        if "{" in src or src.startswith(("s3://", "http://", "https://", "pipe:")):
            patterns.append(src)
            described.append({"source": src})
            continue
        if not p.exists():
            raise ConfigError(f"--data {src}: not found")
        if p.is_file():
            patterns.append(str(p))
            described.append({"source": str(p), "shards": 1})
            continue
        if ((p / "sample_ids.npy").exists() and not (p / "meta.json").exists()) or (p / ".reshard.json").exists():
            raise ConfigError(f"--data {src}: an unfinished reshard (no meta.json); rerun the same reshard to "
                              "finish it")
        tars = sorted(p.glob("*.tar"))
        resharded = sorted(d for d in p.iterdir() if d.is_dir() and (d / "meta.json").is_file()) if not tars else []
        if resharded:  # DataComp's --data_dir PARENT: every subfolder made by a resharder
            sub_patterns, sub_described = resolve_data([str(d) for d in resharded])
            patterns.append(sub_patterns)
            described += sub_described
            continue
        if not tars:
            raise ConfigError(f"--data {src}: no .tar shards in this folder")
        names = [t.stem for t in tars]
        width = len(names[0])
        if all(n.isdigit() and len(n) == width for n in names) and int(names[-1]) - int(names[0]) + 1 == len(names):
            patterns.append(str(p / f"{{{names[0]}..{names[-1]}}}.tar"))
        else:
            patterns.append("::".join(str(t) for t in tars))
        desc = {"source": str(p.resolve()), "shards": len(tars)}
        sizes = _check_sizes(p, tars)
        if sizes is not None:
            desc["samples"] = sizes
        meta = p / "meta.json"
        if meta.exists():  # a reshard of a keep-list: record where the data came from
            m = _check_meta(p, tars, sizes)
            desc["keep_list"] = m.get("keep_list")
            keep_manifest = Path(m["keep_list"]).with_suffix(".json") if m.get("keep_list") else None
            if keep_manifest and keep_manifest.exists():
                desc["keep_list_manifest"] = json.loads(keep_manifest.read_text())
        described.append(desc)
    return "::".join(patterns), described


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"--data {path}: unreadable ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--data {path}: not a JSON object")
    return data


def _check_sizes(folder: Path, tars: list[Path]) -> int | None:
    """The samples sizes.json (open_clip's count of each shard) lists, checked against the shards
    present: every shard listed is there and every shard there is listed. None without sizes.json."""
    path = folder / "sizes.json"
    if not path.exists():
        return None
    sizes = _read_json(path)
    names = {t.name for t in tars}
    missing = sorted(set(sizes) - names)
    if missing:
        raise ConfigError(f"--data {folder}: sizes.json lists {len(missing)} shard(s) that are not there "
                          f"(first {missing[0]}); the folder lost shards: rerun the reshard into a new folder")
    unlisted = sorted(names - set(sizes))
    if unlisted:
        raise ConfigError(f"--data {folder}: {unlisted[0]} is not in sizes.json ({len(unlisted)} shard(s) unlisted); "
                          "the folder holds shards of another run")
    bad = [k for k, v in sizes.items() if isinstance(v, bool) or not isinstance(v, int) or v < 0]
    if bad:
        raise ConfigError(f"--data {path}: the size of {bad[0]} is not a count ({sizes[bad[0]]!r})")
    return int(sum(sizes.values()))


def _check_meta(folder: Path, tars: list[Path], samples: int | None) -> dict:
    """A reshard's meta.json, checked against the shards present (DataComp's resharder and ours
    both record ``output_shard_count``; ours also ``output_shards`` and ``kept_samples``)."""
    path = folder / "meta.json"
    m = _read_json(path)
    for key in ("output_shard_count", "output_shards"):
        if key in m:
            want = m[key]
            if isinstance(want, bool) or not isinstance(want, int) or want != len(tars):
                raise ConfigError(f"--data {folder}: meta.json says {key} {want!r}, the folder holds {len(tars)} "
                                  "shard(s); the folder lost shards or is not this reshard's output")
    if samples is not None and isinstance(m.get("kept_samples"), int) and m["kept_samples"] != samples:
        raise ConfigError(f"--data {folder}: meta.json says {m['kept_samples']} samples kept, sizes.json {samples}")
    return m


# -- argv ------------------------------------------------------------------------------------


def build_argv(cfg: TrainConfig, r: Recipe, world_size: int, train_data: str) -> list[str]:
    plan = batch_plan(r.global_batch, world_size, cfg.max_batch_per_gpu)
    argv = [
        "--train-data", train_data, "--train-num-samples", str(r.train_num_samples),
        "--dataset-type", "webdataset", "--dataset-resampled",
        "--model", r.model, "--batch-size", str(plan.per_gpu), "--accum-freq", str(plan.accum_freq),
        "--lr", str(r.lr), "--wd", str(r.wd), "--beta2", str(r.beta2), "--warmup", str(r.warmup),
        "--epochs", str(r.checkpoints), "--workers", str(r.workers), "--precision", r.precision,
        # DataComp keeps the latest checkpoint (--save-frequency 0; open_clip still writes the final epoch_N.pt)
        "--save-frequency", "1" if cfg.keep_checkpoints == "all" else "0", "--save-most-recent",
        "--resume", "latest",
        "--logs", str(Path(cfg.output).resolve()), "--name", run_name(cfg), "--seed", str(cfg.seed),
        "--log-every-n-steps", "10", "--report-to", "",
    ]
    if r.grad_checkpointing:
        argv.append("--grad-checkpointing")
    argv += list(r.extra_flags)
    return argv + list(cfg.extra_args)


def run_name(cfg: TrainConfig) -> str:
    if cfg.name:
        return cfg.name
    first = Path(cfg.data[0].split("{")[0].rstrip("/")).name or "data"
    return f"{cfg.scale}-{first}"


# -- the job ---------------------------------------------------------------------------------


def _cpu_safe_ddp() -> None:
    """open_clip passes device_ids=[device] to DDP, which torch rejects for CPU modules."""
    import torch

    base = torch.nn.parallel.DistributedDataParallel
    if getattr(base, "_conceptprune_cpu_safe", False):
        return

    class CpuSafeDDP(base):
        _conceptprune_cpu_safe = True

        def __init__(self, module, device_ids=None, *args, **kwargs):
            if device_ids and all(str(d).startswith("cpu") for d in device_ids):
                device_ids = None
            super().__init__(module, device_ids, *args, **kwargs)

    torch.nn.parallel.DistributedDataParallel = CpuSafeDDP


class _SeededShuffle:
    """webdataset's sample shuffle with an rng seeded from (seed, rank, loader worker, pass):
    a module-level class so that loader workers started by spawn can unpickle it."""

    def __init__(self, seed: int, rank: int, bufsize: int, initial: int, handler=None):
        self.seed, self.rank, self.bufsize, self.initial, self.handler = seed, rank, bufsize, initial, handler
        self.passes = 0

    def __call__(self, src):
        import random

        import torch.utils.data
        from webdataset.filters import _shuffle

        worker = torch.utils.data.get_worker_info()
        rng = random.Random(f"{self.seed}:{self.rank}:{worker.id if worker else 0}:{self.passes}")
        self.passes += 1
        return _shuffle(src, self.bufsize, self.initial, rng, self.handler)


def _seeded_sample_shuffle(seed: int, rank: int) -> None:
    """open_clip's sample shuffle buffer (``wds.shuffle`` without an rng) is seeded by webdataset
    from the pid and the clock, so two runs with the same data and --seed see different batches.
    Seed it from --seed, the rank, the loader worker and the pass over the data instead: the
    same shuffle statistics, but a rerun reproduces the run."""
    import webdataset as wds

    original = getattr(wds.shuffle, "_conceptprune_original", wds.shuffle)

    def shuffle(bufsize=1000, initial=100, rng=None, handler=None):
        if rng is not None:
            return original(bufsize, initial, rng=rng, handler=handler)
        return _SeededShuffle(seed, rank, bufsize, initial, handler)

    shuffle._conceptprune_original = original
    wds.shuffle = shuffle


_TRAIN_LINE = re.compile(r"Train Epoch: (\d+) \[\s*(\d+)/(\d+) .*?Batch \(t\): [^,]*, ([0-9.eE+-]+)/s"
                         r".*?Loss: ([0-9.eE+-]+|nan)")


def open_clip_progress(run_dir: Path, samples_seen: int, global_batch: int) -> dict | None:
    """Steps done, samples/s, loss and ETA from the last training line of open_clip's log."""
    path = Path(run_dir) / "out.log"
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - 65536))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return None
    matches = _TRAIN_LINE.findall(text)
    if not matches:
        return None
    epoch, n, per_epoch, rate, loss = matches[-1]
    seen = int(epoch) * int(per_epoch) + int(n)
    rate = float(rate)
    total = -(-samples_seen // global_batch)
    return {"done": min(total, seen // global_batch), "total": total, "unit": "steps", "rate": rate,
            "rate_unit": "samples/s", "loss": float(loss), "samples_seen": seen,
            "eta_s": (samples_seen - seen) / rate if rate > 0 else None}


def _report_progress(run_dir: Path, every_s: float = 5.0) -> threading.Event:
    """In the training job (rank 0): copy open_clip's progress into progress.json until stopped."""
    rec = json.loads((run_dir / "run.json").read_text())["recipe"]
    stop = threading.Event()

    def loop():
        while not stop.wait(every_s):
            p = open_clip_progress(run_dir, rec["samples_seen"], rec["global_batch"])
            if p:
                write_progress(run_dir, **p)

    threading.Thread(target=loop, name="train-progress", daemon=True).start()
    return stop


@dataclass
class TrainStage(Stage):
    """A training run as a stage of the job layer: one part, run by a job of ``nodes x
    tasks_per_node`` tasks (every task runs open_clip; task 0 writes the part's marker). The
    executor submits it like any stage (after others on SLURM: afterok), requeues it on
    preemption (the part runner is checkpointable) and marks it done; open_clip's ``--resume
    latest`` picks the run up where a requeue or a rerun left it."""

    work_dir: str  # the run folder
    argv: list
    nodes: int = 1
    tasks_per_node: int = 1
    name: str = "train"

    def job_shape(self) -> tuple[int, int]:
        return (self.nodes, self.tasks_per_node)

    def run(self, rank: int, world_size: int) -> dict:
        from open_clip_train.params import parse_args as open_clip_args

        from conceptprune.models import register
        from conceptprune.slurm.dist import export_torch_env

        env = export_torch_env()
        register()
        _cpu_safe_ddp()
        _seeded_sample_shuffle(open_clip_args(self.argv).seed, env.rank)  # the seed open_clip itself reads
        run = Path(self.work_dir)
        if env.rank == 0:
            _append(run / "starts.jsonl", {"time": time.time(), "host": env.node, "restart": env.restarts,
                                           "job_id": env.job_id})
        from open_clip_train.main import main as open_clip_main

        if env.rank == 0:  # open_clip's master alone picks the resume checkpoint and broadcasts it
            repair_latest(run)
            progress = _report_progress(run)
        try:
            rc = open_clip_main(list(self.argv))
        finally:
            if env.rank == 0:
                progress.set()
                rec = json.loads((run / "run.json").read_text())["recipe"]
                last = open_clip_progress(run, rec["samples_seen"], rec["global_batch"])
                if last:
                    write_progress(run, **last)
        if rc == -1:  # open_clip refused to start (and would have exited 0)
            raise TrainingError(f"open_clip refused to start; see {run / 'out.log'}")
        final = final_checkpoint(run)
        if env.rank == 0:
            if final is None:
                raise TrainingError(f"open_clip ended without a checkpoint; see {run / 'out.log'}")
            _update(run / "run.json", status="finished", final_checkpoint=str(final), finished=time.time())
            write_info_pkl(run)
        return {"final_checkpoint": str(final) if final else None, "world_size": env.world_size,
                "task": env.rank, "node": env.node}


def resume_point(run_dir: Path) -> Path | None:
    """The loadable checkpoint with the highest epoch. open_clip's ``--resume latest`` with
    --save-most-recent only looks at epoch_latest.pt, which it writes after epoch_N.pt and not
    atomically: a job stopped between the two (or during the write) would start over."""
    import torch

    best = None
    for p in (Path(run_dir) / "checkpoints").glob("epoch_*.pt"):
        try:
            epoch = int(torch.load(p, map_location="cpu", mmap=True, weights_only=True)["epoch"])
        except Exception:  # a checkpoint cut short by the kill, or one holding more than tensors
            log.warning("ignoring unreadable checkpoint %s (cut short, or not plain tensors and numbers)", p)
            continue
        key = (epoch, p.name != "epoch_latest.pt")
        if best is None or key > best[0]:
            best = (key, p)
    return best[1] if best else None


def repair_latest(run_dir: Path) -> Path | None:
    """Make epoch_latest.pt the newest loadable checkpoint, for open_clip's ``--resume latest``
    (a path instead of 'latest' makes open_clip refuse an existing run folder)."""
    import shutil

    point = resume_point(run_dir)
    latest = Path(run_dir) / "checkpoints" / "epoch_latest.pt"
    if point is not None and point != latest:
        log.warning("epoch_latest.pt is older than %s (a stop between checkpoint writes); resuming from the latter",
                    point.name)
        tmp = latest.with_suffix(".pt.tmp")
        shutil.copyfile(point, tmp)
        os.replace(tmp, latest)
    return point


def final_checkpoint(run_dir: Path) -> Path | None:
    ckpts = sorted((Path(run_dir) / "checkpoints").glob("epoch_[0-9]*.pt"), key=lambda p: int(p.stem.split("_")[1]))
    return ckpts[-1] if ckpts else None


def datacomp_info(run_dir: Path, record: dict) -> dict:
    """DataComp's ``info.pkl`` content (what its train.py saves and its evaluate.py reads):
    scale, the checkpoint (``checkpoints/epoch_latest.pt``, as DataComp's), the scale config and
    the data folder. Plain Python and pathlib objects only."""
    from .recipe import Recipe, datacomp_scale_config

    r = record["recipe"]
    rec = Recipe(**{k: (tuple(v) if k == "extra_flags" else v) for k, v in r.items() if k != "train_num_samples"})
    ckpt = Path(run_dir).resolve() / "checkpoints" / "epoch_latest.pt"
    if not ckpt.exists() and record.get("final_checkpoint"):
        ckpt = Path(record["final_checkpoint"])
    sources = [d.get("source", "") for d in record.get("data", [])]
    return {"scale": record["scale"], "checkpoint": ckpt, "scale_config": datacomp_scale_config(rec),
            "data_dir": Path("::".join(sources))}


def write_info_pkl(run_dir: Path) -> Path:
    """``RUN/info.pkl`` beside run.json, so that DataComp's evaluate.py takes the run as its own."""
    import pickle

    from conceptprune.atomic import atomic_open

    run_dir = Path(run_dir)
    info = datacomp_info(run_dir, json.loads((run_dir / "run.json").read_text()))
    with atomic_open(run_dir / "info.pkl", "wb") as f:
        pickle.dump(info, f)
    return run_dir / "info.pkl"


def _append(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def _update(path: Path, **fields) -> None:
    """Read, update and rewrite run.json under an exclusive lock: the launcher and the job's
    processes update it, and none of their updates is lost. The lock is a flock on a hidden
    file beside it (run.json itself is replaced by a rename at each write); the kernel drops
    it when its holder dies."""
    with open(path.with_name(f".{path.name}.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        data = json.loads(path.read_text()) if path.exists() else {}
        data.update(fields)
        write_json(path, data)


# -- the command -----------------------------------------------------------------------------


def train(cfg: TrainConfig, *, executor: "Executor | None" = None, dry_run: bool = False,
          after: "list[StageSubmission] | tuple" = ()) -> dict:
    """Run (or resume, or collect) a training run; returns its run.json content with ``status``:
    ``finished`` (the stage's marker is written), or ``submitted`` when the executor detaches
    (SLURM; rerun the same call to collect it). Waits for the job on every executor otherwise.

    ``executor``: where the job runs. A dry run resolves nothing: ``Executor.plan("auto",
    ClusterOptions(nodes=2, ...))`` prints the job without asking a controller.
    ``after``: submissions of earlier stages the run waits for (on SLURM: afterok)."""
    if executor is None:  # a dry run's plan resolves nothing: Executor.plan("auto") asks no controller
        executor = Executor.plan("auto") if dry_run else Executor.auto()
    executor = Executor.given(executor)
    stage, record = plan_run(cfg, executor, dry_run=dry_run)
    if dry_run:
        _print_dry_run(record, record["open_clip_argv"], executor.options.replace(
            tasks_per_node=stage.tasks_per_node), record["executor"])
        return record
    sub = submit(stage, record, executor, after=after)
    if sub is None:  # finished before this call
        return _result(stage, None)
    if executor.detach and sub.jobs:
        executor.finish(sub)  # says where to follow it
        return _result(stage, sub)
    watcher = _show_progress(stage, record) if sub.jobs else None
    try:
        sub.wait()
    except J.JobFailedError as e:
        raise TrainingError(f"{e}\nopen_clip's log: {Path(stage.work_dir) / 'out.log'}") from None
    finally:
        if watcher:
            watcher.set()
    return _result(stage, sub)


def plan_run(cfg: TrainConfig, executor: Executor, *, dry_run: bool = False) -> tuple[TrainStage, dict]:
    """The training stage of ``cfg`` and the run's record (run.json), every input checked;
    nothing is written. For a pipeline: ``submit(stage, record, executor, after=...)``."""
    options = executor.options
    check_run_name(cfg.name)
    r = recipe(cfg.scale, samples_seen=cfg.samples_seen, checkpoints=cfg.checkpoints)
    if cfg.keep_checkpoints not in ("latest", "all"):
        raise ConfigError("--keep-checkpoints must be latest or all")
    if cfg.max_batch_per_gpu is not None and cfg.max_batch_per_gpu < 1:
        raise ConfigError("--max-batch-per-gpu must be >= 1")
    kind = executor.kind  # the backend's name, for the record and the dry run's text
    if options.nodes > 1 and not _schedules_nodes(executor):
        raise ConfigError(f"--nodes {options.nodes} needs SLURM (the {kind} executor runs on this machine)")
    if dry_run and kind == "auto":  # a dry run asks no controller: a multi-node job is a SLURM job
        kind = "slurm" if options.nodes > 1 else "auto"
    tasks_per_node = options.tasks_per_node if options.tasks_per_node > 1 else max(1, options.gpus_per_node)
    world = options.nodes * tasks_per_node
    plan = batch_plan(r.global_batch, world, cfg.max_batch_per_gpu)
    train_data, sources = resolve_data(cfg.data)
    argv = build_argv(cfg, r, world, train_data)
    run_dir = Path(cfg.output) / run_name(cfg)
    record = {"kind": "training-run", "name": run_name(cfg), "scale": cfg.scale, "recipe": r.as_dict(),
              "data": sources, "train_data": train_data, "world_size": world, "per_gpu_batch": plan.per_gpu,
              "accum_freq": plan.accum_freq, "seed": cfg.seed, "extra_args": list(cfg.extra_args),
              "open_clip_argv": argv, "keep_checkpoints": cfg.keep_checkpoints,
              "conceptprune_version": __version__, "git_revision": git_revision(),
              "executor": kind, "cluster": options.replace(tasks_per_node=tasks_per_node).as_dict()}
    stage = TrainStage(str(run_dir.resolve()), argv, options.nodes, tasks_per_node)
    return stage, record


def _schedules_nodes(executor: Executor) -> bool:
    """Whether the executor's backend can run a job on several nodes: one whose jobs a cluster
    scheduler runs (they outlive the launcher). A dry run's plan of 'auto' may become one."""
    from conceptprune.slurm.executor import BACKENDS, PlanBackend

    backend = executor.backend
    if isinstance(backend, PlanBackend):
        return backend.name not in BACKENDS or BACKENDS[backend.name].can_detach
    return backend.can_detach


def submit(stage: TrainStage, record: dict, executor: Executor, *, after=()) -> StageSubmission | None:
    """Write the run's record (once) and submit its stage; None when the run is already finished."""
    run_dir = Path(stage.work_dir)
    if _check_existing(run_dir, record) is not None:
        return None
    run_dir.mkdir(parents=True, exist_ok=True)
    if not (run_dir / "run.json").exists():
        write_json(run_dir / "run.json", {**record, "created": time.time()})
    return executor.submit(stage, 1, after=after)


def _result(stage: TrainStage, sub: StageSubmission | None) -> dict:
    """run.json with the state the executor knows: finished when the part's marker is there."""
    rec = json.loads((Path(stage.work_dir) / "run.json").read_text())
    if stage.done_parts(1) or rec.get("status") == "finished":
        rec["status"] = "finished"
    else:
        rec["status"] = "submitted"
        rec["job_ids"] = sub.job_ids if sub else []
    return rec


def _show_progress(stage: TrainStage, record: dict) -> threading.Event:
    """In the launcher: a steps bar from the run's progress.json while the job runs."""
    r = record["recipe"]
    bar = progress_bar(total=-(-r["samples_seen"] // r["global_batch"]), desc=f"train {record['name']}", unit="step")
    stop = threading.Event()

    def loop():
        try:
            while not stop.wait(2.0):
                p = read_progress(stage.work_dir)
                if p:
                    bar.n = p["done"]
                    eta = p.get("eta_s")
                    bar.set_postfix_str(f"{p['rate']:,.0f} samples/s, loss {p['loss']:.3f}"
                                        + (f", ETA {int(eta // 60)}m{int(eta % 60):02d}s" if eta else ""),
                                        refresh=False)
                    bar.refresh()
        finally:
            bar.close()

    threading.Thread(target=loop, name="train-bar", daemon=True).start()
    return stop


def check_run_name(name: str | None) -> None:
    """A run name is one folder inside --output: no path separators, not '.' or '..'."""
    if name is None:
        return
    if (not name.strip() or name in (".", "..") or "/" in name or "\\" in name or "\0" in name
            or Path(name).is_absolute()):
        raise ConfigError(f"--name {name!r}: a run name is one folder name inside --output "
                          "(no '/', not '.' or '..')")


def _check_existing(run_dir: Path, record: dict) -> dict | None:
    """None to (re)start; the old record when the run is finished; an error when the folder
    holds another run. Whether a run is still going is the executor's to tell (its markers,
    its live jobs, the part's run lock), not this record's."""
    path = run_dir / "run.json"
    if not path.exists():
        if run_dir.exists() and any(run_dir.iterdir()):
            raise ConfigError(f"{run_dir} exists and is not a conceptprune run; choose another --name or --output")
        return None
    try:
        old = json.loads(path.read_text())
        if not isinstance(old, dict):
            raise ValueError("not a mapping")
    except ValueError as e:
        raise ConfigError(f"{path}: not a run record ({e}); choose another --name or --output") from None
    for key in ("recipe", "train_data", "seed", "extra_args"):
        if old.get(key) != record.get(key):
            raise ConfigError(f"{run_dir} holds a run with another {key.replace('_', ' ')}; nothing was changed. "
                              "Choose another --name, or the same options to resume it")
    if old.get("status") == "finished" and old.get("final_checkpoint") and Path(old["final_checkpoint"]).exists():
        if not (run_dir / "info.pkl").exists():  # a run finished before info.pkl was written
            write_info_pkl(run_dir)
        log.info("%s is finished (final checkpoint %s); not running it again", run_dir, old.get("final_checkpoint"))
        return old
    return None


def _print_dry_run(record: dict, argv: list[str], options: ClusterOptions, kind: str) -> None:
    r = record["recipe"]
    print(f"scale {record['scale']}: {r['model']}, global batch {r['global_batch']} = {record['world_size']} tasks x "
          f"{record['per_gpu_batch']} per GPU x accum {record['accum_freq']}, lr {r['lr']}, warmup {r['warmup']}, "
          f"{r['samples_seen']:,} samples seen in {r['checkpoints']} checkpoints "
          f"({r['train_num_samples']:,} per epoch)")
    print(f"executor: {kind}; nodes {options.nodes} x tasks per node {options.tasks_per_node}, "
          f"GPUs per node {options.gpus_per_node}, time {options.time}"
          + "".join(f", {k} {getattr(options, k)}" for k in ("partition", "account", "qos", "constraint")
                    if getattr(options, k)))
    n = record["world_size"]
    print(f"task{'s 0-' + str(n - 1) if n > 1 else ' 0'} (rank from the job environment; the same argv in each):")
    print(f"  python -m open_clip_train.main {shlex.join(argv)}")
