"""Model FLOPs utilization: achieved training FLOP/s over the device's peak.

GPU peaks are the vendors' dense (no sparsity) tensor-core numbers for the training dtype. A CPU has no
published peak worth trusting, so it is measured: the best matmul throughput of the training dtype (fp32, or
bf16 where the CPU runs it natively) over a few runs, with the current thread count.
"""

from __future__ import annotations

import functools
import time

import torch

# dense TFLOP/s by (device name fragment, dtype)
GPU_PEAK_TFLOPS = {
    "H200": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0},
    "H100": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0},  # SXM; the PCIe card is lower
    "A100": {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5},
    "L40S": {"bf16": 362.0, "fp16": 362.0, "fp32": 91.6},
    "L4": {"bf16": 121.0, "fp16": 121.0, "fp32": 30.3},
    "A10": {"bf16": 125.0, "fp16": 125.0, "fp32": 31.2},
    "4090": {"bf16": 165.0, "fp16": 165.0, "fp32": 82.6},
    "3090": {"bf16": 71.0, "fp16": 71.0, "fp32": 35.6},
}


def measured_cpu_peak_flops(n: int = 1024, repeats: int = 5, dtype: torch.dtype = torch.float32) -> float:
    """Best matmul FLOP/s of this CPU in `dtype` with the current thread count (cached per thread count)."""
    return _cpu_peak(n, repeats, dtype, torch.get_num_threads())


@functools.cache
def _cpu_peak(n: int, repeats: int, dtype: torch.dtype, threads: int) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = 0.0
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(3):
            a @ b
        dt = (time.perf_counter() - t) / 3
        best = max(best, 2 * n**3 / dt)
    return best


def peak_flops(device: torch.device, dtype: torch.dtype) -> tuple[float, str]:
    """(peak FLOP/s per device, where the number came from)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        key = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")
        for frag, table in GPU_PEAK_TFLOPS.items():
            if frag in name:
                return table[key] * 1e12, f"{name} {key} table"
        return 0.0, f"{name}: not in the peak table"
    key = "bf16" if dtype == torch.bfloat16 else "fp32"
    return (measured_cpu_peak_flops(dtype=torch.bfloat16 if key == "bf16" else torch.float32),
            f"measured {key} matmul ({torch.get_num_threads()} threads)")
