"""``trainer status [dir ...]``: where runs, sweeps and their SLURM jobs stand.

A run directory's own files say what training did (run.json: status and attempts; metrics.csv: the last
step and losses); its ``slurm/jobs.json`` says which jobs ran it, and the scheduler (``squeue``/``scontrol``,
``sacct`` where there is accounting) says what became of the newest one. Imports no torch; writes nothing.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

from trainer import rundir
from trainer.files import read_json
from trainer.launch import slurm
from trainer.sweep import ledger as sweep_ledger

USAGE = """\
usage: trainer status [DIR ...]

DIR is a run directory, a sweep directory (of `trainer submit -m`), or a folder of runs (default: runs).
Shows each run's state, its newest SLURM job (state, restarts, exit code), the last step and losses, and
where the job's log is.
"""


@functools.cache
def scheduler_answers() -> bool:
    """Asked once per command: a SLURM client without a reachable controller retries each call for a minute."""
    return slurm.reachable()


def newest_job(run_dir: Path) -> str | None:
    jobs = (read_json(rundir.jobs_file(run_dir)) or {}).get("jobs", [])
    return jobs[-1]["job_id"] if jobs else None


def run_status(run_dir: Path, extra: tuple[str, ...] = (), known: dict[str, dict] | None = None) -> dict:
    """``known``: scheduler records already fetched for many jobs (a sweep's, ``slurm.records_by_task``)."""
    state = read_json(run_dir / rundir.STATE_FILE) or {}
    jobs = (read_json(rundir.jobs_file(run_dir)) or {}).get("jobs", [])
    info: dict = {
        "name": state.get("name") or run_dir.name,
        "dir": str(run_dir),
        "state": state.get("status"),
    }
    info.update(rundir.last_metrics(run_dir / rundir.METRICS_FILE, ("train/loss", "val/loss", *extra)))
    # Local runs: each command that continued the run is an attempt; a multi-process run logs each rank.
    info["restarts"] = max(0, len(state.get("attempts", [])) - 1) if state else None
    rank_log = run_dir / rundir.LOGS_DIR / "rank-0.log"
    if rank_log.is_file():
        info["log"] = str(rank_log)
    if jobs:
        job = jobs[-1]
        info["job"], info["log"] = job["job_id"], job.get("log")
        if known is not None:
            records = [known[job["job_id"]]] if job["job_id"] in known else []
        else:
            records = slurm.job_records(job["job_id"]) if scheduler_answers() else []
        if records:
            rec = records[0]
            info["job_state"] = rec.get("JobState")
            info["restarts"] = rec.get("Restarts")
            info["exit"] = rec.get("ExitCode")
            if rec.get("Reason") and rec.get("Reason") != "None":
                info["reason"] = rec["Reason"]
        if info["state"] is None:  # submitted, not started yet (or never started)
            info["state"] = "submitted"
    return info


def fmt(value: object, spec: str = "") -> str:
    if value is None:
        return "-"
    return format(value, spec) if spec else str(value)


def print_table(rows: list[dict], first: str = "RUN", metric: str | None = None) -> None:
    """One line per run; the job columns only where some run has a SLURM job."""
    columns = [(first, lambda r: r.get("label", r["name"])), ("STATE", lambda r: fmt(r.get("state")))]
    if any(r.get("job") for r in rows):
        columns += [("JOB", lambda r: fmt(r.get("job"))), ("JOB STATE", lambda r: fmt(r.get("job_state")))]
    columns += [("RESTARTS", lambda r: fmt(r.get("restarts")))]
    columns += [("STEP", lambda r: fmt(r.get("step"))), ("TRAIN LOSS", lambda r: fmt(r.get("train/loss"), ".4f")),
                ("VAL LOSS", lambda r: fmt(r.get("val/loss"), ".4f"))]  # fmt: skip
    if metric and metric not in ("train/loss", "val/loss"):
        columns.append((metric.upper(), lambda r: fmt(r.get(metric), ".4f")))
    table = [[name for name, _ in columns]] + [[cell(r) for _, cell in columns] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(columns))]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


def show_run(run_dir: Path) -> None:
    r = run_status(run_dir)
    print(f"run {r['name']}  ({r['dir']})")
    print(f"  state      {fmt(r.get('state'))}")
    if r.get("job"):
        extra = f"  restarts {fmt(r.get('restarts'))}  exit {fmt(r.get('exit'))}"
        reason = f"  reason {r['reason']}" if r.get("reason") else ""
        print(f"  job        {r['job']}  {fmt(r.get('job_state'), '') if r.get('job_state') else 'unknown to the scheduler'}"
              f"{extra if r.get('job_state') else ''}{reason}")  # fmt: skip
    if not r.get("job"):
        print(f"  restarts   {fmt(r.get('restarts'))}")
    print(f"  step       {fmt(r.get('step'))}   train/loss {fmt(r.get('train/loss'), '.4f')}"
          f"   val/loss {fmt(r.get('val/loss'), '.4f')}")  # fmt: skip
    if r.get("log"):
        print(f"  log        {r['log']}")


def show_sweep(sweep_dir: Path) -> None:
    ledger = sweep_ledger.read(sweep_dir)
    trials = ledger.get("trials", [])
    jobs = ledger.get("jobs", [])
    print(f"sweep {ledger.get('name', sweep_dir.name)}  ({sweep_dir}): {len(trials)} trials"
          + (f", last job {jobs[-1]['job_id']} (array {jobs[-1].get('array')})" if jobs else ""))  # fmt: skip
    metric = ledger.get("metric")
    # The scheduler asked once per array job (of each trial's newest job), not once per trial.
    newest = [newest_job(Path(t["run_dir"])) for t in trials if t.get("run_dir")]
    known = slurm.records_by_task([j for j in newest if j]) if scheduler_answers() else {}
    rows = []
    for t in trials:
        r = (
            run_status(Path(t["run_dir"]), (metric,) if metric else (), known)
            if t.get("run_dir")
            else {"name": "-"}
        )
        r["state"] = sweep_ledger.trial_state(t, r.get("state"))
        r["label"] = f"{t['index']}: {' '.join(t.get('overrides', [])) or r['name']}"
        rows.append(r)
    print_table(rows, first="TRIAL", metric=metric)


def find(folder: Path, depth: int = 3) -> tuple[list[Path], list[Path]]:
    """The runs and sweeps in ``folder`` and in its plain subfolders (``runs/debug/``), not inside either."""
    runs: list[Path] = []
    sweeps: list[Path] = []
    for path in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))):
        if (path / sweep_ledger.FILE).is_file():
            sweeps.append(path)
        elif (path / rundir.STATE_FILE).is_file() or rundir.jobs_file(path).is_file():
            runs.append(path)
        elif depth > 1:
            more_runs, more_sweeps = find(path, depth - 1)
            runs += more_runs
            sweeps += more_sweeps
    return runs, sweeps


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE, end="")
        return 0
    targets = [Path(a) for a in argv] or [Path("runs")]
    code = 0
    for target in targets:
        if (target / sweep_ledger.FILE).is_file():
            show_sweep(target)
        elif (target / rundir.STATE_FILE).is_file() or rundir.jobs_file(target).is_file():
            show_run(target)
        elif target.is_dir():
            runs, sweeps = find(target)
            if runs:
                print_table([{**run_status(p), "label": str(p.relative_to(target))} for p in runs])
            for s in sweeps:
                show_sweep(s)
            if not runs and not sweeps:
                print(f"no runs or sweeps in {target}")
        else:
            print(f"error: {target}: expected a run directory, a sweep directory or a folder of runs",
                  file=sys.stderr)  # fmt: skip
            code = 2
    return code
