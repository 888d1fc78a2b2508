"""What a cluster filter (SemDeDup, SSL prototypes, DBP, image-based on our engine) asks of its
clustering: one typed value, built by keyword, with every default written once, here.

Light on purpose (no numpy, no faiss): the CLI reads these defaults while it builds its parser.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

from conceptprune.checks import check_int, check_optional, check_seed
from conceptprune.errors import ConfigError

DEFAULT_CLUSTERS = 100  # k of dbp, ssl-prototypes and image-based (SemDeDup: candidates / SEMDEDUP_CLUSTER_SIZE)
SEMDEDUP_CLUSTER_SIZE = 10_000  # the SemDeDup paper's ~9k examples a cluster
DEFAULT_SEED = 1234  # the reference code's
DEFAULT_NITER = 100
KMEANS_MEMORY = "8G"  # default budget of the k-means training sample (float32 rows)
POINTS_PER_CENTROID = 64  # the default sample's minimum per centroid (faiss warns below 39)


@dataclass(frozen=True)
class ClusteringConfig:
    """None means: the value an existing clustering in ``dir`` holds, else the default above.
    The numbers are checked when the value is built (0 never means "default")."""

    clusters: int | None = None  # k
    dir: str | os.PathLike | None = None  # default: KEEP.clustering/ beside --out, else a cache folder
    seed: int | None = None  # k-means and sampling seed
    niter: int | None = None  # k-means iterations
    train_sample: int | None = None  # default: see resolved_sample
    kmeans_memory: int | str = KMEANS_MEMORY  # bytes (or '8G', '512M') the default sample may take as float32
    gpu: str = "auto"  # faiss on GPU: auto, yes, no

    def __post_init__(self):
        for name in ("clusters", "niter", "train_sample"):
            object.__setattr__(self, name, check_optional(check_int, f"--{name.replace('_', '-')}",
                                                          getattr(self, name), min=1))
        object.__setattr__(self, "seed", check_optional(check_seed, "--seed", self.seed))
        object.__setattr__(self, "kmeans_memory", parse_bytes(self.kmeans_memory))
        if self.gpu not in ("auto", "yes", "no"):
            raise ConfigError(f"--gpu must be auto, yes or no, not {self.gpu!r}")

    def filled(self, default_k: int = DEFAULT_CLUSTERS) -> "ClusteringConfig":
        """What to train: every None replaced by its default."""
        return replace(self, clusters=self.clusters or default_k,
                       seed=DEFAULT_SEED if self.seed is None else self.seed, niter=self.niter or DEFAULT_NITER)

    def resolved_sample(self, candidates: int, dim: int) -> int:
        """--train-sample if given; else min(candidates, max(min(1000 k, 500k), 64 k), budget / (4 dim)):
        DataComp-sized defaults for small k, 64 points a centroid for large k (faiss warns
        below 39), and never more float32 rows than --kmeans-memory holds. On a filled config."""
        k = self.clusters
        if self.train_sample is not None:
            if self.train_sample < k:
                raise ConfigError(f"--train-sample {self.train_sample} is smaller than --clusters {k}")
            return min(self.train_sample, candidates)
        cap = self.kmeans_memory // (4 * dim)
        if cap < k:
            raise ConfigError(f"--kmeans-memory {format_bytes(self.kmeans_memory)} holds {cap} float32 rows of "
                              f"dim {dim}, fewer than --clusters {k}")
        return min(candidates, max(min(1000 * k, 500_000), POINTS_PER_CENTROID * k), cap)


def format_bytes(n: int) -> str:
    return f"{n / 2**30:g} GiB" if n >= 2**30 else f"{n / 2**20:g} MiB"


def parse_bytes(text: str | int) -> int:
    """'8G', '512M', '1.5GiB' or a plain byte count -> bytes (binary units)."""
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    t = str(text).strip().upper().removesuffix("IB").removesuffix("B")
    scale = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}.get(t[-1:], 1)
    try:
        value = float(t[:-1] if scale > 1 else t)
    except ValueError:
        value = -1
    if not value > 0:
        raise ConfigError(f"--kmeans-memory: expected a size such as 8G or 512M, got {text!r}")
    return int(value * scale)
