"""When to save, what a checkpoint holds beyond Lightning's own state, and how a run stops cleanly.

- Saves every ``every_n_steps`` optimizer steps and/or ``every_n_minutes``, at the end, on a preemption
  signal and when a non-finite loss stops the run; always at an optimizer-step boundary, so a resumed run
  has no half-accumulated gradient. Keeps the newest K and the best K by a monitored metric.
- Adds every rank's random state (python, numpy, torch, its CUDA device's) to the checkpoint and puts it
  back before the first resumed step: with the data position (see trainer/data/loading.py) and Lightning's
  model, optimizer, scheduler and loop state, a resumed run computes exactly what the uninterrupted one
  would have.
- Signals (SIGUSR1, SIGTERM by default) only set a flag. At the next step boundary all ranks agree through
  one small all-reduce, save one checkpoint together and stop; the process then exits with ``exits.PREEMPTED``.
- A non-finite loss or gradient is never applied to the weights: the step is skipped, and (policy ``stop``)
  the run saves that last good state and stops with ``exits.NONFINITE``.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import signal
import time
from contextlib import suppress
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainer import early_signals
from trainer.checkpoint.manifest import (
    read_manifest,
    remove_checkpoint,
    step_checkpoint_name,
    step_checkpoints,
    write_manifest,
)
from trainer.namespace import pl
from trainer.protocols import AsyncWriter, CopiesLater, RunLogger, ShardingReport, WriteStats
from trainer.rundir import LAST_CHECKPOINT

log = logging.getLogger("trainer")


class StopRun(Exception):
    """Raised at a step boundary, after the checkpoint is written, to end training at once: stopping through
    ``trainer.should_stop`` would first run a validation, which a preempted job has no time for."""


_EARLY_SIGNAL: dict[str, int] = {}


def install_early_handlers(signals: list[str]) -> None:
    """Catch the preemption signals from the very start of a training process (data loading, start-up), not
    only once training runs: one arriving then is acted on at the first step boundary."""

    def remember(signum: int, frame: Any) -> None:
        _EARLY_SIGNAL["signum"] = signum

    for name in signals:
        signal.signal(getattr(signal, name), remember)
        signal.siginterrupt(getattr(signal, name), False)
    early_signals.redeliver()  # one that came while the process was importing


def capture_rng() -> dict[str, Any]:
    """This process's random streams, in types ``torch.load(weights_only=True)`` accepts. Of CUDA's, only
    the current device's: the one this rank computes on (all visible devices' would tie the checkpoint to
    their number, and a resume on fewer would fail)."""
    py = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state(torch.cuda.current_device())
    return state


def restore_rng(state: dict[str, Any]) -> None:
    version, keys, gauss = state["python"]
    random.setstate((version, tuple(keys), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        device = torch.cuda.current_device()
        cuda = state["cuda"]
        if isinstance(cuda, list):  # older checkpoints: every visible device's, indexed by device
            # A single entry was the saving process's only device, so the one it computed on; a device the
            # saving process did not have has no saved stream, and keeps its own.
            by_device = dict(enumerate(cuda)) if len(cuda) != 1 else {device: cuda[0]}
            cuda = by_device.get(device)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, device)


def _grads_bad(params: list[torch.Tensor]) -> torch.Tensor:
    """1.0 on the device where a gradient (or, under FSDP, this rank's shard of one) is not finite, else 0.0.
    Left on the device: the caller reads it with its other per-step flags in one transfer."""
    grads = [p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad for p in params]
    return (~torch.isfinite(torch.stack(torch._foreach_norm(grads))).all()).float()


def steady_storages(trainer: pl.Trainer) -> set[int]:
    """The host storages that only an optimizer step changes: the model's parameters and the optimizers'
    state (a save copies them while the next step's forward and backward run; see io.DeferredCopies)."""
    tensors = list(trainer.lightning_module.parameters())
    for optimizer in trainer.optimizers:
        for state in optimizer.state.values():
            tensors += [v for v in state.values() if isinstance(v, torch.Tensor)]
    plain = (torch.Tensor, torch.nn.Parameter)  # not a DTensor or other subclass: those are copied at once
    return {t.untyped_storage().data_ptr() for t in tensors if type(t) in plain and t.is_cpu}


class Checkpointer(pl.Callback):
    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        every_n_steps: int,
        every_n_minutes: float | None,
        keep_last_k: int,
        keep_best_k: int,
        monitor: str,
        mode: str,
        signals: list[str],
        on_nonfinite: str,
        step_timeout_s: float | None,
        manifest_extra: dict | None = None,
    ) -> None:
        self.directory = Path(directory)
        self.every_n_steps, self.every_n_minutes = every_n_steps, every_n_minutes
        self.keep_last_k, self.keep_best_k, self.monitor, self.mode = keep_last_k, keep_best_k, monitor, mode
        self.signals, self.on_nonfinite, self.step_timeout_s = signals, on_nonfinite, step_timeout_s
        self.manifest_extra = dict(manifest_extra or {})
        self.received_signal: int | None = None
        self.preempted = False
        self.stopped_nonfinite: str | None = None
        self.saves: list[dict[str, float]] = []  # one entry per checkpoint written (rank zero)
        self._original_handlers: dict[int, Any] = {}
        self._rng_to_restore: dict | None = None
        self._last_step: int | None = None
        self._last_saved_step: int | None = None
        self._previous_saved_step: int | None = None
        self._last_save_time = time.monotonic()
        self._nonfinite_pending: str | None = None
        # The step's loss check stays on the device until the one read per step (_read_step_flags).
        self._loss_bad: torch.Tensor | None = None
        self._bad_loss: torch.Tensor | None = None
        self._agreed: tuple[int, list[bool]] | None = None  # (step, [preempt, time_due, nonfinite])
        self._timeout_tightened = False
        self._at_step_boundary = True
        self._writer: AsyncWriter | None = None

    @property
    def last_saved_step(self) -> int | None:
        """The step of the newest checkpoint this run saved (or resumed from)."""
        return self._last_saved_step

    # ------------------------------------------------------------------ state in the checkpoint

    def state_dict(self) -> dict[str, Any]:
        state = capture_rng()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            states: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(states, state)
        else:
            states = [state]
        return {"rng": states, "world_size": len(states)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        states = state_dict.get("rng") or []
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        if rank < len(states):
            self._rng_to_restore = states[rank]
        if states and len(states) != (
            torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        ):
            log.warning(
                "checkpoint: saved by %d ranks, resumed on a different number; random streams differ",
                len(states),
            )

    # ------------------------------------------------------------------ hooks

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Sharded checkpoints are written by the strategy itself (FSDP2Strategy), others by the IO plugin.
        writers = (trainer.strategy, trainer.strategy.checkpoint_io)
        self._writer = next((w for w in writers if isinstance(w, AsyncWriter)), None)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Restore here, after Lightning's restore and loader set-up, right before the first resumed step.
        if self._rng_to_restore is not None:
            restore_rng(self._rng_to_restore)
            self._rng_to_restore = None
        self._last_step = trainer.global_step
        self._last_save_time = time.monotonic()
        if trainer.global_step and (self.directory / step_checkpoint_name(trainer.global_step)).exists():
            # Resumed from this run's own checkpoint of this step: it is saved already (a run resumed at its
            # last step must not write that step again over the checkpoint it was restored from).
            self._last_saved_step = trainer.global_step
        if "signum" in _EARLY_SIGNAL:
            self.received_signal = _EARLY_SIGNAL.pop("signum")
        # Installed after Lightning's own handlers, so these are the ones that act (Lightning's SLURM
        # auto-requeue is turned off in fit.py: the two must never both act).
        for name in self.signals:
            signum = getattr(signal, name)
            self._original_handlers[signum] = signal.signal(signum, self._on_signal)
            # Restart system calls the signal interrupts instead of failing them with EINTR: the signal may
            # land while a collective is blocked in the network library, which must not see an error.
            signal.siginterrupt(signum, False)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.restore_signal_handlers()
        self.wait()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self.restore_signal_handlers()
        with suppress(Exception):  # the run's own error is the one to report; the save finishes if it can
            self.wait()

    def restore_signal_handlers(self) -> None:
        # (Lightning's teardown then restores its own snapshot of every handler; the process's way out, where
        # a repeated signal must not kill a saved run, is early_signals.ignore's.)
        for signum, handler in self._original_handlers.items():
            signal.signal(signum, handler)
        self._original_handlers.clear()

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.received_signal = signum  # nothing else: the training loop acts on it at the next step boundary

    def on_before_backward(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor
    ) -> None:
        # No `if` on the device's value here: that would make the host wait for the GPU at every micro-batch.
        loss = loss.detach().float()
        bad = ~torch.isfinite(loss).all()
        if self._loss_bad is None:
            self._loss_bad, self._bad_loss = bad, loss.reshape(-1)[0]
        else:  # keep the first non-finite value of the accumulation for the message
            self._bad_loss = torch.where(bad & ~self._loss_bad, loss.reshape(-1)[0], self._bad_loss)
            self._loss_bad = self._loss_bad | bad

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        self._settle_copies(trainer)  # the step changes the weights: a save's deferred copy of them is done
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        loss_bad, self._loss_bad = self._loss_bad, None
        if not params:
            return
        # Gradients are all-reduced already under DDP, so every rank sees the same gradient verdict (fp16
        # overflow is the grad scaler's business, it skips those steps itself); sharded gradients and the
        # losses are agreed below, so every rank skips a step or none does.
        device = params[0].grad.device
        zero = torch.zeros((), device=device)
        grads_bad = zero if trainer.precision == "16-mixed" else _grads_bad(params)
        mine = loss_bad.to(device).float() if loss_bad is not None else zero
        preempt, time_due, loss_any, grads_any = self._read_step_flags(trainer, device, mine, grads_bad)
        self._agreed = (trainer.global_step + 1, [preempt, time_due, loss_any or grads_any])
        if not (loss_any or grads_any):
            return
        for p in params:
            p.grad = None  # the optimizer skips parameters without a gradient: the weights stay as they were
        step = trainer.global_step + 1
        if mine.item():
            reason = f"loss {float(self._bad_loss)}"
        else:
            reason = "gradient" if grads_any else "loss on another rank"
        self._nonfinite_pending = f"non-finite {reason} at step {step} on rank {trainer.global_rank}"
        if self.on_nonfinite == "skip":
            log.warning("skipped step %d: non-finite %s (trainer.on_nonfinite_loss=skip)", step, reason)

    def _settle_copies(self, trainer: pl.Trainer) -> None:
        """Wait for a background save's copy of the weights and optimizer state, made on its writer thread
        while this step's forward and backward ran; a wait is logged as ``checkpoint/copy_wait_s``."""
        if not isinstance(self._writer, CopiesLater):
            return
        waited = self._writer.settle()
        if waited > 0.0005 and trainer.is_global_zero:
            self._log_row(trainer, {"checkpoint/copy_wait_s": waited}, trainer.global_step + 1)
        self._forget_dropped()

    def _forget_dropped(self) -> None:
        # A save the writer did not publish (its deferred copy changed before it was checked) is no save.
        if isinstance(self._writer, CopiesLater) and self._writer.dropped_step == self._last_saved_step:
            self._last_saved_step = self._previous_saved_step

    def _read_step_flags(
        self, trainer: pl.Trainer, device: torch.device, loss_bad: torch.Tensor, grads_bad: torch.Tensor
    ) -> list[bool]:
        """The step's one device-to-host read: [a stop signal arrived, a timed save is due, a loss was not
        finite, a gradient was not finite], each the OR over every rank (one all-reduce of four numbers).
        The signal and the timer ride along so that every rank acts on them at the same step."""
        host = torch.tensor([float(self.received_signal is not None), float(self._time_due())], device=device)
        flags = torch.cat([host, loss_bad.reshape(1), grads_bad.reshape(1)])
        if trainer.world_size > 1:
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        return [bool(v) for v in flags.tolist()]

    def _time_due(self) -> bool:
        elapsed = time.monotonic() - self._last_save_time
        return bool(self.every_n_minutes) and elapsed >= 60 * self.every_n_minutes

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        self._at_step_boundary = step != self._last_step
        if not self._at_step_boundary:
            return  # inside a gradient accumulation: not a step boundary
        self._last_step = step
        self._tighten_timeout(trainer)
        if self._agreed is not None and self._agreed[0] == step:
            preempt, time_due, nonfinite = self._agreed[1]  # read with the step's gradient check
            nonfinite = nonfinite and self.on_nonfinite == "stop"
        else:  # no optimizer step went through this callback (no gradients): agree here
            nonfinite = self._nonfinite_pending is not None and self.on_nonfinite == "stop"
            preempt, time_due, nonfinite = self._agree(
                trainer, [self.received_signal is not None, self._time_due(), nonfinite]
            )
        self._agreed = None
        self._nonfinite_pending = None if not nonfinite else self._nonfinite_pending
        if preempt:
            self.preempted = True
            self.save(trainer, "preempted")
            raise StopRun("preempted")
        if nonfinite:
            self.stopped_nonfinite = self._nonfinite_pending or "non-finite loss on another rank"
            self.save(trainer, "nonfinite")
            raise StopRun("nonfinite")
        if (self.every_n_steps and step % self.every_n_steps == 0) or time_due:
            self.save(trainer, "periodic")
        self._nonfinite_pending = None

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not self.keep_best_k or trainer.global_step == 0:
            return
        if not self._at_step_boundary:
            return  # validation in the middle of a gradient accumulation: a save here could not resume exactly
        step = trainer.global_step
        if self._last_saved_step == step:  # saved at this step already: record the metric it scored
            self.wait()  # its manifest exists once it is written
            if trainer.is_global_zero:
                path = self.directory / step_checkpoint_name(step)
                manifest = read_manifest(path)
                if manifest is not None:
                    manifest["metric"] = self._metric(trainer)
                    write_manifest(path, manifest)
                    self._retain()
        else:
            self.save(trainer, "validation")

    # ------------------------------------------------------------------ saving

    def save(self, trainer: pl.Trainer, reason: str) -> Path:
        """Write ``step-N.ckpt`` (all ranks call this together), point ``last.ckpt`` at it, prune old ones."""
        step = trainer.global_step
        path = self.directory / step_checkpoint_name(step)
        for logger in trainer.loggers:  # rows up to this step on disk: a resumed run keeps exactly those
            if isinstance(logger, RunLogger):
                logger.flush_all()
        started = time.perf_counter()
        # Only a validation of these very weights scores them (on_validation_end fills it in for a save made
        # at the same step); an older validation's value would rank the wrong weights.
        metric = self._metric(trainer) if reason == "validation" else None
        manifest = dict(self.manifest_extra, reason=reason, metric=metric, monitor=self.monitor)
        # Sharded checkpoints are written by the strategy itself (FSDP2Strategy), others by the IO plugin.
        writer = next(
            (w for w in (trainer.strategy, trainer.strategy.checkpoint_io) if isinstance(w, WriteStats)), None
        )
        background = isinstance(writer, AsyncWriter) and writer.async_save
        options: dict[str, Any] = {"manifest": manifest}
        if background:  # published (last.ckpt, retention) by the writer once the file is complete
            self.wait()
            earlier = dict(writer.last_write)  # the previous background write: finished now
            options["then"] = lambda: self._publish(path)
            if reason in ("periodic", "validation") and isinstance(writer, CopiesLater):
                # training goes on: the weights are copied while the next step runs
                options["steady"] = steady_storages(trainer)
        trainer.save_checkpoint(path, weights_only=False, storage_options=options)
        if background and reason in ("preempted", "nonfinite", "final"):
            self.wait()  # the process is about to end: the checkpoint must be on disk first
        stall = time.perf_counter() - started
        self._previous_saved_step = self._last_saved_step
        self._last_saved_step, self._last_save_time = step, time.monotonic()
        if trainer.is_global_zero:
            if not background:
                self._publish(path)
            written = dict(writer.last_write) if writer is not None else {}
            if background and written.get("step") != step:
                # Still being written: its size and speed are reported by the next save's row, which gives
                # the previous write's here (and completes that save's entry).
                written = earlier
                for entry in self.saves:
                    if entry["step"] == written.get("step"):
                        entry.update(bytes=written["bytes"], write_s=written["seconds"])
                self.saves.append({"step": step, "stall_s": stall, "bytes": 0, "write_s": 0.0})
            else:
                self.saves.append({"step": step, "stall_s": stall, "bytes": written.get("bytes", 0),
                                   "write_s": written.get("seconds", 0.0)})  # fmt: skip
            row = {"checkpoint/stall_s": stall}
            if written.get("bytes"):
                row["checkpoint/mb"] = written["bytes"] / 1e6
            if written.get("seconds"):
                row["checkpoint/mb_per_s"] = written["bytes"] / 1e6 / written["seconds"]
            self._log_row(trainer, row, step)
            if reason in ("preempted", "nonfinite"):
                log.info("checkpoint saved at step %d (%s): %s", step, reason, path)
        return path

    @staticmethod
    def _log_row(trainer: pl.Trainer, row: dict[str, float], step: int) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, RunLogger):
                logger.log_trainer_metrics(row, step)
            else:
                logger.log_metrics(row, step=step)

    def needs_final_save(self, trainer: pl.Trainer) -> bool:
        """Whether the run's end has no checkpoint of its last step yet, agreed by every rank (only rank
        zero knows of a background save that was not published)."""
        self.wait()
        return self._agree(trainer, [self._last_saved_step != trainer.global_step])[0]

    def _publish(self, path: Path) -> None:
        """A complete checkpoint becomes the newest (``last.ckpt``); old ones go (rank zero, after the write)."""
        self._link_last(path)
        self._retain()

    def wait(self) -> None:
        """Until the checkpoint being written in the background (if any) is published."""
        if self._writer is not None:
            self._writer.wait()
            self._forget_dropped()

    def _metric(self, trainer: pl.Trainer) -> float | None:
        value = trainer.callback_metrics.get(self.monitor)
        return None if value is None else float(value)

    def _link_last(self, path: Path) -> None:
        last = self.directory / LAST_CHECKPOINT
        tmp = self.directory / f".{LAST_CHECKPOINT}.tmp"
        tmp.unlink(missing_ok=True)
        if path.is_dir():  # a sharded checkpoint: a relative symbolic link (directories take no hard links)
            os.symlink(path.name, tmp)
        else:
            try:
                os.link(path, tmp)  # a hard link: no second copy of the bytes
            except OSError:
                shutil.copy2(path, tmp)
        os.replace(tmp, last)
        manifest = read_manifest(path) or {}
        write_manifest(last, dict(manifest, file=LAST_CHECKPOINT, source=path.name))

    def _retain(self) -> None:
        # Hidden leftovers of writes that were killed: temporaries, and a sharded checkpoint set aside while
        # the same step was written again (see FSDP2Strategy.save_checkpoint).
        for stale in (*self.directory.glob(".step-*.ckpt.tmp"), *self.directory.glob(".step-*.ckpt.old")):
            remove_checkpoint(stale)
        entries = []
        for step, path in step_checkpoints(self.directory):  # newest first
            if read_manifest(path) is None:  # a write that never finished (killed): never valid, remove it
                remove_checkpoint(path)
            else:
                entries.append((step, path))
        keep = {p for _, p in entries[: self.keep_last_k]}
        if self.keep_best_k:
            scored = [
                (m["metric"], p)
                for _, p in entries
                if (m := read_manifest(p)) and m.get("metric") is not None
            ]
            scored.sort(key=lambda mp: mp[0], reverse=self.mode == "max")
            keep |= {p for _, p in scored[: self.keep_best_k]}
        for _, path in entries:
            if path not in keep:
                remove_checkpoint(path)

    # ------------------------------------------------------------------ distributed helpers

    def _agree(self, trainer: pl.Trainer, flags: list[bool]) -> list[bool]:
        """Every rank gets the OR of every rank's flags (one all-reduce of a few numbers per step)."""
        if trainer.world_size == 1:
            return flags
        tensor = torch.tensor([float(f) for f in flags], device=trainer.strategy.root_device)
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
        return [bool(v) for v in tensor.tolist()]

    def _tighten_timeout(self, trainer: pl.Trainer) -> None:
        """After the first step (start-up, first compilation done) a stuck collective means a dead rank: stop
        waiting for it after ``step_timeout_s`` instead of the long start-up timeout."""
        if self._timeout_tightened or not self.step_timeout_s or trainer.world_size == 1:
            return
        self._timeout_tightened = True
        try:
            from torch.distributed.distributed_c10d import _set_pg_timeout

            timeout = timedelta(seconds=self.step_timeout_s)
            _set_pg_timeout(timeout, None)
            # FSDP's hybrid mesh runs its gathers and reductions on groups of its own.
            groups = (
                trainer.strategy.extra_process_groups()
                if isinstance(trainer.strategy, ShardingReport)
                else []
            )
            for group in groups:
                _set_pg_timeout(timeout, group)
        except Exception as err:  # a private torch API: keep training with the start-up timeout
            log.warning("could not shorten the collective timeout after the first step: %s", err)
