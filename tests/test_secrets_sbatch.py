"""Secrets stay out of checkpoints, records and job command lines; options the sbatch template sets cannot
be set again through cluster.sbatch or cluster.srun in any spelling sbatch and srun accept; a % in a run's
directory reaches the #SBATCH --output line literally. All in this process, no scheduler."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

SECRET = "tok-3f9a1c77e0b24d5e"  # as a user module's api_token
ENV_SECRET = "wandb-8c1d2e3f4a5b6c7d"  # as $WANDB_API_KEY


@pytest.mark.unit
def test_checkpoints_hold_no_secret_and_a_resumed_module_keeps_its_real_value(tmp_path, monkeypatch):
    from trainer.checkpoint.hparams import PlainHyperparameters
    from trainer.namespace import pl

    monkeypatch.setenv("WANDB_API_KEY", ENV_SECRET)

    class Tiny(pl.LightningModule):
        def __init__(self, api_token: str, remote: dict, endpoints: list) -> None:
            super().__init__()
            self.save_hyperparameters()
            self.layer = torch.nn.Linear(2, 1)

        def training_step(self, batch, batch_idx):
            return self.layer(batch[0]).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    class Data(pl.LightningDataModule):
        def __init__(self, hubToken: str) -> None:
            super().__init__()
            self.save_hyperparameters()

        def train_dataloader(self):
            return torch.utils.data.DataLoader(
                torch.utils.data.TensorDataset(torch.randn(8, 2)), batch_size=2
            )

    def fit(max_steps: int, ckpt_path: Path | None = None) -> tuple[pl.Trainer, Tiny]:
        model = Tiny(SECRET, {"auth": {"password": SECRET}, "url": "https://x"}, ["a", ENV_SECRET])
        trainer = pl.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                             callbacks=[PlainHyperparameters({}, {})])  # fmt: skip
        trainer.fit(model, datamodule=Data(SECRET), ckpt_path=ckpt_path)
        return trainer, model

    trainer, _ = fit(2)
    path = tmp_path / "step-2.ckpt"
    trainer.save_checkpoint(path)  # Lightning's own save path, as the Checkpointer takes it
    raw = path.read_bytes()
    assert SECRET.encode() not in raw and ENV_SECRET.encode() not in raw
    saved = torch.load(path, weights_only=True)
    assert saved["hyper_parameters"] == {"api_token": "***", "remote": {"auth": {"password": "***"}, "url": "https://x"},
                                         "endpoints": ["a", "***"]}  # fmt: skip
    assert saved["datamodule_hyper_parameters"] == {"hubToken": "***"}

    # A resumed run builds its module from the config; the checkpoint's redacted copy is not read back.
    trainer, model = fit(4, ckpt_path=path)
    assert trainer.global_step == 4
    assert model.hparams.api_token == SECRET and model.hparams.remote["auth"]["password"] == SECRET


@pytest.mark.unit
@pytest.mark.parametrize(
    "name",
    ["api_key", "apiKey", "accessKey", "secretKey", "apiToken", "model.hubToken", "AWS_SECRET_ACCESS_KEY",
     "AWSSecretKey", "WANDB_API_KEY", "hub-password", "db.passwd", "passphrase", "credentials", "client_secret",
     "apikey", "accesskey", "privatekey", "authtoken", "api_keys", "API_KEY_2", "key", "TOKEN"],
)  # fmt: skip
def test_secret_names_in_every_case_style(name):
    from trainer.secrets import is_secret_name

    assert is_secret_name(name)


@pytest.mark.unit
@pytest.mark.parametrize(
    "name",
    ["max_tokens", "tokenizer", "key_padding", "monkey", "n_tokens", "num_keys", "maxTokens", "pad_token",
     "eosToken", "special_tokens", "keyboard", "secretary", "passwordless", "lr", "model.n_layer", "PWD"],
)  # fmt: skip
def test_ordinary_names_are_not_secret(name):
    from trainer.secrets import is_secret_name

    assert not is_secret_name(name)


@pytest.mark.unit
def test_values_of_secret_environment_variables_are_redacted_wherever_they_appear(monkeypatch):
    from trainer.secrets import redact, redact_override

    monkeypatch.setenv("WANDB_API_KEY", ENV_SECRET)
    monkeypatch.setenv("HF_TOKEN", "12345678")  # a number on the command line
    monkeypatch.setenv("LOCK_KEY", "abc")  # too short to tell from an ordinary value
    monkeypatch.setenv("DATA_ROOT", "/datasets/imagenet")  # long, but not a secret's name
    cfg = {"model": {"note": ENV_SECRET, "seed": 12345678, "tag": "abc", "root": "/datasets/imagenet"},
           "trials": [{"x": ENV_SECRET}], "pair": (1, ENV_SECRET)}  # fmt: skip
    assert redact(cfg) == {"model": {"note": "***", "seed": "***", "tag": "abc", "root": "/datasets/imagenet"},
                           "trials": [{"x": "***"}], "pair": (1, "***")}  # fmt: skip
    assert redact_override(f"+model.note={ENV_SECRET}") == "+model.note=***"
    assert redact_override(f"+model.note='{ENV_SECRET}'") == "+model.note=***"
    assert redact_override("+model.accessKey=AKIA0000") == "+model.accessKey=***"
    assert redact_override("model.tag=abc") == "model.tag=abc"


@pytest.mark.unit
@pytest.mark.parametrize(
    ("override", "key"),
    [("accessKey=AKIAEXAMPLE0001", "accessKey"), ("+model.secretKey=sk-example-0001", "model.secretKey"),
     (f"+model.note={ENV_SECRET}", "model.note")],
)  # fmt: skip
def test_submit_refuses_a_secret_in_one_line_that_names_the_key_not_the_value(
    override, key, monkeypatch, capsys
):
    from trainer.submit import main

    monkeypatch.setenv("WANDB_API_KEY", ENV_SECRET)
    assert main(["--dry-run", "cluster=slurm", override]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1, err
    assert err.startswith(f"error: {key}=<hidden>: expected no secrets in a job's command line"), err
    assert override.split("=", 1)[1] not in err


def _check(sbatch: list[str] | None = None, srun: list[str] | None = None) -> None:
    from trainer.config.schema import ClusterConfig
    from trainer.launch.slurm import check_extra_options

    check_extra_options(ClusterConfig(name="c", sbatch=sbatch or [], srun=srun or []))


@pytest.mark.unit
@pytest.mark.parametrize(
    ("where", "word", "spelled"),
    [("srun", "-K0", "-K"), ("srun", "-K", "-K"), ("srun", "--kill-on=0", "--kill-on-bad-exit"),
     ("srun", "--kill", "--kill-on-bad-exit"), ("srun", "-lK", "-K"), ("srun", "-luK1", "-K"),
     ("srun", "--k", "--kill-on-bad-exit"), ("srun", "-c8", "-c"), ("srun", "--cpus-per-t=8", "--cpus-per-task"),
     ("srun", "--nta=1", "--ntasks"), ("srun", "--", None), ("sbatch", "-N2", "-N"),
     ("sbatch", "--nod=2", "--nodes"), ("sbatch", "--open=truncate", "--open-mode"),
     ("sbatch", "--out=x.log", "--output"), ("sbatch", "--err=x.err", "--error"), ("sbatch", "-oX", "-o"),
     ("sbatch", "--tasks-per=2", "--tasks-per-node"), ("sbatch", "--no-req", "--no-requeue"),
     ("sbatch", "--req", "--requeue"), ("sbatch", "--exp=NONE", "--export"), ("sbatch", "--t=5", "--tasks-per-node"),
     ("sbatch", "--ti=5", "--time"), ("sbatch", "-vt5", "-t"), ("sbatch", "--sig=USR2@60", "--signal"),
     ("sbatch", "--gpus-per-n=2", "--gpus-per-node"), ("sbatch", "--ex", "--exclusive"), ("sbatch", "-a0-3", "-a")],
)  # fmt: skip
def test_every_spelling_of_an_option_the_template_sets_is_refused(where, word, spelled):
    from trainer.config.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        _check(**{where: [word]})
    assert err.value.key == f"cluster.{where}" and err.value.value == word
    if spelled is not None:
        assert f"({spelled}" in err.value.allowed, err.value.allowed


@pytest.mark.unit
def test_options_the_template_does_not_set_are_accepted():
    _check(sbatch=["--mail-type=END", "--mem-per-cpu=4G", "--gres-flags=enforce-binding", "--time-min=30",
                   "--cpus-per-gpu=8", "--export-file=env.txt", "--exclude=node[1-2]", "-wnode3", "-k",
                   "--reservation=big", "--nice=10", "--gpus-per-task=1", "-vv", "--cluster=alpha"],
           srun=["-l", "-lu", "--label", "--cpu-bind=cores", "--mpi=pmix", "-wnodeK", "--exact",
                 "--ntasks-per-core=1", "--gpu-bind=closest", "-I5", "--threads=4"])  # fmt: skip


@pytest.mark.unit
def test_the_owned_options_are_options_of_sbatch_and_srun():
    """A misspelt name in the owned list would refuse nothing at all."""
    from trainer.launch import slurm, slurm_options

    assert set(slurm._OWNED_OPTIONS) <= slurm_options.SBATCH.long
    assert set(slurm._SRUN_OWNED) - {"array", "requeue", "no-requeue"} <= slurm_options.SRUN.long
    for table in (slurm_options.SBATCH, slurm_options.SRUN):
        assert set(table.short.values()) <= table.long and set(table.flags) <= set(table.short)


@pytest.mark.unit
def test_a_percent_in_the_run_dir_reaches_the_output_line_literally(tmp_path, monkeypatch):
    from trainer import rundir
    from trainer.config.schema import ClusterConfig
    from trainer.launch import slurm
    from trainer.submit import Options, Submission, write_and_submit

    run_dir = tmp_path / "runs" / "loss%j-%x"
    trial = slurm.Trial(0, [], ["run.name=loss%j-%x"], "loss%j-%x", run_dir)
    job = slurm.Job(cluster=ClusterConfig(name="c"), nodes=1, tasks_per_node=1, job_name="loss%j-%x",
                    log_dir=run_dir / "slurm", workdir=tmp_path, what="run loss%j-%x", trials=[trial],
                    python="/opt/venv/bin/python")  # fmt: skip
    script = slurm.render(job)
    assert f"#SBATCH --output={tmp_path}/runs/loss%%j-%%x/slurm/%j.out\n" in script
    assert script.count("%%") == 2  # nowhere else: job names and comments are not patterns

    # What sbatch makes of %% is a single %: the ledger (and so `trainer status`) names that file.
    monkeypatch.setattr(slurm, "submit", lambda path: "4242")
    write_and_submit(Submission(job, script, [], None, [trial]), Options())
    entry = json.loads(rundir.jobs_file(run_dir).read_text())["jobs"][-1]
    assert entry["log"] == str(run_dir / "slurm" / "4242.out")
