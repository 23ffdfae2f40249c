"""Start one training process per device on this machine, watch them, and stop them all if one fails.

Workers read their rank from the environment this launcher sets (the variables torchrun sets), just as they
do under SLURM's srun, so training never launches processes itself. The launcher

- forwards SIGUSR1, SIGUSR2, SIGTERM, SIGINT and SIGHUP to every worker (the workers run in their own
  session, so a terminal's Ctrl-C reaches them only through here, once);
- when a worker exits with an error or is killed, names it, stops the others (SIGTERM, then SIGKILL after
  ``grace_s``) and exits with that worker's code: no rank is left waiting in a collective;
- exits with the workers' common code otherwise (0, or 75 when they stopped on a preemption signal).

Workers die with the launcher (PR_SET_PDEATHSIG on Linux): they get SIGTERM, save and stop.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import time

from trainer import exits
from trainer.config.compose import PLAN_ENV

FORWARDED = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class WorkersFailed(RuntimeError):
    def __init__(self, message: str, returncode: int) -> None:
        super().__init__(message)
        self.returncode = returncode


def quote(value: str) -> str:
    """A Hydra override value that stays one literal string whatever it contains."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def die_with_parent() -> None:
    """In the child, before exec: receive SIGTERM when the launcher dies, however it dies (Linux only)."""
    os.setsid()
    if sys.platform.startswith("linux"):
        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def describe_exit(code: int) -> str:
    if code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"


def run_workers(hydra_args: list[str], nproc: int, plan: dict, grace_s: float = 10.0) -> int:
    """Run ``trainer train <hydra_args>`` as ``nproc`` ranks; return their exit code or raise WorkersFailed."""
    port = free_port()
    threads = max(1, (os.cpu_count() or 1) // nproc)
    procs: list[subprocess.Popen] = []
    for rank in range(nproc):
        env = dict(os.environ)
        env.update(
            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(nproc), RANK=str(rank),
            LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(nproc), NODE_RANK="0", GROUP_RANK="0",
        )  # fmt: skip
        env[PLAN_ENV] = json.dumps(plan)
        # Share the cores instead of every rank starting a thread per core.
        env.setdefault("OMP_NUM_THREADS", str(threads))
        cmd = [sys.executable, "-m", "trainer", "train", *hydra_args]
        procs.append(subprocess.Popen(cmd, env=env, preexec_fn=die_with_parent))

    def forward(signum: int, frame: object) -> None:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in FORWARDED}
    failed: tuple[int, int] | None = None
    try:
        while any(p.poll() is None for p in procs):
            for rank, p in enumerate(procs):
                code = p.poll()
                if failed is None and code not in (None, exits.OK, exits.PREEMPTED):
                    failed = (rank, code)
                    _stop(procs, grace_s)
            time.sleep(0.05)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    codes = [p.returncode for p in procs]
    if failed is None:
        failed = next(((r, c) for r, c in enumerate(codes) if c not in (exits.OK, exits.PREEMPTED)), None)
    if failed is not None:
        rank, code = failed
        message = f"rank {rank} (pid {procs[rank].pid}) {describe_exit(code)}; the other ranks were stopped"
        raise WorkersFailed(message, code if code > 0 else 128 - code)
    return exits.PREEMPTED if exits.PREEMPTED in codes else exits.OK


def _stop(procs: list[subprocess.Popen], grace_s: float) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(p.poll() is None for p in procs):
        time.sleep(0.05)
    for p in procs:
        if p.poll() is None:
            p.kill()
