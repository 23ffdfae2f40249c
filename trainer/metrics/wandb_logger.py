"""W&B tracking that survives DDP, requeue and a missing network.

- One W&B run per training run: only rank zero creates it (Lightning's WandbLogger gives the other ranks a
  dummy), under DDP and multi-node alike.
- Its id is derived from the run directory, so a resume or a SLURM requeue continues the same W&B run
  (``resume="allow"``) and its steps continue from the checkpoint's step.
- Offline by default: files under ``<run.dir>/wandb``, uploaded later with ``wandb sync``.
- If W&B cannot start or fails mid-run, training goes on: one warning, then this logger does nothing. The CSV
  file has every metric regardless.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from trainer.config.schema import WandbLoggerConfig
from trainer.metrics.names import module_metrics
from trainer.namespace import fabric_module, pl
from trainer.secrets import flatten, redact, redact_override

log = logging.getLogger("trainer")
rank_zero_only = pl.utilities.rank_zero_only


def resolve_mode(cfg: WandbLoggerConfig) -> str:
    return cfg.mode or os.environ.get("WANDB_MODE") or "offline"


class SafeWandbLogger(pl.loggers.WandbLogger):
    """Lightning's WandbLogger, except that no W&B failure can stop training."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Lightning passes anonymous=None to wandb.init, which W&B now answers with a warning on every run.
        self._wandb_init.pop("anonymous", None)
        self.failed: str | None = None
        self.current_step: int | None = None  # the optimizer step, set by the throughput monitor

    def _disable(self, err: BaseException) -> None:
        if self.failed is None:
            self.failed = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            log.warning(
                "W&B logging is off for the rest of this run (%s); metrics.csv has everything", self.failed
            )

    @property
    def experiment(self) -> Any:
        if self.failed is not None:
            return None
        try:
            return super().experiment
        except Exception as err:  # wandb.init: no network, bad key, unwritable dir...
            self._disable(err)
            return None

    @rank_zero_only
    def log_hyperparams(self, params: Any) -> None:
        convert = fabric_module("utilities.logger")._convert_params
        self._safely(super().log_hyperparams, redact(convert(params)))

    # Every value is keyed by optimizer step, as metrics.csv does (Lightning's own counter is one behind for
    # validation); W&B plots against trainer/global_step, which continues across resumes.
    @rank_zero_only
    def log_metrics(self, metrics: Any, step: int | None = None) -> None:
        """What Lightning passes on from the module's ``self.log`` (and from other callbacks)."""
        step = self.current_step if self.current_step is not None else step
        self._safely(super().log_metrics, module_metrics(metrics), step)

    @rank_zero_only
    def log_trainer_metrics(self, row: Any, step: int) -> None:
        self._safely(super().log_metrics, {k: v for k, v in row.items() if k != "step"}, step)

    @rank_zero_only
    def flush_all(self) -> None:
        pass  # W&B writes its own files as it goes

    @property
    def run_id(self) -> str:
        return self._id

    @property
    def mode(self) -> str | None:
        return self._wandb_init.get("mode")

    def where(self) -> str | None:
        """For the summary: the W&B run's page, or its offline folder and how to upload it."""
        run = self.experiment
        if run is None:
            return None
        try:
            if self.mode == "offline":
                folder = os.path.relpath(run.settings.sync_dir)
                return f"{folder} (offline; upload with: wandb sync {folder})"
            return run.url
        except Exception:  # W&B's internals moved: the summary goes without it
            return None

    @rank_zero_only
    def finalize(self, status: str) -> None:
        self._safely(super().finalize, status)

    def after_save_checkpoint(self, checkpoint_callback: Any) -> None:
        pass  # checkpoints are uploaded (if asked) once, at the end: see upload_checkpoint

    def _safely(self, fn: Any, *args: Any) -> None:
        if self.failed is not None or self.experiment is None:
            return
        try:
            fn(*args)
        except Exception as err:
            self._disable(err)

    @rank_zero_only
    def log_run_info(self, config: dict, info: dict) -> None:
        """The resolved config, flattened and with secrets redacted, plus the run's metadata."""
        if self.experiment is None:
            return
        info = dict(info, overrides=[redact_override(o) for o in info.get("overrides", [])])
        try:
            self.experiment.config.update(flatten(redact(config)), allow_val_change=True)
            self.experiment.config.update(
                {f"run_info/{k}": v for k, v in redact(info).items()}, allow_val_change=True
            )
        except Exception as err:
            self._disable(err)

    @rank_zero_only
    def upload_checkpoint(self, path: Path) -> None:
        if self.experiment is None:
            return
        try:
            import wandb

            artifact = wandb.Artifact(name=f"model-{self.experiment.id}", type="model")
            if path.is_dir():  # a sharded checkpoint (FSDP)
                artifact.add_dir(str(path.resolve()), name=path.name)
            else:
                artifact.add_file(str(path), name=path.name)
            self.experiment.log_artifact(artifact, aliases=["latest"])
        except Exception as err:
            self._disable(err)


def build_wandb_logger(
    cfg: WandbLoggerConfig, run_name: str, run_dir: Path, run_id: str
) -> SafeWandbLogger | None:
    try:
        import wandb
    except ImportError:
        log.warning(
            "logger.wandb is set but the wandb package is not installed (pip install wandb); CSV only"
        )
        return None
    return SafeWandbLogger(
        # No system metadata: it would record the command line, which may hold a secret (ours is logged
        # redacted through log_run_info instead). Silent: W&B's own console lines carry colour codes into
        # log files and come after the summary; the summary names the W&B run instead (``where``), and a
        # W&B failure is our one warning (_disable).
        settings=wandb.Settings(x_disable_meta=True, silent=True),
        name=run_name,
        id=run_id,
        project=cfg.project,
        entity=cfg.entity,
        group=cfg.group,
        tags=list(cfg.tags),
        job_type=cfg.job_type,
        notes=cfg.notes,
        mode=resolve_mode(cfg),
        save_dir=str(run_dir),
        resume="allow",
        log_model=False,
    )
