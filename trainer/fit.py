"""The training side: build each component from its own config slice, fit, save, summarise.

Runs in every training process (one, or one per device under torchrun/srun); only rank zero writes to the
run directory and prints.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import time
import warnings
from typing import Any

from hydra.utils import get_object, instantiate

from trainer import exits, namespace, rundir
from trainer.checkpoint.callback import Checkpointer, StopRun, install_early_handlers
from trainer.checkpoint.hparams import PlainHyperparameters
from trainer.checkpoint.io import AtomicCheckpointIO
from trainer.config import compose
from trainer.config.compose import Composed
from trainer.config.errors import ConfigError
from trainer.config.targets import accepts, is_ours
from trainer.data.loading import take_over_train_loader
from trainer.files import read_json
from trainer.loop import FinalValidation
from trainer.metrics.csv_logger import CSVMetricsLogger
from trainer.metrics.names import ConfiguredMetrics
from trainer.metrics.profile import profile_callbacks
from trainer.metrics.progress import progress_for
from trainer.metrics.throughput import ThroughputMonitor
from trainer.metrics.wandb_logger import SafeWandbLogger, build_wandb_logger
from trainer.namespace import fabric_module, pl, pl_module
from trainer.protocols import ShardingReport, StopsRun
from trainer.strategy import build_strategy
from trainer.strategy.devices import lightning_accelerator
from trainer.sweep import OPTUNA_ENV

log = logging.getLogger("trainer")

# Lightning 2.6 calls a torch pytree API that torch 2.13 deprecates; nothing for users to act on.
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
# Lightning's hint to prefix `srun` wherever SLURM's client is installed, given twice per run; the launching is
# ours (local workers, or srun under `trainer submit`), so there is nothing to act on.
warnings.filterwarnings("ignore", message=r"The `srun` command is available on your system but is not used")


class _DropAdverts(logging.Filter):
    """Lightning advertises a hosted service on every run; it is not ours to show."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Tip:" not in str(record.msg)


logging.getLogger(f"{namespace.PACKAGES[namespace.chosen()][0]}.utilities.rank_zero").addFilter(
    _DropAdverts()
)


def _one_handler_per_message() -> None:
    """The ``lightning`` package gives its logger a console handler of its own even where the root logger
    has one (Hydra's), which printed every Lightning message twice: with a root handler, that one is enough."""
    if logging.getLogger().handlers:
        for name in ("lightning", *namespace.PACKAGES[namespace.chosen()]):
            logger = logging.getLogger(name)
            if logger.propagate:
                logger.handlers.clear()


class RunStopped(Exception):
    """Training ended early on purpose (preemption, non-finite loss), with a checkpoint and an exit code."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.message, self.code = message, code


class DataResumeNotes:
    """How the training data resumes (exactly, or only at the right step), said once and kept in run.json."""

    def __init__(self, paths: rundir.RunPaths, rank_zero: bool) -> None:
        self.paths, self.rank_zero, self.said = paths, rank_zero, False

    def __call__(self, reason: str | None) -> None:
        if self.said or not self.rank_zero:
            return
        self.said = True
        if reason is not None:
            log.warning("data: %s: a resumed run continues at the right step, but not with the samples an "
                        "uninterrupted run would have seen next", reason)  # fmt: skip
        rundir.annotate(self.paths, data_resume={"exact": reason is None, "reason": reason})


def _instantiate(node: dict, key: str, kind: Any, what: str, **extra: Any) -> Any:
    """Build a config node's object and check that Lightning will take it (the run's namespace)."""
    obj = instantiate(node, **extra, _convert_="all")
    if not isinstance(obj, kind):
        raise ConfigError(
            f"{key}._target_", node.get("_target_"),
            f"a {namespace.PACKAGES[namespace.chosen()][0]}.{what} (it built a {type(obj).__name__})",
        )  # fmt: skip
    return obj


def given_to_model(c: Composed) -> dict[str, Any]:
    """The run's optimizer and scheduler nodes, for a model that takes them (``Composed.model_gets``)."""
    slices = {"optimizer": "optim", "scheduler": "scheduler"}
    return {argument: c.resolved[slices[argument]] for argument, given in c.model_gets.items() if given}


def build_model(c: Composed) -> pl.LightningModule:
    """The LightningModule of ``model``; it gets the run's optimizer and scheduler if it takes them. A model
    too big for this machine's memory is bad input, said in one line (nothing is written yet)."""
    import torch

    try:
        return _instantiate(
            c.resolved["model"], "model", pl.LightningModule, "LightningModule", **given_to_model(c)
        )
    except Exception as err:  # Hydra wraps what the model's __init__ raised
        cause = err.__cause__ or err
        text = str(cause)
        if (
            not isinstance(cause, (MemoryError, torch.OutOfMemoryError))
            and "can't allocate memory" not in text
        ):
            raise
        tried = re.search(r"tried to allocate (\d+) bytes", text)
        amount = f" (one tensor alone needs {int(tried.group(1)) / 2**30:,.1f} GiB)" if tried else ""
        raise ConfigError(
            "model",
            c.resolved["model"].get("_target_"),
            f"a model that fits in this machine's memory{amount}",
        ) from None


def build_data(c: Composed) -> pl.LightningDataModule:
    return _instantiate(c.resolved["data"], "data", pl.LightningDataModule, "LightningDataModule")


def build_callbacks(c: Composed) -> list[pl.Callback]:
    """The ``callbacks`` group's callbacks, in the order of their names."""
    return [
        _instantiate(node, f"callbacks.{name}", pl.Callback, "Callback")
        for name, node in sorted((c.resolved.get("callbacks") or {}).items())
        if node is not None
    ]


def build_extra_loggers(c: Composed) -> list[Any]:
    """``logger.extra``'s loggers; one that takes ``save_dir`` and does not set it writes into the run dir."""
    out = []
    for name, node in sorted((c.resolved["logger"].get("extra") or {}).items()):
        if node is None:
            continue
        extra = {}
        if "save_dir" not in node and accepts(get_object(node["_target_"]), "save_dir"):
            extra["save_dir"] = str(c.paths.dir)
        out.append(_instantiate(node, f"logger.extra.{name}", pl.loggers.Logger, "loggers.Logger", **extra))
    return out


def build_trainer(
    c: Composed, manifest_extra: dict, wandb_id: str, own_callbacks: list[pl.Callback]
) -> tuple[pl.Trainer, ThroughputMonitor, Checkpointer]:
    trainer, strategy, precision = c.conf.trainer, c.conf.strategy, c.conf.precision
    checkpoint, logger, paths, accelerator = c.conf.checkpoint, c.conf.logger, c.paths, c.accelerator
    monitor = ThroughputMonitor(
        trainer.log_every_n_steps, accelerator, str(precision.value), logger.telemetry_interval_s
    )
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
    names = {"checkpoint.monitor": checkpoint.monitor}
    if c.conf.sweep.metric != checkpoint.monitor:
        names["sweep.metric"] = c.conf.sweep.metric
    # The profiler (only when profile.steps is set) comes first: a step's optimizer phase ends before the
    # other callbacks' work at its end (logging, saves).
    callbacks: list[pl.Callback] = profile_callbacks(c.conf.profile, paths.profile, accelerator)
    callbacks += [monitor, checkpointer, FinalValidation(), ConfiguredMetrics(names)]
    callbacks += own_callbacks
    if trainer.enable_progress_bar:
        callbacks.append(progress_for(trainer.log_every_n_steps))
    if os.environ.get(OPTUNA_ENV):  # a trial of an Optuna sweep: report the objective, stop when pruned
        from trainer.sweep.pruning import OptunaPruning

        callbacks.append(OptunaPruning(json.loads(os.environ[OPTUNA_ENV])))
    callbacks += build_callbacks(c)
    callbacks.append(monitor.end_clock())  # last: the work of the callbacks above is not data wait
    plugins: list[Any] = [AtomicCheckpointIO(async_save=checkpoint.async_save)]
    SLURMEnvironment = fabric_module("plugins.environments").SLURMEnvironment
    if SLURMEnvironment.detect():
        # Our checkpointer handles SIGUSR1 cooperatively; Lightning's in-handler save+requeue must not also act.
        plugins.append(SLURMEnvironment(auto_requeue=False))
    loggers: list[Any] = (
        [CSVMetricsLogger(paths.metrics, logger.csv.flush_every_n_rows)] if logger.csv else []
    )
    if logger.wandb is not None:
        wandb_logger = build_wandb_logger(logger.wandb, paths.name, paths.dir, wandb_id)
        if wandb_logger is not None:
            loggers.append(wandb_logger)
    loggers += build_extra_loggers(c)
    pl_trainer = pl.Trainer(
        accelerator=lightning_accelerator(accelerator, trainer.devices),
        devices=trainer.devices,
        num_nodes=trainer.num_nodes,
        strategy=build_strategy(strategy, str(precision.value), accelerator, checkpoint.async_save),
        precision=str(precision.value),
        max_steps=trainer.max_steps,
        max_epochs=trainer.max_epochs if trainer.max_steps == -1 else -1,
        accumulate_grad_batches=trainer.accumulate_grad_batches,
        gradient_clip_val=trainer.gradient_clip_val,
        val_check_interval=trainer.val_check_interval,
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
        # An interval counts batches across epoch boundaries; none means once per epoch. Any other Lightning
        # flag beyond the schema's is passed as given.
        **{"check_val_every_n_epoch": None if trainer.val_check_interval else 1, **c.trainer_flags},
    )
    return pl_trainer, monitor, checkpointer


def fit(c: Composed) -> dict:
    """Train the checked run ``c`` in this process (one rank of it); returns the closing summary."""
    conf, resolved, paths, plan, overrides = c.conf, c.resolved, c.paths, c.plan, c.own_overrides
    started = time.perf_counter()
    _one_handler_per_message()
    install_early_handlers(list(conf.checkpoint.save_on_signals))
    pl.seed_everything(conf.seed, workers=True, verbose=False)
    data = build_data(c)
    model = build_model(c)
    # Before anything is written: hyperparameters that no checkpoint could store stop the run here.
    plain_hparams = PlainHyperparameters({**resolved["model"], **given_to_model(c)}, resolved["data"])
    plain_hparams.check(model, data)
    data_notes = DataResumeNotes(paths, compose.env_rank() == 0)
    ours = is_ours(str(resolved["data"].get("_target_", "")))
    if not ours:  # the built-in data modules resume exactly by construction
        take_over_train_loader(data, conf.seed, data_notes)
    manifest_extra = {
        "config_hash": rundir.config_hash(resolved),
        "identity": rundir.resume_identity(resolved),
    }
    wandb_id = rundir.wandb_id(paths)
    if conf.logger.wandb is not None:  # which W&B run this state belongs to
        manifest_extra["wandb_run_id"] = wandb_id
    trainer, monitor, checkpointer = build_trainer(c, manifest_extra, wandb_id, [plain_hparams])
    wandb_logger = next((lg for lg in trainer.loggers if isinstance(lg, SafeWandbLogger)), None)
    if trainer.is_global_zero:
        rundir.start(paths, resolved, overrides, plan, conf.seed, trainer.world_size)
        if ours:
            data_notes(None)
        if plan.action == "resume":
            log.info("resuming %s from %s", paths.name, plan.checkpoint)
        if wandb_logger is not None:
            state = read_json(paths.state) or {}
            info = {"overrides": overrides, "git": state.get("git"), "versions": state.get("versions"),
                    "run_dir": str(paths.dir), "attempt": len(state.get("attempts", []))}  # fmt: skip
            wandb_logger.log_run_info(resolved, info)
            rundir.annotate(paths, wandb={"id": wandb_logger.run_id, "mode": wandb_logger.mode,
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
        if not stopped_early and checkpointer.needs_final_save(trainer):
            checkpointer.save(trainer, "final")
    except BaseException as exc:
        if trainer.is_global_zero:
            rundir.record_failure(paths, exc)
        raise
    finally:
        checkpointer.restore_signal_handlers()
    names = [conf.checkpoint.monitor, conf.sweep.metric]
    summary = summarise(trainer, monitor, checkpointer, paths, time.perf_counter() - started, names)
    if wandb_logger is not None and trainer.is_global_zero:
        summary["wandb"] = wandb_logger.where()
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
        pruned = any(isinstance(cb, StopsRun) and cb.pruned for cb in trainer.callbacks)
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
    names: list[str],
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

    # The configured metrics (checkpoint.monitor, sweep.metric) first, then the rest of the validation's.
    logged = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    shown = [n for n in dict.fromkeys(names) if n in logged]
    shown += [k for k in sorted(logged) if k not in shown and (k.startswith("val") or "/val" in k)]
    val = logged.get("val/loss")
    return {
        "steps": trainer.global_step,
        "world_size": trainer.world_size,
        "train_loss": last("train/loss"),
        "val_loss": val,
        "validation": {k: logged[k] for k in shown},
        "samples_per_sec": mean("train/samples_per_sec"),
        # every sample of this attempt over its whole time (start-up, validation and saves included)
        "samples_per_sec_wall": monitor.trained_samples * trainer.world_size / seconds
        if seconds > 0
        else None,
        "log_every_n_steps": monitor.log_every_n_steps,
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
        "sharding": trainer.strategy.report if isinstance(trainer.strategy, ShardingReport) else None,
        # all GPUs, to the last logged row (only where the devices report power: NVIDIA GPUs)
        **monitor.energy_summary(),
    }


def print_summary(s: dict) -> None:
    """The closing summary. Each throughput figure says what it is over; what was not measured (a run shorter
    than one log interval) is said so, and only files that exist are named."""

    def num(value: float, fmt: str) -> str:
        return format(value, fmt)

    if s["samples_per_sec"] is not None:
        speed = f"  throughput {num(s['samples_per_sec'], ',.0f')} samples/s in steps"
        if s["tokens_per_sec"] is not None:
            speed += f" ({num(s['tokens_per_sec'], ',.0f')} tokens/s)"
    else:
        speed = f"  throughput in steps not measured (fewer steps than one log interval, {s['log_every_n_steps']})"
    if s.get("samples_per_sec_wall") is not None:
        speed += f"; {num(s['samples_per_sec_wall'], ',.0f')} samples/s over the wall time"
    extra = []
    if s["mfu"] is not None:
        extra.append(f"MFU {s['mfu'] * 100:.1f}% (peak: {s['peak_source']})")
    if s["data_wait_frac"] is not None:
        extra.append(f"data wait {s['data_wait_frac'] * 100:.1f}%")
    train_loss = "n/a" if s["train_loss"] is None else num(s["train_loss"], ".4f")
    lines = [
        f"finished {s['steps']} steps on {s['world_size']} process(es) in {s['wall_time_s']:.1f} s",
        f"  train loss {train_loss}"
        + "".join(f"   {k} {num(v, '.4f')}" for k, v in s["validation"].items())
        + ("" if s["validation"] else "   no validation metric"),
        speed,
    ]
    if extra:
        lines.append("  " + "   ".join(extra))
    if s.get("energy_wh") is not None:
        per = s.get("energy_wh_per_million_tokens")
        lines.append(f"  energy      {s['energy_wh']:,.2f} Wh (all GPUs, to the last logged step)"
                     + (f"   {per:,.3f} Wh per million tokens" if per is not None else ""))  # fmt: skip
    lines.append(f"  run dir     {s['run_dir']}")
    for label, key in (("metrics", "metrics"), ("checkpoint", "checkpoint")):
        if os.path.exists(s[key]):
            lines.append(f"  {label:<11} {s[key]}")
    if s.get("wandb"):
        lines.append(f"  {'wandb':<11} {s['wandb']}")
    print("\n".join(lines), flush=True)
