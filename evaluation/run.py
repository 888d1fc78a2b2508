"""``conceptprune evaluate``: DataComp's suite on a trained model, results in DataComp's format.

Every task is computed as DataComp's ``eval_utils`` computes it (see ``metrics``): zero-shot
classification with clip_benchmark's classifier and fp32 image pass; WILDS, Dollar Street and
GeoDE add the ``wilds`` package's group metrics from the ``npy`` member; FairFace and UTKFace use
four zero-shot classifiers and labels from ``npy`` only; retrieval through clip_benchmark;
WinoGAViL as ``wino_eval``. Precision: by default fp16 autocast where DataComp uses it on CUDA
(the zero-shot classifiers, retrieval, WinoGAViL), fp32 on CPU; ``precision="fp32"`` opts out.
What each task ran with is kept in ``eval_run.json`` beside the results.

The model is loaded once for all tasks. Each finished task is appended to a part file and merged
into ``eval_results.jsonl`` as ``{"key", "dataset", "metrics": {..., "main_metric"}}`` (DataComp's
row); a rerun skips tasks already there and never writes a task twice; a torn last line (a run
killed while writing) is dropped with a warning and its task evaluated again. A task that fails
(missing data, an empty shard) is recorded in ``eval_errors.json`` and the others still run. On
SLURM, tasks can be spread over array tasks.
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
from conceptprune.slurm.stage import Executor, Stage

from . import bootstrap as BS
from . import metrics as M
from .tasks import BY_KEY, Task, select

log = logging.getLogger(__name__)
RESULTS = "eval_results.jsonl"


class EvaluationError(ConceptPruneError):
    pass


# -- the model ---------------------------------------------------------------------------------


OPENCLIP = "openclip:"


def resolve_openclip(spec: str) -> tuple[str, str, str]:
    """``ARCH/PRETRAINED`` -> (arch, pretrained tag, local weights file) through open_clip's own
    pretrained registry and its Hugging Face Hub download (the Hub's cache: HF_HOME / HF_HUB_CACHE).
    Offline (HF_HUB_OFFLINE=1, or no network) only cached weights resolve."""
    import os

    from open_clip import pretrained as P

    arch, _, tag = spec.partition("/")
    if not arch or not tag:
        raise ConfigError(f"--model {OPENCLIP}{spec}: write {OPENCLIP}ARCH/PRETRAINED, e.g. "
                          f"{OPENCLIP}ViT-B-32/commonpool_m_clip_s128m_b4k")
    cfg = P.get_pretrained_cfg(arch, tag)
    if not cfg:
        tags = P.list_pretrained_tags_by_model(arch)
        raise ConfigError(f"--model {OPENCLIP}{spec}: open_clip has no pretrained weights {tag!r} for {arch!r}"
                          + (f" (it has: {', '.join(tags[:8])}{', ...' if len(tags) > 8 else ''})" if tags
                             else " (unknown architecture)"))
    try:
        path = P.download_pretrained(cfg)
    except Exception as e:  # huggingface_hub's offline and network errors vary
        from huggingface_hub import constants

        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0") or constants.HF_HUB_OFFLINE
        raise EvaluationError(f"--model {OPENCLIP}{spec}: the weights ({cfg.get('hf_hub') or cfg.get('url')}) are not in "
                              f"the Hugging Face cache {constants.HF_HUB_CACHE} and "
                              + ("HF_HUB_OFFLINE is set" if offline else "could not be downloaded")
                              + f": {(str(e).strip().splitlines() or [type(e).__name__])[0][:200]}") from None
    if not path or not Path(path).is_file():
        raise EvaluationError(f"--model {OPENCLIP}{spec}: open_clip resolved no weights file ({path!r})")
    return arch, tag, str(path)


def resolve_model(model: str, arch: str | None) -> tuple[str, str]:
    """(architecture, checkpoint) from a run folder (its run.json), a checkpoint file or
    ``openclip:ARCH/PRETRAINED`` (the checkpoint is then open_clip's pretrained tag)."""
    if model.startswith(OPENCLIP):
        a, tag, _ = resolve_openclip(model[len(OPENCLIP):])
        if arch and arch != a:
            raise ConfigError(f"--arch {arch} contradicts --model {model} (its architecture is {a})")
        return a, tag
    p = Path(model)
    if p.is_dir():
        run = p / "run.json"
        if not run.exists():
            raise ConfigError(f"--model {p}: a folder must be a training run (no run.json)")
        try:
            rec = json.loads(run.read_text())
            if not isinstance(rec, dict) or not isinstance(rec.get("recipe"), dict):
                raise ValueError("not a run record")
        except (ValueError, UnicodeDecodeError) as e:
            raise ConfigError(f"{run}: not a training run's record ({e})") from None
        ckpt = rec.get("final_checkpoint")
        if not ckpt or not Path(ckpt).exists():
            raise ConfigError(f"--model {p}: the run has no final checkpoint (status {rec.get('status')})")
        return arch or rec["recipe"]["model"], ckpt
    if not p.exists():
        raise ConfigError(f"--model {p}: not found")
    return arch or "ViT-B-32", str(p)


def load_model(arch: str, checkpoint: str | None, device: str):
    import open_clip

    from conceptprune.models import register

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


def wds_samples(d: Path, *extensions: str):
    """Decoded samples of a wds test split: tuples of the given extensions (first: image)."""
    import webdataset as wds

    n = int((d / "test" / "nshards.txt").read_text().strip())
    pattern = str(d / "test" / ("{0..%d}.tar" % (n - 1) if n > 1 else "0.tar"))
    ds = wds.WebDataset(pattern, shardshuffle=False, nodesplitter=lambda src: src)
    return ds.decode(wds.autodecode.ImageHandler("pil", extensions=["webp", "png", "jpg", "jpeg"])).to_tuple(
        "webp;png;jpg;jpeg", *extensions)


# -- one task ----------------------------------------------------------------------------------

PRECISIONS = ("amp", "fp32")
# the parts DataComp runs under fp16 autocast on CUDA (clip_benchmark's amp=True default and
# wino_eval's torch.cuda.amp.autocast); everything else, and everything on CPU, is fp32
AUTOCAST_PARTS = {
    "zeroshot_classification": "zero-shot classifier (text tower); images fp32",
    "wilds": "zero-shot classifier (text tower); images fp32",
    "fairness": "zero-shot classifier(s) (text tower); images fp32",
    "retrieval": "image and text towers and the similarities",
    "winogavil": "image and text towers and the similarities",
}


@dataclass
class Evaluator:
    arch: str
    checkpoint: str | None
    data_dir: str
    batch_size: int = 64
    device: str = "auto"
    workers: int = 1  # data-loading processes (0 or 1)
    precision: str = "amp"  # DataComp's autocast choices on CUDA; "fp32" everywhere else or on request
    _model: tuple | None = field(default=None, repr=False)
    _outcome: dict | None = field(default=None, repr=False)  # the last task's per-example outcomes
    _sha256: str | None = field(default=None, repr=False)

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ConfigError(f"--precision must be one of {', '.join(PRECISIONS)} (got {self.precision!r})")
        if self.device != "auto":
            import torch

            try:
                torch.device(self.device)
            except (RuntimeError, ValueError):
                raise ConfigError(f"--device {self.device!r}: not a torch device (auto, cpu, cuda, cuda:1, ...)") \
                    from None

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    @property
    def amp(self) -> bool:
        """fp16 autocast where DataComp uses it: only with --precision amp on a CUDA device."""
        return self.precision == "amp" and self.resolved_device().startswith("cuda")

    def precision_record(self, task: Task) -> dict:
        return {"precision": self.precision, "device": self.resolved_device(),
                "fp16_autocast": AUTOCAST_PARTS.get(task.type) if self.amp else None}

    def __getstate__(self) -> dict:
        """A job gets the recipe, never the loaded weights (each job loads the model itself)."""
        return {**self.__dict__, "_model": None, "_outcome": None}

    def checkpoint_sha256(self) -> str | None:
        """The checkpoint file's sha256 (computed once), recorded with the per-example outcomes
        (an open_clip pretrained tag: the weights file it resolves to in the Hugging Face cache)."""
        if self._sha256 is None and self.checkpoint:
            from conceptprune.atomic import file_digest

            path = self.checkpoint
            if not Path(path).is_file():
                path = resolve_openclip(f"{self.arch}/{self.checkpoint}")[2]
            self._sha256 = file_digest(path)
        return self._sha256

    def take_outcome(self) -> dict:
        """The per-example outcomes of the task just run (see bootstrap), then forgotten."""
        out, self._outcome = self._outcome or {}, None
        return out

    def model(self):
        if self._model is None:
            device = self.resolved_device()
            self._model = (*load_model(self.arch, self.checkpoint, device), device)
        return self._model

    def loader(self, dataset):
        import torch

        return torch.utils.data.DataLoader(dataset.batched(self.batch_size), batch_size=None,
                                           num_workers=min(self.workers, 1))

    def run(self, task: Task) -> dict:
        d = task_dir(self.data_dir, task)
        self._outcome = None
        fn = {"zeroshot_classification": self._classification, "retrieval": self._retrieval,
              "wilds": self._wilds, "fairness": self._fairness, "winogavil": self._winogavil}[task.type]
        metrics = fn(task, d)
        # DataComp: metrics.get(main_metric, defaulting to acc1); FairFace/UTKFace have no main metric
        metrics["main_metric"] = metrics.get(task.main_metric) if task.main_metric else None
        return {"key": task.key, "dataset": task.name, "metrics": _clean(metrics)}

    # -- zero-shot classification (DataComp's evaluate_webdataset) --------------------------------

    def classifier(self, classnames: list[str], templates: list[str]):
        from clip_benchmark.metrics.zeroshot_classification import zero_shot_classifier

        model, _, tokenizer, device = self.model()
        return zero_shot_classifier(model, tokenizer, classnames, templates, device, amp=self.amp)

    def predict(self, task: Task, d: Path, classifier, members: tuple[str, ...]) -> tuple:
        """100 * normalized image features @ classifier (fp32, as clip_benchmark's run_classification
        with amp=False) for every sample, with the requested members (``cls``, ``npy``) stacked.
        A 3-d classifier (objectives x dim x classes) gives (N, objectives, classes) logits."""
        import torch

        model, preprocess, _, device = self.model()
        ds = wds_samples(d, *members).map_tuple(preprocess, *([None] * len(members)))
        logits, extra = [], [[] for _ in members]
        with torch.no_grad():
            for images, *values in self.loader(ds):
                feats = torch.nn.functional.normalize(model.encode_image(images.to(device)), dim=-1)
                if classifier.dim() == 3:
                    out = 100.0 * torch.einsum("bf,mfc->bmc", feats, classifier)
                else:
                    out = 100.0 * feats @ classifier
                logits.append(out.float().cpu())
                for acc, v in zip(extra, values):
                    acc.append(torch.as_tensor(np.asarray(v)))
        if not logits:
            raise EvaluationError(f"{task.key}: no samples in {d / 'test'}")
        return (torch.cat(logits), *[torch.cat(v) for v in extra])

    def _classes(self, task: Task, d: Path) -> tuple[list[str], list[str]]:
        classes, templates = _clip_benchmark_lines(d / "classnames.txt"), _clip_benchmark_lines(
            d / "zeroshot_classification_templates.txt")
        if not classes or not templates:
            raise EvaluationError(f"{task.key}: classnames.txt or zeroshot_classification_templates.txt missing "
                                  f"or empty in {d}")
        return classes, templates

    def _classify(self, task: Task, d: Path, members=("cls",)) -> tuple:
        """(DataComp's classification metrics, logits, labels, *other members)."""
        classes, templates = self._classes(task, d)
        logits, target, *rest = self.predict(task, d, self.classifier(classes, templates), members)
        target = target.long()
        return (M.classification_metrics(logits, target, len(classes)), logits, target, *rest)

    def _classification(self, task: Task, d: Path) -> dict:
        metrics, logits, target = self._classify(task, d)
        self._outcome = {"pred": logits.argmax(1).numpy(), "target": target.numpy()}
        return metrics

    def _wilds(self, task: Task, d: Path) -> dict:
        metrics, logits, target, meta = self._classify(task, d, ("cls", "npy"))
        pred = logits.argmax(1).numpy()
        self._outcome = {"pred": pred, "target": target.numpy(), "correct": pred == target.numpy(),
                         "group": meta.numpy()[:, 0]}  # FMoW: region (DataComp's first npy column)
        if task.key not in M.FIELDS:  # your own WILDS-like task: accuracy by each metadata column
            return {**metrics, **_custom_groups(task, logits.argmax(1).numpy() == target.numpy(), meta.numpy())}
        metrics.update(M.wilds_metrics(task.key, logits.argmax(1).numpy(), target.numpy(), meta.numpy()))
        return metrics

    def _fairness(self, task: Task, d: Path) -> dict:
        if task.key in ("fairness/fairface", "fairness/utkface"):
            return self._fairface(task, d)
        metrics, logits, target, meta = self._classify(task, d, ("cls", "npy"))
        pred = logits.argmax(1).numpy()
        self._outcome = {"pred": pred, "target": target.numpy(), "correct": pred == target.numpy(),
                         "group": meta.numpy()[:, 0]}  # GeoDE: region; Dollar Street: income_ds
        if task.key == "fairness/dollar_street":
            top5 = M.topk_predictions(logits, 5)
            self._outcome["correct"] = (top5 == target.numpy()[:, None]).any(axis=1)
            metrics.update(M.dollar_street_metrics(top5, target.numpy(), meta.numpy()))
        elif task.key == "fairness/geode":
            metrics.update(M.geode_metrics(logits.argmax(1).numpy(), target.numpy(), meta.numpy()))
        else:
            metrics.update(_custom_groups(task, logits.argmax(1).numpy() == target.numpy(), meta.numpy()))
        return metrics

    def _fairface(self, task: Task, d: Path) -> dict:
        """DataComp's evaluate_fairface_dataset: one zero-shot classifier per objective (class names
        and templates prefixed ``race:``, ``gender:``, ``age:``, ``toxic:``), labels from ``npy``."""
        import torch

        classes, templates = self._classes(task, d)
        per = M.split_objectives(classes, templates, str(d))
        clfs = [self.classifier(per[o]["classnames"], per[o]["templates"]) for o in M.FAIRFACE_OBJECTIVES]
        n_classes = [c.shape[1] for c in clfs]
        stacked = torch.zeros((len(clfs), clfs[0].shape[0], max(n_classes)), dtype=clfs[0].dtype,
                              device=clfs[0].device)
        for i, c in enumerate(clfs):
            stacked[i, :, : n_classes[i]] = c
        logits, meta = self.predict(task, d, stacked, ("npy",))
        pred = M.multilabel_predictions(logits.numpy(), n_classes)
        return M.fairface_metrics(pred, meta.numpy())

    # -- retrieval and WinoGAViL ------------------------------------------------------------------

    def _retrieval(self, task: Task, d: Path) -> dict:
        from clip_benchmark.datasets.builder import build_dataset

        model, preprocess, tokenizer, device = self.model()
        ds = build_dataset(f"wds/{task.folder}", root=str(d), transform=preprocess, split="test", download=False,
                           task="zeroshot_retrieval")
        n = _count_samples(d)
        ks = [k for k in (1, 5, 10) if k <= n]  # DataComp: [1, 5, 10] (clip_benchmark needs k <= images)
        out, hits = _retrieval_hits(model, self.loader(ds), tokenizer, device, self.amp, ks)
        self._outcome = hits
        out["mean_recall@1"] = 0.5 * (out["text_retrieval_recall@1"] + out["image_retrieval_recall@1"])
        if task.key not in BY_KEY:  # your own retrieval task: mean recall at every k (DataComp writes @1 only)
            for k in ks[1:]:
                out[f"mean_recall@{k}"] = 0.5 * (out[f"text_retrieval_recall@{k}"] + out[f"image_retrieval_recall@{k}"])
        return out

    def _winogavil(self, task: Task, d: Path) -> dict:
        """DataComp's wino_eval: per question, the cue as 'A/An <cue>', the top n_assoc candidates by
        cosine similarity (fp16 autocast on CUDA), sklearn's Jaccard with the gold associations."""
        import contextlib
        import io

        import torch
        from PIL import Image

        from conceptprune.tars import iter_samples

        model, preprocess, tokenizer, device = self.model()
        scores, groups = [], []
        n = int((d / "test" / "nshards.txt").read_text().strip())
        for i in range(n):
            for sample in iter_samples(d / "test" / f"{i}.tar"):
                q = json.loads(sample.parts["json"])
                cands = q["candidates"]
                images = torch.stack([preprocess(Image.open(io.BytesIO(_member(sample, c, task))))
                                      for c in cands])
                y_true = np.isin(cands, q["associations"])
                amp = torch.autocast("cuda", dtype=torch.float16) if self.amp else contextlib.nullcontext()
                with torch.no_grad(), amp:
                    img = model.encode_image(images.to(device), normalize=True)
                    txt = model.encode_text(tokenizer([M.clip_prompt(q["cue"])]).to(device), normalize=True)
                    sims = (txt @ img.T).squeeze(0).cpu().numpy()
                scores.append(M.jaccard(y_true, M.winogavil_choice(sims, y_true)))
                groups.append(len(cands))
        if not scores:
            raise EvaluationError(f"{task.key}: no samples in {d / 'test'}")
        self._outcome = {"score": np.asarray(scores), "group": np.asarray(groups)}
        return M.winogavil_metrics(scores, groups)


def _retrieval_hits(model, loader, tokenizer, device: str, amp: bool, ks: list[int]) -> tuple[dict, dict]:
    """clip_benchmark's zeroshot_retrieval.evaluate (the same embedding pass and its own recall_at_k
    and batchify), keeping the per-query hits: (metrics, outcomes). text_hit@K is per image (text
    retrieval: one of its captions in the top K), image_hit@K per caption, caption_image its image."""
    import torch
    import torch.nn.functional as F
    from clip_benchmark.metrics.zeroshot_retrieval import batchify, dataloader_with_indices, recall_at_k

    img_list, txt_list, txt_image = [], [], []
    for images, texts, inds in dataloader_with_indices(loader):
        tok = tokenizer([t for ts in texts for t in ts]).to(device)
        txt_image.extend(int(i) for i, ts in zip(inds, texts) for _ in ts)
        with torch.no_grad(), torch.autocast(device.split(":")[0], enabled=amp):
            img_list.append(F.normalize(model.encode_image(images.to(device)), dim=-1).cpu())
            txt_list.append(F.normalize(model.encode_text(tok), dim=-1).cpu())
    batch_size = len(img_list[0])
    images_emb, texts_emb = torch.cat(img_list), torch.cat(txt_list)
    scores = texts_emb @ images_emb.t()
    positive = torch.zeros_like(scores, dtype=bool)
    positive[torch.arange(len(scores)), txt_image] = True
    metrics, hits = {}, {}
    for k in ks:
        image_hit = batchify(recall_at_k, scores, positive, batch_size, device, k=k) > 0
        text_hit = batchify(recall_at_k, scores.T, positive.T, batch_size, device, k=k) > 0
        metrics[f"image_retrieval_recall@{k}"] = image_hit.float().mean().item()
        metrics[f"text_retrieval_recall@{k}"] = text_hit.float().mean().item()
        hits.update({f"text_hit@{k}": text_hit.numpy(), f"image_hit@{k}": image_hit.numpy()})
    hits["caption_image"] = np.asarray(txt_image)
    return metrics, hits


def _member(sample, candidate: str, task: Task) -> bytes:
    for ext in ("jpg", "jpeg", "png", "webp"):
        if f"{candidate}.{ext}" in sample.parts:
            return sample.parts[f"{candidate}.{ext}"]
    raise EvaluationError(f"{task.key}: sample {sample.key} has no image for candidate {candidate!r}")


def _clip_benchmark_lines(path: Path) -> list[str]:
    """A text file's lines as clip_benchmark reads classnames.txt and the templates."""
    return [line.strip() for line in path.read_text().splitlines()] if path.is_file() else []


def _custom_groups(task: Task, correct: np.ndarray, meta: np.ndarray) -> dict:
    """Your own grouped task: DataComp-style accuracy per value of each named metadata column."""
    fields = [task.metadata.get(i, f"col{i}") for i in range(meta.shape[1])]
    out = {}
    for name in task.metadata.values():
        groups = M.standard_group_eval("acc", correct, meta, fields, [name])
        groups[f"acc_worst_{name}"] = groups.pop("acc_wg")
        out.update(groups)
    return out


def _count_samples(d: Path) -> int:
    from conceptprune.tars import iter_samples

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

RUN_INFO = "eval_run.json"  # per task: the precision, device and autocast it was evaluated with


def _parse_lines(path: Path) -> tuple[list[dict], int | None]:
    """(rows, byte offset where a torn last line starts, or None). A last line that is not JSON
    (a run killed mid-write) is left out; a bad line before the last one is an error."""
    data = path.read_bytes()
    lines = data.split(b"\n")
    rows, offset = [], 0
    for i, line in enumerate(lines, 1):
        start, offset = offset, offset + len(line) + 1
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError("not an object")
        except (ValueError, UnicodeDecodeError):
            if all(not rest.strip() for rest in lines[i:]):
                return rows, start
            raise EvaluationError(f"{path}: line {i} is not a JSON object (only a torn last line is "
                                  "repaired; fix or remove this line)") from None
        rows.append(row)
    return rows, None


def read_results(path: str | Path) -> list[dict]:
    """The rows of a results file; a torn last line is skipped with a warning."""
    path = Path(path)
    if not path.exists():
        return []
    rows, torn = _parse_lines(path)
    if torn is not None:
        log.warning("%s: the last line is incomplete (a run killed while writing it?); it is skipped and "
                    "its task is evaluated again", path)
    return rows


def repair_tail(path: Path) -> None:
    """Cut a torn last line off a file we append to, so the next row starts on a line of its own."""
    if not path.exists():
        return
    _, torn = _parse_lines(path)
    size = path.stat().st_size
    if torn is None and (size == 0 or path.read_bytes()[-1:] == b"\n"):
        return
    cut = torn if torn is not None else size
    log.warning("%s: removing an incomplete last line (%d bytes)", path, size - cut)
    with open(path, "r+b") as f:
        f.truncate(cut)
        if cut and (f.seek(cut - 1), f.read(1))[1] != b"\n":
            f.write(b"\n")
        f.flush()
        os.fsync(f.fileno())


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
        repair_tail(part)
        done = {r["key"] for r in _all_rows(out)}
        ran, failed = [], {}
        for key in self.task_keys[rank::world_size]:
            if key in done:
                continue
            task = select([key], self.evaluator.data_dir)[0]
            try:
                row = self.evaluator.run(task)
                # the outcomes first: a task is done once its row is in the part file
                BS.save(out, task.key, task.main_metric, self.evaluator.take_outcome(),
                        value=row["metrics"]["main_metric"], checkpoint_sha256=self.evaluator.checkpoint_sha256())
            except Exception as e:  # recorded; the other tasks still run
                failed[key] = f"{type(e).__name__}: {e}"
                log.error("%s failed: %s", key, failed[key])
                log.debug("%s", traceback.format_exc())
                continue
            _append(part, {**row, "_run": self.evaluator.precision_record(task)})
            ran.append(key)
            log.info("%s: %s = %s", key, task.main_metric, row["metrics"]["main_metric"])
        return {"ran": ran, "failed": failed}


def _all_rows(out: Path) -> list[dict]:
    rows = read_results(out / RESULTS)
    for p in sorted((out / "parts").glob("*.jsonl")) if (out / "parts").exists() else []:
        rows += read_results(p)
    return rows


def evaluate(model: str, data_dir: str, output: str, *, arch: str | None = None, tasks: list[str] | None = None,
             batch_size: int = 64, device: str = "auto", executor: "Executor | None" = None,
             precision: str = "amp", loader_workers: int = 1) -> dict:
    """Evaluate and merge into OUTPUT/eval_results.jsonl; returns {'results', 'errors', 'model', 'run'}.

    ``precision``: "amp" (default) uses fp16 autocast where DataComp does, on CUDA only (on CPU
    everything is fp32); "fp32" never autocasts. What each task ran with is kept in eval_run.json.
    ``loader_workers``: data-loading processes per task (0 reads in the evaluating process)."""
    executor = Executor.given(executor)
    arch, ckpt = resolve_model(model, arch)
    chosen = select(tasks, data_dir)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    _record_model(out, model, arch, ckpt)
    evaluator = Evaluator(arch, ckpt, str(data_dir), batch_size, device, loader_workers, precision=precision)
    done = {r["key"] for r in _all_rows(out)}
    todo = [t.key for t in chosen if t.key not in done]
    _check_some_data(data_dir, [t for t in chosen if t.key in todo])  # before the model is loaded
    errors = {}
    if todo:
        if executor.in_launcher:
            evaluator.model()  # fail fast on a checkpoint/architecture mismatch, before any task
        # resume is per task, from the results: a stage is named after the tasks still to do
        stage = EvalStage(str(out), evaluator, todo, name=_stage_name(todo))
        res = executor.finish(executor.submit(stage, executor.parts(len(todo))))
        if res is None:  # detached: the same command, rerun later, merges what the jobs wrote
            return {"results": [], "errors": {}, "model": {"arch": arch, "checkpoint": ckpt}, "run": {},
                    "detached": True}
        errors = {k: v for s in res.summaries for k, v in s["failed"].items()}
    else:
        log.info("all %d task(s) already in %s", len(chosen), out / RESULTS)
    rows, run_info = _merge(out)
    write_json(out / "eval_errors.json", errors)
    if errors:
        log.warning("%d task(s) failed: %s (see %s)", len(errors), ", ".join(errors), out / "eval_errors.json")
    return {"results": rows, "errors": errors, "model": {"arch": arch, "checkpoint": ckpt}, "run": run_info}


MODEL_INFO = "eval_model.json"  # the model evaluated: its run folder, for compare's kept and package's scale


def _record_model(out: Path, model, arch, ckpt) -> None:
    p = Path(str(model))
    run = p if (p / "run.json").is_file() else None
    if run is None and ckpt and Path(str(ckpt)).is_file():
        c = Path(str(ckpt)).resolve().parent
        run = next((d for d in (c, c.parent) if (d / "run.json").is_file() or (d / "info.pkl").is_file()), None)
    write_json(out / MODEL_INFO, {"model": str(model), "arch": arch, "checkpoint": str(ckpt) if ckpt else None,
                                  "run": str(run.resolve()) if run is not None else None})


def _check_some_data(data_dir, tasks: list) -> None:
    """A data folder that holds none of the tasks asked is one error before any work, not one
    failure per task after loading the model (some tasks missing: those fail, the others run)."""
    from .layout import locate

    if not tasks:
        return
    if not Path(data_dir).is_dir():
        raise ConfigError(f"--data-dir {data_dir}: folder not found; fetch the evaluation sets with "
                          f"'conceptprune evaluate download --data-dir {data_dir}'")
    if all(locate(data_dir, t)[1] == "missing" for t in tasks):
        raise ConfigError(f"--data-dir {data_dir} holds none of the {len(tasks)} task(s) asked "
                          f"({', '.join(t.key for t in tasks[:3])}{', ...' if len(tasks) > 3 else ''}); fetch them "
                          f"with 'conceptprune evaluate download --data-dir {data_dir}' (--tasks to choose), or "
                          "point --data-dir at DataComp's download folder")


def _tasks_id(keys: list[str]) -> str:
    import hashlib

    return hashlib.sha1("\n".join(keys).encode()).hexdigest()[:10]


def _stage_name(keys: list[str]) -> str:
    """What the stage evaluates: ``evaluate-cifar10`` for one task, ``evaluate-38-tasks-<id>``
    for several (the id keeps task sets apart: a stage resumes its own tasks)."""
    if len(keys) == 1:
        return "evaluate-" + keys[0].replace("/", "-")
    return f"evaluate-{len(keys)}-tasks-{_tasks_id(keys)}"


def _merge(out: Path) -> tuple[list[dict], dict]:
    """One row per task, in the registry's order, into eval_results.jsonl (atomically; a torn last
    line is dropped); each new row's precision record into eval_run.json."""
    from .tasks import TASKS

    by_key = {}  # DataComp's tasks in the registry's order, then your own
    run_path = out / RUN_INFO
    run_info = json.loads(run_path.read_text()) if run_path.exists() else {}
    for r in _all_rows(out):
        extra = r.pop("_run", None)
        if r["key"] not in by_key:
            by_key[r["key"]] = r
            if extra is not None:
                run_info[r["key"]] = extra
    order = {t.key: i for i, t in enumerate(TASKS)}
    rows = sorted(by_key.values(), key=lambda r: order.get(r["key"], 10**6))
    with atomic_open(out / RESULTS, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    run_info = {k: run_info[k] for k in sorted(run_info, key=lambda k: order.get(k, 10**6)) if k in by_key}
    write_json(run_path, run_info)
    shutil.rmtree(out / "parts", ignore_errors=True)
    return rows, run_info
