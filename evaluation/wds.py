"""Writing evaluation sets in clip_benchmark's "wds" layout (for your own tasks, the demo and
the tests): ``classnames.txt``, ``zeroshot_classification_templates.txt`` or
``dataset_type.txt``, ``test/nshards.txt`` and ``test/{i}.tar``."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np

from conceptprune.tars import Sample, ShardWriter


def _jpg(image) -> bytes:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _png(image) -> bytes:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="PNG")
    return buf.getvalue()


def _webp(image) -> bytes:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="WEBP", lossless=True)
    return buf.getvalue()


def _npy(arr) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.asarray(arr))
    return buf.getvalue()


def _write(root: Path, samples: list[Sample], nshards: int) -> None:
    (root / "test").mkdir(parents=True, exist_ok=True)
    parts = np.array_split(np.arange(len(samples)), max(1, min(nshards, len(samples))))
    for i, idx in enumerate(parts):
        w = ShardWriter(root / "test" / f"{i}.tar")
        for j in idx:
            w.write(samples[j])
        w.close()
    (root / "test" / "nshards.txt").write_text(f"{len(parts)}\n")


def write_classification(root: str | Path, images, labels, classnames: list[str], templates: list[str], *,
                         metadata=None, nshards: int = 2, image_format: str = "jpg") -> Path:
    """Images with integer labels (a ``cls`` member; ``labels=None`` writes none, as DataComp's
    FairFace/UTKFace sets) and optional per-sample metadata rows (an int64 ``npy`` member, as
    DataComp's WILDS and fairness sets)."""
    root = Path(root)
    encode = {"jpg": _jpg, "png": _png, "webp": _webp}[image_format]
    samples = []
    for i, im in enumerate(images):
        parts = {image_format: encode(im)}
        if labels is not None:
            parts["cls"] = str(int(labels[i])).encode()
        if metadata is not None:
            parts["npy"] = _npy(np.asarray(metadata[i], dtype=np.int64))
        samples.append(Sample(f"s{i:07d}", parts))
    _write(root, samples, nshards)
    (root / "classnames.txt").write_text("\n".join(classnames) + "\n")
    (root / "zeroshot_classification_templates.txt").write_text("\n".join(templates) + "\n")
    return root


def write_retrieval(root: str | Path, images, captions: list[list[str]], nshards: int = 1) -> Path:
    root = Path(root)
    samples = [Sample(f"s{i:07d}", {"jpg": _jpg(im), "txt": "\n".join(c).encode()})
               for i, (im, c) in enumerate(zip(images, captions))]
    _write(root, samples, nshards)
    (root / "dataset_type.txt").write_text("retrieval\n")
    return root


def write_winogavil(root: str | Path, items: list[dict], nshards: int = 1) -> Path:
    """items: {"cue": str, "candidates": {name: image}, "associations": [names]}."""
    root = Path(root)
    samples = []
    for i, it in enumerate(items):
        parts = {"json": json.dumps({"cue": it["cue"], "candidates": list(it["candidates"]),
                                     "associations": list(it["associations"])}).encode()}
        for name, im in it["candidates"].items():
            parts[f"{name}.jpg"] = _jpg(im)
        samples.append(Sample(f"q{i:06d}", parts))
    _write(root, samples, nshards)
    (root / "dataset_type.txt").write_text("winogavil\n")
    return root
