"""``trainer train -m ...``: a sweep on this machine, each trial a separate ``trainer train`` process.

1. Every trial is composed and checked first (for Optuna: the edges of the space); one bad trial stops the
   sweep before anything runs, naming the trial and its values.
2. The sweep directory (``<run.root>/<sweep name>``) gets a ledger; each trial runs in its own run directory
   under it, with its console output in ``logs/``. Up to ``sweep.parallel`` trials run at once.
3. Re-running the same command skips finished trials and resumes interrupted ones from their checkpoints
   (their run directories are stable). A signal to the sweep (Ctrl-C, SIGTERM, SIGUSR1) is passed to the
   running trials, which save at their next step; the sweep then exits with 75, like a single run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from trainer import exits, rundir
from trainer.config.compose import Composed, compose, normalize, session
from trainer.config.errors import ConfigError, report
from trainer.files import read_json
from trainer.launch import slurm
from trainer.launch.local import die_with_parent, outside_launchers
from trainer.secrets import redact_override
from trainer.sweep import OPTUNA_ENV, ledger
from trainer.sweep.trials import SweepPlan, pinned_args, plan_sweep


class Runner:
    """Starts trial processes, forwards signals to them, and records each outcome in the ledger."""

    def __init__(self, plan: SweepPlan, config_dir: str | None) -> None:
        self.plan, self.config_dir = plan, config_dir
        self.stopping: int | None = None  # the signal that asked the sweep to stop
        self.running: dict[int, subprocess.Popen] = {}
        self.lock = threading.RLock()  # also taken by the signal handler, which may interrupt a holder
        self.failed = 0
        self.logs = plan.dir / "logs"

    # ------------------------------------------------------------------------------------------ signals

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, _frame: object) -> None:
        if self.stopping is None:
            print(f"[sweep] {signal.Signals(signum).name}: stopping the running trials at their next step",
                  flush=True)  # fmt: skip
        self.stopping = signum
        # Trials save on SIGUSR1 and SIGTERM (checkpoint.save_on_signals); anything else becomes SIGTERM.
        forward = signum if signum == signal.SIGUSR1 else signal.SIGTERM
        with self.lock:
            for proc in self.running.values():
                if proc.poll() is None:
                    os.kill(proc.pid, forward)

    # ------------------------------------------------------------------------------------------ trials

    def env(self, slot: int, c: Composed, extra: dict[str, str] | None = None) -> dict:
        """The environment of a trial run by worker ``slot``: on GPUs, the slot's own devices."""
        # A trial is a run of its own: no rank of a launcher around the sweep (inside a SLURM array task, the
        # worker is one srun task; its trials must not take SLURM's task variables as their ranks).
        env = outside_launchers(dict(os.environ, **(extra or {})))
        parallel = self.plan.settings.parallel
        if parallel > 1 and "OMP_NUM_THREADS" not in os.environ:  # share the cores instead of fighting
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // parallel))
        if parallel > 1 and c.accelerator == "gpu":
            devices = c.conf.trainer.devices
            env["CUDA_VISIBLE_DEVICES"] = ",".join(self.gpus[slot * devices : (slot + 1) * devices])
        return env

    @property
    def gpus(self) -> list[str]:
        """The GPUs this sweep may use, as CUDA_VISIBLE_DEVICES names them."""
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible:
            return [g for g in visible.split(",") if g]
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]

    def check_slots(self) -> None:
        """``sweep.parallel`` trials on GPUs need that many disjoint sets of ``trainer.devices`` GPUs."""
        c = self.plan.composed[0]
        parallel, devices = self.plan.settings.parallel, c.conf.trainer.devices
        if parallel > 1 and c.accelerator == "gpu" and parallel * devices > len(self.gpus):
            raise ConfigError("sweep.parallel", parallel, f"at most {len(self.gpus) // devices} with "
                              f"trainer.devices={devices} on {len(self.gpus)} GPUs (each trial gets its own)")  # fmt: skip

    def extra(self, c: Composed) -> list[str]:
        if c.conf.logger.wandb is not None and not c.conf.logger.wandb.group:
            return [f"logger.wandb.group={self.plan.name}"]  # one W&B group per sweep
        return []

    def args(self, i: int) -> list[str]:
        c = self.plan.composed[i]
        return pinned_args(c, self.config_dir, self.extra(c))

    def run(self, index: int, label: str, args: list[str], run_dir: Path, env: dict) -> dict:
        """One trial, to its end; returns its ledger fields (state, objective, steps, seconds)."""
        self.logs.mkdir(parents=True, exist_ok=True)
        log = self.logs / f"{run_dir.name}.log"
        started = time.time()
        print(f"[sweep] trial {index} ({label}) started: {run_dir}", flush=True)
        with log.open("a") as out:
            with self.lock:
                if self.stopping is not None:
                    return {"state": "interrupted"}
                proc = subprocess.Popen([sys.executable, "-m", "trainer", "train", *args], stdout=out,
                                        stderr=subprocess.STDOUT, env=env, preexec_fn=die_with_parent)  # fmt: skip
                self.running[index] = proc
            code = proc.wait()
            with self.lock:
                self.running.pop(index, None)
        state = read_json(run_dir / rundir.STATE_FILE) or {}
        metric = self.plan.settings.metric
        last = rundir.last_metrics(run_dir / rundir.METRICS_FILE, (metric,))
        # The run's own closing figure where it has one (the value its checkpoints were ranked by), else the
        # newest value in metrics.csv (a run that failed or was stopped writes no summary).
        objective = ((state.get("summary") or {}).get("validation") or {}).get(metric, last.get(metric))
        fields = {"returncode": code, "steps": last.get("step"), "objective": objective,
                  "seconds": round(time.time() - started, 2), "log": str(log)}  # fmt: skip
        if code == 0:
            fields["state"] = "pruned" if state.get("status") == "pruned" else "finished"
        elif code == exits.PREEMPTED or (self.stopping is not None and code < 0):
            fields["state"] = "interrupted"  # (a trial still starting up dies of the forwarded signal)
        else:
            fields["state"] = "failed"
            self.failed += 1
        shown = "n/a" if fields["objective"] is None else f"{fields['objective']:.4f}"
        print(f"[sweep] trial {index} ({label}) {fields['state']} after {fields['seconds']:.1f} s: "
              f"{metric} {shown}" + (f"; see {log}" if fields["state"] == "failed" else ""), flush=True)  # fmt: skip
        return fields


# ---------------------------------------------------------------------------------------------- grid, random


def run_fixed(runner: Runner, argv: list[str]) -> None:
    """A grid or random sweep: the trial list is known up front."""
    plan = runner.plan
    with ledger.locked(plan.dir) as data:
        data.update(name=plan.name, kind=plan.settings.kind, overrides=[redact_override(a) for a in argv], metric=plan.settings.metric,
                    direction=plan.settings.direction)  # fmt: skip
        data.setdefault("created", time.time())
        for i, c in enumerate(plan.composed):
            entry = ledger.trial(data, i)
            entry.update(overrides=plan.own(i), run_name=c.paths.name, run_dir=str(c.paths.dir))
            if c.plan.action == "done":
                entry["state"] = "finished"
            entry.setdefault("state", "pending")
    todo = [i for i, c in enumerate(plan.composed) if c.plan.action != "done"]
    print(f"[sweep] {plan.name}: {len(plan.composed)} trials, {len(plan.composed) - len(todo)} finished "
          f"already, {len(todo)} to run, {plan.settings.parallel} at a time ({plan.dir})", flush=True)  # fmt: skip
    queue = list(todo)

    def worker(slot: int) -> None:
        while runner.stopping is None:
            with runner.lock:
                if not queue:
                    return
                i = queue.pop(0)
            c = plan.composed[i]
            with ledger.locked(plan.dir) as data:
                entry = ledger.trial(data, i)
                if entry.get("state") == "running" and ledger.owner_alive(entry):
                    continue  # another process runs this sweep too and has this trial
                if entry.get("job_id") and slurm.active(entry["job_id"]):
                    print(f"[sweep] trial {i} is queued or running as SLURM job {entry['job_id']}: skipped")
                    continue
                entry.update(state="running", owner=ledger.me())
            fields = runner.run(
                i, " ".join(plan.own(i)) or c.paths.name, runner.args(i), c.paths.dir, runner.env(slot, c)
            )
            with ledger.locked(plan.dir) as data:
                ledger.trial(data, i).update(fields)

    threads = [
        threading.Thread(target=worker, args=(k,)) for k in range(min(plan.settings.parallel, len(todo)))
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


# ---------------------------------------------------------------------------------------------- optuna


def run_optuna(runner: Runner, argv: list[str]) -> None:
    """Trials asked of an Optuna study stored next to the ledger (a journal file, safe for several processes
    on a shared filesystem), until the study holds ``sweep.num_trials`` trials."""
    from trainer.sweep import study as studies

    plan = runner.plan
    with ledger.locked(plan.dir) as data:
        worker = data.get("workers", 0)
        data["workers"] = worker + 1
    study = studies.load(plan, worker)
    distributions = studies.distributions(plan.space)
    with ledger.locked(plan.dir) as data:
        data.update(name=plan.name, kind="optuna", overrides=[redact_override(a) for a in argv], metric=plan.settings.metric,
                    direction=plan.settings.direction, study=str(plan.dir / studies.JOURNAL))  # fmt: skip
        data.setdefault("created", time.time())
    compose_lock = threading.Lock()

    def claim() -> tuple[int, dict] | None:
        """Under the ledger's lock: an interrupted trial to finish, or a new one, or None when enough."""
        with ledger.locked(plan.dir) as data:
            for entry in data["trials"]:
                if entry.get("state") in ("interrupted", "running", "pending") and not (
                    entry.get("state") == "running" and ledger.owner_alive(entry)
                ):
                    entry.update(state="running", owner=ledger.me())
                    return entry["index"], entry["params"]
            if studies.count(study) >= (plan.settings.num_trials or 0):
                return None
            trial = study.ask(distributions)
            entry = ledger.trial(data, trial.number)
            own = studies.values(plan.space, trial.params)
            entry.update(params=trial.params, state="running", owner=ledger.me(),
                         overrides=[plan.space.override(p, own[p.name]) for p in plan.space.params])  # fmt: skip
            return trial.number, trial.params

    def worker(slot: int) -> None:
        while runner.stopping is None:
            claimed = claim()
            if claimed is None:
                return
            number, params = claimed[0], studies.values(plan.space, claimed[1])
            overrides = plan.space.trial(params) + [f"run.name=trial-{number:04d}"]
            try:
                with compose_lock:
                    c = compose(overrides, runner.config_dir, where="local", run_root=plan.dir)
            except Exception as exc:  # a point of the space that does not validate
                from trainer.config.errors import describe

                line = describe(exc) or repr(exc)
                print(f"[sweep] trial {number} is not a valid config: {line}", flush=True)
                studies.tell(study, number, "failed", None)
                with ledger.locked(plan.dir) as data:
                    ledger.trial(data, number).update(state="failed", error=line)
                continue
            with ledger.locked(plan.dir) as data:
                ledger.trial(data, number).update(run_name=c.paths.name, run_dir=str(c.paths.dir))
            spec = {"journal": str(plan.dir / studies.JOURNAL), "study": plan.name, "number": number,
                    "metric": plan.settings.metric, "pruner": studies.pruner_spec(plan.settings)}  # fmt: skip
            env = runner.env(slot, c, {OPTUNA_ENV: json.dumps(spec)})
            label = " ".join(plan.space.override(p, params[p.name]) for p in plan.space.params)
            fields = runner.run(
                number, label, pinned_args(c, runner.config_dir, runner.extra(c)), c.paths.dir, env
            )
            if fields["state"] != "interrupted":
                studies.tell(study, number, fields["state"], fields.get("objective"))
            with ledger.locked(plan.dir) as data:
                ledger.trial(data, number).update(fields)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(plan.settings.parallel)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    best = studies.best(study)
    if best is not None:
        print(
            f"[sweep] best trial {best.number}: {plan.settings.metric} {best.value:.4f} {best.params}",
            flush=True,
        )


# ---------------------------------------------------------------------------------------------- main


def parse_argv(args: list[str]) -> tuple[str | None, list[str]]:
    """``-m`` sweeps accept the config-dir flag and overrides; Hydra's other flags belong to single runs."""
    config_dir, overrides = None, []
    it = iter(args)
    for arg in it:
        name, eq, value = arg.partition("=")
        if arg in ("-m", "--multirun"):
            continue
        if name in ("-cd", "--config-dir"):
            config_dir = value if eq else next(it, None)
            if not config_dir or not Path(config_dir).is_dir():
                raise ConfigError(name, config_dir, "an existing directory")
        elif arg.startswith("-"):
            raise ConfigError(arg, None, "with -m: -cd/--config-dir DIR and key=value overrides", is_key=True)
        else:
            overrides.append(arg)
    return config_dir, overrides


def main(args: list[str]) -> int:
    with session():
        try:
            config_dir, overrides = parse_argv(args)
            overrides = normalize(overrides)
            plan = plan_sweep(overrides, config_dir, "local")
            runner = Runner(plan, config_dir)
            runner.check_slots()
        except Exception as exc:
            return report(exc)
        runner.install()
        if plan.settings.kind == "optuna":
            run_optuna(runner, overrides)
        else:
            run_fixed(runner, overrides)
    print(f"[sweep] {plan.name}: see `trainer status {plan.dir}` and `trainer report {plan.dir}`", flush=True)
    if runner.stopping is not None:
        print(
            f"[sweep] interrupted: run the same command again to continue (exit {exits.PREEMPTED})",
            flush=True,
        )
        return exits.PREEMPTED
    return 1 if runner.failed else 0
