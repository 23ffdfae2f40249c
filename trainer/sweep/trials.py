"""A sweep's trials: expanded from the search space, each composed and checked (``trainer.config.compose``)
before any runs, and each trial's ``trainer train`` command line with its identity pinned.

Shared by ``trainer submit`` and the local sweep runner. Imports no torch for the cluster checks; the local
checks import it (they ask this machine's devices).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from pathlib import Path

from trainer import rundir
from trainer.config import schema
from trainer.config.compose import Composed, Composer, compose
from trainer.config.errors import ConfigError
from trainer.launch.local import quote
from trainer.sweep.space import Space, corner_trials, grid, parse, sample


def sweep_name(label: str, overrides: list[str]) -> str:
    """Stable for the same sweep command, so running or submitting it again finds the same sweep directory.
    Parallelism, the cluster and Hydra's own settings do not change which trials a sweep has."""

    def counts(override: str) -> bool:
        key = override.lstrip("+~").split("=", 1)[0]
        return key != "sweep.parallel" and key.split(".")[0] not in ("cluster", "hydra")

    digest = hashlib.sha256(json.dumps([o for o in overrides if counts(o)]).encode()).hexdigest()[:8]
    return f"sweep-{label}-{digest}"


def pinned_args(c: Composed, config_dir: str | None, extra: list[str]) -> list[str]:
    """A trial's ``trainer train`` arguments: config dir, the trial's overrides, and its identity spelled
    out, so every task and every later attempt agrees on the run directory."""
    flags = ["--config-dir", os.path.abspath(config_dir)] if config_dir else []
    own = [o for o in c.own_overrides if o.split("=", 1)[0].lstrip("+~") != "run.root"]
    return flags + own + extra + [f"run.name={plain(c.paths.name)}", f"run.dir={plain(str(c.paths.dir))}"]


def plain(value: str) -> str:
    """A Hydra override value taken literally: as is when it is a plain word or path, else quoted."""
    return value if re.fullmatch(r"[A-Za-z_/][A-Za-z0-9_./-]*", value) else quote(value)


class TrialError(ConfigError):
    """A config error in one trial of a sweep: the line names the trial and its values."""

    def __init__(self, index: int, own: list[str], line: str) -> None:
        self.index, self.own, self.text = index, own, line
        super().__init__("trial", index, line)

    def line(self) -> str:
        return f"trial {self.index} ({' '.join(self.own) or 'no swept values'}): {self.text}"


@dataclasses.dataclass
class SweepPlan:
    """A sweep's trials, every one composed and checked, before any of them runs."""

    name: str
    dir: Path
    settings: schema.SweepConfig
    space: Space
    trials: list[list[str]]
    """Each trial's overrides (the fixed ones and its own values)."""
    composed: list[Composed]

    def own(self, i: int) -> list[str]:
        """Trial ``i``'s swept values as overrides (what tells the trials apart)."""
        keys = {p.key for p in self.space.params}
        return [o for o in self.trials[i] if o.split("=", 1)[0] in keys]


def plan_sweep(overrides: list[str], config_dir: str | None, where: str) -> SweepPlan:
    """Expand ``-m`` overrides into trials (grid, or random samples; for Optuna only the edges of the space,
    as a fail-fast check) and compose every one. Any trial that fails its checks fails the whole sweep, with
    the trial's values in the message."""
    from trainer.config.errors import describe

    space = parse(overrides)
    probe = corner_trials(space) if space.params else [overrides]
    first = compose(probe[0], config_dir, where=where)
    settings = first.conf.sweep
    if first.resolved["run"].get("dir"):
        raise ConfigError(
            "run.dir", first.resolved["run"]["dir"], "unset in a sweep (each trial gets its own)"
        )
    name = settings.name or sweep_name(rundir.label(first.resolved, first.experiment), overrides)
    sweep_dir = Path(os.path.abspath(Path(first.resolved["run"]["root"]) / name))
    if settings.kind == "grid":
        trials = grid(space)
    elif settings.num_trials is None:
        raise ConfigError("sweep.num_trials", None, f"a number of trials for sweep.kind={settings.kind}")
    elif settings.kind == "random":
        trials = sample(space, settings.num_trials, settings.seed)
    else:
        trials = probe
    plan = SweepPlan(name, sweep_dir, settings, space, trials, [])
    composer = Composer(config_dir)  # Hydra composes each distinct set of group choices once
    for i, trial in enumerate(trials):
        try:
            plan.composed.append(composer(trial, where=where, run_root=sweep_dir))
        except Exception as exc:
            line = describe(exc)
            if line is None:
                raise
            raise TrialError(i, plan.own(i), line) from None
    if settings.kind != "optuna":
        first: dict[Path, int] = {}
        for i, c in enumerate(plan.composed):
            d = c.paths.dir
            if d in first:
                raise TrialError(i, plan.own(i), f"the same run as trial {first[d]} ({d}); every trial needs "
                                 "its own config (drop run.name from a sweep)")  # fmt: skip
            first[d] = i
    return plan


def single(overrides: list[str]) -> None:
    """Refuse sweep syntax without ``-m``."""
    for p in parse(overrides).params:
        raise ConfigError(p.key, p.raw, "one value (add -m for a sweep)")
