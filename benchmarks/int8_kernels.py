"""Which int8 GEMM `--precision int8` should use: candidates against oneDNN's bf16, one shape.

    python benchmarks/int8_kernels.py                     # ViT-L/14's MLP product, batch of 16 images
    python benchmarks/int8_kernels.py --k 1024 --n 3072   # the fused QKV product
    python benchmarks/int8_kernels.py --rounding          # the inputs' uint8 rounding alone

Each candidate computes y = x @ W.T + b for float32 x [16 x 257, K] and W [N, K], including
its own quantization of x (the encoder quantizes every GEMM input on the fly). Interleaved
rounds, best time of each (the machine's attainable rate, not its load), the ratio to bf16,
and the relative error of y against float64.

--rounding measures only the rounding of a GEMM input to uint8 (after its scale and zero
point are known), at the two input widths of a ViT-L/14 block ([8 x 257, K] for QKV, the
attention output and the MLP's first product; [8 x 257, 4K] for its second): fbgemm's
`quantize_per_tensor` (deprecated in PyTorch 2.13, the int8 mode's kernel) against
`quant.round_to_uint8` (the same values in plain tensor ops), with the ratio and a check
that both give the same bytes. The int8 mode would switch to the ops at <= 1.1x.
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
import torch.nn.functional as F


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--m", type=int, default=None, help="rows: images x tokens (default 16 x 257; 8 x 257 with --rounding)")
    p.add_argument("--k", type=int, default=1024)
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--rounding", action="store_true", help="time the uint8 rounding kernels instead of the GEMMs")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.rounding:
        return rounding(args.m or 8 * 257, args.k, args.rounds)
    args.m = args.m or 16 * 257
    from rine.model.quant import (
        Int8Linear,
        activation_qparams,
        cpu_int8_isa,
        int8_unavailable,
        round_to_uint8,
    )

    why = int8_unavailable(torch.device("cpu"))
    if why:
        raise SystemExit(why)
    g = torch.Generator().manual_seed(0)
    m, k, n = args.m, args.k, args.n
    x, w, b = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g) * 0.02, torch.randn(n, generator=g) * 0.02
    exact = F.linear(x.double(), w.double(), b.double())

    wb = torch.ops.mkldnn._reorder_linear_weight(w.bfloat16(), None)
    ours = Int8Linear(w, b)
    w_scale = w.abs().amax(1) / 127
    wq_t = torch.round(w / w_scale[:, None]).to(torch.int8).t().contiguous()

    def int_mm_per_token():
        s = x.abs().amax(1, keepdim=True) / 127
        return torch._int_mm(torch.round(x / s).to(torch.int8), wq_t) * (s * w_scale) + b

    def int8_ops_rounding():  # the int8 mode as it would run without quantize_per_tensor
        scale, zp = activation_qparams(x)
        return torch.ops.onednn.qlinear_pointwise(
            round_to_uint8(x, scale, zp), scale, zp, ours.weight, ours.w_scale, ours.w_zero, ours.bias,
            1.0, 0, torch.float32, "none", [], "",
        )

    cases = {
        "bf16, oneDNN packed (bf16 mode)": lambda: torch.ops.mkldnn._linear_pointwise(x.bfloat16(), wb, b.bfloat16(), "none", [], ""),
        "int8, oneDNN qlinear (int8 mode)": lambda: ours(x),
        "int8, torch._int_mm, per-token": int_mm_per_token,
        "int8, qlinear, tensor-op rounding": int8_ops_rounding,
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization is deprecated in 2.13
        for engine in ("x86", "onednn"):
            if engine in torch.backends.quantized.supported_engines:
                torch.backends.quantized.engine = engine
                lin = torch.nn.Linear(k, n)
                lin.weight.data, lin.bias.data = w.clone(), b.clone()
                q = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(lin), {torch.nn.Linear}, dtype=torch.qint8)
                cases[f"int8, quantize_dynamic ({engine})"] = lambda q=q, e=engine: (setattr(torch.backends.quantized, "engine", e), q(x))[1]
        best = dict.fromkeys(cases, float("inf"))
        errors = {name: float((fn().double() - exact).norm() / exact.norm()) for name, fn in cases.items()}
        for _ in range(args.rounds):
            for name, fn in cases.items():
                t0 = time.perf_counter()
                fn()
                best[name] = min(best[name], time.perf_counter() - t0)
    base = best["bf16, oneDNN packed (bf16 mode)"]
    print(f"# [{m} x {k}] x [{k} x {n}], {torch.get_num_threads()} threads, int8 ISA {cpu_int8_isa()}, torch {torch.__version__}")
    print(f"{'candidate':<36}{'best ms':>9}{'GFLOP/s':>9}{'x bf16':>8}{'rel err':>10}")
    for name in cases:
        print(f"{name:<36}{best[name] * 1e3:>9.1f}{2 * m * k * n / best[name] / 1e9:>9.0f}{base / best[name]:>8.2f}{errors[name]:>10.1e}")


def rounding(m: int, k: int, rounds: int) -> None:
    """Best time of fbgemm's rounding and of round_to_uint8's ops, interleaved, on inputs
    [m, k] and [m, 4k] shaped like a block's activations (scale and zero point from their
    range, as the int8 mode computes them)."""
    from rine.model.quant import _round_fbgemm, activation_qparams, round_to_uint8, rounding_kernel

    if rounding_kernel() is round_to_uint8:
        raise SystemExit("this PyTorch has no quantize_per_tensor: nothing to compare round_to_uint8 with")
    g = torch.Generator().manual_seed(0)
    print(f"# uint8 rounding of a GEMM input, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"ATen {torch.backends.cpu.get_cpu_capability()}; best of {rounds} interleaved rounds")
    print(f"{'input':<16}{'fbgemm ms':>11}{'ops ms':>9}{'ops / fbgemm':>14}{'same bytes':>12}")
    for width in (k, 4 * k):
        # one-sided and two-sided like a block's inputs: a LayerNorm's output, QuickGELU's
        x = torch.randn(m, width, generator=g) * 1.5 + 0.2
        if width != k:
            x = x * torch.sigmoid(1.702 * x)
        scale, zp = activation_qparams(x)
        args = (x, scale, zp)
        cases = {"fbgemm": lambda a=args: _round_fbgemm(*a), "ops": lambda a=args: round_to_uint8(*a)}
        same = torch.equal(cases["fbgemm"](), cases["ops"]())
        best = dict.fromkeys(cases, float("inf"))
        for _ in range(rounds):
            for name, fn in cases.items():
                t0 = time.perf_counter()
                fn()
                best[name] = min(best[name], time.perf_counter() - t0)
        ratio = best["ops"] / best["fbgemm"]
        print(f"{f'[{m}, {width}]':<16}{best['fbgemm'] * 1e3:>11.2f}{best['ops'] * 1e3:>9.2f}{ratio:>14.2f}{str(same):>12}")


if __name__ == "__main__":
    main()
