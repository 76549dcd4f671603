"""Numeric precision and fast kernels for the frozen encoder.

`FastTapEncoder` computes the same taps as `TappedCLIPVision.forward`
(`layer_norm2(x + attn(layer_norm1(x)))[:, 0]` of every block) with:
  * the three attention projections fused into one GEMM ([width] -> [3 * width]),
  * GEMMs and attention in the chosen dtype (bf16/fp16) while the residual stream,
    the LayerNorms and therefore the taps stay in float32: low precision only enters
    through matmul rounding, which is what keeps probabilities within 0.01 of fp32,
  * on CPU, weights pre-packed once into oneDNN's blocked layout (`mkldnn` linear),
    instead of re-laying them out on every call, with the MLP's activation fused into
    the first GEMM, and attention in fp32 (faster than bf16 in PyTorch's CPU kernel),
  * only the blocks whose taps are needed, and no MLP after the last needed tap,
  * optionally (`compile=True`), the whole forward compiled by `torch.compile` with
    inductor's weight freezing: LayerNorms, residual adds and activations fused around
    GEMMs that inductor packs itself (2-core Sapphire Rapids, ViT-L/14: fp32 encoder 1.15x
    after a 1-minute compile; bf16 1.04x). Needs a C++ compiler on CPU; if compiling
    fails, the forward runs uncompiled with a warning.

Precision names: "fp32" (exact: the parity tests' mode), "bf16", "fp16", "int8" (the four
GEMMs of each block in int8, `rine.model.quant`; CPUs with VNNI/AMX-INT8 only, outside the
tolerance, so never chosen by "auto"), "int8-smooth" (int8 in the last third of the blocks
with SmoothQuant smoothing, the rest bf16: `rine.model.smooth`, within the tolerance), and
"auto" (int8-smooth on CPUs with VNNI/AMX-INT8, else bf16 on CPUs with native bf16 dot
products, fp16 on CUDA, else fp32).
"""

from __future__ import annotations

import logging
import math
import threading
import warnings
from contextlib import contextmanager, nullcontext
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..config import PRECISIONS
from . import int8_cache, quant, smooth
from .cpu_features import cpu_flags as _cpu_flags  # a module name, so tests can patch it

logger = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# The modes FastTapEncoder runs: a GEMM dtype, or an int8 plan (float32 in and out of its GEMMs).
ENCODER_PRECISIONS = (*DTYPES, *smooth.PLANS)


@lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """True when this CPU multiplies bf16 natively (AVX-512 BF16 or AMX), so that bf16
    GEMMs run about twice as fast as fp32 instead of being emulated."""
    try:
        if torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported():
            flags = _cpu_flags()
            # oneDNN reports "supported" on any AVX-512 core (emulated, slow); the flag says native.
            return not flags or bool(flags & {"avx512_bf16", "amx_bf16"})
    except (AttributeError, RuntimeError):
        pass
    return bool(_cpu_flags() & {"avx512_bf16", "amx_bf16"})


@lru_cache(maxsize=1)
def cpu_has_amx() -> bool:
    """True on CPUs with AMX tiles for bf16 (Intel Sapphire Rapids and later), where
    PyTorch's CPU flash attention is faster in bf16 than in fp32."""
    return "amx_bf16" in _cpu_flags()


def resolve_precision(precision: str, device: torch.device) -> str:
    """"auto" -> the fastest mode the device runs within tolerance; others checked as is.

    "int8" and "int8-smooth" raise ValueError (with the reason) on GPUs and on CPUs without
    int8 dot products; "auto" picks "int8-smooth" on CPUs with them (VNNI or AMX-INT8), never
    "int8", whose error is above the tolerance (docs/performance.md)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision in smooth.PLANS:
        reason = quant.int8_unavailable(device)
        if reason:
            raise ValueError(f"--precision {precision} is not available here: {reason}")
        return precision
    if precision != "auto":
        if precision == "fp16" and device.type == "cpu":
            logger.warning("fp16 on CPU has no fast kernels here; bf16 or fp32 is faster")
        return precision
    if device.type == "cuda":
        return "fp16"
    if device.type == "cpu" and quant.int8_unavailable(device) is None:
        return "int8-smooth"  # within the tolerance (docs/performance.md); its kept blocks: bf16 or fp32
    if device.type == "cpu" and cpu_has_native_bf16():
        return "bf16"
    return "fp32"


class _Linear:
    """y = x @ W.T + b with W stored once in the layout its kernel wants.

    On CPU, oneDNN's `_linear_pointwise` with a pre-packed weight avoids the per-call
    reorder of the weight; elsewhere (CUDA, or a torch without mkldnn) plain F.linear.
    """

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        dtype: torch.dtype,
        onednn: bool,
        post: str = "none",
    ):
        self.out_features = weight.shape[0]
        self.dtype = dtype
        w = weight.detach().to(dtype).contiguous()
        self.bias = None if bias is None else bias.detach().to(dtype).contiguous()
        self.onednn = onednn
        self.post = post  # "none" or "swish" (x * sigmoid(x)), fused into the GEMM by oneDNN
        if post != "none" and not onednn:
            raise ValueError("fused activations need the oneDNN path")
        self.weight = torch.ops.mkldnn._reorder_linear_weight(w, None) if onednn else w

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != self.dtype:  # a bf16 GEMM among int8 ones (int8-smooth) gets float32 inputs
            x = x.to(self.dtype)
        if self.onednn:
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, self.post, [], "")
        return F.linear(x, self.weight, self.bias)

    def add_to(self, x: torch.Tensor, acc: torch.Tensor) -> torch.Tensor:
        """acc += self(x), in place (mixed-dtype add: no float32 copy of the product)."""
        return acc.add_(self(x))


_tf32_lock = threading.Lock()
_tf32_users = 0  # forwards inside `exact_fp32` right now, in any thread
_tf32_saved: tuple[bool, bool] = (False, False)


@contextmanager
def exact_fp32(device: torch.device):
    """fp32 as IEEE float32 on CUDA: cuDNN convolutions (the patch embedding) default to
    TF32 there, which rounds inputs to 10 mantissa bits; the exact mode turns that off
    (and TF32 matmuls) for the duration, then restores the caller's settings.

    The flags are process-wide: overlapping uses (threads of a server) are counted, the
    first one in saves the caller's settings and the last one out restores them. Other
    float32 CUDA work running at that moment also runs without TF32."""
    global _tf32_users, _tf32_saved
    if device.type != "cuda":
        yield
        return
    with _tf32_lock:
        if _tf32_users == 0:
            _tf32_saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
            torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        _tf32_users += 1
    try:
        yield
    finally:
        with _tf32_lock:
            _tf32_users -= 1
            if _tf32_users == 0:
                torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = _tf32_saved


QUICK_GELU = 1.702  # CLIP's activation: x * sigmoid(1.702 x)


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(QUICK_GELU * x)


def _gemm_weight(layer: nn.Module, gemm: str) -> torch.Tensor:
    """One of a HF CLIP encoder layer's four GEMM weights [out, in] as the int8 encoder runs
    it: QKV fused, and QuickGELU's 1.702 moved into the MLP (fc1 * 1.702, fc2 / 1.702)."""
    attn = layer.self_attn
    if gemm == "qkv":
        return torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
    return {"out": lambda: attn.out_proj.weight, "fc1": lambda: layer.mlp.fc1.weight * QUICK_GELU,
            "fc2": lambda: layer.mlp.fc2.weight / QUICK_GELU}[gemm]()


# A batch below this share of the compiled graph's batch size runs uncompiled instead of padded.
PAD_WORTH = 0.85


class FastTapEncoder(nn.Module):
    """Per-block CLS taps of a `TappedCLIPVision`, fast.

    forward(pixel_values [batch, 3, S, S] float32) -> taps [batch, blocks, width] float32
    """

    def __init__(
        self,
        backbone: nn.Module,
        precision: str = "bf16",
        device: torch.device | str = "cpu",
        onednn: bool | None = None,
        compile: bool = False,
        calibration_cache: str | Path | None = None,
    ):
        """calibration_cache: a directory that keeps int8-smooth's load-time calibration
        across runs (`rine.model.int8_cache`); None calibrates every time."""
        super().__init__()
        if precision not in DTYPES and precision not in smooth.PLANS:
            raise ValueError(f"FastTapEncoder needs a concrete precision ({', '.join(ENCODER_PRECISIONS)}), got {precision!r}")
        device = torch.device(device)
        plan = smooth.PLANS.get(precision)
        int8 = plan is not None
        if int8:
            reason = quant.int8_unavailable(device)
            if reason:
                raise ValueError(reason)
            if compile or onednn is False:
                raise ValueError("int8 runs oneDNN's int8 kernels uncompiled: drop --compile (and onednn=False)")
        clip = backbone.clip
        cfg = clip.config
        if getattr(cfg, "hidden_act", "quick_gelu") != "quick_gelu":
            raise ValueError(f"FastTapEncoder supports CLIP's quick_gelu MLP only, not {cfg.hidden_act!r}")
        # int8: the GEMMs quantize float32 inputs themselves (rine.model.quant).
        self.dtype = torch.float32 if int8 else DTYPES[precision]
        self.precision = precision
        if compile:
            onednn = False  # inductor's freezing packs plain weights itself, fused with their neighbours
        elif onednn is None:
            # oneDNN packs fp32 and bf16 weights; its fp16 path needs AVX512-FP16 CPUs.
            onednn = device.type == "cpu" and precision != "fp16" and torch.backends.mkldnn.is_available()
        self.onednn = onednn
        # PyTorch's CPU flash attention in bf16 is faster than in fp32 only with AMX
        # (ViT-L block of 16 images: 29 vs 42 ms on a Sapphire Rapids core pair, 118 vs
        # 75 ms on an AVX-512-BF16 AMD EPYC); elsewhere it runs in fp32 on CPU. In int8
        # the QKV GEMM writes bf16 for it on AMX CPUs, float32 elsewhere.
        bf16_attn = (self.dtype == torch.bfloat16 or int8) and cpu_has_amx()
        self.attn_fp32 = device.type == "cpu" and not bf16_attn
        self.width = cfg.hidden_size
        self.heads = cfg.num_attention_heads
        self.n_blocks = cfg.num_hidden_layers
        self.eps = cfg.layer_norm_eps
        # Embeddings and LayerNorms are < 1 % of the FLOPs: they run the HF modules in fp32.
        self.embeddings = clip.embeddings
        self.pre_layrnorm = clip.pre_layrnorm
        self.norms1 = [layer.layer_norm1 for layer in clip.encoder.layers]
        self.norms2 = [layer.layer_norm2 for layer in clip.encoder.layers]
        self.blocks = []
        # int8-smooth: LayerNorms with SmoothQuant's 1 / s folded in, feeding the smoothed
        # int8 GEMMs (None where a block's GEMM is not smoothed; the taps keep norms2).
        self.mlp_norms: list[nn.LayerNorm | None] = [None] * self.n_blocks
        self.smoothed: list[str] = []  # the GEMMs smoothing was applied to ("3.qkv", "3.fc1", ...)
        calibration: smooth.Int8Calibration = {}
        if int8 and (plan.smooth is not None or plan.static is not None):
            calibration = self._int8_calibration(clip, plan, device, calibration_cache)
        # GEMMs an int8 plan keeps out of int8: bf16 where the CPU multiplies bf16 natively.
        kept = torch.bfloat16 if device.type == "cpu" and cpu_has_native_bf16() else torch.float32
        for i, layer in enumerate(clip.encoder.layers):
            attn = layer.self_attn
            qkv_w = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]).to(device)
            qkv_b = torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias]).to(device)
            mk = dict(dtype=self.dtype, onednn=onednn)
            fc1_w, fc1_b = layer.mlp.fc1.weight.to(device), layer.mlp.fc1.bias.to(device)
            fc2_w, fc2_b = layer.mlp.fc2.weight.to(device), layer.mlp.fc2.bias.to(device)
            out_w, out_b = attn.out_proj.weight.to(device), attn.out_proj.bias.to(device)
            if int8:
                self.blocks.append(self._int8_block(i, plan, calibration, kept, qkv_w, qkv_b, out_w, out_b, fc1_w, fc1_b, fc2_w, fc2_b))
                continue
            if onednn:
                # quick_gelu(h) = swish(1.702 h) / 1.702: fc1 scaled by 1.702 with oneDNN's fused
                # swish epilogue, and the 1 / 1.702 folded into fc2's weight (not its bias).
                fc1 = _Linear(fc1_w * QUICK_GELU, fc1_b * QUICK_GELU, post="swish", **mk)
                fc2 = _Linear(fc2_w / QUICK_GELU, fc2_b, **mk)
            else:
                fc1, fc2 = _Linear(fc1_w, fc1_b, **mk), _Linear(fc2_w, fc2_b, **mk)
            self.blocks.append(
                (
                    _Linear(qkv_w, qkv_b, **mk),
                    _Linear(out_w, out_b, **mk),
                    fc1,
                    fc2,
                )
            )
        # One graph, for one batch size (each graph holds its own frozen copy of the weights
        # and takes ~40 s to build for ViT-L): smaller batches are padded to that size, larger
        # ones split. `plan_batch` sets the size before the graph is built.
        self._compiled = torch.compile(self._taps, dynamic=False) if compile else None
        self._compiled_batch = 0
        self._graph_built = False

    def _int8_calibration(self, clip: nn.Module, plan: smooth.Int8Plan, device: torch.device,
                          cache: str | Path | None) -> smooth.Int8Calibration:
        """`smooth.calibrate` for this backbone and plan, from `cache` where it holds it."""
        n, inner = self.n_blocks, clip.config.intermediate_size
        int8_gemms = {f"{i}.{g}": inner if g == "fc2" else self.width
                      for i in range(n) for g in smooth.GEMMS if plan.int8(i, g, n)}
        if cache is not None:
            key = int8_cache.cache_key(clip, plan)
            found = int8_cache.load(Path(cache), key, int8_gemms)
            if found is not None:
                return found
        weights = {f"{i}.{g}": _gemm_weight(layer, g).to(device) for i, layer in enumerate(clip.encoder.layers)
                   for g in smooth.GEMMS if plan.smoothed(i, g, n)}
        calibration = smooth.calibrate(clip, plan, weights, device)
        if cache is not None:
            int8_cache.save(Path(cache), key, calibration)
        return calibration

    def _int8_block(self, i: int, plan: smooth.Int8Plan, calibration: smooth.Int8Calibration, kept: torch.dtype,
                    qkv_w, qkv_b, out_w, out_b, fc1_w, fc1_b, fc2_w, fc2_b) -> tuple:
        """Block i's four GEMMs under `plan`: int8 (`quant.Int8Linear`) or `kept` (oneDNN
        bf16/fp32), with SmoothQuant's s folded into the weights and 1 / s into the LayerNorm
        before them. As in bf16, QuickGELU is oneDNN's fused swish; per-channel weight scales
        absorb the 1.702 factors exactly."""
        qkv_dtype = torch.float32 if self.attn_fp32 else torch.bfloat16
        fc1_w, fc1_b, fc2_w = fc1_w * QUICK_GELU, fc1_b * QUICK_GELU, fc2_w / QUICK_GELU
        found = calibration.get(f"{i}.qkv")
        if found is not None and found.s is not None:
            self.norms1[i] = smooth.smoothed_layernorm(self.norms1[i], found.s)
            qkv_w = qkv_w * found.s
            self.smoothed.append(f"{i}.qkv")
        found = calibration.get(f"{i}.fc1")
        if found is not None and found.s is not None:
            self.mlp_norms[i] = smooth.smoothed_layernorm(self.norms2[i], found.s)
            fc1_w = fc1_w * found.s
            self.smoothed.append(f"{i}.fc1")

        def make(gemm: str, w, b, **kw):
            if plan.int8(i, gemm, self.n_blocks):
                if plan.static is not None:
                    c = calibration[f"{i}.{gemm}"]
                    kw["act_range"] = (c.lo * plan.static, c.hi * plan.static)
                return quant.Int8Linear(w, b, **kw)
            kw.pop("out_dtype", None)
            return _Linear(w, b, dtype=kept, onednn=True, **kw)

        return (
            make("qkv", qkv_w, qkv_b, out_dtype=qkv_dtype),
            make("out", out_w, out_b),
            make("fc1", fc1_w, fc1_b, post="swish"),
            make("fc2", fc2_w, fc2_b),
        )

    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor, n_blocks: int | None = None) -> torch.Tensor:
        """pixel_values [batch, 3, S, S] -> taps [batch, n_blocks, width] float32."""
        n = self.n_blocks if n_blocks is None else n_blocks
        with exact_fp32(pixel_values.device) if self.precision == "fp32" else nullcontext():
            if self._compiled is not None:
                return self._compiled_taps(pixel_values, n)
            return self._taps(pixel_values, n)

    @property
    def compiled(self) -> bool:
        return self._compiled is not None

    def plan_batch(self, batch: int) -> None:
        """The batch size to build the compiled graph for, if it is not built yet: the run
        now starting (its first batch may be smaller). It replaces an earlier plan that built
        no graph, e.g. a quick one-image check with a larger batch size."""
        if self._compiled is not None and not self._graph_built:
            self._compiled_batch = batch

    def _compiled_taps(self, pixel_values: torch.Tensor, n: int) -> torch.Tensor:
        import torch._inductor.config as inductor_config
        from torch._dynamo.exc import TorchDynamoException
        from torch._inductor.exc import CppCompileError

        batch = pixel_values.shape[0]
        if not self._graph_built:
            self._compiled_batch = max(self._compiled_batch, batch)
        size = self._compiled_batch
        if batch > size:
            return torch.cat([self._compiled_taps(pixel_values[i : i + size], n) for i in range(0, batch, size)])
        if batch < PAD_WORTH * size:
            # Padding would cost more than the graph saves (15 % at best, measured in fp32 on
            # CPU): a run's short last batch, or a lone image, runs uncompiled -- and a graph
            # is not built (40 s) for it.
            return self._taps(pixel_values, n)
        # The graph is specialised on strides too: one layout for every batch (normalised
        # pixels may arrive as a channels-last view, padded ones as a fresh tensor).
        pixel_values = pixel_values.contiguous()
        if batch < size:
            pad = pixel_values.new_zeros((size - batch, *pixel_values.shape[1:]))
            pixel_values = torch.cat([pixel_values, pad])
        try:
            with inductor_config.patch(freezing=True), warnings.catch_warnings():
                # fp32 is IEEE on purpose: inductor's advice to enable TF32 does not apply.
                warnings.filterwarnings("ignore", message="TensorFloat32 tensor cores", category=UserWarning)
                taps = self._compiled(pixel_values, n)[:batch]
            self._graph_built = True
            return taps
        except (TorchDynamoException, CppCompileError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            logger.warning("torch.compile failed (%s: %s); the encoder runs uncompiled", type(e).__name__, first[:300])
            self._compiled = None
            return self._taps(pixel_values[:batch], n)

    def _taps(self, pixel_values: torch.Tensor, n: int) -> torch.Tensor:
        hidden = self.pre_layrnorm(self.embeddings(pixel_values.float()))  # [B, T, D] fp32
        b, t, d = hidden.shape
        h, hd = self.heads, d // self.heads
        taps = []
        for i in range(n):
            qkv_lin, out_lin, fc1, fc2 = self.blocks[i]
            x = self.norms1[i](hidden).to(self.dtype)
            qkv = qkv_lin(x)  # [B, T, 3D]
            if self.attn_fp32 and qkv.dtype != torch.float32:
                qkv = qkv.float()  # cast while contiguous: 5x faster than casting the permuted view
            qkv = qkv.view(b, t, 3, h, hd).permute(2, 0, 3, 1, 4)  # [3, B, H, T, hd], a view
            # Same scale as HF CLIP (head_dim ** -0.5), applied inside SDPA.
            attn = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], scale=1.0 / math.sqrt(hd))
            attn = attn.transpose(1, 2).reshape(b, t, d).to(self.dtype)  # [B, T, D]
            out_lin.add_to(attn, hidden)  # residual stream stays fp32, updated in place (int8: inside its GEMM)
            mlp_norm = self.mlp_norms[i]
            if mlp_norm is None:
                normed = self.norms2[i](hidden)  # RINE's tap point (`ln_2`), fp32
                taps.append(normed[:, 0])
            else:  # int8-smooth: the tap from the plain LayerNorm, the MLP's input smoothed
                taps.append(self.norms2[i](hidden[:, 0]))
                normed = mlp_norm(hidden) if i + 1 < n else None
            if i + 1 < n:  # the last needed block's MLP does not affect any tap
                act = fc1(normed.to(self.dtype))  # [B, T, 4D]
                fc2.add_to(act if fc1.post == "swish" else _quick_gelu(act), hidden)
        return torch.stack(taps, dim=1)
