"""Cluster checks that run through the job layer like any stage.

- :func:`allreduce_check`: every task joins a torch.distributed group and sums its rank.
- :class:`CountingStage`: counts slowly, saving its counter after every step; a part that is
  preempted or requeued resumes from the saved count. ``fail_at`` makes it raise, to see
  what a failing job looks like.
"""

from __future__ import annotations

import datetime
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from conceptprune.atomic import write_json

from .dist import export_torch_env
from .stage import Stage


def allreduce_check(backend: str = "auto", timeout_s: int = 120) -> dict:
    import torch
    import torch.distributed as dist

    env = export_torch_env()
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    device = torch.device(f"cuda:{env.local_rank}") if backend == "nccl" else torch.device("cpu")
    if backend == "nccl":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method="env://", timeout=datetime.timedelta(seconds=timeout_s))
    try:
        t = torch.tensor([float(env.rank + 1)], device=device)
        dist.all_reduce(t)
        total = float(t.item())
    finally:
        dist.destroy_process_group()
    n = env.world_size
    return {"rank": env.rank, "world_size": n, "local_rank": env.local_rank, "node": env.node,
            "backend": backend, "sum": total, "expected": n * (n + 1) / 2, "ok": total == n * (n + 1) / 2}


@dataclass
class CountingStage(Stage):
    work_dir: str
    steps: int = 5
    step_seconds: float = 0.5
    fail_at: int | None = None
    name: str = "count"

    def state_path(self, rank: int) -> Path:
        return Path(self.work_dir) / f"{self.name}-{rank:05d}.json"

    def run(self, rank: int, world_size: int) -> dict:
        path = self.state_path(rank)
        state = json.loads(path.read_text()) if path.exists() else {"count": 0, "starts": []}
        state["starts"].append({"count": state["count"], "restart": int(os.environ.get("SLURM_RESTART_COUNT", 0))})
        write_json(path, state)
        while state["count"] < self.steps:
            if self.fail_at is not None and state["count"] == self.fail_at:
                raise RuntimeError(f"counting stage failed at step {self.fail_at}, as asked")
            time.sleep(self.step_seconds)
            state["count"] += 1
            write_json(path, state)
        return {"rank": rank, "count": state["count"], "starts": len(state["starts"])}
