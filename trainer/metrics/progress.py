"""Progress that counts optimizer steps towards the end of training, not batches of an epoch.

Runs are bounded by ``trainer.max_steps``; Lightning's bar would show "Epoch 0/-1" and a batch count that
means nothing to the user. On a terminal it is a bar; off one (batch jobs, CI, a rank's log file) it is one
plain line per log interval, so log files hold no redraws, carriage returns or empty validation bars.
"""

from __future__ import annotations

import sys
from typing import Any

from trainer.namespace import pl


def progress_for(log_every_n_steps: int) -> pl.callbacks.ProgressBar:
    """A bar where a person watches (stderr is a terminal), else lines."""
    return StepProgressBar() if sys.stderr.isatty() else StepProgressLines(log_every_n_steps)


def _shown(trainer: pl.Trainer, pl_module: pl.LightningModule, bar: pl.callbacks.ProgressBar) -> dict:
    metrics = pl.callbacks.ProgressBar.get_metrics(bar, trainer, pl_module)
    metrics.pop("v_num", None)
    return metrics


class StepProgressBar(pl.callbacks.TQDMProgressBar):
    def __init__(self) -> None:
        super().__init__(refresh_rate=1)

    def on_train_epoch_start(self, trainer: pl.Trainer, *_: Any) -> None:
        bar = self.train_progress_bar
        total = int(trainer.estimated_stepping_batches)
        if bar.total != total:
            bar.reset(total=total)
        bar.n = trainer.global_step
        bar.set_description("train")
        bar.refresh()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        bar = self.train_progress_bar
        if step != bar.n:
            bar.n = step
            bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
            bar.refresh()  # once: set_postfix would draw the bar a second time

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict:
        return _shown(trainer, pl_module, self)


class StepProgressLines(pl.callbacks.ProgressBar):
    """``train: step 20/300 loss=3.08 val/loss=2.44 (4.8 steps/s)``, once per ``log_every_n_steps`` and at
    the end, from rank zero."""

    def __init__(self, log_every_n_steps: int) -> None:
        super().__init__()
        self.every = max(1, log_every_n_steps)
        self.enabled = True
        self._last: tuple[int, float] | None = None

    def disable(self) -> None:
        self.enabled = False

    def enable(self) -> None:
        self.enabled = True

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        import time

        self._last = (trainer.global_step, time.perf_counter())

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        import time

        step, total = trainer.global_step, int(trainer.estimated_stepping_batches)
        if not (self.enabled and trainer.is_global_zero) or self._last is None or step == self._last[0]:
            return
        if step % self.every and step != total:
            return
        now = time.perf_counter()
        rate = (step - self._last[0]) / max(now - self._last[1], 1e-9)
        self._last = (step, now)
        shown = " ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
            for k, v in _shown(trainer, pl_module, self).items()
        )
        print(f"train: step {step}/{total} {shown} ({rate:.1f} steps/s)".replace("  ", " "), flush=True)
