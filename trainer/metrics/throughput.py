"""Per-step speed and efficiency, logged every ``log_every_n_steps`` optimizer steps.

- step time: wall time between two optimizer steps (all micro-batches of an accumulation included);
- data wait: time between the end of one batch and the start of the next, i.e. waiting for the loader;
- samples/s and tokens/s over all ranks; MFU = model FLOP/s / (peak FLOP/s of one device x ranks);
- peak memory of rank zero (GPU: allocated by torch; CPU: the process's peak resident size).

The logged loss is the mean over the step's micro-batches and over ranks (one all-reduce, only on log steps),
so a DDP run logs the same number a single process with the same global batch would.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from trainer.metrics.csv_logger import CSVMetricsLogger
from trainer.metrics.flops import device_peak_flops
from trainer.namespace import pl
from trainer.protocols import CountsFlops, CountsTokens, RunLogger


class ThroughputMonitor(pl.Callback):
    def __init__(self, log_every_n_steps: int, accelerator: str, precision: str) -> None:
        self.log_every_n_steps = log_every_n_steps
        self.accelerator, self.precision = accelerator, precision
        self.peak_flops: float | None = None
        self.peak_source = ""
        self.history: list[dict[str, float]] = []  # every logged row, for the closing summary
        self.trained_samples = 0
        """Samples this rank trained on in this attempt (for the throughput over the whole wall time)."""
        self._reset_window()
        self._last_batch_end: float | None = None
        self._last_step: int | None = None

    def _reset_window(self) -> None:
        self._loss_sum = 0.0
        self._loss_count = 0
        self._samples = 0
        self._data_wait = 0.0
        self._window_start: float | None = None
        self._window_steps = 0

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Every rank measures at once, under the same contention as training; rank zero's figure is used.
        self.peak_flops, self.peak_source = device_peak_flops(self.accelerator, self.precision)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, CSVMetricsLogger):
                logger.resume_at(trainer.global_step)
        self._last_step = trainer.global_step
        self._reset_window()
        self._window_start = time.perf_counter()

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        now = time.perf_counter()
        if self._last_batch_end is not None:
            self._data_wait += now - self._last_batch_end

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is not None:
            # Lightning hands back the loss divided by the accumulation factor; undo it for the logged value.
            self._loss_sum += float(loss.detach()) * trainer.accumulate_grad_batches
            self._loss_count += 1
        self._samples += _batch_size(batch)
        self.trained_samples += _batch_size(batch)
        step = trainer.global_step
        for logger in trainer.loggers:
            if isinstance(logger, RunLogger):
                logger.current_step = step
        if step != self._last_step:  # an optimizer step happened in this batch
            self._last_step = step
            self._window_steps += 1
            if step % self.log_every_n_steps == 0:
                self._log(trainer, pl_module, step)
        self._last_batch_end = time.perf_counter()

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last_batch_end = None  # validation time is not data wait

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Restart the timing window so validation is not counted as training time.
        self._window_start = time.perf_counter()
        self._window_steps, self._samples, self._data_wait = 0, 0, 0.0

    def _log(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
        now = time.perf_counter()
        elapsed = now - (self._window_start or now)
        world = trainer.world_size
        stats = torch.tensor(
            [self._loss_sum, float(self._loss_count), float(self._samples)], dtype=torch.float64
        )
        if world > 1:
            stats = trainer.strategy.reduce(stats.to(pl_module.device), reduce_op="sum").cpu()
        loss_sum, loss_count, samples = stats.tolist()
        row: dict[str, float] = {"step": step, "epoch": trainer.current_epoch}
        if loss_count:
            row["train/loss"] = loss_sum / loss_count
        lrs = [group["lr"] for opt in trainer.optimizers for group in opt.param_groups]
        if lrs:
            row["train/lr"] = lrs[0]
        if elapsed > 0 and self._window_steps:
            row["train/step_time_s"] = elapsed / self._window_steps
            row["train/samples_per_sec"] = samples / elapsed
            row["train/data_wait_frac"] = min(1.0, self._data_wait / elapsed)
            if isinstance(pl_module, CountsTokens):
                row["train/tokens_per_sec"] = samples * pl_module.tokens_per_sample() / elapsed
            flops = float(pl_module.flops_per_sample()) if isinstance(pl_module, CountsFlops) else None
            if flops and self.peak_flops:
                row["train/mfu"] = samples * flops / elapsed / (self.peak_flops * world)
        row["train/mem_gb"] = _peak_memory_gb(pl_module.device)
        if trainer.is_global_zero:
            self.history.append(row)
            for logger in trainer.loggers:
                if isinstance(logger, RunLogger):
                    logger.log_trainer_metrics(row, step)
                else:
                    logger.log_metrics({k: v for k, v in row.items() if k != "step"}, step=step)
        self._reset_window()
        self._window_start = now


def _peak_memory_gb(device: torch.device) -> float:
    """Peak memory of this rank: allocated by torch on a GPU; the process's peak resident size on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / 1e9 if sys.platform == "darwin" else peak * 1024 / 1e9


def _batch_size(batch: Any) -> int:
    if isinstance(batch, torch.Tensor):
        return batch.shape[0]
    if isinstance(batch, (list, tuple)) and batch:
        return _batch_size(batch[0])
    if isinstance(batch, dict) and batch:
        return _batch_size(next(iter(batch.values())))
    return 0
