"""``conceptprune run PIPELINE.toml``: a whole loop (download -> filter chain -> reshard ->
train -> evaluate -> compare) from one file, as one stage graph on one executor.

The file (TOML, or YAML with the same keys)::

    folder = "loop"                    # the pipeline's own folder (markers, pipeline.json);
                                       # default: the file's name without its suffix
    [[step]]
    name = "clip"                      # unique; later steps name it in `after`
    command = "filter"                 # download | embed | filter | reshard | train | evaluate | compare
    method = "clip-score"              # filter only: any filter of the registry
    pool = "pool"                      # the rest: the command's keyword arguments
    out = "work/clip.npy"
    fraction = 0.3

    [[step]]
    name = "reshard"
    command = "reshard"
    after = ["clip"]                   # SLURM: --dependency=afterok on those steps' jobs
    workers = 2                        # local processes the step may use inside its job
    shards = "shards"
    keep = "work/clip.npy"
    out = "work/shards_clip"

    [[step]]
    name = "train"
    command = "train"
    after = ["reshard"]
    data = "work/shards_clip"
    scale = "tiny"
    output = "runs"
    run_name = "clip"                  # the run's name (`name` is the step's)

Relative paths are relative to the file's folder. Each step is a one-part stage (the train
step: the training stage itself when the training layer offers one, so its job has the run's
nodes and tasks); a rerun skips finished steps and, on SLURM, finds the jobs of unfinished
ones instead of submitting them again; ``conceptprune status FOLDER`` shows every step.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from conceptprune.errors import ConfigError
from conceptprune.slurm.pipeline import CallStage, Pipeline
from conceptprune.slurm.stage import Executor

COMMANDS = ("download", "embed", "filter", "reshard", "train", "evaluate", "compare")
# keyword arguments that name files or folders (made absolute against the pipeline file's folder)
PATH_KEYS = {"pool", "out", "within", "shards", "keep", "data_dir", "output", "model", "metadata_dir",
             "blur_metadata", "clustering", "embedding_dir", "data", "paths", "target", "lid_model", "synsets"}
STEP_KEYS = {"name", "command", "method", "after", "workers", "cluster"}


@dataclass(frozen=True)
class PipelineConfig:
    path: Path  # the file
    folder: Path  # the pipeline's folder
    steps: tuple[dict, ...]


def load(path: str | Path) -> PipelineConfig:
    """Read and check a pipeline file (one-line errors naming the file and the step)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"pipeline file {path} not found")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".toml":
            import tomllib

            doc = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            import yaml

            doc = yaml.safe_load(text)
        else:
            raise ConfigError(f"{path}: a pipeline file is .toml, .yaml or .yml")
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(f"{path}: not a valid {path.suffix[1:]} file ({str(e).splitlines()[0]})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("step"), list) or not doc["step"]:
        raise ConfigError(f"{path}: no steps (a pipeline file holds [[step]] tables)")
    unknown = set(doc) - {"folder", "step"}
    if unknown:
        raise ConfigError(f"{path}: unknown top-level key {sorted(unknown)[0]!r} (folder, step)")
    base = path.parent.resolve()
    steps = []
    for i, raw in enumerate(doc["step"]):
        where = f"{path}: step {i + 1}"
        if not isinstance(raw, dict) or not raw.get("name") or not isinstance(raw["name"], str):
            raise ConfigError(f"{where}: every step needs a name")
        if raw.get("command") not in COMMANDS:
            raise ConfigError(f"{where} ({raw['name']}): command must be one of {', '.join(COMMANDS)}, "
                              f"not {raw.get('command')!r}")
        after = raw.get("after", [])
        if isinstance(after, str):
            after = [after]
        workers = raw.get("workers", 1)
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ConfigError(f"{where} ({raw['name']}): workers must be an integer >= 1, not {workers!r}")
        cluster = raw.get("cluster", {})
        if not isinstance(cluster, dict):
            raise ConfigError(f"{where} ({raw['name']}): cluster is a table of cluster options "
                              "(partition, nodes, gpus_per_node, cpus_per_task, mem, time, ...)")
        args = {k.replace("-", "_"): _absolute(k.replace("-", "_"), v, base) for k, v in raw.items()
                if k not in STEP_KEYS}
        steps.append({"name": raw["name"], "command": raw["command"], "method": raw.get("method"),
                      "after": list(after), "workers": workers, "args": args, "cluster": cluster})
    folder = base / doc.get("folder", path.stem)
    return PipelineConfig(path, folder, tuple(steps))


def _absolute(key: str, value: Any, base: Path) -> Any:
    if key not in PATH_KEYS or value is None:
        return value
    if isinstance(value, list):
        return [_absolute(key, v, base) for v in value]
    if isinstance(value, str) and not value.startswith(("http://", "https://", "openclip:", "file://")):
        return str((base / value).resolve()) if not Path(value).is_absolute() else value
    return value


def build(cfg: PipelineConfig, executor: Executor | None = None) -> Pipeline:
    """The pipeline's stages, each after the steps it names."""
    executor = Executor.given(executor) if executor is not None else Executor.create("inline")
    pipe = Pipeline(cfg.folder)
    for s in cfg.steps:
        own = _step_executor(cfg, s, executor)
        if s["command"] == "train":  # the step's job submits the training's own job (own options) and waits
            pipe.add(s["name"], _train_stage(cfg, s, dict(s["args"]), own.replace(detach=False)), after=s["after"])
        else:
            pipe.add(s["name"], _stage(cfg, s), after=s["after"], executor=own if s["cluster"] else None)
    return pipe


def _step_executor(cfg: PipelineConfig, s: dict, executor: Executor) -> Executor:
    """The pipeline's executor with the step's own cluster options (``cluster = {...}``)."""
    if not s["cluster"]:
        return executor
    from conceptprune.slurm.options import ClusterOptions

    known = {f.name for f in dataclasses.fields(ClusterOptions)}
    unknown = sorted(set(s["cluster"]) - known)
    if unknown:
        raise ConfigError(f"{cfg.path}: step {s['name']}: unknown cluster option {unknown[0]!r}")
    return executor.replace(options=dataclasses.replace(executor.options, **s["cluster"]))


def _call(cfg: PipelineConfig, s: dict, target: str, kwargs: dict, executor_keyword: str | None = "executor"):
    return CallStage(str(cfg.folder / "steps" / s["name"]), target, kwargs, name=s["name"], workers=s["workers"],
                     executor_keyword=executor_keyword)


def _stage(cfg: PipelineConfig, s: dict):
    args, where = dict(s["args"]), f"{cfg.path}: step {s['name']}"
    try:
        if s["command"] == "filter":
            return _filter_stage(cfg, s, args)
        if s["command"] == "embed":
            from conceptprune.data.embed import EmbedConfig

            return _call(cfg, s, "conceptprune.data.embed:embed", {"cfg": EmbedConfig(**args)})
        if s["command"] == "compare":
            if "paths" not in args:
                raise ConfigError("compare needs paths (the results files or run folders)")
            return _call(cfg, s, "conceptprune.evaluation.compare:compare", args, executor_keyword=None)
        target = {"download": "conceptprune.data.download:download", "reshard": "conceptprune.data.reshard:reshard",
                  "evaluate": "conceptprune.evaluation.run:evaluate"}[s["command"]]
        return _call(cfg, s, target, args)
    except TypeError as e:  # a typed config given a key it does not have
        raise ConfigError(f"{where}: {e}") from None
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def _filter_stage(cfg: PipelineConfig, s: dict, args: dict) -> CallStage:
    from conceptprune.filters import registry
    from conceptprune.filters.clustering_config import ClusteringConfig

    if not s["method"]:
        raise ConfigError("a filter step needs method (e.g. clip-score, dbp)")
    spec = registry.get(s["method"])
    if spec.fn is None:
        raise ConfigError(f"{s['method']} is a tool, not a filter")
    common = {k: args.pop(k) for k in ("pool", "out", "within", "allow_empty") if k in args}
    if "pool" not in common or "out" not in common:
        raise ConfigError("a filter step needs pool and out")
    if spec.embeddings:
        args.setdefault("embedding_key", "l14_img")  # the CLI's default
    if spec.clustering:
        names = {f.name for f in dataclasses.fields(ClusteringConfig)} - {p.name for p in spec.params}
        given = {k: args.pop(k) for k in list(args) if k in names or k == "clustering"}
        if "clustering" in given:
            given["dir"] = given.pop("clustering")
        args["clustering"] = ClusteringConfig(**given)
    kwargs = {"fn": spec.fn, **common, **spec.params_from(args)}
    return _call(cfg, s, "conceptprune.filters.base:run_filter", kwargs,
                 executor_keyword="executor" if spec.jobs else None)


def _train_stage(cfg: PipelineConfig, s: dict, args: dict, executor: Executor) -> CallStage:
    """A one-part step whose job runs ``train`` with ``executor`` (the step's cluster options):
    on SLURM it submits the training's own job (nodes x GPUs) once the data exists, and waits."""
    from conceptprune.training import launch

    if "data" in args and isinstance(args["data"], str):
        args["data"] = [args["data"]]
    if "run_name" in args:  # (`name` is the step's own)
        args["name"] = args.pop("run_name")
    try:
        tc = launch.TrainConfig(**args)
    except TypeError as e:
        raise ConfigError(f"{cfg.path}: step {s['name']}: {e}") from None
    stage = _call(cfg, s, "conceptprune.training.launch:train", {"cfg": tc})
    stage.executor = executor
    return stage


def run_pipeline(path: str | Path, executor: Executor | None = None, *, dry_run: bool = False) -> dict | None:
    """Build the pipeline of a file and run it on ``executor``; per step, its summary (None when
    the executor detached: the same call, rerun, collects)."""
    cfg = load(path)
    executor = Executor.given(executor)
    pipe = build(cfg, executor)
    if dry_run:
        return pipe.describe()
    results = pipe.run(executor)
    if results is None:
        return None
    return {name: (r.summaries[0] if r.summaries else None) for name, r in results.items()}
