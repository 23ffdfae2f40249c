"""A model that fails on purpose, for the failure-handling tests (used as a user's own model would be)."""

from __future__ import annotations

import atexit
import os
import signal
import time

import torch

from trainer.models.mlp import MLPModule


class FaultyMLP(MLPModule):
    """The built-in MLP, plus: sleep in each step; raise on ``fail_rank`` at ``fail_step``; return NaN from
    ``nan_step`` on; write to ``exit_report``, as the process exits, what SIGUSR1 and SIGTERM would do then;
    clip every weight to [-clip_weights, clip_weights] in place at the start of each step (a WGAN critic's
    weight clipping: a change outside the optimizer step)."""

    def __init__(self, fail_step: int | None = None, fail_rank: int = 0, nan_step: int | None = None,
                 nan_rank: int = 0, step_sleep_s: float = 0.0, exit_report: str | None = None,
                 clip_weights: float | None = None, **kwargs) -> None:  # fmt: skip
        super().__init__(**kwargs)
        self.clip_weights = clip_weights
        if exit_report:
            atexit.register(_report_signals, exit_report)
        self.step_sleep_s = step_sleep_s  # slows steps down so a test can signal a run mid-way
        self.fail_step, self.fail_rank, self.nan_step, self.nan_rank = (
            fail_step,
            fail_rank,
            nan_step,
            nan_rank,
        )

    def training_step(self, batch, batch_idx):
        if self.clip_weights is not None:
            with torch.no_grad():
                for p in self.parameters():
                    p.clamp_(-self.clip_weights, self.clip_weights)
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


def _report_signals(path: str) -> None:
    """At interpreter exit: "ignored" or what else each preemption signal's disposition is (a handler written
    in Python is put back to the default action, death, later in the shutdown)."""
    with open(path, "w") as f:
        for signum in (signal.SIGUSR1, signal.SIGTERM):
            handler = signal.getsignal(signum)
            f.write(f"{signum.name} {'ignored' if handler is signal.SIG_IGN else repr(handler)}\n")
