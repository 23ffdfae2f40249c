"""The CUDA paths (NCCL, bf16, MFU against the data-sheet peak). Never in CI: run with `pytest -m gpu` on a
machine with NVIDIA GPUs."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import column, read_metrics

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def test_bf16_mixed_on_one_gpu_reports_mfu_against_the_table(cli):
    result = cli("train", "precision=bf16-mixed", "trainer.accelerator=gpu", "trainer.max_steps=50",
                 "data=synthetic", "model.n_layer=6", "model.n_embd=384", "model.n_head=6", "model.block_size=256")  # fmt: skip
    assert result.returncode == 0, result.output
    (run_dir,) = result.run_dirs()
    summary = json.loads((run_dir / "run.json").read_text())["summary"]
    assert "data-sheet peak" in summary["peak_source"] or "not in the peak table" in summary["peak_source"]
    assert all(0 < m <= 1 for m in column(read_metrics(run_dir), "train/mfu"))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_nccl_ddp_on_two_gpus(cli):
    result = cli("train", "strategy=ddp", "trainer.devices=2", "trainer.accelerator=gpu", "trainer.max_steps=20",
                 "data=synthetic")  # fmt: skip
    assert result.returncode == 0, result.output
    assert "nccl" in result.output
    assert result.stdout.count("finished 20 steps on 2 process(es)") == 1
