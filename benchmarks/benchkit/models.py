"""Random-weight encoders of the real shapes (no download) and the heads the benchmarks score with."""

from __future__ import annotations

from pathlib import Path

import torch

BENCHMARKS = Path(__file__).resolve().parents[1]

# name: (width, layers, patch, image_size, embed_dim)
SHAPES = {"ViT-B/32": (768, 12, 32, 224, 512), "ViT-L/14": (1024, 24, 14, 224, 768)}


# ----------------------------------------------------------------------------- inputs
# Channels given large LayerNorm weights by `random_openai_state(outliers=...)`.
OUTLIER_CHANNELS = (3, 77, 300, 801)


def random_openai_state(name: str, seed: int = 0, outliers: float = 0.0) -> dict[str, torch.Tensor]:
    """OpenAI-format visual weights of the real shape, random (std 0.02, unit LayerNorms;
    patch embedding scaled to unit-variance tokens so that the CLS taps depend on the image).

    outliers > 1: the activation outlier channels that real CLIP (like LLMs) has and random
    weights lack: in every block, the LayerNorms' weights of `OUTLIER_CHANNELS` are
    `outliers` (instead of 1), so those channels of the QKV and MLP inputs are that many
    times larger, and the matching input columns of those GEMMs are divided by
    sqrt(outliers) (the channels weigh more, not `outliers` times more). A different random
    network, for testing quantization against a per-tensor activation range."""
    width, layers, patch, size, embed = SHAPES[name]
    g = torch.Generator().manual_seed(seed)

    def r(*shape, std=0.02):
        return torch.randn(*shape, generator=g) * std

    tokens = (size // patch) ** 2 + 1
    sd = {
        "visual.conv1.weight": r(width, 3, patch, patch, std=(3 * patch * patch) ** -0.5),
        "visual.class_embedding": r(width, std=0.1),
        "visual.positional_embedding": r(tokens, width, std=0.1),
        "visual.ln_pre.weight": torch.ones(width), "visual.ln_pre.bias": torch.zeros(width),
        "visual.ln_post.weight": torch.ones(width), "visual.ln_post.bias": torch.zeros(width),
        "visual.proj": r(width, embed),
    }
    for i in range(layers):
        p = f"visual.transformer.resblocks.{i}."
        sd.update({
            p + "ln_1.weight": torch.ones(width), p + "ln_1.bias": torch.zeros(width),
            p + "attn.in_proj_weight": r(3 * width, width), p + "attn.in_proj_bias": r(3 * width),
            p + "attn.out_proj.weight": r(width, width), p + "attn.out_proj.bias": r(width),
            p + "ln_2.weight": torch.ones(width), p + "ln_2.bias": torch.zeros(width),
            p + "mlp.c_fc.weight": r(4 * width, width), p + "mlp.c_fc.bias": r(4 * width),
            p + "mlp.c_proj.weight": r(width, 4 * width), p + "mlp.c_proj.bias": r(width),
        })
        if outliers > 1:
            ch = list(OUTLIER_CHANNELS)
            for ln, w in (("ln_1", "attn.in_proj_weight"), ("ln_2", "mlp.c_fc.weight")):
                sd[p + ln + ".weight"][ch] = outliers
                sd[p + w][:, ch] /= outliers**0.5
    return sd


def random_head(name: str, calib: tuple[float, float] | None = None):
    """A random RINE head (nproj=4, proj_dim=128). `calib` = (mean, std) of its raw logits on
    sample images: the last layer is rescaled so that logits there have mean 0 and std 2,
    else a random head gives every image ~0.5 and a precision check would test nothing."""
    from rine.config import HeadConfig
    from rine.model.head import RINEHead

    width, layers = SHAPES[name][:2]
    torch.manual_seed(1)
    head = RINEHead(HeadConfig(in_dim=width, n_blocks=layers, nproj=4, proj_dim=128)).eval()
    with torch.no_grad():
        # He init: PyTorch's default Linear init shrinks the signal through the 4+4+2
        # ReLU layers until the logit no longer depends on the image.
        for m in head.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.normal_(0.0, (2.0 / m.in_features) ** 0.5)
                m.bias.zero_()
    if calib is None:
        return head
    mu, sigma = calib
    last = head.head[-1]
    with torch.no_grad():
        last.weight.mul_(2.0 / sigma)
        last.bias.sub_(mu).mul_(2.0 / sigma)
    return head


def build_hf_backbone(state: dict[str, torch.Tensor]):
    """The same weights as a float32 `TappedCLIPVision` (HF CLIPVisionModel, SDPA)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from rine.model.backbones import TappedCLIPVision, openai_to_hf_vision

    cfg_kwargs, hf_state = openai_to_hf_vision(state)
    cfg = CLIPVisionConfig(**cfg_kwargs)
    cfg._attn_implementation = "sdpa"
    clip = CLIPVisionModel(cfg)
    clip.load_state_dict(hf_state, strict=False)
    return TappedCLIPVision(clip)


@torch.no_grad()
def calibrate(name: str, paths: list[str]) -> tuple[float, float]:
    """(mean, std) of the uncalibrated head's fp32 logits on the centre crops of `paths`."""
    from rine.config import PreprocessConfig
    from rine.data.images import load_image
    from rine.data.preprocess import preprocess

    backbone = build_hf_backbone(random_openai_state(name))
    pixels = torch.cat([preprocess(load_image(p), PreprocessConfig()) for p in paths])
    logits = random_head(name)(backbone(pixels)).logits
    return float(logits.mean()), float(logits.std().clamp_min(1e-8))


def default_trained_head(arch: str) -> str | None:
    """The official 2-class RINE head (trained, ViT-L/14-shaped) from the repository's test fixtures."""
    path = BENCHMARKS.parent / "tests" / "fixtures" / "rine-official" / "model_2class_trainable.pth"
    return str(path) if arch == "ViT-L/14" and path.is_file() else None


def trained_head(path: str):
    from rine.model.checkpoints import load_head

    return load_head(path)[0].eval()
