"""A callback that counts what a real run holds per rank, to hold `trainer plan`'s figures to it.

Each rank writes ``<out>/rank-N.json`` after ``at_step`` optimizer steps: the bytes of its own parameters,
gradients and optimizer state tensors (an FSDP rank's local shards), and how far the process's resident memory
rose above what it was when training started (peak RSS, reset then through /proc/self/clear_refs), and on a GPU
the allocator's peak (``max_memory_allocated``, reset then).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import lightning.pytorch as pl
import torch


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _bytes(tensors) -> int:
    return sum(_local(t).numel() * _local(t).element_size() for t in tensors)


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


class MemoryCount(pl.Callback):
    def __init__(self, out: str, at_step: int = 3) -> None:
        self.out, self.at_step = Path(out), at_step
        self.grads = 0

    def on_train_start(self, trainer, pl_module) -> None:
        Path("/proc/self/clear_refs").write_text("5")  # the peak RSS starts again from the current RSS
        self.base = _status("VmRSS")
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.grads = _bytes(p.grad for p in pl_module.parameters() if p.grad is not None)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step != self.at_step:
            return
        optimizer = trainer.optimizers[0]
        state = [t for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
        self.out.mkdir(parents=True, exist_ok=True)
        figures = {
            "params_bytes": _bytes(pl_module.parameters()),
            "grads_bytes": self.grads,
            "optimizer_bytes": _bytes(state),
            "rss_rise_bytes": _status("VmHWM") - self.base,
            # a GPU run: the allocator's peak over the steps (the parameters included: they were there)
            "cuda_peak_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
        }
        (self.out / f"rank-{os.environ.get('RANK', '0')}.json").write_text(json.dumps(figures))
