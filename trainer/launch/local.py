"""Start one training process per device on this machine, watch them, and stop them all if one fails.

Workers read their rank from the environment this launcher sets (the variables torchrun sets), just as they
do under SLURM's srun, so training never launches processes itself. The launcher

- forwards SIGUSR1, SIGUSR2, SIGTERM, SIGINT and SIGHUP to every worker (the workers run in their own
  session, so a terminal's Ctrl-C reaches them only through here, once);
- when a worker exits with an error or is killed, stops the others (SIGTERM, then SIGKILL after ``grace_s``)
  and names the rank that caused it in one line: a rank killed by a signal, or stopped, or still running
  while the others gave up waiting for it, before the ranks that only failed because it was gone;
- writes each rank's output to ``<log_dir>/rank-<N>.log``; only rank 0's reaches the console too, and of
  it no traceback: a failed run's console ends with its cause in one line, and names the log to read;
- exits with the workers' common code otherwise (0, or 75 when they stopped on a preemption signal).

Workers die with the launcher (PR_SET_PDEATHSIG on Linux): they get SIGTERM, save and stop.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO

from trainer import early_signals, exits
from trainer.config.compose import PLAN_ENV
from trainer.runlock import HOLDER_ENV

FORWARDED = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
LAUNCHER_VARS = (
    "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "NODE_RANK", "GROUP_RANK", PLAN_ENV, HOLDER_ENV,
    "SLURM_NTASKS", "SLURM_NPROCS", "SLURM_PROCID", "SLURM_LOCALID", "SLURM_NODEID", "SLURM_STEP_NUM_TASKS",
    "SLURM_NTASKS_PER_NODE",
)  # fmt: skip
"""What makes a process a rank of some launcher: torchrun's variables, ours, and SLURM's task variables. A
process we start as a run of its own (a local worker, a sweep's trial) must see none of the launcher it runs
in, or Lightning would take SLURM's (one task, rank 0) over ours and every worker would be rank 0."""
SETTLE_S = 1.0
"""After a first failure, how long to wait for the others' codes before naming the cause: a rank killed by a
signal makes its peers fail within milliseconds, and may be noticed after them."""


_RANK_PREFIX = re.compile(r"^\[rank\d+\]: ?")
"""torch.distributed prefixes what a rank prints as it fails with ``[rank0]: ``."""
_RANK_PREFIX_BYTES = re.compile(rb"^\[rank\d+\]: ?")


def outside_launchers(env: dict[str, str]) -> dict[str, str]:
    """``env`` without any launcher's rank variables (``LAUNCHER_VARS``)."""
    return {k: v for k, v in env.items() if k not in LAUNCHER_VARS}


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


def run_workers(
    hydra_args: list[str],
    nproc: int,
    plan: dict,
    log_dir: Path,
    lock_fd: int | None = None,
    grace_s: float = 10.0,
) -> int:
    """Run ``trainer train <hydra_args>`` as ``nproc`` ranks; return their exit code or raise WorkersFailed.

    ``lock_fd``, the run directory's lock, is shared with the workers: it is held until the last one exits.
    """
    port = free_port()
    threads = max(1, (os.cpu_count() or 1) // nproc)
    log_dir.mkdir(parents=True, exist_ok=True)
    console = _Console()
    procs: list[subprocess.Popen] = []
    pumps: list[threading.Thread] = []
    for rank in range(nproc):
        env = outside_launchers(dict(os.environ))
        env.update(
            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(nproc), RANK=str(rank),
            LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(nproc), NODE_RANK="0", GROUP_RANK="0",
        )  # fmt: skip
        env[PLAN_ENV] = json.dumps(plan)
        if lock_fd is not None:
            env[HOLDER_ENV] = str(lock_fd)
        # Share the cores instead of every rank starting a thread per core.
        env.setdefault("OMP_NUM_THREADS", str(threads))
        cmd = [sys.executable, "-m", "trainer", "train", *hydra_args]
        log = (log_dir / f"rank-{rank}.log").open("ab")
        # Rank 0's stdout (progress, the summary) stays the console's; its stderr passes through a filter.
        stdout, stderr = (None, subprocess.PIPE) if rank == 0 else (log, subprocess.STDOUT)
        proc = subprocess.Popen(
            cmd, env=env, stdout=stdout, stderr=stderr, preexec_fn=die_with_parent,
            pass_fds=() if lock_fd is None else (lock_fd,),
        )  # fmt: skip
        procs.append(proc)
        if rank == 0:
            pumps.append(threading.Thread(target=console.pump, args=(proc.stderr, log), daemon=True))
            pumps[-1].start()
        else:
            log.close()

    def forward(signum: int, frame: object) -> None:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in FORWARDED}
    early_signals.redeliver()  # one that came while this launcher was starting goes to the workers
    failed_at: float | None = None
    try:
        while any(p.poll() is None for p in procs):
            codes = [p.poll() for p in procs]
            if failed_at is None and any(c not in (None, exits.OK, exits.PREEMPTED) for c in codes):
                failed_at = time.monotonic()
                console.quiet = True  # from here on the console gets only the cause
            if failed_at is not None and time.monotonic() - failed_at >= SETTLE_S:
                cause = _cause(procs, log_dir)  # before stopping them: who was still running, or stopped
                _stop(procs, grace_s)
                break
            time.sleep(0.05)
        else:
            cause = _cause(procs, log_dir)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    for pump in pumps:
        pump.join(timeout=5)
    codes = [p.returncode for p in procs]
    if cause is not None:
        rank, code, why = cause
        error = _last_exception(log_dir / f"rank-{rank}.log") if code > 0 else None
        message = f"rank {rank} (pid {procs[rank].pid}) {why}" + (f": {error}" if error else "")
        message += f"; the other ranks were stopped (each rank's output: {log_dir}/rank-<N>.log)"
        raise WorkersFailed(message, code if code > 0 else 128 - code)
    return exits.PREEMPTED if exits.PREEMPTED in codes else exits.OK


def _cause(procs: list[subprocess.Popen], log_dir: Path) -> tuple[int, int, str] | None:
    """The rank that made the run fail, its code and what happened to it. In order: one killed by a signal;
    one that failed of its own error (not of losing a peer); one stopped, or still running while the others
    gave up on it; else the first that failed."""
    codes = [p.poll() for p in procs]
    failed = [(r, c) for r, c in enumerate(codes) if c not in (None, exits.OK, exits.PREEMPTED)]
    if not failed:
        return None
    for rank, code in failed:
        if code < 0:
            return rank, code, describe_exit(code)
    errors = {r: _last_exception(log_dir / f"rank-{r}.log") or "" for r, _ in failed}
    for rank, code in failed:
        if not _lost_a_peer(errors[rank]):
            return rank, code, describe_exit(code)
    first, first_code = failed[0]
    for rank, code in enumerate(codes):
        if code is None:
            stopped = _process_state(procs[rank].pid) in ("T", "t")
            what = "was stopped (SIGSTOP)" if stopped else "was still running"
            return rank, first_code, f"stopped answering: it {what} while rank {first} gave up waiting for it"
    return first, first_code, describe_exit(first_code)


_PEER_LOST = ("connection reset", "connection closed", "broken pipe", "timed out", "timeout", "gloo/transport",
              "nccl", "distbackenderror")  # fmt: skip
"""What a rank's error says when it only failed because another rank was gone or stopped answering."""


def _lost_a_peer(error: str) -> bool:
    return any(word in error.lower() for word in _PEER_LOST)


def _last_exception(log: Path) -> str | None:
    """What a rank's log says it failed with: its last ``error:`` line (our one-line errors) or the
    exception of its last traceback, whichever came last; None when neither."""
    try:
        with log.open("rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - (1 << 16)))
            text = f.read().decode(errors="replace")
    except OSError:
        return None
    lines = [_RANK_PREFIX.sub("", line, count=1) for line in text.splitlines()]
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].startswith("error: "):
            return lines[i][len("error: ") :][:300]
        if lines[i].startswith("Traceback (most recent call last)"):
            ends = [line.strip() for line in lines[i + 1 :] if line.strip() and not line[:1].isspace()]
            return ends[0][:300] if ends else None
    return None


def _process_state(pid: int) -> str | None:
    """The one-letter state of a process (``R``, ``S``, ``T`` stopped, ...) from /proc; None elsewhere."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


class _Console:
    """Passes rank 0's stderr to the console and to its log, holding back from the console its tracebacks,
    its ``error:`` lines and, once the run has failed, everything: the launcher says the cause in one line."""

    TRACEBACK = b"Traceback (most recent call last)"

    def __init__(self) -> None:
        self.quiet = False
        self.in_traceback = False

    def pump(self, source: IO[bytes], log: IO[bytes]) -> None:
        pending = b""
        with log:
            while data := os.read(source.fileno(), 1 << 16):
                log.write(data)
                log.flush()
                pending += data
                # Progress bars end their updates with \r: pass each piece on as soon as it is complete.
                *pieces, pending = _split_keep(pending)
                for piece in pieces:
                    self._show(piece)
            if pending:
                self._show(pending)

    def _show(self, piece: bytes) -> None:
        text = _RANK_PREFIX_BYTES.sub(b"", piece, count=1)
        if text.startswith(self.TRACEBACK):
            self.in_traceback = True
        elif self.in_traceback and text.strip() and not text[:1].isspace():
            # An unindented line ends a traceback: its exception ("ValueError: ..."), held back as well.
            if not text.startswith((b"During handling", b"The above")):
                self.in_traceback = False
            return
        if not (self.quiet or self.in_traceback or piece.startswith(b"error: ")):
            sys.stderr.buffer.write(piece)
            sys.stderr.flush()


def _split_keep(data: bytes) -> list[bytes]:
    """``b"a\rb\nc"`` -> ``[b"a\r", b"b\n", b"c"]``: complete pieces, then the unfinished rest."""
    out, start = [], 0
    for i, byte in enumerate(data):
        if byte in (10, 13):
            out.append(data[start : i + 1])
            start = i + 1
    out.append(data[start:])
    return out


def _stop(procs: list[subprocess.Popen], grace_s: float) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGCONT)  # a stopped process cannot act on SIGTERM
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(p.poll() is None for p in procs):
        time.sleep(0.05)
    for p in procs:
        if p.poll() is None:
            p.kill()
