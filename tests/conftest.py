"""Shared fixtures: run the real ``trainer`` command in a scratch directory, read what it wrote.

Multi-process training is always a subprocess of the CLI (never Lightning inside pytest: its DDP launcher
would re-execute pytest itself). Every tool that writes outside the project by default (torchrun's and
inductor's temp dirs, pytest's) is pointed into the test's own folder.
"""

from __future__ import annotations

import csv
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str
    cwd: Path

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    def run_dirs(self, root: str = "runs") -> list[Path]:
        base = self.cwd / root
        return (
            sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith("_"))
            if base.exists()
            else []
        )


def read_metrics(run_dir: Path) -> list[dict[str, str]]:
    with (run_dir / "metrics.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def column(rows: list[dict[str, str]], key: str) -> list[float]:
    return [float(r[key]) for r in rows if r.get(key)]


# What a launcher (ours, torchrun, srun) sets for its workers: a test's own runs must not inherit it from
# whatever started pytest (pytest inside a SLURM job, say).
LAUNCHER_VARS = (
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "SLURM_PROCID",
    "SLURM_NTASKS",
    "SLURM_JOB_ID",
    "TRAINER_PLAN",
)


def clean_env(tmp_path: Path, drop: tuple[str, ...] = (), **extra: str) -> dict:
    """This process's environment for a test's subprocess: temp files in the test's folder, no launcher
    variables (nor ``drop``), plus ``extra``."""
    env = dict(os.environ, TMPDIR=str(tmp_path), PYTHONUNBUFFERED="1", **extra)
    for var in (*LAUNCHER_VARS, *drop):
        env.pop(var, None)
    return env


@pytest.fixture
def cli(tmp_path: Path):
    """Run ``python -m trainer ...`` in ``tmp_path`` (or ``cwd``); returns a Result."""
    scratch = tmp_path / "_tmp"
    scratch.mkdir()

    def run(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 600) -> Result:
        full_env = clean_env(scratch, TORCHINDUCTOR_CACHE_DIR=str(scratch / "inductor"))
        full_env.update(env or {})
        where = cwd or tmp_path
        proc = subprocess.run(
            [sys.executable, "-m", "trainer", *args],
            cwd=where,
            env=full_env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        return Result(proc.returncode, proc.stdout, proc.stderr, where)

    return run


@pytest.fixture
def text_corpus(tmp_path: Path) -> Path:
    """A small corpus with real structure (numbers written out in words), made here so it never changes."""
    ones = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    lines = [f"{i} is {' '.join(ones[int(d)] for d in str(i))}." for i in range(4000)]
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def start_train(cwd: Path, args: list[str], env: dict) -> subprocess.Popen:
    """``trainer train`` in the background, for tests that signal or kill it mid-run."""
    return subprocess.Popen([sys.executable, "-m", "trainer", "train", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip


def wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 120) -> int:
    """Block until the run's metrics.csv shows ``step`` or later; return the newest step seen."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else proc.returncode
        try:
            steps = [int(r["step"]) for r in read_metrics(run_dir)]
        except (OSError, KeyError, ValueError):
            steps = []
        if steps and steps[-1] >= step:
            return steps[-1]
        time.sleep(0.02)
    raise AssertionError(f"step {step} not reached in {timeout}s")


def worker_pid(launcher: subprocess.Popen, rank: int) -> int:
    """The pid of one rank's worker process under the local launcher (found by its RANK variable)."""
    children = subprocess.run(
        ["pgrep", "-P", str(launcher.pid)], capture_output=True, text=True
    ).stdout.split()
    for pid in children:
        if f"\0RANK={rank}\0".encode() in b"\0" + Path(f"/proc/{pid}/environ").read_bytes():
            return int(pid)
    raise AssertionError(f"no worker with RANK={rank} among {children}")


def assert_bitwise_equal(a: object, b: object, where: str = "") -> None:
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            assert_bitwise_equal(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_bitwise_equal(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"{where} differs (max abs diff {(a.float() - b.float()).abs().max()})"
    else:
        assert a == b, where


def interrupted_run(
    tmp_path: Path, env: dict, args: list[str], stops: list[tuple[int, str]], name: str
) -> Path:
    """Run, stopping at each (step, how) with how in {"usr1", "term", "kill"}; then run to the end."""
    run_dir = tmp_path / "runs" / name
    for step, how in stops:
        proc = start_train(tmp_path, [*args, f"run.name={name}"], env)
        seen = wait_for_step(run_dir, step, proc)
        sig = {"usr1": signal.SIGUSR1, "term": signal.SIGTERM, "kill": signal.SIGKILL}[how]
        os.kill(proc.pid, sig)
        out, _ = proc.communicate(timeout=120)
        expected = -signal.SIGKILL if how == "kill" else 75
        assert proc.returncode == expected, out
        if how != "kill":
            assert "preempted by a signal: checkpoint saved at step" in out
            saved = max(int(r["step"]) for r in read_metrics(run_dir))
            assert saved >= seen
    proc = start_train(tmp_path, [*args, f"run.name={name}"], env)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    assert "resuming" in out
    return run_dir


def reference_run(tmp_path: Path, env: dict, args: list[str]) -> Path:
    proc = start_train(tmp_path, [*args, "run.name=reference"], env)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    return tmp_path / "runs" / "reference"


CLUSTER = REPO / "scripts" / "slurm-test-cluster"


@pytest.fixture(scope="session")
def slurm_conf() -> str:
    """The test cluster for the session: one already up at the default root (a developer's), else a fresh one
    under its own root, taken down after. Its own root and slot let two test sessions share a machine."""
    missing = [b for b in ("slurmctld", "slurmd", "sbatch", "munged") if shutil.which(b) is None]
    why = "the SLURM tests need root" if os.geteuid() != 0 else None
    why = why or (
        f"missing {', '.join(missing)}: run scripts/slurm-test-cluster install" if missing else None
    )
    if why:
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)
    env = {k: v for k, v in os.environ.items() if k != "SLURM_TEST_ROOT"}
    if subprocess.run([str(CLUSTER), "status"], capture_output=True, env=env).returncode != 0:
        root = tempfile.mkdtemp(prefix="trainer-slurm-test-")
        os.chmod(root, 0o755)  # munged runs as user munge and must reach its socket under the root
        env["SLURM_TEST_ROOT"] = root
        up = subprocess.run([str(CLUSTER), "up"], capture_output=True, text=True, timeout=120, env=env)
        if up.returncode != 0:
            subprocess.run([str(CLUSTER), "down"], capture_output=True, timeout=120, env=env)
        assert up.returncode == 0, up.stdout + up.stderr
    env_line = subprocess.run([str(CLUSTER), "env"], capture_output=True, text=True, check=True, env=env)
    yield env_line.stdout.strip().split("=", 1)[1]
    if "SLURM_TEST_ROOT" in env:
        subprocess.run([str(CLUSTER), "down"], capture_output=True, timeout=120, env=env)


# Under `pytest -n` (make test) the SLURM tests share one test cluster: they all live in this file, which one
# worker runs in turn (a second cluster brought up at the same moment would race for its slot).
SLURM_TESTS = "tests/test_slurm.py"


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist, called only where it is installed
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    from xdist.scheduler import LoadScopeScheduling

    class OneClusterScheduling(LoadScopeScheduling):
        """Each test is a unit of work of its own, except the SLURM tests, which are one."""

        def _split_scope(self, nodeid: str) -> str:
            return SLURM_TESTS if nodeid.startswith(SLURM_TESTS + "::") else nodeid

    return OneClusterScheduling(config, log)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The longest tests start first (the SLURM tests, then the slow tier, the README's ~50 commands first of
    those), so that under ``pytest -n`` no worker is left with a long test at the end while the others idle."""
    for item in items:
        if item.get_closest_marker("slurm") and not item.nodeid.startswith(SLURM_TESTS + "::"):
            raise pytest.UsageError(f"{item.nodeid}: a slurm-marked test belongs in {SLURM_TESTS}")

    def first(item: pytest.Item) -> int:
        if item.get_closest_marker("slurm"):
            return 0
        if item.get_closest_marker("slow"):
            return 1 if item.path.name == "test_readme.py" else 2
        return 3

    items.sort(key=first)
