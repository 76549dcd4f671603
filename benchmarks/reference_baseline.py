"""A baseline that scores images the way the reference implementation's evaluation loop does.

What it imitates (from reading github.com/mever-team/rine, not from its code):
  * a PyTorch `DataLoader` over a Dataset that opens each file with PIL, converts it to
    RGB and applies CenterCrop(224) -> ToTensor -> Normalize per image in the workers,
    batch 128, `num_workers` worker processes;
  * OpenAI CLIP's float32 VisionTransformer: sequence-first [tokens, batch, width]
    layout, `nn.MultiheadAttention`, QuickGELU; the full `encode_image` runs (every
    block including the last MLP, `ln_post`, `proj`);
  * forward hooks on every block's `ln_2` collect the CLS token (the RINE taps);
  * the RINE head on the stacked taps, sigmoid of the logit.

Used by benchmarks/throughput.py; it needs no torchvision or CLIP package.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

from rine.data.preprocess import center_crop_array

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class Block(nn.Module):
    """Pre-norm residual block, sequence-first: x [tokens, batch, width]."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, 4 * width))
        self.mlp.add_module("gelu", QuickGELU())
        self.mlp.add_module("c_proj", nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class OpenAIStyleViT(nn.Module):
    """CLIP's image tower with OpenAI's parameter names (`visual.*` without the prefix)."""

    def __init__(self, width: int, layers: int, patch: int, image_size: int, embed_dim: int):
        super().__init__()
        heads = width // 64
        grid = image_size // patch
        self.conv1 = nn.Conv2d(3, width, patch, stride=patch, bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(width))
        self.positional_embedding = nn.Parameter(torch.zeros(grid * grid + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.Sequential(*[Block(width, heads) for _ in range(layers)])
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(torch.zeros(width, embed_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [batch, 3, S, S]
        x = self.conv1(x).flatten(2).transpose(1, 2)  # [batch, grid*grid, width]
        cls = self.class_embedding.expand(x.shape[0], 1, -1)
        x = self.ln_pre(torch.cat([cls, x], dim=1) + self.positional_embedding)
        x = self.transformer.resblocks(x.transpose(0, 1))  # [tokens, batch, width]
        return self.ln_post(x[0]) @ self.proj


class TapHooks:
    """Collects every `ln_2` output ([tokens, batch, width]) during a forward, as the reference does."""

    def __init__(self, model: nn.Module):
        self.outputs: list[torch.Tensor] = []
        self.handles = [
            m.register_forward_hook(self._hook) for name, m in model.named_modules() if name.endswith("ln_2")
        ]

    def _hook(self, _module, _inputs, output):
        self.outputs.append(output)

    def taps(self) -> torch.Tensor:
        """[batch, blocks, width]: CLS token of every block."""
        g = torch.stack(self.outputs, dim=2)[0]
        self.outputs = []
        return g


class ImageFolderDataset(Dataset):
    """PIL open -> RGB -> CenterCrop -> ToTensor -> Normalize, one image per item."""

    def __init__(self, paths: list[str], size: int = 224):
        self.paths = paths
        self.size = size
        self.mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
        self.std = torch.tensor(CLIP_STD).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        with Image.open(self.paths[i]) as im:
            arr = center_crop_array(np.asarray(im.convert("RGB")), self.size)
        x = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).float().div(255)
        return (x - self.mean) / self.std


def build_openai_model(state: dict[str, torch.Tensor]) -> OpenAIStyleViT:
    """OpenAI-format visual state (`visual.` keys) -> float32 model in eval mode."""
    sd = {k.removeprefix("visual."): v.float() for k, v in state.items() if k.startswith("visual.")}
    width, _, patch, _ = sd["conv1.weight"].shape
    layers = len({k.split(".")[2] for k in sd if k.startswith("transformer.resblocks.")})
    grid = math.isqrt(sd["positional_embedding"].shape[0] - 1)
    model = OpenAIStyleViT(width, layers, patch, grid * patch, sd["proj"].shape[1])
    model.load_state_dict(sd, strict=True)
    return model.eval().requires_grad_(False)


@torch.no_grad()
def score_like_reference(
    model: OpenAIStyleViT,
    head: nn.Module,
    paths: list[str],
    batch_size: int = 128,
    workers: int = 2,
    device: str = "cpu",
) -> np.ndarray:
    """Probabilities of "synthetic" [len(paths)], computed as the reference's evaluation loop.

    On CUDA the encoder runs in float16, as `clip.load(..., device="cuda")` leaves it in the
    reference; on CPU in float32 (clip.load's `.float()` there)."""
    dev = torch.device(device)
    dtype = torch.float16 if dev.type == "cuda" else torch.float32
    model = model.to(dev, dtype)
    head = head.to(dev).eval()
    hooks = TapHooks(model)
    loader = DataLoader(ImageFolderDataset(paths), batch_size=batch_size, shuffle=False, num_workers=workers)
    probs = []
    for images in loader:
        model(images.to(dev, dtype))
        logits = head(hooks.taps().float()).logits
        probs.append(torch.sigmoid(logits).cpu())
    for h in hooks.handles:
        h.remove()
    return torch.cat(probs).numpy()
