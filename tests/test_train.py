"""End to end through the real CLI: presets, the run directory, re-runs, sweeps and a golden loss curve."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import column, read_metrics

from trainer.config.compose import conf_dir
from trainer.metrics.csv_logger import COLUMNS

pytestmark = pytest.mark.slow

TINY_GPT = [
    "model.n_layer=2",
    "model.n_head=2",
    "model.n_embd=64",
    "model.block_size=32",
    "data.batch_size=8",
]


def _preset(path: Path) -> object:
    """A preset for GPUs (experiment=gpt_150m) runs in the gpu tier only: on CPU one batch takes minutes."""
    if "accelerator: gpu" not in path.read_text():
        return path.stem
    no_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="a GPU preset")
    return pytest.param(path.stem, marks=[pytest.mark.gpu, no_gpu])


# The presets for CPUs run in tests/test_readme.py, which runs every README command and checks that each of
# them is among those commands; the GPU ones run here, in the gpu tier.
PRESETS = [
    _preset(p)
    for p in sorted((Path(conf_dir()) / "experiment").glob("*.yaml"))
    if "accelerator: gpu" in p.read_text()
]


def test_a_smoke_run_runs_again_each_time(cli):
    """A smoke run is for re-checking the code after an edit: the same command twice is two runs."""
    first, second = (cli("train", "experiment=digits_mlp", "debug=smoke") for _ in range(2))
    assert first.returncode == 0 and second.returncode == 0, first.output + second.output
    assert "already finished" not in second.output and "finished 1 steps" in second.output
    names = [p.name for p in second.run_dirs("runs/debug")]
    assert len(names) == 2 and names[1] == names[0] + "-2", names


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_runs_one_batch(cli, preset):
    result = cli("train", f"experiment={preset}", "debug=smoke")
    assert result.returncode == 0, result.output
    (run_dir,) = result.run_dirs("runs/debug")
    assert run_dir.name.startswith(preset + "-")
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == ["1"] and float(rows[0]["train/loss"]) > 0 and rows[0]["val/loss"]
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 1
    assert result.output.count("finished 1 steps") == 1


def test_run_directory_holds_everything_and_a_rerun_changes_nothing(cli, text_corpus):
    args = ["train", f"data.path={text_corpus}", *TINY_GPT, "trainer.max_steps=20", "trainer.log_every_n_steps=5",
            "trainer.val_check_interval=10", "checkpoint.every_n_steps=10"]  # fmt: skip
    first = cli(*args)
    assert first.returncode == 0, first.output
    (run_dir,) = first.run_dirs()
    assert {p.name for p in run_dir.iterdir()} >= {
        "config.yaml",
        "overrides.yaml",
        "run.json",
        "metrics.csv",
        "checkpoints",
    }
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert not (first.cwd / "outputs").exists() and not list(first.cwd.glob("*.log"))

    state = json.loads((run_dir / "run.json").read_text())
    assert state["status"] == "finished" and state["seed"] == 1234
    assert {"torch", "pytorch-lightning", "hydra-core", "python"} <= set(state["versions"])
    assert "commit" in state["git"] and "dirty" in state["git"]
    assert state["summary"]["steps"] == 20

    rows = read_metrics(run_dir)
    assert list(rows[0].keys())[: len(COLUMNS)] == list(COLUMNS)
    assert [int(r["step"]) for r in rows] == [5, 10, 15, 20]
    assert len(column(rows, "val/loss")) == 2  # validation at steps 10 and 20, in the same rows as training
    for r in rows:
        assert 0 < float(r["train/mfu"]) <= 1.0
        assert 0 <= float(r["train/data_wait_frac"]) < 1.0
        assert float(r["train/tokens_per_sec"]) == pytest.approx(float(r["train/samples_per_sec"]) * 32)
    losses = column(rows, "train/loss")
    assert losses[-1] < losses[0]
    assert "tokens/s" in first.stdout and str(run_dir.relative_to(first.cwd)) in first.stdout

    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in run_dir.rglob("*") if p.is_file()}
    second = cli(*args)
    assert second.returncode == 0, second.output
    assert "already finished" in second.output
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in run_dir.rglob("*") if p.is_file()} == before


GOLDEN = Path(__file__).parent / "golden" / "gpt_tiny_cpu_fp32.json"
# Stated tolerance: CPU fp32 kernels differ by instruction set and thread count (summation order), which
# moves a 30-step loss curve by ~1e-5 here; 2e-3 absolute catches any real change to model, data or optimizer.
GOLDEN_ATOL = 2e-3


def test_golden_loss_curve(cli, text_corpus):
    args = ["train", f"data.path={text_corpus}", *TINY_GPT, "trainer.max_steps=30", "trainer.log_every_n_steps=1",
            "trainer.val_check_interval=1000", "trainer.accelerator=cpu", "seed=7", "scheduler.warmup_steps=5"]  # fmt: skip
    result = cli(*args, env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.output
    (run_dir,) = result.run_dirs()
    losses = column(read_metrics(run_dir), "train/loss")
    assert len(losses) == 30
    if os.environ.get("UPDATE_GOLDEN") == "1":
        recorded = ["data.path=<text_corpus fixture>", *args[2:]]
        GOLDEN.write_text(json.dumps({"args": recorded, "atol": GOLDEN_ATOL, "train/loss": losses}, indent=1))
    golden = json.loads(GOLDEN.read_text())
    assert losses == pytest.approx(golden["train/loss"], abs=GOLDEN_ATOL)


@pytest.mark.extended
def test_compiled_model_follows_the_golden_curve(cli, text_corpus):
    """model.compile=true (Inductor's C++ kernels on CPU) trains the same model: the golden curve within its
    tolerance, and a checkpoint with the eager module's parameter names (so resume and export do not care)."""
    args = ["train", f"data.path={text_corpus}", *TINY_GPT, "trainer.max_steps=30", "trainer.log_every_n_steps=1",
            "trainer.val_check_interval=1000", "trainer.accelerator=cpu", "seed=7", "scheduler.warmup_steps=5",
            "model.compile=true"]  # fmt: skip
    result = cli(*args, env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.output
    (run_dir,) = result.run_dirs()
    losses = column(read_metrics(run_dir), "train/loss")
    golden = json.loads(GOLDEN.read_text())
    assert losses == pytest.approx(golden["train/loss"], abs=GOLDEN_ATOL)
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)[
        "state_dict"
    ]
    assert "net.wte.weight" in state and not any("_orig_mod" in k for k in state)


@pytest.mark.parametrize(
    "overrides",
    [
        ["data=synthetic", *TINY_GPT],
        ["experiment=digits_mlp", "precision=bf16-mixed"],
        ["experiment=digits_mlp", "precision=bf16-true"],
        [
            "experiment=digits_mlp",
            "trainer.accumulate_grad_batches=2",
            "trainer.max_steps=2",
            "trainer.max_epochs=null",
        ],
    ],
    ids=["synthetic", "bf16-mixed", "bf16-true", "grad-accumulation"],
)
def test_other_data_and_precisions_train(cli, overrides):
    result = cli("train", "debug=smoke", *overrides)
    assert result.returncode == 0, result.output
    (run_dir,) = result.run_dirs("runs/debug")
    loss = column(read_metrics(run_dir), "train/loss")
    assert loss and all(v == v and v > 0 for v in loss)  # finite and positive
