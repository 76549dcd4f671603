"""int8 matrix products for the fast encoder (`--precision int8`, CPUs with VNNI or AMX-INT8).

Each Linear of an encoder block becomes an `Int8Linear`:
  * weights: int8, symmetric, one scale per output channel (max |w| / 127), packed once
    into oneDNN's blocked layout (`onednn::qlinear_prepack`);
  * activations: quantized on the fly to uint8 with one scale and zero point per call,
    from the batch's min and max (so that 0 is exact and no value is clipped),
    rounded by fbgemm's one-pass kernel (`torch.quantize_per_tensor`, deprecated in 2.13 but
    1.8-2.9x faster than the same rounding in tensor ops), or by those ops (`round_to_uint8`,
    the same values bit for bit) where PyTorch no longer has it;
  * oneDNN's int8 GEMM (`onednn::qlinear_pointwise`: VNNI or AMX-INT8 dot products,
    int32 sums) dequantizes in its epilogue and adds the float32 bias there, with the
    MLP's activation (swish) or the residual add (oneDNN's in-place "sum") fused.
LayerNorms, the residual stream, attention and the head stay as in the bf16 mode
(`accel.FastTapEncoder`): only the four GEMMs of each block change.

Why these kernels (ViT-L/14's MLP product, 2 cores of a Sapphire Rapids Xeon under heavy
load, so a first ranking only: `benchmarks/int8_kernels.py` measures it): oneDNN's int8 GEMM
alone ran 2-3x faster than its bf16 one at a quieter moment; `torch.ao.quantization`'s
dynamic Linear (deprecated in 2.13), with its default per-tensor weight scale, had 1.8x the
error (2.5e-2 relative, against 1.4e-2) and has no fused activation or residual add, and `torch._int_mm` with per-token scales needs a
separate dequantization pass and was the slowest. Per-image input scales (one GEMM per
image) halve the input error but ran at half the speed, so the scale is the batch's: an
image's int8 score depends slightly on the other images of its batch.

Without VNNI/AMX-INT8 oneDNN falls back to AVX2/AVX-512 sequences whose 16-bit
intermediate sums can saturate and that are no faster than bf16: the mode is refused
there, and on GPUs (`int8_unavailable`).
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable
from functools import lru_cache

import torch

from .cpu_features import cpu_flags as _cpu_flags  # a module name, so tests can patch it

logger = logging.getLogger(__name__)

# CPU extensions with int8 dot products (u8 x s8 -> s32) that oneDNN uses, best first.
INT8_ISAS = ("amx_int8", "avx512_vnni", "avx_vnni")
# On a GPU the encoder is not the bottleneck (docs/performance.md: ViT-L/14 in fp16 needs
# about 0.2 ms of H100 time per image, while 16 cores decode ~700 images/s).
CUDA_REASON = (
    "int8 runs on CPUs only: its kernels are oneDNN's (VNNI/AMX-INT8), and on a GPU the "
    "encoder already waits for the image decoder in fp16, so int8 could not speed scoring "
    "up; use --precision auto (fp16) there"
)


@lru_cache(maxsize=1)
def cpu_int8_isa() -> str | None:
    """The best int8 dot-product extension of this CPU ("amx_int8", "avx512_vnni",
    "avx_vnni"), or None where it has none."""
    flags = _cpu_flags()
    return next((isa for isa in INT8_ISAS if isa in flags), None)


def int8_unavailable(device: torch.device) -> str | None:
    """Why `--precision int8` cannot run on `device`, or None where it can."""
    if device.type != "cpu":
        return CUDA_REASON if device.type == "cuda" else f"int8 runs on CPUs only, not on {device.type}"
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qlinear_pointwise")):
        return "int8 needs PyTorch's oneDNN int8 kernels (onednn::qlinear_pointwise), which this build lacks; use bf16 or fp32"
    if cpu_int8_isa() is None:
        return (
            "int8 needs a CPU with int8 dot products (VNNI: avx512_vnni or avx_vnni, or AMX-INT8); "
            "this one has none, so int8 would be emulated, no faster than bf16 and with saturating "
            "16-bit sums; use --precision auto (bf16 or fp32 on this CPU)"
        )
    return None


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [out, in] float -> (int8 [out, in], float32 scales [out]) with
    weight ~= int8 * scale[:, None]; symmetric, one scale per output channel."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny) / 127.0
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q.contiguous(), scale.contiguous()


def activation_qparams(x: torch.Tensor) -> tuple[float, int]:
    """(scale, zero point) of uint8 for x's range widened to include 0:
    x ~= (q - zero_point) * scale with q in [0, 255]."""
    lo, hi = torch.aminmax(x)
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError("int8: the encoder's activations are not finite (NaN or inf); check the input pixels")
    scale = max(hi - lo, 1e-30) / 255.0
    return scale, min(255, max(0, round(-lo / scale)))


def round_to_uint8(x: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
    """x float32 [...] -> uint8 [...]: clamp(round(x / scale) + zero_point, 0, 255) exactly
    as `torch.quantize_per_tensor` (fbgemm's `QuantizeAvx2`) rounds, in plain tensor ops.

    Bit for bit, ties included (tests/test_int8_rounding.py checks it against fbgemm's):
      * 1/scale in float32 and a multiplication, as fbgemm does: x / scale differs from
        x * (1/scale) in the last bit, so at some ties (fbgemm's own example: 0.273939937
        with scale 0.00214854861 gives 127.5 by the product and 127.499992 by the quotient);
      * x * (1/scale) + zero_point in ONE rounding to float32 (fbgemm's fused multiply-add;
        PyTorch's CPU add with alpha is one in its AVX2 and AVX-512 kernels, vector body and
        tail, which every CPU that runs int8 uses; not with ATEN_CPU_CAPABILITY=default,
        whose plain a * b + c can differ near ties). Rounding the product
        first, or adding the zero point after the integer rounding, each changes the
        result near ties (thousands of times in that test's near-tie inputs);
      * then to the nearest integer, ties to even (`_mm256_cvtps_epi32`, `torch.round`),
        saturated to [0, 255]: +inf -> 255, -inf -> 0. NaN is left unspecified (fbgemm
        writes 255): `activation_qparams` refuses non-finite inputs before any rounding.
    Four passes over float32 where fbgemm makes one, so it is the slower kernel
    (`benchmarks/int8_kernels.py --rounding`) and runs only where PyTorch no longer has
    `quantize_per_tensor`."""
    inv = float(torch.tensor(scale, dtype=torch.float32).reciprocal())  # fbgemm: 1.f / scale
    t = torch.add(torch.tensor(float(zero_point), dtype=torch.float32), x, alpha=inv)
    return t.round_().clamp_(0, 255).to(torch.uint8)


def _round_fbgemm(x: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
    """round_to_uint8 by fbgemm's one-pass kernel, through a quantized tensor (deprecated
    in PyTorch 2.13) whose plain uint8 values are taken at once."""
    return torch.quantize_per_tensor(x, scale, zero_point, torch.quint8).int_repr()


@lru_cache(maxsize=1)
def rounding_kernel() -> Callable[[torch.Tensor, float, int], torch.Tensor]:
    """The rounding `quantize_activation` uses: fbgemm's while PyTorch has it (the ops of
    `round_to_uint8` give the same values 1.8-2.9x slower: `benchmarks/int8_kernels.py
    --rounding`, a loaded 2-core Xeon), else `round_to_uint8`."""
    try:
        # PyTorch 2.13 warns once per process that quantized tensors are deprecated: this
        # first call takes the warning, so that scoring never shows it.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*quantize_per_tensor.*deprecated", category=UserWarning)
            _round_fbgemm(torch.zeros(8), 1.0, 0)
    except (AttributeError, NotImplementedError, RuntimeError) as e:
        logger.info("int8: torch.quantize_per_tensor is unavailable (%s); rounding with tensor ops", e)
        return round_to_uint8
    return _round_fbgemm


def quantize_activation(x: torch.Tensor) -> tuple[torch.Tensor, float, int]:
    """x float32 [..., K] -> (uint8 [..., K], scale, zero point): one pass for the range,
    one for the rounding (`round_to_uint8`'s values)."""
    scale, zp = activation_qparams(x)
    return rounding_kernel()(x.contiguous(), scale, zp), scale, zp


class Int8Linear:
    """y = x @ W.T + b with W in int8 (per-output-channel scales) and x quantized per call.

    `post`: "none" or "swish" (x * sigmoid(x), fused); `out_dtype`: float32 or bfloat16.
    __call__(x float32 [..., in]) -> [..., out] out_dtype; add_to(x, acc) adds the
    product into the float32 tensor `acc` [..., out] in place (the residual stream).
    """

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        post: str = "none",
        out_dtype: torch.dtype = torch.float32,
        act_range: tuple[float, float] | None = None,
    ):
        if post not in ("none", "swish"):
            raise ValueError(f"post must be 'none' or 'swish', got {post!r}")
        self.out_features, self.in_features = weight.shape
        q, self.w_scale = quantize_weight(weight)
        self.w_zero = torch.zeros(self.out_features, dtype=torch.int64)
        self.weight = torch.ops.onednn.qlinear_prepack(q, None)
        self.bias = None if bias is None else bias.detach().float().contiguous()
        self.post = post
        self.out_dtype = out_dtype
        # A fixed input range (static quantization): an image's score does not depend on the
        # other images of its batch. An image whose input goes beyond it is not clipped: it
        # gets its own range for this GEMM (`_beyond`), as plain int8 would give it.
        self.qparams = None if act_range is None else activation_qparams(torch.tensor(act_range))
        self.static_range = act_range
        self.beyond = 0  # images that went beyond the static range (and got their own)

    def _quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, float, int]:
        x = x.float()  # float32, or bf16 from a kept GEMM (int8-smooth)
        if self.qparams is None:
            return quantize_activation(x)
        scale, zp = self.qparams
        return rounding_kernel()(x.contiguous(), scale, zp), scale, zp

    def _beyond(self, xq: torch.Tensor, zp: int) -> list[int]:
        """The images (first dimension of xq [batch, ..., in]) with an input rounded to the
        end of the static range, i.e. beyond the calibration's range widened by its margin: a
        check on the uint8 values (0.1 ms for ViT-L's largest GEMM input), then per image
        only where the whole batch has one. The low end counts only where the range has room
        below zero (zero point > 0): an exact 0 is then a real value beyond it."""
        lo, hi = torch.aminmax(xq)
        if not ((zp > 0 and int(lo) == 0) or int(hi) == 255):
            return []
        rows = xq.reshape(xq.shape[0], -1)
        lo, hi = rows.amin(dim=1), rows.amax(dim=1)
        hit = (hi == 255) | ((lo == 0) if zp > 0 else torch.zeros_like(hi, dtype=torch.bool))
        return hit.nonzero().flatten().tolist()

    def _own_qparams(self, x: torch.Tensor) -> tuple[float, int]:
        """The range of one image's input joined with the static one."""
        lo, hi = torch.aminmax(x.float())
        s_lo, s_hi = self.static_range
        return activation_qparams(torch.tensor([min(float(lo), s_lo), max(float(hi), s_hi)]))

    def _per_image(self, x: torch.Tensor, xq: torch.Tensor, beyond: list[int], call):
        """call(xq_i, scale, zp, i) for each image, yielded one at a time: the static rounding
        where it stayed in range, its own range where it went beyond."""
        self.beyond += len(beyond)
        if self.beyond == len(beyond):  # once per GEMM
            logger.info("int8: an image's input to a %dx%d GEMM went beyond its calibrated range; "
                        "it was quantized with its own range there (not clipped)", self.in_features, self.out_features)
        scale, zp = self.qparams
        for i in range(xq.shape[0]):
            if i in beyond:
                own_scale, own_zp = self._own_qparams(x[i])
                yield call(rounding_kernel()(x[i].float().contiguous(), own_scale, own_zp), own_scale, own_zp, i)
            else:
                yield call(xq[i], scale, zp, i)

    def _gemm(self, xq: torch.Tensor, scale: float, zp: int) -> torch.Tensor:
        return torch.ops.onednn.qlinear_pointwise(
            xq, scale, zp, self.weight, self.w_scale, self.w_zero, self.bias,
            1.0, 0, self.out_dtype, self.post, [], "",
        )

    def _gemm_sum(self, xq: torch.Tensor, scale: float, zp: int, acc: torch.Tensor) -> torch.Tensor:
        # oneDNN's "sum" post-op accumulates into `acc` (the returned tensor is `acc`).
        return torch.ops.onednn.qlinear_pointwise.binary(
            xq, scale, zp, self.weight, self.w_scale, self.w_zero, acc, self.bias,
            1.0, 0, torch.float32, 1.0, 0, "sum", 1.0, "none", [], "",
        )

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        xq, scale, zp = self._quantize(x)
        beyond = self._beyond(xq, zp) if self.qparams is not None and x.dim() > 2 else []
        if beyond:  # into one output, an image at a time (not a list of them, then a copy)
            out = None
            for i, y in enumerate(self._per_image(x, xq, beyond, lambda q, s, z, i: self._gemm(q, s, z))):
                out = y.new_empty((xq.shape[0], *y.shape)) if out is None else out
                out[i] = y
            return out
        return self._gemm(xq, scale, zp)

    def add_to(self, x: torch.Tensor, acc: torch.Tensor) -> torch.Tensor:
        if self.post != "none" or acc.dtype != torch.float32 or not acc.is_contiguous():
            return acc.add_(self(x))
        xq, scale, zp = self._quantize(x)
        beyond = self._beyond(xq, zp) if self.qparams is not None and x.dim() > 2 else []
        if beyond:  # acc[i] is a contiguous view: each image's product is summed into it in place
            for _ in self._per_image(x, xq, beyond, lambda q, s, z, i: self._gemm_sum(q, s, z, acc[i])):
                pass
            return acc
        return self._gemm_sum(xq, scale, zp, acc)
