"""Metric names: the trainer's own columns, the user's, and the configured ones that must exist.

- The trainer writes its own figures (``train/loss``, ``train/lr``, throughput, memory, checkpoint cost, device
  telemetry). A metric the user's module logs under one of those names is never silently merged into the
  trainer's column: it is written as ``module/<name>``, and one warning says so.
- The configured metric names (``checkpoint.monitor``, ``sweep.metric``) are the user's: when the first
  validation ends without one of them, one warning lists what the module did log.
"""

from __future__ import annotations

import logging
import re
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
    "train/mem_reserved_gb",
    "checkpoint/stall_s",
    "checkpoint/mb",
    "checkpoint/mb_per_s",
)
SYS_COLUMNS = ("sys/cpu_util", "sys/rss_gb")
"""Rank zero's process (``trainer/metrics/telemetry.py``)."""
GPU_FIELDS = (
    "util",
    "mem_used_gb",
    "mem_total_gb",
    "power_w",
    "temp_c",
    "sm_clock_mhz",
    "throttle",
    "energy_wh",
)
"""The ``gpu<i>/<field>`` columns, one set per GPU (``<i>``: the rank that drives it): utilisation (% of the
interval a kernel ran), memory used and total (GB, all processes and the CUDA context included), power (W),
temperature (C), SM clock (MHz), NVML's clock-event reasons (a bitmask;
``telemetry.SLOWDOWNS``) and energy since training started (Wh)."""
_GPU_COLUMN = re.compile(rf"gpu\d+/({'|'.join(GPU_FIELDS)})")
MODULE_PREFIX = "module/"
_warned: set[str] = set()


def is_trainer_column(key: str) -> bool:
    return key in TRAINER_COLUMNS or key in SYS_COLUMNS or _GPU_COLUMN.fullmatch(key) is not None


def module_metrics(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """What the module logged, with any name that is one of the trainer's own columns moved aside."""
    out: dict[str, Any] = {}
    for key, value in metrics.items():
        if is_trainer_column(key):
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
