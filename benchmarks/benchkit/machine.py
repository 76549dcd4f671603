"""What the machine can do and what a run used: attainable matmul rates, FLOPs per image, memory."""

from __future__ import annotations

import gc
import resource
import time
from pathlib import Path

import torch

from .models import SHAPES


def gflop_per_image(name: str, ours: bool) -> float:
    """Multiply-adds x 2 of the encoder's matmuls; ours skips the last block's MLP, ln_post, proj."""
    width, layers, patch, size, embed = SHAPES[name]
    t, d = (size // patch) ** 2 + 1, width
    block = 2 * (t * d * 3 * d + 2 * t * t * d + t * d * d)  # qkv, QK^T and AV, out proj
    mlp = 2 * (2 * t * d * 4 * d)
    patch_embed = 2 * (t - 1) * 3 * patch * patch * d
    total = patch_embed + layers * (block + mlp)
    if ours:
        total -= mlp
    else:
        total += 2 * d * embed
    return total / 1e9


def int8_flop_share(name: str, precision: str) -> float:
    """The share of `gflop_per_image(name, ours=True)` that runs in int8 GEMMs under
    `precision`'s Int8Plan (rine.model.smooth.PLANS); 0 for the other precisions."""
    from rine.model.smooth import PLANS

    plan = PLANS.get(precision)
    if plan is None:
        return 0.0
    width, layers, patch, size, _ = SHAPES[name]
    t, d = (size // patch) ** 2 + 1, width
    flops = {"qkv": 2 * t * d * 3 * d, "out": 2 * t * d * d, "fc1": 2 * t * d * 4 * d, "fc2": 2 * t * 4 * d * d}
    int8 = sum(f for i in range(layers) for g, f in flops.items()
               if plan.int8(i, g, layers) and not (i == layers - 1 and g in ("fc1", "fc2")))
    return int8 / 1e9 / gflop_per_image(name, ours=True)


def cuda_matmul_gflops(dtype: torch.dtype, reps: int = 20) -> float:
    """Attainable GPU matmul GFLOP/s for `dtype`: best of `reps` 8192^3 products."""
    a = torch.randn(8192, 8192, device="cuda", dtype=dtype)
    b = torch.randn(8192, 8192, device="cuda", dtype=dtype)
    best = 0.0
    for _ in range(3):
        a @ b
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        best = max(best, 2 * 8192**3 / (start.elapsed_time(end) / 1e3) / 1e9)
    return best


def matmul_gflops(dtype: torch.dtype, reps: int = 10) -> float:
    """Attainable matmul GFLOP/s for `dtype`: the best of `reps` runs of the faster of a
    2048^3 `torch.matmul` and a oneDNN pre-packed linear at ViT-L/14's MLP shape
    ([16 x 257, 1024] x [1024, 4096]). Best, not median: the attainable rate is what the
    machine does when no one else is using it."""
    a, b = torch.randn(2048, 2048).to(dtype), torch.randn(2048, 2048).to(dtype)
    m, k, n = 16 * 257, 1024, 4096
    x, w = torch.randn(m, k).to(dtype), torch.randn(n, k).to(dtype)
    cases = [(lambda: a @ b, 2 * 2048**3)]
    if torch.backends.mkldnn.is_available():
        packed = torch.ops.mkldnn._reorder_linear_weight(w, None)
        cases.append((lambda: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], ""), 2 * m * k * n))
    best = 0.0
    for fn, flops in cases:
        fn()
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            best = max(best, flops / (time.perf_counter() - t0) / 1e9)
    return best


def release_free_memory() -> None:
    """Return freed heap pages to the OS (glibc), so RSS shows what is in use, not what
    building the random weights once needed."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def current_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak_rss() -> bool:
    """Reset this process's peak-RSS counter (Linux: VmHWM, via clear_refs), so that the
    peak measured afterwards is the scoring's, not the model construction's."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """Peak resident memory of this process (since the last reset where possible), MB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def reset_peaks(device: str) -> None:
    reset_peak_rss()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def children_peak_rss_mb() -> float:
    """Largest peak RSS of any finished child process (the baseline's loader workers), MB."""
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def int8_matmul_gflops(reps: int = 10) -> float:
    """Attainable int8 matmul rate (2 x multiply-adds per second, / 1e9) of oneDNN's int8 GEMM
    at ViT-L/14's MLP shape, uint8 input already quantized, float32 output: the ceiling of
    `--precision int8`'s GEMMs. Best of `reps`. 0 where this CPU or build has no int8 kernels."""
    from rine.model.quant import Int8Linear, int8_unavailable, quantize_activation

    if int8_unavailable(torch.device("cpu")):
        return 0.0
    m, k, n = 16 * 257, 1024, 4096
    lin = Int8Linear(torch.randn(n, k) * 0.02, None)
    xq, scale, zp = quantize_activation(torch.randn(m, k))

    def fn():
        return torch.ops.onednn.qlinear_pointwise(xq, scale, zp, lin.weight, lin.w_scale, lin.w_zero, None,
                                                  1.0, 0, torch.float32, "none", [], "")

    fn()
    best = 0.0
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = max(best, 2 * m * k * n / (time.perf_counter() - t0) / 1e9)
    return best
