"""Secrets never leave the process: values that are, or look like, credentials are redacted.

Used on everything the project writes or sends (run.json, config.yaml, overrides.yaml, the config logged to
W&B, the hyperparameters in every checkpoint). A secret is the value of a key whose name looks secret in any
case style (``api_key``, ``apiToken``, ``AWS_SECRET_ACCESS_KEY``, ``hub-password``), or a value equal to that
of an environment variable whose name looks secret (``+model.foo=$WANDB_API_KEY`` is redacted too).
Environment variables are never written at all; this guards values that arrive through the config or argv.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Mapping
from typing import Any

REDACTED = "***"

# The words of a name: split at "_" and "-", and at camelCase boundaries (an acronym stays one word, as in
# AWSSecretKey -> AWS, Secret, Key).
_WORD = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|\d+")
# A name is secret when its last word is one of these. Plural "keys" and "tokens" are not among them: they
# usually count things (num_keys, max_tokens, n_tokens) and are secret only when qualified (api_keys).
_SECRET_WORDS = {"key", "token", "secret", "secrets", "password", "passwords", "passwd", "passphrase",
                 "credential", "credentials"}  # fmt: skip
_QUALIFIERS = ("api", "access", "secret", "private", "auth", "refresh", "client")
# The same written as one word, as in apikey, accesstoken, clientsecret.
_COMPOUNDS = {q + base for q in _QUALIFIERS for base in ("key", "keys", "token", "tokens", "secret")}
# A tokenizer's special tokens (pad_token: "<pad>") are ordinary settings, and a model rebuilt from its
# checkpoint needs them.
_SPECIAL_TOKENS = {"pad", "eos", "bos", "unk", "sep", "cls", "mask"}
# Shorter values of secret variables (a PIN, a flag) would redact ordinary numbers and words.
_MIN_ENV_SECRET = 8


@functools.lru_cache(maxsize=4096)  # a config's names repeat: a sweep's check asks about each, per trial
def is_secret_name(name: str) -> bool:
    """Whether the last part of a dotted name looks like a credential's name."""
    words = [w.lower() for w in _WORD.findall(name.rsplit(".", 1)[-1]) if not w.isdigit()]
    if not words:
        return False
    last, before = words[-1], words[-2] if len(words) > 1 else ""
    if last in ("token", "tokens") and before in _SPECIAL_TOKENS:
        return False
    return (
        last in _SECRET_WORDS or last in _COMPOUNDS or (last in ("keys", "tokens") and before in _QUALIFIERS)
    )


def secret_env_values() -> frozenset[str]:
    """The values of this process's environment variables whose names look secret."""
    return frozenset(
        value for name, value in os.environ.items() if len(value) >= _MIN_ENV_SECRET and is_secret_name(name)
    )


def is_secret_value(value: Any, secrets: frozenset[str] | None = None) -> bool:
    """Whether ``value`` equals a secret environment variable's value (a number compares as its digits)."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        return False
    return str(value) in (secret_env_values() if secrets is None else secrets)


def redact(obj: Any, secrets: frozenset[str] | None = None) -> Any:
    """A copy of a config (mappings, lists, tuples) with every secret value replaced, at any depth."""
    secrets = secret_env_values() if secrets is None else secrets
    if isinstance(obj, Mapping):
        return {
            k: REDACTED if is_secret_name(str(k)) and v is not None else redact(v, secrets)
            for k, v in obj.items()
        }
    if isinstance(obj, (list, tuple)):
        items = [redact(v, secrets) for v in obj]
        return items if isinstance(obj, list) else tuple(items)
    return REDACTED if is_secret_value(obj, secrets) else obj


def is_secret_override(arg: str) -> bool:
    """Whether a ``key=value`` command-line word sets a secret (by its key's name or by its value)."""
    key, sep, value = arg.partition("=")
    if not sep:
        return False
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":  # Hydra's quoting is not the value
        value = value[1:-1]
    return is_secret_name(key.lstrip("+~")) or is_secret_value(value)


def redact_override(arg: str) -> str:
    """``a.api_key=xyz`` -> ``a.api_key=***``; other command-line words pass unchanged."""
    return f"{arg.partition('=')[0]}={REDACTED}" if is_secret_override(arg) else arg


def flatten(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """``{"model": {"n_layer": 4}}`` -> ``{"model.n_layer": 4}``: readable as columns in the W&B UI."""
    if isinstance(cfg, dict):
        out: dict[str, Any] = {}
        for key, value in cfg.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): cfg}
