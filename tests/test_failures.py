"""Failure handling with real processes: a killed or crashing rank, non-finite losses, unsafe checkpoints."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, clean_env, read_metrics, start_train, wait_for_step, worker_pid

HELPERS = REPO / "tests" / "helpers"
FAULTY = ["--config-dir", str(HELPERS / "conf"), "model=faulty", "data=digits", "trainer.accelerator=cpu",
          "trainer.log_every_n_steps=1", "trainer.val_check_interval=1000", "trainer.enable_progress_bar=false",
          "checkpoint.every_n_steps=4"]  # fmt: skip


@pytest.fixture
def env(tmp_path: Path) -> dict:
    return clean_env(tmp_path, PYTHONPATH=str(HELPERS))


def run(tmp_path: Path, env: dict, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trainer", "train", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip


def params_finite(run_dir: Path) -> bool:
    from trainer.export import load_weights  # reads sharded (FSDP) checkpoints too

    weights = load_weights(run_dir / "checkpoints" / "last.ckpt")["state_dict"]
    return all(torch.isfinite(t).all() for t in weights.values())


@pytest.mark.distributed
def test_killed_rank_stops_the_whole_job_quickly_and_is_named(tmp_path, env):
    proc = start_train(tmp_path, [*FAULTY, "strategy=ddp", "trainer.devices=2", "trainer.max_steps=100000",
                                  "run.name=victim"], env)  # fmt: skip
    wait_for_step(tmp_path / "runs" / "victim", 5, proc)
    workers = [worker_pid(proc, 0), worker_pid(proc, 1)]
    rank1 = workers[1]
    killed_at = time.monotonic()
    os.kill(rank1, signal.SIGKILL)
    out, _ = proc.communicate(timeout=60)
    elapsed = time.monotonic() - killed_at
    assert proc.returncode == 128 + signal.SIGKILL, out
    assert f"rank 1 (pid {rank1}) was killed by SIGKILL" in out
    # the cause is the console's last line; the surviving rank's traceback went to its log file
    assert out.strip().splitlines()[-1].startswith(f"error: rank 1 (pid {rank1}) was killed by SIGKILL")
    assert "Traceback" not in out and "Traceback" in (tmp_path / "runs/victim/logs/rank-0.log").read_text()
    assert elapsed < 30, f"took {elapsed:.1f}s to stop"
    for pid in workers:  # no worker left behind
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()


@pytest.mark.distributed
def test_rank_raising_fails_the_job_with_its_error(tmp_path, env):
    started = time.monotonic()
    result = run(tmp_path, env, *FAULTY, "strategy=ddp", "trainer.devices=2", "trainer.max_steps=100",
                 "model.fail_step=6", "model.fail_rank=1")  # fmt: skip
    assert result.returncode == 1, result.stdout + result.stderr
    assert "deliberate failure at step 6 on rank 1" in result.stderr
    assert "rank 1 (pid" in result.stderr and "exited with code 1" in result.stderr
    assert time.monotonic() - started < 120


@pytest.mark.slow
def test_nan_loss_stops_with_the_last_good_state(tmp_path, env):
    result = run(tmp_path, env, *FAULTY, "trainer.max_steps=50", "model.nan_step=10", "run.name=nan")
    assert result.returncode == 3, result.stdout + result.stderr
    assert "stopped on a non-finite loss" in result.stderr and "step 10" in result.stderr
    run_dir = tmp_path / "runs" / "nan"
    assert params_finite(run_dir)
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 10  # the NaN step counted but changed nothing
    assert '"status": "failed"' in (run_dir / "run.json").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_nan_loss_on_one_rank_stops_every_rank(tmp_path, env, strategy):
    result = run(tmp_path, env, *FAULTY, f"strategy={strategy}", "trainer.devices=2", "trainer.max_steps=50",
                 "model.nan_step=7", "model.nan_rank=1", "run.name=nan2", timeout=180)  # fmt: skip
    assert result.returncode == 3, result.stdout + result.stderr
    assert "stopped on a non-finite" in result.stderr
    assert params_finite(tmp_path / "runs" / "nan2")


@pytest.mark.slow
def test_nan_loss_skip_policy_goes_on(tmp_path, env):
    result = run(tmp_path, env, *FAULTY, "trainer.max_steps=20", "model.nan_step=10", "trainer.on_nonfinite_loss=skip",
                 "run.name=skip")  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "skipped step 10" in result.stdout + result.stderr
    assert params_finite(tmp_path / "runs" / "skip")
    losses = [float(r["train/loss"]) for r in read_metrics(tmp_path / "runs" / "skip") if r["train/loss"]]
    assert all(math.isnan(v) for v in losses[9:]) and all(math.isfinite(v) for v in losses[:9])


@pytest.mark.slow
def test_checkpoint_that_would_run_code_is_not_loaded(tmp_path, env):
    evil = tmp_path / "evil.ckpt"
    marker = tmp_path / "pwned"
    code = (
        "import os, torch\n"
        "class Evil:\n"
        f"    def __reduce__(self): return (os.system, ('touch {marker}',))\n"
        f"torch.save({{'state_dict': {{}}, 'payload': Evil()}}, '{evil}')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    result = run(tmp_path, env, "experiment=digits_mlp", "debug=smoke", f"resume={evil}")
    # refused in one line before the run starts: nothing ran, nothing was written
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.strip().splitlines() == [
        f"error: resume={evil}: expected a checkpoint that runs no code when loaded ({evil}: refused to load: "
        "it names posix.system, which loading with weights_only=True refuses (it could run code))"
    ]
    assert not marker.exists() and not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_retention_keeps_newest_and_best(tmp_path, env):
    result = run(tmp_path, env, "experiment=digits_mlp", "trainer.max_steps=60", "trainer.val_check_interval=10",
                 "checkpoint.every_n_steps=5", "checkpoint.keep_last_k=2", "checkpoint.keep_best_k=1",
                 "run.name=keep")  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    ckpts = tmp_path / "runs" / "keep" / "checkpoints"
    names = sorted(p.name for p in ckpts.glob("step-*.ckpt"))
    assert names[-2:] == ["step-00000055.ckpt", "step-00000060.ckpt"]
    assert len(names) in (2, 3)  # the best by val/loss is kept too (it may be one of the newest)
    assert (ckpts / "last.ckpt").stat().st_ino == (ckpts / "step-00000060.ckpt").stat().st_ino
    rows = read_metrics(tmp_path / "runs" / "keep")
    assert [r for r in rows if r.get("checkpoint/mb_per_s")], "checkpoint write speed is logged"


@pytest.mark.distributed
def test_signal_to_one_rank_stops_all_ranks_together(tmp_path, env):
    proc = start_train(tmp_path, [*FAULTY, "strategy=ddp", "trainer.devices=2", "trainer.max_steps=100000",
                                  "run.name=one"], env)  # fmt: skip
    wait_for_step(tmp_path / "runs" / "one", 5, proc)
    os.kill(worker_pid(proc, 1), signal.SIGUSR1)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 75, out
    assert out.count("preempted by a signal") == 1  # said once, by rank zero
    state = (tmp_path / "runs" / "one" / "run.json").read_text()
    assert '"status": "preempted"' in state


@pytest.mark.slow
def test_time_based_checkpoints(tmp_path, env):
    result = run(tmp_path, env, "experiment=digits_mlp", "trainer.max_steps=400", "checkpoint.every_n_steps=0",
                 "checkpoint.every_n_minutes=0.005", "checkpoint.keep_last_k=1000", "run.name=timed")  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    saves = sorted((tmp_path / "runs" / "timed" / "checkpoints").glob("step-*.ckpt"))
    assert len(saves) >= 3  # every 0.3 s over a run of a few seconds, plus the final one


@pytest.mark.slow
def test_a_signal_during_start_up_is_a_preemption_not_a_death(tmp_path, env):
    """USR1 while `trainer train` is still importing (a requeue storm, a preemption right after a start): the
    run saves at its first step boundary and asks to be requeued (75), where the signal's default action
    killed it (exit 138: a SLURM task neither requeued nor finished). On its way out the saved run ignores
    the signal: Slurm repeats one, and the default action Python restores at shutdown would kill it (138)."""
    report = tmp_path / "signals-at-exit.txt"
    proc = start_train(tmp_path, [*FAULTY, "trainer.max_steps=50", "run.name=early", f"model.exit_report={report}"], env)  # fmt: skip
    time.sleep(0.3)  # well inside the imports
    os.kill(proc.pid, signal.SIGUSR1)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 75, out
    assert "preempted by a signal: checkpoint saved at step 1" in out, out
    assert report.read_text() == "SIGUSR1 ignored\nSIGTERM ignored\n"
