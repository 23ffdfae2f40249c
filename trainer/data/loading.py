"""The DataLoader every built-in data module uses: a seeded, rank-aware order that resumes mid-epoch.

The training order is a pure function of (seed, epoch): ``DistributedSampler`` draws the permutation from a
generator seeded with ``seed + epoch`` and gives rank r the samples r, r + world, r + 2 * world, ... So one
process with batch 2B and two processes with batch B see the same samples at every step, and Lightning does
not replace the sampler (it only injects its own where the sampler is not a ``DistributedSampler``).

Resuming: the loader's state is (epoch, samples already trained in that epoch, number of ranks). Lightning stores it in the
checkpoint and hands it back before the epoch restarts; the sampler then skips exactly those samples, so
the rest of the epoch is the same as in an uninterrupted run. The trained-batch count comes from Lightning's
progress counter, not from the loader: Lightning fetches one batch ahead, so the loader's own count would be
one too many.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

log = logging.getLogger("trainer")


class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` that can start an epoch part-way through, without changing its length.

    It counts its own epochs (one per complete pass) instead of taking Lightning's ``set_epoch``: Lightning's
    epoch counter comes back one too high after a restart from a checkpoint taken at the end of an epoch,
    and the data order must not depend on that.
    """

    def __init__(self, dataset: Dataset, **kwargs: Any) -> None:
        super().__init__(dataset, **kwargs)
        self.skip = 0  # samples of this rank to skip, once, in epoch ``self.epoch``
        self.finished = False  # the last pass reached its end: the next pass is the next epoch
        self.consumed_per_epoch = self.num_samples  # the loader lowers it to whole batches (drop_last)

    def set_epoch(self, epoch: int) -> None:
        pass  # see the class docstring

    def __iter__(self) -> Iterator[int]:
        if self.finished:
            self.epoch += 1
            self.finished = False
        indices = list(super().__iter__())
        skip, self.skip = self.skip, 0
        return self._pass(indices, skip)

    def _pass(self, indices: list[int], start: int) -> Iterator[int]:
        # The loader stops asking after its last whole batch, so the end of an epoch is the sample that
        # completes that batch, not the exhaustion of this iterator.
        for position in range(start, len(indices)):
            if position + 1 >= self.consumed_per_epoch:
                self.finished = True
            yield indices[position]


class ResumableDataLoader(DataLoader):
    """A DataLoader with ``state_dict``/``load_state_dict``, which makes Lightning checkpoint its position."""

    def __init__(self, *args: Any, trainer: Any = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._trainer = trainer
        self._restored = (-1, 0, 0)  # (epoch, samples, batches) of the position restored from a checkpoint
        if self.drop_last and self.batch_size:
            self.sampler.consumed_per_epoch = len(self) * self.batch_size

    def state_dict(self) -> dict[str, int]:
        trainer = self._trainer
        done = 0 if trainer is None else int(trainer.fit_loop.epoch_loop.batch_progress.current.processed)
        # Samples, not batches: a run resumed with another batch size keeps counting correctly. Lightning's
        # batch counter carries on from the restored one, so batches before the restore are counted at the
        # size they had.
        samples = done * int(self.batch_size or 1)
        epoch, restored_samples, restored_batches = self._restored
        if epoch == self.sampler.epoch and done >= restored_batches:
            samples = restored_samples + (done - restored_batches) * int(self.batch_size or 1)
        return {"epoch": int(self.sampler.epoch), "samples_done": samples, "batches_done": done,
                "world_size": int(self.sampler.num_replicas)}  # fmt: skip

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.sampler.epoch = int(state["epoch"])
        skip = int(state.get("samples_done", int(state.get("batches_done", 0)) * int(self.batch_size or 1)))
        # Samples per rank. Saved by another number of ranks (e.g. a sharded checkpoint resumed on fewer):
        # rank r takes every world-th sample of one order, so the position in that order is what carries over.
        saved_world, world = (
            int(state.get("world_size", self.sampler.num_replicas)),
            self.sampler.num_replicas,
        )
        if saved_world != world:
            position = skip * saved_world
            if position % world:
                log.warning("data: %d samples done by %d ranks do not split over %d; %d left out of this epoch",
                            position, saved_world, world, position % world)  # fmt: skip
            skip = position // world
        self._restored = (self.sampler.epoch, skip, int(state.get("batches_done", 0)))
        if skip >= self.sampler.consumed_per_epoch:  # that epoch was complete: the next pass starts the next
            self.sampler.finished = True
            return
        self.sampler.skip = skip


class SeededLoaders:
    """``train_dataloader``/``val_dataloader`` for a LightningDataModule that has ``train_set``, ``val_set``,
    ``batch_size``, ``num_workers``, ``seed`` and ``shuffle``: what every built-in data module shares."""

    def train_dataloader(self) -> DataLoader:
        return make_loader(self.train_set, trainer=self.trainer, batch_size=self.batch_size,
                           num_workers=self.num_workers, seed=self.seed, shuffle=self.shuffle, train=True)  # fmt: skip

    def val_dataloader(self) -> DataLoader:
        return make_loader(self.val_set, trainer=self.trainer, batch_size=self.batch_size,
                           num_workers=self.num_workers, seed=self.seed, shuffle=False, train=False)  # fmt: skip


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
    sampler = ResumableSampler(
        dataset, num_replicas=world, rank=rank, shuffle=shuffle and train, seed=seed, drop_last=train
    )
    return ResumableDataLoader(
        dataset,
        trainer=trainer if train else None,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        drop_last=train,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0,
        # The loader draws its workers' base seed from this generator, not from torch's global one: the
        # model's random stream (dropout) then does not depend on how many loaders were created, which
        # differs between an uninterrupted run and a resumed one.
        generator=torch.Generator().manual_seed(seed),
    )


# ---------------------------------------------------------------------------------------------- user loaders


def resumable_copy(loader: Any, trainer: Any, seed: int) -> tuple[Any, str | None]:
    """A user's training DataLoader with this project's sampler in place of its own, so that it resumes
    mid-epoch exactly like the built-in data: (the loader to use, None), or (the loader unchanged, why not).

    Taken over: a plain ``DataLoader`` over a map-style dataset with a random or sequential sampler (what
    ``shuffle=True``/``False`` makes); its batch size, workers, collate function and the rest are kept. The
    shuffled order then comes from ``seed`` and the epoch (the same order on any number of ranks).
    """
    from torch.utils.data import BatchSampler, IterableDataset, RandomSampler, SequentialSampler

    if isinstance(loader, ResumableDataLoader):
        return loader, None
    if not isinstance(loader, DataLoader):
        return loader, f"the training data is a {type(loader).__name__}, not a DataLoader"
    if isinstance(loader.dataset, IterableDataset):
        return loader, "the training data is an IterableDataset (it has no positions to resume from)"
    if type(loader) is not DataLoader:
        return (
            loader,
            f"the training DataLoader is a {type(loader).__name__} (a subclass, which is rebuilt only as it is)",
        )
    sampler = loader.sampler
    plain = type(sampler) is SequentialSampler or (
        type(sampler) is RandomSampler
        and not sampler.replacement
        and sampler.num_samples == len(loader.dataset)
    )
    if not plain or type(loader.batch_sampler) is not BatchSampler:
        return loader, f"the training DataLoader has its own sampler ({type(sampler).__name__})"
    rank, world = rank_and_world(trainer)
    ours = ResumableSampler(loader.dataset, num_replicas=world, rank=rank,
                            shuffle=isinstance(sampler, RandomSampler), seed=seed, drop_last=loader.drop_last)  # fmt: skip
    workers = loader.num_workers
    copy = ResumableDataLoader(
        loader.dataset,
        trainer=trainer,
        batch_size=loader.batch_size,
        sampler=ours,
        num_workers=workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
        drop_last=loader.drop_last,
        timeout=loader.timeout,
        worker_init_fn=loader.worker_init_fn,
        multiprocessing_context=loader.multiprocessing_context,
        generator=torch.Generator().manual_seed(seed),  # workers' base seed; see make_loader
        prefetch_factor=loader.prefetch_factor if workers else None,
        persistent_workers=loader.persistent_workers,
        pin_memory_device=loader.pin_memory_device,
    )
    return copy, None


def take_over_train_loader(datamodule: Any, seed: int, report: Any) -> None:
    """Give a user's DataModule's training loader this project's resumable sampler (see ``resumable_copy``),
    each time Lightning asks for it. ``report(reason)`` hears the outcome (None: exact resume)."""
    original = datamodule.train_dataloader

    def train_dataloader() -> Any:
        loader, reason = resumable_copy(original(), datamodule.trainer, seed)
        report(reason)
        return loader

    datamodule.train_dataloader = train_dataloader
