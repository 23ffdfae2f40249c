"""User code written the way it is written elsewhere (tests/thirdparty/), trained with no edit and no shim.

Two modules, each under both Lightning namespaces (the files import ``lightning``; a copy whose import lines
say ``pytorch_lightning`` stands for the user who writes that instead):

- ``MNISTLitModule`` in the style of lightning-hydra-template: network, partial optimizer and scheduler from
  its own config (the template's ``configs/model/mnist.yaml`` as it ships), ``save_hyperparameters()``, its own
  ``train/loss`` and ``val/acc``, and a DataModule with a plain shuffled DataLoader;
- ``LitAutoEncoder`` in the style of Lightning's example: builds its own Adam, logs ``val_loss``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import (
    REPO,
    assert_bitwise_equal,
    clean_env,
    column,
    interrupted_run,
    read_metrics,
    reference_run,
)

# Each namespace runs once (the same code behind another import): `lightning` the one/two/sharded-process and
# sweep tests, `pytorch_lightning` the kill/resume test (every Lightning class the run hands over, and a
# checkpoint read back).
ONE_NAMESPACE = ["lightning"]
QUIET = ["trainer.enable_progress_bar=false", "trainer.accelerator=cpu"]


def user_copy(tmp_path: Path, namespace: str) -> Path:
    """tests/thirdparty copied elsewhere; for ``pytorch_lightning``, with only its import lines rewritten."""
    root = tmp_path / "user"
    shutil.copytree(REPO / "tests" / "thirdparty", root)
    if namespace == "pytorch_lightning":
        for path in root.rglob("*.py"):
            text = path.read_text()
            text = text.replace("from lightning.pytorch import", "from pytorch_lightning import")
            text = text.replace("from lightning import", "from pytorch_lightning import")
            path.write_text(text)
    return root


def template_args(root: Path) -> list[str]:
    return ["-cd", str(root / "template" / "configs"), "model=mnist", "data=digits28", *QUIET]


def autoencoder_args(root: Path) -> list[str]:
    return ["-cd", str(root / "examples" / "configs"), "model=autoencoder", "data=autoencoder", *QUIET]


def env_for(tmp_path: Path, root: Path, **extra: str) -> dict:
    paths = f"{root / 'template'}:{root / 'examples'}"
    return clean_env(tmp_path, PYTHONPATH=paths, OMP_NUM_THREADS="1", **extra)


def train(tmp_path: Path, env: dict, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trainer", "train", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip


def load(checkpoint: Path) -> dict:
    return torch.load(checkpoint, map_location="cpu", weights_only=True)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("namespace", ONE_NAMESPACE)
def test_template_module_on_one_two_and_sharded_processes(tmp_path, namespace):
    root = user_copy(tmp_path, namespace)
    env = env_for(tmp_path, root)
    for strategy in (
        ["strategy=auto"],
        ["strategy=ddp", "trainer.devices=2"],
        ["strategy=fsdp", "trainer.devices=2"],
    ):
        name = strategy[0].split("=")[1]
        result = train(
            tmp_path, env, *template_args(root), "trainer.max_steps=30", f"run.name={name}", *strategy
        )
        out = result.stdout + result.stderr
        assert result.returncode == 0, out
        run_dir = tmp_path / "runs" / name
        rows = read_metrics(run_dir)
        # the module's own metrics have their own columns; its train/loss is not merged into the trainer's
        assert column(rows, "val/acc") and column(rows, "module/train/loss") and column(rows, "train/loss")
        assert out.count("yours is written as 'module/train/loss'") == 1
        # one validation per epoch (22 batches, the last one short), and one more at the end, at step 30
        assert [int(r["step"]) for r in rows if r.get("val/acc")] == [22, 30]
        state = json.loads((run_dir / "run.json").read_text())
        assert state["status"] == "finished" and state["data_resume"] == {"exact": True, "reason": None}
        assert state["summary"]["validation"]["val/acc"] > 0.5
        if name != "fsdp":  # the single-file checkpoint loads without unpickling code
            hparams = load(run_dir / "checkpoints" / "last.ckpt")["hyper_parameters"]
            assert hparams["net"]["_target_"] == "src.models.components.simple_dense_net.SimpleDenseNet"
            assert hparams["optimizer"] == {"_target_": "torch.optim.Adam", "_partial_": True, "lr": 0.001,
                                            "weight_decay": 0.0}  # fmt: skip
        else:
            assert (run_dir / "checkpoints" / "last.ckpt").is_dir()  # sharded
    # the module sets its own optimizer and scheduler: the run's are recorded as not used
    config = yaml.safe_load((tmp_path / "runs" / "auto" / "config.yaml").read_text())
    assert config["optim"] is None and config["scheduler"] is None
    assert config["model"]["optimizer"]["_target_"] == "torch.optim.Adam"


@pytest.mark.slow
@pytest.mark.parametrize("namespace", ["pytorch_lightning"])
def test_template_module_killed_resumes_bit_identical(tmp_path, namespace):
    # 1397 training images / 64 = 22 batches an epoch: a checkpoint every 8 steps, killed past step 20 (so
    # resumed mid-epoch from a checkpoint at step 16 or later), 70 steps cross three epoch boundaries, with
    # the DataModule's own shuffled DataLoader, dropout-free BatchNorm and an epoch-interval plateau schedule.
    root = user_copy(tmp_path, namespace)
    env = env_for(tmp_path, root)
    args = [
        *template_args(root),
        "trainer.max_steps=70",
        "trainer.log_every_n_steps=1",
        "checkpoint.every_n_steps=8",
    ]
    ref = reference_run(tmp_path, env, args)
    run = interrupted_run(tmp_path, env, args, [(20, "kill")], "interrupted")
    a, b = load(ref / "checkpoints" / "last.ckpt"), load(run / "checkpoints" / "last.ckpt")
    assert a["global_step"] == b["global_step"] == 70
    assert_bitwise_equal(a["state_dict"], b["state_dict"], "state_dict")
    assert_bitwise_equal(a["optimizer_states"], b["optimizer_states"], "optimizer")
    assert column(read_metrics(run), "train/loss") == column(read_metrics(ref), "train/loss")


@pytest.mark.slow
@pytest.mark.extended  # CI time (30 minutes): run with make test-extended
@pytest.mark.parametrize("namespace", ONE_NAMESPACE)
def test_autoencoder_sweeps_on_its_own_metric_with_wandb(tmp_path, namespace):
    root = user_copy(tmp_path, namespace)
    env = env_for(tmp_path, root, WANDB_MODE="offline")
    args = [*autoencoder_args(root), "trainer.max_steps=20", "checkpoint.monitor=val_loss", "logger=[csv,wandb]",
            "model.learning_rate=1e-3,1e-2"]  # fmt: skip
    result = train(tmp_path, env, "-m", *args, timeout=600)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    (sweep_dir,) = (tmp_path / "runs").glob("sweep-LitAutoEncoder-*")
    ledger = json.loads((sweep_dir / "sweep.json").read_text())
    assert ledger["metric"] == "val_loss" and ledger["direction"] == "minimize"
    trials = ledger["trials"]
    assert [t["state"] for t in trials] == ["finished", "finished"]
    assert all(t["objective"] is not None and t["steps"] == 20 for t in trials), trials
    for t in trials:
        run_dir = Path(t["run_dir"])
        assert run_dir.name.startswith("LitAutoEncoder-")
        state = json.loads((run_dir / "run.json").read_text())
        assert state["summary"]["validation"]["val_loss"] == pytest.approx(t["objective"])
        assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 1
    report = subprocess.run([sys.executable, "-m", "trainer", "report", str(sweep_dir)], cwd=tmp_path, env=env,
                            capture_output=True, text=True)  # fmt: skip
    assert report.returncode == 0 and "VAL_LOSS" in report.stdout, report.stdout + report.stderr


@pytest.mark.slow
def test_user_code_refusals_are_one_line_before_anything_starts(tmp_path):
    root = user_copy(tmp_path, "lightning")
    plain = user_copy(tmp_path / "other", "pytorch_lightning")
    cases = [
        # a typo in a nested node of the user's own config (Hydra refuses to set a key that is not there),
        ([*template_args(root), "model.net.lin1_sise=64"], "model.net.lin1_sise: unknown key"),
        # and a key added to it that the class does not take
        (
            [*template_args(root), "+model.net.lin1_sise=64"],
            "model.net.lin1_sise: unknown key; expected an argument "
            "of src.models.components.simple_dense_net.SimpleDenseNet: input_size, lin1_size",
        ),
        # the autoencoder builds its own optimizer: optim.lr would be silently ignored
        (
            [*autoencoder_args(root), "optim.lr=1e-5"],
            "optim.lr=1e-5: expected a setting the model receives: "
            "LitAutoEncoder takes no `optimizer` argument",
        ),
        # the template's model sets its own optimizer in its config
        ([*template_args(root), "optim.lr=1e-5"], "model.optimizer is set in the model's own config"),
        # a lightning model with a pytorch_lightning data module
        (
            [
                *template_args(root),
                "data._target_=autoencoder.DigitsDataModule",
                "~data.train_val_test_split",
                "~data.num_workers",
                "~data.pin_memory",
            ],
            "the two packages' classes cannot be mixed",
        ),
        # a misspelled Lightning Trainer flag, and one this project sets itself
        (
            [*template_args(root), "trainer.detect_anomali=true"],
            "trainer.detect_anomali: unknown key; expected a key",
        ),
        (
            [*template_args(root), "trainer.callbacks=[]"],
            "trainer.callbacks=[]: expected no value here (trainer sets it: use the callbacks group",
        ),
    ]
    # The template (lightning) beside the autoencoder written against pytorch_lightning. The first case goes
    # through the command itself; the others through its entry point in one process (each `trainer train`
    # would import torch and Lightning again for a one-line answer).
    env = env_for(tmp_path, root)
    env["PYTHONPATH"] = f"{root / 'template'}:{plain / 'examples'}"
    result = train(tmp_path, env, *cases[0][0])
    err = result.stderr.strip()
    assert result.returncode == 2 and len(err.splitlines()) == 1 and cases[0][1] in err, result.stdout + err
    script = (
        "import contextlib, io, json, sys\n"
        "from trainer.cli import main\n"
        "for args in json.loads(sys.argv[1]):\n"
        "    err = io.StringIO()\n"
        "    with contextlib.redirect_stderr(err):\n"
        "        code = main(['train', *args])\n"
        "    print(json.dumps([code, err.getvalue()]))\n"
    )
    many = subprocess.run([sys.executable, "-c", script, json.dumps([args for args, _ in cases[1:]])], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    answers = [json.loads(line) for line in many.stdout.splitlines() if line.startswith("[")]
    assert len(answers) == len(cases) - 1, many.stdout + many.stderr
    for (args, expected), (code, err) in zip(cases[1:], answers, strict=True):
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and expected in lines[0], (args, err)
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_callbacks_extra_loggers_and_trainer_flags_from_config(tmp_path):
    root = user_copy(tmp_path, "lightning")
    env = env_for(tmp_path, root)
    args = [*autoencoder_args(root), "trainer.max_steps=45", "checkpoint.monitor=val_loss", "run.name=cb",
            "trainer.val_check_interval=5", "callbacks=[early_stopping,lr_monitor]",
            "callbacks.early_stopping.patience=1", "callbacks.early_stopping.min_delta=1.0",
            "logger=[csv,tensorboard]", "trainer.detect_anomaly=true"]  # fmt: skip
    result = train(tmp_path, env, *args)
    assert result.returncode == 0, result.stdout + result.stderr
    run_dir = tmp_path / "runs" / "cb"
    rows = read_metrics(run_dir)
    # early stopping (no improvement of 1.0 within one validation) ended the run at its second validation
    assert max(int(r["step"]) for r in rows) == 10
    assert any(k.startswith("lr-Adam") for k in rows[0]), "LearningRateMonitor's column"
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*")), "TensorBoard wrote into the run dir"
    config = (run_dir / "config.yaml").read_text()
    assert "lightning.pytorch.callbacks.EarlyStopping" in config and "detect_anomaly: true" in config
