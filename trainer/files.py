"""Small file helpers shared by every side (training, launching, sweeps); no torch, no project imports."""

from __future__ import annotations

import json
import os
from pathlib import Path


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to a hidden temporary file, fsync it, then rename it over ``path``: readers see the old
    file or the new one, never a part of it."""
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path: Path) -> dict | None:
    """A JSON file's content, or None when it is missing or not whole JSON."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
