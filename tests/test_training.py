"""conceptprune train: recipe, dry run, bad input, a local tiny run, and (on the localhost
SLURM cluster) a 2-node gloo run and a run requeued mid-way."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conceptprune.errors import ConfigError
from conceptprune.slurm.options import ClusterOptions
from conceptprune.slurm.stage import Executor
from conceptprune.training.launch import TrainConfig, final_checkpoint, train
from conceptprune.training.recipe import batch_plan, recipe
from conftest import write_circle_shards


@pytest.fixture(scope="module")
def tiny_shards(tmp_path_factory):
    """4 shards x 40 samples of 32 px images with captions and uids."""
    return write_circle_shards(tmp_path_factory.mktemp("shards"), 4, 40)


def _load_final(run_dir):
    import open_clip

    from conceptprune.models import register

    register()
    ckpt = final_checkpoint(run_dir)
    model, _, _ = open_clip.create_model_and_transforms("cp-tiny-vit", pretrained=str(ckpt))
    return ckpt, model


def test_recipes_and_batch_plans():
    m = recipe("medium")
    assert (m.model, m.global_batch, m.lr, m.warmup, m.samples_seen, m.checkpoints) == \
        ("ViT-B-32", 4096, 5e-4, 500, 128_000_000, 8)
    assert m.train_num_samples == 16_000_000
    assert recipe("xlarge").beta2 == 0.95 and recipe("large").model == "ViT-B-16"
    assert batch_plan(4096, 16).per_gpu == 256
    p = batch_plan(4096, 8, max_per_gpu=128)
    assert (p.per_gpu, p.accum_freq) == (128, 4)
    with pytest.raises(ConfigError, match="does not divide the global batch 4096"):
        batch_plan(4096, 3)


def test_dry_run_medium_shows_datacomp_recipe(tiny_shards, tmp_path, capsys):
    rec = train(TrainConfig([str(tiny_shards)], "medium", str(tmp_path / "runs")), executor=Executor.plan("slurm", ClusterOptions(nodes=2, gpus_per_node=8, partition="gpu")), dry_run=True)
    out = capsys.readouterr().out
    assert "global batch 4096 = 16 tasks x 256 per GPU" in out and "lr 0.0005" in out and "warmup 500" in out
    assert "128,000,000 samples seen" in out and "ViT-B-32" in out and "partition gpu" in out
    argv = rec["open_clip_argv"]
    for flag in ("--dataset-resampled", "--local-loss", "--gather-with-grad", "--grad-checkpointing",
                 "--ddp-static-graph", "--save-most-recent"):
        assert flag in argv
    assert argv[argv.index("--batch-size") + 1] == "256" and argv[argv.index("--resume") + 1] == "latest"
    assert argv[argv.index("--train-num-samples") + 1] == "16000000" and argv[argv.index("--epochs") + 1] == "8"
    assert argv[argv.index("--precision") + 1] == "amp" and argv[argv.index("--beta2") + 1] == "0.98"
    assert argv[argv.index("--save-frequency") + 1] == "0"  # DataComp keeps the latest checkpoint
    assert not (tmp_path / "runs").exists()  # a dry run writes nothing


def test_dry_run_multi_node_needs_no_slurm_controller(tiny_shards, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch, squeue or sinfo anywhere
    for nodes, gpus in ((2, 8), (4, 4), (1, 8)):
        rec = train(TrainConfig([str(tiny_shards)], "medium", str(tmp_path / "runs")), executor=Executor.plan("auto", ClusterOptions(nodes=nodes, gpus_per_node=gpus)), dry_run=True)
        out = capsys.readouterr().out
        assert rec["world_size"] == nodes * gpus and f"nodes {nodes} x tasks per node {gpus}" in out
        assert "python -m open_clip_train.main --train-data" in out
    assert rec["executor"] == "auto" and not (tmp_path / "runs").exists()


def test_recipe_details_match_datacomps_launcher():
    from conceptprune.training.recipe import datacomp_scale_config

    assert recipe("xlarge").precision == "amp_bfloat16" and recipe("medium").precision == "amp"
    assert datacomp_scale_config(recipe("medium")) == {  # DataComp's scale_configs.py, medium
        "batch_size": 4096, "learning_rate": 5e-4, "train_num_samples": 128_000_000, "warmup": 500,
        "model": "ViT-B-32", "beta2": None}
    assert datacomp_scale_config(recipe("xlarge"))["beta2"] == 0.95
    with pytest.raises(ConfigError, match="--checkpoints must be >= 1"):
        recipe("medium", checkpoints=0)
    with pytest.raises(ConfigError, match="--samples-seen must be >= the number of checkpoints"):
        recipe("medium", samples_seen=-5)


def test_bad_input(tiny_shards, tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        train(TrainConfig([str(tmp_path / "nope")], "tiny", str(tmp_path / "r")), executor=Executor.create("local"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no .tar shards"):
        train(TrainConfig([str(tmp_path / "empty")], "tiny", str(tmp_path / "r")), executor=Executor.create("local"))
    with pytest.raises(ConfigError, match="does not divide the global batch 64"):
        train(TrainConfig([str(tiny_shards)], "tiny", str(tmp_path / "r")), executor=Executor.create("local", ClusterOptions(tasks_per_node=3)))
    with pytest.raises(ConfigError, match="--checkpoints must be >= 1"):
        train(TrainConfig([str(tiny_shards)], "tiny", str(tmp_path / "r"), checkpoints=0), executor=Executor.create("local"))
    with pytest.raises(ConfigError, match="--samples-seen"):
        train(TrainConfig([str(tiny_shards)], "tiny", str(tmp_path / "r"), samples_seen=-5), executor=Executor.create("local"))
    assert not (tmp_path / "r").exists()


def test_local_tiny_run_trains_checkpoints_and_loads(tiny_shards, tmp_path):
    cfg = TrainConfig([str(tiny_shards)], "tiny", str(tmp_path / "runs"), name="t", samples_seen=256, checkpoints=2)
    rec = train(cfg, executor=Executor.create("local"))
    run = tmp_path / "runs" / "t"
    assert rec["status"] == "finished" and Path(rec["final_checkpoint"]) == run / "checkpoints" / "epoch_2.pt"
    ckpt, model = _load_final(run)
    sd = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert sd["epoch"] == 2
    # DataComp's retention: the latest checkpoint (and open_clip's final epoch), not one per epoch
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["epoch_2.pt", "epoch_latest.pt"]
    # info.pkl in DataComp's form, readable without conceptprune (what DataComp's evaluate.py loads)
    code = ("import pickle, sys; i = pickle.load(open(sys.argv[1], 'rb')); "
            "print(repr((sorted(i), type(i['checkpoint']).__name__, str(i['checkpoint']), i['scale'], "
            "i['scale_config'], str(i['data_dir']))))")
    shown = subprocess.run([sys.executable, "-I", "-c", code, str(run / "info.pkl")], capture_output=True, text=True,
                           cwd="/", check=True).stdout
    keys, kind, ckpt_path, scale, config, data_dir = eval(shown)
    assert keys == ["checkpoint", "data_dir", "scale", "scale_config"] and kind == "PosixPath"
    assert ckpt_path == str((run / "checkpoints" / "epoch_latest.pt").resolve()) and Path(ckpt_path).exists()
    assert scale == "tiny" and data_dir == str(tiny_shards.resolve())
    assert config == {"batch_size": 64, "learning_rate": 2e-3, "train_num_samples": 256, "warmup": 4,
                      "model": "cp-tiny-vit", "beta2": None}
    assert rec["data"][0]["shards"] == 4 and rec["world_size"] == 1
    # live progress: the job copies open_clip's steps, rate and loss into progress.json; status shows it
    from conceptprune.slurm.progress import read_progress
    from conceptprune.slurm.status import progress_files

    p = read_progress(run)
    assert (p["done"], p["total"], p["unit"]) == (4, 4, "steps") and p["rate"] > 0 and p["loss"] > 0
    assert p["samples_seen"] == 256 and [f for f, _ in progress_files(tmp_path)] == [str(run)]
    # a finished run is not run again
    before = ckpt.stat().st_mtime
    again = train(cfg, executor=Executor.create("local"))
    assert again["status"] == "finished" and ckpt.stat().st_mtime == before
    # the same folder with another recipe is refused and left alone
    with pytest.raises(ConfigError, match="another recipe"):
        train(TrainConfig([str(tiny_shards)], "tiny", str(tmp_path / "runs"), name="t", samples_seen=512,
                          checkpoints=2), executor=Executor.create("local"))
    assert json.loads((run / "run.json").read_text())["recipe"]["samples_seen"] == 256


def test_progress_from_open_clip_log_lines(tmp_path):
    from conceptprune.slurm.progress import format_progress
    from conceptprune.training.launch import open_clip_progress

    (tmp_path / "out.log").write_text(
        "2026-11-25,10:00:00 | INFO | Start epoch 1\n"
        "2026-11-25,10:00:05 | INFO | Train Epoch: 1 [ 3200/16000 (20%)] Data (t): 0.010 Batch (t): 0.250, "
        "1024.00/s, 1024.00/s/gpu LR: 0.000500 Logit Scale: 14.286 Contrastive_loss: 3.5000 (3.7000) "
        "Loss: 3.5000 (3.7000)\n")
    p = open_clip_progress(tmp_path, samples_seen=64_000, global_batch=256)
    assert p["samples_seen"] == 16_000 + 3_200 and p["done"] == 19_200 // 256 and p["total"] == 250
    assert p["rate"] == 1024.0 and p["loss"] == 3.5 and p["eta_s"] == (64_000 - 19_200) / 1024
    line = format_progress({**p, "updated": 100.0}, now=104.0)
    assert line.startswith("step 75/250 (30%), 1,024 samples/s, loss 3.500, ETA 0m43s") and "4s ago" in line
    assert open_clip_progress(tmp_path / "none", 1, 1) is None


def test_local_two_process_cpu_ddp(tiny_shards, tmp_path):
    rec = train(TrainConfig([str(tiny_shards)], "tiny", str(tmp_path / "runs"), name="ddp", samples_seen=256,
                            checkpoints=1), executor=Executor.create("local", ClusterOptions(tasks_per_node=2)))
    assert rec["status"] == "finished" and rec["world_size"] == 2 and rec["per_gpu_batch"] == 32
    _load_final(tmp_path / "runs" / "ddp")


# -- on the localhost SLURM cluster ------------------------------------------------------------


@pytest.mark.slurm
def test_slurm_two_nodes_gloo(slurm_cluster, tiny_shards, tmp_path):
    rec = train(TrainConfig([str(tiny_shards)], "tiny", str(tmp_path / "runs"), name="n2", samples_seen=256,
                            checkpoints=2), executor=Executor.create("slurm", ClusterOptions(nodes=2, time=15)))
    run = tmp_path / "runs" / "n2"
    assert rec["status"] == "finished" and rec["world_size"] == 2
    log = (run / "out.log").read_text()
    assert "total 2" in log  # open_clip saw a world of two processes
    ckpt, _ = _load_final(run)
    # the same recipe as one local job of two tasks: the same world, so the same weights
    local = train(TrainConfig([str(tiny_shards)], "tiny", str(tmp_path / "local"), name="n2", samples_seen=256,
                              checkpoints=2), executor=Executor.create("local", ClusterOptions(tasks_per_node=2)))
    assert local["status"] == "finished" and local["world_size"] == 2
    ours = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    theirs = torch.load(final_checkpoint(tmp_path / "local" / "n2"), map_location="cpu", weights_only=True)["state_dict"]
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours), "2-node SLURM and 2-task local training differ"


@pytest.mark.slurm
def test_slurm_requeued_run_resumes_from_checkpoint(slurm_cluster, tiny_shards, tmp_path):
    cfg = TrainConfig([str(tiny_shards)], "tiny", str(tmp_path / "runs"), name="rq", samples_seen=4 * 1024,
                      checkpoints=4)
    rec = train(cfg, executor=Executor.create("slurm", ClusterOptions(time=15), detach=True))
    assert rec["status"] == "submitted" and len(rec["job_ids"]) == 1
    job_id = rec["job_ids"][0]
    run = tmp_path / "runs" / "rq"
    t0 = time.time()
    while not (run / "checkpoints" / "epoch_latest.pt").exists() and time.time() - t0 < 180:
        time.sleep(0.2)
    assert (run / "checkpoints" / "epoch_latest.pt").exists()
    subprocess.run(["scontrol", "requeue", job_id], check=True)
    t0 = time.time()
    while time.time() - t0 < 60:  # held ~120 s by SLURM: release it (after slurmd's credential second)
        info = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True).stdout
        if "JobState=PENDING" in info and "BeginTime" in info:
            break
        time.sleep(0.3)
    time.sleep(2)
    subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=True)
    t0 = time.time()
    while json.loads((run / "run.json").read_text()).get("status") != "finished" and time.time() - t0 < 300:
        time.sleep(0.5)
    final = json.loads((run / "run.json").read_text())
    assert final["status"] == "finished"
    starts = [json.loads(line) for line in (run / "starts.jsonl").read_text().splitlines()]
    assert len(starts) == 2 and starts[1]["restart"] == 1
    log = (run / "out.log").read_text()
    assert "resuming checkpoint" in log  # the second start continued from a checkpoint
    sd = torch.load(final_checkpoint(run), map_location="cpu", weights_only=True)
    steps_per_epoch = 1024 // 64
    assert sd["epoch"] == 4
    assert all(s["step"] == 4 * steps_per_epoch for s in sd["optimizer"]["state"].values())
    _load_final(run)
    # the same command rerun collects the finished run: no new job
    record = run / ".markers" / "train" / "submission.record"
    before = record.read_text()
    again = train(cfg, executor=Executor.create("slurm", ClusterOptions(time=15)))
    assert again["status"] == "finished" and again["final_checkpoint"] == final["final_checkpoint"]
    assert record.read_text() == before


def test_resume_point_survives_a_kill_between_checkpoint_writes(tmp_path):
    from conceptprune.training.launch import repair_latest, resume_point

    ck = tmp_path / "checkpoints"
    ck.mkdir(parents=True)
    torch.save({"epoch": 1}, ck / "epoch_1.pt")
    torch.save({"epoch": 1}, ck / "epoch_latest.pt")
    torch.save({"epoch": 2}, ck / "epoch_2.pt")  # killed before epoch_latest.pt was rewritten
    assert resume_point(tmp_path) == ck / "epoch_2.pt"
    (ck / "epoch_3.pt").write_bytes(b"PK\x03\x04 cut short")  # killed during the write
    assert resume_point(tmp_path) == ck / "epoch_2.pt"
    assert repair_latest(tmp_path) == ck / "epoch_2.pt"
    assert torch.load(ck / "epoch_latest.pt")["epoch"] == 2  # what open_clip's --resume latest reads
    assert repair_latest(tmp_path / "empty") is None


class _Payload:
    """Unpickling this creates a file: what a planted checkpoint could do on a train rerun."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


def test_resume_never_unpickles_code_from_a_checkpoint(tmp_path):
    from conceptprune.training.launch import resume_point

    ck = tmp_path / "checkpoints"
    ck.mkdir(parents=True)
    torch.save({"epoch": 1}, ck / "epoch_1.pt")
    planted = tmp_path / "payload-ran"
    torch.save({"epoch": 9, "x": _Payload(str(planted))}, ck / "epoch_9.pt")
    assert resume_point(tmp_path) == ck / "epoch_1.pt"  # the planted one is unreadable as weights
    assert not planted.exists()


def test_same_seed_reproduces_the_run(tiny_shards, tmp_path):
    """open_clip's sample shuffle is seeded from --seed (webdataset would use pid and clock)."""
    states = []
    for name in ("a", "b"):
        train(TrainConfig([str(tiny_shards)], "tiny", str(tmp_path / "runs"), name=name, samples_seen=256,
                          checkpoints=1), executor=Executor.create("local"))
        ckpt, _ = _load_final(tmp_path / "runs" / name)
        states.append(torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"])
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
