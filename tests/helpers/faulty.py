"""A model that fails on purpose, for the failure-handling tests (used as a user's own model would be)."""

from __future__ import annotations

import os
import time

import torch

from trainer.models.mlp import MLPModule


class FaultyMLP(MLPModule):
    """The built-in MLP, plus: sleep in each step; raise on ``fail_rank`` at ``fail_step``; return NaN from ``nan_step`` on."""

    def __init__(self, fail_step: int | None = None, fail_rank: int = 0, nan_step: int | None = None,
                 nan_rank: int = 0, step_sleep_s: float = 0.0, **kwargs) -> None:  # fmt: skip
        super().__init__(**kwargs)
        self.step_sleep_s = step_sleep_s  # slows steps down so a test can signal a run mid-way
        self.fail_step, self.fail_rank, self.nan_step, self.nan_rank = (
            fail_step,
            fail_rank,
            nan_step,
            nan_rank,
        )

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        if self.step_sleep_s:
            time.sleep(self.step_sleep_s)
        step = self.trainer.global_step + 1  # the step this batch belongs to
        rank = int(os.environ.get("RANK", 0))
        if self.fail_step is not None and step >= self.fail_step and rank == self.fail_rank:
            raise RuntimeError(f"deliberate failure at step {step} on rank {rank}")
        if self.nan_step is not None and step >= self.nan_step and rank == self.nan_rank:
            loss = loss * torch.tensor(float("nan"))
        return loss
