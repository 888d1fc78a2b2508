"""Evaluation data: DataComp's task table, the download of the sets (from a loopback Hugging Face
Hub), DataComp's own folder layout, --dry-run / --list-tasks."""

from __future__ import annotations

import pytest

from conceptprune.evaluation.tasks import AGGREGATES, BY_KEY, TASKS

# DataComp's tasklist.yml (mlfoundations/datacomp @ 4a8df19), key -> (name, size, main metric, tags).
# DataComp defaults a missing main_metric to acc1; FairFace and UTKFace write no acc1, so their
# main metric is null in every results file: None here.
DATACOMP = {
    'vtab/caltech101': ('Caltech-101', 6085, 'mean_per_class_recall', ('vtab_natural',)),
    'cifar10': ('CIFAR-10', 10000, 'acc1', ()),
    'vtab/cifar100': ('CIFAR-100', 10000, 'acc1', ('vtab_natural',)),
    'vtab/clevr_count_all': ('CLEVR Counts', 15000, 'acc1', ('vtab_structured',)),
    'vtab/clevr_closest_object_distance': ('CLEVR Distance', 15000, 'acc1', ('vtab_structured',)),
    'country211': ('Country211', 21100, 'acc1', ()),
    'vtab/dtd': ('Describable Textures', 1880, 'acc1', ('vtab_natural',)),
    'vtab/eurosat': ('EuroSAT', 5400, 'acc1', ('vtab_specialized',)),
    'fgvc_aircraft': ('FGVC Aircraft', 3333, 'mean_per_class_recall', ()),
    'food101': ('Food-101', 25250, 'acc1', ()),
    'gtsrb': ('GTSRB', 12630, 'acc1', ()),
    'imagenet1k': ('ImageNet 1k', 50000, 'acc1', ()),
    'imagenet_sketch': ('ImageNet Sketch', 50889, 'acc1', ()),
    'imagenetv2': ('ImageNet v2', 10000, 'acc1', ()),
    'imagenet-a': ('ImageNet-A', 7500, 'acc1', ()),
    'imagenet-o': ('ImageNet-O', 2000, 'acc1', ()),
    'imagenet-r': ('ImageNet-R', 30000, 'acc1', ()),
    'vtab/kitti_closest_vehicle_distance': ('KITTI Vehicle Distance', 711, 'acc1', ('vtab_structured',)),
    'mnist': ('MNIST', 10000, 'acc1', ()),
    'objectnet': ('ObjectNet', 18574, 'acc1', ()),
    'vtab/flowers': ('Oxford Flowers-102', 6149, 'mean_per_class_recall', ('vtab_natural',)),
    'vtab/pets': ('Oxford-IIIT Pet', 3669, 'mean_per_class_recall', ('vtab_natural',)),
    'voc2007': ('Pascal VOC 2007', 14976, 'acc1', ()),
    'vtab/pcam': ('PatchCamelyon', 32768, 'acc1', ('vtab_specialized',)),
    'renderedsst2': ('Rendered SST2', 1821, 'acc1', ()),
    'vtab/resisc45': ('RESISC45', 6300, 'acc1', ('vtab_specialized',)),
    'cars': ('Stanford Cars', 8041, 'acc1', ()),
    'stl10': ('STL-10', 8000, 'acc1', ()),
    'sun397': ('SUN397', 108754, 'acc1', ('vtab_natural',)),
    'vtab/svhn': ('SVHN', 26032, 'acc1', ('vtab_natural',)),
    'retrieval/flickr_1k_test_image_text_retrieval': ('Flickr', 1000, 'mean_recall@1', ('retrieval',)),
    'retrieval/mscoco_2014_5k_test_image_text_retrieval': ('MSCOCO', 5000, 'mean_recall@1', ('retrieval',)),
    'misc/winogavil': ('WinoGAViL', 3563, 'jaccard_score_10-12', ('retrieval',)),
    'wilds/iwildcam': ('iWildCam', 42791, 'F1-macro_all', ('wilds',)),
    'wilds/camelyon17': ('Camelyon17', 85054, 'acc1', ('wilds',)),
    'wilds/fmow': ('FMoW', 22108, 'acc_worst_region', ('wilds',)),
    'fairness/dollar_street': ('Dollar Street', 3503, 'acc_top5_wg', ('fairness',)),
    'fairness/geode': ('GeoDE', 12488, 'acc_wg', ('fairness',)),
    'fairness/fairface': ('FairFace', 10954, None, ('fairness',)),
    'fairness/utkface': ('UTKFace', 23703, None, ('fairness',)),
}
# DataComp's aggregate_scores.py groups (by dataset name)
SHIFTS = {"ImageNet Sketch", "ImageNet v2", "ImageNet-A", "ImageNet-O", "ImageNet-R", "ObjectNet"}
VTAB = {"Caltech-101", "CIFAR-100", "CLEVR Counts", "CLEVR Distance", "Describable Textures", "EuroSAT",
        "KITTI Vehicle Distance", "Oxford Flowers-102", "Oxford-IIIT Pet", "PatchCamelyon", "RESISC45", "SVHN",
        "SUN397"}


# -- the task table ------------------------------------------------------------------------------


def test_task_table_is_datacomps():
    assert [t.key for t in TASKS] == list(DATACOMP)  # same 40 keys, same order
    assert len(TASKS) == 40 and sum(t.main_metric is not None for t in TASKS) == 38
    for t in TASKS:
        assert (t.name, t.size, t.main_metric, t.tags) == DATACOMP[t.key], t.key


def test_sources_follow_datacomps_download_rule():
    sun = BY_KEY["sun397"]
    assert (sun.source, sun.size, sun.type) == ("djghosh/wds_sun397_test", 108754, "zeroshot_classification")
    assert "vtab/sun397" not in BY_KEY
    fair = {k: BY_KEY[k].source for k in DATACOMP if k.startswith("fairness/")}
    assert fair == {"fairness/dollar_street": "djghosh/wds_dollar_street_test",
                    "fairness/geode": "djghosh/wds_geode_test",
                    "fairness/fairface": "djghosh/wds_fairface_test",
                    "fairness/utkface": "djghosh/wds_utkface_test"}
    assert BY_KEY["wilds/fmow"].source == "djghosh/wds_wilds-fmow_test"
    assert BY_KEY["vtab/kitti_closest_vehicle_distance"].datacomp_folder == "wds_vtab-kitti_closest_vehicle_distance_test"
    hf = [t for t in TASKS if t.is_hf_dataset]
    assert [t.source for t in hf] == ["nlphuji/flickr_1k_test_image_text_retrieval",
                                      "nlphuji/mscoco_2014_5k_test_image_text_retrieval", "nlphuji/winogavil"]
    assert all(t.datacomp_folder is None for t in hf)
    assert sum(t.source.startswith("djghosh/wds_") for t in TASKS) == 37


@pytest.mark.parametrize("name, members", [("ImageNet", {"ImageNet 1k"}), ("ImageNet dist. shifts", SHIFTS),
                                           ("VTAB", VTAB), ("Retrieval", {"Flickr", "MSCOCO", "WinoGAViL"})])
def test_aggregates_match_datacomps_groups(name, members):
    assert {t.name for t in TASKS if AGGREGATES[name](t)} == members


def test_average_covers_the_38_main_metrics():
    assert {t.name for t in TASKS if AGGREGATES["Average"](t)} == {
        v[0] for v in DATACOMP.values() if v[2] is not None}
