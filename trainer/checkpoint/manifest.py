"""Checkpoint manifests and their verification. Imports no torch: the launch side reads these on login nodes.

Every checkpoint ``<name>.ckpt`` has a sidecar ``<name>.ckpt.json``, written (atomically) only after the
checkpoint itself is complete and renamed into place. It records the step, the epoch, the run's config hash
and the identity-relevant config, the file's size and checksum. A checkpoint without a manifest, or whose
bytes do not match it, is not valid: a crash at any moment of a write leaves nothing that looks valid.

The checksum is XXH3-128 (key ``xxh3_128``): it guards against truncated and corrupted files, not against
someone who can write the manifest too, so a fast non-cryptographic hash serves (SHA-256 limited the write to
about half the disk's speed). Manifests of earlier versions hold ``sha256`` and are still verified with it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import xxhash

from trainer.files import atomic_write_text

MANIFEST_SUFFIX = ".json"
STEP_NAME = re.compile(r"^step-(\d+)\.ckpt$")


def step_checkpoint_name(step: int) -> str:
    return f"step-{step:08d}.ckpt"


def manifest_path(checkpoint: str | os.PathLike) -> Path:
    return Path(str(checkpoint) + MANIFEST_SUFFIX)


def write_manifest(checkpoint: Path, manifest: dict) -> None:
    atomic_write_text(manifest_path(checkpoint), json.dumps(manifest, indent=1, sort_keys=True))


def read_manifest(checkpoint: str | os.PathLike) -> dict | None:
    try:
        return json.loads(manifest_path(checkpoint).read_text())
    except (OSError, ValueError):
        return None


DIGEST = "xxh3_128"
"""The checksum new manifests record (under this key)."""
_ALGORITHMS = {"xxh3_128": xxhash.xxh3_128, "sha256": hashlib.sha256}


def new_digest(algorithm: str = DIGEST) -> Any:
    return _ALGORITHMS[algorithm]()


def algorithm_of(entry: dict) -> str:
    """The checksum a manifest (or one file's entry of it) records: ``xxh3_128``, or ``sha256`` (older)."""
    return next((a for a in _ALGORITHMS if a in entry), DIGEST)


def file_digest(path: Path, algorithm: str = DIGEST, chunk: int = 1 << 22) -> str:
    digest = new_digest(algorithm)
    with path.open("rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def checkpoint_manifest(name: str, size: int, digest: str, step: int, epoch: int, seconds: float) -> dict:
    """The fields every checkpoint's manifest has, file or sharded directory."""
    return {"file": name, "bytes": size, DIGEST: digest, "step": step, "epoch": epoch,
            "created": time.time(), "write_seconds": seconds}  # fmt: skip


def combined_digest(files: dict[str, dict], algorithm: str = DIGEST) -> str:
    """One checksum for a sharded (directory) checkpoint, over each file's name, size and checksum."""
    digest = new_digest(algorithm)
    for name in sorted(files):
        digest.update(f"{name}\0{files[name]['bytes']}\0{files[name][algorithm]}\n".encode())
    return digest.hexdigest()


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def verify(checkpoint: Path) -> str | None:
    """None when the checkpoint is complete and intact; otherwise why not, in a few words."""
    manifest = read_manifest(checkpoint)
    if manifest is None:
        return "no manifest (the write did not finish)"
    if checkpoint.is_dir() or "files" in manifest:
        return _verify_dir(checkpoint, manifest)
    try:
        size = checkpoint.stat().st_size
    except OSError:
        return "file missing"
    if size != manifest.get("bytes"):
        return f"truncated ({size} of {manifest.get('bytes')} bytes)"
    algorithm = algorithm_of(manifest)
    if file_digest(checkpoint, algorithm) != manifest.get(algorithm):
        return "checksum mismatch"
    return None


def _verify_dir(checkpoint: Path, manifest: dict) -> str | None:
    """A sharded checkpoint (a DCP directory): every file the manifest lists, with its size and checksum."""
    files = manifest.get("files")
    if not checkpoint.is_dir() or not isinstance(files, dict):
        return "directory missing"
    for name, entry in sorted(files.items()):
        path = checkpoint / name
        try:
            size = path.stat().st_size
        except OSError:
            return f"shard {name} missing"
        if size != entry.get("bytes"):
            return f"shard {name} truncated ({size} of {entry.get('bytes')} bytes)"
        algorithm = algorithm_of(entry)
        if file_digest(path, algorithm) != entry.get(algorithm):
            return f"shard {name}: checksum mismatch"
    algorithm = algorithm_of(manifest)
    try:
        if combined_digest(files, algorithm) != manifest.get(algorithm):
            return "manifest inconsistent"
    except KeyError:  # a file entry without the manifest's own checksum
        return "manifest inconsistent"
    return None


def remove_checkpoint(path: Path) -> None:
    """A checkpoint file or sharded directory, and its manifest."""
    _remove_path(path)
    manifest_path(path).unlink(missing_ok=True)


def _remove_path(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@dataclass(frozen=True)
class Found:
    path: Path | None
    """The newest valid checkpoint, or None."""
    step: int | None
    rejected: list[tuple[Path, str]]
    """Newer checkpoints that were not valid, with the reason."""


def step_checkpoints(directory: Path) -> list[tuple[int, Path]]:
    """``step-N.ckpt`` files (or sharded directories) of a checkpoint directory, newest first (by the step in their name)."""
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := STEP_NAME.match(p.name))]
    return sorted(found, reverse=True)


def find_latest_valid(directory: Path) -> Found:
    """The newest checkpoint that verifies; the ones skipped on the way are reported, not deleted."""
    rejected: list[tuple[Path, str]] = []
    for step, path in step_checkpoints(directory):
        reason = verify(path)
        if reason is None:
            return Found(path, step, rejected)
        rejected.append((path, reason))
    return Found(None, None, rejected)


def sweep_debris(directory: Path) -> list[Path]:
    """Remove what killed or failed saves left in a checkpoint directory; returns what was removed.

    That is: hidden temporaries (``.<name>.tmp``; ``.<name>.old``, a sharded checkpoint set aside while its
    step was saved again), step checkpoints without a manifest (their write never finished), then manifests
    whose checkpoint is gone (and a ``last.ckpt`` link left pointing at nothing). Only safe while no save can
    be running: the caller holds the run directory's lock.
    """
    if not directory.is_dir():
        return []
    removed = [
        path
        for path in sorted(directory.iterdir())
        if (path.name.startswith(".") and path.name.endswith((".tmp", ".old")))
        or (STEP_NAME.match(path.name) and read_manifest(path) is None)
    ]
    for path in removed:
        _remove_path(path)
    for manifest in sorted(directory.glob("*.ckpt" + MANIFEST_SUFFIX)):
        checkpoint = manifest.with_name(manifest.name.removesuffix(MANIFEST_SUFFIX))
        if not checkpoint.exists():  # follows links: a link to a removed checkpoint is gone too
            gone = [manifest, checkpoint] if checkpoint.is_symlink() else [manifest]
            for path in gone:
                _remove_path(path)
            removed += gone
    return removed
