"""The CUDA paths (NCCL, bf16, MFU against the data-sheet peak). Never in CI: run with `pytest -m gpu` on a
machine with NVIDIA GPUs."""

from __future__ import annotations

import glob
import json

import pytest
import torch
from conftest import REPO, column, read_metrics


def nvidia_gpus() -> int:
    """NVIDIA GPUs this machine has, whatever torch makes of them (device files of the driver)."""
    return len(glob.glob("/dev/nvidia[0-9]*"))


pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available() and not nvidia_gpus(), reason="no NVIDIA GPU on this machine"
    ),
]


@pytest.fixture(autouse=True)
def torch_uses_the_gpus():
    """A machine with NVIDIA GPUs that torch cannot use (a CPU build, a CUDA build too new for the driver) fails
    the gpu tier loudly instead of skipping it, which would pass."""
    if not torch.cuda.is_available():
        pytest.fail(f"this machine has {nvidia_gpus()} NVIDIA GPU(s) but torch {torch.__version__} (CUDA "
                    f"{torch.version.cuda}) cannot use them: install a torch build for its driver")  # fmt: skip


def test_bf16_mixed_on_one_gpu_reports_mfu_against_the_table(cli):
    result = cli("train", "precision=bf16-mixed", "trainer.accelerator=gpu", "trainer.max_steps=50",
                 "data=synthetic", "model.n_layer=6", "model.n_embd=384", "model.n_head=6", "model.block_size=256")  # fmt: skip
    assert result.returncode == 0, result.output
    (run_dir,) = result.run_dirs()
    summary = json.loads((run_dir / "run.json").read_text())["summary"]
    assert "data-sheet peak" in summary["peak_source"] or "not in the peak table" in summary["peak_source"]
    mfu = column(read_metrics(run_dir), "train/mfu")
    if "not in the peak table" in summary["peak_source"]:
        pytest.fail(f"{summary['peak_source']}: add its data-sheet figures to trainer/metrics/flops.py")
    assert mfu and all(0 < m <= 1 for m in mfu)  # an empty column is no MFU at all, not a pass
    # NVML telemetry of the GPU the run drove, beside torch's own memory figures
    rows = read_metrics(run_dir)
    used, total = column(rows, "gpu0/mem_used_gb"), column(rows, "gpu0/mem_total_gb")
    assert used and total and all(0 < u <= t for u, t in zip(used, total, strict=False))
    assert column(rows, "gpu0/power_w") and column(rows, "gpu0/sm_clock_mhz") and column(rows, "gpu0/util")
    reserved, allocated = column(rows, "train/mem_reserved_gb"), column(rows, "train/mem_gb")
    assert reserved and all(a <= r for a, r in zip(allocated, reserved, strict=False))
    assert max(reserved) <= max(used)  # NVML also counts the CUDA context
    assert summary["energy_wh"] and summary["energy_wh"] > 0


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_nccl_ddp_on_two_gpus(cli):
    result = cli("train", "strategy=ddp", "trainer.devices=2", "trainer.accelerator=gpu", "trainer.max_steps=20",
                 "data=synthetic")  # fmt: skip
    assert result.returncode == 0, result.output
    assert "nccl" in result.output
    assert result.stdout.count("finished 20 steps on 2 process(es)") == 1


def test_fsdp_bf16_with_offload_and_compile_on_gpu(cli):
    """One GPU is enough for the CUDA side of FSDP2: NCCL process group, bf16 parameters with fp32 reduction,
    CPU offload of the shards, compile, and a sharded checkpoint exported to one file."""
    result = cli("train", "strategy=fsdp", "trainer.accelerator=gpu", "precision=bf16-mixed", "strategy.cpu_offload=true",
                 "strategy.activation_checkpointing=true", "model.compile=true", "trainer.max_steps=20",
                 "data=synthetic", "run.name=fsdp")  # fmt: skip
    assert result.returncode == 0, result.output
    run_dir = result.cwd / "runs" / "fsdp"
    sharding = json.loads((run_dir / "run.json").read_text())["summary"]["sharding"]
    assert sharding["param_dtype"] == "bfloat16" and sharding["cpu_offload"] is True
    assert (run_dir / "checkpoints" / "last.ckpt").resolve().is_dir()
    exported = cli("export", str(run_dir))
    assert exported.returncode == 0, exported.output


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_nccl_fsdp_matches_ddp_on_two_gpus(cli):
    common = ["trainer.devices=2", "trainer.accelerator=gpu", "trainer.max_steps=20", "data=synthetic",
              "trainer.log_every_n_steps=1"]  # fmt: skip
    ddp = cli("train", *common, "strategy=ddp", "run.name=ddp")
    fsdp = cli("train", *common, "strategy=fsdp", "run.name=fsdp")
    assert ddp.returncode == 0 and fsdp.returncode == 0, ddp.output + fsdp.output
    a, b = (read_metrics(fsdp.cwd / "runs" / n) for n in ("ddp", "fsdp"))
    # GPU kernels are not bit-reproducible across reductions orders; 1e-3 relative over 20 steps.
    assert column(b, "train/loss") == pytest.approx(column(a, "train/loss"), rel=1e-3)


def test_the_memory_plan_holds_against_the_gpus_allocator(cli, tmp_path):
    """`trainer plan` on the GPU path: exact model state, and a total within 25% of max_memory_allocated."""
    args = ["trainer.accelerator=gpu", "precision=bf16-mixed", "data=synthetic", "model.n_layer=6", "model.n_embd=384",
            "model.n_head=6", "model.block_size=256"]  # fmt: skip
    planned = cli("plan", "--json", *args)
    assert planned.returncode == 0, planned.output
    d = json.loads(planned.stdout)["per_device"]
    out = tmp_path / "counted"
    run = cli("train", *args, "trainer.max_steps=3", "+callbacks.memcount._target_=memcount.MemoryCount",
              f"+callbacks.memcount.out={out}", env={"PYTHONPATH": str(REPO / "tests" / "helpers")})  # fmt: skip
    assert run.returncode == 0, run.output
    counted = json.loads((out / "rank-0.json").read_text())
    for key in ("params_bytes", "grads_bytes", "optimizer_bytes"):
        assert counted[key] == d[key], key
    assert 0.75 <= counted["cuda_peak_bytes"] / d["total_bytes"] <= 1.25, (counted["cuda_peak_bytes"], d)
