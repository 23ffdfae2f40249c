"""AdamW and its learning-rate schedule, shared by the built-in models (each passes its own ``optim`` slice)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch


def build_optimizer(module: torch.nn.Module, optim: Mapping[str, Any]) -> torch.optim.Optimizer:
    """AdamW; weight decay only on matrices (>= 2 dims), never on biases, norms or scalars."""
    params = [p for p in module.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": float(optim["weight_decay"])},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    beta1, beta2 = (float(b) for b in optim["betas"])
    return torch.optim.AdamW(groups, lr=float(optim["lr"]), betas=(beta1, beta2), eps=float(optim["eps"]))


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str, min_lr_ratio: float) -> float:
    """Multiplier of the peak learning rate at optimizer step ``step`` (0-based)."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant" or total_steps <= warmup_steps:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def configure(module: Any, optim: Mapping[str, Any]) -> dict:
    """What a LightningModule's ``configure_optimizers`` returns: AdamW plus a per-step LambdaLR."""
    optimizer = build_optimizer(module, optim)
    total = int(module.trainer.estimated_stepping_batches)
    warmup, schedule, floor = int(optim["warmup_steps"]), str(optim["schedule"]), float(optim["min_lr_ratio"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total, warmup, schedule, floor)
    )
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
