"""Compose a run's config and check it: the one way in for ``trainer train``, ``trainer submit`` and sweeps.

``check`` takes a config Hydra composed (by ``hydra.main`` for ``trainer train``, or by ``compose`` below for
submit and sweeps) and returns a ``Composed`` run: its typed slices, its resolved config, its directory and
what the run will do there. Everything that can fail on bad input fails here, as one ``ConfigError`` line,
before any process is spawned or any file written. Importing this module does nothing (no registration, no
torch, no Lightning); checking a config imports only the user's own classes (their signatures and their
Lightning namespace are read from them).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from trainer import rundir
from trainer.config import schema

PLAN_ENV = "TRAINER_PLAN"
"""Set by the local launcher for the workers it starts: its decision about the run directory (fresh or
resume), so that the workers cannot decide differently."""


def conf_dir() -> str:
    """conf/ beside the package in a checkout (editable install), or the copy inside an installed wheel."""
    here = Path(__file__).resolve().parent.parent
    for candidate in (here.parent / "conf", here / "_conf"):
        if (candidate / "train.yaml").is_file():
            return str(candidate)
    raise FileNotFoundError(f"no train.yaml in {here.parent / 'conf'} or {here / '_conf'}")


def config_groups() -> list[str]:
    return [p.name for p in Path(conf_dir()).iterdir() if p.is_dir()]


def quote_numeric_choices(args: list[str]) -> list[str]:
    """``precision=32`` selects the file ``precision/32.yaml``; Hydra would parse 32 as a number and refuse it."""
    groups = config_groups()

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


def normalize(args: list[str]) -> list[str]:
    """The command line's overrides as Hydra must see them: numeric group choices quoted, and the default
    preset left out when the user picks another model or data without a preset (conf/train.yaml)."""
    args = quote_numeric_choices(args)
    keys = [a.split("=", 1)[0].lstrip("+~") for a in args if "=" in a]
    if "experiment" not in keys and any(k in ("model", "data") for k in keys):
        args = [*args, "~experiment"]
    return args


def env_rank() -> int:
    """This process's global rank as set by a launcher (torchrun, srun, ours); 0 when there is none."""
    for var in ("RANK", "SLURM_PROCID"):
        if var in os.environ:
            return int(os.environ[var])
    return 0


def config_source_args(hydra_node: Any) -> list[str]:
    """The flags that chose where this config came from (``--config-dir``, ``--config-path``,
    ``--config-name``), for processes that must compose it again the same way (local workers)."""
    out: list[str] = []
    for source in hydra_node.runtime.config_sources:
        if source.provider == "command-line" and source.schema == "file":
            out += ["--config-dir", source.path]
        elif source.provider == "main" and source.schema == "file" and source.path != conf_dir():
            out += ["--config-path", source.path]
    if hydra_node.job.config_name != "train":
        out += ["--config-name", hydra_node.job.config_name]
    return out


@contextlib.contextmanager
def session() -> Iterator[None]:
    """Hydra's compose API over this project's conf/ (with its schema registered), for ``compose``."""
    from hydra import initialize_config_dir

    schema.register()
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        yield


@dataclasses.dataclass
class Composed:
    """A checked run: its typed config, where it lives and what it does with its directory."""

    conf: schema.TrainConfig
    resolved: dict
    """The resolved config as plain containers (what config.yaml holds)."""
    paths: rundir.RunPaths
    plan: rundir.Plan
    overrides: list[str]
    """The command-line overrides Hydra applied (the task overrides)."""
    experiment: str | None
    accelerator: str
    """What the run trains on (``cpu``/``gpu``/``mps``): for a cluster, its nodes'; else this machine's."""
    namespace: str | None = None
    """The Lightning namespace of the user's classes (``trainer.namespace``); None: built-in classes only."""
    trainer_flags: dict = dataclasses.field(default_factory=dict)
    """Lightning Trainer flags beyond the schema's, checked against Lightning's ``Trainer``."""
    model_gets: dict = dataclasses.field(default_factory=dict)
    """Whether the model is given the run's ``optimizer`` and ``scheduler`` (``trainer.config.targets``)."""

    @property
    def own_overrides(self) -> list[str]:
        """The overrides without the run's identity, which the processes a run starts get spelled out (and
        which is not part of what the user asked for: overrides.yaml records these)."""
        return [o for o in self.overrides if _key(o) not in ("run.name", "run.dir")]


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def compose(
    overrides: list[str],
    config_dir: str | None = None,
    *,
    where: str = "cluster",
    run_root: Path | None = None,
) -> Composed:
    """Inside ``session()``: compose ``train`` with ``overrides`` (and the user's ``config_dir``), then
    ``check`` it for a cluster's nodes (``where="cluster"``) or for this machine (``"local"``)."""
    from hydra import compose as hydra_compose

    extra = [f"hydra.searchpath=[file://{os.path.abspath(config_dir)}]"] if config_dir else []
    cfg = hydra_compose("train", overrides=overrides + extra, return_hydra_config=True)
    hydra_node = cfg.hydra
    with open_dict(cfg):
        del cfg["hydra"]
    return check(cfg, hydra_node, where=where, run_root=run_root, absolute=True)


def check(
    cfg: DictConfig,
    hydra_node: Any,
    *,
    where: str = "local",
    run_root: Path | None = None,
    absolute: bool = False,
) -> Composed:
    """Every check that can fail on bad input; writes nothing, starts nothing.

    ``hydra_node`` is Hydra's own part of the config (``HydraConfig.get()`` or ``cfg.hydra``): the group
    choices and the command-line overrides. ``run_root`` puts the run under another folder (a sweep's).
    """
    from trainer import namespace
    from trainer.config import targets
    from trainer.config.validate import (
        check_checkpoint_format,
        check_components,
        check_for_cluster,
        check_here,
        to_typed,
    )

    choices, task = hydra_node.runtime.choices, list(hydra_node.overrides.task)
    if run_root is not None:
        with open_dict(cfg):
            cfg.run.root = str(run_root)
    check_components(cfg, choices)
    run_namespace = targets.lightning_namespace(cfg)
    targets.translate_lightning_targets(cfg, run_namespace or namespace.DEFAULT)
    targets.check_signatures(cfg)
    model_gets = targets.wire_optimizer(cfg, task)
    conf, trainer_flags = to_typed(cfg)
    if conf.sweep.direction is None:  # the objective's direction follows the checkpoint metric's mode
        conf.sweep.direction = "maximize" if conf.checkpoint.mode == "max" else "minimize"
        cfg.sweep.direction = conf.sweep.direction
    accelerator = check_for_cluster(conf) if where == "cluster" else check_here(conf)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    experiment = choices.get("experiment")
    paths = rundir.resolve_paths(resolved, experiment)
    if absolute:
        paths = rundir.RunPaths(paths.name, Path(os.path.abspath(paths.dir)))
    if PLAN_ENV in os.environ:  # a worker started by our own launcher: it already decided
        plan = rundir.Plan(**json.loads(os.environ[PLAN_ENV]))
    else:
        plan = rundir.plan(
            paths, resolved, conf.resume, rank_zero=env_rank() == 0,
            allow_config_change=conf.checkpoint.allow_config_change,
        )  # fmt: skip
    check_checkpoint_format(plan.checkpoint, conf.strategy.name)
    return Composed(conf, resolved, paths, plan, task, experiment, accelerator, run_namespace, trainer_flags,
                    model_gets)  # fmt: skip
