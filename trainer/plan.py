"""``trainer plan``: the memory one device needs for a run, before anything is launched.

How the figures are made (no GPU, no process group, nothing written):

- The model is built on the meta device and then given fake storage (``FakeTensorMode``), and its optimizer
  is built on it: every tensor has its shape and dtype and no memory, so a large model is planned in seconds.
- Parameters, gradients and optimizer state are counted from those objects, exactly: the optimizer takes one
  step, so its state is what it really allocates (AdamW: two tensors per parameter and a step counter).
- Activations are measured, not modelled: one training step (``training_step``, backward, optimizer step) runs
  on fake tensors of the run's first real batch, under a dispatch mode that adds up every storage the step
  creates and frees. Its peak, less the gradients and optimizer state, is the "activations" line. The fake
  step runs CPU kernels under CPU autocast, whatever the run's device: a GPU's kernels can differ a little.
- The strategy then divides what it divides: FSDP shards parameters, gradients and optimizer state over the
  ranks of its shard group (dimension 0 of each parameter, as ``fully_shard`` does: rank 0 holds the largest
  piece) and adds the gathered units (the largest two, in the compute dtype) and the roots, which stay
  gathered; DDP adds its gradient buckets (a second copy of the gradients); CPU offload moves the model state
  to host memory. Activation checkpointing is measured with the same wrappers the FSDP strategy uses.

A model that cannot be built or stepped on fake tensors is planned from its parameters alone (built on the
meta device), and one line says that activations are missing.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import warnings
import weakref
from dataclasses import asdict, dataclass, field
from typing import Any

from trainer.config.errors import ConfigError

USAGE = """usage: trainer plan [--json] [-cd DIR] [key=value ...]

The memory each device needs for `trainer train [key=value ...]` (or `trainer submit ...`): parameters,
gradients, optimizer state, activations at the configured batch, communication buffers, and whether that
fits the device (this machine's, or `cluster.gpu_mem_gb` of a cluster profile). Builds the model on fake
tensors: no GPU, no processes, nothing written. If it does not fit, says which change would.

options:
  --json               the figures as JSON (bytes)
  -cd, --config-dir D  also look for config files (your own model/, cluster/, ...) in D

examples:
  trainer plan                                         # the default experiment on this machine
  trainer plan experiment=gpt_150m cluster=slurm cluster.gpus_per_node=1 cluster.gpu_mem_gb=6
  trainer plan strategy=fsdp trainer.devices=8 strategy.activation_checkpointing=true --json
"""

GiB = 2**30
MiB = 2**20
RESERVE_BYTES = 512 * MiB
"""Kept free for what is not a tensor of the run: the CUDA context and allocator slack on a GPU, Python,
torch and the data loader on a CPU."""
FIT_FRACTION = 0.95
"""A run fits when its tensors and the reserve take at most this share of the device (fragmentation)."""


# --------------------------------------------------------------------------------------------- measuring


class PeakTracker:
    """Bytes of live tensor storages created inside it, and their peak (a ``TorchDispatchMode``)."""

    def __init__(self) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils.weak import WeakIdKeyDictionary

        tracker = self
        self.live = self.peak = 0
        self._seen = WeakIdKeyDictionary()

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
                out = func(*args, **(kwargs or {}))
                tracker._count(out)
                return out

        self.mode = _Mode()

    def _count(self, out: Any) -> None:
        import torch
        from torch.utils._pytree import tree_leaves

        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            if storage in self._seen:
                continue
            nbytes = storage.nbytes()
            self._seen[storage] = weakref.finalize(storage, self._free, nbytes)
            self.live += nbytes
            self.peak = max(self.peak, self.live)

    def _free(self, nbytes: int) -> None:
        self.live -= nbytes


@dataclass
class Measured:
    """What one fake training step of the whole (unsharded) model shows."""

    model: str
    params: int
    """Parameter count."""
    param_shapes: list[tuple[list[int], int, bool]]
    """Each parameter's shape, bytes per element, and whether it trains."""
    optimizer: str | None
    optimizer_state: list[tuple[list[int], list[int], int]]
    """(parameter shape, state tensor shape, bytes per element) of every optimizer state tensor."""
    buffers_bytes: int
    step_peak_bytes: int | None
    """Peak bytes a training step creates (gradients, activations, temporaries); None: not measured."""
    units: list[int] = field(default_factory=list)
    """Parameter count of each FSDP unit (the model's ModuleList entries or ``fsdp_units()``)."""
    batch_size: int | None = None
    note: str | None = None


def _first_optimizer(configured: Any) -> Any:
    """The optimizer in whatever ``configure_optimizers`` returned (one, a list, a dict, a tuple of lists)."""
    import torch

    if isinstance(configured, torch.optim.Optimizer):
        return configured
    if isinstance(configured, dict):
        return _first_optimizer(configured.get("optimizer"))
    if isinstance(configured, (list, tuple)) and configured:
        return _first_optimizer(configured[0])
    return None


def _optimizer_of(module: Any) -> Any:
    """The module's optimizer. A learning-rate schedule that asks the Trainer for the run's length cannot be
    built here; the optimizer the run gives the module (``optim``) then stands in, its state is the same."""
    try:
        return _first_optimizer(module.configure_optimizers())
    except Exception:
        hparams = getattr(module, "hparams", {})
        for partial in (getattr(module, "optimizer", None), hparams.get("optimizer") if hparams else None):
            if callable(partial):
                return partial(params=module.parameters())
        raise


def _batch_of(c: Any) -> Any:
    from trainer.fit import build_data

    data = build_data(c)
    with contextlib.suppress(Exception):
        data.prepare_data()
    data.setup("fit")
    batches = iter(data.train_dataloader())
    batch = next(batches)
    del batches  # its worker processes, if any, end here rather than at exit
    return batch


def _fake_step(module: Any, optimizer: Any, batch: Any, precision: str) -> None:
    import torch

    autocast = {
        "bf16-mixed": torch.autocast("cpu", dtype=torch.bfloat16),
        "16-mixed": torch.autocast("cpu", dtype=torch.float16),
    }.get(precision, contextlib.nullcontext())
    if optimizer is not None:
        optimizer.zero_grad(set_to_none=True)
    with autocast:
        out = module.training_step(batch, 0)
    loss = out["loss"] if isinstance(out, dict) else out
    loss.backward()
    if optimizer is not None:
        optimizer.step()


def _eager(c: Any) -> Any:
    """The run with ``model.compile`` off: compiled kernels would run on fake tensors (the eager step's
    memory is what is planned; compiling fuses some of it away, so the plan errs on the safe side)."""
    import dataclasses

    model = c.resolved["model"]
    if not model.get("compile"):
        return c
    return dataclasses.replace(c, resolved={**c.resolved, "model": {**model, "compile": False}})


def _why(err: BaseException) -> str:
    text = str(err.__cause__ or err).strip().splitlines()
    return f"{type(err.__cause__ or err).__name__}: {text[0] if text else ''}"


def _to_empty_keeping_ties(module: Any) -> Any:
    """``module.to_empty(device="cpu")``, with parameters shared by several modules (tied embeddings) still
    shared afterwards (``to_empty`` gives each place its own copy)."""
    places: dict[int, list[tuple[Any, str]]] = {}
    for sub in module.modules():
        for name, p in sub._parameters.items():
            if p is not None:
                places.setdefault(id(p), []).append((sub, name))
    module = module.to_empty(device="cpu")
    for (first, first_name), *rest in places.values():
        for sub, name in rest:
            sub._parameters[name] = first._parameters[first_name]
    return module


def measure(c: Any, activation_checkpointing: bool = False) -> Measured:
    """One fake training step of the run's model at its batch (see the module docstring). A model that cannot
    be built on fake tensors (its ``__init__`` copies tensors, say) is built on the meta device instead; a
    step that cannot run on either leaves activations unmeasured, and the optimizer's state then comes from
    one step with zero gradients."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._pytree import tree_leaves, tree_map

    from trainer.fit import build_model
    from trainer.strategy.fsdp import _wrap_in_place, sharding_units

    c = _eager(c)
    precision = c.conf.precision.value
    batch = _batch_of(c)
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # Built on the meta device (an __init__ that copies its arguments, as save_hyperparameters does,
        # cannot copy fake tensors), then given fake CPU storage: the step runs CPU kernels (flash
        # attention, as a GPU would; the meta device would take the math path and overstate it).
        with torch.device("meta"):
            module = build_model(c)
        with fake:
            module = _to_empty_keeping_ties(module)
            if precision == "bf16-true":
                module = module.to(torch.bfloat16)
            units = sharding_units(module)
            unit_sizes = [sum(p.numel() for p in u.parameters()) for u in units]
            if activation_checkpointing and units:
                from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

                _wrap_in_place(module, units, checkpoint_wrapper)
            optimizer = _optimizer_of(module)
            placed = tree_map(lambda t: fake.from_tensor(t) if isinstance(t, torch.Tensor) else t, batch)
            note, peak = None, None
            try:
                _fake_step(module, optimizer, placed, precision)  # creates the optimizer's state
                tracker = PeakTracker()
                with tracker.mode:
                    _fake_step(module, optimizer, placed, precision)
                peak = tracker.peak
            except Exception as err:
                note = f"activations not estimated: one training step on fake tensors failed ({_why(err)})"
                if optimizer is not None:
                    for p in module.parameters():
                        p.grad = torch.zeros_like(p) if p.requires_grad else None
                    optimizer.step()
    params = list(module.parameters())
    shapes = {id(p): list(p.shape) for p in params}
    state = [
        (shapes[id(p)], list(t.shape), t.element_size())
        for p, s in (optimizer.state.items() if optimizer is not None else [])
        for t in s.values()
        if isinstance(t, torch.Tensor)
    ]
    leaves = [t for t in tree_leaves(batch) if isinstance(t, torch.Tensor)]
    return Measured(
        model=type(module).__name__,
        params=sum(p.numel() for p in params),
        param_shapes=[(list(p.shape), p.element_size(), p.requires_grad) for p in params],
        optimizer=type(optimizer).__name__ if optimizer is not None else None,
        optimizer_state=state,
        buffers_bytes=sum(b.numel() * b.element_size() for b in module.buffers()),
        step_peak_bytes=peak,
        units=unit_sizes,
        batch_size=len(leaves[0]) if leaves and leaves[0].dim() else None,
        note=note,
    )


def measure_params_only(c: Any, why: str) -> Measured:
    """The model built on the meta device: its parameters, nothing of a step."""
    import torch

    from trainer.fit import build_model

    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = build_model(_eager(c))
    params = list(module.parameters())
    return Measured(
        model=type(module).__name__,
        params=sum(p.numel() for p in params),
        param_shapes=[(list(p.shape), p.element_size(), p.requires_grad) for p in params],
        optimizer=None,
        optimizer_state=[],
        buffers_bytes=sum(b.numel() * b.element_size() for b in module.buffers()),
        step_peak_bytes=None,
        note=f"activations and optimizer state not estimated: the model could not be built or stepped ({why})",
    )


# ------------------------------------------------------------------------------------------- per device


@dataclass
class Layout:
    strategy: str  # auto, ddp, fsdp
    world: int
    shard_over: int = 1
    """Ranks that share one copy of the model state (FSDP's shard group; 1 otherwise)."""
    compute_bytes: int | None = None
    """Bytes per element of gathered parameters (bf16-mixed FSDP: 2)."""
    offload: bool = False
    activation_checkpointing: bool = False


def _shard(shape: list[int], ranks: int) -> int:
    """Elements rank 0 holds of a tensor split on dimension 0 into ``ranks`` pieces (torch.chunk)."""
    if ranks == 1 or not shape:
        return math.prod(shape)
    return math.ceil(shape[0] / ranks) * math.prod(shape[1:])


@dataclass
class PerDevice:
    params_bytes: int
    grads_bytes: int
    optimizer_bytes: int
    activations_bytes: int | None
    buffers_bytes: int
    comm_bytes: int
    total_bytes: int


def per_device(m: Measured, layout: Layout) -> PerDevice:
    n = layout.shard_over
    params = sum(_shard(s, n) * size for s, size, _ in m.param_shapes)
    grads = sum(_shard(s, n) * size for s, size, trains in m.param_shapes if trains)
    optimizer = sum(
        _shard(ts, n) * size if ts == ps else math.prod(ts) * size for ps, ts, size in m.optimizer_state
    )
    full_grads = sum(math.prod(s) * size for s, size, trains in m.param_shapes if trains)
    # the step's peak holds the full gradients (not sharded, not yet freed); the rest is activations
    activations = None if m.step_peak_bytes is None else max(0, m.step_peak_bytes - full_grads)
    comm = 0
    if layout.strategy == "ddp" and layout.world > 1:
        comm = full_grads  # DDP's gradient buckets: a second copy of the gradients
    elif layout.strategy == "fsdp":
        elem = layout.compute_bytes or (m.param_shapes[0][1] if m.param_shapes else 4)
        unit_params = sorted(m.units, reverse=True)
        rest = m.params - sum(m.units)  # the roots (embeddings, head): gathered for the whole step
        comm = (sum(unit_params[:2]) + rest) * elem
        if layout.world > 1:  # reduce-scatter of the largest unit's gradients
            comm += (unit_params[0] if unit_params else rest) * elem
    if layout.offload:
        params = grads = optimizer = 0
    total = params + grads + optimizer + (activations or 0) + m.buffers_bytes + comm
    return PerDevice(params, grads, optimizer, activations, m.buffers_bytes, comm, total)


def layout_of(conf: Any) -> Layout:
    devices = conf.trainer.devices if isinstance(conf.trainer.devices, int) else 1
    world = devices * conf.trainer.num_nodes
    name = conf.strategy.name
    if name == "auto" and world > 1:
        name = "ddp"
    if name != "fsdp":
        return Layout(name, world)
    hybrid = getattr(conf.strategy, "sharding", "full") == "hybrid" and conf.trainer.num_nodes > 1
    return Layout(
        "fsdp",
        world,
        shard_over=devices if hybrid else world,
        compute_bytes=2 if conf.precision.value in ("bf16-mixed", "bf16-true") else None,
        offload=bool(getattr(conf.strategy, "cpu_offload", False)),
        activation_checkpointing=bool(getattr(conf.strategy, "activation_checkpointing", False)),
    )


# ------------------------------------------------------------------------------------------------ device


def _on_gpu(conf: Any) -> bool:
    accelerator = conf.trainer.accelerator
    if accelerator == "auto":
        import torch

        return conf.cluster.gpus_per_node > 0 or torch.cuda.is_available()
    return accelerator in ("gpu", "cuda")


def device_memory(conf: Any) -> tuple[int | None, str]:
    """(bytes one device has, where that figure comes from)."""
    if _on_gpu(conf):
        if conf.cluster.gpu_mem_gb:
            return int(conf.cluster.gpu_mem_gb * GiB), f"gpu, cluster.gpu_mem_gb={conf.cluster.gpu_mem_gb:g}"
        import torch

        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            return props.total_memory, f"gpu, {props.name}"
        return None, "gpu of unknown memory: set cluster.gpu_mem_gb"
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    per_node = conf.trainer.devices if isinstance(conf.trainer.devices, int) else 1
    return host // per_node, f"cpu, {host / GiB:.1f} GiB of host memory / {per_node} process(es)"


def fits(total: int, device: int | None) -> bool | None:
    return None if device is None else total + RESERVE_BYTES <= FIT_FRACTION * device


# ---------------------------------------------------------------------------------------------- the plan


@dataclass
class Plan:
    model: str
    params: int
    precision: str
    strategy: str
    world: int
    batch_size: int | None
    optimizer: str | None
    per_device: dict
    device_bytes: int | None
    device: str
    fits: bool | None
    would_fit: list[str]
    notes: list[str]
    scale: dict | None = None
    """FSDP over several ranks: the sharding applied over a fake process group of the job's size
    (trainer/strategy/dryrun.py): per-rank bytes, collectives per step, checkpoint size per rank."""


def _smallest_fsdp(
    m: Measured, layout: Layout, compute: int | None, device: int
) -> tuple[int, PerDevice] | None:
    for world in (2, 4, 8, 16, 32, 64, 128, 256, 512, 1024):
        if world >= layout.world:
            figures = per_device(m, Layout("fsdp", world, shard_over=world, compute_bytes=compute))
            if fits(figures.total_bytes, device):
                return world, figures
    return None


def _suggestions(c: Any, m: Measured, layout: Layout, device: int) -> list[str]:
    """Changes that make the run fit, each with the figure it gives."""
    out: list[str] = []
    conf = c.conf
    compute = 2 if conf.precision.value in ("bf16-mixed", "bf16-true") else None
    ranks = "ranks (trainer.devices x trainer.num_nodes)"
    if layout.strategy != "fsdp" or layout.shard_over < layout.world:
        found = _smallest_fsdp(m, layout, compute, device)
        if found:
            out.append(f"strategy=fsdp over {found[0]} {ranks} ({found[1].total_bytes / GiB:.1f} GiB)")
    if not out and not layout.activation_checkpointing and m.units:
        with contextlib.suppress(Exception):
            checkpointed = measure(c, activation_checkpointing=True)
            same = per_device(checkpointed, layout)
            if layout.strategy == "fsdp" and fits(same.total_bytes, device):
                out.append(f"strategy.activation_checkpointing=true ({same.total_bytes / GiB:.1f} GiB)")
            elif layout.strategy != "fsdp":
                found = _smallest_fsdp(checkpointed, Layout("fsdp", max(layout.world, 1)), compute, device)
                if found:
                    out.append(f"strategy=fsdp strategy.activation_checkpointing=true over {found[0]} {ranks} "
                               f"({found[1].total_bytes / GiB:.1f} GiB)")  # fmt: skip
    now = per_device(m, layout)
    batch = m.batch_size
    if now.activations_bytes and batch and batch > 1:
        room = FIT_FRACTION * device - RESERVE_BYTES - (now.total_bytes - now.activations_bytes)
        per_sample = now.activations_bytes / batch  # activations grow with the batch
        # the largest divisor of the batch that fits: the same samples per optimizer step with accumulation
        smaller = max((d for d in range(1, batch) if batch % d == 0 and d * per_sample <= room), default=None)
        if smaller:
            steps = batch // smaller * conf.trainer.accumulate_grad_batches
            est = now.total_bytes - now.activations_bytes + per_sample * smaller
            out.append(
                f"data.batch_size={smaller} trainer.accumulate_grad_batches={steps} (about {est / GiB:.1f} GiB)"
            )
    return out


def make_plan(c: Any) -> Plan:
    conf = c.conf
    layout = layout_of(conf)
    notes: list[str] = []
    try:
        m = measure(c, activation_checkpointing=layout.strategy == "fsdp" and layout.activation_checkpointing)
    except ConfigError:
        raise
    except Exception as err:
        m = measure_params_only(c, _why(err))
    if m.note:
        notes.append(m.note)
    figures = per_device(m, layout)
    scale = (
        _fake_group_check(c, layout, m, figures, notes)
        if layout.strategy == "fsdp" and layout.world > 1
        else None
    )
    device, where = device_memory(conf)
    ok = fits(figures.total_bytes, device)
    would = _suggestions(c, m, layout, device) if ok is False else []
    return Plan(
        model=m.model,
        params=m.params,
        precision=conf.precision.value,
        strategy=layout.strategy,
        world=layout.world,
        batch_size=m.batch_size,
        optimizer=m.optimizer,
        per_device=asdict(figures),
        device_bytes=device,
        device=where,
        fits=ok,
        would_fit=would,
        notes=notes,
        scale=scale,
    )


def _fake_group_check(
    c: Any, layout: Layout, m: Measured, figures: PerDevice, notes: list[str]
) -> dict | None:
    """The strategy's own sharding over a fake process group of ``layout.world`` ranks; a note where it
    holds other figures than the plan's."""
    from dataclasses import asdict as as_dict

    from trainer.fit import build_model
    from trainer.strategy import dryrun

    conf = c.conf
    states = (
        2 if m.optimizer in ("AdamW", "Adam") else (len(m.optimizer_state) // max(1, len(m.param_shapes)))
    )
    try:
        result = dryrun.check(lambda: build_model(_eager(c)), layout.world, conf.trainer.num_nodes,
                              layout.shard_over < layout.world, conf.precision.value, layout.offload,
                              layout.activation_checkpointing, states)  # fmt: skip
    except Exception as err:  # the plan stands without it; say why
        notes.append(f"not checked over a fake process group of {layout.world} ranks ({_why(err)})")
        return None
    planned = figures.params_bytes if not layout.offload else None
    if planned is not None and result.params_bytes["rank 0"] != planned:
        notes.append(f"the fake process group gives rank 0 {result.params_bytes['rank 0']:,} parameter bytes, "
                     f"the plan {planned:,}")  # fmt: skip
    out = as_dict(result)
    out["step_bytes_per_rank"] = result.step_bytes()
    return out


def _strategy_words(p: Plan, conf: Any) -> str:
    if p.strategy == "fsdp":
        s = conf.strategy
        extra = [
            x
            for x, on in (
                ("activation checkpointing", s.activation_checkpointing),
                ("CPU offload", s.cpu_offload),
            )
            if on
        ]
        return f"FSDP {s.sharding} over {p.world} rank(s)" + (f", {', '.join(extra)}" if extra else "")
    return f"DDP over {p.world} ranks" if p.strategy == "ddp" else "1 process"


def render(p: Plan, conf: Any) -> str:
    d = p.per_device

    def mib(n: int | None) -> str:
        return "not estimated" if n is None else f"{n / MiB:12,.1f}"

    batch = f"batch {p.batch_size} per device" if p.batch_size else "its batch"
    lines = [
        f"plan: {p.model}, {p.params:,} parameters; {_strategy_words(p, conf)}; precision {p.precision}; {batch}",
        "per device                    MiB",
        f"  parameters        {mib(d['params_bytes'])}",
        f"  gradients         {mib(d['grads_bytes'])}",
        f"  optimizer state   {mib(d['optimizer_bytes'])}" + (f"   {p.optimizer}" if p.optimizer else ""),
        f"  activations       {mib(d['activations_bytes'])}   one training step's peak beyond the model state",
    ]
    if d["buffers_bytes"]:
        lines.append(f"  buffers           {mib(d['buffers_bytes'])}")
    if d["comm_bytes"]:
        what = "gradient buckets" if p.strategy == "ddp" else "gathered parameters and gradient reduction"
        lines.append(f"  communication     {mib(d['comm_bytes'])}   {what}")
    lines.append(f"  total             {mib(d['total_bytes'])}")
    if p.device_bytes is None:
        lines.append(f"device: {p.device}; fit not checked")
    else:
        share = (d["total_bytes"] + RESERVE_BYTES) / p.device_bytes
        verdict = "fits" if p.fits else "does NOT fit"
        lines.append(
            f"device: {p.device_bytes / GiB:.1f} GiB ({p.device}); {verdict}: {share:.0%} with "
            f"{RESERVE_BYTES // MiB} MiB kept for the runtime (at most {FIT_FRACTION:.0%})"
        )
    if p.fits is False:
        lines.append("would fit: " + (" | ".join(p.would_fit) if p.would_fit else "none of FSDP over up to 512 "
                                      "ranks, activation checkpointing or a smaller batch"))  # fmt: skip
    if p.scale:
        lines += _scale_lines(p)
    lines += [f"note: {n}" for n in p.notes]
    return "\n".join(lines)


def _scale_lines(p: Plan) -> list[str]:
    s = p.scale or {}
    calls: dict[str, list[int]] = {}
    for col in s["collectives"]:
        count, size = calls.setdefault(col["kind"], [0, 0])
        calls[col["kind"]] = [count + col["count"], size + col["count"] * col["bytes"]]
    same = "" if s["params_bytes"]["rank 0"] != p.per_device["params_bytes"] else " (as planned above)"
    return [
        f"fake process group: {s['world']} ranks, sharded by the strategy's own code over {s['shard_over']} "
        f"({s['units']} units + roots) in {s['seconds']:.1f} s",
        f"  parameters per rank      {s['params_bytes']['rank 0'] / MiB:10,.1f} MiB on rank 0{same}, "
        f"{s['params_bytes']['smallest'] / MiB:,.1f} MiB on the smallest shard",
        f"  checkpoint per rank      {s['checkpoint_bytes']['rank 0'] / MiB:10,.1f} MiB (fp32 parameters and "
        f"optimizer state: one DCP shard file)",
        "  collectives per step     "
        + ", ".join(
            f"{n} {kind.replace('_', '-')}s ({size / MiB:,.1f} MiB)" for kind, (n, size) in calls.items()
        ),
        f"  sent per rank per step   {s['step_bytes_per_rank'] / MiB:10,.1f} MiB (ring algorithms)",
    ]


def check_job(c: Any, config_dir: str | None) -> str:
    """For ``trainer submit``: the plan of one run whose cluster gives ``gpu_mem_gb``, made in a child process
    (submit itself imports no torch). Raises the one-line refusal when it cannot fit; returns a note."""
    import subprocess

    flags = ["--config-dir", os.path.abspath(config_dir)] if config_dir else []
    own = [
        o
        for o in c.own_overrides
        if o.split("=", 1)[0].lstrip("+~") not in ("run.root", "run.name", "run.dir")
    ]
    proc = subprocess.run([sys.executable, "-m", "trainer", "plan", "--json", *flags, *own],
                          capture_output=True, text=True)  # fmt: skip
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        return f"memory not checked: trainer plan failed ({lines[-1] if lines else proc.returncode})"
    plan = json.loads(proc.stdout)
    need = plan["per_device"]["total_bytes"] / GiB
    have = c.conf.cluster.gpu_mem_gb
    if plan["fits"] is False:
        would = f"; would fit: {plan['would_fit'][0]}" if plan["would_fit"] else ""
        raise ConfigError(
            "cluster.gpu_mem_gb", have,
            f"GPUs that hold the run: it needs {need:.1f} GiB per device and {RESERVE_BYTES // MiB} MiB for the "
            f"runtime (`trainer plan` with the same overrides shows why{would})",
        )  # fmt: skip
    if plan["fits"] is None:
        return f"memory not checked: {plan['device']}"
    return f"memory: {need:.1f} GiB per device of {have:g} GiB (trainer plan)"


def _parse(argv: list[str]) -> tuple[bool, str | None, list[str]]:
    as_json, config_dir, overrides = False, None, []
    it = iter(argv)
    for arg in it:
        name, eq, value = arg.partition("=")
        if arg == "--json":
            as_json = True
        elif name in ("-cd", "--config-dir"):
            config_dir = value if eq else next(it, None)
            if not config_dir or not os.path.isdir(config_dir):
                raise ConfigError(name, config_dir, "an existing config directory")
        elif arg.startswith("-"):
            raise ConfigError("option", arg, "--json or -cd/--config-dir DIR (see `trainer plan --help`)")
        else:
            overrides.append(arg)
    return as_json, config_dir, overrides


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE, end="")
        return 0
    from trainer.config.compose import compose, normalize, session
    from trainer.config.errors import report

    try:
        as_json, config_dir, overrides = _parse(argv)
        overrides = normalize(overrides)
        # a cluster profile: checked for its nodes, as `trainer submit` does; else for this machine
        remote = any(o.startswith("cluster=") and o != "cluster=local" for o in overrides)
        with session():
            c = compose(overrides, config_dir, where="cluster" if remote else "plan")
        from trainer import namespace

        namespace.select(c.namespace or namespace.DEFAULT)  # the Lightning of the user's classes
        plan = make_plan(c)
    except Exception as exc:
        return report(exc)
    if as_json:
        print(json.dumps(asdict(plan), indent=2))
    else:
        print(render(plan, c.conf))
    return 0
