"""Byte-level language modelling over text files: each byte is a token, samples are consecutive windows."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from trainer.config.schema import resolve_text_files
from trainer.data.loading import SeededLoaders
from trainer.namespace import pl


class TokenWindows(Dataset):
    """Non-overlapping windows of ``seq_len + 1`` tokens; sample i is (tokens[iT : iT+T], tokens[iT+1 : iT+T+1])."""

    def __init__(self, tokens: np.ndarray, seq_len: int) -> None:
        self.tokens, self.seq_len = tokens, seq_len

    def __len__(self) -> int:
        return max(0, (len(self.tokens) - 1) // self.seq_len)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = i * self.seq_len
        chunk = torch.from_numpy(self.tokens[start : start + self.seq_len + 1].astype(np.int64))
        return chunk[:-1], chunk[1:]


def read_corpus(path: str | None, pattern: str, max_bytes: int | None) -> np.ndarray:
    """All files in a fixed order, joined by newlines, as uint8 tokens."""
    parts, total = [], 0
    for name in resolve_text_files(path, pattern):
        with open(name, "rb") as f:
            data = f.read()
        parts.append(data)
        total += len(data) + 1
        if max_bytes is not None and total >= max_bytes:
            break
    blob = b"\n".join(parts)
    if max_bytes is not None:
        blob = blob[:max_bytes]
    return np.frombuffer(blob, dtype=np.uint8)


class TextDataModule(SeededLoaders, pl.LightningDataModule):
    # Keyword-only, without defaults: they live in one place, TextDataConfig (trainer/config/schema.py).
    def __init__(
        self,
        *,
        path: str | None,
        pattern: str,
        seq_len: int,
        val_fraction: float,
        max_bytes: int | None,
        batch_size: int,
        num_workers: int,
        seed: int,
        shuffle: bool,
    ) -> None:
        super().__init__()
        self.path, self.pattern, self.seq_len = path, pattern, seq_len
        self.val_fraction, self.max_bytes = val_fraction, max_bytes
        self.batch_size, self.num_workers, self.seed, self.shuffle = batch_size, num_workers, seed, shuffle
        self.train_set: TokenWindows | None = None
        self.val_set: TokenWindows | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        tokens = read_corpus(self.path, self.pattern, self.max_bytes)
        split = int(len(tokens) * (1.0 - self.val_fraction))
        self.train_set = TokenWindows(tokens[:split], self.seq_len)
        self.val_set = TokenWindows(tokens[split:], self.seq_len)
