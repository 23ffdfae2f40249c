"""Sweeps on this machine: a grid end to end with status and report, resume after an interrupted sweep,
Optuna with two concurrent workers sharing one study, pruning from inside a trial, and fail-fast checks.
Every trial is a real `trainer train` process (the tiny digits MLP)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, clean_env

HELPERS = REPO / "tests" / "helpers"
TINY = ["experiment=digits_mlp", "trainer.val_check_interval=5", "trainer.enable_progress_bar=false",
        "trainer.log_every_n_steps=1"]  # fmt: skip


@pytest.fixture
def env(tmp_path: Path) -> dict:
    return clean_env(tmp_path, drop=("WANDB_MODE",), HOME=str(tmp_path), PYTHONPATH=str(HELPERS))


def trainer(tmp_path: Path, env: dict, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trainer", *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip


def start(tmp_path: Path, env: dict, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "trainer", *args], cwd=tmp_path, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip


def sweep_dir(tmp_path: Path) -> Path:
    dirs = list((tmp_path / "runs").glob("sweep-*"))
    assert len(dirs) == 1, dirs
    return dirs[0]


def ledger(sweep: Path) -> dict:
    return json.loads((sweep / "sweep.json").read_text())


def attempts(run_dir: Path) -> list[dict]:
    return json.loads((run_dir / "run.json").read_text())["attempts"]


@pytest.mark.slow
@pytest.mark.extended
def test_grid_sweep_runs_every_trial_and_reports(tmp_path, env):
    args = ["train", "-m", *TINY, "trainer.max_steps=10", "optim.lr=0.01,0.001", "model.hidden=[16],[32]",
            "logger=[csv,wandb]"]  # fmt: skip
    res = trainer(tmp_path, env, *args)
    assert res.returncode == 0, res.stdout + res.stderr
    sweep = sweep_dir(tmp_path)
    data = ledger(sweep)
    assert [t["overrides"] for t in data["trials"]] == [
        ["optim.lr=0.01", "model.hidden=[16]"], ["optim.lr=0.01", "model.hidden=[32]"],
        ["optim.lr=0.001", "model.hidden=[16]"], ["optim.lr=0.001", "model.hidden=[32]"],
    ]  # fmt: skip
    for t in data["trials"]:
        run_dir = Path(t["run_dir"])
        assert run_dir.parent == sweep and t["state"] == "finished" and t["steps"] == 10
        assert json.loads((run_dir / "run.json").read_text())["status"] == "finished"
        assert f"group: {sweep.name}" in (run_dir / "config.yaml").read_text()  # one W&B group per sweep
        assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 1  # one W&B run per trial
    assert len({t["run_dir"] for t in data["trials"]}) == 4

    status = trainer(tmp_path, env, "status", str(sweep))
    assert status.returncode == 0 and status.stdout.count("finished") == 4, status.stdout

    report = trainer(tmp_path, env, "report", str(sweep))
    assert report.returncode == 0, report.stderr
    lines = [ln for ln in report.stdout.splitlines() if ln[:1].isdigit()]
    objectives = [float(ln.split()[2]) for ln in lines]
    assert len(objectives) == 4 and objectives == sorted(objectives)  # sorted by val/loss, best first
    expected = {t["index"]: t["objective"] for t in data["trials"]}
    assert [round(expected[int(ln.split()[1])], 4) for ln in lines] == objectives
    import matplotlib.image

    for name in ("objective_vs_optim.lr.png", "objective_vs_model.hidden.png", "best_curves.png"):
        png = sweep / "report" / name
        image = matplotlib.image.imread(png)
        assert png.stat().st_size > 10_000 and image.shape[0] >= 300 and image[..., :3].std() > 0.05, name

    one = Path(data["trials"][0]["run_dir"])
    run_report = trainer(tmp_path, env, "report", str(one))
    assert run_report.returncode == 0 and (one / "report" / "curves.png").stat().st_size > 10_000


@pytest.mark.slow
@pytest.mark.extended  # CI time: resubmitting a finished sweep (SLURM test) holds part of it in CI
def test_interrupted_sweep_resumes_and_skips_finished_trials(tmp_path, env):
    args = ["train", "-m", "--config-dir", str(HELPERS / "conf"), "model=faulty", "data=digits",
            "trainer.accelerator=cpu", "trainer.val_check_interval=1000", "trainer.enable_progress_bar=false",
            "trainer.log_every_n_steps=1", "model.step_sleep_s=0.05", "trainer.max_steps=40",
            "optim.lr=0.01,0.005,0.001"]  # fmt: skip
    proc = start(tmp_path, env, *args)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # trial 0 done, trial 1 a few steps in
        trials = (
            ledger(sweep_dir(tmp_path))["trials"]
            if list((tmp_path / "runs").glob("sweep-*/sweep.json"))
            else []
        )
        second = Path(trials[1]["run_dir"]) / "metrics.csv" if len(trials) > 1 else None
        if (
            trials
            and trials[0]["state"] == "finished"
            and second
            and second.exists()
            and len(second.read_text().splitlines()) > 5
        ):
            break
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.1)
    else:
        raise AssertionError("the sweep did not get to its second trial")
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 75, out
    sweep = sweep_dir(tmp_path)
    assert [t["state"] for t in ledger(sweep)["trials"]] == ["finished", "interrupted", "pending"], out

    res = trainer(tmp_path, env, *args)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "1 finished already, 2 to run" in res.stdout
    first, second, third = (Path(t["run_dir"]) for t in ledger(sweep)["trials"])
    assert len(attempts(first)) == 1  # not run again
    assert [a["action"] for a in attempts(second)] == ["fresh", "resume"]  # continued from its checkpoint
    assert len(attempts(third)) == 1
    assert all(t["state"] == "finished" and t["steps"] == 40 for t in ledger(sweep)["trials"])


@pytest.mark.slow
@pytest.mark.extended
def test_optuna_workers_in_two_processes_share_one_study(tmp_path, env):
    import optuna

    args = ["train", "-m", "sweep=optuna", "sweep.num_trials=4", "sweep.pruner=none", *TINY, "trainer.max_steps=10",
            "optim.lr=tag(log,interval(1e-3,1e-1))", "model.hidden=[16],[32]"]  # fmt: skip
    workers = [start(tmp_path, env, *args) for _ in range(2)]
    outs = [w.communicate(timeout=300)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], outs
    sweep = sweep_dir(tmp_path)
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    storage = JournalStorage(JournalFileBackend(str(sweep / "optuna.journal")))
    study = optuna.load_study(study_name=sweep.name, storage=storage)
    trials = study.get_trials()
    assert len(trials) == 4 and all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    entries = ledger(sweep)["trials"]
    assert sorted(Path(t["run_dir"]).name for t in entries) == [f"trial-{i:04d}" for i in range(4)]
    assert len({t["owner"]["pid"] for t in entries}) == 2, "both workers ran trials"
    for t, frozen in zip(entries, sorted(trials, key=lambda x: x.number), strict=True):
        assert t["objective"] == pytest.approx(frozen.value)  # the study got each trial's last val/loss
    again = trainer(tmp_path, env, *args)  # the study survives: a re-run adds nothing
    assert again.returncode == 0 and len(study.get_trials()) == 4, again.stdout + again.stderr


@pytest.mark.slow
def test_a_trial_worse_than_the_median_is_pruned_from_inside(tmp_path, env):
    import optuna
    from optuna.distributions import FloatDistribution
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    journal = str(tmp_path / "optuna.journal")
    study = optuna.create_study(study_name="s", storage=JournalStorage(JournalFileBackend(journal)),
                                pruner=optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=0))  # fmt: skip
    dist = {"lr": FloatDistribution(1e-7, 1.0, log=True)}
    study.add_trial(optuna.trial.create_trial(params={"lr": 0.05}, distributions=dist, value=0.1,
                                              intermediate_values={s: 0.1 for s in range(5, 41, 5)}))  # fmt: skip
    trial = study.ask(dist)
    spec = {
        "journal": journal,
        "study": "s",
        "number": trial.number,
        "metric": "val/loss",
        "pruner": {"kind": "median", "startup_trials": 1, "warmup_steps": 0},
    }
    res = trainer(tmp_path, {**env, "TRAINER_OPTUNA": json.dumps(spec)}, "train", *TINY, "trainer.max_steps=40",
                  "optim.lr=1e-6", "run.name=bad")  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    state = json.loads((tmp_path / "runs" / "bad" / "run.json").read_text())
    assert state["status"] == "pruned" and state["summary"]["steps"] == 5  # stopped at its first validation
    assert list(study.trials[trial.number].intermediate_values) == [5]


@pytest.mark.unit
@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["optim.lr=0.01,-1"], "trial 1 (optim.lr=-1): optim.lr=-1.0: expected a finite number > 0"),
        (["optim.lr=interval(0.001,0.1)"], "expected a list or range() in a grid sweep"),
        (["sweep=random", "sweep.num_trials=null", "optim.lr=0.1,0.2"], "sweep.num_trials=null: expected a number"),
        (["sweep=optuna", "optim.lr=tag(log,interval(0,1))"], "expected a log interval with a low end > 0"),
        (["--cfg", "job"], "with -m: -cd/--config-dir DIR and key=value overrides"),
    ],
)  # fmt: skip
def test_bad_sweeps_fail_before_anything_runs(tmp_path, env, args, expected):
    res = trainer(tmp_path, env, "train", "-m", *TINY, *args)
    assert res.returncode == 2, res.stdout + res.stderr
    assert expected in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.unit
def test_random_sweeps_are_reproducible_and_stay_in_the_space():
    from trainer.sweep.space import parse, sample

    space = parse(["a=1", "b=tag(log,interval(1e-4,1e-1))", "c=range(2,8,2)", "d=choice(x,'y z')"])
    first, again = sample(space, 20, seed=3), sample(space, 20, seed=3)
    assert first == again and first != sample(space, 20, seed=4)
    for trial in first:
        values = dict(o.split("=", 1) for o in trial)
        assert values["a"] == "1" and 1e-4 <= float(values["b"]) <= 1e-1
        assert values["c"] in ("2", "4", "6") and values["d"] in ("x", "'y z'")
    finite = sample(parse(["a=1,2", "b=x,y"]), 10, seed=0)  # more asked than there are: each point once
    assert len(finite) == 4 and len({tuple(t) for t in finite}) == 4


@pytest.mark.unit
def test_optuna_sees_the_same_space():
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    from trainer.sweep.space import parse
    from trainer.sweep.study import distributions, values

    space = parse(["n=range(1,6,2)", "lr=tag(log,interval(1e-4,1e-2))", "h=[16],[32,32]"])
    dists = distributions(space)
    assert dists["n"] == IntDistribution(1, 5, step=2)
    assert dists["lr"] == FloatDistribution(1e-4, 1e-2, log=True)
    assert isinstance(dists["h"], CategoricalDistribution)
    assert values(space, {"n": 3, "lr": 0.001, "h": "[32,32]"})["h"] == [32, 32]


@pytest.mark.unit
def test_a_sweep_composes_each_trial_as_hydra_would_at_a_fraction_of_the_cost(tmp_path, monkeypatch):
    """The Composer (Hydra once per set of group choices, then each trial's values) against a full Hydra
    composition per trial: the same config, overrides, run dir and notes, or the same one-line error."""
    from trainer.config import compose as compose_module
    from trainer.config.compose import Composer, compose, session
    from trainer.config.errors import describe

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SLURM_CONF", "/nonexistent")
    trials = [
        ["cluster=slurm", "optim.lr=0.003", "model.n_layer=2"],
        ["cluster=slurm", "optim.lr=1e-4", "model.n_layer=4", "data.batch_size=8"],
        ["cluster=slurm", "model.n_layer=4", "optim.lr=1e-4"],  # the same values in another order
        ["experiment=digits_mlp", "cluster=slurm", "model.hidden=[32,16]", "+callbacks.x._target_=a.B"],
        ["cluster=slurm", "model.n_layer=abc"],  # bad values: the same errors
        ["cluster=slurm", "model.nope=1"],
        ["cluster=slurm", "~model.n_layer"],
        ["cluster=slurm", "model=gpt", "trainer.max_steps=7", "seed=3"],
        # the same keys as the first trial, other values: derived from it, or composed in full where a
        # derivation could differ (and for bad values)
        ["cluster=slurm", "optim.lr=5e-4", "model.n_layer=6"],
        ["cluster=slurm", "optim.lr=0.02", "model.n_layer=1"],
        ["cluster=slurm", "optim.lr=nan", "model.n_layer=2"],
        ["cluster=slurm", "optim.lr=5e-4", "model.n_layer=abc"],
        ["cluster=slurm", "optim.lr=5e-4", "model.n_layer=null"],
        ["cluster=slurm", "optim.lr=5e-4", "model.n_layer=-1"],
        ["cluster=slurm", "model.block_size=64"],  # data.seq_len is ${model.block_size}
        ["cluster=slurm", "model.block_size=32"],
        ["cluster=slurm", "trainer.devices=1"],
        ["cluster=slurm", "trainer.devices=2"],  # strategy auto becomes ddp: not the first one's
        ["cluster=slurm", "trainer.devices=3"],
        ["experiment=digits_mlp", "cluster=slurm", "model.hidden=[32,16]", "+callbacks.x._target_=c.D"],
    ]

    def outcome(make, trial):
        try:
            c = make(trial)
        except Exception as exc:  # noqa: BLE001 (the line a user would see)
            return describe(exc)
        return (c.conf, c.resolved, c.own_overrides, c.paths, c.notes, c.plan, c.accelerator, c.trainer_flags)

    derived = []
    derive = compose_module._Reference.derive

    def counted(self, values, task):
        try:
            result = derive(self, values, task)
        except compose_module._NotDerivable:
            raise
        except Exception:
            derived.append(task)  # derived, then refused by a check of the result
            raise
        derived.append(task)
        return result

    monkeypatch.setattr(compose_module._Reference, "derive", counted)
    with session():
        composer = Composer()
        for trial in trials:
            expected = outcome(lambda t: compose(t, None, where="cluster"), trial)
            assert outcome(lambda t: composer(t, where="cluster"), trial) == expected, trial
        assert len(composer._bases) == 3  # Hydra ran once per distinct set of group choices
    assert derived == [
        ["cluster=slurm", "optim.lr=5e-4", "model.n_layer=6"],
        ["cluster=slurm", "optim.lr=0.02", "model.n_layer=1"],
    ], derived  # (trainer.devices=3 is not derived from devices=1: check sets strategy=ddp for it alone)


@pytest.mark.unit
def test_a_trial_number_is_read_as_hydra_reads_it():
    """The Composer's shortcut for `key=<number>` lines gives Hydra's own parse, or leaves the line to it."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from trainer.config.compose import Composer

    composer = Composer()
    composer._parse("optim.lr=0.5")  # a full parse of the key first, as a sweep's first trial
    for value in ["1e-3", "-2", "007", "007.5", "1.", ".5", "1E+5", "0", "+3", "1_000", "inf", "3.25e-07", "00",
                  "-0.0", "00.5", "10.25", "0e5", "01e5", "1.5e", "-.5e-3", "12345678901234567890", "0.1234567890123456789"]:  # fmt: skip
        line = f"optim.lr={value}"
        hydra = OverridesParser.create().parse_overrides([line])[0]
        ours = composer._parse(line)
        assert (type(ours._value), ours._value, ours.type, ours.key_or_group, ours.input_line) == (
            type(hydra._value), hydra._value, hydra.type, hydra.key_or_group, hydra.input_line), line  # fmt: skip
