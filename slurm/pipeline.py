"""A pipeline: stages with their part counts and the steps each one waits for, handed to one
executor (issue 26.2).

    pipe = Pipeline("work/loop")
    pipe.add("reshard", ReshardStage(...), parts=4)
    pipe.add("train", train_stage, after=["reshard"])
    pipe.add("evaluate", CallStage.of("evaluate", "conceptprune.evaluation.run:evaluate", ...), after=["train"])
    results = pipe.run(executor)          # None when the executor detaches

Everything the executor already does holds for each step: completion markers (a rerun skips
finished steps, and on SLURM finds the jobs of unfinished ones through their submission
records instead of submitting them again), ``after`` as ``--dependency=afterok`` on SLURM and
as order locally, ``detach``. ``pipeline.json`` in the pipeline's folder records the steps and
their work folders, so ``conceptprune status`` finds every one of them.

A step that is not a stage of its own (a filter, a reshard, an evaluation: commands whose
Python function runs stages and then merges their parts) is a :class:`CallStage`: one part
that calls the command's function in its job, with an executor of its own for the work inside
(inline, or ``workers`` local processes).
"""

from __future__ import annotations

import dataclasses
import importlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from conceptprune.atomic import write_json
from conceptprune.errors import ConfigError

from .stage import Executor, Stage, StageResult, StageSubmission


@dataclass
class CallStage(Stage):
    """A command's Python function as a one-part stage. ``target`` is ``module:function``;
    ``kwargs`` its keyword arguments (paths, numbers, typed configs: what pickles small);
    ``executor_keyword`` the keyword by which it takes its executor (None: it takes none),
    which is inline, or local with ``workers`` processes, inside the step's job, unless
    ``executor`` gives one (a training step: the job submits the training's own job, with its
    nodes and GPUs, and waits for it)."""

    work_dir: str
    target: str
    kwargs: dict = field(default_factory=dict)
    name: str = "call"
    workers: int = 1
    executor_keyword: str | None = "executor"
    executor: Executor | None = None

    def function(self):
        module, _, fn = self.target.partition(":")
        try:
            return getattr(importlib.import_module(module), fn)
        except (ImportError, AttributeError) as e:
            raise ConfigError(f"step {self.name}: cannot find {self.target} ({e})") from None

    def run(self, rank: int, world_size: int) -> dict:
        kw = dict(self.kwargs)
        if self.executor_keyword:
            kw[self.executor_keyword] = self.executor or Executor.create("local" if self.workers > 1 else "inline",
                                                                         workers=self.workers)
        t0 = time.time()
        res = self.function()(**kw)
        return {**_summary(res), "wall_s": round(time.time() - t0, 3)}


def _summary(res: Any) -> dict:
    """What a step's marker keeps of its function's return value: its small JSON-able values."""
    if dataclasses.is_dataclass(res) and not isinstance(res, type):
        res = dataclasses.asdict(res)
    if isinstance(res, dict):
        return {k: v for k, v in res.items() if isinstance(v, (str, int, float, bool, type(None)))}
    if isinstance(res, (str, int, float, bool, type(None))):
        return {"value": res}
    return {"value": type(res).__name__}


@dataclass
class PipelineStep:
    name: str
    stage: Stage
    parts: int = 1
    after: tuple[str, ...] = ()
    executor: Executor | None = None  # this step's own (other cluster options), else the pipeline's


class Pipeline:
    """Steps in an order where each comes after those it waits for."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.steps: list[PipelineStep] = []

    def add(self, name: str, stage: Stage, *, parts: int = 1, after: Sequence[str] = (),
            executor: Executor | None = None) -> PipelineStep:
        known = {s.name for s in self.steps}
        if name in known:
            raise ConfigError(f"pipeline {self.folder}: two steps are named {name!r}")
        missing = [a for a in after if a not in known]
        if missing:
            raise ConfigError(f"pipeline step {name!r} comes after {missing[0]!r}, which is not an earlier step")
        if parts < 1:
            raise ConfigError(f"pipeline step {name!r}: parts must be >= 1, got {parts}")
        step = PipelineStep(name, stage, parts, tuple(after), executor)
        self.steps.append(step)
        return step

    def describe(self) -> dict:
        return {"folder": str(self.folder.resolve()),
                "steps": [{"name": s.name, "stage": s.stage.name, "work_dir": str(Path(s.stage.work_dir).resolve()),
                           "parts": s.parts, "after": list(s.after)} for s in self.steps]}

    def submit(self, executor: Executor) -> dict[str, StageSubmission]:
        """Every step's unfinished parts, each after the submissions of the steps it names."""
        if not self.steps:
            raise ConfigError(f"pipeline {self.folder}: no steps")
        self.folder.mkdir(parents=True, exist_ok=True)
        write_json(self.folder / "pipeline.json", self.describe())
        subs: dict[str, StageSubmission] = {}
        for s in self.steps:
            ex = executor if s.executor is None else s.executor.replace(detach=executor.detach)
            subs[s.name] = ex.submit(s.stage, s.parts, after=[subs[a] for a in s.after])
        return subs

    def run(self, executor: Executor) -> dict[str, StageResult] | None:
        """Submit, then wait for every step in order; None when the executor detaches (the same
        call, rerun, collects what finished and waits for the rest)."""
        subs = self.submit(executor)
        results = {name: executor.finish(sub) for name, sub in subs.items()}
        if any(r is None for r in results.values()):
            return None
        return results
