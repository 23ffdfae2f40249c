"""Inside an Optuna trial's training process: report the objective at each validation, stop if pruned.

The sweep runner sets ``TRAINER_OPTUNA`` (the study's journal, its name, the trial number, the metric) for
the trial's process; ``fit`` then adds this callback. Rank zero reports to the study; its decision is
broadcast so every rank stops at the same step. A pruned run ends normally (exit 0, a final checkpoint) with
status ``pruned`` in run.json, and the runner tells the study.
"""

from __future__ import annotations

from typing import Any

from trainer.namespace import pl


class OptunaPruning(pl.Callback):
    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.pruned = False
        self._trial: Any = None

    def trial(self) -> Any:
        if self._trial is None:
            import optuna

            from trainer.sweep.study import make_pruner, storage

            optuna.logging.set_verbosity(optuna.logging.WARNING)
            study = optuna.load_study(study_name=self.spec["study"], storage=storage(self.spec["journal"]),
                                      pruner=make_pruner(self.spec.get("pruner", {})))  # fmt: skip
            frozen = next(t for t in study.get_trials(deepcopy=False) if t.number == self.spec["number"])
            self._trial = optuna.trial.Trial(study, frozen._trial_id)
        return self._trial

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        value = trainer.callback_metrics.get(self.spec["metric"])
        prune = False
        if trainer.is_global_zero and value is not None:
            trial = self.trial()
            trial.report(float(value), step=trainer.global_step)
            prune = bool(trial.should_prune())
        prune = trainer.strategy.broadcast(prune, src=0)
        if prune:
            self.pruned = True
            trainer.should_stop = True
