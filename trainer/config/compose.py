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
import copy
import dataclasses
import json
import os
import pickle
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from trainer import rundir
from trainer.config import schema
from trainer.config.errors import ConfigError

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


# Hydra's flags that take a value (``--cfg job``, ``--config-dir d``); ``--info`` takes one optionally.
_FLAGS_WITH_VALUE = ("--config-dir", "-cd", "--config-path", "-cp", "--config-name", "-cn", "--cfg", "-c",
                     "--package", "-p", "--experimental-rerun")  # fmt: skip
_FLAGS_MAYBE_VALUE = ("--info", "-i")


def flags_first(args: list[str]) -> list[str]:
    """Hydra's flags (with their values) before the overrides: its parser takes overrides in one run, so
    ``a=1 --config-dir d b=2`` would fail on ``b=2`` ("unrecognized arguments")."""
    flags: list[str] = []
    overrides: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("-"):
            flags.append(arg)
            following = args[i + 1] if i + 1 < len(args) else None
            takes = arg in _FLAGS_WITH_VALUE or (
                arg in _FLAGS_MAYBE_VALUE and following is not None and not following.startswith("-")
                and not _is_override(following)
            )  # fmt: skip
            if takes and following is not None:
                flags.append(args[i + 1])
                i += 1
        else:
            overrides.append(arg)
        i += 1
    return flags + overrides


def _is_override(arg: str) -> bool:
    """``key=value``, ``+key=value``, ``~key`` (Hydra's override grammar), as opposed to a ``-flag``."""
    return arg.startswith(("+", "~")) or ("=" in arg and not arg.startswith("-"))


def quote_option_lists(args: list[str]) -> list[str]:
    """``cluster.sbatch=[--mem-per-cpu=3G]``: list items that are command-line options (``-x``, ``a=b``) are
    quoted, which Hydra's grammar needs (unquoted it fails with "no viable alternative")."""
    out = []
    for arg in args:
        key, sep, value = arg.partition("=")
        inner = value[1:-1]
        # a flat list of plain words only: quoted or nested lists are left to Hydra as written
        if sep and value.startswith("[") and value.endswith("]") and not any(c in inner for c in "'\"[]"):
            items = [item.strip() for item in inner.split(",")] if inner.strip() else []
            if any(item.startswith("-") or "=" in item for item in items):
                arg = f"{key}=[" + ",".join(f"'{item}'" for item in items) + "]"
        out.append(arg)
    return out


def expand_home(args: list[str]) -> list[str]:
    """``data.path=~/books``: a value that starts with ``~`` is the user's home, as the shell would read it
    after a space (Hydra's grammar refuses a bare ``~`` in a value; ``~key`` alone still deletes a key)."""
    out = []
    for arg in args:
        key, sep, value = arg.partition("=")
        if sep and value.startswith("~") and not key.startswith("-"):
            home = os.path.expanduser(value)
            arg = f"{key}={home}" if home != value else f"{key}='{value}'"
        out.append(arg)
    return out


def normalize(args: list[str]) -> list[str]:
    """The command line as Hydra must see it: its flags first, numeric group choices and option lists
    quoted, and the default preset left out when the user picks another model or data without a preset
    (conf/train.yaml)."""
    args = flags_first(quote_option_lists(expand_home(quote_numeric_choices(args))))
    keys = [a.split("=", 1)[0].lstrip("+~") for a in args if _is_override(a)]
    if "experiment" not in keys and any(k in ("model", "data") for k in keys):
        args = [*args, "~experiment"]
    return args


def unreadable_config(args: list[str], err: Exception) -> str | None:
    """After Hydra failed to read a config file with ``err``: which file, and why, in one line (None when it
    cannot be told). A YAML error names its file; a file that is not text is found among ``--config-dir``'s
    and conf/'s YAML files."""
    import yaml

    if isinstance(err, yaml.YAMLError):
        mark = getattr(err, "problem_mark", None)
        where = f"{mark.name}: line {mark.line + 1}" if mark else "a config file"
        return f"{where}: not valid YAML ({getattr(err, 'problem', None) or err})"
    dirs = [conf_dir()]
    for i, arg in enumerate(args):
        if arg in ("--config-dir", "-cd") and i + 1 < len(args):
            dirs.insert(0, args[i + 1])
        elif arg.startswith("--config-dir="):
            dirs.insert(0, arg.split("=", 1)[1])
    for path in (p for directory in dirs for p in sorted(Path(directory).rglob("*.yaml"))):
        try:
            path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            return f"{path}: not a YAML file (not UTF-8 text)"
        except OSError as os_err:
            return f"{path}: cannot be read ({os_err.strerror})"
    return None


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
    notes: tuple[str, ...] = ()
    """One-line remarks about the command line (a key given twice), for the user once the run is good."""

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


class Composer:
    """``compose`` for many override lists that differ in values only (a sweep's trials), at a fraction of
    the cost: Hydra composes each distinct set of structural overrides once (config group choices, keys
    without a dot, ``hydra.*``: ~0.1-0.2 s each); each list's value overrides (dotted keys) are then applied to
    a copy with Hydra's own override code, in their order, and the result is checked like any composition.

    A trial that sets the same keys as one checked in full before it, to other plain values, is derived from
    that one (~1 ms instead of ~20): each new value is converted and validated by the config node it replaces
    (as assigning it would), set in the typed slices (whose dataclasses run their checks again) and in the
    resolved config, and every check that reads values runs again on the result. Whatever could make the
    derivation differ from a composition (a key some interpolation names, a ``_target_``, a key the typed
    config does not hold, check's own adjustments coming out differently) is composed in full, and so is any
    trial the derivation refuses: its error is the composition's. The same config comes out as from
    ``compose`` (tested), with the same errors for bad values."""

    def __init__(self, config_dir: str | None = None) -> None:
        self.config_dir = config_dir
        self._bases: dict[tuple[str, ...], tuple[bytes, Any]] = {}
        self._parsed: dict[str, Any] = {}
        self._references: dict[tuple, _Reference] = {}
        self._by_key: dict[str, Any] = {}  # a plain `key=<number>` override parsed in full, by key

    def __call__(
        self, overrides: list[str], *, where: str = "cluster", run_root: Path | None = None
    ) -> Composed:
        from hydra import compose as hydra_compose
        from hydra._internal.config_loader_impl import ConfigLoaderImpl

        parsed = [self._parse(line) for line in overrides]
        values = [o for o in parsed if self._is_value(o.key_or_group) and o.package is None]
        structural = tuple(o.input_line for o in parsed if not any(o is v for v in values))
        # check() reads the group choices, the config sources and name, and the overrides Hydra records:
        # every non-hydra one, in the order given.
        task = [o.input_line for o in parsed if not o.is_hydra_override()]
        same = (structural, tuple(o.key_or_group for o in values), where, run_root)
        reference = self._references.get(same)
        if reference is not None:
            with contextlib.suppress(_NotDerivable):
                return reference.derive(values, task)
        if structural not in self._bases:
            extra = (
                [f"hydra.searchpath=[file://{os.path.abspath(self.config_dir)}]"] if self.config_dir else []
            )
            composed = hydra_compose("train", overrides=list(structural) + extra, return_hydra_config=True)
            hydra_node = composed.hydra
            with open_dict(composed):
                del composed["hydra"]
            # Each trial starts from a copy: unpickling one is ~5x faster than a deepcopy of the DictConfig.
            self._bases[structural] = (pickle.dumps(composed), hydra_node)
        base, hydra_node = self._bases[structural]
        cfg = pickle.loads(base)
        ConfigLoaderImpl._apply_overrides_to_config(values, cfg)
        node = SimpleNamespace(
            runtime=hydra_node.runtime, job=hydra_node.job, overrides=SimpleNamespace(task=task)
        )
        result, built = _check(
            cfg,
            node,
            where=where,
            run_root=run_root,
            absolute=True,
            keep_typed=reference is None and bool(values),
        )
        if reference is None and values:
            self._references[same] = _Reference(result, built, cfg, hydra_node.runtime.choices, where)
        return result

    def _parse(self, line: str) -> Any:
        """Hydra's parse of one override, once per distinct line (a sweep repeats its fixed overrides). A
        number set to a key parsed before (a sweep's sampled values: a new line each trial) is that parse with
        the number in place of the value: Hydra's grammar takes ~5 ms a line, and reads such a number as
        Python's ``int`` or ``float`` does (tested)."""
        from hydra.core.override_parser.overrides_parser import OverridesParser

        if line not in self._parsed:
            number = _NUMBER_OVERRIDE.fullmatch(line)
            like = self._by_key.get(number.group(1)) if number else None
            if like is not None:
                text = number.group(2)
                parsed = copy.copy(like)
                parsed._value = int(text) if _INT_VALUE.fullmatch(text) else float(text)
                parsed.input_line = line
            else:
                parsed = OverridesParser.create().parse_overrides([line])[0]
                if number and isinstance(parsed._value, (int, float)):
                    self._by_key.setdefault(parsed.key_or_group, parsed)
            self._parsed[line] = parsed
        return copy.copy(self._parsed[line])

    @staticmethod
    def _is_value(key: str) -> bool:
        """A dotted key names a value (``optim.lr``); a group is named without dots (``model``, ``hydra/x``)."""
        return "." in key and "/" not in key and not key.startswith("hydra.")


# `key=<number>` in the forms Hydra's grammar reads as a number: a dotted key, a decimal int without leading
# zeros, or a float with a point or an exponent (underscores, inf and nan take the full parse).
_INT = r"[+-]?(?:0|[1-9]\d*)"
_FLOAT = r"[+-]?(?:(?:(?:0|[1-9]\d*)?\.\d+|(?:0|[1-9]\d*)\.)(?:[eE][+-]?\d+)?|(?:0|[1-9]\d*)[eE][+-]?\d+)"
_NUMBER_OVERRIDE = re.compile(rf"([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+)=({_INT}|{_FLOAT})")
_INT_VALUE = re.compile(_INT)


class _NotDerivable(Exception):
    """This trial is composed in full (see ``Composer``)."""


class _Reference:
    """A trial checked in full, from which trials that set the same keys to other values are derived."""

    def __init__(self, composed: Composed, built: Any, cfg: DictConfig, choices: Any, where: str) -> None:
        self.composed, self.built, self.cfg, self.choices, self.where = composed, built, cfg, choices, where
        self.adjustments = _adjustments(built)
        # Every interpolation's text: a key named in one changes more than its own value.
        self.interpolations = " ".join(_interpolations(cfg))

    def derive(self, values: list[Any], task: list[str]) -> Composed:
        from hydra.core.override_parser.types import OverrideType
        from omegaconf import ValueNode

        ref = self.composed
        built, conf, resolved = self.built, ref.conf, _plain_copy(ref.resolved)
        for override in values:
            key = override.key_or_group
            path = key.split(".")
            if (
                override.type != OverrideType.CHANGE
                or override.is_sweep_override()
                or any(part.startswith("_") for part in path)
                or path[-1] in self.interpolations
            ):
                raise _NotDerivable
            parent = OmegaConf.select(self.cfg, ".".join(path[:-1]), throw_on_missing=False)
            node = parent._get_node(path[-1]) if isinstance(parent, DictConfig) else None
            value = override.value()
            if not isinstance(node, ValueNode) or node._is_interpolation() or isinstance(value, (dict, list)):
                raise _NotDerivable
            if isinstance(value, str) and "${" in value:
                raise _NotDerivable
            try:
                value = node.validate_and_convert(value)  # what assigning it to the node does
                built = _replace(built, path, value)  # the slices' own checks run again
                conf = _replace(conf, path, value)
            except Exception:
                raise _NotDerivable from None
            _set(resolved, path, value)
        if _adjustments(built) != self.adjustments:
            raise _NotDerivable
        notes = _repeats(task)  # (the group choices are the reference's, checked)
        return _finish(conf, lambda: resolved, self.choices, task, notes, self.where, True, ref.namespace,
                       ref.trainer_flags, ref.model_gets)  # fmt: skip


def _interpolations(node: Any) -> Iterator[str]:
    """The text of every interpolation in a config."""
    if isinstance(node, DictConfig):
        keys = list(node.keys())
    elif isinstance(node, ListConfig):
        keys = list(range(len(node)))
    else:
        return
    for key in keys:
        child = node._get_node(key)
        if child is None:
            continue
        if child._is_interpolation():
            yield str(child._value())
        else:
            yield from _interpolations(child)


def _replace(obj: Any, path: list[str], value: Any) -> Any:
    """``obj`` (typed slices: dataclasses and dicts) with the value at ``path`` replaced, as a new object along
    the path (each dataclass rebuilt through its ``__init__``, so its checks run); the rest is shared."""
    name, rest = path[0], path[1:]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        if name not in {f.name for f in dataclasses.fields(obj) if f.init}:
            raise _NotDerivable
        return dataclasses.replace(
            obj, **{name: _replace(getattr(obj, name), rest, value) if rest else value}
        )
    if isinstance(obj, dict) and name in obj:
        return {**obj, name: _replace(obj[name], rest, value) if rest else value}
    raise _NotDerivable


def _plain_copy(obj: Any) -> Any:
    """A copy of a resolved config (dicts and lists of plain values): ~10x faster than ``copy.deepcopy``."""
    if isinstance(obj, dict):
        return {k: _plain_copy(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_plain_copy(v) for v in obj]
    return obj


def _set(resolved: dict, path: list[str], value: Any) -> None:
    for name in path[:-1]:
        resolved = resolved[name]
        if not isinstance(resolved, dict):
            raise _NotDerivable
    if path[-1] not in resolved:
        raise _NotDerivable
    resolved[path[-1]] = value


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
    return _check(cfg, hydra_node, where=where, run_root=run_root, absolute=absolute)[0]


def _check(
    cfg: DictConfig,
    hydra_node: Any,
    *,
    where: str = "local",
    run_root: Path | None = None,
    absolute: bool = False,
    keep_typed: bool = False,
) -> tuple[Composed, schema.TrainConfig | None]:
    """``check``; with ``keep_typed``, also the typed config as built, before the adjustments below."""
    from trainer import namespace
    from trainer.config import targets
    from trainer.config.validate import check_components, to_typed

    choices, task = hydra_node.runtime.choices, list(hydra_node.overrides.task)
    notes = _check_choices_and_repeats(choices, task)
    if run_root is not None:
        with open_dict(cfg):
            cfg.run.root = str(run_root)
    check_components(cfg, choices)
    run_namespace = targets.lightning_namespace(cfg)
    targets.translate_lightning_targets(cfg, run_namespace or namespace.DEFAULT)
    targets.check_signatures(cfg)
    model_gets = targets.wire_optimizer(cfg, task)
    conf, trainer_flags = to_typed(cfg)
    built = copy.deepcopy(conf) if keep_typed else None
    strategy, direction = _adjustments(conf)
    if strategy:  # what Lightning's own "auto" picks for several devices; config.yaml records the choice
        conf.strategy.name = cfg.strategy.name = strategy
    if direction:  # the objective's direction follows the checkpoint metric's mode
        conf.sweep.direction = cfg.sweep.direction = direction
    composed = _finish(conf, lambda: OmegaConf.to_container(cfg, resolve=True), choices, task, notes, where,
                       absolute, run_namespace, trainer_flags, model_gets)  # fmt: skip
    return composed, built


def _adjustments(conf: schema.TrainConfig) -> tuple[str | None, str | None]:
    """What ``check`` sets that the config leaves open: the strategy for ``auto`` on several devices (DDP, as
    Lightning's ``auto``), and the sweep's direction from the checkpoint metric's mode."""
    several = conf.strategy.name == "auto" and conf.trainer.devices * conf.trainer.num_nodes > 1
    direction = None
    if conf.sweep.direction is None:
        direction = "maximize" if conf.checkpoint.mode == "max" else "minimize"
    return ("ddp" if several else None), direction


def _finish(
    conf: schema.TrainConfig,
    resolve: Callable[[], dict],
    choices: Any,
    task: list[str],
    notes: list[str],
    where: str,
    absolute: bool,
    run_namespace: str | None,
    trainer_flags: dict,
    model_gets: dict,
) -> Composed:
    """The checks of the typed and resolved config (across slices, against the cluster or this machine, every
    number finite), then the run's directory and what the run does there."""
    from trainer.config.validate import _check_portable, check_finite, check_for_cluster, check_here

    if where == "cluster":
        accelerator = check_for_cluster(conf)
    elif where == "plan":  # `trainer plan`: any hardware, planned without using it (no machine checks)
        _check_portable(conf)
        accelerator = conf.trainer.accelerator
    else:
        accelerator = check_here(conf)
    resolved = resolve()
    check_finite(resolved)
    experiment = choices.get("experiment")
    paths = rundir.resolve_paths(resolved, experiment)
    if conf.run.new_each_time and not conf.run.dir:  # (the processes a run starts get its dir spelled out)
        paths = rundir.next_free(paths)
    if absolute:
        paths = rundir.RunPaths(paths.name, Path(os.path.abspath(paths.dir)))
    if PLAN_ENV in os.environ:  # a worker started by our own launcher: it already decided
        plan = rundir.Plan(**json.loads(os.environ[PLAN_ENV]))
    else:
        plan = _plan(conf, resolved, paths)
    return Composed(conf, resolved, paths, plan, task, experiment, accelerator, run_namespace, trainer_flags,
                    model_gets, tuple(notes))  # fmt: skip


def _plan(conf: schema.TrainConfig, resolved: dict, paths: rundir.RunPaths) -> rundir.Plan:
    from trainer.config.validate import check_checkpoint_format

    plan = rundir.plan(
        paths, resolved, conf.resume, rank_zero=env_rank() == 0,
        allow_config_change=conf.checkpoint.allow_config_change,
    )  # fmt: skip
    check_checkpoint_format(plan.checkpoint, conf.strategy.name)
    return plan


def replan(c: Composed) -> Composed:
    """``c`` with its plan made again from what is on disk now (once the run directory is locked: the plan
    made before may have been read while another process was still writing there)."""
    return dataclasses.replace(c, plan=_plan(c.conf, c.resolved, c.paths))


def _check_choices_and_repeats(choices: Any, task: list[str]) -> list[str]:
    """A group option is one of its YAML files (the typed ``*_schema`` entries are what those files build on,
    not options). A key given twice takes its last value, as in Hydra (scripts put a base command first and
    their changes after it): returned as a note, said once the run is known to be good."""
    for group, choice in choices.items():
        if isinstance(choice, str) and choice.endswith("_schema") and not group.startswith("hydra"):
            folder = Path(conf_dir(), group)
            options = sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []
            raise ConfigError(group, choice, "one of " + ", ".join(options) if options else "a config file")
    return _repeats(task)


def _repeats(task: list[str]) -> list[str]:
    seen: dict[str, str] = {}
    notes = []
    for override in task:
        key = _key(override)
        if key in seen and "=" in override and seen[key] != override:
            notes.append(f"{key} is given twice: {override} is used (the last)")
        seen[key] = override
    return notes
