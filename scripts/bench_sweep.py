"""Big sweeps: how long `trainer submit --dry-run -m` takes for 10, 1,000 (and 10,000) trials, how large its
sbatch script is, and how long `trainer status` and `trainer report` take on a 10,000-trial sweep.

    python scripts/bench_sweep.py [--big 10000] [--status-trials 10000]

The dry runs compose and check every trial (a random sweep over the learning rate and the depth of the default
GPT) with no scheduler reachable (SLURM_CONF points nowhere: nothing is submitted). The status/report sweep is
written here as the files trials leave (sweep.json, and per run run.json, metrics.csv of 20 rows, and
slurm/jobs.json naming array tasks of 10 array jobs), so the scheduler is asked about those 10 array jobs, which
it does not know. Prints one line per figure.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SWEEP = ["cluster=slurm", "sweep=random", "optim.lr=interval(1e-4,1e-2)", "model.n_layer=choice(2,4)"]


def trainer(args: list[str], cwd: Path) -> tuple[float, subprocess.CompletedProcess]:
    env = {**os.environ, "SLURM_CONF": "/nonexistent/slurm.conf", "MPLBACKEND": "Agg"}
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "trainer", *args], cwd=cwd, env=env, capture_output=True,
                          text=True)  # fmt: skip
    if proc.returncode != 0:
        raise SystemExit(f"`trainer {' '.join(args)}` failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return time.perf_counter() - started, proc


def dry_run(trials: int, cwd: Path) -> tuple[float, int]:
    seconds, proc = trainer(["submit", "--dry-run", "-m", *SWEEP, f"sweep.num_trials={trials}"], cwd)
    return seconds, len(proc.stdout.encode())


def fake_sweep(root: Path, trials: int, arrays: int = 10) -> Path:
    """A finished sweep as its trials leave it on disk."""
    sweep = root / "sweep-big"
    per_array = -(-trials // arrays)
    entries = []
    for i in range(trials):
        run_dir = sweep / f"trial-{i:05d}"
        (run_dir / "slurm").mkdir(parents=True)
        job = f"{1000 + i // per_array}_{i % per_array}"
        (run_dir / "run.json").write_text(json.dumps({"name": run_dir.name, "status": "finished", "attempts": [{}],
                                                      "summary": {"steps": 200, "wall_time_s": 60.0}}))  # fmt: skip
        rows = ["step,epoch,train/loss,val/loss"] + [
            f"{s * 10},0,{3 - s * 0.1:.3f},{3.1 - s * 0.1:.3f}" for s in range(20)
        ]
        (run_dir / "metrics.csv").write_text("\n".join(rows) + "\n")
        (run_dir / "slurm" / "jobs.json").write_text(json.dumps({"jobs": [{"job_id": job, "log": "x.out"}]}))
        entries.append({"index": i, "overrides": [f"optim.lr={1e-4 * (1 + i % 100)}"], "run_name": run_dir.name,
                        "run_dir": str(run_dir), "state": "submitted", "job_id": job})  # fmt: skip
    ledger = {"name": sweep.name, "kind": "random", "metric": "val/loss", "direction": "minimize",
              "trials": entries, "jobs": [{"job_id": str(1000 + a), "array": f"0-{per_array - 1}"} for a in range(arrays)]}  # fmt: skip
    (sweep / "sweep.json").write_text(json.dumps(ledger))
    return sweep


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--big", type=int, default=1000, help="trials of the big dry run (also try 10000)")
    parser.add_argument("--status-trials", type=int, default=10000)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-sweep-"))

    small, small_bytes = dry_run(10, work)
    big, big_bytes = dry_run(args.big, work)
    print(f"dry run, 10 trials           {small:8.2f} s   script {small_bytes:,} bytes")
    print(f"dry run, {args.big:,} trials{' ' * max(0, 14 - len(f'{args.big:,}'))}{big:8.2f} s   script {big_bytes:,} bytes"
          f"   ({big / small:.1f}x the 10-trial run; target <= 5x and < 10 s)")  # fmt: skip

    sweep = fake_sweep(work, args.status_trials)
    status, proc = trainer(["status", str(sweep)], work)
    assert proc.stdout.count("\n") >= args.status_trials, proc.stdout[-500:]
    print(f"trainer status, {args.status_trials:,} trials  {status:8.2f} s")
    report, _ = trainer(["report", str(sweep)], work)
    print(f"trainer report, {args.status_trials:,} trials  {report:8.2f} s   (table and plots)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
