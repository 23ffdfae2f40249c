"""How the model is spread over processes: the Lightning strategy for ``strategy.name``."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from trainer.config.schema import StrategyConfig


def build_strategy(
    strategy: StrategyConfig, precision: str, accelerator: str, async_save: bool = False
) -> Any:
    """``async_save`` (checkpoint.async_save) reaches the strategy only where it writes the checkpoints itself
    (FSDP); other checkpoints are written by the checkpoint IO plugin."""
    if strategy.name == "auto":
        return "auto"
    backend = strategy.backend or ("nccl" if accelerator == "gpu" else "gloo")
    timeout = timedelta(seconds=strategy.timeout_s)
    if strategy.name == "fsdp":
        from trainer.strategy.fsdp import FSDP2Strategy

        if strategy.cpu_offload and backend == "nccl":
            # Offloaded gradient shards are reduced (norm, clipping, finite check) in host memory: NCCL
            # cannot, so host tensors get gloo beside NCCL.
            backend = "cpu:gloo,cuda:nccl"

        return FSDP2Strategy(
            sharding=strategy.sharding,
            activation_checkpointing=strategy.activation_checkpointing,
            cpu_offload=strategy.cpu_offload,
            precision=precision,
            process_group_backend=backend,
            timeout=timeout,
            async_save=async_save,
        )
    from trainer.namespace import pl_module

    return pl_module("strategies").DDPStrategy(
        process_group_backend=backend,
        timeout=timeout,
        find_unused_parameters=strategy.find_unused_parameters,
        static_graph=strategy.static_graph,
    )
