"""Random token sequences generated from (seed, index): no I/O, so benchmarks measure the trainer."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from trainer.data.loading import SeededLoaders
from trainer.namespace import pl


class RandomTokens(Dataset):
    def __init__(self, num_samples: int, seq_len: int, vocab_size: int, seed: int) -> None:
        self.num_samples, self.seq_len, self.vocab_size, self.seed = num_samples, seq_len, vocab_size, seed

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        chunk = torch.randint(self.vocab_size, (self.seq_len + 1,), generator=g)
        return chunk[:-1], chunk[1:]


class SyntheticDataModule(SeededLoaders, pl.LightningDataModule):
    # Keyword-only, without defaults: they live in one place, SyntheticDataConfig (trainer/config/schema.py).
    def __init__(
        self,
        *,
        num_samples: int,
        seq_len: int,
        vocab_size: int,
        batch_size: int,
        num_workers: int,
        seed: int,
        shuffle: bool,
    ) -> None:
        super().__init__()
        self.batch_size, self.num_workers, self.seed, self.shuffle = batch_size, num_workers, seed, shuffle
        self.train_set = RandomTokens(num_samples, seq_len, vocab_size, seed)
        # A different seed stream for validation, so it never repeats training samples.
        self.val_set = RandomTokens(max(1, num_samples // 16), seq_len, vocab_size, seed + 1)
