"""``trainer train``: compose the config with Hydra, check it, then train here or start local workers.

Order matters: the config is typed and checked, and the run directory's state is read, before any process
is spawned or any file written (``trainer.config.compose``). Hydra itself writes nothing (see ``hydra:`` in
conf/train.yaml). torch and Lightning are imported only once training starts, so ``--help`` and ``--cfg``
stay fast. A sweep (``-m``) never comes here: ``trainer.cli`` sends it to ``trainer.sweep.local``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path

import hydra
import yaml
from omegaconf import DictConfig

from trainer import exits, rundir, runlock
from trainer.checkpoint.manifest import sweep_debris
from trainer.config import compose, schema
from trainer.config.errors import ConfigError, report
from trainer.files import read_json

log = logging.getLogger("trainer")


class _Abort(BaseException):
    """Ends ``trainer train`` with a message and an exit code.

    A BaseException, so Hydra's job runner lets it through untouched instead of reporting it as a crash.
    """

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.message, self.code = message, code


class _Raised(BaseException):
    """Carries an exception of the run past Hydra's job runner, which would print "Error executing job with
    overrides: [...]" (every override, secrets included, on the console and in W&B's copy of it)."""

    def __init__(self, exc: Exception) -> None:
        super().__init__(str(exc))
        self.exc = exc


def cli_main(args: list[str]) -> int:
    # Let exceptions reach us whole, so bad configs become one line and exit 2 (Hydra would print a
    # multi-line report and exit 1).
    os.environ["HYDRA_FULL_ERROR"] = "1"
    # hydra.main reads its flags and overrides from sys.argv.
    sys.argv = [sys.argv[0], *compose.normalize(args)]
    schema.register()
    main = hydra.main(version_base="1.3", config_path=compose.conf_dir(), config_name="train")(run)
    try:
        if "--help" in args or "-h" in args:
            return _help(main)
        return _main(main)
    finally:
        runlock.release()


def _help(main: Callable[[], None]) -> int:
    """Hydra's --help, without the typed ``*_schema`` entries among the group options: the YAML files build on
    them, they are not options (``model=gpt_schema`` is refused)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = _main(main)
    print(re.sub(r", \w+_schema(?=,|$)", "", out.getvalue(), flags=re.MULTILINE), end="")
    return code


def _main(main: Callable[[], None]) -> int:
    escaped: Exception | None = None
    try:
        main()
    except SystemExit as exit_:  # Hydra's --help and --info end with sys.exit
        return exit_.code if isinstance(exit_.code, int) else exits.OK
    except _Abort as abort:
        if abort.message:
            print(abort.message, file=sys.stderr)
        return abort.code
    except _Raised as raised:
        escaped = raised.exc  # re-raised below, outside this handler, so its traceback is only its own
    except Exception as exc:
        escaped = exc
    if isinstance(escaped, (UnicodeDecodeError, yaml.YAMLError)):  # Hydra read a file that is not YAML
        line = compose.unreadable_config(sys.argv[1:], escaped)
        if line is not None:
            print(f"error: {line}", file=sys.stderr)
            return exits.CONFIG
    if escaped is not None:
        return report(escaped)  # one line for bad input; anything else propagates with its traceback
    return exits.OK


def run(cfg: DictConfig) -> None:
    try:
        _run(cfg)
    except Exception as exc:
        raise _Raised(exc) from None


def _run(cfg: DictConfig) -> None:
    """One training run: check, take the run directory, then train here or start the local workers."""
    from hydra.core.hydra_config import HydraConfig

    from trainer.config.validate import launched_externally

    rank = compose.env_rank()
    if rank != 0:
        logging.getLogger().setLevel(logging.WARNING)
    hydra_cfg = HydraConfig.get()
    # Bad input raises a ConfigError here: `run` carries it to cli_main, which says it in one line (exit 2).
    c = compose.check(cfg, hydra_cfg, where="local")
    if c.plan.action != "done" and rank == 0 and compose.PLAN_ENV not in os.environ:
        # One writer per run directory; what is on disk is read again once it is ours.
        runlock.acquire(c.paths.dir, warn=log.warning)
        c = compose.replan(c)
        _check_checkpoint_is_safe(c)
        removed = sweep_debris(c.paths.checkpoints)  # safe: no save of this run can be going on
        if removed:
            log.info("removed %d leftover(s) of interrupted saves from %s", len(removed), c.paths.checkpoints)

    if rank == 0:
        for note in (*c.notes, *c.plan.notes):
            log.warning("%s", note)
    if c.plan.action == "done":
        if rank == 0:
            state = read_json(c.paths.state) or {}
            log.info("run %s already finished (%s); nothing to do. A new run needs another config or run.name.",
                     c.paths.name, c.paths.dir)  # fmt: skip
            if state.get("summary"):
                log.info("summary: %s", json.dumps(state["summary"]))
        return

    if c.conf.trainer.devices > 1 and not launched_externally():
        start_workers(c, compose.config_source_args(hydra_cfg))
        return

    from trainer import namespace

    namespace.select(
        c.namespace or namespace.DEFAULT
    )  # before the first of our Lightning classes is imported
    from trainer.fit import RunStopped, fit

    try:
        fit(c)
    except RunStopped as stop:
        raise _Abort(stop.message if rank == 0 else "", stop.code) from None
    except OSError as err:
        if err.errno not in rundir.FILE_SYSTEM_ERRORS:
            raise
        # The disk, not the code: one line (fit has recorded it in run.json where it could).
        raise _Abort(f"error: {rundir.describe_os_error(err)}", exits.FAILED) from None


def _check_checkpoint_is_safe(c: compose.Composed) -> None:
    """The checkpoint to continue from names no code to run: read here (weights-only, its tensors mapped
    rather than read; for a sharded one its ``.metadata``) before anything is written or any worker started."""
    if not c.plan.checkpoint:
        return
    from trainer import namespace

    namespace.select(c.namespace or namespace.DEFAULT)  # trainer.checkpoint.io is Lightning code of ours
    from trainer.checkpoint.io import UnsafeCheckpoint, load_file, read_dcp_metadata

    path = Path(c.plan.checkpoint)
    try:
        if path.is_dir():
            read_dcp_metadata(path / ".metadata")
        else:
            load_file(path, mmap=True, map_location="cpu")
    except UnsafeCheckpoint as err:
        raise ConfigError(
            "resume", c.plan.checkpoint, f"a checkpoint that runs no code when loaded ({err})"
        ) from None


def start_workers(c: compose.Composed, config_source: list[str]) -> None:
    """One worker process per device; they get the run's identity spelled out, so they cannot disagree
    about the directory, and the plan made here, so they cannot disagree about resuming. They share this
    process's lock of the run directory."""
    from trainer.launch.local import WorkersFailed, quote, run_workers

    log.info("starting %d workers (%s) for run %s", c.conf.trainer.devices, c.conf.strategy.name, c.paths.dir)
    pinned = [f"run.name={quote(c.paths.name)}", f"run.dir={quote(str(c.paths.dir))}"]
    args = config_source + c.own_overrides + pinned
    try:
        code = run_workers(
            args, c.conf.trainer.devices, dataclasses.asdict(c.plan), c.paths.logs, runlock.held
        )
    except WorkersFailed as err:
        rundir.record_failure(c.paths, str(err))
        raise _Abort(f"error: {err}", err.returncode) from None
    if code:
        raise _Abort("", code)  # the workers said why


if __name__ == "__main__":
    sys.exit(cli_main(sys.argv[1:]))
