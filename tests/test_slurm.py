"""`trainer submit` against a real SLURM cluster: slurmctld + 2 slurmd from Debian's packages, brought up by
scripts/slurm-test-cluster (one network namespace per node, so the 2 nodes are 2 hosts to the job).

Jobs run the real `trainer train` under srun: a single-node run, 2-node DDP over gloo compared with a local
2-process run, a preempted job that requeues itself and ends with the same weights as an uninterrupted run,
and a sweep as one job array.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import test_readme as readme
import torch
import yaml
from conftest import REPO, clean_env, read_metrics

pytestmark = pytest.mark.slurm

CLUSTER = REPO / "scripts" / "slurm-test-cluster"
HELPERS = REPO / "tests" / "helpers"
# A small MLP on the digits data (the faulty helper model, used here only for its step_sleep_s).
MODEL = ["--config-dir", str(HELPERS / "conf"), "model=faulty", "data=digits", "data.batch_size=32",
         "trainer.accelerator=cpu", "trainer.log_every_n_steps=1", "trainer.val_check_interval=1000",
         "trainer.enable_progress_bar=false"]  # fmt: skip
ON_CLUSTER = ["cluster=slurm", "cluster.cpus_per_task=1", "cluster.time=00:10:00"]


@pytest.fixture
def env(tmp_path: Path, slurm_conf: str) -> dict:
    return clean_env(tmp_path, SLURM_CONF=slurm_conf, PYTHONPATH=str(HELPERS))


def trainer(tmp_path: Path, env: dict, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trainer", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip


def submit(tmp_path: Path, env: dict, *args: str) -> str:
    res = trainer(tmp_path, env, "submit", *ON_CLUSTER, *args)
    assert res.returncode == 0, res.stdout + res.stderr
    match = re.search(r"submitted job (\S+)", res.stdout)
    assert match, res.stdout
    return match.group(1)


def job(job_id: str, env: dict) -> list[dict[str, str]]:
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], env=env, capture_output=True, text=True)
    return [dict(w.split("=", 1) for w in line.split() if "=" in w) for line in out.stdout.splitlines()]


def wait_done(job_id: str, env: dict, timeout: float = 240) -> list[dict[str, str]]:
    """Wait until the job (every array task, every requeued attempt) has left the queue for good."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        records = job(job_id, env)
        if records and all(r["JobState"] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL",
                                             "OUT_OF_MEMORY") for r in records):  # fmt: skip
            return records
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} not done after {timeout}s: {job(job_id, env)}")


def wait_for_step(run_dir: Path, step: int, job_id: str, env: dict, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        steps = [int(r["step"]) for r in read_metrics(run_dir)] if (run_dir / "metrics.csv").exists() else []
        if steps and steps[-1] >= step:
            return
        time.sleep(0.1)
    raise AssertionError(f"the job did not reach step {step}: {job(job_id, env)}")


def job_log(run_dir: Path, job_id: str) -> str:
    return (run_dir / "slurm" / f"{job_id}.out").read_text()


def wandb_runs(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "wandb").glob("offline-run-*"))


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)[
        "state_dict"
    ]


HOSTILE = 'a;b $(touch PWNED) `touch PWNED2` "dq" & | > x'


def test_single_node_job_runs_and_status_reports_it(tmp_path, env):
    args = [*MODEL, "trainer.max_steps=30", "run.name=single", "logger=[csv,wandb]",
            f"logger.wandb.notes='{HOSTILE}'"]  # fmt: skip
    started = time.monotonic()
    job_id = submit(tmp_path, env, *args)
    submit_s = time.monotonic() - started
    assert job(job_id, env)[0]["JobState"] in ("PENDING", "RUNNING"), "submit must not wait for the job"
    records = wait_done(job_id, env)
    run_dir = tmp_path / "runs" / "single"
    log = job_log(run_dir, job_id)
    assert records[0]["JobState"] == "COMPLETED" and records[0]["ExitCode"] == "0:0", log
    state = json.loads((run_dir / "run.json").read_text())
    assert state["status"] == "finished" and state["attempts"][0]["slurm_job_id"] == job_id
    assert "finished 30 steps on 1 process" in log
    # The hostile value arrived as one literal string and nothing in it ran.
    assert HOSTILE in (run_dir / "config.yaml").read_text()
    assert not list(tmp_path.rglob("PWNED*"))
    # No secret from the environment is written into the script.
    script = next((run_dir / "slurm").glob("submit-*.sbatch")).read_text()
    assert "WANDB_API_KEY" not in script

    status = trainer(tmp_path, env, "status", str(run_dir))
    assert status.returncode == 0, status.stderr
    assert f"{job_id}  COMPLETED" in status.stdout and "restarts 0" in status.stdout, status.stdout
    assert "step       30" in status.stdout and f"slurm/{job_id}.out" in status.stdout, status.stdout

    again = trainer(tmp_path, env, "submit", *ON_CLUSTER, *args)
    assert again.returncode == 0 and "nothing to submit" in again.stderr, again.stdout + again.stderr
    print(f"submit returned in {submit_s:.2f}s")


def test_two_node_ddp_trains_like_two_local_processes(tmp_path, env):
    args = [*MODEL, "strategy=ddp", "trainer.max_steps=20"]
    job_id = submit(tmp_path, env, *args, "trainer.num_nodes=2", "run.name=twonodes", "logger=[csv,wandb]")
    local = trainer(tmp_path, env, "train", *args, "trainer.devices=2", "run.name=local")
    assert local.returncode == 0, local.stdout + local.stderr
    records = wait_done(job_id, env)
    run_dir = tmp_path / "runs" / "twonodes"
    log = job_log(run_dir, job_id)
    assert records[0]["JobState"] == "COMPLETED", log
    assert records[0]["NodeList"] == "node[1-2]"
    state = json.loads((run_dir / "run.json").read_text())
    assert state["status"] == "finished" and state["attempts"][-1]["world_size"] == 2
    assert log.count("finished 20 steps on 2 process(es)") == 1  # one summary: rank zero's
    steps = [int(r["step"]) for r in read_metrics(run_dir)]
    assert steps == list(range(1, 21))  # one metrics file, every step
    assert len(wandb_runs(run_dir)) == 1  # one W&B run, made by rank zero only
    remote, here = final_weights(run_dir), final_weights(tmp_path / "runs" / "local")
    for name, tensor in here.items():
        torch.testing.assert_close(remote[name], tensor, rtol=0, atol=1e-6, msg=name)


def test_hybrid_fsdp_shards_within_nodes_and_replicates_across(tmp_path, env):
    """2 nodes x 2 ranks, strategy.sharding=hybrid: a (replicate=2, shard=2) mesh, each rank holds half of
    the parameters (full sharding over 4 ranks would hold a quarter), and training equals local DDP."""
    gpt = ["model=gpt", "data=synthetic", "model.n_layer=2", "model.n_head=2", "model.n_embd=64",
           "model.block_size=32", "trainer.accelerator=cpu", "trainer.max_steps=6", "trainer.log_every_n_steps=1",
           "trainer.val_check_interval=1000", "trainer.enable_progress_bar=false", "checkpoint.every_n_steps=0"]  # fmt: skip
    job_id = submit(tmp_path, env, *gpt, "strategy=fsdp", "strategy.sharding=hybrid", "trainer.num_nodes=2",
                    "trainer.devices=2", "data.batch_size=4", "run.name=hybrid")  # fmt: skip
    local = trainer(tmp_path, env, "train", *gpt, "strategy=ddp", "trainer.devices=2", "data.batch_size=8",
                    "run.name=local")  # fmt: skip
    assert local.returncode == 0, local.stdout + local.stderr
    records = wait_done(job_id, env)
    run_dir = tmp_path / "runs" / "hybrid"
    assert records[0]["JobState"] == "COMPLETED", job_log(run_dir, job_id)
    sharding = json.loads((run_dir / "run.json").read_text())["summary"]["sharding"]
    assert sharding["mesh"] == {"replicate": 2, "shard": 2} and sharding["sharding"] == "hybrid"
    total, per_rank = sharding["params"], sharding["params_per_rank"]
    assert len(per_rank) == 4 and all(abs(n - total / 2) <= 0.01 * total for n in per_rank), per_rank
    here, there = read_metrics(tmp_path / "runs" / "local"), read_metrics(run_dir)
    assert [float(r["train/loss"]) for r in there] == pytest.approx(
        [float(r["train/loss"]) for r in here], rel=1e-5
    )


def test_preempted_job_requeues_itself_and_resumes_exactly(tmp_path, env):
    args = [*MODEL, "strategy=ddp", "model.step_sleep_s=0.1", "trainer.max_steps=60",
            "checkpoint.every_n_steps=1000"]  # fmt: skip
    job_id = submit(tmp_path, env, *args, "trainer.num_nodes=2", "run.name=preempted", "logger=[csv,wandb]")
    run_dir = tmp_path / "runs" / "preempted"
    wait_for_step(run_dir, 10, job_id, env)
    subprocess.run(["scancel", "--signal=USR1", job_id], env=env, check=True)
    uninterrupted = trainer(tmp_path, env, "train", *args, "trainer.devices=2", "run.name=uninterrupted")
    assert uninterrupted.returncode == 0, uninterrupted.stdout + uninterrupted.stderr

    records = wait_done(job_id, env)
    log = job_log(run_dir, job_id)
    assert records[0]["JobState"] == "COMPLETED" and records[0]["Restarts"] == "1", log
    assert f"requeued job {job_id} (requeue 1 of at most 3)" in log
    state = json.loads((run_dir / "run.json").read_text())
    first, second = state["attempts"]
    assert first["status"] == "preempted" and second["action"] == "resume" and state["status"] == "finished"
    saved_at = int(re.search(r"step-(\d+)\.ckpt", second["checkpoint"]).group(1))
    assert 10 <= saved_at < 60
    # Zero lost steps: every step is logged once, and the resumed attempt started where the first stopped.
    assert [int(r["step"]) for r in read_metrics(run_dir)] == list(range(1, 61))
    # Both attempts logged into the same W&B run (one offline folder per attempt, one run id).
    attempts = wandb_runs(run_dir)
    assert len(attempts) == 2 and len({p.name.rsplit("-", 1)[1] for p in attempts}) == 1, attempts
    remote, here = final_weights(run_dir), final_weights(tmp_path / "runs" / "uninterrupted")
    for name, tensor in here.items():
        assert torch.equal(remote[name], tensor), name
    print(f"requeue to resume: {second['started'] - first['ended']:.1f}s (preempted at step {saved_at})")


@pytest.mark.extended
def test_the_batch_shell_outlives_a_sigterm_aimed_at_it(tmp_path, env):
    """A SIGTERM to the batch shell alone (scancel --batch; also part of some preemption set-ups) must not
    end the job: the shell waits for the training step and still acts on its exit code."""
    job_id = submit(tmp_path, env, *MODEL, "model.step_sleep_s=0.1", "trainer.max_steps=30", "run.name=term")
    run_dir = tmp_path / "runs" / "term"
    wait_for_step(run_dir, 5, job_id, env)
    subprocess.run(["scancel", "--batch", "--signal=TERM", job_id], env=env, check=True)
    records = wait_done(job_id, env)
    log = job_log(run_dir, job_id)
    assert records[0]["JobState"] == "COMPLETED" and records[0]["ExitCode"] == "0:0", log
    assert "batch shell got SIGTERM" in log
    assert [int(r["step"]) for r in read_metrics(run_dir)] == list(range(1, 31))


def test_sweep_is_a_job_array_with_a_ledger_split_below_max_array_size(tmp_path, env, monkeypatch):
    """Three trials on a cluster profile whose MaxArraySize is 2: array tasks 0 and 1 of a first array, task 0
    of a second one (offset 2); each task reads its own line of trials.args."""
    from trainer.launch import slurm

    monkeypatch.setenv("SLURM_CONF", env["SLURM_CONF"])
    assert slurm.max_array_size() == 1001  # what the test cluster's scontrol says (Slurm's default)
    lrs = ["optim.lr=0.01", "optim.lr=0.003", "optim.lr=0.001"]
    sweep = ["-m", *MODEL, "trainer.max_steps=10", "optim.lr=0.01,0.003,0.001", "cluster.max_array_size=2"]
    res = trainer(tmp_path, env, "submit", *ON_CLUSTER, *sweep)
    assert res.returncode == 0, res.stdout + res.stderr
    first, second = re.findall(r"submitted job (\S+)", res.stdout)
    assert "(array of 2 trial(s))" in res.stdout and "(array of 1 trial(s))" in res.stdout, res.stdout
    sweeps = list((tmp_path / "runs").glob("sweep-*"))
    assert len(sweeps) == 1
    ledger = json.loads((sweeps[0] / "sweep.json").read_text())
    assert [t["overrides"] for t in ledger["trials"]] == [[lr] for lr in lrs]
    assert [(j["job_id"], j["array"], j["array_offset"]) for j in ledger["jobs"]] == [
        (first, "0-1", 0),
        (second, "0", 2),
    ]
    for job_id, tasks in ((first, ["0", "1"]), (second, ["0"])):
        records = wait_done(job_id, env)
        assert sorted(r.get("ArrayTaskId") for r in records) == tasks
        assert all(r["JobState"] == "COMPLETED" for r in records), records
    for i, (trial, job_id) in enumerate(
        zip(ledger["trials"], [f"{first}_0", f"{first}_1", f"{second}_0"], strict=True)
    ):
        run_dir = Path(trial["run_dir"])
        assert run_dir.parent == sweeps[0]
        assert json.loads((run_dir / "run.json").read_text())["status"] == "finished"
        assert yaml.safe_load((run_dir / "config.yaml").read_text())["optim"]["lr"] == float(
            lrs[i].split("=")[1]
        )
        assert json.loads((run_dir / "slurm" / "jobs.json").read_text())["jobs"][-1]["job_id"] == job_id
    status = trainer(tmp_path, env, "status", str(sweeps[0]))
    assert status.stdout.count("COMPLETED") == 3 and "0: optim.lr=0.01" in status.stdout, status.stdout
    again = trainer(tmp_path, env, "submit", *ON_CLUSTER, *sweep)
    assert again.returncode == 0 and "nothing to submit" in again.stderr, again.stdout + again.stderr


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["cluster.partition=nosuch"], "cluster.partition=nosuch: expected a partition that sinfo lists"),
        (["strategy=ddp", "trainer.num_nodes=3"], "trainer.num_nodes=3: expected at most 2"),
        (["strategy=ddp", "trainer.devices=1", "trainer.accelerator=gpu", "cluster.gpus_per_node=1"],
         "cluster.gpus_per_node=1: expected 0 on partition debug"),
        (["cluster.mem=100G"], "sbatch --test-only"),
    ],
)  # fmt: skip
def test_requests_the_scheduler_cannot_run_are_refused_before_submitting(tmp_path, env, args, expected):
    res = trainer(tmp_path, env, "submit", *ON_CLUSTER, *MODEL, *args)
    assert res.returncode == 2, res.stdout + res.stderr
    assert expected in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.extended  # CI time: the array and its ledger are held by the grid sweep test in CI
def test_optuna_sweep_runs_as_array_tasks_sharing_one_study(tmp_path, env):
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    job_id = submit(tmp_path, env, "-m", *MODEL, "sweep=optuna", "sweep.num_trials=3", "sweep.parallel=2",
                    "sweep.pruner=none", "trainer.max_steps=10", "trainer.val_check_interval=5",
                    "optim.lr=tag(log,interval(1e-3,1e-1))")  # fmt: skip
    records = wait_done(job_id, env)
    sweep = next((tmp_path / "runs").glob("sweep-*"))
    logs = "".join(p.read_text() for p in (sweep / "slurm").glob("*.out"))
    assert sorted(r.get("ArrayTaskId") for r in records) == ["0", "1"], records
    assert all(r["JobState"] == "COMPLETED" for r in records), logs
    study = optuna.load_study(
        study_name=sweep.name, storage=JournalStorage(JournalFileBackend(str(sweep / "optuna.journal")))
    )
    assert [t.state for t in study.get_trials()] == [optuna.trial.TrialState.COMPLETE] * 3, logs
    entries = json.loads((sweep / "sweep.json").read_text())["trials"]
    owners = {(e["owner"]["host"], e["owner"]["pid"]) for e in entries}
    assert len(owners) == 2, entries  # both array tasks took trials
    assert all(
        json.loads((Path(e["run_dir"]) / "run.json").read_text())["status"] == "finished" for e in entries
    )


@pytest.mark.slow
@pytest.mark.extended
def test_a_requeue_storm_over_a_50_task_array_loses_and_repeats_nothing(tmp_path, env):
    """Every running task of a 50-trial array preempted at once (USR1 to the whole array): each saves, exits 75
    and requeues itself; the array finishes every trial, none is started twice from scratch or run twice,
    and the ledger, trainer status and the run directories agree. (~3 minutes on the 2-node test cluster.)"""
    lrs = [f"{0.001 + i * 1e-5:.5f}" for i in range(50)]
    steps = 30
    job_id = submit(tmp_path, env, "-m", *MODEL, "model.step_sleep_s=0.1", f"trainer.max_steps={steps}",
                    "checkpoint.every_n_steps=1000", f"optim.lr={','.join(lrs)}")  # fmt: skip
    (sweep,) = (tmp_path / "runs").glob("sweep-*")
    ledger = json.loads((sweep / "sweep.json").read_text())
    run_dirs = [Path(t["run_dir"]) for t in ledger["trials"]]
    assert len(run_dirs) == 50

    def training() -> list[int]:
        """The trials whose tasks run and have logged step 5 or later."""
        out = []
        for i, run_dir in enumerate(run_dirs):
            rows = read_metrics(run_dir) if (run_dir / "metrics.csv").exists() else []
            if rows and 5 <= int(rows[-1]["step"]) < steps - 5:
                out.append(i)
        return out

    deadline = time.monotonic() + 180
    while len(training()) < 3:  # the 2 nodes run 4 tasks at a time
        assert time.monotonic() < deadline, job(job_id, env)
        time.sleep(0.1)
    # Slurm 22.05 exits non-zero here ("Job can not be altered now" for the array) though the running tasks
    # get the signal: what counts is below, how many trials were preempted.
    subprocess.run(["scancel", "--signal=USR1", job_id], env=env, capture_output=True, text=True)

    records = wait_done(job_id, env, timeout=900)
    assert sorted(int(r["ArrayTaskId"]) for r in records) == list(range(50))
    assert all(r["JobState"] == "COMPLETED" for r in records), [r["JobState"] for r in records]
    preempted = 0
    for run_dir in run_dirs:
        state = json.loads((run_dir / "run.json").read_text())
        assert state["status"] == "finished", (run_dir, state)
        attempts = state["attempts"]
        assert [a["action"] for a in attempts].count("fresh") == 1, (
            run_dir,
            attempts,
        )  # never twice from scratch
        if attempts[0]["status"] == "preempted":
            preempted += 1
            assert len(attempts) == 2 and attempts[1]["action"] == "resume", attempts
        # every step trained and logged exactly once: nothing lost, nothing run twice
        assert [int(r["step"]) for r in read_metrics(run_dir)] == list(range(1, steps + 1)), run_dir
    assert preempted >= 3
    status = trainer(tmp_path, env, "status", str(sweep))
    assert status.stdout.count("COMPLETED") == 50 and status.stdout.count("finished") == 50, status.stdout
    print(f"requeue storm: {preempted} tasks preempted at once, all 50 trials finished")


def test_submit_commands_of_the_readme_and_help_are_accepted_by_the_test_cluster(tmp_path, slurm_conf):
    work = readme.Workspace.make(tmp_path, SLURM_CONF=slurm_conf)
    commands = [
        c for c in readme.readme_commands() + readme.help_commands() if c.text.startswith("trainer submit")
    ]
    assert len(commands) >= 6 and any("--dry-run" in c.text for c in commands)

    def cancel(output: str) -> None:
        """Each command is checked alone: its job leaves the queue before the next command (two jobs for
        one run directory would be refused, rightly)."""
        jobs = re.findall(r"submitted job (\d+)", output)
        if jobs:
            subprocess.run(["scancel", *jobs], env=work.env, capture_output=True, check=True)
            for _ in range(100):
                queued = subprocess.run(["squeue", "-h", "-j", ",".join(jobs)], env=work.env,
                                        capture_output=True, text=True).stdout  # fmt: skip
                if not queued.strip():
                    break
                time.sleep(0.1)

    failures, ran = work.run_all(commands, after=cancel)
    assert not failures, "\n\n".join(failures)
    real = [out for c, _, out in ran if "--dry-run" not in c.text]
    assert len(real) >= 4 and all(re.search(r"submitted job \d+", out) for out in real), real
