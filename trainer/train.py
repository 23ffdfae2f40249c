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

import hydra
from omegaconf import DictConfig, OmegaConf

from trainer.config import schema
from trainer.config.errors import EXIT_CONFIG, describe

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


def cli_main(args: list[str]) -> int:
    _ARGV[:] = args
    # Let exceptions reach us whole, so bad configs become one line and exit 2 (Hydra would print a
    # multi-line report and exit 1).
    os.environ["HYDRA_FULL_ERROR"] = "1"
    sys.argv = [sys.argv[0], *args]
    from trainer.launch.local import WorkersFailed

    try:
        _hydra_main()
    except WorkersFailed as err:
        print(f"error: {err}", file=sys.stderr)
        return err.returncode
    except Exception as exc:
        line = describe(exc)
        if line is None:
            raise
        print(f"error: {line}", file=sys.stderr)
        return EXIT_CONFIG
    return 0


schema.register()


@hydra.main(version_base="1.3", config_path=conf_dir(), config_name="train")
def _hydra_main(cfg: DictConfig) -> None:
    run(cfg)


def run(cfg: DictConfig) -> None:
    """One training run (one trial of a sweep)."""
    from hydra.core.hydra_config import HydraConfig

    from trainer import rundir
    from trainer.config.validate import check, launched_externally, to_typed
    from trainer.launch.local import PLAN_ENV, config_source_args, quote, run_workers

    rank = env_rank()
    if rank != 0:
        logging.getLogger().setLevel(logging.WARNING)
    hydra_cfg = HydraConfig.get()
    conf = to_typed(cfg)
    accelerator = check(conf)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    paths = rundir.resolve_paths(resolved, hydra_cfg.runtime.choices.get("experiment"))
    if PLAN_ENV in os.environ:  # a worker started by our own launcher: it already decided
        plan = rundir.Plan(**json.loads(os.environ[PLAN_ENV]))
    else:
        plan = rundir.plan(paths, resolved, conf.resume, rank_zero=rank == 0)

    if plan.action == "done":
        if rank == 0:
            state = rundir.read_json(paths.state) or {}
            log.info("run %s already finished (%s); nothing to do. A new run needs another config or run.name.",
                     paths.name, paths.dir)  # fmt: skip
            if state.get("summary"):
                log.info("summary: %s", json.dumps(state["summary"]))
        return

    # The workers get the run's identity spelled out, so they cannot disagree about the directory.
    overrides = [o for o in hydra_cfg.overrides.task if o.split("=", 1)[0].lstrip("+~") not in ("run.name", "run.dir")]
    if conf.trainer.devices > 1 and not launched_externally():
        log.info("starting %d workers (%s) for run %s", conf.trainer.devices, conf.strategy.name, paths.dir)
        pinned = [f"run.name={quote(paths.name)}", f"run.dir={quote(str(paths.dir))}"]
        run_workers(config_source_args(_ARGV) + overrides + pinned, conf.trainer.devices, dataclasses.asdict(plan))
        return

    from trainer.fit import fit

    fit(conf, resolved, paths, plan, overrides, accelerator)


if __name__ == "__main__":
    sys.exit(cli_main(sys.argv[1:]))
