"""The seams between this project's parts, written down: what one part may ask of another.

Checked with ``isinstance`` (``runtime_checkable``) where a part may or may not provide them, instead of
probing for attributes by name. Imports nothing heavy.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class RunLogger(Protocol):
    """A logger of this project's (metrics.csv, W&B): rows keyed by optimizer step, and the trainer's own
    columns kept apart from what the user's module logs."""

    current_step: int | None
    """The optimizer step, set by the throughput monitor (Lightning's own counter lags for validation)."""

    def log_trainer_metrics(self, row: Mapping[str, float], step: int) -> None:
        """The trainer's own figures (loss, throughput, checkpoint cost) for ``step``."""

    def flush_all(self) -> None:
        """Put every pending row on disk (before a checkpoint: a resumed run keeps exactly those)."""


@runtime_checkable
class WriteStats(Protocol):
    """What wrote the newest checkpoint (the checkpoint IO plugin, or the FSDP strategy for sharded ones)."""

    last_write: dict[str, float]
    """``bytes`` and ``seconds`` of the newest write."""


@runtime_checkable
class AsyncWriter(Protocol):
    """A checkpoint writer that may write in the background (``AtomicCheckpointIO``)."""

    async_save: bool
    last_write: dict[str, float]

    def wait(self) -> None:
        """Return once the write in flight (if any) is published; raise its error."""


@runtime_checkable
class CopiesLater(Protocol):
    """A background writer that copies the weights and optimizer state after the save returns, while the
    next step's forward and backward run (``AtomicCheckpointIO``)."""

    dropped_step: int | None
    """The step of the newest save not published because its deferred copy changed before it was made."""

    def settle(self) -> float:
        """Block until the copy is made and checked; call it before the optimizer step. Seconds waited."""


@runtime_checkable
class ShardingReport(Protocol):
    """A strategy that shards the model (FSDP): its mesh and how many parameters each rank holds."""

    report: dict[str, Any]

    def extra_process_groups(self) -> list[Any]:
        """Process groups besides the default one that its collectives run on."""


@runtime_checkable
class StopsRun(Protocol):
    """A callback that may end a run early on purpose (Optuna pruning): the run is then not ``finished``."""

    pruned: bool


@runtime_checkable
class ShardingUnits(Protocol):
    """A model that names its own FSDP units (else every entry of its ``nn.ModuleList``s is one)."""

    def fsdp_units(self) -> list[Any]: ...


@runtime_checkable
class CountsFlops(Protocol):
    """A model whose training FLOPs per sample are known: turns on MFU."""

    def flops_per_sample(self) -> float: ...


@runtime_checkable
class CountsTokens(Protocol):
    """A sequence model: turns on tokens/s."""

    def tokens_per_sample(self) -> int: ...
