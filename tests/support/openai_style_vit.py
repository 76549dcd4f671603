"""An independent, OpenAI-style CLIP vision transformer for parity tests.

Written from the architecture's description (sequence-first layout, `nn.MultiheadAttention`,
QuickGELU, `ln_1`/`ln_2`), NOT from Hugging Face's code, so that comparing it with our
HF-based taps checks the key conversion and the tap point independently. Taps are taken
the way the reference does: forward hooks on every `ln_2`, token 0 of a [seq, batch, dim]
output.
"""

from __future__ import annotations

import torch
from torch import nn


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_1 = nn.LayerNorm(width)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, width * 4))
        self.mlp.add_module("gelu", QuickGELU())
        self.mlp.add_module("c_proj", nn.Linear(width * 4, width))
        self.ln_2 = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [seq, batch, width]
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int):
        super().__init__()
        self.resblocks = nn.Sequential(*[ResidualAttentionBlock(width, heads) for _ in range(layers)])

    def forward(self, x):
        return self.resblocks(x)


class VisionTransformer(nn.Module):
    def __init__(self, image_size: int, patch: int, width: int, layers: int, heads: int, embed_dim: int):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch, stride=patch, bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(width))
        self.positional_embedding = nn.Parameter(torch.zeros((image_size // patch) ** 2 + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = Transformer(width, layers, heads)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(torch.zeros(width, embed_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)  # [batch, width, grid, grid]
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)  # [batch, grid*grid, width]
        cls = self.class_embedding.to(x.dtype) + torch.zeros(x.shape[0], 1, x.shape[-1], dtype=x.dtype)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding
        x = self.ln_pre(x).permute(1, 0, 2)  # [seq, batch, width]
        x = self.transformer(x).permute(1, 0, 2)
        return self.ln_post(x[:, 0]) @ self.proj


def reference_taps(visual_state: dict[str, torch.Tensor], pixels: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(taps [batch, blocks, width] hooked at ln_2, CLIP embedding [batch, embed_dim])."""
    sd = {k.removeprefix("visual."): v for k, v in visual_state.items() if k.startswith("visual.")}
    width, _, patch, _ = sd["conv1.weight"].shape
    layers = len({k.split(".")[2] for k in sd if k.startswith("transformer.resblocks.")})
    grid = int(round((sd["positional_embedding"].shape[0] - 1) ** 0.5))
    model = VisionTransformer(grid * patch, patch, width, layers, heads, sd["proj"].shape[1])
    model.load_state_dict(sd, strict=True)
    model.eval()
    outputs: list[torch.Tensor] = []
    hooks = [
        m.register_forward_hook(lambda _m, _i, out: outputs.append(out))
        for name, m in model.named_modules()
        if name.endswith("ln_2")
    ]
    with torch.no_grad():
        embed = model(pixels)
    for h in hooks:
        h.remove()
    taps = torch.stack(outputs, dim=2)[0]  # [seq, batch, blocks, width] -> CLS
    return taps, embed
