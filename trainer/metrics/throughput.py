"""Per-step speed and efficiency, logged every ``log_every_n_steps`` optimizer steps.

- step time: wall time between two optimizer steps (all micro-batches of an accumulation included);
- data wait: time between the end of one batch and the start of the next, i.e. waiting for the loader;
- samples/s and tokens/s over all ranks; MFU = model FLOP/s / (peak FLOP/s of one device x ranks);
- memory of rank zero (see ``_memory_gb``);
- device telemetry (``sys/*``, ``gpu<i>/*``, energy) and the straggler check: ``trainer/metrics/telemetry.py``.

On log steps, and only there, one all_gather brings every rank's figures together: loss and sample sums (the
logged loss is the mean over the step's micro-batches and over ranks, so a DDP run logs the same number a
single process with the same global batch would), each rank's own time per step, and its GPU's telemetry.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import torch

from trainer.metrics.csv_logger import CSVMetricsLogger
from trainer.metrics.flops import device_peak_flops
from trainer.metrics.telemetry import (
    GPU_FIELDS,
    OwnTime,
    Sampler,
    find_straggler,
    gpu_columns,
    gpu_vector,
    slowdown_text,
)
from trainer.namespace import pl
from trainer.protocols import CountsFlops, CountsTokens, RunLogger

log = logging.getLogger("trainer")


class ThroughputMonitor(pl.Callback):
    def __init__(
        self,
        log_every_n_steps: int,
        accelerator: str,
        precision: str,
        telemetry_interval_s: float | None = None,
    ) -> None:
        self.log_every_n_steps = log_every_n_steps
        self.telemetry_interval_s = telemetry_interval_s
        self.sampler: Sampler | None = None
        self.own_time: OwnTime | None = None  # only with several ranks, for the straggler check
        self.energy_wh: float | None = None
        """Energy of all GPUs from the start of training to the newest logged row (None: not reported)."""
        self.energy_tokens: float | None = None
        """Tokens trained by all ranks over the same span (None: the model does not count tokens)."""
        self._straggler: int | None = None  # the rank last named
        self._suspect: int | None = None  # the slow rank of the previous window
        self._slowdowns: dict[int, int] = {}  # rank -> the slowdown reasons already named
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
        self._loss_sum: Any = 0.0  # a tensor on the model's device once a loss arrives
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
        if trainer.world_size > 1:
            self.own_time = OwnTime(pl_module.device)
        on_gpu = pl_module.device.type == "cuda"
        if self.telemetry_interval_s and (on_gpu or trainer.is_global_zero):
            self.sampler = Sampler(
                self.telemetry_interval_s, pl_module.device.index if on_gpu else None, trainer.is_global_zero
            )
            self.sampler.start()
        self._reset_window()
        self._window_start = time.perf_counter()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.sampler is not None:
            self.sampler.stop()
            self.sampler = None

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        now = time.perf_counter()
        if self._last_batch_end is not None:
            self._data_wait += now - self._last_batch_end
            if self.own_time is not None:
                self.own_time.waited(now - self._last_batch_end)
        if self.own_time is not None:
            self.own_time.forward_start()

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Any) -> None:
        if self.own_time is not None:
            self.own_time.forward_end()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is not None:
            # Lightning hands back the loss divided by the accumulation factor; undo it for the logged value.
            # Summed on the device and read at logging steps only: float() here would make the host wait
            # for the GPU at every batch.
            self._loss_sum = self._loss_sum + loss.detach().float() * trainer.accumulate_grad_batches
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
        self._last_batch_end = time.perf_counter()  # BatchEndClock sets it again after the other callbacks

    def end_clock(self) -> pl.Callback:
        """The callback to register last: it restarts the data-wait clock after every other callback's work at
        a batch's end (a checkpoint save, a user's callback), so that work counts in the step, not as data
        wait."""
        return BatchEndClock(self)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last_batch_end = None  # validation time is not data wait

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Restart the timing window so validation is not counted as training time.
        self._window_start = time.perf_counter()
        self._window_steps, self._samples, self._data_wait = 0, 0, 0.0
        if self.own_time is not None:
            self.own_time.take()

    def _log(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
        now = time.perf_counter()
        elapsed = now - (self._window_start or now)
        world = trainer.world_size
        own = math.nan  # this rank's own time per step (telemetry.OwnTime)
        if self.own_time is not None and self._window_steps:
            own = self.own_time.take() / self._window_steps
        host, gpu = self.sampler.latest() if self.sampler is not None else ({}, {})
        mine = [float(self._loss_sum), float(self._loss_count), float(self._samples), own]
        if self.telemetry_interval_s and pl_module.device.type == "cuda":  # the same layout on every rank
            mine += gpu_vector(gpu)
        stats = torch.tensor([mine], dtype=torch.float64)
        if world > 1:
            stats = _gather(stats[0].to(pl_module.device), world)
        loss_sum, loss_count, samples = stats[:, :3].sum(dim=0).tolist()
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
        row.update(_memory_gb(pl_module.device))
        if trainer.is_global_zero:
            row.update(host)
            self._telemetry(row, stats[:, 4:].tolist(), pl_module, world)
            if world > 1 and "train/step_time_s" in row:
                self._name_straggler(stats[:, 3].tolist(), row["train/step_time_s"])
            self.history.append(row)
            for logger in trainer.loggers:
                if isinstance(logger, RunLogger):
                    logger.log_trainer_metrics(row, step)
                else:
                    logger.log_metrics({k: v for k, v in row.items() if k != "step"}, step=step)
        self._reset_window()
        self._window_start = now

    def _telemetry(
        self, row: dict, per_rank: list[list[float]], pl_module: pl.LightningModule, world: int
    ) -> None:
        """Every rank's GPU figures into the row; the energy so far; hardware slowdowns named once."""
        if not per_rank or not per_rank[0]:
            return
        row.update(gpu_columns(per_rank))
        energies = [v[GPU_FIELDS.index("energy_wh")] for v in per_rank]
        if not all(math.isnan(e) for e in energies):
            self.energy_wh = sum(e for e in energies if not math.isnan(e))
            if isinstance(pl_module, CountsTokens):
                self.energy_tokens = float(self.trained_samples * world * pl_module.tokens_per_sample())
        for rank, values in enumerate(per_rank):
            mask = values[GPU_FIELDS.index("throttle")]
            new = (0 if math.isnan(mask) else int(mask)) & ~self._slowdowns.get(rank, 0)
            if slowdown_text(new):
                self._slowdowns[rank] = self._slowdowns.get(rank, 0) | new
                log.warning("gpu%d (rank %d) is slowing its clocks: %s", rank, rank, slowdown_text(new))

    def _name_straggler(self, own_s: list[float], step_s: float) -> None:
        """Say which rank holds the others up: once it has done so in two logged windows in a row (one slow
        window is a hiccup), and not again while it stays the slowest."""
        found = find_straggler(own_s, step_s)
        rank = found[0] if found is not None else None
        if found is not None and rank == self._suspect and rank != self._straggler:
            _, mine, median = found
            log.warning(
                "straggler: rank %d spends %.1f ms per step on its own work (data wait + forward), the median "
                "rank %.1f ms; every rank waits for it (steps of %.1f ms)",
                rank, mine * 1e3, median * 1e3, step_s * 1e3,
            )  # fmt: skip
            self._straggler = rank
        if rank is None:
            self._straggler = None
        self._suspect = rank

    def energy_summary(self) -> dict[str, float | None]:
        """For the run summary: Wh of all GPUs, and per million tokens trained over the same span."""
        per_million = None
        if self.energy_wh is not None and self.energy_tokens:
            per_million = self.energy_wh / (self.energy_tokens / 1e6)
        return {"energy_wh": self.energy_wh, "energy_wh_per_million_tokens": per_million}


def _gather(mine: torch.Tensor, world: int) -> torch.Tensor:
    """Every rank's ``mine``, one row per rank (torch's own all_gather: Lightning's goes through a deprecated
    autograd variant that warns on every run)."""
    rows = [torch.empty_like(mine) for _ in range(world)]
    torch.distributed.all_gather(rows, mine)
    return torch.stack(rows).cpu()


def _memory_gb(device: torch.device) -> dict[str, float]:
    """This rank's memory. GPU: the peaks of this logging window (reset after each row, so a compile spike shows
    in its own row only), allocated by tensors (``train/mem_gb``) and reserved by torch's caching allocator
    (``train/mem_reserved_gb``); NVML's ``gpu<i>/mem_used_gb`` beside them also counts the CUDA context,
    NCCL's buffers and other processes. CPU: ``train/mem_gb`` is the process's peak resident size since it
    started (the operating system keeps only the peak of the whole process, which cannot be reset)."""
    if device.type == "cuda":
        out = {
            "train/mem_gb": torch.cuda.max_memory_allocated(device) / 1e9,
            "train/mem_reserved_gb": torch.cuda.max_memory_reserved(device) / 1e9,
        }
        torch.cuda.reset_peak_memory_stats(device)
        return out
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return {"train/mem_gb": peak / 1e9 if sys.platform == "darwin" else peak * 1024 / 1e9}


def _batch_size(batch: Any) -> int:
    if isinstance(batch, torch.Tensor):
        return batch.shape[0]
    if isinstance(batch, (list, tuple)) and batch:
        return _batch_size(batch[0])
    if isinstance(batch, dict) and batch:
        return _batch_size(next(iter(batch.values())))
    return 0


class BatchEndClock(pl.Callback):
    """See ThroughputMonitor.end_clock."""

    def __init__(self, monitor: ThroughputMonitor) -> None:
        self.monitor = monitor

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.monitor._last_batch_end = time.perf_counter()
