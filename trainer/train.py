"""``trainer train``: compose the config with Hydra, check it, then train here or start local workers.

Order matters: the config is typed and checked, and the run directory's state is read, before any process
is spawned or any file written. Hydra itself writes nothing (see ``hydra:`` in conf/train.yaml). torch and
Lightning are imported only once training starts, so ``--help`` and ``--cfg`` stay fast.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from trainer.config import schema
from trainer.config.errors import EXIT_CONFIG, describe, report

log = logging.getLogger("trainer")


def conf_dir() -> str:
    """conf/ beside the package in a checkout (editable install), or the copy inside an installed wheel."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "conf", here / "_conf"):
        if (candidate / "train.yaml").is_file():
            return str(candidate)
    raise FileNotFoundError(f"no train.yaml in {here.parent / 'conf'} or {here / '_conf'}")


def env_rank() -> int:
    """This process's global rank as set by a launcher (torchrun, srun); 0 when there is none."""
    for var in ("RANK", "SLURM_PROCID"):
        if var in os.environ:
            return int(os.environ[var])
    return 0


_ARGV: list[str] = []


class _Abort(BaseException):
    """Ends ``trainer train`` (a whole sweep included) with a message and an exit code.

    A BaseException, so Hydra's job runner lets it through untouched instead of reporting it as a crash.
    """

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.message, self.code = message, code


def quote_numeric_choices(args: list[str]) -> list[str]:
    """``precision=32`` selects the file ``precision/32.yaml``; Hydra would parse 32 as a number and refuse it."""
    groups = [p.name for p in Path(conf_dir()).iterdir() if p.is_dir()]

    def numeric(text: str) -> bool:
        return text.lstrip("-").replace(".", "", 1).isdigit()

    out = []
    for arg in args:
        key, sep, value = arg.partition("=")
        if sep and key.lstrip("+~") in groups and "(" not in value:
            # a single choice, or a sweep list of them (precision=32,bf16-mixed)
            arg = f"{key}=" + ",".join(f"'{v}'" if numeric(v) else v for v in value.split(","))
        out.append(arg)
    return out


def cli_main(args: list[str]) -> int:
    if "-m" in args or "--multirun" in args:  # a sweep: our own runner, one process per trial
        from trainer.sweep.local import main as sweep_main

        return sweep_main(args)
    args = quote_numeric_choices(args)
    _ARGV[:] = args
    # Let exceptions reach us whole, so bad configs become one line and exit 2 (Hydra would print a
    # multi-line report and exit 1).
    os.environ["HYDRA_FULL_ERROR"] = "1"
    sys.argv = [sys.argv[0], *args]
    try:
        _hydra_main()
    except SystemExit as exit_:  # Hydra's --help and --info end with sys.exit
        return exit_.code if isinstance(exit_.code, int) else 0
    except _Abort as abort:
        if abort.message:
            print(abort.message, file=sys.stderr)
        return abort.code
    except Exception as exc:
        return report(exc)
    return 0


schema.register()


@hydra.main(version_base="1.3", config_path=conf_dir(), config_name="train")
def _hydra_main(cfg: DictConfig) -> None:
    run(cfg)


@dataclasses.dataclass
class Prepared:
    """A checked run: its typed config, where it lives and what it does with its directory."""

    conf: schema.TrainConfig
    resolved: dict
    accelerator: str
    paths: Any
    plan: Any
    overrides: list[str]


def prepare(cfg: DictConfig) -> Prepared:
    """Every check that can fail on bad input; writes nothing, starts nothing."""
    from hydra.core.hydra_config import HydraConfig

    from trainer import rundir
    from trainer.config.validate import check, check_checkpoint_format, check_components, to_typed
    from trainer.launch.local import PLAN_ENV

    hydra_cfg = HydraConfig.get()
    check_components(cfg, hydra_cfg.runtime.choices)
    conf = to_typed(cfg)
    accelerator = check(conf)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    paths = rundir.resolve_paths(resolved, hydra_cfg.runtime.choices.get("experiment"))
    if PLAN_ENV in os.environ:  # a worker started by our own launcher: it already decided
        plan = rundir.Plan(**json.loads(os.environ[PLAN_ENV]))
    else:
        plan = rundir.plan(
            paths, resolved, conf.resume, rank_zero=env_rank() == 0,
            allow_config_change=conf.checkpoint.allow_config_change,
        )  # fmt: skip
    check_checkpoint_format(plan.checkpoint, conf.strategy.name)
    # The run's identity is passed on spelled out (see run), so it is not part of the recorded overrides.
    overrides = [
        o for o in hydra_cfg.overrides.task if o.split("=", 1)[0].lstrip("+~") not in ("run.name", "run.dir")
    ]
    return Prepared(conf, resolved, accelerator, paths, plan, overrides)


def run(cfg: DictConfig) -> None:
    """One training run (one trial of a sweep): check, then train here or start the local workers."""
    from trainer import rundir
    from trainer.config.validate import launched_externally
    from trainer.launch.local import WorkersFailed, config_source_args, quote, run_workers

    rank = env_rank()
    if rank != 0:
        logging.getLogger().setLevel(logging.WARNING)
    try:
        p = prepare(cfg)
    except Exception as exc:
        line = describe(exc)
        if line is None:
            raise
        raise _Abort(f"error: {line}", EXIT_CONFIG) from None

    if rank == 0:
        for note in p.plan.notes:
            log.warning("%s", note)
    if p.plan.action == "done":
        if rank == 0:
            state = rundir.read_json(p.paths.state) or {}
            log.info("run %s already finished (%s); nothing to do. A new run needs another config or run.name.",
                     p.paths.name, p.paths.dir)  # fmt: skip
            if state.get("summary"):
                log.info("summary: %s", json.dumps(state["summary"]))
        return

    if p.conf.trainer.devices > 1 and not launched_externally():
        log.info(
            "starting %d workers (%s) for run %s", p.conf.trainer.devices, p.conf.strategy.name, p.paths.dir
        )
        # The workers get the run's identity spelled out, so they cannot disagree about the directory.
        pinned = [f"run.name={quote(p.paths.name)}", f"run.dir={quote(str(p.paths.dir))}"]
        args = config_source_args(_ARGV) + p.overrides + pinned
        try:
            code = run_workers(args, p.conf.trainer.devices, dataclasses.asdict(p.plan))
        except WorkersFailed as err:
            raise _Abort(f"error: {err}", err.returncode) from None
        if code:
            raise _Abort("", code)  # the workers said why
        return

    from trainer.fit import RunStopped, fit

    try:
        fit(p.conf, p.resolved, p.paths, p.plan, p.overrides, p.accelerator)
    except RunStopped as stop:
        raise _Abort(stop.message if rank == 0 else "", stop.code) from None


if __name__ == "__main__":
    sys.exit(cli_main(sys.argv[1:]))
