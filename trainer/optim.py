"""What the built-in models' ``configure_optimizers`` returns, from the optimizer and scheduler the config gives
them (``_partial_`` nodes: ``optim`` and ``scheduler``), plus the built-in warmup schedule."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import torch

from trainer.config.targets import accepts


def param_groups(module: torch.nn.Module) -> list[dict]:
    """Weight decay on matrices (>= 2 dims) only, never on biases, norms or scalars: the second group sets
    its own ``weight_decay=0``, the first takes the optimizer's."""
    params = [p for p in module.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.dim() >= 2]},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str, min_lr_ratio: float) -> float:
    """Multiplier of the peak learning rate at optimizer step ``step`` (0-based)."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant" or total_steps <= warmup_steps:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class WarmupSchedule(torch.optim.lr_scheduler.LambdaLR):
    """Linear warmup over ``warmup_steps``, then cosine decay to ``min_lr_ratio`` of the peak at
    ``total_steps`` (or a constant rate), as a multiplier of each group's learning rate.

    The shape is not part of the scheduler's saved state (only the step is): it comes from the config each
    time, so a finished run continued with a larger ``max_steps`` decays over its new length."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        total_steps: int,
        warmup_steps: int = 20,
        schedule: str = "cosine",
        min_lr_ratio: float = 0.1,
    ) -> None:
        factor = functools.partial(lr_factor, total_steps=int(total_steps), warmup_steps=int(warmup_steps),
                                   schedule=str(schedule), min_lr_ratio=float(min_lr_ratio))  # fmt: skip
        super().__init__(optimizer, factor)


def configure(
    module: Any, optimizer: Callable[..., torch.optim.Optimizer], scheduler: Callable[..., Any] | None
) -> dict:
    """``configure_optimizers`` of a built-in model: the optimizer over its parameter groups, and the scheduler
    (if any) stepped every optimizer step. A scheduler that takes ``total_steps`` gets the run's step count."""
    opt = optimizer(param_groups(module))
    if scheduler is None:
        return {"optimizer": opt}
    extra = (
        {"total_steps": int(module.trainer.estimated_stepping_batches)}
        if accepts(scheduler, "total_steps")
        else {}
    )
    return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler(opt, **extra), "interval": "step"}}
