"""The profiler window (``profile.steps``): a trace, an operator table and the phases of a step per recording
rank, ``trainer report``'s picture of them, a window recorded once; off, the run does not have the callback."""

from __future__ import annotations

import json

import pytest

from trainer.cli import main

RUN = ["train", "experiment=digits_mlp", "trainer.accelerator=cpu", "trainer.log_every_n_steps=1",
       "checkpoint.every_n_steps=0"]  # fmt: skip
PHASES = ["data_wait", "forward", "backward", "optimizer", "other"]


def files(folder) -> dict:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.iterdir()}


@pytest.mark.slow
def test_a_window_writes_a_trace_the_top_operators_and_the_phases_then_the_report_draws_them(cli):
    run = cli(*RUN, "trainer.max_steps=6", "profile.steps=[3,5]", "run.name=one")
    assert run.returncode == 0, run.output
    out = run.cwd / "runs" / "one" / "profile"
    assert sorted(p.name for p in out.iterdir()) == ["phases.json", "rank-0.ops.txt", "rank-0.trace.json"]
    assert "profiled steps 3-5 on rank(s) 0" in run.output

    trace = json.loads((out / "rank-0.trace.json").read_text())  # what Perfetto and chrome://tracing load
    ops = [e for e in trace["traceEvents"] if e.get("ph") == "X" and e["name"].startswith("aten::")]
    track = [e["name"] for e in trace["traceEvents"] if e.get("cat") == "trainer"]
    assert ops and {"step 3", "step 4", "step 5", "forward", "backward", "optimizer"} <= set(track)
    table = (out / "rank-0.ops.txt").read_text()
    assert "self_cpu_time_total" in table and "Self CPU" in table and "aten::" in table

    phases = json.loads((out / "phases.json").read_text())
    assert phases["window"] == [3, 5] and phases["phases"] == PHASES and list(phases["ranks"]) == ["0"]
    rank = phases["ranks"]["0"]
    assert rank["steps"] == [3, 5] and [s["step"] for s in rank["per_step"]] == [3, 4, 5]
    for name in ("data_wait", "forward", "backward", "optimizer"):  # digits are read through a DataLoader
        assert rank["phases_s"][name] > 0, name
    for step in rank["per_step"]:  # every second of a step is in one phase
        assert sum(step[name] for name in PHASES) == pytest.approx(step["step_s"], rel=1e-6)
    assert rank["collectives_s"] == 0.0  # one process

    report = cli("report", "runs/one")
    assert report.returncode == 0, report.output
    lines = report.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("RANK"))
    assert lines[header].split() == ["RANK", "DATA", "WAIT", "FORWARD", "BACKWARD", "OPTIMIZER", "OTHER", "STEP",
                                     "COLLECTIVES"]  # fmt: skip
    assert lines[header + 1].split()[0] == "0" and "mean of steps 3-5" in lines[header - 1]
    import matplotlib.image

    assert matplotlib.image.imread(run.cwd / "runs" / "one" / "report" / "step_time.png").shape[0] > 100

    # Continued past the window, the run records nothing again and its files stay as they are.
    before = files(out)
    more = cli(*RUN, "trainer.max_steps=8", "profile.steps=[3,5]", "run.name=one")
    assert more.returncode == 0, more.output
    assert "the window was recorded before" in more.output and files(out) == before


@pytest.mark.distributed
def test_two_ranks_record_each_their_trace_and_the_collectives(cli):
    run = cli(*RUN, "strategy=ddp", "trainer.devices=2", "trainer.max_steps=5", "profile.steps=[3,4]",
              "profile.ranks=[0,1]", "run.name=ddp")  # fmt: skip
    assert run.returncode == 0, run.output
    out = run.cwd / "runs" / "ddp" / "profile"
    for rank in (0, 1):
        assert json.loads((out / f"rank-{rank}.trace.json").read_text())["traceEvents"]
        assert (out / f"rank-{rank}.ops.txt").is_file()
    phases = json.loads((out / "phases.json").read_text())
    assert sorted(phases["ranks"]) == ["0", "1"]
    for figures in phases["ranks"].values():
        assert figures["steps"] == [3, 4] and figures["phases_s"]["backward"] > 0
        assert figures["collectives_s"] > 0  # gloo's all-reduce of the gradients, at least


@pytest.mark.unit
def test_off_the_run_has_no_profiler_and_the_window_is_no_part_of_the_run_name(tmp_path):
    from trainer.config.compose import compose, session
    from trainer.fit import build_trainer
    from trainer.metrics.profile import StepProfiler

    def composed(*extra: str):
        with session():
            return compose(["experiment=digits_mlp", "trainer.accelerator=cpu", *extra], where="local",
                           run_root=tmp_path)  # fmt: skip

    off, on = composed(), composed("profile.steps=[20,25]", "profile.memory=true")
    assert off.conf.profile.steps is None and off.paths.name == on.paths.name
    callbacks = build_trainer(off, {}, "id", [])[0].callbacks
    assert not any(isinstance(cb, StepProfiler) for cb in callbacks)
    # on, it comes first: a step's optimizer phase ends before the other callbacks' work
    assert isinstance(build_trainer(on, {}, "id", [])[0].callbacks[0], StepProfiler)


@pytest.mark.unit
@pytest.mark.parametrize(
    ("overrides", "line"),
    [
        (
            ["profile.steps=[5,3]"],
            "profile.steps=[5,3]: expected [first, last] optimizer steps, 0 < first <= last",
        ),
        (["profile.steps=[0,3]"], "profile.steps=[0,3]: expected [first, last]"),
        (["profile.steps=[3]"], "profile.steps=[3]: expected [first, last]"),
        (["profile.ranks=[-1]"], "profile.ranks=[-1]: expected a list of ranks >= 0"),
        (["profile.steps=[3,5]", "profile.ranks=[0,1]"], "profile.ranks=[0,1]: expected ranks below 1"),
    ],
)
def test_a_bad_window_is_one_line_exit_2_and_nothing_written(tmp_path, monkeypatch, capsys, overrides, line):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "experiment=digits_mlp", "trainer.accelerator=cpu", *overrides]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {line}") and err.count("\n") == 1, err
    assert list(tmp_path.iterdir()) == []
