"""Bad input: one line naming the key, the value and what is allowed; exit 2; nothing written or started."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from trainer.cli import main

pytestmark = pytest.mark.unit


def cases(tmp: Path) -> list[tuple[list[str], str]]:
    empty_dir = tmp / "empty"
    empty_dir.mkdir(exist_ok=True)
    empty_file = tmp / "empty.txt"
    empty_file.write_text("")
    small_file = tmp / "small.txt"
    small_file.write_text("x" * 3000)  # enough bytes for a sample, not for a batch of 32
    return [
        (["trainer.max_stepz=10"], "trainer.max_stepz: unknown key; expected a key of trainer: accelerator"),
        (["+trainer.foo=1"], "trainer.foo: unknown key"),
        (["+model.widht=3"], "model.widht: unknown key"),
        (["trainer.max_steps=ten"], "trainer.max_steps=ten: expected an integer"),
        (["optim.lr=abc"], "optim.lr=abc: expected a number"),
        (["optim.lr=-0.1"], "optim.lr=-0.1: expected a finite number > 0"),
        (["optim.lr=0"], "optim.lr=0.0: expected a finite number > 0"),
        (["data.batch_size=0"], "data.batch_size=0: expected a number > 0"),
        (["data.batch_size=-4"], "data.batch_size=-4: expected a number > 0"),
        (["trainer.max_steps=0"], "trainer.max_steps=0: expected a number > 0"),
        (["trainer.max_steps=-5"], "trainer.max_steps=-5: expected a number > 0"),
        (["model.n_head=3"], "model.n_head=3: expected a divisor of n_embd=128"),
        (["model=transformerxl"], "model=transformerxl: unknown option; expected one of gpt, mlp"),
        (["strategy=deepspeed"], "strategy=deepspeed: unknown option; expected one of auto, ddp, fsdp"),
        (
            ["precision=64"],
            "precision=64: unknown option; expected one of 16-mixed, 32, bf16-mixed, bf16-true",
        ),
        (
            ["precision=16-mixed", "trainer.accelerator=cpu"],
            "precision=16-mixed: expected 32, bf16-mixed or bf16-true on cpu",
        ),
        (["strategy=ddp", f"trainer.devices={(os.cpu_count() or 1) + 1}"], "expected at most"),
        (["trainer.num_nodes=2"], "trainer.num_nodes=2: expected 1 here"),
        (
            ["strategy=fsdp", "strategy.cpu_offload=true", "trainer.accelerator=cpu"],
            "strategy.cpu_offload=true: expected false on cpu",
        ),
        (
            ["strategy=fsdp", "precision=16-mixed"],
            "precision=16-mixed: expected 32, bf16-mixed or bf16-true with strategy=fsdp",
        ),
        (
            ["strategy=fsdp", "strategy.sharding=zero3"],
            "strategy.sharding=zero3: expected one of full, hybrid",
        ),
        (["trainer.accelerator=tpu"], "trainer.accelerator=tpu: expected one of auto, cpu, gpu, cuda, mps"),
        (["model=mlp"], "data=text: expected data=digits for model=mlp"),
        (
            ["data.path=/no/such/corpus"],
            "data.path=/no/such/corpus: expected an existing file, directory or glob",
        ),
        ([f"data.path={empty_dir}"], "matches files (none do)"),
        ([f"data.path={empty_file}"], "expected a corpus of at least 258 bytes"),
        (
            ["resume=/no/such.ckpt"],
            "resume=/no/such.ckpt: expected auto, never or the path of an existing checkpoint",
        ),
        ([f"data.path={small_file}"], "training samples of seq_len=128 for one global batch"),
        (["scheduler.schedule=linear"], "scheduler.schedule=linear: expected one of cosine, constant"),
        (["run.name=a/b"], "run.name=a/b: expected a name without '/'"),
        (["experiment=nope"], "experiment=nope: unknown option"),
        (["trainer.max_steps"], "cannot parse override"),
        (["checkpoint.keep_last_k=0"], "checkpoint.keep_last_k=0: expected a number > 0"),
        (
            ["checkpoint.save_on_signals=[SIGKILL]"],
            "checkpoint.save_on_signals=SIGKILL: expected signal names",
        ),
        (["checkpoint.mode=avg"], "checkpoint.mode=avg: expected one of min, max"),
        (
            ["trainer.on_nonfinite_loss=explode"],
            "trainer.on_nonfinite_loss=explode: expected one of stop, skip",
        ),
        (["strategy.step_timeout_s=0"], "strategy.step_timeout_s=0: expected a number > 0"),
        (
            ["logger=wandb", "logger.wandb.mode=cloud"],
            "logger.wandb.mode=cloud: expected one of offline, online, disabled",
        ),
        (["logger=mlflow"], "logger=mlflow: unknown option; expected one of csv, tensorboard, wandb"),
        # the typed entries the YAML files build on are not options
        (["model=gpt_schema"], "model=gpt_schema: expected one of gpt, mlp"),
        (
            ["cluster.env.FOO=1"],
            "cluster.env.FOO: unknown key; expected an existing key (`trainer train --cfg job` "
            "lists them), or +cluster.env.FOO=... to add one",
        ),  # fmt: skip
    ]


def test_bad_configs_fail_in_one_line_with_exit_2(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for overrides, expected in cases(tmp_path):
        code = main(["train", *overrides])
        captured = capsys.readouterr()
        err_lines = [line for line in captured.err.splitlines() if line.strip()]
        assert code == 2, (overrides, captured.err)
        assert len(err_lines) == 1, (overrides, captured.err)
        assert err_lines[0].startswith("error: ") and expected in err_lines[0], (overrides, err_lines[0])
        assert not (tmp_path / "runs").exists(), overrides
        assert not (tmp_path / "outputs").exists() and not (tmp_path / "multirun").exists()


def test_existing_run_is_not_reused_with_resume_never(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "runs" / "mine"
    run_dir.mkdir(parents=True)
    (run_dir / "run.json").write_text('{"status": "finished", "attempts": []}')
    (run_dir / "config.yaml").write_text("seed: 1\n")
    before = {p: p.read_bytes() for p in run_dir.iterdir()}
    assert main(["train", "run.name=mine", "resume=never", "trainer.accelerator=cpu"]) == 2
    assert "resume=never: expected auto, or a new run.name" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in run_dir.iterdir()} == before


def test_a_directory_that_is_not_a_run_is_never_written(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "thesis.tex").write_text("do not touch")
    assert main(["train", "run.dir=precious", "trainer.accelerator=cpu"]) == 2
    assert "run.dir=precious: expected a new or empty directory" in capsys.readouterr().err
    assert os.listdir(tmp_path / "precious") == ["thesis.tex"]


def test_changed_model_in_an_existing_run_names_the_keys(tmp_path, monkeypatch, capsys):
    import yaml

    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "runs" / "mine"
    run_dir.mkdir(parents=True)
    (run_dir / "run.json").write_text('{"status": "running", "attempts": []}')
    assert main(["train", "run.name=mine", "--cfg", "job"]) == 0
    composed = yaml.safe_load(capsys.readouterr().out)
    composed["model"]["n_layer"] = 8
    composed["data"]["seq_len"] = 128
    (run_dir / "config.yaml").write_text(yaml.safe_dump(composed))
    assert main(["train", "run.name=mine", "trainer.accelerator=cpu"]) == 2
    err = capsys.readouterr().err
    assert "model.n_layer" in err and err.count("\n") == 1


def test_a_key_given_twice_takes_the_last_and_says_so():
    from trainer.config.compose import compose, session

    with session():
        c = compose(["optim.lr=1e-3", "optim.lr=2e-3", "cluster=slurm"], where="cluster")
    assert c.resolved["optim"]["lr"] == 0.002
    assert c.notes == (
        "optim.lr is given twice: optim.lr=2e-3 is used (the last)",
    )  # said once the run is good
