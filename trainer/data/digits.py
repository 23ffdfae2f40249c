"""scikit-learn's 8x8 handwritten digits: 1797 real images shipped inside the package (no download)."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import TensorDataset

from trainer.data.loading import SeededLoaders
from trainer.namespace import pl


class DigitsDataModule(SeededLoaders, pl.LightningDataModule):
    # Keyword-only, without defaults: they live in one place, DigitsDataConfig (trainer/config/schema.py).
    def __init__(
        self,
        *,
        val_fraction: float,
        batch_size: int,
        num_workers: int,
        seed: int,
        shuffle: bool,
    ) -> None:
        super().__init__()
        self.val_fraction, self.batch_size, self.num_workers = val_fraction, batch_size, num_workers
        self.seed, self.shuffle = seed, shuffle
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = torch.tensor(digits.data / 16.0, dtype=torch.float32)  # pixel values are 0..16
        y = torch.tensor(digits.target, dtype=torch.int64)
        order = np.random.default_rng(self.seed).permutation(len(y))
        n_val = int(len(y) * self.val_fraction)
        val, train = torch.from_numpy(order[:n_val]), torch.from_numpy(order[n_val:])
        self.train_set = TensorDataset(x[train], y[train])
        self.val_set = TensorDataset(x[val], y[val])
