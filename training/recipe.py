"""DataComp's training recipe per scale (and ``tiny``, a CPU-sized one for tests and the demo).

All scales are ViT CLIPs with OpenCLIP's defaults otherwise (AdamW, beta2 0.98, weight decay
0.2, cosine schedule). ``--train-num-samples`` = samples seen / checkpoints and ``--epochs``
= checkpoints, so the recipe's samples are seen whatever the size of the filtered pool
(sampling with replacement, ``--dataset-resampled``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from conceptprune.errors import ConfigError


@dataclass(frozen=True)
class Recipe:
    scale: str
    model: str
    global_batch: int
    lr: float
    samples_seen: int
    warmup: int
    checkpoints: int = 8
    beta2: float = 0.98
    wd: float = 0.2
    precision: str = "amp"
    grad_checkpointing: bool = True
    workers: int = 4
    extra_flags: tuple = ("--local-loss", "--gather-with-grad", "--ddp-static-graph")

    @property
    def train_num_samples(self) -> int:
        return self.samples_seen // self.checkpoints

    def as_dict(self) -> dict:
        d = asdict(self)
        d["extra_flags"] = list(self.extra_flags)
        d["train_num_samples"] = self.train_num_samples
        return d


RECIPES = {
    "tiny": Recipe("tiny", "cp-tiny-vit", 64, 2e-3, 4096, 4, checkpoints=2, precision="fp32",
                   grad_checkpointing=False, workers=1, extra_flags=()),
    "small": Recipe("small", "ViT-B-32", 4096, 5e-4, 12_800_000, 500),
    "medium": Recipe("medium", "ViT-B-32", 4096, 5e-4, 128_000_000, 500),
    "large": Recipe("large", "ViT-B-16", 8192, 5e-4, 1_280_000_000, 500),
    # amp_bfloat16 at xlarge, as DataComp's slurm_train.sh ("amp results in a significant performance drop")
    "xlarge": Recipe("xlarge", "ViT-L-14", 90112, 1e-3, 12_800_000_000, 10000, beta2=0.95, precision="amp_bfloat16"),
}


def recipe(scale: str, **overrides) -> Recipe:
    if scale not in RECIPES:
        raise ConfigError(f"--scale must be one of {', '.join(RECIPES)}")
    r = RECIPES[scale]
    r = Recipe(**{**asdict(r), **{k: v for k, v in overrides.items() if v is not None}})
    if r.checkpoints < 1:
        raise ConfigError(f"--checkpoints must be >= 1 (got {r.checkpoints})")
    if r.samples_seen < r.checkpoints:
        raise ConfigError(f"--samples-seen must be >= the number of checkpoints ({r.checkpoints}); "
                          f"got {r.samples_seen}")
    return r


def datacomp_scale_config(r: Recipe) -> dict:
    """The recipe as DataComp's ``scale_configs.py`` writes a scale (``beta2`` None: open_clip's default)."""
    return {"batch_size": r.global_batch, "learning_rate": r.lr, "train_num_samples": r.samples_seen,
            "warmup": r.warmup, "model": r.model, "beta2": None if r.beta2 == 0.98 else r.beta2}


@dataclass
class BatchPlan:
    world_size: int
    per_gpu: int
    accum_freq: int


def batch_plan(global_batch: int, world_size: int, max_per_gpu: int | None = None) -> BatchPlan:
    """Per-GPU batch and gradient accumulation that give exactly the recipe's global batch."""
    if world_size < 1:
        raise ConfigError("world size must be >= 1")
    if global_batch % world_size:
        raise ConfigError(f"a world size of {world_size} does not divide the global batch {global_batch}; "
                          "choose nodes x GPUs that divide it (the recipe's batch is not changed silently)")
    per = global_batch // world_size
    accum = 1
    if max_per_gpu and per > max_per_gpu:
        accum = -(-per // max_per_gpu)
        while per % accum:
            accum += 1
        per //= accum
    return BatchPlan(world_size, per, accum)
