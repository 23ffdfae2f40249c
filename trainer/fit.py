"""The training side: build each component from its own config slice, fit, save, summarise.

Runs in every training process (one, or one per device under torchrun/srun); only rank zero writes to the
run directory and prints.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
import warnings
from typing import Any

from hydra.utils import instantiate

from trainer import exits, rundir
from trainer.checkpoint.callback import (
    Checkpointer,
    StopRun,
    install_early_handlers,
)
from trainer.checkpoint.io import AtomicCheckpointIO
from trainer.config.compose import Composed
from trainer.config.schema import (
    CheckpointConfig,
    LoggerConfig,
    OptimConfig,
    PrecisionConfig,
    StrategyConfig,
    TrainerConfig,
)
from trainer.files import read_json
from trainer.metrics.csv_logger import CSVMetricsLogger
from trainer.metrics.progress import StepProgressBar
from trainer.metrics.throughput import ThroughputMonitor
from trainer.metrics.wandb_logger import SafeWandbLogger, build_wandb_logger
from trainer.namespace import fabric_module, pl, pl_module
from trainer.strategy import build_strategy
from trainer.sweep import OPTUNA_ENV

log = logging.getLogger("trainer")

# Lightning 2.6 calls a torch pytree API that torch 2.13 deprecates; nothing for users to act on.
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")


class _DropAdverts(logging.Filter):
    """Lightning advertises a hosted service on every run; it is not ours to show."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Tip:" not in str(record.msg)


logging.getLogger("pytorch_lightning.utilities.rank_zero").addFilter(_DropAdverts())


class RunStopped(Exception):
    """Training ended early on purpose (preemption, non-finite loss), with a checkpoint and an exit code."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.message, self.code = message, code


def build_model(model_cfg: Any, optim: OptimConfig) -> pl.LightningModule:
    """The LightningModule named by ``model._target_``; it gets the ``optim`` slice if it takes one."""
    import inspect

    from hydra.utils import get_class

    target = model_cfg["_target_"] if isinstance(model_cfg, dict) else model_cfg._target_
    params = inspect.signature(get_class(target).__init__).parameters
    extra = {"optim": _plain(optim)} if "optim" in params else {}
    module = instantiate(model_cfg, **extra, _convert_="all")
    if not isinstance(module, pl.LightningModule):
        raise TypeError(f"model._target_={target} is not a pytorch_lightning.LightningModule")
    return module


def build_data(data_cfg: Any) -> pl.LightningDataModule:
    module = instantiate(data_cfg, _convert_="all")
    if not isinstance(module, pl.LightningDataModule):
        raise TypeError(
            f"data._target_ built a {type(module).__name__}, not a pytorch_lightning.LightningDataModule"
        )
    return module


def build_trainer(
    trainer: TrainerConfig,
    strategy: StrategyConfig,
    precision: PrecisionConfig,
    checkpoint: CheckpointConfig,
    logger: LoggerConfig,
    accelerator: str,
    paths: rundir.RunPaths,
    manifest_extra: dict,
) -> tuple[pl.Trainer, ThroughputMonitor, Checkpointer]:
    monitor = ThroughputMonitor(trainer.log_every_n_steps, accelerator, str(precision.value))
    checkpointer = Checkpointer(
        paths.checkpoints,
        every_n_steps=checkpoint.every_n_steps,
        every_n_minutes=checkpoint.every_n_minutes,
        keep_last_k=checkpoint.keep_last_k,
        keep_best_k=checkpoint.keep_best_k,
        monitor=checkpoint.monitor,
        mode=checkpoint.mode,
        signals=list(checkpoint.save_on_signals),
        on_nonfinite=trainer.on_nonfinite_loss,
        step_timeout_s=strategy.step_timeout_s,
        manifest_extra=manifest_extra,
    )
    callbacks: list[pl.Callback] = [monitor, checkpointer]
    if trainer.enable_progress_bar:
        callbacks.append(StepProgressBar(trainer.log_every_n_steps))
    if os.environ.get(OPTUNA_ENV):  # a trial of an Optuna sweep: report the objective, stop when pruned
        from trainer.sweep.pruning import OptunaPruning

        callbacks.append(OptunaPruning(json.loads(os.environ[OPTUNA_ENV])))
    plugins: list[Any] = [AtomicCheckpointIO()]
    SLURMEnvironment = fabric_module("plugins.environments").SLURMEnvironment
    if SLURMEnvironment.detect():
        # Our checkpointer handles SIGUSR1 cooperatively; Lightning's in-handler save+requeue must not also act.
        plugins.append(SLURMEnvironment(auto_requeue=False))
    loggers: list[Any] = (
        [CSVMetricsLogger(paths.metrics, logger.csv.flush_every_n_rows)] if logger.csv else []
    )
    if logger.wandb is not None:
        wandb_logger = build_wandb_logger(logger.wandb, paths.name, paths.dir)
        if wandb_logger is not None:
            loggers.append(wandb_logger)
    pl_trainer = pl.Trainer(
        accelerator=accelerator,
        devices=trainer.devices,
        num_nodes=trainer.num_nodes,
        strategy=build_strategy(strategy, str(precision.value), accelerator),
        precision=str(precision.value),
        max_steps=trainer.max_steps,
        max_epochs=trainer.max_epochs if trainer.max_steps == -1 else -1,
        accumulate_grad_batches=trainer.accumulate_grad_batches,
        gradient_clip_val=trainer.gradient_clip_val,
        val_check_interval=trainer.val_check_interval,
        check_val_every_n_epoch=None,  # val_check_interval counts batches across epoch boundaries
        limit_val_batches=trainer.limit_val_batches if trainer.limit_val_batches is not None else 1.0,
        num_sanity_val_steps=trainer.num_sanity_val_steps,
        log_every_n_steps=trainer.log_every_n_steps,
        deterministic=trainer.deterministic,
        enable_progress_bar=trainer.enable_progress_bar,
        enable_checkpointing=False,  # the Checkpointer above replaces Lightning's ModelCheckpoint
        enable_model_summary=False,
        logger=loggers or False,
        callbacks=callbacks,
        plugins=plugins,
        default_root_dir=str(paths.dir),
    )
    return pl_trainer, monitor, checkpointer


def fit(c: Composed) -> dict:
    """Train the checked run ``c`` in this process (one rank of it); returns the closing summary."""
    conf, resolved, paths, plan, overrides = c.conf, c.resolved, c.paths, c.plan, c.own_overrides
    accelerator = c.accelerator
    started = time.perf_counter()
    install_early_handlers(list(conf.checkpoint.save_on_signals))
    pl.seed_everything(conf.seed, workers=True, verbose=False)
    data = build_data(conf.data)
    model = build_model(conf.model, conf.optim)
    manifest_extra = {
        "config_hash": rundir.config_hash(resolved),
        "identity": rundir.resume_identity(resolved),
    }
    if conf.logger.wandb is not None:  # which W&B run this state belongs to
        from trainer.metrics.wandb_logger import wandb_run_id

        manifest_extra["wandb_run_id"] = wandb_run_id(paths.name, paths.dir)
    trainer, monitor, checkpointer = build_trainer(
        conf.trainer,
        conf.strategy,
        conf.precision,
        conf.checkpoint,
        conf.logger,
        accelerator,
        paths,
        manifest_extra,
    )
    wandb_logger = next((lg for lg in trainer.loggers if isinstance(lg, SafeWandbLogger)), None)
    if trainer.is_global_zero:
        rundir.start(paths, resolved, overrides, plan, conf.seed, trainer.world_size)
        if plan.action == "resume":
            log.info("resuming %s from %s", paths.name, plan.checkpoint)
        if wandb_logger is not None:
            state = read_json(paths.state) or {}
            info = {"overrides": overrides, "git": state.get("git"), "versions": state.get("versions"),
                    "run_dir": str(paths.dir), "attempt": len(state.get("attempts", []))}  # fmt: skip
            wandb_logger.log_run_info(resolved, info)
            rundir.annotate(paths, wandb={"id": wandb_logger._id, "mode": wandb_logger._wandb_init.get("mode"),
                                          "failed": wandb_logger.failed})  # fmt: skip
    SIGTERMException = pl_module("utilities.exceptions").SIGTERMException

    try:
        try:
            trainer.fit(model, datamodule=data, ckpt_path=plan.checkpoint)
        except StopRun:
            pass  # the checkpointer saved and asked to stop; preempted / stopped_nonfinite say why
        except SIGTERMException:
            # SIGTERM before training started (Lightning's own handler was still the active one): there is
            # nothing new to save, and the run can simply be started again.
            checkpointer.preempted = True
        stopped_early = checkpointer.preempted or checkpointer.stopped_nonfinite
        if not stopped_early and checkpointer._last_saved_step != trainer.global_step:
            checkpointer.save(trainer, "final")
    except BaseException:
        if trainer.is_global_zero:
            rundir.finish(paths, "failed")
        raise
    finally:
        checkpointer.restore_signal_handlers()
    summary = summarise(trainer, monitor, checkpointer, paths, time.perf_counter() - started)
    last = paths.last_checkpoint
    stop: RunStopped | None = None
    if checkpointer.preempted:
        state = "preempted"
        stop = RunStopped(
            f"preempted by a signal: checkpoint saved at step {trainer.global_step} ({last}); "
            f"exit code {exits.PREEMPTED} means: run the same command again to continue",
            exits.PREEMPTED,
        )
    elif checkpointer.stopped_nonfinite:
        state = "failed"
        stop = RunStopped(
            f"error: stopped on a {checkpointer.stopped_nonfinite}; the step was not applied and the last good "
            f"state is saved at step {trainer.global_step} ({last}); trainer.on_nonfinite_loss=skip skips such steps",
            exits.NONFINITE,
        )
    else:
        pruned = any(getattr(cb, "pruned", False) for cb in trainer.callbacks)
        state = "pruned" if pruned else "finished"
        if (
            trainer.is_global_zero
            and wandb_logger is not None
            and conf.logger.wandb
            and conf.logger.wandb.log_checkpoint
        ):
            wandb_logger.upload_checkpoint(paths.last_checkpoint)
    if stop is not None and trainer.world_size > 1:
        # Every rank is about to exit with the same code. A launcher that ends the other ranks as soon as the
        # first exits non-zero (srun --kill-on-bad-exit) must not turn that code into "killed by SIGTERM"
        # (143), or the job would not be requeued; so from here on SIGTERM is ignored.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if trainer.is_global_zero:
        rundir.finish(paths, state, summary)
    # Only now may the ranks go: under srun, the first rank to exit with a non-zero code makes srun stop
    # the others (--kill-on-bad-exit), so rank zero's record above must be written before anyone leaves.
    try:
        close_distributed()
    except Exception as exc:  # a peer gone during teardown: the run's own outcome still stands
        log.warning("process group teardown failed: %s", exc)
    if stop is not None:
        raise stop
    if trainer.is_global_zero:
        print_summary(summary)
    return summary


def close_distributed() -> None:
    """Meet the other ranks, then tear the process group down while every rank is still alive.

    Left to interpreter exit, a rank that finishes first closes its gloo connections under a peer that is
    still tearing down, and that peer can abort ("terminate called without an active exception", exit 134)
    after a run that ended well. Only called on paths where every rank got here; a failing rank never waits.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    try:
        dist.barrier()
    finally:
        dist.destroy_process_group()


def summarise(
    trainer: pl.Trainer,
    monitor: ThroughputMonitor,
    checkpointer: Checkpointer,
    paths: rundir.RunPaths,
    seconds: float,
) -> dict:
    rows = monitor.history
    # Skip the first logged window: it holds start-up work (first kernels, allocator warm-up).
    steady = rows[1:] or rows

    def mean(key: str) -> float | None:
        values = [r[key] for r in steady if key in r]
        return sum(values) / len(values) if values else None

    def last(key: str) -> float | None:
        values = [r[key] for r in rows if key in r]
        return values[-1] if values else None

    val = trainer.callback_metrics.get("val/loss")
    return {
        "steps": trainer.global_step,
        "world_size": trainer.world_size,
        "train_loss": last("train/loss"),
        "val_loss": float(val) if val is not None else None,
        "samples_per_sec": mean("train/samples_per_sec"),
        "tokens_per_sec": mean("train/tokens_per_sec"),
        "mfu": mean("train/mfu"),
        "data_wait_frac": mean("train/data_wait_frac"),
        "peak_flops": monitor.peak_flops,
        "peak_source": monitor.peak_source,
        "wall_time_s": seconds,
        "run_dir": str(paths.dir),
        "metrics": str(paths.metrics),
        "checkpoint": str(paths.last_checkpoint),
        "checkpoint_saves": checkpointer.saves,
        # FSDP: the mesh and how many parameters each rank holds (proof that they are sharded).
        "sharding": getattr(trainer.strategy, "report", None) or None,
    }


def print_summary(s: dict) -> None:
    def num(value: float | None, fmt: str) -> str:
        return "n/a" if value is None else format(value, fmt)

    lines = [
        f"finished {s['steps']} steps on {s['world_size']} process(es) in {s['wall_time_s']:.1f} s",
        f"  train loss {num(s['train_loss'], '.4f')}   val loss {num(s['val_loss'], '.4f')}",
        f"  throughput {num(s['samples_per_sec'], ',.0f')} samples/s"
        + (f"   {num(s['tokens_per_sec'], ',.0f')} tokens/s" if s["tokens_per_sec"] is not None else "")
        + f"   MFU {num(s['mfu'] and s['mfu'] * 100, '.1f')}% (peak: {s['peak_source']})"
        f"   data wait {num(s['data_wait_frac'] and s['data_wait_frac'] * 100, '.1f')}%",
        f"  run dir     {s['run_dir']}",
        f"  metrics     {s['metrics']}",
        f"  checkpoint  {s['checkpoint']}",
    ]
    print("\n".join(lines), flush=True)


def _plain(obj: Any) -> Any:
    import dataclasses

    return dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else obj
