"""Start one worker process per device on this machine with torchrun, and wait for them.

Training code never launches processes itself: workers read their rank from the environment torchrun sets
(the same way they do under SLURM's srun). torchrun also stops the other workers when one fails, so a crash
on any rank ends the job with a non-zero exit code.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

PLAN_ENV = "TRAINER_PLAN"
"""The launcher's decision about the run directory (fresh/resume), passed to the workers it starts."""

# Hydra flags that choose where the config comes from; the workers must compose from the same place.
_CONFIG_FLAGS = ("--config-dir", "-cd", "--config-path", "-cp", "--config-name", "-cn")


class WorkersFailed(RuntimeError):
    def __init__(self, returncode: int) -> None:
        self.returncode = returncode
        super().__init__(f"training workers failed with exit code {returncode}")


def config_source_args(argv: list[str]) -> list[str]:
    """The config-location flags of the original command line, in both ``--flag value`` and ``--flag=value`` form."""
    out: list[str] = []
    it = iter(argv)
    for arg in it:
        name = arg.split("=", 1)[0]
        if name in _CONFIG_FLAGS:
            out.append(arg)
            if "=" not in arg:
                out.append(next(it, ""))
    return out


def quote(value: str) -> str:
    """A Hydra override value that stays one literal string whatever it contains."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def run_workers(hydra_args: list[str], nproc: int, plan: dict) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "trainer", "train", *hydra_args]  # fmt: skip
    env = dict(os.environ)
    # Share the cores between workers instead of letting each one start a thread per core.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    env[PLAN_ENV] = json.dumps(plan)
    returncode = subprocess.run(cmd, env=env).returncode
    if returncode != 0:
        raise WorkersFailed(returncode)
