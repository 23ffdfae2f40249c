"""A user's own LightningModule and LightningDataModule, from their own package and config directory."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import REPO, column, read_metrics

pytestmark = pytest.mark.slow


@pytest.fixture
def user_project(tmp_path: Path) -> Path:
    """The README's example, copied somewhere outside this project."""
    project = tmp_path / "elsewhere"
    # its sources only: a user may have run the example where it lives (its runs/ are not part of it)
    shutil.copytree(REPO / "examples" / "byo", project, ignore=shutil.ignore_patterns("runs", "__pycache__"))
    return project


def test_own_model_and_data_from_own_config_dir(cli, user_project):
    env = {"PYTHONPATH": str(user_project)}
    result = cli("train", "--config-dir", str(user_project / "myconf"), "experiment=waves", "trainer.max_steps=64",
                 cwd=user_project, env=env)  # fmt: skip
    assert result.returncode == 0, result.output
    (run_dir,) = result.run_dirs()
    assert run_dir.name.startswith("waves-")
    rows = read_metrics(run_dir)
    losses, val = column(rows, "train/loss"), column(rows, "val/loss")
    assert len(losses) == 6 and losses[-1] < losses[0]
    assert column(rows, "val/mae"), "a metric the user's module logs gets its own column"
    assert len(val) == 2 and val[-1] < val[0]
    assert "_target_: mylab.WaveRegressor" in (run_dir / "config.yaml").read_text()


def test_own_group_options_beside_the_built_in_ones(cli, user_project):
    env = {"PYTHONPATH": str(user_project)}
    result = cli("train", "-cd", str(user_project / "myconf"), "model=wave", "data=waves", "+model.extra=1",
                 "debug=smoke", cwd=user_project, env=env)  # fmt: skip
    # `+` adds a key to the user's untyped model config; the user's class then refuses the unknown argument.
    assert result.returncode != 0 and "extra" in result.output
    result = cli("train", "-cd", str(user_project / "myconf"), "model=wave", "data=waves", "model.hidden=8",
                 "debug=smoke", cwd=user_project, env=env)  # fmt: skip
    assert result.returncode == 0, result.output


def test_own_model_under_ddp(cli, user_project):
    env = {"PYTHONPATH": str(user_project)}
    result = cli("train", "--config-dir", str(user_project / "myconf"), "experiment=waves", "strategy=ddp",
                 "trainer.devices=2", "trainer.max_steps=20", cwd=user_project, env=env)  # fmt: skip
    assert result.returncode == 0, result.output
    (run_dir,) = result.run_dirs()
    assert len(column(read_metrics(run_dir), "train/loss")) == 2
