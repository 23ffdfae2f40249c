"""Writing and reading checkpoint files: atomic, checksummed, and loaded without running any code.

- A checkpoint is written under a hidden temporary name and renamed into place; a write that fails (disk
  full, quota, read-only file system, ...) removes what it wrote and raises one ``CheckpointWriteError``.
- Nothing read from a checkpoint can name code to run: single files load weights-only, and a sharded (DCP)
  checkpoint is read through ``SafeDCPReader``. A checkpoint that tries is refused with ``UnsafeCheckpoint``,
  whose message is one line.
"""

from __future__ import annotations

import io
import logging
import os
import pickle
import re
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from trainer.checkpoint.manifest import (
    checkpoint_manifest,
    fsync_dir,
    new_digest,
    remove_checkpoint,
    write_manifest,
)
from trainer.namespace import fabric_module

log = logging.getLogger("trainer")

META_FILE = fabric_module("utilities.load")._METADATA_FILENAME
"""``meta.pt``: in a sharded checkpoint, everything but the model and optimizer shards (Lightning's name)."""


class UnsafeCheckpoint(ValueError):
    """A checkpoint that names code to run (or is not what it claims to be): it was not loaded."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written; what the write had put on disk is removed. ``errno`` is the
    cause's where known, ``filename`` the checkpoint."""

    def __str__(self) -> str:
        return f"could not write checkpoint {self.filename}: {self.strerror}"


def write_error(path: str | os.PathLike, err: BaseException) -> CheckpointWriteError | None:
    """``err``, raised while writing ``path``, as a ``CheckpointWriteError``; None when it is no failed write.

    The OSError behind it says why where one is known: torch.save turns its file's OSError into a
    RuntimeError, and DCP wraps each rank's failure in a CheckpointException, whose copies from other ranks
    no longer carry their cause (there its own message says why)."""
    cause = _os_error(err)
    if cause is not None:
        return CheckpointWriteError(cause.errno, cause.strerror or str(cause), str(path))
    if isinstance(err, CheckpointException) and err.failures:
        first = next(iter(err.failures.values()))[0]
        reason = (str(first).strip().splitlines() or [type(first).__name__])[0]
        return CheckpointWriteError(None, reason, str(path))
    return None


def _os_error(err: BaseException | None) -> OSError | None:
    seen: set[int] = set()
    pending = [err]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError):
            return current
        pending += [current.__cause__, current.__context__]
        if isinstance(current, CheckpointException):
            pending += [exc for exc, _ in current.failures.values()]
    return None


class _HashingWriter:
    """A write-only file object that hashes what passes through it (torch.save needs write and flush).

    A big record is written by ``pool``'s thread while this one hashes it: the write releases the GIL, so
    the two overlap (the hash does not release it), and the write takes the time of the slower of the two.
    The record's buffer is torch's until ``write`` returns, so both finish first."""

    BIG = 1 << 20

    def __init__(self, f: Any, pool: Any) -> None:
        self.f, self.pool, self.digest, self.bytes = f, pool, new_digest(), 0

    def write(self, data: bytes) -> int:
        self.bytes += len(data)
        if len(data) < self.BIG:
            self.digest.update(data)
            return self.f.write(data)
        written = self.pool.submit(self.f.write, data)
        self.digest.update(data)
        return written.result()

    def flush(self) -> None:
        self.f.flush()


def save_file(obj: Any, path: Path) -> tuple[int, str]:
    """``torch.save`` into ``path``, fsynced; returns its size and checksum (manifest.DIGEST).

    Without the zip format's CRC-32 of each record (``torch.serialization.set_crc32_options``): the checksum
    of the whole file, checked before every load, covers every byte already, and the CRC pass cost a third
    of the write speed. ``torch.load`` reads such files; a zip tool may warn about their CRCs."""
    crc = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)
    try:
        with path.open("wb") as f, ThreadPoolExecutor(1, thread_name_prefix="checkpoint-io") as pool:
            writer = _HashingWriter(f, pool)
            torch.save(obj, writer)
            f.flush()
            os.fsync(f.fileno())
    finally:
        torch.serialization.set_crc32_options(crc)
    return writer.bytes, writer.digest.hexdigest()


def load_file(path: str | os.PathLike, **kwargs: Any) -> Any:
    """``torch.load`` weights-only: anything that would name code to run is refused in one line."""
    try:
        return torch.load(path, weights_only=True, **kwargs)
    except pickle.UnpicklingError as err:
        raise UnsafeCheckpoint(f"{path}: refused to load: {_refused(err)}") from None


def _refused(err: pickle.UnpicklingError) -> str:
    """What torch's weights-only unpickler refused, from its (long, many-line) message."""
    named = re.search(r"GLOBAL ([\w.]+)", str(err))
    what = named.group(1) if named else "something"
    return f"it names {what}, which loading with weights_only=True refuses (it could run code)"


class DeferredCopies:
    """The tensors of a checkpoint that only the optimizer step changes (parameters, optimizer state), copied
    on the writer thread while the next step's forward and backward run, instead of while training waits.

    Training calls ``check()`` before it changes them (the next optimizer step, or any wait for the write):
    it blocks until the copies are made, then compares each source's version counter with the one it had at
    the save. Any in-place change bumps it, so a changed counter means a copy may hold a later value: the
    checkpoint is then never published. (A change through ``.data`` bypasses the counter; see the README.)
    ``steady``: the storages (``untyped_storage().data_ptr()``) of those tensors."""

    def __init__(self, steady: set[int], step: int) -> None:
        self.steady, self.step = steady, step
        self.jobs: list[tuple[torch.Tensor, torch.Tensor, int]] = []  # (source, destination, version)
        self.failed = False  # a copy raised (the write raises it)
        self.changed = False  # a source changed before the check
        self.copied = threading.Event()
        self.checked = threading.Event()

    def add(self, src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
        self.jobs.append((src, dst, src._version))
        return dst

    def copy(self) -> None:
        """On the writer thread: every copy, then tell ``check``."""
        try:
            # A plain memory copy (numpy's, which releases the GIL), not torch's copy_: that would start a
            # second OpenMP thread team on this thread, and every later training step ran ~2x slower with it
            # on 2 cores (measured). Only contiguous host tensors are deferred (see snapshot).
            for src, dst, _ in self.jobs:
                np.copyto(_bytes(dst), _bytes(src))
        except BaseException:
            self.failed = True
            raise
        finally:
            self.copied.set()

    def check(self) -> float:
        """On the training thread, before the sources may change: wait for the copies, compare the version
        counters, let the writer go on. Returns the seconds it waited."""
        started = time.perf_counter()
        self.copied.wait()
        waited = time.perf_counter() - started
        self.changed = any(src._version != version for src, _, version in self.jobs)
        self.jobs = []  # no reference to the live tensors is kept
        self.checked.set()
        return waited

    def wait_checked(self) -> bool:
        """On the writer thread: whether the copies are the state at the save, once training has checked.
        False, without waiting longer, when the training thread has ended without checking (interpreter
        shut-down joins this thread: it must not wait for ever)."""
        while not self.checked.wait(0.5):
            if not threading.main_thread().is_alive():
                return False
        return not (self.failed or self.changed)


def _bytes(tensor: torch.Tensor) -> np.ndarray:
    """A contiguous host tensor's memory as a flat numpy array of bytes (any dtype, bfloat16 included)."""
    return tensor.reshape(-1).view(torch.uint8).numpy()


def snapshot(obj: Any, into: Any = None, later: DeferredCopies | None = None) -> Any:
    """A copy of a checkpoint that training can no longer change: every tensor copied to host memory (the
    state dict's tensors are the live parameters), containers rebuilt, other values shared (immutable).

    ``into``: an earlier snapshot no longer in use (its write finished); its tensors of the same place, shape
    and dtype are copied into rather than allocated again (fresh pages cost ~3x the copy itself).
    ``later``: host tensors of its ``steady`` storages get their destination now and are copied by
    ``later.copy()``."""
    if isinstance(obj, torch.Tensor):
        if (
            later is not None
            and type(obj) is torch.Tensor  # no subclass, no Parameter (the state dict's are detached)
            and obj.is_cpu
            and obj.layout == torch.strided
            and obj.is_contiguous()
            and not obj.requires_grad
            and obj.untyped_storage().data_ptr() in later.steady
        ):
            reuse = _reusable(into, obj)
            return later.add(
                obj, into if reuse else torch.empty_like(obj, memory_format=torch.contiguous_format)
            )
        src = obj.detach()
        return into.copy_(src) if _reusable(into, src) else src.to("cpu", copy=True)
    if isinstance(obj, dict):
        old = into if isinstance(into, dict) else {}
        copied = {k: snapshot(v, old.get(k), later) for k, v in obj.items()}
        return copied if type(obj) is dict else type(obj)(copied)  # OrderedDict, Lightning's AttributeDict
    if isinstance(obj, list):
        old_items = into if isinstance(into, list) and len(into) == len(obj) else [None] * len(obj)
        return [snapshot(v, o, later) for v, o in zip(obj, old_items, strict=True)]
    if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        return tuple(snapshot(v, None, later) for v in obj)
    return obj


def _reusable(into: Any, src: torch.Tensor) -> bool:
    """Whether ``into`` (a tensor of an earlier snapshot, or anything else) can take a copy of ``src``."""
    return (
        isinstance(into, torch.Tensor)
        and into.is_cpu
        and into.shape == src.shape
        and into.dtype == src.dtype
        and into.is_contiguous()
        and not src.is_sparse
    )


class AtomicCheckpointIO(fabric_module("plugins.io.torch_io").TorchCheckpointIO):
    """Write to a hidden temporary file, fsync, rename over the target, then write the manifest.

    ``storage_options={"manifest": {...}}`` adds fields to the manifest (config hash, metric, reason), and
    ``{"then": f}`` calls ``f()`` once the checkpoint is published (linking ``last.ckpt``, retention).
    ``last_write`` holds the size and duration of the latest write, for the throughput figures.

    ``async_save``: the write (serialisation, hashing, fsync, publication) runs on a background thread, on a
    snapshot of the checkpoint; at most one is in flight (a new save first waits for the previous one), and
    ``wait()`` returns once it is published, raising what it failed with. A process killed mid-write leaves a
    hidden temporary file and no manifest: the previous checkpoint is the newest valid one.
    ``{"steady": storages}`` in the storage options (see ``DeferredCopies``): those tensors are copied on the
    writer thread, and ``settle()`` must be called before they change; the file is published only if they
    did not change before it.
    """

    def __init__(self, async_save: bool = False) -> None:
        super().__init__()
        self.last_write: dict[str, float] = {}
        self.async_save = async_save
        self.defer_copies = True  # off for the rest of the run once a deferred copy was found changed
        self.dropped_step: int | None = None  # see protocols.CopiesLater
        self._pending: Any = None  # the Future of the write in flight
        self._later: DeferredCopies | None = None  # its copies still to be checked
        self._executor: Any = None
        self._staged: Any = None  # the latest snapshot, whose buffers the next one reuses

    def settle(self) -> float:
        """Block until the write in flight has copied the live tensors it defers, and check them (call it
        before anything may change them). The seconds it waited."""
        later, self._later = self._later, None
        if later is None:
            return 0.0
        waited = later.check()
        if later.changed:
            self.defer_copies, self.dropped_step = False, later.step
            log.warning(
                "checkpoint: step %d's save is not published: a parameter or optimizer state changed in place "
                "between a save and the next optimizer step (the previous checkpoint stays the newest); later "
                "saves copy the state before training goes on",
                later.step,
            )
        return waited

    def wait(self) -> None:
        """Block until the background write (if any) is published; re-raise its error here."""
        self.settle()
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def teardown(self) -> None:
        self.wait()
        self._staged = None
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None
    ) -> None:
        if not self.async_save:
            self._write(checkpoint, path, storage_options)
            return
        self.wait()
        steady = (storage_options or {}).get("steady")
        step = int(checkpoint.get("global_step", 0))
        later = DeferredCopies(steady, step) if steady and self.defer_copies else None
        # the previous snapshot is written: its buffers take this one
        copy = self._staged = snapshot(checkpoint, into=self._staged, later=later)
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-writer")
        self._later = later if later is not None and later.jobs else None
        self._pending = self._executor.submit(self._write, copy, path, storage_options, self._later)

    def _write(
        self,
        checkpoint: dict[str, Any],
        path: str | os.PathLike,
        storage_options: Any = None,
        later: DeferredCopies | None = None,
    ) -> None:
        """Write and publish ``path``, then call ``storage_options["then"]``; nothing is published when
        ``later`` finds its copies changed."""
        if later is not None:
            later.copy()
        target = Path(path)
        tmp = target.with_name(f".{target.name}.tmp")
        started = time.perf_counter()
        published = False
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            size, digest = save_file(checkpoint, tmp)
            if later is not None:
                checking = time.perf_counter()
                if not later.wait_checked():
                    tmp.unlink(missing_ok=True)
                    return
                started += time.perf_counter() - checking  # the write's own time, for its speed
            os.replace(tmp, target)
            published = True
            fsync_dir(target.parent)  # make the rename itself durable
            seconds = time.perf_counter() - started
            manifest = checkpoint_manifest(
                target.name, size, digest, int(checkpoint.get("global_step", 0)),
                int(checkpoint.get("epoch", 0)), seconds,
            )  # fmt: skip
            manifest.update((storage_options or {}).get("manifest", {}))
            write_manifest(target, manifest)
        except Exception as err:
            with suppress(OSError):
                if published:  # in place but without its manifest it is no valid checkpoint: remove both
                    remove_checkpoint(target)
                else:
                    tmp.unlink(missing_ok=True)
            error = write_error(target, err)
            if error is None:
                raise
            raise error from None
        self.last_write = {"bytes": size, "seconds": seconds, "step": int(checkpoint.get("global_step", 0))}
        then = (storage_options or {}).get("then")
        if then is not None:
            then()

    def load_checkpoint(
        self, path: Any, map_location: Any = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        # Never unpickle arbitrary objects: a checkpoint file must not be able to run code when loaded.
        try:
            return super().load_checkpoint(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as err:
            raise UnsafeCheckpoint(f"{path}: refused to load: {_refused(err)}") from None


# ---------------------------------------------------------------------------------------------------------
# Sharded (DCP) checkpoints

# All that a DCP ``.metadata`` file names (found by listing the globals of ones this torch writes): its own
# dataclasses, sizes, dtypes, layouts, and the path it was saved under. Checked against (module, name), so
# nothing else a module holds (``os``, ``torch`` in the metadata module) is reachable through it.
_METADATA_GLOBALS = frozenset(
    [("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorStorageMetadata", "BytesStorageMetadata",
        "ChunkStorageMetadata", "TensorProperties", "_MEM_FORMAT_ENCODING")]
    + [("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
       ("torch.serialization", "_get_layout"), ("collections", "OrderedDict")]
    # pathlib's classes moved to pathlib._local in Python 3.13; a checkpoint saved there names that module
    + [(module, name) for module in ("pathlib", "pathlib._local") for name in ("PosixPath", "PurePosixPath")]
)  # fmt: skip


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, file: Any, where: Path) -> None:
        super().__init__(file)
        self.where = where

    def find_class(self, module: str, name: str) -> Any:
        # A dtype (torch.float32, ...) is pickled as the torch module's attribute of that name.
        dtype = module == "torch" and isinstance(vars(torch).get(name), torch.dtype)
        if not dtype and (module, name) not in _METADATA_GLOBALS:
            raise UnsafeCheckpoint(
                f"{self.where}: refused to load: it names {module}.{name}, "
                "which a checkpoint's metadata never holds"
            )
        return super().find_class(module, name)


def read_dcp_metadata(path: Path) -> Metadata:
    """A DCP ``.metadata`` file, unpickled with only the classes such a file holds (torch's own reader
    unpickles it with plain ``pickle.load``: a crafted file would run any code it names)."""
    with path.open("rb") as f:
        try:
            metadata = _MetadataUnpickler(f, path).load()
        except UnsafeCheckpoint:
            raise
        except Exception as err:  # not a pickle, cut short: unpickling fails in many ways
            raise UnsafeCheckpoint(
                f"{path}: not a checkpoint's metadata ({type(err).__name__}: {err})"
            ) from None
    if not isinstance(metadata, Metadata):
        raise UnsafeCheckpoint(f"{path}: holds a {type(metadata).__name__}, not a checkpoint's metadata")
    for info in (metadata.storage_data or {}).values():
        if not isinstance(info, _StorageInfo):
            raise UnsafeCheckpoint(f"{path}: holds a {type(info).__name__} where a shard's place belongs")
        # Shards are files of the checkpoint's own directory: a name with a path in it reads elsewhere.
        if os.path.basename(info.relative_path) != info.relative_path:
            raise UnsafeCheckpoint(
                f"{path}: refused to load: it points outside its checkpoint ({info.relative_path})"
            )
    return metadata


class _WeightsOnlyBytes:
    """Stands in for DCP's load planner while shards are read. DCP's planner unpickles a non-tensor entry
    (an optimizer's hyper-parameters) with ``torch.load(weights_only=False)``: here it is loaded weights-only
    first, and the planner gets only bytes saved again from what that accepted."""

    def __init__(self, planner: Any, where: Path) -> None:
        self._planner, self._where = planner, where

    def __getattr__(self, name: str) -> Any:  # everything else is the planner's own
        return getattr(self._planner, name)

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        try:
            entry = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as err:
            raise UnsafeCheckpoint(
                f"{self._where}: refused to load its entry {read_item.dest_index.fqn}: {_refused(err)}"
            ) from None
        clean = io.BytesIO()
        torch.save(entry, clean)
        clean.seek(0)
        self._planner.load_bytes(read_item, clean)


class SafeDCPReader(FileSystemReader):
    """DCP's file-system reader without its two ways to run code from a checkpoint: ``.metadata`` is read by
    ``read_dcp_metadata`` and non-tensor entries are loaded weights-only (tensors are, by DCP itself)."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        metadata = read_dcp_metadata(Path(self._get_metadata_path(kwargs.get("rank"))))
        if getattr(metadata, "storage_meta", None) is None:  # older torch wrote none
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def read_data(self, plan: Any, planner: Any) -> Any:
        return super().read_data(plan, _WeightsOnlyBytes(planner, Path(self.path)))


@contextmanager
def _safe_dcp(path: Path) -> Iterator[SafeDCPReader]:
    reader = SafeDCPReader(path)
    # Read once before DCP does: inside DCP a failed metadata read is logged with its traceback, retried as
    # rank-local metadata and raised as another error; here the refusal is raised as itself.
    reader.read_metadata()
    try:
        yield reader
    except CheckpointException as err:  # DCP gathers every rank's failure; a refusal is raised as itself
        refused = next((exc for exc, _ in err.failures.values() if isinstance(exc, UnsafeCheckpoint)), None)
        if refused is None:
            raise
        raise refused from None


def load_sharded(state: dict[str, Any], path: Path) -> None:
    """DCP's load into ``state`` (in place, resharded to this run's ranks), through ``SafeDCPReader``."""
    import torch.distributed.checkpoint as dcp

    with _safe_dcp(path) as reader:
        dcp.load(state, storage_reader=reader)


def read_sharded(path: Path, keys: set[str]) -> dict[str, Any]:
    """The entries ``keys`` of a sharded checkpoint as full tensors, in this one process (no process group),
    through ``SafeDCPReader``."""
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    with _safe_dcp(path) as reader:
        return _load_state_dict_from_keys(keys, storage_reader=reader)
