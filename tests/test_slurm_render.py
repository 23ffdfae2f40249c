"""`trainer submit` without a scheduler: rendered scripts (golden files), checks, quoting, no torch.

The scheduler is made unreachable here (SLURM_CONF points nowhere), so these run on any machine; the
tests against a real SLURM cluster are in test_slurm.py.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

GOLDEN = REPO / "tests" / "golden" / "slurm"
NO_SCHEDULER = {"SLURM_CONF": "/nonexistent/slurm.conf"}
# Fixed paths so the rendered scripts do not depend on this machine (the working directory is replaced).
FIXED = ["cluster=slurm", "cluster.python=/opt/venv/bin/python", "run.root=/scratch/runs"]


def normalise(text: str, cwd: Path) -> str:
    return text.replace(str(cwd), "<CWD>")


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("UPDATE_GOLDEN"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    expected = path.read_text()
    assert text == expected, f"rendered script differs from {path} (UPDATE_GOLDEN=1 rewrites it after review)"


@pytest.mark.unit
def test_multi_node_gpu_job_matches_golden_file(cli, tmp_path):
    res = cli("submit", "--dry-run", *FIXED, "strategy=ddp", "trainer.num_nodes=2", "trainer.devices=4",
              "trainer.accelerator=gpu", "cluster.gpus_per_node=4", "precision=bf16-mixed",
              "cluster.partition=gpu", "cluster.account=proj42", "cluster.time=2-00:00:00", "cluster.mem=0",
              "cluster.modules=[cuda/12.4]", "cluster.setup=['source /opt/venv/bin/activate']",
              "+cluster.env.NCCL_SOCKET_IFNAME=ib0", "cluster.sbatch=['--mail-type=END']",
              "trainer.max_steps=1000", env=NO_SCHEDULER)  # fmt: skip
    assert res.returncode == 0, res.output
    check_golden("ddp_2nodes_4gpus.sbatch", normalise(res.stdout, tmp_path))
    assert "dry run: nothing written" in res.stderr
    assert not (tmp_path / "runs").exists() and not list(tmp_path.glob("*.sbatch"))
    subprocess.run(["bash", "-n"], input=res.stdout, text=True, check=True)
    # Each task starts with the preemption signals ignored, until `trainer train` catches them itself: the
    # script's own task prefix, run here in front of a Python that reports what it starts with.
    (prefix,) = re.findall(r"^  (bash -c .*?) /opt/venv/bin/python -m trainer train ", res.stdout, re.M)
    probe = "import signal; print(*(signal.getsignal(s).name for s in (signal.SIGUSR1, signal.SIGTERM)))"
    started = subprocess.run(["bash", "-c", f"{prefix} {shlex.quote(sys.executable)} -c {shlex.quote(probe)}"],
                             capture_output=True, text=True, check=True)  # fmt: skip
    assert started.stdout.split() == ["SIG_IGN", "SIG_IGN"], started


@pytest.mark.unit
def test_sweep_array_matches_golden_file(cli, tmp_path):
    res = cli("submit", "--dry-run", "-m", *FIXED, "experiment=digits_mlp", "optim.lr=0.01,0.001",
              "model.hidden=[32],[64,64]", "cluster.array_parallelism=2", env=NO_SCHEDULER)  # fmt: skip
    assert res.returncode == 0, res.output
    text = normalise(res.stdout, tmp_path)
    check_golden("sweep_array.sbatch", text)
    assert "#SBATCH --array=0-3%2" in text
    # the script reads each task's trial from the sweep's trials.args, so it does not grow with the trials
    assert text.count("trial=(") == 1 and "/slurm/trials.args" in text
    assert "trials.args: 4 line(s), one per trial" in res.stderr


@pytest.mark.unit
@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["cluster=local"], "cluster=local: expected a SLURM cluster profile"),
        (["cluster=slurm", "strategy=ddp", "trainer.devices=2", "cluster.sbatch=['--ntasks-per-node=4']"],
         "--ntasks-per-node comes from trainer.devices"),
        (["cluster=slurm", "strategy=ddp", "trainer.num_nodes=2", "cluster.sbatch=['-N3']"],
         "-N comes from trainer.num_nodes"),
        (["cluster=slurm", "cluster.job_name=bash"], "cluster.job_name=bash: expected a name other than bash"),
        (["cluster=slurm", "run.name=interactive"], "run.name=interactive: expected a name other than bash"),
        (["cluster=slurm", "cluster.time=90min"], "cluster.time=90min: expected a Slurm time"),
        (["cluster=slurm", "strategy=ddp", "trainer.devices=2", "trainer.accelerator=gpu",
          "cluster.gpus_per_node=1"], "cluster.gpus_per_node=1: expected 2"),
        (["cluster=slurm", "trainer.accelerator=gpu"], "cluster.gpus_per_node=0: expected 1"),
        (["cluster=slurm", "precision=16-mixed"], "precision=16-mixed: expected 32, bf16-mixed or bf16-true on cpu"),
        (["cluster=slurm", "cluster.signal=SIGUSR2"], "cluster.signal=SIGUSR2: expected one of checkpoint.save_on_signals"),
        (["cluster=slurm", "+cluster.env.WANDB_API_KEY=abc123"], "cluster.env.WANDB_API_KEY=<hidden>: expected no secrets"),
        (["cluster=slurm", "cluster.partition='gpu --qos=high'"], "cluster.partition='gpu --qos=high': expected a value without spaces"),
        (["cluster=slurm", "optim.lr=1e-3,1e-4"], "optim.lr=1e-3,1e-4: expected one value (add -m"),
        (["cluster=slurm", "cluster.nodes=2"], "cluster.nodes: unknown key"),
        (["cluster=nosuch"], "cluster=nosuch"),
        (["--nodes=2", "cluster=slurm"], "option '--nodes=2': expected --dry-run"),
        (["cluster=slurm", "+model.api_key=abc123"], "model.api_key=<hidden>: expected no secrets in a job's command line"),
        (["cluster=slurm", "cluster.srun=['--ntasks=1']"], "--ntasks comes from trainer.devices"),
        (["cluster=slurm", "cluster.sbatch=['--part=gpu']"], "--partition comes from cluster.partition"),
        (["cluster=slurm", "cluster.sbatch=['--export=NONE']"], "--export comes from your shell's environment"),
        (["-m", "cluster=slurm", "model.n_layer=range(5,2)"], "expected a range() with a positive step"),
    ],
)  # fmt: skip
def test_bad_requests_fail_in_one_line_before_anything_is_written(cli, tmp_path, args, expected):
    res = cli("submit", *args, env=NO_SCHEDULER)
    assert res.returncode == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert expected in lines[0], lines[0]
    assert not (tmp_path / "runs").exists()


@pytest.mark.unit
def test_control_characters_in_overrides_are_refused(cli, tmp_path):
    res = cli("submit", "cluster=slurm", "logger=[csv,wandb]", "logger.wandb.notes='a\nb'", env=NO_SCHEDULER)
    assert res.returncode == 2, res.output
    assert "expected no control characters" in res.stderr
    assert not (tmp_path / "runs").exists()


HOSTILE = "a;b $(touch PWNED) `touch PWNED2` \"dq\" \\'sq\\' & | > x"


@pytest.mark.unit
def test_hostile_values_reach_the_job_literally(cli, tmp_path):
    """Run the rendered script with a fake srun that records its arguments: the override arrives as one
    argument, byte for byte, and nothing in it was executed."""
    res = cli("submit", "--dry-run", *FIXED, "logger=[csv,wandb]", f"logger.wandb.notes='{HOSTILE}'",
              env=NO_SCHEDULER)  # fmt: skip
    assert res.returncode == 0, res.output
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "srun").write_text(
        f"#!{sys.executable}\nimport json, sys\njson.dump(sys.argv[1:], open('argv.json', 'w'))\n"
    )
    (fake / "srun").chmod(stat.S_IRWXU)
    script = tmp_path / "job.sbatch"
    script.write_text(res.stdout)
    env = dict(os.environ, PATH=f"{fake}:{os.environ['PATH']}", SLURM_JOB_ID="1")
    subprocess.run(["bash", str(script)], cwd=tmp_path, env=env, check=True)
    argv = json.loads((tmp_path / "argv.json").read_text())
    assert f"logger.wandb.notes='{HOSTILE}'" in argv
    assert argv[argv.index("-m") + 1 : argv.index("-m") + 3] == ["trainer", "train"]
    assert not (tmp_path / "PWNED").exists() and not (tmp_path / "PWNED2").exists()


@pytest.mark.unit
def test_submit_and_status_do_not_import_torch(tmp_path):
    code = (
        "import sys, contextlib, io, os\n"
        "os.environ['SLURM_CONF'] = '/nonexistent/slurm.conf'\n"
        "from trainer.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):\n"
        "    assert main(['submit', '--dry-run', 'cluster=slurm']) == 0\n"
        "    assert main(['status', '.']) == 0\n"
        "heavy = [m for m in ('torch', 'pytorch_lightning') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path)


@pytest.mark.unit
def test_array_indices_compress_to_slurm_syntax():
    from trainer.launch.slurm import compress

    assert compress([0, 1, 2, 3]) == "0-3"
    assert compress([5, 0, 1, 3]) == "0-1,3,5"
    assert compress([7]) == "7"


@pytest.mark.unit
def test_a_sweep_over_numbered_config_files_keeps_them_files(cli, tmp_path):
    res = cli(
        "submit",
        "--dry-run",
        "-m",
        *FIXED,
        "experiment=digits_mlp",
        "precision=32,bf16-mixed",
        env=NO_SCHEDULER,
    )
    assert res.returncode == 0, res.output
    # trial 0's line of trials.args, as the dry run shows it: the choice stays the string '32'
    assert "trial 0: " in res.stderr and "precision='\"'\"'32'\"'\"''" in res.stderr


@pytest.mark.unit
def test_several_devices_or_nodes_with_strategy_auto_mean_ddp():
    """As Lightning's own ``auto`` does; the run's config records the choice (and `trainer submit --help`'s
    first example, four devices with the default strategy, is accepted)."""
    from trainer.config.compose import compose, session

    with session():
        for overrides in (["trainer.num_nodes=2"], ["trainer.devices=4"]):
            c = compose(["cluster=slurm", *overrides], where="cluster")
            assert c.conf.strategy.name == "ddp" and c.resolved["strategy"]["name"] == "ddp", overrides
        assert compose(["cluster=slurm"], where="cluster").conf.strategy.name == "auto"


@pytest.mark.slow
def test_dry_run_of_a_finished_run_still_renders_and_checks(cli):
    """`trainer --help`'s example `trainer submit --dry-run cluster=slurm` after the run has finished here."""
    args = ["experiment=digits_mlp", "trainer.max_steps=2", "trainer.accelerator=cpu"]
    assert cli("train", *args).returncode == 0
    real = cli("submit", "cluster=slurm", *args, env=NO_SCHEDULER)
    assert real.returncode == 0 and "nothing to submit: every run is finished" in real.stderr, real.output
    dry = cli("submit", "--dry-run", "cluster=slurm", *args, env=NO_SCHEDULER)
    assert dry.returncode == 0, dry.output
    assert dry.stdout.startswith("#!/bin/bash") and "trainer train" in dry.stdout
    assert "every run is finished: a submit would send nothing" in dry.stderr


@pytest.mark.unit
def test_each_array_task_reads_back_exactly_its_own_trial_arguments(tmp_path):
    """The rendered selection code, run by bash for each task id against the trials.args it reads."""
    from trainer.config.schema import ClusterConfig
    from trainer.launch import slurm

    tricky = ["optim.lr=1e-3", "run.name=a b", "model.hidden=[32,64]", "x='q'", 'y="$HOME"', "z=`id`;$(id)"]
    trials = [
        slurm.Trial(i, [], [f"trial.index={i}", *tricky[: i + 1]], f"r{i}", tmp_path / f"r{i}")
        for i in range(6)
    ]
    job = slurm.Job(cluster=ClusterConfig(), nodes=1, tasks_per_node=1, job_name="s", log_dir=tmp_path / "slurm",
                    workdir=tmp_path, what="sweep", trials=trials[2:4], array=[2, 3], python="python",
                    all_trials=trials)  # fmt: skip
    job.log_dir.mkdir()
    job.trials_file.write_text(slurm.trial_lines(job))
    script = slurm.render(job)
    select = script[script.index('task="${SLURM_ARRAY_TASK_ID:-}"') : script.index('eval "trial=($line)"')]
    probe = select + 'eval "trial=($line)"\nprintf "%s\\0" "${trial[@]}"\n'
    for task in range(6):
        out = subprocess.run(["bash", "-c", probe], env={"SLURM_ARRAY_TASK_ID": str(task), "PATH": "/usr/bin:/bin"},
                             capture_output=True, text=True, check=True).stdout  # fmt: skip
        assert out.split("\0")[:-1] == trials[task].args
    missing = subprocess.run(["bash", "-c", probe], env={"SLURM_ARRAY_TASK_ID": "6", "PATH": "/usr/bin:/bin"},
                             capture_output=True, text=True)  # fmt: skip
    assert missing.returncode == 2 and "no trial for array task 6" in missing.stderr


@pytest.mark.unit
def test_a_sweep_larger_than_max_array_size_is_several_arrays(cli, tmp_path):
    res = cli("submit", "--dry-run", "-m", *FIXED, "experiment=digits_mlp", "optim.lr=0.1,0.01,0.001",
              "model.hidden=[32],[64]", "cluster.max_array_size=4", env=NO_SCHEDULER)  # fmt: skip
    assert res.returncode == 0, res.output
    assert "6 trials as 2 job arrays: array task ids stay below MaxArraySize=4" in res.stderr
    assert "#SBATCH --array=0-3\n" in res.stdout  # the first array; the second is tasks 0-1, trials 4-5

    from trainer.config.schema import ClusterConfig
    from trainer.launch import slurm

    trials = [slurm.Trial(i, [], [f"trial.index={i}"], f"r{i}", tmp_path / f"r{i}") for i in range(7)]
    job = slurm.Job(cluster=ClusterConfig(), nodes=1, tasks_per_node=1, job_name="s", log_dir=tmp_path, workdir=tmp_path,
                    what="sweep", trials=[trials[i] for i in (1, 2, 5, 6)], array=[1, 2, 5, 6], all_trials=trials)  # fmt: skip
    jobs = slurm.split_array(job, 3)
    assert [(j.array, j.array_offset, [t.index for t in j.trials]) for j in jobs] == [
        ([0, 1], 1, [1, 2]),
        ([0, 1], 5, [5, 6]),
    ]
    assert all(j.task_id(t) == a for j in jobs for t, a in zip(j.trials, j.array, strict=True))
    assert '"$((task + 6))p"' in slurm.render(jobs[1])  # task 0 of the second array reads line 6: trial 5
    assert slurm.split_array(job, 7) == [job]


@pytest.mark.unit
def test_array_task_ids_of_the_schedulers_records():
    from trainer.launch.slurm import _task_ids

    assert _task_ids("7") == [7]
    assert _task_ids("3-5%2") == [3, 4, 5]  # a pending remainder with a parallelism limit
    assert _task_ids("0,4-5,9") == [0, 4, 5, 9]
    assert _task_ids("N/A") == []
