"""Which GEMMs of the encoder run in int8, and SmoothQuant-style smoothing of their inputs.

`--precision int8` quantizes all four GEMMs of every block (`PLANS["int8"]`); the tolerant
mode `int8-smooth` (`PLANS["int8-smooth"]`) follows an `Int8Plan`:
  * int8 only in the last blocks (`kept_share`: the leading share of the blocks stays out
    of int8): an error made early travels through every later block into every later tap
    (benchmarks/precision_sources.py --by blocks), so the first blocks keep bf16 (float32 on
    CPUs without native bf16);
  * only the GEMMs named in `gemms`; the others stay bf16 in those blocks too;
  * the inputs of the LayerNorm-fed GEMMs (QKV after `layer_norm1`, the MLP's first after
    `layer_norm2`) smoothed per channel (SmoothQuant, Xiao et al. 2023): x / s and W * s
    give the same product, with s_j = max|x_j|^alpha / max|W[:, j]|^(1 - alpha), so a
    channel whose activations are large (CLIP's LayerNorms have such outlier channels) no
    longer sets the whole tensor's quantization step. 1 / s is folded into the
    LayerNorm's weight and bias, so it costs nothing at run time; the tap itself is taken
    from the unsmoothed LayerNorm of the CLS token alone. Smoothing is kept per GEMM only
    where it makes the calibration tokens' quantized product more accurate
    (`choose_smoothing`): without outlier channels it moves precision the wrong way;
  * static input ranges: each int8 GEMM's uint8 scale and zero point are fixed at load from
    the calibration's range, widened by `static` (an image beyond it gets its own range in
    that GEMM: `quant.Int8Linear._beyond`), instead of each
    batch's min and max: an image's score does not depend on the rest of its batch, and the
    per-batch range pass is gone. On the benchmark this was also more accurate (the batch's
    range is set by its most extreme image).

The activation maxima and token samples come from a float32 calibration pass at load time
(`ln_inputs`) over a few fixed synthetic images: SmoothQuant calibrates on data, and the
per-channel maxima of a LayerNorm output are set by its weight, bias and the residual
stream's large channels far more than by the image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

GEMMS = ("qkv", "out", "fc1", "fc2")
SMOOTHABLE = ("qkv", "fc1")  # the GEMMs fed by a LayerNorm, where 1 / s folds into it


@dataclass(frozen=True)
class Int8Plan:
    """gemms: the GEMMs of a block that run in int8 (from `GEMMS`); kept_share: the leading
    share of the encoder's blocks that keeps bf16 (0: int8 from the first block; 2/3 of
    ViT-L/14's 24: blocks 16-23 in int8); smooth: SmoothQuant's alpha for the LayerNorm-fed
    int8 GEMMs (None: no smoothing); calibration: synthetic images for the activation
    statistics."""

    gemms: tuple[str, ...] = GEMMS
    kept_share: float = 0.0
    smooth: float | None = None
    calibration: int = 2
    static: float | None = None  # input ranges fixed at load: the calibration's, widened by this factor

    def first_int8(self, n_blocks: int) -> int:
        return math.ceil(self.kept_share * n_blocks - 1e-9)

    def int8(self, block: int, gemm: str, n_blocks: int) -> bool:
        return block >= self.first_int8(n_blocks) and gemm in self.gemms

    def smoothed(self, block: int, gemm: str, n_blocks: int) -> bool:
        return self.smooth is not None and gemm in SMOOTHABLE and self.int8(block, gemm, n_blocks)


PLANS = {
    "int8": Int8Plan(),
    "int8-smooth": Int8Plan(gemms=GEMMS, kept_share=2 / 3, smooth=0.5, static=1.25),
}


def calibration_pixels(n: int, size: int = 224, seed: int = 0) -> torch.Tensor:
    """n normalised-pixel-like images [n, 3, size, size]: smooth random fields at several
    scales plus noise, fixed by `seed` (the calibration is deterministic)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        cells = 2 + (i % 6) * 6
        field = F.interpolate(torch.randn(1, 3, cells, cells, generator=g), size=size, mode="bilinear", align_corners=False)
        out.append(1.5 * field + (0.2 + 0.1 * (i % 4)) * torch.randn(1, 3, size, size, generator=g))
    return torch.cat(out)


@dataclass
class LnInputs:
    """What the calibration saw at one GEMM's input: per-channel minima and maxima [width]
    over all tokens, and a sample of tokens [tokens, width] to measure a candidate
    smoothing's error on."""

    ch_min: torch.Tensor
    ch_max: torch.Tensor
    sample: torch.Tensor

    @property
    def act_max(self) -> torch.Tensor:
        """max |x_j| [width]."""
        return torch.maximum(self.ch_max, -self.ch_min)

    def range(self, s: torch.Tensor | None = None) -> tuple[float, float]:
        """(min, max) of the input over all channels, divided by s [width] where smoothed."""
        lo, hi = (self.ch_min, self.ch_max) if s is None else (self.ch_min / s, self.ch_max / s)
        return float(lo.min()), float(hi.max())


@torch.no_grad()
def ln_inputs(clip: nn.Module, pixels: torch.Tensor, blocks: int, sample: int = 256) -> list[tuple[LnInputs, ...]]:
    """The inputs of the four GEMMs (`layer_norm1` -> QKV, attention -> its output
    projection, `layer_norm2` -> the MLP's first, swish(1.702 z) -> its second, as the
    fast encoder folds QuickGELU) of the first `blocks` blocks of a HF CLIPVisionTransformer
    on `pixels` [n, 3, S, S], in float32: (qkv, out, fc1, fc2) LnInputs per block,
    `sample` tokens evenly spaced."""
    layers = clip.encoder.layers[:blocks]
    heads = clip.config.num_attention_heads
    out = []
    # The block written out (as `TappedCLIPVision` computes it): HF's layer call signature
    # changes between transformers versions.
    hidden = clip.pre_layrnorm(clip.embeddings(pixels.float()))
    b, t, d = hidden.shape
    for layer in layers:
        a = layer.self_attn
        y = layer.layer_norm1(hidden)
        q, k, v = (m(y).view(b, t, heads, -1).transpose(1, 2) for m in (a.q_proj, a.k_proj, a.v_proj))
        o = F.scaled_dot_product_attention(q, k, v, scale=(d // heads) ** -0.5)
        o = o.transpose(1, 2).reshape(b, t, d)
        hidden = hidden + a.out_proj(o)
        normed = layer.layer_norm2(hidden)
        z = 1.702 * layer.mlp.fc1(normed)
        act = z * torch.sigmoid(z)
        out.append(tuple(_summary(v, sample) for v in (y, o, normed, act)))
        hidden = hidden + layer.mlp.fc2(act / 1.702)
    return out


def _summary(x: torch.Tensor, sample: int) -> LnInputs:
    rows = x.detach().flatten(0, -2).float()
    step = max(1, rows.shape[0] // sample)
    lo, hi = torch.aminmax(rows, dim=0)
    return LnInputs(lo, hi, rows[::step][:sample].clone())


def smoothing_scales(act_max: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant's per-input-channel factors s [in] for weight [out, in]:
    s_j = max|x_j|^alpha / max|W[:, j]|^(1 - alpha), so that x / s and W * s have their
    per-channel ranges balanced. Channels that never fire keep s = 1."""
    a = act_max.float().clamp_min(1e-5)
    w = weight.detach().float().abs().amax(dim=0).clamp_min(1e-5)
    s = a.pow(alpha) / w.pow(1 - alpha)
    return torch.where(act_max > 0, s, torch.ones_like(s)).clamp(1e-4, 1e4)


def quantized_product_error(x: torch.Tensor, weight: torch.Tensor) -> float:
    """Relative error of x [tokens, in] @ weight.T [in, out] when both are quantized as
    `quant.Int8Linear` quantizes them (int8 weights per output channel, uint8 inputs with
    one scale and zero point), emulated in float32."""
    from .quant import activation_qparams, quantize_weight, round_to_uint8

    q, w_scale = quantize_weight(weight)
    scale, zp = activation_qparams(x)
    xq = (round_to_uint8(x, scale, zp).float() - zp) * scale
    exact = x @ weight.float().T
    return float((xq @ (q.float() * w_scale[:, None]).T - exact).norm() / exact.norm().clamp_min(1e-30))


def choose_smoothing(inputs: LnInputs, weight: torch.Tensor, alpha: float) -> torch.Tensor | None:
    """SmoothQuant's s for this GEMM where it makes the calibration tokens' quantized product
    more accurate, else None (no smoothing). Smoothing moves range from the activations into
    the weights: it pays where a few input channels are much larger than the rest (real
    CLIP's LayerNorm outlier channels) and costs weight precision where they are not (the
    benchmark's random weights, whose channels are alike)."""
    s = smoothing_scales(inputs.act_max, weight, alpha)
    plain = quantized_product_error(inputs.sample, weight)
    smoothed = quantized_product_error(inputs.sample / s, weight * s)
    return s if smoothed < plain else None


@dataclass
class GemmCalibration:
    """What an int8 GEMM takes from the calibration: SmoothQuant's s [in] (None: not
    smoothed) and its input's range (lo, hi) after smoothing, before `Int8Plan.static`'s
    widening."""

    s: torch.Tensor | None
    lo: float
    hi: float


# "block.gemm" ("17.qkv") -> its calibration, for every int8 GEMM of a plan.
Int8Calibration = dict[str, GemmCalibration]


@torch.no_grad()
def calibrate(clip: nn.Module, plan: Int8Plan, weights: dict[str, torch.Tensor], device: torch.device) -> Int8Calibration:
    """The calibration of every int8 GEMM of `plan` on a HF CLIPVisionTransformer: the
    float32 pass over `plan.calibration` synthetic images (`ln_inputs`), then per GEMM the
    smoothing choice (`choose_smoothing`, LayerNorm-fed GEMMs only) and the input range.
    `weights`: "block.gemm" -> the GEMM's weight [out, in] as the encoder runs it (QKV
    fused, QuickGELU's 1.702 folded), for the GEMMs `plan.smoothed` names."""
    n = clip.config.num_hidden_layers
    maxima = ln_inputs(clip, calibration_pixels(plan.calibration).to(device), n)
    out: Int8Calibration = {}
    for i in range(n):
        for g, gemm in enumerate(GEMMS):
            if not plan.int8(i, gemm, n):
                continue
            key = f"{i}.{gemm}"
            s = choose_smoothing(maxima[i][g], weights[key], plan.smooth) if plan.smoothed(i, gemm, n) else None
            lo, hi = maxima[i][g].range(s)
            out[key] = GemmCalibration(s, lo, hi)
    return out


def smoothed_layernorm(norm: nn.LayerNorm, s: torch.Tensor) -> nn.LayerNorm:
    """A copy of `norm` whose output is norm(x) / s [width]: weight / s and bias / s."""
    out = nn.LayerNorm(norm.normalized_shape, eps=norm.eps).to(norm.weight.device)
    with torch.no_grad():
        out.weight.copy_(norm.weight.float() / s)
        out.bias.copy_(norm.bias.float() / s)
    return out.requires_grad_(False)
