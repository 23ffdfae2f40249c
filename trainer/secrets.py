"""Secrets never leave the process: names that look like credentials have their values redacted.

Used on everything the project writes or sends (run.json, config.yaml, overrides.yaml, the config logged to W&B).
A name counts as secret when its last word is KEY, TOKEN, SECRET or PASSWORD (any case), e.g. WANDB_API_KEY.
Environment variables are never written at all; this guards values that arrive through the config or argv.
"""

from __future__ import annotations

import re
from typing import Any

# The last part of a name (split at "_", "-", "."): api_key, hf_token, WANDB_API_KEY, password; not
# max_tokens or tokenizer, which are ordinary settings.
_SECRET_NAME = re.compile(r"(^|[_-])(key|token|secret|password|passwd|apikey)$", re.IGNORECASE)
REDACTED = "***"


def is_secret_name(name: str) -> bool:
    return bool(_SECRET_NAME.search(name.rsplit(".", 1)[-1]))


def redact(obj: Any) -> Any:
    """A copy of a config (dicts/lists) with the values of secret-looking keys replaced."""
    if isinstance(obj, dict):
        return {
            k: REDACTED if is_secret_name(str(k)) and v is not None else redact(v) for k, v in obj.items()
        }
    if isinstance(obj, list):
        return [redact(v) for v in obj]
    return obj


def redact_override(arg: str) -> str:
    """``a.api_key=xyz`` -> ``a.api_key=***``; other command-line words pass unchanged."""
    key, sep, _ = arg.partition("=")
    return f"{key}={REDACTED}" if sep and is_secret_name(key.lstrip("+~")) else arg


def flatten(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """``{"model": {"n_layer": 4}}`` -> ``{"model.n_layer": 4}``: readable as columns in the W&B UI."""
    if isinstance(cfg, dict):
        out: dict[str, Any] = {}
        for key, value in cfg.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): cfg}
