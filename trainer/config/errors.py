"""One-line configuration errors.

Every bad input ends as ``error: <key>=<value>: <what is allowed>`` and exit code 2, before any process is
spawned or any file written. Hydra and OmegaConf raise rich multi-line exceptions; ``describe`` turns the
common ones into that single line.
"""

from __future__ import annotations

import dataclasses
import re
import sys

from trainer import exits


class ConfigError(ValueError):
    """A configuration value that is not allowed. ``key`` is relative until ``with_prefix`` makes it full."""

    def __init__(self, key: str, value: object, allowed: str, *, is_key: bool = False) -> None:
        self.key, self.value, self.allowed, self.is_key = key, value, allowed, is_key
        super().__init__(self.line())

    @classmethod
    def unknown_key(cls, key: str, parent: str, declared: list[str]) -> ConfigError:
        return cls(key, None, f"a key of {parent or 'the config'}: {', '.join(declared)}", is_key=True)

    def with_prefix(self, prefix: str) -> ConfigError:
        key = f"{prefix}.{self.key}" if prefix else self.key
        return ConfigError(key, self.value, self.allowed, is_key=self.is_key)

    def line(self) -> str:
        if self.is_key:
            return f"{self.key}: unknown key; expected {self.allowed}"
        return f"{self.key}={_show(self.value)}: expected {self.allowed}"


def _show(value: object) -> str:
    if value is None:
        return "null"
    text = str(value)
    return text if text and not any(c.isspace() for c in text) else repr(text)


_NOT_FOUND = re.compile(r"Could not find '([^']+)/([^']+)'")
_OPTIONS = re.compile(r"Available options in '[^']+':\n((?:\t.*\n?)*)")
_TYPES = {"Integer": "an integer", "Float": "a number", "Boolean": "true or false", "String": "a string"}


def report(exc: Exception) -> int:
    """Print a bad-input exception as its one line and return ``exits.CONFIG``; anything else propagates."""
    line = describe(exc)
    if line is None:
        raise exc
    print(f"error: {line}", file=sys.stderr)
    return exits.CONFIG


def describe(exc: BaseException) -> str | None:
    """One line for a Hydra/OmegaConf composition error, or None when ``exc`` is not one."""
    from hydra.errors import ConfigCompositionException, OverrideParseException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

    if isinstance(exc, ConfigError):
        return exc.line()
    chain = []
    e: BaseException | None = exc
    while e is not None and e not in chain:
        chain.append(e)
        e = e.__cause__ or e.__context__
    text = str(exc)
    missing = _NOT_FOUND.search(text)
    if isinstance(exc, ConfigCompositionException) and missing:
        group, option = missing.groups()
        options = _OPTIONS.search(text)
        choices = []
        if options:
            choices = [o.strip() for o in options.group(1).splitlines() if o.strip()]
            choices = [c for c in choices if not c.endswith("_schema")]
        allowed = "one of " + ", ".join(choices) if choices else "an existing config file"
        return f"{group}={option}: unknown option; expected {allowed}"
    if isinstance(exc, OverrideParseException):
        return f"cannot parse override: {text.splitlines()[0]}"
    for err in chain:
        if isinstance(err, (ConfigKeyError, ConfigAttributeError)) and " not in " in str(err):
            key = str(err.full_key or err.key)
            parent = key.rpartition(".")[0]
            schema = getattr(err, "object_type", None)
            if dataclasses.is_dataclass(schema):
                return ConfigError.unknown_key(
                    key, parent, [f.name for f in dataclasses.fields(schema)]
                ).line()
            return (f"{key}: unknown key; expected an existing key (`trainer train --cfg job` lists them), or "
                    f"+{key}=... to add one")  # fmt: skip
        if isinstance(err, ValidationError):
            msg = str(err).splitlines()[0]
            m = re.search(r"could not be converted to (\w+)", msg)
            expected = _TYPES.get(m.group(1), m.group(1)) if m else msg
            return f"{err.full_key}={_show(err.value) if err.value is not None else '?'}: expected {expected}"
        if isinstance(err, OmegaConfBaseException) and getattr(err, "full_key", None):
            return f"{err.full_key}: {str(err).splitlines()[0]}"
    if isinstance(exc, ConfigCompositionException):
        return text.strip().splitlines()[0]
    return None
