"""W&B with the real client in offline mode, read back with wandb's own reader (`wandb leet inspect`)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import clean_env, column, read_metrics, start_train, wait_for_step

WANDB = str(Path(sys.executable).parent / "wandb")
DIGITS = ["experiment=digits_mlp", "logger=wandb", "trainer.enable_progress_bar=false", "trainer.accelerator=cpu",
          "trainer.log_every_n_steps=5", "trainer.val_check_interval=20"]  # fmt: skip
SECRET = "k3y-that-must-not-leak-0123456789"


@pytest.fixture
def env(tmp_path: Path) -> dict:
    return clean_env(tmp_path, drop=("WANDB_MODE",), HOME=str(tmp_path), WANDB_API_KEY=SECRET)


def train(tmp_path: Path, env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trainer", "train", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip


def offline_runs(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "wandb").glob("offline-run-*"))


def inspect(offline_run: Path, env: dict) -> tuple[dict, list[dict]]:
    """(summary record, history rows) of one offline run, as wandb's own reader sees them."""
    summary = subprocess.run([WANDB, "leet", "inspect", "--summary", "--json", str(offline_run)], env=env,
                             capture_output=True, text=True, check=True).stdout  # fmt: skip
    records = subprocess.run([WANDB, "leet", "inspect", "--json", str(offline_run)], env=env,
                             capture_output=True, text=True, check=True).stdout  # fmt: skip
    history = [
        json.loads(line)["history"]["item"] for line in records.splitlines() if '"type":"history"' in line
    ]
    return json.loads(summary), history


@pytest.mark.slow
def test_offline_run_has_config_metrics_and_no_secret(tmp_path, env):
    result = train(
        tmp_path, env, *DIGITS, "trainer.max_steps=40", "run.name=wb", "logger.wandb.log_checkpoint=true"
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "anonymous setting" not in result.stdout + result.stderr  # no W&B warning on every run
    assert "\x1b" not in result.stdout + result.stderr  # W&B's colour codes do not reach log files
    run_dir = tmp_path / "runs" / "wb"
    (offline,) = offline_runs(run_dir)
    # the summary names the W&B run's folder, and how to upload it, last (W&B prints nothing after it)
    folder = offline.relative_to(tmp_path)
    assert result.stdout.rstrip().splitlines()[-1].split() == [
        "wandb",
        str(folder),
        "(offline;",
        "upload",
        "with:",
        "wandb",
        "sync",
        f"{folder})",
    ]
    summary, history = inspect(offline, env)
    state = json.loads((run_dir / "run.json").read_text())
    assert summary["run_id"] == state["wandb"]["id"] and summary["state"] == "finished"
    assert summary["config"]["model.hidden"] == [128, 128] and summary["config"]["optim.lr"] == 0.003
    assert summary["config"]["run_info/versions"]["torch"]
    steps = [row["trainer/global_step"] for row in history if "train/loss" in row]
    assert steps == [5, 10, 15, 20, 25, 30, 35, 40]
    csv_losses = column(read_metrics(run_dir), "train/loss")
    assert [row["train/loss"] for row in history if "train/loss" in row] == pytest.approx(csv_losses)
    assert {"val/loss", "train/mfu", "train/mem_gb", "train/data_wait_frac"} <= set(summary["summary"])
    manifest = json.loads((run_dir / "checkpoints" / "last.ckpt.json").read_text())
    assert manifest["wandb_run_id"] == summary["run_id"]
    records = subprocess.run([WANDB, "leet", "inspect", "--json", str(offline)], env=env, capture_output=True,
                             text=True, check=True).stdout  # fmt: skip
    assert '"type":"artifact"' in records and "last.ckpt" in records
    leaked = [p for p in tmp_path.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]
    assert not leaked and SECRET not in result.stdout + result.stderr


@pytest.mark.slow
def test_resume_continues_the_same_wandb_run(tmp_path, env):
    args = [*DIGITS, "trainer.max_steps=400", "checkpoint.every_n_steps=50", "run.name=wbres"]
    proc = start_train(tmp_path, args, env)
    wait_for_step(tmp_path / "runs" / "wbres", 40, proc)
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 75, out
    result = train(tmp_path, env, *args)
    assert result.returncode == 0, result.stdout + result.stderr
    runs = offline_runs(tmp_path / "runs" / "wbres")
    assert len(runs) == 2  # one file per attempt; `wandb sync` appends both to one W&B run
    (s1, h1), (s2, h2) = inspect(runs[0], env), inspect(runs[1], env)
    assert s1["run_id"] == s2["run_id"]
    stopped = max(r["trainer/global_step"] for r in h1)
    resumed = [r["trainer/global_step"] for r in h2 if "train/loss" in r]
    assert stopped < resumed[0] <= stopped + 5  # steps continue from the checkpoint, they do not restart
    assert resumed == sorted(resumed) and resumed[-1] == 400


@pytest.mark.slow
@pytest.mark.extended
def test_a_continued_directory_keeps_its_wandb_run_when_the_derived_name_changes(tmp_path, env):
    # run.dir pinned, run.name derived from the config: max_steps=20 after 10 gives another name, the same dir
    first = train(tmp_path, env, *DIGITS, "trainer.max_steps=10", "run.dir=runs/pinned")
    assert first.returncode == 0, first.stdout + first.stderr
    longer = train(tmp_path, env, *DIGITS, "trainer.max_steps=20", "run.dir=runs/pinned")
    assert longer.returncode == 0, longer.stdout + longer.stderr
    run_dir = tmp_path / "runs" / "pinned"
    runs = offline_runs(run_dir)
    assert len(runs) == 2
    (s1, _), (s2, h2) = inspect(runs[0], env), inspect(runs[1], env)
    assert s1["run_id"] == s2["run_id"] == json.loads((run_dir / "run.json").read_text())["wandb"]["id"]
    assert max(r["trainer/global_step"] for r in h2) == 20


@pytest.mark.distributed
def test_ddp_makes_exactly_one_wandb_run(tmp_path, env):
    result = train(
        tmp_path, env, *DIGITS, "strategy=ddp", "trainer.devices=2", "trainer.max_steps=20", "run.name=wbddp"
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(offline_runs(tmp_path / "runs" / "wbddp")) == 1
    assert not (tmp_path / "wandb").exists()  # nothing outside the run directory


@pytest.mark.slow
def test_wandb_failing_to_start_does_not_stop_training(tmp_path, env):
    env = dict(env, WANDB_BASE_URL="http://127.0.0.1:9")  # nothing listens there: no network is touched
    env.pop("WANDB_API_KEY")
    result = train(
        tmp_path, env, *DIGITS, "logger.wandb.mode=online", "trainer.max_steps=20", "run.name=wbfail"
    )
    assert result.returncode == 0, result.stdout + result.stderr
    output = result.stdout + result.stderr
    assert "W&B logging is off for the rest of this run" in output
    assert [int(r["step"]) for r in read_metrics(tmp_path / "runs" / "wbfail") if r["train/loss"]] == [
        5,
        10,
        15,
        20,
    ]
