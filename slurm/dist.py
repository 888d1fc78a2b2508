"""Inside a job: the torch.distributed rendezvous and the job's identity, from the job
environment. The only place (with the executors) that reads SLURM's or submitit's variables."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass


@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    node: str
    job_id: str | None = None  # SLURM's or the local executor's job id; None outside a job
    restarts: int = 0  # how often SLURM requeued this job (preemption, time limit)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


TORCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def export_torch_env() -> DistEnv:
    """Set RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT for ``env://`` init.

    Under a submitit job (SLURM or local) submitit's TorchDistributedEnvironment derives
    them from the job; outside one (the debug executor, a plain call) it is a world of one.
    """
    import submitit

    node = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
    job_id, restarts = job_identity()
    try:
        env = submitit.helpers.TorchDistributedEnvironment()
    except RuntimeError:  # not inside a submitit job
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", str(_free_port())))
        return DistEnv(0, 1, 0, "127.0.0.1", int(os.environ["MASTER_PORT"]), node, job_id, restarts)
    # values inherited from a launcher that trained in its own process (inline) belong to that run:
    # submitit derives this job's own and refuses to overwrite set ones
    for var in TORCH_VARS:
        os.environ.pop(var, None)
    env.export(set_cuda_visible_devices=False)  # open_clip picks cuda:<local_rank> itself
    return DistEnv(env.rank, env.world_size, env.local_rank, env.master_addr, env.master_port, node, job_id,
                   restarts)


def job_identity() -> tuple[str | None, int]:
    """(job id, SLURM requeue count) of the job this process runs in; (None, 0) outside one."""
    job_id = os.environ.get("SLURM_JOB_ID") or os.environ.get("SUBMITIT_LOCAL_JOB_ID")
    try:
        restarts = int(os.environ.get("SLURM_RESTART_COUNT") or 0)
    except ValueError:
        restarts = 0
    return job_id, restarts


def task_rank() -> int:
    """This process's task rank in its (multi-task) job; 0 outside a job."""
    import submitit

    try:
        return int(submitit.JobEnvironment().global_rank)
    except RuntimeError:  # not inside a submitit job (inline)
        return 0
