"""One writer per run directory: an advisory lock on ``<run dir>/.lock``, held for the life of the process.

The lock is ``flock``: the kernel (or the NFS server, by lease) drops it when its holder exits, however it
exits, so a lock left by a killed process never blocks a rerun. Whoever holds it writes who they are into the
file (host, pid, since, SLURM job), so that the one refused can say who. The second command opens the file
without changing it and writes nothing else.

A SLURM requeue runs the same job id again, possibly on another node while the first node's NFS lease has not
yet expired: such a holder is waited for (``REQUEUE_WAIT_S``) instead of refused. A file system that has no
``flock`` (some Lustre mounts) cannot lock: the run goes on and says so once.
"""

from __future__ import annotations

import datetime
import errno
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

from trainer.config.errors import ConfigError
from trainer.rundir import LOCK_FILE

REQUEUE_WAIT_S = 120.0
"""How long a requeued job waits for its own earlier run's lock (NFSv4's lease is 90 s by default)."""
HOLDER_ENV = "TRAINER_LOCK_FD"
"""Set by a process that holds the lock for the processes it starts (they share it through the inherited
descriptor): they must not try to take it again."""


held: int | None = None
"""The descriptor of the lock this process holds (kept open until it exits), if any."""


class RunLocked(ConfigError):
    """Another process is training this run directory."""


def holder(run_dir: Path) -> dict:
    """Who holds (or last held) the lock of ``run_dir``, as recorded in the lock file ({} if nothing)."""
    try:
        return json.loads((run_dir / LOCK_FILE).read_text() or "{}")
    except (OSError, ValueError):
        return {}


def describe_holder(record: dict) -> str:
    if not record:
        return "another process that is starting"
    since = datetime.datetime.fromtimestamp(record.get("since", 0), datetime.timezone.utc)
    job = f", SLURM job {record['slurm_job_id']}" if record.get("slurm_job_id") else ""
    return f"pid {record.get('pid')} on {record.get('host')}{job} since {since:%Y-%m-%d %H:%M:%S} UTC"


def acquire(run_dir: Path, warn: Callable[[str], object] = print) -> int | None:
    """Take the lock of ``run_dir`` (creating the directory) and return its descriptor, kept open by the caller
    for as long as the run is trained; raise ``RunLocked`` naming the holder, or a ``ConfigError`` when the
    directory cannot be written. None when the file system cannot lock (``warn`` says so)."""
    import fcntl

    global held
    if HOLDER_ENV in os.environ:  # started by the process that holds it
        return None
    created = next((d for d in [*reversed(run_dir.parents), run_dir] if not d.exists()), None)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise ConfigError(
            "run.dir", str(run_dir), f"a directory this process can write ({err.strerror})"
        ) from None
    deadline = time.monotonic() + REQUEUE_WAIT_S
    job = os.environ.get("SLURM_JOB_ID")
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            record = holder(run_dir)
            if job and record.get("slurm_job_id") == job and time.monotonic() < deadline:
                time.sleep(2.0)  # our own job's earlier run, on a node whose lease has not expired yet
                continue
            os.close(fd)
            raise RunLocked(
                "run.dir", str(run_dir),
                f"a directory no other process is training; {describe_holder(record)} is training it "
                "(wait for it, stop it, or choose another run.name)",
            ) from None  # fmt: skip
        except OSError as err:
            if err.errno not in (errno.ENOLCK, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                raise
            warn(f"{run_dir} is on a file system without locks: a second command on it is not refused")
            break
    record = {"host": platform.node(), "pid": os.getpid(), "since": time.time(),
              "slurm_job_id": job}  # fmt: skip
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
    except OSError:
        pass  # who holds it is only for the message of a second command; the lock itself is held
    held = fd
    _made[fd] = (run_dir, created)
    return fd


_made: dict[int, tuple[Path, Path | None]] = {}
"""For each lock held: its run directory, and the first directory that taking the lock created."""


def release() -> None:
    """Let go of the lock this process holds (if any). A run that stopped before writing anything (bad input
    found late, a model too big for memory) leaves no trace of the directories its lock made."""
    global held
    if held is None:
        return
    fd, held = held, None
    run_dir, created = _made.pop(fd)
    os.close(fd)
    if created is not None:
        _remove_if_unused(run_dir, created)


def _remove_if_unused(run_dir: Path, created: Path) -> None:
    try:
        if [p.name for p in run_dir.iterdir()] != [LOCK_FILE]:
            return
        (run_dir / LOCK_FILE).unlink()
        for directory in [run_dir, *run_dir.parents]:
            directory.rmdir()  # only while empty
            if directory == created:
                break
    except OSError:
        pass
