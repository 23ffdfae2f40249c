"""Which Lightning a training process uses: ``lightning.pytorch`` (the ``lightning`` package) or ``pytorch_lightning``.

The two packages hold the same code under two names, yet their classes are distinct: a
``lightning.pytorch.LightningModule`` is refused by a ``pytorch_lightning.Trainer`` and the other way round
(Lightning documents them as interchangeable but not mixable). Users write against either, so everything this
project hands to Lightning (the Trainer, its callbacks, loggers, strategies and plugins, the built-in models
and data modules) comes from the namespace of the user's own classes.

A training process trains one run, so the namespace is chosen once per process: ``trainer.config.compose``
looks at the user's classes and calls ``select`` before any module of ours that subclasses a Lightning class
is imported. Those modules take their base classes from here (``from trainer.namespace import pl``) instead
of naming a package; the first such access fixes the choice, and a later ``select`` of the other one is an
error rather than a silent mix. A process that selects nothing (built-in model and data only) uses
``pytorch_lightning``.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

PYTORCH_LIGHTNING = "pytorch_lightning"
LIGHTNING = "lightning"
DEFAULT = PYTORCH_LIGHTNING

# namespace -> (trainer package, fabric package)
PACKAGES = {
    PYTORCH_LIGHTNING: ("pytorch_lightning", "lightning_fabric"),
    LIGHTNING: ("lightning.pytorch", "lightning.fabric"),
}
# Module-name prefixes of Lightning's own code, per namespace (what a class's bases are checked against).
_PREFIXES = {
    PYTORCH_LIGHTNING: ("pytorch_lightning", "lightning_fabric"),
    LIGHTNING: ("lightning.pytorch", "lightning.fabric"),
}

_selected: str | None = None
_frozen = False


def of_module_name(module: str) -> str | None:
    """The namespace a module of Lightning's own code belongs to; None for any other module."""
    for name, prefixes in _PREFIXES.items():
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return name
    return None


def of_class(cls: Any) -> str | None:
    """The namespace of a class's Lightning base classes (None when it derives from none)."""
    for base in getattr(cls, "__mro__", ()):
        found = of_module_name(getattr(base, "__module__", "") or "")
        if found is not None:
            return found
    return None


def translate(target: str, namespace: str) -> str:
    """A dotted path into Lightning's own code, spelled in ``namespace`` (other paths are returned as they are):
    ``lightning.pytorch.callbacks.EarlyStopping`` is ``pytorch_lightning.callbacks.EarlyStopping``."""
    source = of_module_name(target)
    if source is None or source == namespace:
        return target
    for old, new in zip(PACKAGES[source], PACKAGES[namespace], strict=True):
        if target == old or target.startswith(old + "."):
            return new + target[len(old) :]
    return target


def select(namespace: str) -> None:
    """Use ``namespace`` in this process. Must come before the first use of ``pl``/``fabric``."""
    global _selected
    if namespace not in PACKAGES:
        raise ValueError(f"unknown Lightning namespace {namespace!r}; expected one of {', '.join(PACKAGES)}")
    if _frozen and chosen() != namespace:
        raise RuntimeError(
            f"Lightning namespace {namespace!r} selected after {chosen()!r} was already in use in this process"
        )
    _selected = namespace


def chosen() -> str:
    return _selected or DEFAULT


def pl_module(path: str = "") -> ModuleType:
    """``pytorch_lightning.<path>`` or ``lightning.pytorch.<path>``, as chosen."""
    return _import(0, path)


def fabric_module(path: str = "") -> ModuleType:
    """``lightning_fabric.<path>`` or ``lightning.fabric.<path>``, as chosen."""
    return _import(1, path)


def _import(which: int, path: str) -> ModuleType:
    global _frozen
    _frozen = True
    package = PACKAGES[chosen()][which]
    return importlib.import_module(f"{package}.{path}" if path else package)


def __getattr__(name: str) -> ModuleType:
    # ``from trainer.namespace import pl`` (the trainer package) and ``fabric``, resolved on first use.
    if name == "pl":
        return pl_module()
    if name == "fabric":
        return fabric_module()
    raise AttributeError(name)
