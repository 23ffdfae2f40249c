"""A sweep's ledger: ``<sweep dir>/sweep.json``, trial -> overrides, run dir, state, objective, jobs.

Several processes may write it at once (Optuna workers, a local run beside a status query), so every change
is a read-modify-write under an exclusive lock on ``.sweep.lock``, and the file is replaced atomically.
Readers without the lock always see a whole file.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from trainer.files import atomic_write_text, read_json

FILE = "sweep.json"
LOCK = ".sweep.lock"

# Trial states. A trial is done when finished or pruned; failed trials are reported and not retried.
DONE = ("finished", "pruned")


def read(sweep_dir: Path) -> dict:
    return read_json(sweep_dir / FILE) or {}


@contextlib.contextmanager
def locked(sweep_dir: Path) -> Iterator[dict]:
    """The ledger, to change in place; written back (atomically) when the block ends without error."""
    sweep_dir.mkdir(parents=True, exist_ok=True)
    with open(sweep_dir / LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            data = read(sweep_dir)
            data.setdefault("trials", [])
            data.setdefault("jobs", [])
            yield data
            atomic_write_text(sweep_dir / FILE, json.dumps(data, indent=2) + "\n")
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def trial_state(entry: dict, run_status: str | None) -> str | None:
    """What to show for a trial: the sweep's own word where it knows more than the run's record (pruned,
    failed, interrupted, not started yet), else the run's status."""
    if entry.get("state") in ("pruned", "failed", "interrupted", "pending") or not run_status:
        return entry.get("state")
    return run_status


def trial(data: dict, index: int) -> dict:
    """The entry of trial ``index`` (created if new)."""
    for entry in data["trials"]:
        if entry["index"] == index:
            return entry
    entry = {"index": index}
    data["trials"].append(entry)
    data["trials"].sort(key=lambda e: e["index"])
    return entry


def _slurm_task() -> str | None:
    """This process's SLURM job (array task) id, if it runs inside one."""
    if os.environ.get("SLURM_ARRAY_JOB_ID"):
        return f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ.get('SLURM_ARRAY_TASK_ID')}"
    return os.environ.get("SLURM_JOB_ID")


def me() -> dict:
    """Who runs a trial: a worker that died leaves its trials to be picked up again."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time(), "slurm_job": _slurm_task(),
            "restart": os.environ.get("SLURM_RESTART_COUNT", "0")}  # fmt: skip


def owner_alive(entry: dict) -> bool:
    """Whether the process that claimed a running trial still runs. On this host: its pid. Elsewhere: its
    SLURM job must still be running and not be this very job (a requeued array task is its own successor);
    without a SLURM job on another host it cannot be known, so it is assumed alive."""
    owner = entry.get("owner") or {}
    job = owner.get("slurm_job")
    if owner.get("host") == socket.gethostname() and owner.get("restart", "0") == me()["restart"]:
        try:
            os.kill(int(owner["pid"]), 0)
        except (OSError, KeyError, ValueError):
            return False
        return True
    if job:
        if job == _slurm_task():
            return False
        from trainer.launch import slurm

        return slurm.active(job) == "RUNNING"
    return bool(owner)
