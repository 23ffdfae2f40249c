"""Every config group composes into the typed schema; Hydra's own flags work through ``trainer train``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from trainer.cli import main
from trainer.config import schema
from trainer.config.compose import conf_dir, normalize
from trainer.config.validate import to_typed

pytestmark = pytest.mark.unit

CONF = Path(conf_dir())
GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir())


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def compose_typed(overrides: list[str]) -> schema.TrainConfig:
    schema.register()
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=normalize(overrides))
    return to_typed(cfg)[0]


def test_groups_are_the_documented_ones():
    for group in (
        "model",
        "data",
        "optim",
        "strategy",
        "precision",
        "trainer",
        "logger",
        "experiment",
        "debug",
    ):
        assert group in GROUPS
        assert options(group), f"conf/{group}/ has no options"


@pytest.mark.parametrize(
    "group,option",
    [(g, o) for g in GROUPS for o in options(g) if g not in ("model", "data")],
)
def test_every_option_composes(group, option):
    conf = compose_typed([f"{group}={option}"])
    if group == "precision":
        assert conf.precision.value == option
    if group == "strategy":
        assert conf.strategy.name == option


@pytest.mark.parametrize("model,data", [("gpt", "text"), ("gpt", "synthetic"), ("mlp", "digits")])
def test_models_and_data_compose_in_their_pairs(model, data):
    conf = compose_typed([f"model={model}", f"data={data}"])
    assert isinstance(conf.model, {"gpt": schema.GPTConfig, "mlp": schema.MLPConfig}[model])
    assert type(conf.data).__name__.lower().startswith(data)


def test_data_follows_the_model_context_length():
    conf = compose_typed(["model.block_size=64"])
    assert conf.data.seq_len == 64 and conf.data.seed == conf.seed


def test_experiment_presets_set_their_groups():
    conf = compose_typed(["experiment=digits_mlp"])
    assert isinstance(conf.model, schema.MLPConfig) and isinstance(conf.data, schema.DigitsDataConfig)
    conf = compose_typed(["experiment=gpt_ddp"])
    assert conf.strategy.name == "ddp" and conf.trainer.devices == 2
    conf = compose_typed(["experiment=gpt_150m"])  # the GPU benchmark's model: about 151M parameters
    assert conf.precision.value == "bf16-mixed" and conf.model.compile and conf.data.seq_len == 1024
    n, d = conf.model.n_layer, conf.model.n_embd
    assert 12 * n * d * d == pytest.approx(151e6, rel=0.01)


def test_command_line_group_choice_wins_over_the_preset():
    conf = compose_typed(["experiment=gpt_ddp", "strategy=auto", "trainer.devices=1"])
    assert conf.strategy.name == "auto"


def test_cfg_job_prints_the_composed_config(capsys):
    assert main(["train", "optim.lr=0.01", "--cfg", "job"]) == 0
    out = capsys.readouterr().out
    assert "lr: 0.01" in out and "_target_: trainer.models.gpt.GPTModule" in out


def test_hydra_help_lists_the_groups(capsys):
    assert main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    for group in ("model", "data", "strategy", "precision", "experiment"):
        assert f"{group}:" in out
    # the options are the YAML files; the typed entries they build on are not listed (nor accepted)
    assert "model: gpt, mlp\n" in out and "_schema" not in out


def test_numeric_group_choice_is_a_file_name(capsys):
    assert main(["train", "precision=32", "--cfg", "job", "--package", "precision"]) == 0
    assert "value: '32'" in capsys.readouterr().out


def test_top_level_help_and_unknown_command(capsys):
    assert main(["--help"]) == 0
    assert "trainer train" in capsys.readouterr().out
    assert main(["fly"]) == 2
    assert "expected one of train" in capsys.readouterr().err


def test_help_and_cfg_do_not_import_torch():
    code = (
        "import sys, contextlib, io\n"
        "from trainer.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    assert main(['--help']) == 0\n"
        "    assert main(['train', '--cfg', 'job']) == 0\n"
        "    assert main(['train', '--help']) == 0\n"
        "heavy = [m for m in ('torch', 'pytorch_lightning') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
