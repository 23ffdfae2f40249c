"""A multi-layer perceptron classifier as a LightningModule (the small, fast model for tabular/image data)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trainer import optim as optim_lib
from trainer.namespace import pl


class MLPModule(pl.LightningModule):
    """Cross-entropy classification; batches are (features, labels)."""

    # Keyword-only, without defaults: they live in one place, MLPConfig (trainer/config/schema.py).
    def __init__(
        self,
        *,
        in_features: int,
        hidden: Sequence[int],
        num_classes: int,
        dropout: float,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        scheduler: Callable[..., Any] | None = None,
    ) -> None:
        super().__init__()
        hidden = [int(h) for h in hidden]
        self.save_hyperparameters({"in_features": in_features, "hidden": hidden, "num_classes": num_classes,
                                   "dropout": dropout})  # fmt: skip
        self.optimizer, self.scheduler = optimizer, scheduler
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.GELU(), nn.Dropout(dropout)]
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("loss", loss, prog_bar=True, logger=False)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self.net(x)
        self.log("val/loss", F.cross_entropy(logits, y), prog_bar=True, sync_dist=True)
        self.log("val/acc", (logits.argmax(-1) == y).float().mean(), prog_bar=True, sync_dist=True)

    def configure_optimizers(self) -> dict:
        if self.optimizer is None:
            raise ValueError("MLPModule needs an optimizer to train (trainer passes the `optim` config)")
        return optim_lib.configure(self, self.optimizer, self.scheduler)

    def flops_per_sample(self) -> float:
        """6 FLOPs per weight per sample (forward + backward multiply-adds); biases and activations ignored."""
        return 6.0 * sum(m.weight.numel() for m in self.net if isinstance(m, nn.Linear))
