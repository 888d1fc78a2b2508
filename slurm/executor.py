"""submitit executors behind one switch: ``slurm``, ``local`` (processes here), ``debug``.

``auto`` picks SLURM only when a controller actually answers (``scontrol ping``): having the
client commands installed is not enough, so a laptop with slurm-client but no cluster falls
back to local processes.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import subprocess
from pathlib import Path

import submitit

from conceptprune.errors import ConfigError

from .options import ClusterOptions

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=None)
def _slurm_answers(conf: str | None) -> bool:
    if not shutil.which("sbatch") or not shutil.which("scontrol"):
        return False
    try:
        out = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.SubprocessError):
        return False
    return out.returncode == 0 and "UP" in out.stdout


def slurm_available() -> bool:
    return _slurm_answers(os.environ.get("SLURM_CONF"))


def resolve_executor(kind: str) -> str:
    kind = os.environ.get("CONCEPTPRUNE_EXECUTOR", kind) if kind == "auto" else kind
    kind = "debug" if kind == "inline" else kind
    if kind == "auto":
        return "slurm" if slurm_available() else "local"
    if kind not in ("slurm", "local", "debug"):
        raise ConfigError(f"--executor must be auto, slurm, local or inline, not {kind!r}")
    if kind == "slurm" and not slurm_available():
        raise ConfigError("--executor slurm: no SLURM controller answers 'scontrol ping' "
                          "(is SLURM_CONF set, is slurmctld up?)")
    return kind


def make_executor(kind: str, options: ClusterOptions, folder: str | Path, name: str) -> submitit.Executor:
    """A configured submitit executor; ``kind`` must be resolved (not 'auto')."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    common = dict(name=name, timeout_min=options.timeout_min, nodes=options.nodes,
                  tasks_per_node=options.tasks_per_node, gpus_per_node=options.gpus_per_node)
    if options.cpus_per_task:
        common["cpus_per_task"] = options.cpus_per_task
    if kind == "slurm":
        ex = submitit.AutoExecutor(folder=folder / "%j", cluster="slurm", slurm_max_num_timeout=options.max_requeues)
        if options.mem_gb:
            common["mem_gb"] = options.mem_gb
        extra = dict(options.extra)
        slurm = dict(slurm_partition=options.partition, slurm_account=options.account, slurm_qos=options.qos,
                     slurm_constraint=options.constraint, slurm_array_parallelism=options.array_parallelism,
                     slurm_signal_delay_s=options.signal_delay_s,
                     slurm_setup=list(options.setup) or None, slurm_additional_parameters=extra or None)
        ex.update_parameters(**common, **{k: v for k, v in slurm.items() if v is not None})
        return ex
    if kind == "local":
        if options.nodes != 1:
            raise ConfigError(f"the local executor runs on one node; --nodes {options.nodes} needs SLURM")
        ex = submitit.LocalExecutor(folder=folder / "%j", max_num_timeout=options.max_requeues)
        common.pop("cpus_per_task", None)
        ex.update_parameters(**common, signal_delay_s=min(options.signal_delay_s, 30),
                             setup=list(options.setup))
        return ex
    if kind == "debug":
        return submitit.DebugExecutor(folder=folder / "%j")
    raise ConfigError(f"unknown executor {kind!r}")
