"""Which GPU each process of a job drives, where the scheduler shows a task only some of its node's GPUs.

Lightning assumes every process of a node sees every GPU of the node and drives GPU number ``local_rank``.
Many SLURM sites bind GPUs to tasks instead (``--gpus-per-task``, ``--gpu-bind=single:1``/``closest``/
``map_gpu``, a cli_filter that adds one): each task's ``CUDA_VISIBLE_DEVICES`` then holds one GPU (or a few),
Lightning refuses ``devices=8`` ("your machine only has: [0]", Lightning-AI/pytorch-lightning#16828) and a
process that did start would ask for an ordinal it cannot see. Here each process drives visible GPU
``local_rank % visible``: ``cuda:0`` under one GPU per task; with two visible per task, tasks 0 and 1 drive
their first and second. Where every task sees the whole node nothing changes (``local_rank % 8 ==
local_rank``)."""

from __future__ import annotations

from typing import Any


def gpus_bound_per_task(devices: int, visible: int) -> bool:
    """True when a scheduler launched this process and shows it fewer GPUs than the node's processes use
    (``devices``), in equal shares: the site binds GPUs to tasks."""
    from trainer.config.validate import launched_externally

    return launched_externally() and 0 < visible < devices and devices % visible == 0


def lightning_accelerator(accelerator: str, devices: int) -> Any:
    """What the Trainer gets for ``accelerator`` (``cpu``, ``gpu`` or ``mps``): the name, or the accelerator
    below where the site binds GPUs to tasks."""
    if accelerator == "gpu":
        import torch

        if gpus_bound_per_task(devices, torch.cuda.device_count()):
            return task_bound_gpu_accelerator()
    return accelerator


def task_bound_gpu_accelerator() -> Any:
    """Lightning's CUDA accelerator, minus its check that this process sees all ``devices`` GPUs, driving
    visible GPU ``local_rank % visible`` (from the Lightning namespace of the run)."""
    import torch

    from trainer.namespace import pl_module

    base = pl_module("accelerators").CUDAAccelerator

    class TaskBoundCUDAAccelerator(base):  # type: ignore[misc, valid-type]
        @staticmethod
        def parse_devices(devices: Any) -> list[int]:
            return list(range(int(devices))) if not isinstance(devices, list) else [int(d) for d in devices]

        @staticmethod
        def get_parallel_devices(devices: Any) -> list[torch.device]:
            return parallel_devices(devices, torch.cuda.device_count())

    return TaskBoundCUDAAccelerator()


def parallel_devices(local_ranks: list[int], visible: int) -> list[Any]:
    """The device each local rank drives: visible GPU ``local_rank % visible``."""
    import torch

    return [torch.device("cuda", rank % visible) for rank in local_ranks]
