"""Small pieces on their own: run identity, metrics file, LR schedule, FLOP counting, peak lookup."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trainer import rundir
from trainer.config.errors import ConfigError
from trainer.files import read_json
from trainer.metrics.csv_logger import COLUMNS, CSVMetricsLogger
from trainer.metrics.flops import gpu_peak_flops, measure_cpu_peak_flops, precision_dtype
from trainer.models.gpt import GPT
from trainer.optim import lr_factor

pytestmark = pytest.mark.unit

CFG = {"seed": 1, "run": {"name": None, "root": "runs"}, "model": {"n_layer": 2}, "data": {"batch_size": 4},
       "trainer": {"max_steps": 10, "enable_progress_bar": True}, "logger": {"csv": {}}}  # fmt: skip


def test_hash_ignores_where_and_how_a_run_is_watched():
    base = rundir.config_hash(CFG)
    assert base == rundir.config_hash(json.loads(json.dumps(CFG)))
    watched = json.loads(json.dumps(CFG))
    watched["run"]["root"], watched["logger"], watched["trainer"]["enable_progress_bar"] = (
        "elsewhere",
        {},
        False,
    )
    assert rundir.config_hash(watched) == base
    changed = json.loads(json.dumps(CFG))
    changed["model"]["n_layer"] = 3
    assert rundir.config_hash(changed) != base


def test_paths_default_to_experiment_and_hash(tmp_path):
    paths = rundir.resolve_paths(CFG, "exp")
    assert paths.name == f"exp-{rundir.config_hash(CFG)}" and str(paths.dir) == f"runs/{paths.name}"
    named = dict(CFG, run={"name": "x", "root": "r", "dir": None})
    assert rundir.resolve_paths(named, "exp").dir.as_posix() == "r/x"
    with pytest.raises(ConfigError):
        rundir.resolve_paths(dict(CFG, run={"name": "../x"}), "exp")


def fake_checkpoint(directory, step: int, payload: bytes = b"weights") -> Path:
    """A checkpoint file with a correct manifest, as AtomicCheckpointIO of earlier versions wrote them (SHA-256:
    such checkpoints still resume)."""
    import hashlib

    from trainer.checkpoint.manifest import step_checkpoint_name, write_manifest

    directory.mkdir(parents=True, exist_ok=True)
    path = directory / step_checkpoint_name(step)
    path.write_bytes(payload)
    write_manifest(path, {"step": step, "bytes": len(payload), "sha256": hashlib.sha256(payload).hexdigest(),
                          "identity": rundir.resume_identity(CFG)})  # fmt: skip
    return path


def test_plan_fresh_done_resume(tmp_path):
    paths = rundir.RunPaths("r", tmp_path / "r")
    assert rundir.plan(paths, CFG, "auto").action == "fresh"
    rundir.start(paths, CFG, ["a=1"], rundir.Plan("fresh"), seed=1, world_size=1)
    assert read_json(paths.state)["status"] == "running"
    assert rundir.plan(paths, CFG, "auto").action == "fresh"  # no checkpoint yet
    ckpt = fake_checkpoint(paths.checkpoints, 10)
    assert rundir.plan(paths, CFG, "auto") == rundir.Plan("resume", str(ckpt))
    rundir.finish(paths, "finished", {"steps": 10})
    assert rundir.plan(paths, CFG, "auto").action == "done"
    longer = json.loads(json.dumps(CFG))
    longer["trainer"]["max_steps"] = 20  # train a finished run for longer: continue from its checkpoint
    assert rundir.plan(paths, longer, "auto").action == "resume"
    other = json.loads(json.dumps(CFG))
    other["data"]["batch_size"] = 8
    with pytest.raises(ConfigError, match="data.batch_size"):
        rundir.plan(paths, other, "auto")
    allowed = rundir.plan(paths, other, "auto", allow_config_change=True)
    assert allowed.action == "resume" and "data.batch_size" in allowed.notes[0]
    with pytest.raises(ConfigError, match="resume=never"):
        rundir.plan(paths, CFG, "never")
    state = read_json(paths.state)
    assert state["attempts"][0]["overrides"] == ["a=1"] and state["summary"] == {"steps": 10}


def test_a_rerun_with_nothing_saved_says_so_and_all_invalid_checkpoints_are_refused(tmp_path):
    paths = rundir.RunPaths("r", tmp_path / "r")
    rundir.start(paths, CFG, [], rundir.Plan("fresh"), seed=1, world_size=1)  # then killed before any save
    plan = rundir.plan(paths, CFG, "auto")
    assert plan.action == "fresh"
    assert plan.notes == (
        "the earlier attempt (running) saved no checkpoint: training starts again from step 0",
    )
    fake_checkpoint(paths.checkpoints, 10).write_bytes(b"wei")  # progress, but not one valid checkpoint
    with pytest.raises(ConfigError, match=r"none of its 1 checkpoint\(s\) is valid \(newest: step-00000010.ckpt: "
                       r"truncated.*move .*checkpoints aside"):  # fmt: skip
        rundir.plan(paths, CFG, "auto")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match=r"run.dir=.*file: expected a directory \(this is a file\)"):
        rundir.plan(rundir.RunPaths("f", tmp_path / "file"), CFG, "auto")


def test_every_preset_and_the_default_keep_a_checkpoint_policy():
    """README's promise that a killed run continues: each preset saves by step count or by time."""
    from hydra import compose as hydra_compose

    from trainer.config import compose

    presets = [p.stem for p in Path(compose.conf_dir(), "experiment").glob("*.yaml")]
    assert len(presets) >= 3
    with compose.session():
        for overrides in [[], *([f"experiment={name}"] for name in presets)]:
            checkpoint = hydra_compose("train", overrides=overrides).checkpoint
            assert checkpoint.every_n_steps > 0 or checkpoint.every_n_minutes, overrides


def test_hydra_flags_may_come_after_overrides_and_option_lists_need_no_quotes():
    from trainer.config.compose import normalize

    assert normalize(["cluster.sbatch=[--mem-per-cpu=3G,-N2]", "model.hidden=[32,64]", "b=[[1],[2]]"]) == [
        "cluster.sbatch=['--mem-per-cpu=3G','-N2']", "model.hidden=[32,64]", "b=[[1],[2]]",
    ]  # fmt: skip

    assert normalize(["model=mlp", "--config-dir", "d", "data=digits"]) == [
        "--config-dir", "d", "model=mlp", "data=digits", "~experiment",
    ]  # fmt: skip
    assert normalize(["a=1", "--cfg", "job", "--info", "-m", "--config-name=x", "b=2"]) == [
        "--cfg", "job", "--info", "-m", "--config-name=x", "a=1", "b=2",
    ]  # fmt: skip


def test_a_path_from_home_is_the_users_home_as_in_the_shell(monkeypatch):
    """``data.path=~/books`` (README): Hydra's grammar alone refuses the ``~``."""
    from trainer.config.compose import normalize

    monkeypatch.setenv("HOME", "/home/ada")
    assert normalize(["data.path=~/books", "~logger", "x=a~b"]) == [
        "data.path=/home/ada/books",
        "~logger",
        "x=a~b",
    ]
    assert normalize(["data.path=~nosuchuser123/x"]) == ["data.path='~nosuchuser123/x'"]


def test_corrupt_or_unfinished_newest_checkpoint_falls_back_to_an_older_one(tmp_path):
    from trainer.checkpoint.manifest import find_latest_valid, manifest_path, verify

    d = tmp_path / "checkpoints"
    good = fake_checkpoint(d, 10)
    flipped = fake_checkpoint(d, 20)
    flipped.write_bytes(b"weightz")  # same size, different bytes
    truncated = fake_checkpoint(d, 30)
    truncated.write_bytes(b"wei")
    unfinished = fake_checkpoint(d, 40)
    manifest_path(unfinished).unlink()  # killed between the rename and the manifest
    assert verify(good) is None
    found = find_latest_valid(d)
    assert found.path == good and found.step == 10
    assert [(p.name, why) for p, why in found.rejected] == [
        ("step-00000040.ckpt", "no manifest (the write did not finish)"),
        ("step-00000030.ckpt", "truncated (3 of 7 bytes)"),
        ("step-00000020.ckpt", "checksum mismatch"),
    ]
    paths = rundir.RunPaths("r", tmp_path)
    rundir.start(paths, CFG, [], rundir.Plan("fresh"), seed=1, world_size=1)
    plan = rundir.plan(paths, CFG, "auto")
    assert plan.checkpoint == str(good) and len(plan.notes) == 3 and "checksum mismatch" in plan.notes[2]


def test_explicit_checkpoint_of_another_model_is_refused_with_the_keys(tmp_path):
    ckpt = fake_checkpoint(tmp_path / "other", 5)
    paths = rundir.RunPaths("r", tmp_path / "r")
    other = json.loads(json.dumps(CFG))
    other["model"]["n_layer"] = 4
    with pytest.raises(ConfigError, match=r"model.n_layer"):
        rundir.plan(paths, other, str(ckpt))
    assert rundir.plan(paths, CFG, str(ckpt)) == rundir.Plan("resume", str(ckpt))
    assert rundir.plan(paths, other, str(ckpt), allow_config_change=True).action == "resume"


def test_start_keeps_the_earlier_config_when_it_changes(tmp_path):
    paths = rundir.RunPaths("r", tmp_path / "r")
    rundir.start(paths, CFG, [], rundir.Plan("fresh"), seed=1, world_size=1)
    longer = json.loads(json.dumps(CFG))
    longer["trainer"]["max_steps"] = 20
    rundir.start(paths, longer, [], rundir.Plan("resume", "x"), seed=1, world_size=1)
    assert "max_steps: 10" in (paths.dir / "config.attempt-1.yaml").read_text()
    assert "max_steps: 20" in paths.config.read_text()
    assert len(read_json(paths.state)["attempts"]) == 2


def test_csv_rows_merge_per_step_and_resume_truncates(tmp_path):
    path = tmp_path / "metrics.csv"
    log = CSVMetricsLogger(path)
    for step in (1, 2, 3):
        log.current_step = step
        log.log_trainer_metrics({"step": step, "train/loss": 10.0 - step}, step)
        log.log_metrics({"val/loss": 20.0 - step, "epoch": 0})  # Lightning's call: the module's metrics
        log.save()
    log.finalize("success")
    rows = list(csv.DictReader(path.open()))
    assert [r["step"] for r in rows] == ["1", "2", "3"]
    assert rows[1]["train/loss"] == "8.0" and rows[1]["val/loss"] == "18.0"
    assert list(rows[0].keys())[: len(COLUMNS)] == list(COLUMNS)

    log = CSVMetricsLogger(path)
    log.resume_at(3)
    log.log_trainer_metrics({"step": 4, "train/loss": 5.0}, 4)
    log.flush_all()  # before a checkpoint at step 4: the row must be on disk
    assert list(csv.DictReader(path.open()))[-1]["train/loss"] == "5.0"
    log.current_step = 4  # what the throughput monitor sets at each optimizer step
    log.log_metrics({"val/loss": 4.5}, step=3)  # validation after the checkpoint, same optimizer step
    log.log_trainer_metrics({"step": 4, "checkpoint/mb": 1.5}, 4)  # a key of its own: the file widens
    log.finalize("success")
    rows = list(csv.DictReader(path.open()))
    assert [r["step"] for r in rows] == ["1", "2", "3", "4"]
    assert (rows[3]["train/loss"], rows[3]["val/loss"], rows[3]["checkpoint/mb"]) == ("5.0", "4.5", "1.5")

    resumed = CSVMetricsLogger(path)
    resumed.resume_at(2)
    resumed.log_trainer_metrics({"step": 3, "train/loss": 1.5}, 3)
    resumed.current_step = 3
    resumed.log_metrics({"val/acc": 0.5, "train/loss": 0.25})  # the module's own keys, one named like ours
    resumed.finalize("success")
    rows = list(csv.DictReader(path.open()))
    assert [r["step"] for r in rows] == ["1", "2", "3"]
    assert rows[2]["train/loss"] == "1.5" and rows[2]["val/acc"] == "0.5" and rows[0]["val/acc"] == ""
    assert rows[2]["module/train/loss"] == "0.25", "never merged into the trainer's own column"


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    f = [
        lr_factor(s, total_steps=100, warmup_steps=10, schedule="cosine", min_lr_ratio=0.1)
        for s in range(101)
    ]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[10:], f[11:], strict=False))
    assert f[100] == pytest.approx(0.1)
    assert lr_factor(50, 100, 10, "constant", 0.1) == 1.0


def test_gpt_flops_match_the_parameter_count_and_weights_are_tied():
    net = GPT(
        n_layer=2,
        n_head=2,
        n_embd=32,
        block_size=16,
        vocab_size=64,
        dropout=0.0,
        bias=False,
        tie_weights=True,
    )
    assert net.lm_head.weight is net.wte.weight
    n = sum(p.numel() for p in net.parameters()) - 16 * 32
    assert net.flops_per_token() == 6 * n + 12 * 2 * 32 * 16
    logits = net(torch.randint(64, (3, 16)))
    assert logits.shape == (3, 16, 64)
    # causal: the first position's output does not depend on later tokens
    x = torch.randint(64, (1, 16))
    y = x.clone()
    y[0, 5:] = (y[0, 5:] + 1) % 64
    assert torch.allclose(net(x)[0, :5], net(y)[0, :5])


def test_peak_flops_come_from_the_device():
    assert precision_dtype("bf16-mixed") == "bf16" and precision_dtype("16-mixed") == "fp16"
    assert precision_dtype("32", tf32=True) == "tf32" and precision_dtype("32") == "fp32"
    assert gpu_peak_flops("NVIDIA H100 80GB HBM3", "bf16") == pytest.approx(989.4e12)
    assert gpu_peak_flops("NVIDIA H100 PCIe", "bf16") == pytest.approx(756.5e12)
    assert gpu_peak_flops("NVIDIA A100-SXM4-40GB", "fp32") == pytest.approx(19.5e12)
    assert gpu_peak_flops("Some Future GPU", "bf16") is None
    assert gpu_peak_flops("NVIDIA L40S", "bf16") == pytest.approx(362.05e12)  # not the L4's figure
    assert gpu_peak_flops("NVIDIA L4", "bf16") == pytest.approx(121e12)
    # the names torch reports for parts that share a stem: each its own figure, or none
    assert gpu_peak_flops("NVIDIA H200 NVL", "bf16") == pytest.approx(835.5e12)  # not the H200 SXM's
    assert gpu_peak_flops("NVIDIA H200", "bf16") == pytest.approx(989.4e12)
    assert gpu_peak_flops("NVIDIA H100 NVL", "bf16") == pytest.approx(835.5e12)
    assert gpu_peak_flops("NVIDIA GH200 480GB", "bf16") == pytest.approx(989.4e12)
    assert gpu_peak_flops("NVIDIA H800", "bf16") == pytest.approx(989.4e12)
    assert gpu_peak_flops("NVIDIA H800 PCIe", "bf16") == pytest.approx(756.5e12)
    assert gpu_peak_flops("NVIDIA A10G", "bf16") is None  # no data sheet: no MFU rather than the A10's
    measured = measure_cpu_peak_flops(n=256, seconds=0.1)
    assert 1e8 < measured < 1e14


def test_secrets_are_redacted_and_configs_flattened():
    from trainer.secrets import flatten, redact, redact_override

    cfg = {
        "data": {"hub_token": "abc", "path": "x"},
        "wandb": {"api_key": "k", "project": "p"},
        "PASSWORD": None,
    }
    assert redact(cfg) == {"data": {"hub_token": "***", "path": "x"}, "wandb": {"api_key": "***", "project": "p"},
                           "PASSWORD": None}  # fmt: skip
    assert redact_override("+data.hub_token=abc") == "+data.hub_token=***"
    assert redact_override("optim.lr=0.1") == "optim.lr=0.1"
    assert redact({"max_tokens": 5, "tokenizer": "bpe"}) == {"max_tokens": 5, "tokenizer": "bpe"}
    assert flatten({"a": {"b": 1, "c": [1, 2]}, "d": 2}) == {"a.b": 1, "a.c": [1, 2], "d": 2}


def test_retention_removes_unfinished_writes_and_keeps_the_newest_valid(tmp_path):
    from trainer.checkpoint.callback import Checkpointer
    from trainer.checkpoint.manifest import manifest_path

    d = tmp_path / "checkpoints"
    for step in (10, 20, 30):
        fake_checkpoint(d, step)
    unfinished = fake_checkpoint(d, 40)
    manifest_path(unfinished).unlink()
    keeper = Checkpointer(d, every_n_steps=10, every_n_minutes=None, keep_last_k=2, keep_best_k=0,
                          monitor="val/loss", mode="min", signals=[], on_nonfinite="stop", step_timeout_s=None)  # fmt: skip
    keeper._retain()
    assert sorted(p.name for p in d.glob("step-*.ckpt")) == ["step-00000020.ckpt", "step-00000030.ckpt"]


@pytest.mark.parametrize("algorithm", ["xxh3_128", "sha256"])  # sha256: manifests of earlier versions
def test_sharded_checkpoint_manifest_catches_a_missing_truncated_or_changed_shard(tmp_path, algorithm):
    from trainer.checkpoint.manifest import (
        combined_digest,
        find_latest_valid,
        new_digest,
        verify,
        write_manifest,
    )

    def sharded(step: int) -> Path:
        folder = tmp_path / f"step-{step:08d}.ckpt"
        folder.mkdir()
        files = {}
        for name, data in (("__0_0.distcp", b"a" * 100), ("__1_0.distcp", b"b" * 90), (".metadata", b"m")):
            (folder / name).write_bytes(data)
            digest = new_digest(algorithm)
            digest.update(data)
            files[name] = {"bytes": len(data), algorithm: digest.hexdigest()}
        manifest = {"files": files, algorithm: combined_digest(files, algorithm), "bytes": 191, "step": step}
        write_manifest(folder, manifest)
        return folder

    old, new = sharded(5), sharded(10)
    assert verify(new) is None and find_latest_valid(tmp_path).path == new
    (new / "__1_0.distcp").write_bytes(b"b" * 89)
    assert verify(new) == "shard __1_0.distcp truncated (89 of 90 bytes)"
    (new / "__1_0.distcp").write_bytes(b"c" * 90)
    assert verify(new) == "shard __1_0.distcp: checksum mismatch"
    (new / "__1_0.distcp").unlink()
    assert verify(new) == "shard __1_0.distcp missing"
    found = find_latest_valid(tmp_path)  # the newest valid one is used; the broken one is reported
    assert found.path == old and [p for p, _ in found.rejected] == [new]


def test_fsdp_units_and_roots_of_a_module():
    from torch import nn

    from trainer.models.gpt import GPTModule
    from trainer.strategy.fsdp import _roots, sharding_units

    gpt = GPTModule(n_layer=3, n_head=2, n_embd=16, block_size=8, vocab_size=32, dropout=0.0, bias=False,
                    tie_weights=True)  # fmt: skip
    assert sharding_units(gpt) == list(gpt.net.blocks)  # one unit per transformer block
    assert _roots(gpt) == [gpt.net]  # the network is the root, not the LightningModule

    class Layers(nn.Module):  # a model calling a ModuleList entry by entry from its training step
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(2))

    with pytest.raises(ValueError, match=r"Layers.layers is a ModuleList called entry by entry"):
        _roots(Layers())


def test_status_finds_runs_in_subfolders_and_counts_local_restarts(tmp_path, capsys):
    from trainer.status import main as status_main

    for where, attempts in (("runs/a", 1), ("runs/debug/b", 3)):
        run = tmp_path / where
        run.mkdir(parents=True)
        (run / "run.json").write_text(json.dumps({"name": run.name, "status": "finished",
                                                  "attempts": [{}] * attempts}))  # fmt: skip
    (tmp_path / "runs/debug/b/logs").mkdir()
    (tmp_path / "runs/debug/b/logs/rank-0.log").write_text("")
    assert status_main([str(tmp_path / "runs")]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert rows[0][:3] == ["RUN", "STATE", "RESTARTS"]
    assert [r[:3] for r in rows[1:]] == [["a", "finished", "0"], ["debug/b", "finished", "2"]]
    assert status_main([str(tmp_path / "runs/debug/b")]) == 0
    out = capsys.readouterr().out
    assert "restarts   2" in out and f"log        {tmp_path}/runs/debug/b/logs/rank-0.log" in out


@pytest.mark.unit
@pytest.mark.parametrize(("visible", "local_rank", "drives"), [(1, 2, 0), (2, 3, 1), (4, 3, 3)])
def test_a_task_shown_only_its_own_gpus_drives_one_of_them(monkeypatch, visible, local_rank, drives):
    """Sites that bind GPUs to SLURM tasks (--gpus-per-task, --gpu-bind) show each task 1 or 2 of a node's 4:
    Lightning alone refuses devices=4 there (Lightning-AI/pytorch-lightning#16828). No GPU here: the CUDA
    device count is mocked, the rest is Lightning's own Trainer set-up under SLURM's task variables."""
    import lightning_fabric.accelerators.cuda as fabric_cuda
    from lightning_fabric.plugins.environments import SLURMEnvironment
    from lightning_fabric.utilities.exceptions import MisconfigurationException

    from trainer.config.compose import compose, session
    from trainer.config.validate import check_here
    from trainer.namespace import pl
    from trainer.strategy.devices import lightning_accelerator

    monkeypatch.setattr("trainer.config.validate.no_cuda_here", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    monkeypatch.setattr(fabric_cuda, "num_cuda_devices", lambda: visible)
    task = {"SLURM_JOB_ID": "77", "SLURM_JOB_NAME": "train", "SLURM_NTASKS": "4", "SLURM_NTASKS_PER_NODE": "4",
            "SLURM_NNODES": "1", "SLURM_NODEID": "0", "SLURM_PROCID": str(local_rank),
            "SLURM_LOCALID": str(local_rank), "SLURM_NODELIST": "gpu01"}  # fmt: skip
    for key, value in task.items():
        monkeypatch.setenv(key, value)

    def trainer(accelerator):
        return pl.Trainer(accelerator=accelerator, devices=4, num_nodes=1, strategy="ddp", logger=False,
                          plugins=[SLURMEnvironment(auto_requeue=False)], enable_progress_bar=False)  # fmt: skip

    if visible < 4:
        with pytest.raises(MisconfigurationException, match="only has"):
            trainer("gpu")
    ours = trainer(lightning_accelerator("gpu", 4))
    assert ours.strategy.root_device == torch.device("cuda", drives)
    assert (ours.world_size, ours.global_rank, ours.local_rank) == (4, local_rank, local_rank)
    with session():
        conf = compose(["trainer.accelerator=gpu", "trainer.devices=4", "strategy=ddp"], where="plan").conf
    assert check_here(conf) == "gpu"
    monkeypatch.delenv("SLURM_NTASKS")  # the same process outside SLURM: 4 devices are not there to spawn on
    if visible < 4:
        with pytest.raises(ConfigError, match=f"trainer.devices=4: expected at most {visible}"):
            check_here(conf)


@pytest.mark.unit
def test_a_machine_without_a_gpu_driver_is_known_without_importing_torch():
    """The launcher of a multi-process run (and a sweep's parent) asks whether CUDA can exist before it imports
    torch, which costs seconds: where no driver is, ``auto`` is the CPU, as torch would say."""
    code = ("import sys; from trainer.config.validate import no_cuda_here, resolve_accelerator; "
            "print(no_cuda_here(), resolve_accelerator('auto'), 'torch' in sys.modules)")  # fmt: skip
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    if out[0] == "True":
        assert out[1:] == ["cpu", "False"] and not torch.cuda.is_available()
    else:
        assert out[1] == ("gpu" if torch.cuda.is_available() else "cpu") and out[2] == "True"
