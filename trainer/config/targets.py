"""The ``_target_`` nodes of a config: the user's classes, checked before anything starts.

- Every untyped ``_target_`` node (the user's model, data, callbacks, loggers, optimizer, and anything nested
  in them, e.g. ``model.net``) is imported and its keys are bound to its signature: a misspelled argument is
  one line naming the key and the arguments that exist. Typed nodes (the built-in models, data, AdamW and the
  warmup schedule) are checked by their schema instead, without importing anything.
- The Lightning namespace of the run comes from the user's classes (``trainer.namespace``); two classes of
  different namespaces in one run are refused, naming both. Lightning's own classes (``EarlyStopping``, a
  logger) may be spelled in either namespace: they are translated into the run's.
- Lightning ``Trainer`` flags that the schema does not list are checked against ``Trainer.__init__``, read
  from Lightning's source without importing it (``trainer submit`` must not import Lightning).
- The optimizer and scheduler (``optim``, ``scheduler``) go to a model that takes them; an ``optim.*`` or
  ``scheduler.*`` override for a model that cannot receive them is refused instead of silently ignored.

Nothing here imports this project's own Lightning code: that would fix the namespace before it is known.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import importlib.util
import inspect
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from trainer import namespace
from trainer.config.errors import ConfigError

HYDRA_KEYS = ("_target_", "_partial_", "_recursive_", "_convert_", "_args_")
# Slices that hold the user's `_target_` nodes, in the order their classes decide the namespace.
SLICES = ("model", "data", "callbacks", "logger.extra", "optim", "scheduler")
# Trainer flags this project sets itself, and where the user sets them instead.
OWNED_TRAINER_FLAGS = {
    "strategy": "strategy=...",
    "precision": "precision=...",
    "callbacks": "the callbacks group (callbacks=...)",
    "logger": "the logger group (logger=...)",
    "plugins": "the strategy and checkpoint settings",
    "enable_checkpointing": "checkpoint.*",
    "default_root_dir": "run.dir",
}


def nodes(cfg: DictConfig) -> Iterator[tuple[str, DictConfig]]:
    """Every node with a ``_target_`` under the user-facing slices, as (dotted key, node), outer first."""

    def walk(node: Any, key: str) -> Iterator[tuple[str, DictConfig]]:
        if isinstance(node, DictConfig):
            if "_target_" in node:
                yield key, node
            for child in node:
                if child not in HYDRA_KEYS:
                    yield from walk(node._get_node(child), f"{key}.{child}")
        elif isinstance(node, ListConfig):
            for i in range(len(node)):
                yield from walk(node._get_node(i), f"{key}[{i}]")

    for key in SLICES:
        node = OmegaConf.select(cfg, key, throw_on_resolution_failure=False)
        if node is not None:
            yield from walk(node, key)


def is_typed(node: DictConfig) -> bool:
    return dataclasses.is_dataclass(OmegaConf.get_type(node))


def is_ours(target: str) -> bool:
    return target == "trainer" or target.startswith("trainer.")


def locate(key: str, target: str) -> Any:
    from hydra.utils import get_object

    quiet = logging.getLogger("hydra.utils")  # it logs a three-line report of its own before raising
    was_disabled, quiet.disabled = quiet.disabled, True
    try:
        return get_object(target)
    except Exception as err:  # ImportError, AttributeError, or the user's module failing as it imports
        cause = err.__cause__ or err
        first = (str(cause).strip().splitlines() or [""])[0]
        hint = " (is its folder on PYTHONPATH?)" if isinstance(cause, ModuleNotFoundError) else ""
        raise ConfigError(
            f"{key}._target_",
            target,
            f"an importable class or function ({type(cause).__name__}: {first}){hint}",
        ) from None
    finally:
        quiet.disabled = was_disabled


def translate_lightning_targets(cfg: DictConfig, run_namespace: str) -> None:
    """Spell every ``_target_`` into Lightning's own code in the run's namespace (in place)."""
    for _, node in nodes(cfg):
        target = node._target_
        if isinstance(target, str):
            node._target_ = namespace.translate(target, run_namespace)


def lightning_namespace(cfg: DictConfig) -> str | None:
    """The namespace of the user's classes (None: only built-in or Lightning's own classes). Refuses a mix."""
    first: tuple[str, str, str] | None = None
    for key, node in nodes(cfg):
        target = node.get("_target_")
        if (
            not isinstance(target, str)
            or is_typed(node)
            or is_ours(target)
            or namespace.of_module_name(target)
        ):
            continue  # ours follow the run; Lightning's own classes are translated into it
        if target.split(".", 1)[0] == "torch":
            continue  # torch's own classes (optimizers, schedulers, layers) are no Lightning's
        found = namespace.of_class(locate(key, target))
        if found is None:
            continue
        if first is None:
            first = (key, target, found)
        elif found != first[2]:
            raise ConfigError(
                f"{key}._target_", target,
                f"a class of the same Lightning as {first[0]}._target_={first[1]} ({first[2]}); this one is a "
                f"{found} class, and the two packages' classes cannot be mixed in one run (use one in every import)",
            )  # fmt: skip
    return first[2] if first else None


def check_signatures(cfg: DictConfig) -> None:
    """Import every node's target that is not ours; bind every untyped node's keys to its target's signature
    (typed nodes: their schema did)."""
    for key, node in nodes(cfg):
        target = node.get("_target_")
        if not isinstance(target, str) or target == _schema_target(node):
            continue
        if is_ours(target):
            check_ours(key, target)
            continue
        obj = locate(key, target)  # also a typed node's, when its _target_ is set to the user's class
        if is_typed(node):
            continue
        names = keywords(obj)
        if names is None:
            continue
        for arg in node:
            if arg not in HYDRA_KEYS and arg not in names:
                shown = ", ".join(names) or "none"
                raise ConfigError(f"{key}.{arg}", None, f"an argument of {target}: {shown}", is_key=True)


def check_ours(key: str, target: str) -> None:
    """A ``_target_`` in this package names a module and a top-level name in it: read from the source, not
    imported (importing our Lightning code would fix the namespace before it is known)."""
    module, _, name = target.rpartition(".")
    spec = importlib.util.find_spec(module) if module else None
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        raise ConfigError(
            f"{key}._target_", target, f"an importable class or function (no module {module!r})"
        )
    tree = ast.parse(Path(spec.origin).read_text())
    defined = {
        n.name for n in tree.body if isinstance(n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
    }
    defined |= {
        t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)
    }
    defined |= {(a.asname or a.name) for n in tree.body if isinstance(n, ast.ImportFrom) for a in n.names}
    if name not in defined:
        close = difflib.get_close_matches(name, sorted(defined), n=1)
        hint = f" (did you mean {module}.{close[0]}?)" if close else ""
        raise ConfigError(
            f"{key}._target_", target, f"an importable class or function: {module} has no {name}{hint}"
        )


def _schema_target(node: DictConfig) -> str | None:
    """The ``_target_`` a typed node's schema declares (e.g. ``torch.optim.AdamW``): known good, and not
    imported here (``trainer submit`` must not import torch)."""
    if not is_typed(node):
        return None
    field = next((f for f in dataclasses.fields(OmegaConf.get_type(node)) if f.name == "_target_"), None)
    return field.default if field is not None else None


def keywords(obj: Any) -> list[str] | None:
    """The arguments a class, function or partial takes by name; None when it takes any (``**kwargs``) or its
    signature cannot be read (then nothing can be checked against it)."""
    try:
        params = inspect.signature(obj).parameters
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return None
    return [n for n, p in params.items() if p.kind is not inspect.Parameter.VAR_POSITIONAL]


def accepts(obj: Any, argument: str) -> bool:
    """Whether ``obj`` can be given the keyword ``argument`` (as far as its signature says)."""
    names = keywords(obj)
    return names is None or argument in names


def model_receives(cfg: DictConfig, argument: str) -> tuple[bool, str]:
    """Whether the model gets the run's ``optim`` (argument ``optimizer``) or ``scheduler``, and if not why."""
    model = cfg.model
    if argument in model:
        return False, f"model.{argument} is set in the model's own config (set model.{argument}.<key> there)"
    if is_typed(model) or is_ours(str(model._target_)):
        # a built-in model: every one takes both (tests/test_usercode_units.py holds them to it); not
        # imported here, as that would fix the Lightning namespace before it is known
        return True, ""
    if not accepts(locate("model", str(model._target_)), argument):
        name = str(model._target_).rsplit(".", 1)[-1]
        return (
            False,
            f"{name} takes no `{argument}` argument: it builds its own (set its own model.* arguments)",
        )
    return True, ""


def wire_optimizer(cfg: DictConfig, overrides: list[str]) -> dict[str, bool]:
    """Which of ``optimizer``/``scheduler`` the model gets from the run's config. An unused slice becomes
    null (config.yaml shows it was not used, and it does not change the run's identity); an override of an
    unused slice is refused."""
    given: dict[str, bool] = {}
    for slice_, argument in (("optim", "optimizer"), ("scheduler", "scheduler")):
        receives, why = model_receives(cfg, argument)
        given[argument] = receives and cfg.get(slice_) is not None
        if receives:
            continue
        for override in overrides:
            key, _, value = override.partition("=")
            key = key.lstrip("+~")
            if key == slice_ or key.startswith(slice_ + "."):
                raise ConfigError(key, value, f"a setting the model receives: {why}")
        cfg[slice_] = None
    return given


@functools.lru_cache(maxsize=1)
def trainer_flags() -> tuple[str, ...]:
    """The keyword arguments of Lightning's ``Trainer.__init__``, read from its source (no import)."""
    source: Path | None = None
    for package, relative in (("pytorch_lightning", ("trainer", "trainer.py")),
                              ("lightning", ("pytorch", "trainer", "trainer.py"))):  # fmt: skip
        spec = importlib.util.find_spec(package)
        if spec is not None and spec.origin:
            candidate = Path(spec.origin).parent.joinpath(*relative)
            if candidate.is_file():
                source = candidate
                break
    if source is None:
        return ()
    tree = ast.parse(source.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == "Trainer":
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.name == "__init__":
                    args = item.args
                    return tuple(a.arg for a in (*args.args, *args.kwonlyargs) if a.arg != "self")
    return ()


def check_trainer_flags(declared: list[str], extra: dict[str, Any]) -> None:
    """Keys of ``trainer`` beyond the schema's: Lightning Trainer flags this project does not set itself."""
    flags = trainer_flags()
    for key, value in extra.items():
        if key in OWNED_TRAINER_FLAGS:
            raise ConfigError(
                f"trainer.{key}", value, f"no value here (trainer sets it: use {OWNED_TRAINER_FLAGS[key]})"
            )
        if flags and key not in flags:
            others = [f for f in flags if f not in declared and f not in OWNED_TRAINER_FLAGS]
            raise ConfigError(
                f"trainer.{key}", None,
                f"a key of trainer: {', '.join(declared)}; or a Lightning Trainer flag: {', '.join(others)}",
                is_key=True,
            )  # fmt: skip
