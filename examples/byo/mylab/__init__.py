"""A user's own model and data, trained by `trainer` with no edit to it (see README: Bring your own).

Written against `lightning.pytorch`; `import pytorch_lightning as pl` works the same (trainer uses whichever
namespace your classes come from, as long as all of them come from the same one).
"""

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset


class WaveRegressor(pl.LightningModule):
    """Predicts sin(3x) from x with a small MLP."""

    def __init__(self, hidden: int = 32, optimizer=None) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer"])
        # `optimizer`: a partial (the run's `optim` config) that takes the parameters; trainer passes it
        # because __init__ has an argument of that name.
        self.optimizer = optimizer
        self.net = torch.nn.Sequential(
            torch.nn.Linear(1, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 1)
        )

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self.net(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/loss", F.mse_loss(self.net(x), y), sync_dist=True)
        self.log("val/mae", (self.net(x) - y).abs().mean(), sync_dist=True)

    def configure_optimizers(self):
        return self.optimizer(self.parameters())


class Waves(pl.LightningDataModule):
    def __init__(self, n: int = 2048, batch_size: int = 64, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        x = torch.rand(n, 1, generator=g) * 4 - 2
        self.data = TensorDataset(x, torch.sin(3 * x))
        self.batch_size = batch_size

    def train_dataloader(self):
        return DataLoader(self.data, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self):
        return DataLoader(self.data, batch_size=self.batch_size)
