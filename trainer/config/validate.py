"""Turn a composed config into typed slices and check what single fields cannot: the machine and the pairs.

Everything here runs before any process is spawned and before any file is written; each failure is one
``ConfigError`` line.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import glob
import math
import os
import sys
from typing import Any

from omegaconf import DictConfig, OmegaConf

from trainer.config.errors import ConfigError
from trainer.config.schema import TextDataConfig, TrainConfig, TrainerConfig, resolve_text_files
from trainer.strategy.devices import gpus_bound_per_task

# What each built-in component learns from, so an impossible pair fails at once instead of in the first step.
_TASK_OF_TARGET: dict[str, str] = {
    "trainer.models.gpt.GPTModule": "lm",
    "trainer.models.mlp.MLPModule": "classification",
    "trainer.data.text.TextDataModule": "lm",
    "trainer.data.synthetic.SyntheticDataModule": "lm",
    "trainer.data.digits.DigitsDataModule": "classification",
}


def check_components(cfg: DictConfig, choices: Any) -> None:
    """A model and a data module that cannot train together fail here, before their configs are resolved."""
    model_target = OmegaConf.select(cfg, "model._target_", throw_on_resolution_failure=False)
    data_target = OmegaConf.select(cfg, "data._target_", throw_on_resolution_failure=False)
    model_task, data_task = _TASK_OF_TARGET.get(model_target), _TASK_OF_TARGET.get(data_target)
    if model_task and data_task and model_task != data_task:
        fits = [name for name, target in _DATA_OPTIONS.items() if _TASK_OF_TARGET[target] == model_task]
        raise ConfigError(
            "data", choices.get("data") or data_target,
            f"data={' or data='.join(fits)} for model={choices.get('model') or model_target} (a {model_task} model)",
        )  # fmt: skip


def unknown_keys(node: Any, prefix: str) -> None:
    """Keys a typed node does not declare. Hydra's ``+key=value`` can add them even to a typed config."""
    if not isinstance(node, DictConfig):
        return
    schema = OmegaConf.get_type(node)
    if dataclasses.is_dataclass(schema):
        declared = [f.name for f in dataclasses.fields(schema)]
        for key in node:
            if key not in declared:
                raise ConfigError.unknown_key(f"{prefix}{key}", prefix.rstrip("."), declared)
    for key in node:
        unknown_keys(node._get_node(key), f"{prefix}{key}.")


_DATA_OPTIONS = {
    "text": "trainer.data.text.TextDataModule",
    "synthetic": "trainer.data.synthetic.SyntheticDataModule",
    "digits": "trainer.data.digits.DigitsDataModule",
}


def to_typed(cfg: DictConfig) -> tuple[TrainConfig, dict[str, Any]]:
    """Resolve interpolations and build each slice's dataclass (running its ``__post_init__`` checks).

    Also returns the Lightning Trainer flags that ``trainer`` holds beyond its schema (checked against
    Lightning's ``Trainer``), which the dataclass cannot hold."""
    from trainer.config.targets import check_trainer_flags

    declared = [f.name for f in dataclasses.fields(TrainerConfig)]
    extra = [key for key in cfg.trainer if key not in declared]
    trainer = OmegaConf.to_container(cfg.trainer, resolve=True)
    flags = {key: trainer[key] for key in extra}
    check_trainer_flags(declared, flags)
    if extra:  # built from a copy without them; the config itself (config.yaml) keeps them
        cfg = copy.deepcopy(cfg)
        for key in extra:
            del cfg.trainer[key]
    unknown_keys(cfg, "")
    slices: dict[str, Any] = {}
    for field in dataclasses.fields(TrainConfig):
        node = cfg[field.name]
        slices[field.name] = _build(node, field.name) if isinstance(node, DictConfig) else node
    return TrainConfig(**slices), flags


def _build(node: DictConfig, key: str) -> Any:
    """``OmegaConf.to_object`` of a node; when it fails, its nested typed nodes are built one by one so the
    error names its full key (only then: building each twice doubled the cost of a sweep's checks)."""
    try:
        return OmegaConf.to_object(node)
    except ConfigError as err:
        for child_key in node:
            child = node._get_node(child_key)
            if isinstance(child, DictConfig) and dataclasses.is_dataclass(OmegaConf.get_type(child)):
                _build(child, f"{key}.{child_key}")
        raise err.with_prefix(key) from None


def no_cuda_here() -> bool:
    """True where no CUDA (or ROCm) device can exist: macOS, or Linux without a GPU driver's device files.
    Answers without importing torch, which costs a launcher or a sweep's parent seconds of start-up on
    every machine without a GPU (elsewhere torch is asked)."""
    if sys.platform == "darwin":
        return True
    if not sys.platform.startswith("linux"):
        return False
    # NVIDIA's driver, WSL2's GPU paravirtualisation, AMD's ROCm
    return not any(os.path.exists(p) for p in ("/proc/driver/nvidia", "/dev/nvidia0", "/dev/dxg", "/dev/kfd"))


def _cuda_available() -> bool:
    if no_cuda_here():
        return False
    import torch

    return torch.cuda.is_available()


def resolve_accelerator(requested: str) -> str:
    """``auto`` becomes what this machine has; the answer is what Lightning gets (``cpu``, ``gpu`` or ``mps``)."""
    if requested == "cpu":
        return "cpu"
    if requested in ("gpu", "cuda"):
        if not _cuda_available():
            raise ConfigError("trainer.accelerator", requested, "cpu or auto (no CUDA GPU is visible here)")
        return "gpu"
    if requested == "mps":
        import torch

        if not torch.backends.mps.is_available():
            raise ConfigError("trainer.accelerator", requested, "cpu or auto (MPS is not available here)")
        return "mps"
    return "gpu" if _cuda_available() else "cpu"


def launched_externally() -> bool:
    """True inside a multi-process launcher (torchrun, SLURM's srun) that has already set ranks."""
    if "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return True
    return int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in os.environ


def check_here(conf: TrainConfig) -> str:
    """Checks across slices and against this machine. Returns the accelerator Lightning should use."""
    trainer = conf.trainer
    if trainer.num_nodes > 1 and not launched_externally():
        raise ConfigError(
            "trainer.num_nodes",
            trainer.num_nodes,
            "1 here (several nodes need a cluster launcher: `trainer submit` sends the run to SLURM)",
        )
    _check_portable(conf)
    accelerator = resolve_accelerator(trainer.accelerator)
    available = _device_count(accelerator)
    if accelerator == "gpu" and gpus_bound_per_task(trainer.devices, available):
        pass  # the site shows each task its own GPUs: fit.py drives them (trainer/strategy/devices.py)
    elif trainer.devices > available:
        raise ConfigError(
            "trainer.devices",
            trainer.devices,
            f"at most {available} (the {accelerator} devices of this machine)",
        )
    _check_precision(conf, accelerator)
    _check_offload(conf, accelerator)
    if str(conf.precision.value).startswith("bf16") and accelerator == "gpu":
        import torch

        if not torch.cuda.is_bf16_supported():
            raise ConfigError("precision", conf.precision.value, "32 or 16-mixed (this GPU has no bf16)")
    return accelerator


def check_for_cluster(conf: TrainConfig) -> str:
    """The checks of ``check`` that hold on a cluster's nodes rather than this machine, plus the cluster
    request's own consistency. Imports no torch (``trainer submit`` must stay fast). Returns the accelerator
    the nodes will use (``cpu`` or ``gpu``)."""
    cluster, trainer = conf.cluster, conf.trainer
    if cluster.name == "local":
        raise ConfigError(
            "cluster", "local",
            "a SLURM cluster profile (cluster=slurm or your own cluster file); `trainer train` runs here",
        )  # fmt: skip
    _check_portable(conf)
    if trainer.accelerator == "mps":
        raise ConfigError("trainer.accelerator", "mps", "auto, cpu or gpu on a SLURM cluster")
    if trainer.accelerator in ("gpu", "cuda") and cluster.gpus_per_node == 0:
        raise ConfigError(
            "cluster.gpus_per_node", 0, f"{trainer.devices} (trainer.devices) with trainer.accelerator=gpu"
        )
    accelerator = "gpu" if cluster.gpus_per_node > 0 and trainer.accelerator != "cpu" else "cpu"
    if accelerator == "gpu" and cluster.gpus_per_node != trainer.devices:
        raise ConfigError(
            "cluster.gpus_per_node", cluster.gpus_per_node,
            f"{trainer.devices}: one training process per GPU, and trainer.devices={trainer.devices}",
        )  # fmt: skip
    _check_precision(conf, accelerator)
    _check_offload(conf, accelerator)
    if cluster.signal not in conf.checkpoint.save_on_signals:
        raise ConfigError(
            "cluster.signal", cluster.signal,
            f"one of checkpoint.save_on_signals ({', '.join(conf.checkpoint.save_on_signals)}), so the run "
            "saves and asks to be requeued when it arrives",
        )  # fmt: skip
    return accelerator


def _check_portable(conf: TrainConfig) -> None:
    """What must hold wherever the run trains."""
    strategy = conf.strategy
    if strategy.name == "fsdp" and str(conf.precision.value) == "16-mixed":
        # FSDP2 with fp16 needs a sharded gradient scaler that Lightning's ModelParallelStrategy lacks.
        raise ConfigError("precision", "16-mixed", "32, bf16-mixed or bf16-true with strategy=fsdp")
    _check_text_corpus(conf)
    if conf.resume not in ("auto", "never") and not os.path.exists(conf.resume):
        raise ConfigError("resume", conf.resume, "auto, never or the path of an existing checkpoint")
    conf.profile.check_world(conf.trainer.devices * conf.trainer.num_nodes)


def check_checkpoint_format(checkpoint: str | None, strategy: str) -> None:
    """A sharded (FSDP) checkpoint is a directory that only ``strategy=fsdp`` reads; it reshards to any number
    of ranks, so that is the way on (or export it to one file first)."""
    if checkpoint and strategy != "fsdp" and os.path.isdir(checkpoint):
        raise ConfigError(
            "strategy", strategy,
            f"fsdp (with any trainer.devices) to continue from the sharded checkpoint {checkpoint}; "
            "`trainer export` turns it into one file for other uses",
        )  # fmt: skip
    if checkpoint and strategy == "fsdp" and os.path.isfile(checkpoint):
        # Lightning's full-file path into FSDP2 maps optimizer state by parameter order, which our parameter
        # groups (matrices first) do not follow: Adam's moments would land on the wrong parameters.
        raise ConfigError(
            "strategy", "fsdp",
            f"ddp or auto to continue from the single-file checkpoint {checkpoint} (FSDP continues from its own "
            "sharded checkpoints only)",
        )  # fmt: skip


def _check_precision(conf: TrainConfig, accelerator: str) -> None:
    precision = str(conf.precision.value)
    if precision == "16-mixed" and accelerator != "gpu":
        raise ConfigError(
            "precision", precision, f"32, bf16-mixed or bf16-true on {accelerator} (16-mixed needs CUDA)"
        )


def _check_offload(conf: TrainConfig, accelerator: str) -> None:
    if conf.strategy.name == "fsdp" and conf.strategy.cpu_offload and accelerator != "gpu":
        # FSDP2's offload moves shards between GPU and host memory; on CPU they are in host memory already.
        raise ConfigError(
            "strategy.cpu_offload",
            "true",
            f"false on {accelerator} (it offloads GPU memory; here it already is CPU memory)",
        )


@functools.lru_cache(maxsize=8)
def _corpus_size(path: str | None, pattern: str) -> tuple[int, int]:
    """Number of files and bytes of a corpus; cached, since a sweep checks every trial against the same one."""
    files = resolve_text_files(path, pattern)
    return len(files), sum(os.path.getsize(f) for f in files)


def _check_text_corpus(conf: TrainConfig) -> None:
    """The corpus exists, has text, and fills at least one global batch (with fewer training windows than
    that, Lightning would train zero steps and call the run done). One pass over the files."""
    data = conf.data
    if not isinstance(data, TextDataConfig):
        return
    count, total = _corpus_size(data.path, data.pattern)
    if not count:
        if data.path is not None and not glob.has_magic(data.path) and not os.path.exists(data.path):
            raise ConfigError("data.path", data.path, "an existing file, directory or glob (no such path)")
        raise ConfigError(
            "data.path", data.path, f"a path whose pattern {data.pattern!r} matches files (none do)"
        )
    if data.max_bytes is not None:
        total = min(total, data.max_bytes)
    if total < 2 * (data.seq_len + 1):
        raise ConfigError(
            "data.path",
            data.path,
            f"a corpus of at least {2 * (data.seq_len + 1)} bytes for seq_len={data.seq_len} (it has {total})",
        )
    windows = (int(total * (1.0 - data.val_fraction)) - 1) // data.seq_len
    needed = data.batch_size * conf.trainer.devices * conf.trainer.num_nodes
    if windows < needed:
        raise ConfigError(
            "data.path", data.path,
            f"a corpus of at least {needed} training samples of seq_len={data.seq_len} for one global batch "
            f"(batch_size x devices x nodes); it has {windows}",
        )  # fmt: skip


def _device_count(accelerator: str) -> int:
    if accelerator == "gpu":
        import torch

        return torch.cuda.device_count()
    if accelerator == "mps":
        return 1
    # CPU "devices" are processes; more of them than cores only makes each one slower.
    return os.cpu_count() or 1


def check_finite(resolved: Any, key: str = "") -> None:
    """No number of the config is nan or infinite: none of its settings means anything with one (a learning
    rate of inf trains to nan, every_n_minutes=nan never saves)."""
    if isinstance(resolved, dict):
        for child, value in resolved.items():
            check_finite(value, f"{key}.{child}" if key else str(child))
    elif isinstance(resolved, list):
        for i, value in enumerate(resolved):
            check_finite(value, f"{key}[{i}]")
    elif isinstance(resolved, float) and not math.isfinite(resolved):
        raise ConfigError(key, resolved, "a finite number")
