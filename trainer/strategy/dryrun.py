"""FSDP at the job's full size, checked on one machine: the run's model built on the meta device and sharded
by the strategy's own code (``apply_fsdp``) over torch's fake process group with the job's world size (the
technique torchtitan uses for its dry runs). Nothing is allocated and nothing is sent; what comes out is read
from the sharded parameters themselves (DTensor local shapes), not computed from a formula:

- each rank's parameter, gradient and optimizer bytes (ranks hold unequal shards: dimension 0 is split into
  chunks of ``ceil(dim0 / shard ranks)``, so the last ranks may hold less or nothing);
- the collectives of one training step, per sharding unit: all-gather before its forward, again before its
  backward when it reshards in between (the units; the roots keep theirs), a reduce-scatter of its gradients,
  and under hybrid sharding an all-reduce of the reduced shards across the replicas; with their bytes;
- the checkpoint's size per rank (a DCP shard file holds the rank's fp32 parameters and optimizer state).

``trainer plan`` runs it after its own measurement (the fake process group is made and destroyed here).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Collective:
    kind: str  # all_gather, reduce_scatter, all_reduce
    unit: str
    count: int  # per training step
    bytes: int  # the full tensor it moves (gathered output / reduced input), per call
    group: int  # ranks taking part


@dataclass
class ScaleCheck:
    world: int
    shard_over: int
    units: int
    rank0_params: int
    min_rank_params: int
    params_bytes: dict[str, int]  # rank 0 and the smallest rank
    optimizer_bytes: dict[str, int]
    checkpoint_bytes: dict[str, int]
    collectives: list[Collective] = field(default_factory=list)
    seconds: float = 0.0

    def step_bytes(self) -> int:
        """What one rank sends per step (ring algorithms: (n-1)/n of each collective's tensor, twice for an
        all-reduce)."""
        total = 0.0
        for c in self.collectives:
            share = (c.group - 1) / c.group if c.group > 1 else 0.0
            total += c.count * c.bytes * share * (2 if c.kind == "all_reduce" else 1)
        return int(total)


def _local_numel(
    shape: list[int], placements: Any, mesh_shape: tuple[int, ...], coord: tuple[int, ...]
) -> int:
    """Elements a mesh coordinate holds of a tensor sharded with ``placements`` (torch.chunk on each dim)."""
    local = list(shape)
    for mesh_dim, placement in enumerate(placements):
        if placement.is_shard():
            dim, n, i = placement.dim, mesh_shape[mesh_dim], coord[mesh_dim]
            size = math.ceil(local[dim] / n) if local[dim] else 0
            local[dim] = max(0, min(size, local[dim] - i * size))
    return math.prod(local)


def check(model_builder: Any, world: int, nodes: int, hybrid: bool, precision: str, offload: bool,
          activation_checkpointing: bool, optimizer_states: int) -> ScaleCheck:  # fmt: skip
    """Shard the model over a fake process group of ``world`` ranks (``nodes`` x ``world // nodes`` for
    hybrid). ``optimizer_states``: fp32 tensors the optimizer keeps per parameter (AdamW: 2)."""
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from trainer.strategy.fsdp import apply_fsdp

    started = time.perf_counter()
    dist.init_process_group("fake", rank=0, world_size=world, store=FakeStore())
    try:
        if hybrid and nodes > 1:
            mesh = init_device_mesh("cpu", (nodes, world // nodes), mesh_dim_names=("replicate", "shard"))
        else:
            mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("shard",))
        with torch.device("meta"):
            module = model_builder()
        if precision == "bf16-true":
            module = module.to(torch.bfloat16)
        units, roots = apply_fsdp(module, mesh, precision, offload, activation_checkpointing)
        params = [p for p in module.parameters() if isinstance(p, DTensor)]
        shard_dims = [i for i, name in enumerate(mesh.mesh_dim_names) if name == "shard"]
        shard_n = mesh.shape[shard_dims[0]]
        first = tuple(0 for _ in mesh.shape)
        last = tuple(n - 1 if i in shard_dims else 0 for i, n in enumerate(mesh.shape))
        counts = {
            where: sum(_local_numel(list(p.shape), p.placements, tuple(mesh.shape), coord) for p in params)
            for where, coord in (("rank 0", first), ("smallest", last))
        }
        elem = params[0].element_size() if params else 4
        compute = 2 if precision in ("bf16-mixed", "bf16-true") else elem
        trains = {id(p) for p in params if p.requires_grad}
        collectives: list[Collective] = []
        for kind, mods in (("unit", units), ("root", roots)):
            for i, mod in enumerate(mods):
                numel = sum(p.numel() for p in mod.parameters())
                grads = sum(p.numel() for p in mod.parameters() if id(p) in trains)
                name = f"{kind} {i}" if kind == "unit" else f"root {type(mod).__name__}"
                collectives.append(
                    Collective("all_gather", name, 2 if kind == "unit" else 1, numel * compute, shard_n)
                )
                if grads:
                    collectives.append(Collective("reduce_scatter", name, 1, grads * 4, shard_n))
                    if hybrid and nodes > 1:
                        size = math.ceil(grads / shard_n) * 4
                        collectives.append(Collective("all_reduce", name, 1, size, nodes))
        per = {k: v * elem for k, v in counts.items()}
        opt = {k: v * 4 * optimizer_states for k, v in counts.items()}
        return ScaleCheck(
            world=world, shard_over=shard_n, units=len(units), rank0_params=counts["rank 0"],
            min_rank_params=counts["smallest"], params_bytes=per, optimizer_bytes=opt,
            checkpoint_bytes={k: counts[k] * 4 + opt[k] for k in counts}, collectives=collectives,
            seconds=time.perf_counter() - started,
        )  # fmt: skip
    finally:
        dist.destroy_process_group()
