"""The end of the training loop: a run always ends with a validation when it has validation data.

Lightning validates every ``val_check_interval`` batches; a run whose last step is not such a batch (a run
shorter than the interval, or one that is not a multiple of it) would end with no validation of its final
weights, and its summary, its best checkpoint and its sweep objective would be missing or stale. On the last
step this callback asks the loop to stop, which makes Lightning validate right there (it validates when a
stop is requested) unless that batch validates anyway.
"""

from __future__ import annotations

from typing import Any

from trainer.namespace import pl


class FinalValidation(pl.Callback):
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.should_stop or not trainer.enable_validation:
            return
        if trainer.max_steps != -1:
            last = trainer.global_step >= trainer.max_steps
        else:
            last = (
                trainer.max_epochs is not None
                and trainer.current_epoch + 1 >= trainer.max_epochs
                and trainer.fit_loop.epoch_loop.batch_progress.is_last_batch
            )
        if last:
            trainer.should_stop = True
