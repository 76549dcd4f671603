"""Which GEMMs of the encoder run in int8, and SmoothQuant-style smoothing of their inputs.

`--precision int8` quantizes all four GEMMs of every block (`PLANS["int8"]`); the tolerant
mode `int8-smooth` (`PLANS["int8-smooth"]`) follows an `Int8Plan`:
  * int8 only from block `int8_from` on: an error made early travels through every later
    block into every later tap (benchmarks/precision_sources.py --by blocks), so the first
    blocks keep bf16 (float32 on CPUs without native bf16);
  * only the GEMMs named in `gemms`; the others stay bf16 in those blocks too;
  * the inputs of the LayerNorm-fed GEMMs (QKV after `layer_norm1`, the MLP's first after
    `layer_norm2`) smoothed per channel (SmoothQuant, Xiao et al. 2023): x / s and W * s
    give the same product, with s_j = max|x_j|^alpha / max|W[:, j]|^(1 - alpha), so a
    channel whose activations are large (CLIP's LayerNorms have such outlier channels) no
    longer sets the whole tensor's quantization step. 1 / s is folded into the
    LayerNorm's weight and bias, so it costs nothing at run time; the tap itself is taken
    from the unsmoothed LayerNorm of the CLS token alone.

The activation maxima max|x_j| come from a calibration pass at load time (`ln_input_maxima`)
over a few fixed synthetic images: SmoothQuant calibrates on data, and the per-channel
maxima of a LayerNorm output are set by its weight, bias and the residual stream's large
channels far more than by the image.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

GEMMS = ("qkv", "out", "fc1", "fc2")
SMOOTHABLE = ("qkv", "fc1")  # the GEMMs fed by a LayerNorm, where 1 / s folds into it


@dataclass(frozen=True)
class Int8Plan:
    """gemms: the GEMMs of a block that run in int8 (from `GEMMS`); int8_from: the first
    block where they do (earlier blocks: bf16); smooth: SmoothQuant's alpha for the
    LayerNorm-fed int8 GEMMs (None: no smoothing); calibration: synthetic images for the
    activation maxima."""

    gemms: tuple[str, ...] = GEMMS
    int8_from: int = 0
    smooth: float | None = None
    calibration: int = 2

    def int8(self, block: int, gemm: str) -> bool:
        return block >= self.int8_from and gemm in self.gemms

    def smoothed(self, block: int, gemm: str) -> bool:
        return self.smooth is not None and gemm in SMOOTHABLE and self.int8(block, gemm)


PLANS = {
    "int8": Int8Plan(),
    "int8-smooth": Int8Plan(gemms=GEMMS, int8_from=0, smooth=0.5),
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


@torch.no_grad()
def ln_input_maxima(clip: nn.Module, pixels: torch.Tensor, blocks: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """max |x_j| over all tokens of `pixels` [n, 3, S, S] for each channel of the two
    LayerNorm outputs (`layer_norm1` -> QKV, `layer_norm2` -> the MLP) of the first `blocks`
    blocks of a HF CLIPVisionTransformer, in float32: [(max1 [width], max2 [width])]."""
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
        hidden = hidden + a.out_proj(o.transpose(1, 2).reshape(b, t, d))
        normed = layer.layer_norm2(hidden)
        out.append((_channel_max(y), _channel_max(normed)))
        hidden = hidden + layer.mlp(normed)
    return out


def _channel_max(x: torch.Tensor) -> torch.Tensor:
    return x.detach().abs().flatten(0, -2).amax(0).float()


def smoothing_scales(act_max: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant's per-input-channel factors s [in] for weight [out, in]:
    s_j = max|x_j|^alpha / max|W[:, j]|^(1 - alpha), so that x / s and W * s have their
    per-channel ranges balanced. Channels that never fire keep s = 1."""
    a = act_max.float().clamp_min(1e-5)
    w = weight.detach().float().abs().amax(dim=0).clamp_min(1e-5)
    s = a.pow(alpha) / w.pow(1 - alpha)
    return torch.where(act_max > 0, s, torch.ones_like(s)).clamp(1e-4, 1e4)


def smoothed_layernorm(norm: nn.LayerNorm, s: torch.Tensor) -> nn.LayerNorm:
    """A copy of `norm` whose output is norm(x) / s [width]: weight / s and bias / s."""
    out = nn.LayerNorm(norm.normalized_shape, eps=norm.eps).to(norm.weight.device)
    with torch.no_grad():
        out.weight.copy_(norm.weight.float() / s)
        out.bias.copy_(norm.bias.float() / s)
    return out.requires_grad_(False)
