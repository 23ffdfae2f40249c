"""The DataLoader every built-in data module uses: a seeded, rank-aware sampler and no dropped samples
between ranks.

The training order is a pure function of (seed, epoch): ``DistributedSampler`` draws the permutation from a
generator seeded with ``seed + epoch`` and gives rank r the samples r, r + world, r + 2 * world, ... So one
process with batch 2B and two processes with batch B see the same samples at every step, and Lightning does
not replace the sampler (it only injects its own where the sampler is not a ``DistributedSampler``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler


def rank_and_world(trainer: Any) -> tuple[int, int]:
    if trainer is None:
        return 0, 1
    return int(trainer.global_rank), int(trainer.world_size)


def make_loader(
    dataset: Dataset,
    *,
    trainer: Any,
    batch_size: int,
    num_workers: int,
    seed: int,
    shuffle: bool,
    train: bool,
) -> DataLoader:
    rank, world = rank_and_world(trainer)
    sampler = DistributedSampler(
        dataset, num_replicas=world, rank=rank, shuffle=shuffle and train, seed=seed, drop_last=train
    )
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        drop_last=train,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0,
    )
