"""DataComp's evaluation suite: 40 tasks, 38 with a main metric (their plain mean is the
"Average" score). Keys, names, types and main metrics are DataComp's.

Data layout (clip_benchmark's "wds"): ``<data_dir>/<folder>/`` with ``classnames.txt``,
``zeroshot_classification_templates.txt`` (classification), ``dataset_type.txt`` =
``retrieval`` (retrieval), ``test/nshards.txt`` and ``test/{0..n-1}.tar`` holding an image
(webp/png/jpg) and a ``cls`` label (or ``txt`` captions) per sample. WILDS and fairness sets
also carry an ``npy`` member per sample with its group metadata; ``groups`` says what each
column means. WinoGAViL: per sample a ``json`` (cue, candidates, associations) and one image
member per candidate.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from conceptprune.errors import ConfigError


@dataclass(frozen=True)
class Task:
    key: str
    name: str
    type: str  # zeroshot_classification | retrieval | winogavil | wilds | fairness
    main_metric: str | None
    groups: tuple = ()  # aggregate tags: imagenet, imagenet_shifts, vtab, retrieval
    source: str = ""  # Hugging Face dataset repo
    size: int | None = None  # test examples
    metadata: dict = field(default_factory=dict)  # npy column -> meaning, for group metrics
    tags: tuple = ()  # DataComp's tasklist.yml tags, verbatim

    @property
    def folder(self) -> str:
        """Our folder name (also the name of a custom task's folder): the key with '/' -> '-'."""
        return self.key.replace("/", "-")

    @property
    def datacomp_folder(self) -> str | None:
        """The folder DataComp's download_evalsets.py writes (``wds_<name>_test``); None for the
        nlphuji sets, which DataComp keeps in ``hf_cache/``."""
        if self.source.startswith("djghosh/"):
            return self.source.split("/", 1)[1]
        return None

    @property
    def is_hf_dataset(self) -> bool:
        """Read by DataComp through Hugging Face ``datasets`` (the three nlphuji sets)."""
        return self.source.startswith("nlphuji/")


def _wds(key: str) -> str:
    """DataComp's download rule: strip ``fairness/``, then '/' -> '-' (download_evalsets.py)."""
    name = key.split("/", 1)[1] if key.startswith("fairness/") else key
    return f"djghosh/wds_{name.replace('/', '-')}_test"


def _cls(key, name, main="acc1", groups=(), size=None, tags=()):
    return Task(key, name, "zeroshot_classification", main, tuple(groups), _wds(key), size, tags=tuple(tags))


_NAT, _SPE, _STR = ("vtab_natural",), ("vtab_specialized",), ("vtab_structured",)

TASKS: list[Task] = [
    _cls("vtab/caltech101", "Caltech-101", "mean_per_class_recall", ["vtab"], 6085, _NAT),
    _cls("cifar10", "CIFAR-10", size=10000),
    _cls("vtab/cifar100", "CIFAR-100", groups=["vtab"], size=10000, tags=_NAT),
    _cls("vtab/clevr_count_all", "CLEVR Counts", groups=["vtab"], size=15000, tags=_STR),
    _cls("vtab/clevr_closest_object_distance", "CLEVR Distance", groups=["vtab"], size=15000, tags=_STR),
    _cls("country211", "Country211", size=21100),
    _cls("vtab/dtd", "Describable Textures", groups=["vtab"], size=1880, tags=_NAT),
    _cls("vtab/eurosat", "EuroSAT", groups=["vtab"], size=5400, tags=_SPE),
    _cls("fgvc_aircraft", "FGVC Aircraft", "mean_per_class_recall", size=3333),
    _cls("food101", "Food-101", size=25250),
    _cls("gtsrb", "GTSRB", size=12630),
    _cls("imagenet1k", "ImageNet 1k", groups=["imagenet"], size=50000),
    _cls("imagenet_sketch", "ImageNet Sketch", groups=["imagenet_shifts"], size=50889),
    _cls("imagenetv2", "ImageNet v2", groups=["imagenet_shifts"], size=10000),
    _cls("imagenet-a", "ImageNet-A", groups=["imagenet_shifts"], size=7500),
    _cls("imagenet-o", "ImageNet-O", groups=["imagenet_shifts"], size=2000),
    _cls("imagenet-r", "ImageNet-R", groups=["imagenet_shifts"], size=30000),
    _cls("vtab/kitti_closest_vehicle_distance", "KITTI Vehicle Distance", groups=["vtab"], size=711, tags=_STR),
    _cls("mnist", "MNIST", size=10000),
    _cls("objectnet", "ObjectNet", groups=["imagenet_shifts"], size=18574),
    _cls("vtab/flowers", "Oxford Flowers-102", "mean_per_class_recall", ["vtab"], 6149, _NAT),
    _cls("vtab/pets", "Oxford-IIIT Pet", "mean_per_class_recall", ["vtab"], 3669, _NAT),
    _cls("voc2007", "Pascal VOC 2007", size=14976),
    _cls("vtab/pcam", "PatchCamelyon", groups=["vtab"], size=32768, tags=_SPE),
    _cls("renderedsst2", "Rendered SST2", size=1821),
    _cls("vtab/resisc45", "RESISC45", groups=["vtab"], size=6300, tags=_SPE),
    _cls("cars", "Stanford Cars", size=8041),
    _cls("stl10", "STL-10", size=8000),
    # DataComp's SUN397 is the full 108,754-image test set under the key "sun397" (no vtab/ prefix),
    # tagged vtab_natural and counted in the VTAB aggregate.
    _cls("sun397", "SUN397", groups=["vtab"], size=108754, tags=_NAT),
    _cls("vtab/svhn", "SVHN", groups=["vtab"], size=26032, tags=_NAT),
    Task("retrieval/flickr_1k_test_image_text_retrieval", "Flickr", "retrieval", "mean_recall@1", ("retrieval",),
         "nlphuji/flickr_1k_test_image_text_retrieval", 1000, tags=("retrieval",)),
    Task("retrieval/mscoco_2014_5k_test_image_text_retrieval", "MSCOCO", "retrieval", "mean_recall@1",
         ("retrieval",), "nlphuji/mscoco_2014_5k_test_image_text_retrieval", 5000, tags=("retrieval",)),
    Task("misc/winogavil", "WinoGAViL", "winogavil", "jaccard_score_10-12", ("retrieval",), "nlphuji/winogavil",
         3563, tags=("retrieval",)),
    Task("wilds/iwildcam", "iWildCam", "wilds", "F1-macro_all", (), _wds("wilds/iwildcam"), 42791,
         {0: "location"}, ("wilds",)),
    Task("wilds/camelyon17", "Camelyon17", "wilds", "acc1", (), _wds("wilds/camelyon17"), 85054, {0: "hospital"},
         ("wilds",)),
    Task("wilds/fmow", "FMoW", "wilds", "acc_worst_region", (), _wds("wilds/fmow"), 22108,
         {0: "region", 1: "year"}, ("wilds",)),
    Task("fairness/dollar_street", "Dollar Street", "fairness", "acc_top5_wg", (), _wds("fairness/dollar_street"),
         3503, {0: "income_group"}, ("fairness",)),
    Task("fairness/geode", "GeoDE", "fairness", "acc_wg", (), _wds("fairness/geode"), 12488, {0: "region"},
         ("fairness",)),
    Task("fairness/fairface", "FairFace", "fairness", None, (), _wds("fairness/fairface"), 10954,
         {0: "age", 1: "gender", 2: "race"}, ("fairness",)),
    Task("fairness/utkface", "UTKFace", "fairness", None, (), _wds("fairness/utkface"), 23703,
         {0: "age", 1: "gender", 2: "race"}, ("fairness",)),
]
BY_KEY = {t.key: t for t in TASKS}
assert len(TASKS) == 40 and sum(t.main_metric is not None for t in TASKS) == 38

# FMoW regions; "Other" is left out of the worst-region accuracy
FMOW_REGIONS = ("Asia", "Europe", "Africa", "Americas", "Oceania", "Other")

AGGREGATES = {
    "ImageNet": lambda t: t.key == "imagenet1k",
    "ImageNet dist. shifts": lambda t: "imagenet_shifts" in t.groups,
    "VTAB": lambda t: "vtab" in t.groups,
    "Retrieval": lambda t: "retrieval" in t.groups,
    "Average": lambda t: t.main_metric is not None,
}


def custom_tasks(data_dir) -> dict[str, Task]:
    """Your own tasks: any folder of ``data_dir`` with a ``task.json`` such as
    ``{"key": "demo/digits", "name": "Digits", "type": "zeroshot_classification", "main_metric": "acc1"}``
    (the folder name must be the key with '/' replaced by '-')."""
    import json
    from pathlib import Path

    found = {}
    if data_dir is None or not Path(data_dir).is_dir():
        return found
    for spec in sorted(Path(data_dir).glob("*/task.json")):
        d = json.loads(spec.read_text())
        t = Task(d["key"], d.get("name", d["key"]), d["type"], d.get("main_metric"), tuple(d.get("groups", ())),
                 d.get("source", ""), d.get("size"), {int(k): v for k, v in d.get("metadata", {}).items()})
        if t.folder != spec.parent.name:
            raise ConfigError(f"{spec}: key {t.key!r} must live in a folder named {t.folder!r}")
        found[t.key] = t
    return found


def select(keys: list[str] | None, data_dir=None) -> list[Task]:
    if not keys:
        return list(TASKS)
    known = {**BY_KEY, **custom_tasks(data_dir)}
    unknown = [k for k in keys if k not in known]
    if unknown:
        raise ConfigError(f"unknown task(s) {', '.join(unknown)}; 'conceptprune evaluate --list-tasks' lists them "
                          "(your own tasks need a task.json in their data folder)")
    return [known[k] for k in keys]


def table(data_dir=None) -> str:
    """The 40 tasks: key, name, main metric, source, size; with ``data_dir`` also each one's state there."""
    states = {}
    if data_dir is not None:
        from .layout import locate

        states = {t.key: locate(data_dir, t)[1] for t in TASKS}
    lines = [f"{'key':51s} {'name':23s} {'main metric':22s} {'source':58s} {'examples':>8s}"
             + ("  state" if states else "")]
    for t in TASKS:
        lines.append(f"{t.key:51s} {t.name:23s} {str(t.main_metric):22s} {t.source:58s} {t.size:8d}"
                     + (f"  {states[t.key]}" if states else ""))
    lines.append(f"{len(TASKS)} tasks, {sum(t.main_metric is not None for t in TASKS)} with a main metric")
    if states:
        n = sum(s == "present" for s in states.values())
        lines.append(f"{n} present in {data_dir}")
    return "\n".join(lines)
