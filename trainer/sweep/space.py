"""A sweep's search space, read with Hydra's own override grammar.

``a=1,2`` and ``a=choice(1,2)`` are categorical, ``a=range(1,5)`` an integer range, ``a=interval(0.1,1)`` a
float interval (``tag(log, interval(1e-4,1e-2))`` on a log scale). A grid sweep takes every combination
(Hydra's BasicSweeper does the expansion, so ``-m`` means what Hydra users expect); a random sweep samples
``num_trials`` of them with a seed; Optuna samples them with its own sampler. Imports no torch.
"""

from __future__ import annotations

import dataclasses
import math
import random
from typing import Any

from trainer.config.errors import ConfigError


@dataclasses.dataclass
class Param:
    """One swept key."""

    key: str
    """The override's key as written, with any ``+``/``++`` prefix."""
    kind: str
    """``choice``, ``range`` (integers) or ``interval`` (floats)."""
    choices: list[Any] = dataclasses.field(default_factory=list)
    low: float = 0.0
    high: float = 0.0
    step: float = 1.0
    log: bool = False
    raw: str = ""
    """The value as written (for messages)."""

    @property
    def name(self) -> str:
        return self.key.lstrip("+~")

    def values(self) -> list[Any]:
        """Every value of a discrete parameter (``choice`` or ``range``)."""
        return list(self.choices) if self.kind == "choice" else list(_frange(self.low, self.high, self.step))

    def sample(self, rng: random.Random) -> Any:
        if self.kind in ("choice", "range"):
            return rng.choice(self.values())
        if self.log:
            return math.exp(rng.uniform(math.log(self.low), math.log(self.high)))
        return rng.uniform(self.low, self.high)

    def corners(self) -> list[Any]:
        """The values at the edges of the space (what a fail-fast check composes)."""
        if self.kind == "choice":
            return list(self.choices)
        if self.kind == "range":
            values = self.values()
            return [values[0], values[-1]]
        return [self.low, self.high]


@dataclasses.dataclass
class Space:
    fixed: list[str]
    """Overrides that are the same in every trial."""
    params: list[Param]
    overrides: list[str]
    """The sweep's overrides as given (for Hydra's grid expansion)."""

    def override(self, param: Param, value: Any) -> str:
        return f"{param.key}={format_value(value)}"

    def trial(self, values: dict[str, Any]) -> list[str]:
        return self.fixed + [self.override(p, values[p.name]) for p in self.params]


def _frange(start: float, stop: float, step: float):
    value = start
    while (step > 0 and value < stop) or (step < 0 and value > stop):
        yield value
        value += step


def format_value(value: Any) -> str:
    """A Python value as a Hydra override value that parses back to the same value."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(format_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{format_value(v)}" for k, v in value.items()) + "}"
    text = str(value)
    if all(ch.isalnum() or ch in "_./-" for ch in text) and text and not text[0].isdigit():
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def parse(overrides: list[str]) -> Space:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    fixed, params = [], []
    for o in OverridesParser.create().parse_overrides(overrides):
        if not o.is_sweep_override():
            fixed.append(o.input_line)
            continue
        value = o.value()
        key = o.get_key_element()
        raw = o.input_line.split("=", 1)[1]
        if o.is_choice_sweep():
            # a quoted element ('32') is a QuotedString: keep its text
            choices = [getattr(c, "text", c) if type(c).__name__ == "QuotedString" else c for c in value.list]
            params.append(Param(key, "choice", choices=choices, raw=raw))
        elif o.is_range_sweep():
            if value.step <= 0 or not list(_frange(value.start, value.stop, value.step)):
                raise ConfigError(key, raw, "a range() with a positive step and at least one value")
            params.append(Param(key, "range", low=value.start, high=value.stop, step=value.step, raw=raw))
        elif o.is_interval_sweep():
            if "log" in value.tags and value.start <= 0:
                raise ConfigError(key, raw, "a log interval with a low end > 0")
            params.append(
                Param(key, "interval", low=value.start, high=value.end, log="log" in value.tags, raw=raw)
            )
        else:
            raise ConfigError(
                key, o.input_line.split("=", 1)[1], "a list a,b, choice(), range() or interval()"
            )
    return Space(fixed, params, overrides)


def grid(space: Space) -> list[list[str]]:
    """Every combination, in Hydra's order (the last key varies fastest)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    for p in space.params:
        if p.kind == "interval":
            raise ConfigError(p.key, p.raw, "a list or range() in a grid sweep "
                              "(intervals need sweep.kind=random or optuna)")  # fmt: skip
    parsed = OverridesParser.create().parse_overrides(space.overrides)
    return [list(t) for t in BasicSweeper.split_arguments(parsed, None)[0]]


def sample(space: Space, num_trials: int, seed: int) -> list[list[str]]:
    """``num_trials`` random points of the space; the same seed gives the same trials (so a re-run of the
    same sweep command finds the same trial run directories)."""
    rng = random.Random(seed)
    if all(p.kind != "interval" for p in space.params):  # a finite space: draw without replacement
        num_trials = min(num_trials, math.prod(len(p.values()) for p in space.params))
    trials: list[list[str]] = []
    while len(trials) < num_trials:
        trial = space.trial({p.name: p.sample(rng) for p in space.params})
        if trial not in trials:  # the same point twice would be the same run
            trials.append(trial)
    return trials


def corner_trials(space: Space) -> list[list[str]]:
    """One trial per edge value of each parameter (others at their first edge): what the fail-fast check of a
    random or Optuna sweep composes before anything runs."""
    base = {p.name: p.corners()[0] for p in space.params}
    trials = [space.trial(base)]
    for p in space.params:
        for value in p.corners()[1:]:
            trials.append(space.trial({**base, p.name: value}))
    return trials
