"""Shared fixtures: tiny CLIP backbones and RINE checkpoints built by the tests themselves.

Nothing here downloads anything. `tiny_*` fixtures are session-scoped and cheap
(a 3-block, 64-wide ViT with 32-pixel patches at 224 px input).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("RINE_SHARED", REPO.parent / "shared"))
PARITY = SHARED / "fixtures" / "parity"
OFFICIAL = SHARED / "fixtures" / "rine-official"

TINY = dict(width=64, layers=3, patch=32, image_size=224, embed_dim=32)


def require_shared() -> None:
    if not PARITY.is_dir():
        pytest.skip(f"shared fixtures not found at {SHARED} (set RINE_SHARED)")


def make_openai_visual_state(
    width: int = 64, layers: int = 3, patch: int = 32, image_size: int = 224, embed_dim: int = 32, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Random weights with OpenAI CLIP's visual key names (`visual.transformer.resblocks.N...`)."""
    g = torch.Generator().manual_seed(seed)
    tokens = (image_size // patch) ** 2 + 1

    def r(*shape, scale=0.05):
        return torch.randn(*shape, generator=g) * scale

    sd = {
        "visual.class_embedding": r(width, scale=0.5),
        "visual.positional_embedding": r(tokens, width, scale=0.1),
        "visual.proj": r(width, embed_dim),
        "visual.conv1.weight": r(width, 3, patch, patch, scale=0.02),
        "visual.ln_pre.weight": 1 + r(width, scale=0.1),
        "visual.ln_pre.bias": r(width, scale=0.1),
        "visual.ln_post.weight": 1 + r(width, scale=0.1),
        "visual.ln_post.bias": r(width, scale=0.1),
    }
    for i in range(layers):
        p = f"visual.transformer.resblocks.{i}."
        sd.update(
            {
                p + "attn.in_proj_weight": r(3 * width, width, scale=0.1),
                p + "attn.in_proj_bias": r(3 * width, scale=0.05),
                p + "attn.out_proj.weight": r(width, width, scale=0.1),
                p + "attn.out_proj.bias": r(width, scale=0.05),
                p + "ln_1.weight": 1 + r(width, scale=0.1),
                p + "ln_1.bias": r(width, scale=0.1),
                p + "ln_2.weight": 1 + r(width, scale=0.1),
                p + "ln_2.bias": r(width, scale=0.1),
                p + "mlp.c_fc.weight": r(4 * width, width, scale=0.1),
                p + "mlp.c_fc.bias": r(4 * width, scale=0.05),
                p + "mlp.c_proj.weight": r(width, 4 * width, scale=0.1),
                p + "mlp.c_proj.bias": r(width, scale=0.05),
            }
        )
    return sd


@pytest.fixture(scope="session")
def tiny_openai_file(tmp_path_factory) -> Path:
    """A tiny OpenAI-format CLIP visual state dict saved as safetensors."""
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("openai") / "tiny-clip.safetensors"
    save_file(make_openai_visual_state(**TINY), str(path))
    return path


@pytest.fixture(scope="session")
def tiny_backbone_dir(tmp_path_factory, tiny_openai_file) -> Path:
    """The same tiny backbone as a Hugging Face `save_pretrained` folder."""
    from rine.model.backbones import load_openai_clip_vision

    folder = tmp_path_factory.mktemp("hf") / "tiny-clip-vision"
    load_openai_clip_vision(tiny_openai_file).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_checkpoint_dir(tmp_path_factory, tiny_backbone_dir) -> Path:
    """A RINE checkpoint folder (config.json + model.safetensors) on the tiny backbone.

    The head is random (seed 0) with nproj=2, proj_dim=32; the config's backbone is the
    absolute path of `tiny_backbone_dir`, so `Detector.from_pretrained(folder)` works offline.
    """
    from rine.config import HeadConfig, RINEConfig
    from rine.model.checkpoints import save_pretrained
    from rine.model.head import RINEHead

    torch.manual_seed(0)
    head_cfg = HeadConfig(in_dim=TINY["width"], n_blocks=TINY["layers"], nproj=2, proj_dim=32)
    head = RINEHead(head_cfg)
    config = RINEConfig(backbone=str(tiny_backbone_dir), head=head_cfg, name="tiny-test")
    folder = tmp_path_factory.mktemp("ckpt") / "tiny-rine"
    save_pretrained(head, config, folder)
    return folder


@pytest.fixture(scope="session")
def tiny_detector(tiny_checkpoint_dir):
    from rine.inference.detector import Detector

    return Detector.from_pretrained(str(tiny_checkpoint_dir), device="cpu")


def write_image(path: Path, size=(256, 256), mode="RGB", seed=0, fmt=None) -> Path:
    """A random-noise image file of the given size and mode."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    w, h = size
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    arr = rng.integers(0, 256, size=(h, w, channels), dtype=np.uint8)
    img = Image.fromarray(arr[..., 0] if channels == 1 else arr, mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format=fmt)
    return path


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """No test reads or writes the user's caches, and none reaches the network."""
    monkeypatch.setenv("RINE_HOME", str(tmp_path / "rine-home"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("RINE_HEAD_BASE_URL", "http://127.0.0.1:9/unreachable")
    monkeypatch.setenv("RINE_SIDBENCH_BASE_URL", "http://127.0.0.1:9/unreachable")
