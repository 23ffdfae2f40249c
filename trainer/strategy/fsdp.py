"""FSDP2 (``torch.distributed.fsdp.fully_shard``) as a Lightning strategy, for any LightningModule.

Built on Lightning's ``ModelParallelStrategy`` (process group, device mesh, DCP save/load), which is the
route to FSDP2 that also runs on CPU over gloo; Lightning's ``FSDPStrategy`` is FSDP1 and refuses CPU. Two
things differ from Lightning's strategy:

- The sharding is applied here, from ``strategy`` config, instead of in each model's ``configure_model``:
  the model code stays free of distributed code (the same ``GPT`` trains under auto, DDP and FSDP, and a
  hand-written loop uses it too). A module can name its own sharding units with ``fsdp_units()``; otherwise
  every entry of every ``nn.ModuleList`` is one (the transformer blocks) and the root takes the rest.
- Checkpoints are published like every other checkpoint of the project: written under a hidden name, then
  renamed into place, then described by a manifest listing each file's size and SHA-256 (each rank hashes
  its own shard file, so the cost does not grow with the number of ranks). A write that fails on any rank
  removes the partial directory and raises ``CheckpointWriteError`` on every rank together; loading goes
  through ``SafeDCPReader``, so nothing in a checkpoint can run code.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from contextlib import suppress
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException

from trainer.checkpoint.io import (
    META_FILE,
    CheckpointWriteError,
    load_file,
    load_sharded,
    save_file,
    snapshot,
    write_error,
)
from trainer.checkpoint.manifest import (
    DIGEST,
    checkpoint_manifest,
    combined_digest,
    file_digest,
    fsync_dir,
    remove_checkpoint,
    write_manifest,
)
from trainer.namespace import fabric_module, pl, pl_module
from trainer.protocols import ShardingUnits

_materialize_distributed_module = fabric_module("utilities.init")._materialize_distributed_module
_optimizers_to_device = fabric_module("utilities.optimizer")._optimizers_to_device
TrainerFn = pl_module("trainer.states").TrainerFn

log = logging.getLogger("trainer")


def sharding_units(module: nn.Module) -> list[nn.Module]:
    """The submodules that get their own ``fully_shard`` call (their parameters are gathered together)."""
    if isinstance(module, ShardingUnits):
        return list(module.fsdp_units())
    units: list[nn.Module] = []
    for child in module.modules():
        if isinstance(child, nn.ModuleList) and not any(child is u or _contains(u, child) for u in units):
            units.extend(child)
    return units


def _roots(module: nn.Module) -> list[nn.Module]:
    own = [name for name, _ in module.named_parameters(recurse=False)]
    if own:
        raise ValueError(
            f"strategy=fsdp: {type(module).__name__} holds parameters itself ({', '.join(own)}); "
            "FSDP shards submodules, so put them in one"
        )
    roots = [
        (name, child) for name, child in module.named_children() if any(True for _ in child.parameters())
    ]
    for name, child in roots:
        if isinstance(child, (nn.ModuleList, nn.ModuleDict)):
            # A container has no forward of its own, so FSDP's gather hook would never run for it.
            raise ValueError(
                f"strategy=fsdp: {type(module).__name__}.{name} is a {type(child).__name__} called entry by entry; "
                "FSDP gathers a module's parameters when its forward runs: put the network in one nn.Module "
                "(as trainer/models/gpt.py does) or name the units with fsdp_units()"
            )
    return [child for _, child in roots]


def _contains(outer: nn.Module, inner: nn.Module) -> bool:
    return any(m is inner for m in outer.modules())


def apply_fsdp(
    module: nn.Module, mesh: Any, precision: str, cpu_offload: bool, activation_checkpointing: bool
) -> tuple[list[nn.Module], list[nn.Module]]:
    """``fully_shard`` the module over ``mesh`` as the strategy does: each unit (with its activation
    checkpointing wrapper), then the roots. Returns (units, roots). Also what ``trainer plan`` applies over a
    fake process group of the job's size (trainer/strategy/dryrun.py)."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    units = sharding_units(module)
    if activation_checkpointing and units:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

        # The wrapper's state-dict hooks strip its prefix: checkpoints are the same with and without it.
        units = _wrap_in_place(module, units, checkpoint_wrapper)
    mp = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if precision == "bf16-mixed"
        else MixedPrecisionPolicy()
    )
    offload = CPUOffloadPolicy() if cpu_offload else OffloadPolicy()
    for unit in units:
        fully_shard(unit, mesh=mesh, mp_policy=mp, offload_policy=offload)
    # The roots gather what no unit holds (embeddings, final norm, head). FSDP gathers a module's
    # parameters in a hook on its forward, and a LightningModule's training_step calls its submodules
    # rather than its own forward: so each direct child with parameters is a root, not the module itself.
    roots = _roots(module)
    for root in roots:
        # Needed again right after the forward for the backward: not resharded in between.
        fully_shard(root, mesh=mesh, mp_policy=mp, offload_policy=offload, reshard_after_forward=False)
    return units, roots


def compile_per_unit(module: nn.Module, units: list[nn.Module]) -> list[nn.Module]:
    """Move an in-place ``nn.Module.compile()`` of a module that holds sharding units onto the units.

    FSDP2 gathers a unit's parameters in hooks around its forward, and Dynamo does not trace those hooks:
    a compiled network breaks its graph at every block boundary and recompiles around the hooks. Compiled
    one unit (block) at a time instead, each block is one graph and the hooks run between them, the way
    torchtitan compiles its blocks. In place, so parameter names (and checkpoints) do not change. Returns the
    modules whose compilation was moved (none when nothing holding a unit was compiled)."""
    moved = [
        m
        for m in module.modules()
        if getattr(m, "_compiled_call_impl", None) is not None and any(_contains(m, u) for u in units)
    ]
    if not moved:
        return []
    for m in moved:
        m._compiled_call_impl = None
    for unit in units:
        if getattr(unit, "_compiled_call_impl", None) is None:
            unit.compile()
    return moved


def _wrap_in_place(root: nn.Module, targets: list[nn.Module], wrap: Any) -> list[nn.Module]:
    """Replace each target by ``wrap(target)`` in its parent; returns the wrapped modules."""
    wanted = {id(t) for t in targets}
    wrapped: list[nn.Module] = []
    for parent in list(root.modules()):
        for name, child in list(parent.named_children()):
            if id(child) in wanted:
                new = wrap(child)
                setattr(parent, name, new)  # a ModuleList's entries are its attributes "0", "1", ... too
                wrapped.append(new)
    return wrapped


class FSDP2Strategy(pl_module("strategies").ModelParallelStrategy):
    """Fully sharded data parallel over all ranks (``full``) or within each node, replicated across nodes
    (``hybrid``); optional per-unit activation checkpointing, CPU offload and bf16 parameters with fp32
    gradient reduction (``precision=bf16-mixed``)."""

    def __init__(
        self,
        *,
        sharding: str,
        activation_checkpointing: bool,
        cpu_offload: bool,
        precision: str,
        process_group_backend: str,
        timeout: timedelta,
        async_save: bool = False,
    ) -> None:
        # One data-parallel dimension over every rank: the sampler then gives each rank its own samples.
        super().__init__(
            data_parallel_size="auto",
            tensor_parallel_size=1,
            save_distributed_checkpoint=True,
            process_group_backend=process_group_backend,
            timeout=timeout,
        )
        self.sharding, self.activation_checkpointing, self.cpu_offload = (
            sharding,
            activation_checkpointing,
            cpu_offload,
        )
        self.precision_name = precision
        self.report: dict[str, Any] = {}
        self.last_write: dict[str, float] = {}
        self._sharding_mesh: Any = None
        self.async_save = async_save
        self._pending: Any = None  # the Future of the background write in flight
        self._executor: Any = None
        self._checkpoint_group: Any = None  # gloo, for the background writes' own collectives

    def setup_environment(self) -> None:
        # Every rank is one data-parallel replica slot (Lightning's "auto" would make it the node count).
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    # ------------------------------------------------------------------ sharding

    def setup(self, trainer: pl.Trainer) -> None:
        # ModelParallelStrategy.setup, minus its demand that the module shards itself in configure_model:
        # here the sharding comes from the strategy's own config (see the module docstring).
        assert self.model is not None and self.accelerator is not None
        self.accelerator.setup(trainer)
        self.model = self.precision_plugin.convert_module(self.model)  # bf16-true: cast before sharding
        self._shard(self.model)
        _materialize_distributed_module(self.model, self.root_device)
        self.model_to_device()
        self.barrier()
        if trainer.state.fn == TrainerFn.FITTING:
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()
        if trainer.state.fn == TrainerFn.FITTING:
            _optimizers_to_device(self.optimizers, self.root_device)

    def model_to_device(self) -> None:
        if not self.cpu_offload:
            super().model_to_device()
        else:  # offloaded shards live in host memory (FSDP moves them itself); the module computes on the GPU
            self.lightning_module._device = self.root_device

    def extra_process_groups(self) -> list[Any]:
        """Process groups besides the default one that collectives run on (the hybrid mesh's)."""
        mesh = self._sharding_mesh
        return [] if mesh is None else [mesh.get_group(dim) for dim in range(mesh.ndim)]

    def _mesh(self) -> Any:
        if self.sharding == "hybrid" and self.num_nodes > 1:
            from torch.distributed.device_mesh import init_device_mesh

            return init_device_mesh(
                self.root_device.type,
                (self.num_nodes, self.num_processes),
                mesh_dim_names=("replicate", "shard"),
            )
        return self.device_mesh["data_parallel"]

    def _shard(self, module: nn.Module) -> None:
        mesh = self._sharding_mesh = self._mesh()
        units, _ = apply_fsdp(
            module, mesh, self.precision_name, self.cpu_offload, self.activation_checkpointing
        )
        if compile_per_unit(module, units):
            log.info("fsdp: compiling each of the %d sharding units instead of the whole model", len(units))
        self._record(module, units, mesh)

    def _record(self, module: nn.Module, units: list[nn.Module], mesh: Any) -> None:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper
        from torch.distributed.tensor import DTensor

        params = list(module.parameters())
        total = sum(p.numel() for p in params)
        local = sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in params)
        locals_ = [local]
        if torch.distributed.is_initialized():
            locals_ = [None] * self.world_size  # type: ignore[list-item]
            torch.distributed.all_gather_object(locals_, local)
        self.report = {
            "strategy": "fsdp",
            "sharding": self.sharding if self.num_nodes > 1 else "full",
            "mesh": {name: int(size) for name, size in zip(mesh.mesh_dim_names, mesh.shape, strict=True)},
            "units": len(units),
            # Counted in the sharded module, not echoed from the config: the wrappers really are in place.
            "checkpointed_units": sum(isinstance(m, CheckpointWrapper) for m in module.modules()),
            "cpu_offload": self.cpu_offload,
            "param_dtype": "bfloat16"
            if self.precision_name == "bf16-mixed"
            else str(params[0].dtype).split(".")[-1],
            "params": total,
            "params_per_rank": locals_,
        }
        if self.global_rank == 0:
            log.info(
                "fsdp: %s sharding over %s, %d units + root, %.2fM parameters, %.2fM on rank 0",
                self.report["sharding"], self.report["mesh"], len(units), total / 1e6, local / 1e6,
            )  # fmt: skip

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        """A DCP directory, published atomically with a manifest (``storage_options["manifest"]`` adds fields).

        A failed write (on any rank) removes the partial directory and raises ``CheckpointWriteError`` on
        every rank together."""
        self.wait()  # at most one write in flight (and its failure, if any, raised here on every rank)
        target = Path(self.broadcast(str(filepath)))
        tmp = target.with_name(f".{target.name}.tmp")
        if self.global_rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # left by a save that was killed
        self.barrier()
        started = time.perf_counter()
        step, epoch = int(checkpoint.get("global_step", 0)), int(checkpoint.get("epoch", 0))
        job = (tmp, target, started, step, epoch, storage_options)
        if self.async_save:
            self._start_background_write(checkpoint, job)
            return
        own: dict[str, dict] | CheckpointWriteError | None
        try:
            self._write_shards(checkpoint, tmp)
            own = _hash_files(tmp, lambda name: name.startswith(f"__{self.global_rank}_"))
        except (Exception, CheckpointException) as err:  # DCP's own exception is no Exception
            own = write_error(target, err)
            if own is None:
                raise
        self._agree_and_publish(own, job, group=None)

    def _agree_and_publish(self, own: Any, job: tuple, group: Any) -> None:
        """Every rank's file hashes (or its write error) to rank 0, which publishes the directory; rank 0's
        outcome is raised on every rank together. Called by every rank, on ``group`` (None: the default)."""
        tmp, target, started, step, epoch, storage_options = job
        # Gathered on every rank whatever happened, so that a rank that failed and one that did not never
        # wait for each other in different collectives.
        gathered: list[Any] = [own]
        if torch.distributed.is_initialized():
            gathered = [None] * self.world_size
            torch.distributed.all_gather_object(gathered, own, group=group)
        failed = next((part for part in gathered if isinstance(part, CheckpointWriteError)), None)
        if self.global_rank == 0:
            if failed is None:
                try:
                    self._publish(tmp, target, gathered, started, step, epoch, storage_options)
                except OSError as err:
                    failed = write_error(target, err)  # an OSError: never None
            if failed is not None:
                shutil.rmtree(tmp, ignore_errors=True)
        if torch.distributed.is_initialized():  # rank 0's outcome, which every rank raises or not together
            box = [failed]
            torch.distributed.broadcast_object_list(box, src=0, group=group)
            failed = box[0]
        if failed is not None:
            raise failed from None

    # ------------------------------------------------------------------ background writes

    def wait(self) -> None:
        """Block until the background write (if any) is published; raise its error (on every rank alike)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def teardown(self) -> None:
        with suppress(Exception):  # a failed write was raised by wait() already, or the run failed before
            self.wait()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        super().teardown()

    def _start_background_write(self, checkpoint: dict[str, Any], job: tuple) -> None:
        """DCP's ``async_save``: the shards are copied to host memory here (the only part training waits
        for), then written, hashed and published on a background thread. Its collectives (DCP's planning,
        the hashes, the outcome) run on a gloo group of their own, never on the one training uses."""
        from concurrent.futures import ThreadPoolExecutor

        from torch.distributed.checkpoint import async_save

        tmp = job[0]
        if self._checkpoint_group is None:  # collective: every rank reaches its first save together
            # The start-up timeout, not the per-step one: a rank waits here for the slowest rank's write.
            self._checkpoint_group = torch.distributed.new_group(backend="gloo", timeout=self._timeout)
        if self._executor is None:  # (again after teardown: the run's final save comes after it)
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-writer")
        tmp.mkdir(parents=True, exist_ok=True)
        shards = {"state_dict": checkpoint.pop("state_dict")}
        shards.update({f"optimizer_{i}": s for i, s in enumerate(checkpoint.pop("optimizer_states", []))})
        written = async_save(shards, checkpoint_id=tmp, process_group=self._checkpoint_group)
        rest = snapshot(checkpoint) if self.global_rank == 0 else None
        self._pending = self._executor.submit(self._finish_background_write, written, rest, job)

    def _finish_background_write(self, written: Any, rest: dict | None, job: tuple) -> None:
        tmp, target = job[0], job[1]
        own: dict[str, dict] | CheckpointWriteError | None
        try:
            written.result()
            if rest is not None:
                save_file(rest, tmp / META_FILE)
            own = _hash_files(tmp, lambda name: name.startswith(f"__{self.global_rank}_"))
        except (Exception, CheckpointException) as err:
            # Whatever it was, this rank still joins the collectives below, or the others would wait forever.
            own = write_error(target, err) or CheckpointWriteError(
                None, f"{type(err).__name__}: {err}", str(target)
            )
        self._agree_and_publish(own, job, group=self._checkpoint_group)
        then = (job[5] or {}).get("then")
        if then is not None and self.global_rank == 0:
            then()

    def _write_shards(self, checkpoint: dict[str, Any], tmp: Path) -> None:
        """Lightning's sharded save (collective: each rank writes its shards, rank 0 the rest to meta.pt),
        with meta.pt written by ``save_file``, so a failure says its OSError."""
        from torch.distributed.checkpoint import save

        tmp.mkdir(parents=True, exist_ok=True)
        shards = {"state_dict": checkpoint.pop("state_dict")}
        shards.update({f"optimizer_{i}": s for i, s in enumerate(checkpoint.pop("optimizer_states", []))})
        save(shards, checkpoint_id=tmp)
        if self.global_rank == 0:
            save_file(checkpoint, tmp / META_FILE)

    def _publish(
        self, tmp: Path, target: Path, gathered: list[dict[str, dict]], started: float, step: int, epoch: int,
        storage_options: Any,
    ) -> None:  # fmt: skip
        """Rank 0: rename the complete directory into place and describe it by its manifest. On an OSError,
        what was in place before is put back."""
        files: dict[str, dict] = {}
        for part in gathered:
            files.update(part)
        files.update(_hash_files(tmp, lambda name: name not in files))
        fsync_dir(tmp)
        # A save at a step saved before: the old one is moved aside, not deleted, until the new one is
        # complete (a crash in between leaves the previous checkpoints valid).
        old = target.with_name(f".{target.name}.old")
        moved_aside = published = False
        try:
            if target.exists():
                remove_checkpoint(old)
                os.replace(target, old)
                moved_aside = True
            os.replace(tmp, target)
            published = True
            fsync_dir(target.parent)
            seconds = time.perf_counter() - started
            size = sum(f["bytes"] for f in files.values())
            manifest = checkpoint_manifest(target.name, size, combined_digest(files), step, epoch, seconds)
            manifest["files"] = files
            manifest.update((storage_options or {}).get("manifest", {}))
            write_manifest(target, manifest)
        except OSError:
            with suppress(OSError):
                if published:  # without its manifest the new directory is no valid checkpoint
                    shutil.rmtree(target)
                if moved_aside:  # the old one, whose manifest is still in place
                    os.replace(old, target)
            raise
        remove_checkpoint(old)
        self.last_write = {"bytes": size, "seconds": seconds, "step": step}

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        """Lightning's sharded load, with DCP's reader replaced by one that runs no code from the checkpoint
        (``SafeDCPReader``): model and optimizer resharded to this run's ranks, the rest from meta.pt."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
            set_optimizer_state_dict,
        )

        path = Path(self.broadcast(str(checkpoint_path)))
        if not path.is_dir():  # a full file (refused before a run starts, see config/validate.py)
            return super().load_checkpoint(path, weights_only=True)
        module = self.model
        model_state = {"state_dict": get_model_state_dict(module)}
        load_sharded(model_state, path)
        module.load_state_dict(model_state["state_dict"], strict=self.lightning_module.strict_loading)
        for idx, optimizer in enumerate(self.optimizers):
            key = f"optimizer_{idx}"
            optimizer_state = {key: get_optimizer_state_dict(module, optimizer)}
            load_sharded(optimizer_state, path)
            set_optimizer_state_dict(
                module, optimizer, optim_state_dict=optimizer_state[key],
                options=StateDictOptions(cpu_offload=True),
            )  # fmt: skip
        return load_file(path / META_FILE)


def _hash_files(folder: Path, wanted: Any) -> dict[str, dict]:
    """Size and SHA-256 of the wanted files (all written and fsynced already: by DCP, meta.pt by save_file)."""
    return {
        path.name: {"bytes": path.stat().st_size, DIGEST: file_digest(path)}
        for path in sorted(folder.iterdir())
        if path.is_file() and wanted(path.name)
    }
