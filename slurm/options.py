"""Cluster options: one dataclass shared by every stage, read from a YAML profile and CLI flags.

A profile holds what is fixed for a cluster (partition, account, qos, constraint, setup
lines); flags override it per command::

    # my_cluster.yaml
    partition: gpu
    account: proj123
    qos: normal
    time: "12:00:00"
    gpus_per_node: 8
    cpus_per_task: 12
    mem: 480G
    setup: ["module load cuda/12.4"]
    extra: {exclusive: true}
"""

from __future__ import annotations

import argparse
import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from conceptprune.checks import int_arg
from conceptprune.errors import ConfigError

EXECUTORS = ("auto", "slurm", "local", "inline", "debug")  # debug: the old name of inline
DEFAULT_WORKERS = 1  # --workers: the one default of the number of parts (Executor.workers)


@dataclass
class ClusterOptions:
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: str = "4:00:00"  # HH:MM:SS, D-HH:MM:SS or minutes
    nodes: int = 1
    tasks_per_node: int = 1
    gpus_per_node: int = 0
    cpus_per_task: int | None = None
    mem: str | None = None  # e.g. 64G, 500M
    constraint: str | None = None
    extra: dict = field(default_factory=dict)  # more #SBATCH directives, e.g. {exclusive: true}
    setup: list = field(default_factory=list)  # shell lines run before the job (module load ...)
    log_folder: str = "slurm_logs"
    array_parallelism: int = 256  # SLURM: at most this many array tasks of a stage run at once
    parts_per_task: int = 1  # SLURM: parts one array task runs, one after the other
    signal_delay_s: int = 120  # USR2 this long before the time limit, to checkpoint + requeue
    max_requeues: int = 3  # time-limit requeues; preemptions do not count

    # -- conversions ----------------------------------------------------------------------

    @property
    def timeout_min(self) -> int:
        return parse_time(self.time)

    @property
    def mem_gb(self) -> float | None:
        return parse_mem(self.mem) if self.mem else None

    def validate(self) -> "ClusterOptions":
        self.timeout_min  # noqa: B018 - raises on a malformed value
        if self.mem:
            self.mem_gb  # noqa: B018
        for name in ("nodes", "tasks_per_node", "parts_per_task", "array_parallelism"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1")
        if self.gpus_per_node < 0:
            raise ConfigError("--gpus-per-node must be >= 0")
        return self

    @classmethod
    def from_yaml(cls, path: str | Path) -> "ClusterOptions":
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"--cluster-profile {path}: file not found")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: a cluster profile is a mapping of option: value")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(k.replace("-", "_") for k in data) - known)
        if unknown:
            raise ConfigError(f"{path}: unknown option(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        return cls(**{k.replace("-", "_"): v for k, v in data.items()}).validate()

    def replace(self, **changes) -> "ClusterOptions":
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def parse_time(value) -> int:
    """A SLURM time limit -> whole minutes (rounded up).

    SLURM's grammar: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S.
    """
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return max(1, int(value))
    s = str(value).strip()
    days = 0
    m = re.fullmatch(r"(\d+)-(.+)", s)
    if m:
        days, s = int(m.group(1)), m.group(2)
        parts = s.split(":")
        if not 1 <= len(parts) <= 3 or not all(p.isdigit() for p in parts):
            raise ConfigError(f"--time {value!r}: use minutes, H:M:S or D-H:M:S")
        h, mi, sec = (list(map(int, parts)) + [0, 0])[:3]
    else:
        parts = s.split(":")
        if not 1 <= len(parts) <= 3 or not all(p.isdigit() for p in parts):
            raise ConfigError(f"--time {value!r}: use minutes, H:M:S or D-H:M:S")
        nums = list(map(int, parts))
        h, mi, sec = {1: (0, nums[0], 0), 2: (0, *nums), 3: tuple(nums)}[len(nums)]
    total_s = ((days * 24 + h) * 60 + mi) * 60 + sec
    return max(1, -(-total_s // 60))


def parse_mem(value) -> float:
    if isinstance(value, (int, float)):
        return float(value)
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)B?\s*", str(value), re.IGNORECASE)
    if not m:
        raise ConfigError(f"--mem {value!r}: use e.g. 64G or 500M")
    n, unit = float(m.group(1)), m.group(2).upper()
    return n * {"K": 1 / 1024 ** 2, "M": 1 / 1024, "G": 1, "T": 1024, "": 1 / 1024}[unit]


def add_cluster_args(parser: argparse.ArgumentParser, *, distributed: bool = False) -> None:
    """The job-layer flags every stage command takes."""
    g = parser.add_argument_group("where it runs (job layer)")
    g.add_argument("--executor", choices=EXECUTORS, default="auto",
                   help="auto (default): SLURM when a controller answers, else local processes; "
                        "inline (or debug) runs in this process")
    g.add_argument("--detach", action="store_true",
                   help="SLURM: submit the command's whole stage graph (afterok dependencies) and exit; "
                        "'conceptprune status DIR' follows it, the same command rerun collects the result")
    g.add_argument("--cluster-profile", default=None, metavar="YAML",
                   help="cluster options from a YAML file (flags override it)")
    g.add_argument("--partition", help="SLURM partition")
    g.add_argument("--account", help="SLURM account")
    g.add_argument("--qos", help="SLURM quality of service")
    g.add_argument("--time", help="time limit per job (HH:MM:SS, D-HH:MM:SS or minutes)")
    g.add_argument("--constraint", help="SLURM node constraint (e.g. a100)")
    g.add_argument("--cpus-per-task", type=int_arg("--cpus-per-task", 1), help="CPUs per task")
    g.add_argument("--mem", help="memory per node (e.g. 64G)")
    g.add_argument("--gpus-per-node", type=int_arg("--gpus-per-node", 0), help="GPUs per node")
    if distributed:
        g.add_argument("--nodes", type=int_arg("--nodes", 1), help="nodes (default 1)")
        g.add_argument("--tasks-per-node", type=int_arg("--tasks-per-node", 1), help="tasks per node (default: one per GPU, else 1)")
    g.add_argument("--log-folder", help="where job scripts and logs go (default: OUTPUT/slurm_logs)")
    g.add_argument("--sbatch", action="append", default=[], metavar="KEY=VALUE",
                   help="extra #SBATCH directive, repeatable (e.g. --sbatch exclusive=true)")
    g.add_argument("--workers", type=int_arg("--workers", 1), default=DEFAULT_WORKERS,
                   help="parts the work is cut into (default %(default)s): locally they all run at once (one in "
                        "this process, the others in worker processes), on SLURM as the tasks of a job array")
    g.add_argument("--parts-per-task", type=int, default=None,
                   help="SLURM: parts one array task runs one after the other (default 1; fewer, longer tasks)")


def options_from_args(args: argparse.Namespace) -> tuple[str, ClusterOptions]:
    opts = ClusterOptions.from_yaml(args.cluster_profile) if getattr(args, "cluster_profile", None) else ClusterOptions()
    extra = dict(opts.extra)
    for item in getattr(args, "sbatch", []) or []:
        if "=" not in item:
            raise ConfigError(f"--sbatch {item!r}: use KEY=VALUE")
        k, v = item.split("=", 1)
        extra[k.strip().replace("-", "_")] = True if v.lower() == "true" else v
    opts = opts.replace(partition=args.partition, account=args.account, qos=args.qos, time=args.time,
                        constraint=args.constraint, cpus_per_task=args.cpus_per_task, mem=args.mem,
                        gpus_per_node=args.gpus_per_node, nodes=getattr(args, "nodes", None),
                        tasks_per_node=getattr(args, "tasks_per_node", None), log_folder=args.log_folder,
                        parts_per_task=getattr(args, "parts_per_task", None))
    opts.extra = extra
    return args.executor, opts.validate()
