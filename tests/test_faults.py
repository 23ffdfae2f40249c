"""Faults with real processes: two commands on one run, a killed lock holder, a full disk, a read-only or
size-limited file system, a stopped rank, and a local multi-device run inside a SLURM allocation.

Each ends with a one-line cause and the right exit code, run.json says what happened, nothing partial is left,
and the same command works again once the cause is gone.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, clean_env, start_train, wait_for_step, worker_pid

HELPERS = REPO / "tests" / "helpers"
RUN = ["experiment=digits_mlp", "trainer.accelerator=cpu", "trainer.enable_progress_bar=false"]
SLOW = ["--config-dir", str(HELPERS / "conf"), "model=faulty", "data=digits", *RUN[1:], "trainer.log_every_n_steps=1",
        "trainer.val_check_interval=1000", "model.step_sleep_s=0.05"]  # fmt: skip


@pytest.fixture
def env(tmp_path: Path) -> dict:
    return clean_env(tmp_path, PYTHONPATH=str(HELPERS))


def train(cwd: Path, env: dict, *args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trainer", "train", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300, **kwargs)  # fmt: skip


def state(run_dir: Path) -> dict:
    return json.loads((run_dir / "run.json").read_text())


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error: ")]


@pytest.mark.slow
def test_one_writer_per_run_and_a_killed_holder_never_blocks(tmp_path, env):
    run_dir = tmp_path / "runs" / "one"
    args = [*SLOW, "trainer.max_steps=100000", "checkpoint.every_n_steps=5", "run.name=one"]
    first = start_train(tmp_path, args, env)
    wait_for_step(run_dir, 6, first)
    before = (run_dir / "run.json").read_bytes()
    second = train(tmp_path, env, *args)
    assert second.returncode == 2, second.stdout + second.stderr
    assert second.stderr.strip().splitlines() == error_lines(second)[:1]
    line = second.stderr.strip()
    assert (
        f"run.dir={run_dir.relative_to(tmp_path)}: expected a directory no other process is training; pid {first.pid} on {os.uname().nodename}"
        in line
    )
    assert (run_dir / "run.json").read_bytes() == before  # the second command wrote nothing there
    assert first.poll() is None  # and did not disturb the first
    first.kill()  # kill -9: its lock goes with it
    first.wait()
    debris = [
        run_dir / "checkpoints" / ".step-00000099.ckpt.tmp",
        run_dir / "checkpoints" / "step-00000098.ckpt.json",
    ]
    for path in debris:  # what a save killed half way leaves: a temporary file, a manifest without its file
        path.write_text("partial")
    rerun = train(
        tmp_path, env, *[a for a in args if a != "trainer.max_steps=100000"], "trainer.max_steps=12"
    )
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "resuming one from" in rerun.stdout
    assert not any(path.exists() for path in debris)  # swept when the run started again
    attempts = state(run_dir)["attempts"]
    assert [a["action"] for a in attempts] == ["fresh", "resume"]  # the refused command is no attempt


def _mount_tmpfs(where: Path, size: str) -> None:
    where.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {result.stderr.decode().strip()}")


def _remount(where: Path, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(where)], check=True)


@pytest.mark.slow
def test_full_disk_read_only_and_size_limit_end_in_one_line_and_rerun(tmp_path, env):
    disk = tmp_path / "disk"
    _mount_tmpfs(disk, "512k")  # room for the run's files and one checkpoint (~330 kB), not two
    try:
        run_dir = disk / "full"
        args = [*RUN, "trainer.max_steps=6", "checkpoint.every_n_steps=2", "checkpoint.keep_last_k=5",
                f"run.dir={run_dir}"]  # fmt: skip
        full = train(tmp_path, env, *args)
        assert full.returncode == 1, full.stdout + full.stderr
        assert "Traceback" not in full.stdout + full.stderr
        assert error_lines(full) == [
            f"error: could not write checkpoint {run_dir}/checkpoints/step-00000004.ckpt: No space left on device"
        ]
        assert full.stderr.strip().splitlines()[-1] == error_lines(full)[0]
        assert state(run_dir)["status"] == "failed"
        assert "No space left on device" in state(run_dir)["attempts"][-1]["cause"]
        leftovers = [p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".")]
        assert leftovers == []
        saved = {p.name for p in (run_dir / "checkpoints").iterdir()}

        _remount(disk, "ro")  # a read-only run directory: refused before anything starts
        read_only = train(tmp_path, env, *args)
        assert read_only.returncode == 2, read_only.stdout + read_only.stderr
        assert read_only.stderr.strip().splitlines() == [
            f"error: run.dir={run_dir}: expected a directory this process can write (Read-only file system)"
        ]

        _remount(disk, "rw,size=8m")  # the cause gone, the same command continues where it stopped
        again = train(tmp_path, env, *args)
        assert again.returncode == 0, again.stdout + again.stderr
        assert f"from {run_dir}/checkpoints/step-00000002.ckpt" in again.stdout
        assert state(run_dir)["status"] == "finished"
        assert saved <= {p.name for p in (run_dir / "checkpoints").iterdir()} | {"step-00000002.ckpt"}

        # ulimit -f: files may not grow past 100 kB; a checkpoint write fails with EFBIG, said in one line
        limited = train(tmp_path, env, *RUN, "trainer.max_steps=2", f"run.dir={disk / 'limited'}",
                        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000)))  # fmt: skip
        assert limited.returncode == 1, limited.stdout + limited.stderr
        assert error_lines(limited) == [
            f"error: could not write checkpoint {disk}/limited/checkpoints/step-00000002.ckpt: File too large"
        ]
        assert state(disk / "limited")["status"] == "failed"
        assert not [p for p in (disk / "limited" / "checkpoints").iterdir() if p.name.startswith(".")]
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


@pytest.mark.distributed
def test_a_stopped_rank_is_named_and_tracebacks_go_to_the_logs(tmp_path, env):
    run_dir = tmp_path / "runs" / "stop"
    proc = start_train(tmp_path, [*SLOW, "strategy=ddp", "trainer.devices=2", "trainer.max_steps=100000",
                                  "strategy.step_timeout_s=5", "run.name=stop"], env)  # fmt: skip
    wait_for_step(run_dir, 3, proc)
    stopped = worker_pid(proc, 1)
    os.kill(stopped, signal.SIGSTOP)
    started = time.monotonic()
    out, _ = proc.communicate(timeout=120)
    assert time.monotonic() - started < 60
    assert proc.returncode not in (0, None), out
    assert "Traceback" not in out  # the surviving rank's traceback is in its log, not on the console
    errors = [line for line in out.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0] == out.strip().splitlines()[-1], out[-3000:]
    assert errors[0].startswith(f"error: rank 1 (pid {stopped}) stopped answering: it was stopped (SIGSTOP)")
    assert f"{run_dir.relative_to(tmp_path)}/logs/rank-<N>.log" in errors[0]
    assert "Traceback" in (run_dir / "logs" / "rank-0.log").read_text()
    assert state(run_dir)["status"] == "failed" and "rank 1" in state(run_dir)["attempts"][-1]["cause"]
    assert not Path(f"/proc/{stopped}").exists() or "zombie" in Path(f"/proc/{stopped}/status").read_text()


@pytest.mark.distributed
def test_local_ranks_inside_a_slurm_allocation(tmp_path, env):
    """A user's own sbatch script running `trainer train trainer.devices=2`: SLURM's task variables (one task,
    rank 0) must not make both workers rank 0."""
    slurm = {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "1", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
             "SLURM_NODEID": "0", "SLURM_JOB_NAME": "mine"}  # fmt: skip
    result = train(tmp_path, {**env, **slurm}, *RUN, "strategy=ddp", "trainer.devices=2", "trainer.max_steps=4",
                   "run.name=alloc")  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "finished 4 steps on 2 process(es)" in result.stdout
    assert state(tmp_path / "runs" / "alloc")["attempts"][-1]["world_size"] == 2
