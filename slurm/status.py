"""``conceptprune status DIR``: where the stages under a folder stand, whoever runs them.

Reads only what the executor writes: each stage's completion markers, its latest
submission record and its parts' run locks (``.markers/<stage>/``, see ``liveness``), the
controller's view of SLURM jobs (``sacct``) and the tails of failed jobs' logs. Works for a
detached launcher that has long exited. Where ``sacct`` cannot reach the controller's
accounting the state is "cannot tell", never a guess; a record that is not what the executor
writes is shown as unreadable, naming the file.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from .jobs import tail
from .liveness import is_running
from .progress import FILE as PROGRESS_FILE
from .progress import format_progress, read_progress

CANNOT_TELL = "CANNOT_TELL"  # sacct did not answer: the job's state is unknown, not pending
FAILED_STATES = ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "PREEMPTED")


@dataclass
class StageStatus:
    work_dir: str
    stage: str
    world_size: int
    done: int
    executor: str = ""
    job_states: dict = field(default_factory=dict)  # job id -> SLURM state
    failure: str = ""  # log tail of the first failed job
    running: int = 0  # parts a live process is running now (their run locks are held)
    problem: str = ""  # why the state cannot be told: an unreadable record, sacct's error

    @property
    def state(self) -> str:
        if self.problem and not self.job_states:
            return "unreadable"
        if self.world_size and self.done >= self.world_size:
            return "done"
        if self.running:
            return "running"
        if any(s.startswith(FAILED_STATES) for s in self.job_states.values()) or self.failure:
            return "failed"
        if any(s in ("RUNNING", "COMPLETING") for s in self.job_states.values()):
            return "running"
        if any(s in ("PENDING", "REQUEUED", "CONFIGURING") for s in self.job_states.values()):
            return "pending"
        if any(s == CANNOT_TELL for s in self.job_states.values()):
            return "cannot tell"
        return "incomplete"

    def line(self) -> str:
        counts = {}
        for s in self.job_states.values():
            counts[s] = counts.get(s, 0) + 1
        jobs = ", ".join(f"{n} {s.lower().replace('_', ' ')}" for s, n in sorted(counts.items()))
        return (f"{self.stage:14s} {self.done:>5d}/{self.world_size:<5d} parts done  {self.state:10s}"
                f"{'  jobs: ' + jobs if jobs else ''}  ({self.work_dir})"
                + (f"\n  {self.problem}" if self.problem else ""))


def find_stages(root: str | Path) -> list[Path]:
    """Every stage folder (``.markers/<stage>``) at or below ``root``."""
    root = Path(root)
    return sorted({p for m in root.rglob(".markers") if m.is_dir() for p in m.iterdir() if p.is_dir()})


def slurm_states(job_ids: list[str], unknown: str = "PENDING") -> dict[str, str]:
    """SLURM's state of each job id (``sacct``); ``unknown`` for a job sacct does not list
    (an array task not started yet is listed as ``12_[0-3]``: its range is read); CANNOT_TELL
    for every job when sacct is missing or does not answer (see :func:`sacct_states`)."""
    return sacct_states(job_ids, unknown)[0]


def sacct_states(job_ids: list[str], unknown: str = "PENDING") -> tuple[dict[str, str], str]:
    """(state of each job id, why sacct could not tell: '' when it answered)."""
    if not job_ids:
        return {}, ""
    if not shutil.which("sacct"):
        return dict.fromkeys(job_ids, CANNOT_TELL), "cannot tell the SLURM jobs' states: no sacct on this machine"
    try:
        proc = subprocess.run(["sacct", "-n", "-P", "-X", "-o", "JobID,State", "-j",
                               ",".join(sorted({j.split("_")[0] for j in job_ids}))],
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as e:
        return dict.fromkeys(job_ids, CANNOT_TELL), f"cannot tell the SLURM jobs' states: sacct failed ({e})"
    if proc.returncode != 0:
        err = next((line for line in reversed(proc.stderr.splitlines()) if line.strip()), f"exit {proc.returncode}")
        return dict.fromkeys(job_ids, CANNOT_TELL), f"cannot tell the SLURM jobs' states: {err.strip()}"
    out = proc.stdout
    states = {}
    for line in out.splitlines():
        jid, _, state = line.partition("|")
        states[jid.strip()] = state.split()[0] if state.strip() else "UNKNOWN"
    return {j: states.get(j) or _array_range_state(j, states) or states.get(j.split("_")[0], unknown)
            for j in job_ids}, ""


def queued_or_running(job_ids: list[str]) -> set[str]:
    """Which of ``job_ids`` the controller still holds, queued or running (``squeue``: live and
    immediate, where the accounting that ``sacct`` reads lags by seconds). Empty without SLURM."""
    if not job_ids or not shutil.which("squeue"):
        return set()
    bases = sorted({j.split("_")[0] for j in job_ids})
    try:
        out = subprocess.run(["squeue", "-h", "-r", "-o", "%i|%T", "-j", ",".join(bases)],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return set()
    held = {line.partition("|")[0].strip() for line in out.stdout.splitlines()
            if line.partition("|")[2].strip() not in ("COMPLETED", "CANCELLED", "FAILED", "TIMEOUT")}
    return {j for j in job_ids if j in held}


def _array_range_state(job_id: str, states: dict[str, str]) -> str | None:
    """The state of array task ``12_3`` from a pending-array line such as ``12_[0-3,5%2]``."""
    base, _, task = job_id.partition("_")
    if not task.isdigit():
        return None
    for jid, state in states.items():
        m = re.fullmatch(re.escape(base) + r"_\[([0-9,\-]+)(?:%\d+)?\]", jid)
        if m and any(_in_range(int(task), part) for part in m.group(1).split(",")):
            return state
    return None


def _in_range(task: int, part: str) -> bool:
    lo, _, hi = part.partition("-")
    return int(lo) <= task <= int(hi or lo)


def _failure_tail(log_folder: str, job_ids: list[str], states: dict[str, str]) -> str:
    for jid in job_ids:
        if states and not states.get(jid, "").startswith(FAILED_STATES):
            continue
        for p in sorted(Path(log_folder).glob(f"{jid}/{jid}_*_log.err")) + sorted(
                Path(log_folder).glob(f"*/{jid}_*_log.err")):
            text = tail(p, 20)
            if states or "Traceback" in text or "Error" in text:
                return f"job {jid} ({p}):\n{text}"
    return ""


_MARKER = re.compile(r"(\d+)-of-(\d+)\.json")


def _read_record(path: Path) -> tuple[dict, str]:
    """(submission record, '' or why it is unreadable)."""
    try:
        sub = json.loads(path.read_text())
    except FileNotFoundError:
        return {}, ""
    except (OSError, ValueError) as e:
        return {}, f"{path}: unreadable ({type(e).__name__}: {e})"
    if not isinstance(sub, dict):
        return {}, f"{path}: not a submission record (a JSON {type(sub).__name__})"
    ws, ids = sub.get("world_size"), sub.get("job_ids", [])
    if isinstance(ws, bool) or not isinstance(ws, int) or ws < 1:
        return {}, f"{path}: world_size {ws!r} is not a number of parts >= 1"
    if not isinstance(ids, list) or not all(isinstance(j, str) for j in ids):
        return {}, f"{path}: job_ids is not a list of job ids"
    if not isinstance(sub.get("log_folder", ""), str):
        return {}, f"{path}: log_folder is not a path"
    return sub, ""


def stage_status(stage_dir: Path) -> StageStatus:
    markers, bad = [], []
    for p in stage_dir.glob("*-of-*.json"):
        m = _MARKER.fullmatch(p.name)
        (markers if m and int(m.group(2)) >= 1 and int(m.group(1)) < int(m.group(2)) else bad).append((p, m))
    sub, problem = _read_record(stage_dir / "submission.record")
    sizes = {int(m.group(2)) for _, m in markers}
    world = int(sub.get("world_size") or (max(sizes) if sizes else 0))
    done = sum(1 for p, m in markers if int(m.group(2)) == world)
    st = StageStatus(str(stage_dir.parent.parent), stage_dir.name, world, done, sub.get("executor", ""))
    if bad:
        problem = problem or f"{bad[0][0]}: not a completion marker (<rank>-of-<parts>.json, rank < parts)"
    st.problem = problem
    st.running = sum(1 for r in range(world) if is_running(stage_dir, r, world)) if done < world else 0
    if sub and done < world:
        ids = list(sub.get("job_ids", []))
        if sub.get("executor") == "slurm":
            st.job_states, why = sacct_states(ids)
            st.problem = st.problem or why
        st.failure = _failure_tail(sub.get("log_folder", ""), ids, st.job_states)
    return st


def progress_files(root: str | Path) -> list[tuple[str, dict]]:
    """(folder, record) of every progress.json at or below ``root`` (a training run's, ...).
    A record whose work no live process runs any more (its stage's parts are done, or no run
    lock is held: killed, even with ``kill -9``) loses its ETA and gets ``live: False``."""
    out = []
    for path in sorted(Path(root).rglob(PROGRESS_FILE)):
        p = read_progress(path.parent)
        if not isinstance(p, dict) or not isinstance(p.get("done"), (int, float)):
            continue  # unreadable, or not a progress record
        stages = [d for d in (path.parent / ".markers").glob("*") if d.is_dir()]
        if stages:
            p["live"] = any(stage_status(d).running for d in stages)
            if not p["live"]:
                p.pop("eta_s", None)
        out.append((str(path.parent), p))
    return out


def status(root: str | Path) -> list[StageStatus]:
    """The stages at or below ``root``, and a reshard's into ``root`` (its job state lives beside
    its output, in ``<root>.state/``, while it runs)."""
    root = Path(root)
    dirs = find_stages(root)
    beside = root.parent / f"{root.name}.state"  # data/reshard.py's state_dir (slurm/ imports no stage)
    if root.name and beside.is_dir():
        dirs += [d for d in find_stages(beside) if d not in dirs]
    return [stage_status(d) for d in dirs]


def finished_reshard(root: str | Path) -> str:
    """'' unless ``root`` is a finished reshard (its meta.json, written last): then one line saying so."""
    try:
        meta = json.loads((Path(root) / "meta.json").read_text())
    except (OSError, ValueError):
        return ""
    if not isinstance(meta, dict) or "output_shard_count" not in meta or "reshard_state" not in meta:
        return ""
    return (f"{'reshard':14s} finished: {meta.get('kept_samples', meta.get('output_count'))} samples in "
            f"{meta['output_shard_count']} shards, from keep-list {meta.get('keep_list')}  ({Path(root)}; "
            "its job state was removed when it finished)")


def finished_run(folder: str | Path) -> dict | None:
    """A training run's run.json when it says the run finished, else None."""
    try:
        rec = json.loads((Path(folder) / "run.json").read_text())
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) and rec.get("status") == "finished" else None


def register(sub) -> None:
    p = sub.add_parser("status", help="where the stages under a folder stand (parts done, SLURM jobs, failures)",
                       description="Exit status: 0, 1 when a stage failed, 3 when a state cannot be told "
                                   "(sacct does not answer, a record is unreadable).")
    p.add_argument("dir", help="an output folder (searched recursively for stage markers)")
    p.add_argument("--json", action="store_true", help="print JSON instead of lines")
    p.set_defaults(func=_main)


def _main(args) -> int:
    from conceptprune.errors import ConfigError

    if not Path(args.dir).is_dir():
        raise ConfigError(f"{args.dir}: not a folder")
    rows = status(args.dir)
    if args.json:
        print(json.dumps([dict(r.__dict__, state=r.state) for r in rows], indent=2))
    live = progress_files(args.dir)
    reshard = finished_reshard(args.dir) if not rows else ""
    if not args.json and reshard:
        print(reshard)
    if not args.json and not rows and not live and not reshard:
        print(f"{args.dir}: no stages found (no .markers folders, no progress.json)")
    for r in rows if not args.json else []:
        print(r.line())
        if r.failure:
            print("  " + r.failure.replace("\n", "\n  "))
    for folder, p in live if not args.json else []:
        fin = finished_run(folder)
        if fin is not None:  # its progress.json is the last update before the end: show the end instead
            print(f"{'training':14s} finished: {fin.get('name', Path(folder).name)}, final checkpoint "
                  f"{fin.get('final_checkpoint', '?')}  ({folder})")
            continue
        stopped = "  not running (no process holds it; rerun the command to resume)" if p.get("live") is False and \
            p.get("done", 0) < (p.get("total") or 0) else ""
        print(f"{'progress':14s} {format_progress(p)}  ({folder}){stopped}")
    if any(r.state == "failed" for r in rows):
        return 1
    return 3 if any(r.state in ("cannot tell", "unreadable") for r in rows) else 0
