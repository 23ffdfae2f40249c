"""Metric names: the trainer's own columns, the user's, and the configured ones that must exist.

- The trainer writes its own figures (``train/loss``, ``train/lr``, throughput, memory, checkpoint cost). A
  metric the user's module logs under one of those names is never silently merged into the trainer's
  column: it is written as ``module/<name>``, and one warning says so.
- The configured metric names (``checkpoint.monitor``, ``sweep.metric``) are the user's: when the first
  validation ends without one of them, one warning lists what the module did log.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from trainer.namespace import pl

log = logging.getLogger("trainer")

TRAINER_COLUMNS = (
    "train/loss",
    "train/lr",
    "train/samples_per_sec",
    "train/tokens_per_sec",
    "train/mfu",
    "train/step_time_s",
    "train/data_wait_frac",
    "train/mem_gb",
    "checkpoint/stall_s",
    "checkpoint/mb",
    "checkpoint/mb_per_s",
)
MODULE_PREFIX = "module/"
_warned: set[str] = set()


def module_metrics(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """What the module logged, with any name that is one of the trainer's own columns moved aside."""
    out: dict[str, Any] = {}
    for key, value in metrics.items():
        if key in TRAINER_COLUMNS:
            if key not in _warned:
                _warned.add(key)
                log.warning(
                    "metrics: your module logs %r, a column the trainer writes itself; yours is written as %r",
                    key, MODULE_PREFIX + key,
                )  # fmt: skip
            key = MODULE_PREFIX + key
        out[key] = value
    return out


class ConfiguredMetrics(pl.Callback):
    """After the first validation: warn once about a configured metric name that the module did not log."""

    def __init__(self, names: Mapping[str, str]) -> None:
        self.names = dict(names)  # config key -> metric name
        self.checked = False

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.checked or trainer.sanity_checking:
            return
        self.checked = True
        logged = sorted(trainer.callback_metrics)
        for key, name in self.names.items():
            if name not in trainer.callback_metrics and trainer.is_global_zero:
                log.warning(
                    "%s=%s was not logged by the first validation; the module logged: %s (set %s to one of them)",
                    key, name, ", ".join(logged) or "nothing", key,
                )  # fmt: skip
