"""``conceptprune evaluate``: DataComp's suite on a trained model, results in DataComp's format.

The model is loaded once for all tasks. Classification and retrieval go through
clip_benchmark (``zeroshot_classification.evaluate``, ``zeroshot_retrieval.evaluate``, amp off
as in DataComp); WILDS, fairness and WinoGAViL reuse clip_benchmark's zero-shot classifier and
add their group metrics. Each finished task is appended to ``eval_results.jsonl`` as
``{"key", "dataset", "metrics": {..., "main_metric"}}``; a rerun skips tasks already there and
never writes a task twice. A task that fails (missing data, an empty shard) is recorded in
``eval_errors.json`` and the others still run. On SLURM, tasks can be spread over array tasks.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from conceptprune.atomic import atomic_open, write_json
from conceptprune.errors import ConceptPruneError, ConfigError
from conceptprune.slurm.stage import Stage, run_stage

from . import metrics as M
from .tasks import Task, select

log = logging.getLogger(__name__)
RESULTS = "eval_results.jsonl"


class EvaluationError(ConceptPruneError):
    pass


# -- the model ---------------------------------------------------------------------------------


def resolve_model(model: str, arch: str | None) -> tuple[str, str]:
    """(architecture, checkpoint) from a run folder (its run.json) or a checkpoint file."""
    p = Path(model)
    if p.is_dir():
        run = p / "run.json"
        if not run.exists():
            raise ConfigError(f"--model {p}: a folder must be a training run (no run.json)")
        rec = json.loads(run.read_text())
        ckpt = rec.get("final_checkpoint")
        if not ckpt or not Path(ckpt).exists():
            raise ConfigError(f"--model {p}: the run has no final checkpoint (status {rec.get('status')})")
        return arch or rec["recipe"]["model"], ckpt
    if not p.exists():
        raise ConfigError(f"--model {p}: not found")
    return arch or "ViT-B-32", str(p)


def load_model(arch: str, checkpoint: str | None, device: str):
    import open_clip

    from conceptprune.training.models import register

    register()
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=checkpoint, device=device)
    except (RuntimeError, AssertionError, KeyError, ValueError) as e:  # open_clip's mismatch errors vary
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise EvaluationError(f"checkpoint {checkpoint} does not match --arch {arch}: {first}") from None
    model.eval()
    return model, preprocess, open_clip.get_tokenizer(arch)


# -- data --------------------------------------------------------------------------------------


def task_dir(data_dir: str | Path, task: Task) -> Path:
    from .layout import task_dir as locate  # DataComp's wds_<name>_test/ or ours; converts DataComp's hf_cache
    d = locate(data_dir, task)
    if not d.is_dir():
        raise EvaluationError(f"{task.key}: dataset folder {d} not found "
                              f"(fetch it with: conceptprune evaluate download --data-dir {data_dir} --tasks {task.key})")
    nshards = d / "test" / "nshards.txt"
    if not nshards.exists():
        raise EvaluationError(f"{task.key}: {nshards} not found (not the wds layout)")
    n = int(nshards.read_text().strip())
    for i in range(n):
        shard = d / "test" / f"{i}.tar"
        if not shard.exists():
            raise EvaluationError(f"{task.key}: shard {shard} is missing")
        if shard.stat().st_size <= 1024:
            raise EvaluationError(f"{task.key}: shard {shard} is empty")
    return d


def _lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def wds_samples(d: Path, *extensions: str):
    """Decoded samples of a wds test split: tuples of the given extensions (first: image)."""
    import webdataset as wds

    n = int((d / "test" / "nshards.txt").read_text().strip())
    pattern = str(d / "test" / ("{0..%d}.tar" % (n - 1) if n > 1 else "0.tar"))
    ds = wds.WebDataset(pattern, shardshuffle=False, nodesplitter=lambda src: src)
    return ds.decode(wds.autodecode.ImageHandler("pil", extensions=["webp", "png", "jpg", "jpeg"])).to_tuple(
        "webp;png;jpg;jpeg", *extensions)


# -- one task ----------------------------------------------------------------------------------


@dataclass
class Evaluator:
    arch: str
    checkpoint: str | None
    data_dir: str
    batch_size: int = 64
    device: str = "auto"
    workers: int = 1
    _model: tuple | None = field(default=None, repr=False)

    def model(self):
        if self._model is None:
            import torch

            device = "cuda" if self.device == "auto" and torch.cuda.is_available() else (
                "cpu" if self.device == "auto" else self.device)
            self._model = (*load_model(self.arch, self.checkpoint, device), device)
        return self._model

    def loader(self, dataset):
        import torch

        return torch.utils.data.DataLoader(dataset.batched(self.batch_size), batch_size=None,
                                           num_workers=min(self.workers, 1))

    def run(self, task: Task) -> dict:
        d = task_dir(self.data_dir, task)
        fn = {"zeroshot_classification": self._classification, "retrieval": self._retrieval,
              "wilds": self._grouped, "fairness": self._grouped, "winogavil": self._winogavil}[task.type]
        metrics = fn(task, d)
        main = metrics.get(task.main_metric) if task.main_metric else None
        metrics["main_metric"] = main
        return {"key": task.key, "dataset": task.name, "metrics": _clean(metrics)}

    def _classification(self, task: Task, d: Path) -> dict:
        from clip_benchmark.datasets.builder import build_dataset
        from clip_benchmark.metrics import zeroshot_classification

        model, preprocess, tokenizer, device = self.model()
        ds = build_dataset(f"wds/{task.folder}", root=str(d), transform=preprocess, split="test", download=False)
        if not ds.classes or not ds.templates:
            raise EvaluationError(f"{task.key}: classnames.txt or zeroshot_classification_templates.txt missing in {d}")
        return zeroshot_classification.evaluate(model, self.loader(ds), tokenizer, ds.classes, ds.templates,
                                                device, amp=False)

    def _retrieval(self, task: Task, d: Path) -> dict:
        from clip_benchmark.datasets.builder import build_dataset
        from clip_benchmark.metrics import zeroshot_retrieval

        model, preprocess, tokenizer, device = self.model()
        ds = build_dataset(f"wds/{task.folder}", root=str(d), transform=preprocess, split="test", download=False,
                           task="zeroshot_retrieval")
        n = _count_samples(d)
        ks = [k for k in (1, 5, 10) if k <= n]
        out = zeroshot_retrieval.evaluate(model, self.loader(ds), tokenizer, device, amp=False, recall_k_list=ks)
        for k in ks:  # DataComp's main metric is mean_recall@1
            out[f"mean_recall@{k}"] = (out[f"image_retrieval_recall@{k}"] + out[f"text_retrieval_recall@{k}"]) / 2
        return out

    def logits(self, task: Task, d: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Zero-shot logits, labels and npy group metadata of every sample."""
        import torch
        from clip_benchmark.metrics.zeroshot_classification import zero_shot_classifier

        model, preprocess, tokenizer, device = self.model()
        classes, templates = _lines(d / "classnames.txt"), _lines(d / "zeroshot_classification_templates.txt")
        weights = zero_shot_classifier(model, tokenizer, classes, templates, device, amp=False)
        ds = wds_samples(d, "cls", "npy").map_tuple(preprocess, None, None)
        logits, target, meta = [], [], []
        with torch.no_grad():
            for images, labels, md in self.loader(ds):
                feats = torch.nn.functional.normalize(model.encode_image(images.to(device)), dim=-1)
                logits.append((100.0 * feats @ weights).cpu().numpy())
                target.append(np.asarray(labels))
                meta.append(np.asarray(md).reshape(len(labels), -1))
        if not logits:
            raise EvaluationError(f"{task.key}: no samples in {d / 'test'}")
        return np.concatenate(logits), np.concatenate(target).astype(np.int64), np.concatenate(meta).astype(np.int64)

    def _grouped(self, task: Task, d: Path) -> dict:
        logits, target, meta = self.logits(task, d)
        fn = M.wilds_metrics if task.type == "wilds" else M.fairness_metrics
        return fn(task, logits, target, meta)

    def _winogavil(self, task: Task, d: Path) -> dict:
        import io
        import tarfile

        import torch
        from PIL import Image

        from conceptprune.data.tars import iter_samples

        model, preprocess, tokenizer, device = self.model()
        scores = []
        n = int((d / "test" / "nshards.txt").read_text().strip())
        for i in range(n):
            for sample in iter_samples(d / "test" / f"{i}.tar"):
                q = json.loads(sample.parts["json"])
                cands = q["candidates"]
                images = torch.stack([preprocess(Image.open(io.BytesIO(sample.parts[f"{c}.jpg"])).convert("RGB"))
                                      for c in cands])
                with torch.no_grad():
                    img = torch.nn.functional.normalize(model.encode_image(images.to(device)), dim=-1)
                    txt = torch.nn.functional.normalize(model.encode_text(tokenizer([M.article(q["cue"])]).to(device)),
                                                        dim=-1)
                sims = (img @ txt.T).squeeze(1).cpu().numpy()
                gold = set(q["associations"])
                pred = {cands[j] for j in np.argsort(-sims, kind="stable")[: len(gold)]}
                scores.append((len(cands), M.jaccard(pred, gold)))
        if not scores:
            raise EvaluationError(f"{task.key}: no samples in {d / 'test'}")
        return M.winogavil_metrics(scores)


def _count_samples(d: Path) -> int:
    from conceptprune.data.tars import iter_samples

    n = int((d / "test" / "nshards.txt").read_text().strip())
    return sum(1 for i in range(n) for _ in iter_samples(d / "test" / f"{i}.tar"))


def _clean(metrics: dict) -> dict:
    """JSON-safe values: floats, None for NaN."""
    out = {}
    for k, v in metrics.items():
        if isinstance(v, (np.floating, np.integer)):
            v = v.item()
        if hasattr(v, "item") and not isinstance(v, (int, float)):
            v = v.item()
        if isinstance(v, float) and math.isnan(v):
            v = None
        out[k] = v
    return out


# -- results files -----------------------------------------------------------------------------


def read_results(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise EvaluationError(f"{path}: line {i} is not JSON") from None
    return rows


def _append(path: Path, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


@dataclass
class EvalStage(Stage):
    work_dir: str
    evaluator: Evaluator
    task_keys: list
    name: str = "evaluate"

    def run(self, rank: int, world_size: int) -> dict:
        out = Path(self.work_dir)
        part = out / "parts" / f"{rank:05d}.jsonl"
        part.parent.mkdir(parents=True, exist_ok=True)
        done = {r["key"] for r in _all_rows(out)}
        ran, failed = [], {}
        for key in self.task_keys[rank::world_size]:
            if key in done:
                continue
            task = select([key], self.evaluator.data_dir)[0]
            try:
                row = self.evaluator.run(task)
            except Exception as e:  # recorded; the other tasks still run
                failed[key] = f"{type(e).__name__}: {e}"
                log.error("%s failed: %s", key, failed[key])
                log.debug("%s", traceback.format_exc())
                continue
            _append(part, row)
            ran.append(key)
            log.info("%s: %s = %s", key, task.main_metric, row["metrics"]["main_metric"])
        return {"ran": ran, "failed": failed}


def _all_rows(out: Path) -> list[dict]:
    rows = read_results(out / RESULTS)
    for p in sorted((out / "parts").glob("*.jsonl")) if (out / "parts").exists() else []:
        rows += read_results(p)
    return rows


def evaluate(model: str, data_dir: str, output: str, *, arch: str | None = None, tasks: list[str] | None = None,
             batch_size: int = 64, device: str = "auto", workers: int = 1, executor: str = "auto",
             options=None) -> dict:
    """Evaluate and merge into OUTPUT/eval_results.jsonl; returns {'results', 'errors'}."""
    arch, ckpt = resolve_model(model, arch)
    chosen = select(tasks, data_dir)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    evaluator = Evaluator(arch, ckpt, str(data_dir), batch_size, device)
    if executor == "auto" and workers <= 1:
        evaluator.model()  # fail fast on a checkpoint/architecture mismatch, before any task
    stage = EvalStage(str(out), evaluator, [t.key for t in chosen])
    shutil.rmtree(stage.marker_dir(), ignore_errors=True)  # resume is per task, from the results
    res = run_stage(stage, max(1, min(workers, len(chosen))), executor=executor, options=options)
    errors = {k: v for s in res.summaries for k, v in s["failed"].items()}
    rows = _merge(out)
    write_json(out / "eval_errors.json", errors)
    if errors:
        log.warning("%d task(s) failed: %s (see %s)", len(errors), ", ".join(errors), out / "eval_errors.json")
    return {"results": rows, "errors": errors, "model": {"arch": arch, "checkpoint": ckpt}}


def _merge(out: Path) -> list[dict]:
    """One row per task, in the registry's order, into eval_results.jsonl (atomically)."""
    from .tasks import TASKS

    by_key = {}  # DataComp's tasks in the registry's order, then your own
    for r in _all_rows(out):
        by_key.setdefault(r["key"], r)
    order = {t.key: i for i, t in enumerate(TASKS)}
    rows = sorted(by_key.values(), key=lambda r: order.get(r["key"], 10**6))
    with atomic_open(out / RESULTS, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    shutil.rmtree(out / "parts", ignore_errors=True)
    return rows
