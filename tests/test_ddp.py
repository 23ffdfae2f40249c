"""Single-node DDP with 2 real processes over gloo: the same result as one process with the same global batch."""

from __future__ import annotations

import pytest
import torch
from conftest import column, read_metrics

pytestmark = pytest.mark.distributed

COMMON = ["model.n_layer=2", "model.n_head=2", "model.n_embd=64", "model.block_size=32", "model.dropout=0.0",
          "trainer.max_steps=12", "trainer.log_every_n_steps=1", "trainer.val_check_interval=6",
          "trainer.limit_val_batches=4", "trainer.accelerator=cpu", "checkpoint.every_n_steps=0"]  # fmt: skip
# Stated tolerance: the two runs add the same numbers in a different order (two half-batch means, averaged by
# an all-reduce); measured here the losses agree to ~1e-7 relative, parameters to ~1e-7 absolute.
LOSS_RTOL = 1e-5
PARAM_ATOL = 1e-5


def test_two_process_ddp_matches_one_process(cli, text_corpus):
    data = f"data.path={text_corpus}"
    single = cli(
        "train", data, *COMMON, "data.batch_size=16", "run.name=single", env={"OMP_NUM_THREADS": "1"}
    )
    assert single.returncode == 0, single.output
    ddp = cli(
        "train", data, *COMMON, "data.batch_size=8", "strategy=ddp", "trainer.devices=2", "run.name=ddp"
    )
    assert ddp.returncode == 0, ddp.output

    # One run directory per run: no extra Hydra output folders from the worker processes.
    assert [p.name for p in ddp.run_dirs()] == ["ddp", "single"]
    assert not (ddp.cwd / "outputs").exists()
    # Console output of rank zero only: one summary, one progress bar.
    assert ddp.stdout.count("finished 12 steps on 2 process(es)") == 1
    # Off a terminal the progress is one plain line per log interval: no redraws, no empty validation bars,
    # no warning twice.
    progress = [line for line in ddp.stdout.splitlines() if line.startswith("train: step ")]
    assert [line.split()[2] for line in progress] == [f"{s}/12" for s in range(1, 13)], ddp.stdout
    assert "\r" not in ddp.output and "Validation" not in ddp.output and "srun" not in ddp.output

    one, two = read_metrics(single.cwd / "runs" / "single"), read_metrics(ddp.cwd / "runs" / "ddp")
    assert [r["step"] for r in two] == [str(s) for s in range(1, 13)]  # one row per step, written once
    assert column(two, "train/loss") == pytest.approx(column(one, "train/loss"), rel=LOSS_RTOL)
    assert column(two, "val/loss") == pytest.approx(column(one, "val/loss"), rel=LOSS_RTOL)
    assert column(two, "train/loss")[-1] < column(two, "train/loss")[0]

    def weights(name: str) -> dict:
        ckpt = torch.load(
            ddp.cwd / "runs" / name / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True
        )
        return ckpt["state_dict"]

    a, b = weights("single"), weights("ddp")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=PARAM_ATOL, rtol=0)
