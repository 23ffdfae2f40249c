"""``trainer train``: compose the config with Hydra, check it, then train here or start local workers.

Order matters: the config is typed and checked, and the run directory's state is read, before any process
is spawned or any file written (``trainer.config.compose``). Hydra itself writes nothing (see ``hydra:`` in
conf/train.yaml). torch and Lightning are imported only once training starts, so ``--help`` and ``--cfg``
stay fast. A sweep (``-m``) never comes here: ``trainer.cli`` sends it to ``trainer.sweep.local``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys

import hydra
from omegaconf import DictConfig

from trainer import exits
from trainer.config import compose, schema
from trainer.config.errors import describe, report
from trainer.files import read_json

log = logging.getLogger("trainer")


class _Abort(BaseException):
    """Ends ``trainer train`` with a message and an exit code.

    A BaseException, so Hydra's job runner lets it through untouched instead of reporting it as a crash.
    """

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.message, self.code = message, code


def cli_main(args: list[str]) -> int:
    # Let exceptions reach us whole, so bad configs become one line and exit 2 (Hydra would print a
    # multi-line report and exit 1).
    os.environ["HYDRA_FULL_ERROR"] = "1"
    # hydra.main reads its flags and overrides from sys.argv.
    sys.argv = [sys.argv[0], *compose.normalize(args)]
    schema.register()
    main = hydra.main(version_base="1.3", config_path=compose.conf_dir(), config_name="train")(run)
    try:
        main()
    except SystemExit as exit_:  # Hydra's --help and --info end with sys.exit
        return exit_.code if isinstance(exit_.code, int) else exits.OK
    except _Abort as abort:
        if abort.message:
            print(abort.message, file=sys.stderr)
        return abort.code
    except Exception as exc:
        return report(exc)
    return exits.OK


def run(cfg: DictConfig) -> None:
    """One training run: check, then train here or start the local workers."""
    from hydra.core.hydra_config import HydraConfig

    from trainer.config.validate import launched_externally

    rank = compose.env_rank()
    if rank != 0:
        logging.getLogger().setLevel(logging.WARNING)
    hydra_cfg = HydraConfig.get()
    try:
        c = compose.check(cfg, hydra_cfg, where="local")
    except Exception as exc:
        line = describe(exc)
        if line is None:
            raise
        raise _Abort(f"error: {line}", exits.CONFIG) from None

    if rank == 0:
        for note in c.plan.notes:
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


def start_workers(c: compose.Composed, config_source: list[str]) -> None:
    """One worker process per device; they get the run's identity spelled out, so they cannot disagree
    about the directory, and the plan made here, so they cannot disagree about resuming."""
    from trainer.launch.local import WorkersFailed, quote, run_workers

    log.info("starting %d workers (%s) for run %s", c.conf.trainer.devices, c.conf.strategy.name, c.paths.dir)
    pinned = [f"run.name={quote(c.paths.name)}", f"run.dir={quote(str(c.paths.dir))}"]
    args = config_source + c.own_overrides + pinned
    try:
        code = run_workers(args, c.conf.trainer.devices, dataclasses.asdict(c.plan))
    except WorkersFailed as err:
        raise _Abort(f"error: {err}", err.returncode) from None
    if code:
        raise _Abort("", code)  # the workers said why


if __name__ == "__main__":
    sys.exit(cli_main(sys.argv[1:]))
