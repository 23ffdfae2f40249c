"""Writing and reading checkpoint files: atomic, checksummed, and loaded without running any code."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Any

import torch

from trainer.checkpoint.manifest import checkpoint_manifest, fsync_dir, write_manifest
from trainer.namespace import fabric_module


class _HashingWriter:
    """A write-only file object that hashes what passes through it (torch.save needs write and flush)."""

    def __init__(self, f: Any) -> None:
        self.f, self.sha256, self.bytes = f, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self.bytes += len(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


class AtomicCheckpointIO(fabric_module("plugins.io.torch_io").TorchCheckpointIO):
    """Write to a hidden temporary file, fsync, rename over the target, then write the manifest.

    ``storage_options={"manifest": {...}}`` adds fields to the manifest (config hash, metric, reason).
    ``last_write`` holds the size and duration of the latest write, for the throughput figures.
    """

    def __init__(self) -> None:
        super().__init__()
        self.last_write: dict[str, float] = {}

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None
    ) -> None:
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp")
        started = time.perf_counter()
        with tmp.open("wb") as f:
            writer = _HashingWriter(f)
            torch.save(checkpoint, writer)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
        fsync_dir(target.parent)  # make the rename itself durable
        seconds = time.perf_counter() - started
        self.last_write = {"bytes": writer.bytes, "seconds": seconds}
        manifest = checkpoint_manifest(
            target.name, writer.bytes, writer.sha256.hexdigest(), int(checkpoint.get("global_step", 0)),
            int(checkpoint.get("epoch", 0)), seconds,
        )  # fmt: skip
        manifest.update((storage_options or {}).get("manifest", {}))
        write_manifest(target, manifest)

    def load_checkpoint(
        self, path: Any, map_location: Any = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        # Never unpickle arbitrary objects: a checkpoint file must not be able to run code when loaded.
        return super().load_checkpoint(path, map_location=map_location, weights_only=True)
