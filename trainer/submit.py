"""``trainer submit``: the same command as ``trainer train``, sent to a SLURM cluster as one sbatch job.

Order matters, as in ``trainer train``: every trial's config is composed and checked, and the request is
checked against the scheduler, before anything is written or submitted. Then the script is written into the
run's directory, submitted with ``sbatch --parsable``, and the command returns with the job id; it never
waits for the job. With ``-m`` the sweep's trials become one job array, one array task per trial.
Imports no torch or Lightning.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path

from trainer import exits, rundir
from trainer.config import schema
from trainer.config.compose import compose, normalize, session
from trainer.config.errors import ConfigError, report
from trainer.files import atomic_write_text, read_json
from trainer.launch import slurm
from trainer.secrets import is_secret_override, redact_override
from trainer.sweep import ledger
from trainer.sweep.trials import SweepPlan, pinned_args, plain, plan_sweep, single

USAGE = """\
usage: trainer submit [--dry-run] [-m] [-cd DIR] [key=value ...]

Send `trainer train [key=value ...]` to a SLURM cluster described by a cluster profile (conf/cluster/ or
your config dir) and return at once with the job id. The job keeps the run's directory, so submitting the
same command again continues the run where it stopped.

options:
  --dry-run            print the sbatch script and the checks; write and submit nothing
  -m, --multirun       a sweep (a=1,2 b=x,y): one job array, one array task per trial
  -cd, --config-dir D  also look for config files (your own cluster/, model/, ...) in D

examples:
  trainer submit cluster=slurm cluster.partition=gpu trainer.devices=4 cluster.gpus_per_node=4
  trainer submit --dry-run cluster=slurm strategy=ddp trainer.num_nodes=2
  trainer submit -m cluster=slurm optim.lr=1e-3,3e-4 model.n_layer=2,4
"""


PLANNED_TRIALS = 8
"""With ``cluster.gpu_mem_gb``, the memory of at most this many trials of a sweep is planned before submitting."""


class UsageError(Exception):
    pass


@dataclasses.dataclass
class Options:
    dry_run: bool = False
    multirun: bool = False
    config_dir: str | None = None
    overrides: list[str] = dataclasses.field(default_factory=list)


def parse_args(argv: list[str]) -> Options:
    opts = Options()
    it = iter(argv)
    for arg in it:
        name, eq, value = arg.partition("=")
        if arg == "--dry-run":
            opts.dry_run = True
        elif arg in ("-m", "--multirun"):
            opts.multirun = True
        elif name in ("-cd", "--config-dir"):
            opts.config_dir = value if eq else next(it, None)
            if not opts.config_dir:
                raise UsageError(f"{name} needs a directory")
            if not Path(opts.config_dir).is_dir():
                raise UsageError(f"{name} {opts.config_dir}: no such directory")
        elif arg.startswith("-"):
            raise UsageError(f"option {arg!r}: expected --dry-run, -m/--multirun or -cd/--config-dir DIR")
        else:
            opts.overrides.append(arg)
    return opts


def previous_job(run_dir: Path, queued: dict[str, str] | None = None) -> tuple[str, str] | None:
    """The job of this run still in the queue, as (job id, state): two jobs must never share a run dir.
    ``queued``: the queue as ``slurm.queued_states`` read it once (else squeue is asked for this job)."""
    jobs = (read_json(rundir.jobs_file(run_dir)) or {}).get("jobs", [])
    if jobs:
        job_id = jobs[-1]["job_id"]
        state = queued.get(job_id) if queued is not None else slurm.active(job_id)
        if state is not None:
            return job_id, state
    return None


# ---------------------------------------------------------------------------------------------- main


@dataclasses.dataclass
class Submission:
    job: slurm.Job
    script: str
    notes: list[str]
    sweep_dir: Path | None
    sweep_trials: list[slurm.Trial]
    """Every trial of a sweep (finished ones included), for the ledger."""
    kind: str = "grid"
    metric: str = "val/loss"
    direction: str = "minimize"
    more: list[tuple[slurm.Job, str]] = dataclasses.field(default_factory=list)
    """Further job arrays (and their scripts) of a sweep larger than the cluster's MaxArraySize."""


def prepare(opts: Options) -> Submission | None:
    """Everything that can fail on bad input; writes nothing. ``None``: nothing left to submit."""
    overrides = normalize(opts.overrides)
    slurm.check_words("overrides", overrides)
    # The script keeps the command line (in the run dir and at the scheduler), and ps shows it on the nodes.
    for override in overrides:
        if is_secret_override(override):
            raise ConfigError(override.split("=", 1)[0].lstrip("+~"), "<hidden>", "no secrets in a job's command "
                              "line: export it in your shell (sbatch passes your environment to the job)")  # fmt: skip
    notes: list[str] = []
    with session():
        if opts.multirun:
            sweep = plan_sweep(overrides, opts.config_dir, "cluster")
            composed, sweep_dir = sweep.composed, sweep.dir
        else:
            single(overrides)
            composed, sweep_dir, sweep = [compose(overrides, opts.config_dir, where="cluster")], None, None

    base = composed[0].conf
    settings = sweep.settings if sweep else base.sweep
    sweep_facts = (settings.kind, settings.metric, settings.direction)
    for i, c in enumerate(composed[1:], start=1):
        for key, a, b in (
            ("cluster", dataclasses.asdict(base.cluster), dataclasses.asdict(c.conf.cluster)),
            ("trainer.devices", base.trainer.devices, c.conf.trainer.devices),
            ("trainer.num_nodes", base.trainer.num_nodes, c.conf.trainer.num_nodes),
        ):
            if a != b:
                raise ConfigError(
                    key, None, f"the same value in every trial of one job array (trial {i} differs)"
                )

    if base.cluster.gpu_mem_gb:  # a job that cannot fit must not wait in the queue to find out
        from trainer.plan import check_job

        distinct = {tuple(c.own_overrides): c for c in composed}
        notes += [check_job(c, opts.config_dir) for c in list(distinct.values())[:PLANNED_TRIALS]]
        if len(distinct) > PLANNED_TRIALS:
            notes.append(f"memory checked for the first {PLANNED_TRIALS} of {len(distinct)} trials")

    if sweep is not None:  # a trial that a local sweep (trainer train -m) is running must not get a job too
        for entry in ledger.read(sweep.dir).get("trials", []):
            if entry.get("state") == "running" and ledger.owner_alive(entry):
                owner = entry.get("owner", {})
                raise ConfigError("sweep", sweep.name, f"a sweep that no other process runs (trial {entry['index']} "
                                  f"runs on {owner.get('host')}, pid {owner.get('pid')})")  # fmt: skip
    trials, todo = [], []
    # The queue read once for all trials, where any of them ran before (a resubmitted sweep of 10,000 trials
    # would otherwise ask squeue 10,000 times).
    ran_before = any(rundir.jobs_file(c.paths.dir).is_file() for c in composed)
    queued = slurm.queued_states() if ran_before and len(composed) > 1 else None
    if sweep is not None and settings.kind == "optuna":
        todo = trials = optuna_workers(sweep, overrides, opts.config_dir)
        notes.append(f"{len(todo)} array task(s), each an Optuna worker sharing {sweep.dir}/optuna.journal")
    for i, c in enumerate(composed if not todo else []):
        extra = []
        if sweep_dir is not None and c.conf.logger.wandb is not None and not c.conf.logger.wandb.group:
            extra.append(f"logger.wandb.group={sweep_dir.name}")  # one W&B group per sweep
        own = sweep.own(i) if sweep else []
        trials.append(slurm.Trial(i, own, pinned_args(c, opts.config_dir, extra), c.paths.name, c.paths.dir))
        notes += [f"{c.paths.name}: {n}" for n in (*c.notes, *c.plan.notes)]
        if c.plan.action == "done":
            notes.append(f"{c.paths.name}: already finished ({c.paths.dir}); not submitted")
            continue
        busy = previous_job(c.paths.dir, queued)
        if busy is not None:
            raise ConfigError(
                "run.name", c.paths.name,
                f"a run without a job in the queue (job {busy[0]} is {busy[1]} for {c.paths.dir}; wait for it "
                f"or scancel {busy[0]}: two jobs must not write one run directory)",
            )  # fmt: skip
        notes.append(
            f"{c.paths.name}: {'resumes from ' + str(c.plan.checkpoint) if c.plan.action == 'resume' else 'starts at step 0'}"
        )
        todo.append(trials[-1])
    if not todo:
        if not opts.dry_run:
            return Submission(None, "", notes, sweep_dir, trials, *sweep_facts)  # type: ignore[arg-type]
        # A dry run still shows and checks what would be sent, were the runs not finished.
        notes.append(
            "every run is finished: a submit would send nothing; this is the job it would send otherwise"
        )
        todo = list(trials)

    cluster = base.cluster
    tasks_per_node = base.trainer.devices
    if settings.kind == "optuna" and sweep is not None:
        if base.trainer.num_nodes > 1:
            raise ConfigError("trainer.num_nodes", base.trainer.num_nodes, "1 in an Optuna sweep on SLURM (each "
                              "array task is one worker on one node)")  # fmt: skip
        # One worker process per array task; it starts each trial's processes itself (one per device).
        tasks_per_node = 1
        cluster = dataclasses.replace(cluster, cpus_per_task=cluster.cpus_per_task * base.trainer.devices)
    slurm.check_extra_options(cluster)
    job_name = cluster.job_name or (sweep_dir.name if sweep_dir else todo[0].run_name)
    slurm.sbatch_value("cluster.job_name" if cluster.job_name else "run.name", job_name)
    if job_name in schema.INTERACTIVE_JOB_NAMES:
        raise ConfigError(
            "run.name", job_name, "a name other than bash or interactive (it becomes the job name)"
        )
    job = slurm.Job(
        cluster=cluster,
        nodes=base.trainer.num_nodes,
        tasks_per_node=tasks_per_node,
        job_name=job_name,
        log_dir=(sweep_dir or todo[0].run_dir) / rundir.SLURM_DIR,
        workdir=Path.cwd(),
        what=(
            f"run {todo[0].run_name}"
            if not sweep_dir
            else f"sweep {sweep_dir.name}, {len(trials)} trials"
            if settings.kind != "optuna"
            else f"Optuna sweep {sweep_dir.name}, {len(todo)} workers"
        ),
        trials=todo,
        array=[t.index for t in todo] if sweep_dir else None,
        python=cluster.python or slurm.current_python(),
        all_trials=trials,
    )
    reachable = slurm.reachable()
    jobs = [job]
    if job.array is not None:
        lines = slurm.trial_lines(job).splitlines()
        notes.append(f"{job.trials_file}: {len(lines)} line(s), one per trial, read by each array task; "
                     f"trial {todo[0].index}: {lines[todo[0].index]}")  # fmt: skip
        limit = cluster.max_array_size or (slurm.max_array_size() if reachable else None)
        jobs = slurm.split_array(job, limit or slurm.SLURM_DEFAULT_MAX_ARRAY_SIZE)
        if len(jobs) > 1:
            notes.append(f"{len(todo)} trials as {len(jobs)} job arrays: array task ids stay below MaxArraySize="
                         f"{limit or slurm.SLURM_DEFAULT_MAX_ARRAY_SIZE}"
                         + ("" if limit else " (Slurm's default; set cluster.max_array_size)"))  # fmt: skip
    job = jobs[0]
    script = slurm.render(job)
    if reachable:
        notes += slurm.check_against_scheduler(job)
        if cluster.test_only:
            complaint = slurm.test_only(script)
            if complaint is not None:
                raise slurm.SchedulerError(
                    f"the scheduler would not run this job (sbatch --test-only): {complaint}"
                )
            notes.append("sbatch --test-only: the scheduler accepts the request")
    elif opts.dry_run:
        notes.append(
            "no SLURM controller answers here (scontrol ping): the scheduler did not check the request"
        )
    else:
        raise slurm.SchedulerError(
            "no SLURM controller answers here (scontrol ping): submit from a login node of the cluster, or "
            "use --dry-run to see the script"
        )
    more = [(j, slurm.render(j)) for j in jobs[1:]]
    return Submission(job, script, notes, sweep_dir, trials, *sweep_facts, more=more)


def optuna_workers(sweep: SweepPlan, overrides: list[str], config_dir: str | None) -> list[slurm.Trial]:
    """An Optuna sweep as a job array: task i is worker i, running ``trainer train -m`` with the sweep's own
    overrides, one trial at a time, against the study in the sweep directory (shared by all tasks)."""
    flags = ["--config-dir", os.path.abspath(config_dir)] if config_dir else []
    own = [
        o
        for o in overrides
        if o.split("=", 1)[0].lstrip("+~") not in ("sweep.parallel", "sweep.name", "run.root")
    ]
    args = ["-m", *flags, *own, f"run.root={plain(str(sweep.dir.parent))}", f"sweep.name={sweep.name}",
            "sweep.parallel=1"]  # fmt: skip
    return [slurm.Trial(i, [], args, f"worker-{i}", sweep.dir) for i in range(sweep.settings.parallel)]


def record(path: Path, entry: dict) -> None:
    ledger = read_json(path) or {"jobs": []}
    ledger["jobs"].append(entry)
    atomic_write_text(path, json.dumps(ledger, indent=2) + "\n")


def write_and_submit(sub: Submission, opts: Options) -> list[str]:
    """Write each script and submit it; the ledgers record what was accepted. Returns the job ids."""
    ids = []
    for n, (job, script) in enumerate([(sub.job, sub.script), *sub.more]):
        try:
            ids.append(_write_and_submit_one(sub, opts, job, script, n))
        except slurm.SchedulerError as err:
            if not ids:
                raise
            raise slurm.SchedulerError(f"{err}; job array(s) {', '.join(ids)} were accepted before it (their "
                                       "trials are in sweep.json): submit the same command again once they "
                                       "are done for the rest") from None  # fmt: skip
    return ids


def _write_and_submit_one(sub: Submission, opts: Options, job: slurm.Job, script: str, n: int) -> str:
    created = [p for p in (job.log_dir, *job.log_dir.parents) if not p.exists()]
    job.log_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S") + (f"-{n}" if n else "")
    script_path = job.log_dir / f"submit-{stamp}.sbatch"
    atomic_write_text(script_path, script)
    new_trials_file = job.array is not None and not job.trials_file.exists()
    if job.array is not None:  # the same text each time a sweep is submitted: tasks still running read it too
        atomic_write_text(job.trials_file, slurm.trial_lines(job))
    try:
        job_id = slurm.submit(script_path)
    except slurm.SchedulerError:  # leave no trace of a job that does not exist
        script_path.unlink()
        if new_trials_file:
            job.trials_file.unlink()
        for folder in created:
            folder.rmdir()
        raise
    when = time.strftime("%Y-%m-%dT%H:%M:%S")
    if sub.sweep_dir is not None:  # trial -> overrides, run dir; and the array job that runs them
        with ledger.locked(sub.sweep_dir) as data:
            data.update(name=sub.sweep_dir.name, overrides=[redact_override(o) for o in opts.overrides], kind=sub.kind,
                        metric=sub.metric, direction=sub.direction)  # fmt: skip
            for t in sub.sweep_trials if sub.kind != "optuna" else []:
                entry = ledger.trial(data, t.index)
                entry.update(overrides=t.overrides, run_name=t.run_name, run_dir=str(t.run_dir))
                if t in job.trials:
                    entry.update(state="submitted", job_id=f"{job_id}_{job.task_id(t)}")
            data["jobs"].append({"job_id": job_id, "array": slurm.compress(job.array or [0]),
                                 "array_offset": job.array_offset, "submitted_at": when,
                                 "script": str(script_path)})  # fmt: skip
    for t in job.trials if sub.kind != "optuna" else []:
        tid = f"{job_id}_{job.task_id(t)}" if job.array is not None else job_id
        log = job.log_dir / (f"{tid}.out")
        (t.run_dir / rundir.SLURM_DIR).mkdir(parents=True, exist_ok=True)
        record(rundir.jobs_file(t.run_dir), {"job_id": tid, "submitted_at": when,
                                                       "script": str(script_path), "log": str(log),
                                                       "cluster": job.cluster.name})  # fmt: skip
    return job_id


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE, end="")
        return 0
    try:
        opts = parse_args(argv)
        sub = prepare(opts)
    except UsageError as err:
        print(f"error: {err} (see `trainer submit --help`)", file=sys.stderr)
        return exits.CONFIG
    except slurm.SchedulerError as err:
        print(f"error: {err}", file=sys.stderr)
        return exits.CONFIG
    except Exception as exc:
        return report(exc)
    if sub.job is None:
        for note in sub.notes:
            print(f"[INFO] {note}", file=sys.stderr)
        print("nothing to submit: every run is finished", file=sys.stderr)
        return 0
    if opts.dry_run:
        print(sub.script, end="")
        for note in sub.notes:
            print(f"[check] {note}", file=sys.stderr)
        print("[check] dry run: nothing written, nothing submitted", file=sys.stderr)
        return 0
    try:
        job_ids = write_and_submit(sub, opts)
    except slurm.SchedulerError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    job = sub.job
    where = sub.sweep_dir or job.trials[0].run_dir
    for job_id, one in zip(job_ids, [job, *(j for j, _ in sub.more)], strict=True):
        what = f"array of {len(one.trials)} trial(s)" if one.array is not None else "run"
        print(f"submitted job {job_id} ({what}) to {one.cluster.name}: {one.what}")
    print(f"  {'sweep dir' if sub.sweep_dir else 'run dir  '}  {where}")
    print(f"  logs       {job.log_dir}")
    print(f"  status     trainer status {where}")
    return 0
