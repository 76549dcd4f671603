"""Helpers of the ONNX tests: a SENSITIVE tiny head, the test crops, exports made through the CLI.

A random RINE head is nearly constant (its logits vary by ~1e-3 over images), so a
parity test on it could not tell a wrong tap or normalisation from a right one. The head
here has He-initialised weights and zero biases (the signal keeps its scale through the
layers) and a last layer along the main direction of variation of the test images, scaled
so that their logits spread over several units.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from conftest import OFFICIAL, PARITY

DEMO_IMAGES = ("real_aadlygmazf.jpg", "fake_dalle_zzrybysskm.png")


def image_paths() -> list[Path]:
    """The parity images (8 sizes and modes) and the two demo images of the reference."""
    return sorted((PARITY / "images").iterdir()) + [OFFICIAL / n for n in DEMO_IMAGES]


def image_crops(preprocess, paths=None) -> np.ndarray:
    """Centre crops (or ten-crops) [N, S, S, 3] uint8 of the test images, cut as rine detect does."""
    from rine.data.images import load_image
    from rine.data.preprocess import crop_views

    return np.concatenate([crop_views(load_image(p), preprocess) for p in (paths or image_paths())])


@torch.no_grad()
def sensitive_head(backbone, preprocess, logit_std: float = 3.0, seed: int = 0):
    """A RINEHead whose logits over the test images have standard deviation `logit_std`."""
    from rine.config import HeadConfig
    from rine.data.preprocess import normalize
    from rine.model.head import RINEHead

    torch.manual_seed(seed)
    head = RINEHead(HeadConfig(in_dim=backbone.width, n_blocks=backbone.n_blocks, nproj=2, proj_dim=32)).eval()
    for m in head.modules():
        if isinstance(m, torch.nn.Linear):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            m.bias.zero_()
    taps = backbone(normalize(torch.from_numpy(image_crops(preprocess)), preprocess.mean, preprocess.std))
    h = head.head[:6](head(taps).embedding)  # the last linear layer's input [N, proj_dim]
    centred = h - h.mean(0)
    direction = torch.linalg.svd(centred, full_matrices=False).Vh[0]
    scale = logit_std / (centred @ direction).std()
    head.head[6].weight.copy_((direction * scale)[None])
    head.head[6].bias.copy_((-(h.mean(0) @ direction) * scale)[None])
    return head


def make_sensitive_checkpoint(backbone_dir: Path, folder: Path) -> Path:
    """A checkpoint folder on the tiny backbone with `sensitive_head`."""
    from rine.config import PreprocessConfig, RINEConfig
    from rine.model.backbones import load_backbone
    from rine.model.checkpoints import save_pretrained

    pre = PreprocessConfig()
    head = sensitive_head(load_backbone(str(backbone_dir)), pre)
    config = RINEConfig(backbone=str(backbone_dir), head=head.config, preprocess=pre, name="tiny-sensitive")
    return save_pretrained(head, config, folder)


def export_with_cli(checkpoint: Path, out: Path, *extra: str) -> Path:
    """`rine export --format onnx --model checkpoint --out out ...` in-process; asserts success."""
    from rine.cli import main

    code = main(["export", "--format", "onnx", "--model", str(checkpoint), "--out", str(out), *extra])
    assert code == 0, f"rine export exited with {code}"
    return out
