"""A progress bar that counts optimizer steps towards the end of training, not batches of an epoch.

Runs are bounded by ``trainer.max_steps``; Lightning's bar would show "Epoch 0/-1" and a batch count that
means nothing to the user. Off a terminal (batch jobs, CI) it redraws rarely, so log files stay small.
"""

from __future__ import annotations

import sys
from typing import Any

from trainer.namespace import pl


class StepProgressBar(pl.callbacks.TQDMProgressBar):
    def __init__(self, log_every_n_steps: int) -> None:
        super().__init__(refresh_rate=1 if sys.stdout.isatty() else max(1, log_every_n_steps))

    def init_validation_tqdm(self) -> Any:
        bar = super().init_validation_tqdm()
        bar.disable = not sys.stdout.isatty()  # off a terminal, the val loss in the train bar is enough
        return bar

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
        if step != bar.n and (step % self.refresh_rate == 0 or step == bar.total):
            bar.n = step
            bar.set_postfix(self.get_metrics(trainer, pl_module))
            bar.refresh()

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics
