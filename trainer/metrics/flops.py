"""Peak FLOP/s of the device a rank trains on: looked up per GPU model, measured on CPUs.

MFU = achieved model FLOP/s / peak FLOP/s. A constant peak would give nonsense on other hardware (nanoGPT's
hard-coded A100 figure gave >100% MFU on faster GPUs), so the peak is chosen for the device at hand.
"""

from __future__ import annotations

import time

# Dense (no sparsity) peak TFLOP/s per dtype, from the vendors' data sheets. Sparse figures are 2x these.
# fp32 here is plain IEEE fp32 on CUDA cores; with TF32 matmuls allowed, the tf32 column applies.
GPU_PEAK_TFLOPS: dict[str, dict[str, float]] = {
    # NVIDIA H100 SXM5 data sheet (2023): bf16/fp16 989.4, tf32 494.7, fp32 66.9
    "H100 SXM": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "H100 80GB HBM3": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9},
    # NVIDIA H100 PCIe data sheet: bf16/fp16 756.5, tf32 378, fp32 51.2
    "H100 PCIe": {"bf16": 756.5, "fp16": 756.5, "tf32": 378.0, "fp32": 51.2},
    # NVIDIA H100 data sheet, NVL column (per GPU): bf16/fp16 1,671 and tf32 835 with sparsity, fp32 60
    "H100 NVL": {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0},
    # H800: the H100 with fewer NVLink lanes (export variant); the same SMs and clocks as the H100 SXM / PCIe
    "H800": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "H800 PCIe": {"bf16": 756.5, "fp16": 756.5, "tf32": 378.0, "fp32": 51.2},
    # NVIDIA H200 data sheet (2024): the SXM part has the H100 SXM's compute, more memory
    "H200": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9},
    # ... and its NVL (PCIe, 600 W) column: bf16/fp16 1,671 and tf32 835 with sparsity, fp32 60
    "H200 NVL": {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0},
    # NVIDIA GH200 Grace Hopper data sheet: the GPU's bf16/fp16 990 (1,979 sparse), tf32 494, fp32 67
    "GH200": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9},
    # NVIDIA A100 data sheet (2020): bf16/fp16 312, tf32 156, fp32 19.5 (SXM and PCIe alike)
    "A100": {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5},
    # NVIDIA A10 data sheet: bf16/fp16 125, tf32 62.5, fp32 31.2. Not the A10G (AWS's part, no NVIDIA data
    # sheet, lower tensor throughput): whole-word matching leaves it out, so it gets no MFU, not a wrong one.
    "A10": {"bf16": 125.0, "fp16": 125.0, "tf32": 62.5, "fp32": 31.2},
    # NVIDIA L4 data sheet: bf16/fp16 121, tf32 60, fp32 30.3
    "L4": {"bf16": 121.0, "fp16": 121.0, "tf32": 60.0, "fp32": 30.3},
    # NVIDIA L40S data sheet: bf16/fp16 362.05, tf32 183, fp32 91.6
    "L40S": {"bf16": 362.05, "fp16": 362.05, "tf32": 183.0, "fp32": 91.6},
    # NVIDIA V100 SXM2 data sheet: fp16 tensor 125, fp32 15.7 (no bf16)
    "V100": {"fp16": 125.0, "fp32": 15.7},
    # NVIDIA RTX 4090 (Ada whitepaper): fp16/bf16 tensor with fp32 accumulate 165.2, fp32 82.6
    "RTX 4090": {"bf16": 165.2, "fp16": 165.2, "tf32": 82.6, "fp32": 82.6},
}


def precision_dtype(precision: str, tf32: bool = False) -> str:
    """The matmul dtype a Lightning precision setting runs at."""
    if precision.startswith("bf16"):
        return "bf16"
    if precision.startswith("16"):
        return "fp16"
    return "tf32" if tf32 else "fp32"


def gpu_peak_flops(device_name: str, dtype: str) -> float | None:
    """Peak FLOP/s of a GPU by its name (``torch.cuda.get_device_name``); None when the model is unknown."""
    # Longest key first, so "H100 PCIe" wins over a shorter key that also matches.
    import re

    for key in sorted(GPU_PEAK_TFLOPS, key=len, reverse=True):
        # whole words only: "L4" must not match "NVIDIA L40S"
        if re.search(rf"(?<![A-Za-z0-9]){re.escape(key)}(?![A-Za-z0-9])", device_name, re.IGNORECASE):
            tflops = GPU_PEAK_TFLOPS[key].get(dtype)
            return None if tflops is None else tflops * 1e12
    return None


def measure_cpu_peak_flops(n: int = 1024, seconds: float = 0.2) -> float:
    """Best fp32 matmul FLOP/s of this process (with its torch thread count) over a short run.

    The best of several timed products, not the mean: the peak is what the hardware can do, and a noisy
    shared machine only ever makes single measurements slower. 0.2 s is about ten products on 2 cores (every
    run pays it at start-up).
    """
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)  # warm up the kernels and the allocator
    best = float("inf")
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best


def device_peak_flops(accelerator: str, precision: str) -> tuple[float | None, str]:
    """(peak FLOP/s, where the number came from) for this rank's device."""
    import torch

    if accelerator == "gpu" and torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        tf32 = torch.backends.cuda.matmul.allow_tf32
        dtype = precision_dtype(precision, tf32)
        peak = gpu_peak_flops(name, dtype)
        return peak, f"{name} {dtype} data-sheet peak" if peak else f"{name}: not in the peak table"
    if accelerator == "cpu":
        threads = torch.get_num_threads()
        # bf16 on a CPU without bf16 units is emulated; MFU is still reported against the fp32 peak.
        return measure_cpu_peak_flops(), f"measured fp32 matmul, {threads} thread(s)"
    return None, f"no peak known for {accelerator}"
