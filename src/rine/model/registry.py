"""The named CLIP backbones: where their weights live and their shapes (torch-free).

Kept apart from backbones.py (which needs torch) so that `rine models`, `--help` and the
missing-weights checks read the registry without loading torch.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BackboneSpec:
    """A named CLIP vision encoder: where its weights live and its shape."""

    name: str
    hub_id: str
    revision: str
    width: int
    layers: int
    patch_size: int
    image_size: int


# Revisions pin the weights a user downloads. The ViT-L/14 pin is the last commit of
# openai/clip-vit-large-patch14 ("Adding `safetensors` variant of this model").
# The others are pinned to "main" until their commit ids are checked on a networked machine.
BACKBONES: dict[str, BackboneSpec] = {
    spec.name: spec
    for spec in [
        BackboneSpec("ViT-B/32", "openai/clip-vit-base-patch32", "main", 768, 12, 32, 224),
        BackboneSpec("ViT-B/16", "openai/clip-vit-base-patch16", "main", 768, 12, 16, 224),
        BackboneSpec(
            "ViT-L/14",
            "openai/clip-vit-large-patch14",
            "32bd64288804d66eefd0ccbe215aa642df71cc41",
            1024,
            24,
            14,
            224,
        ),
        BackboneSpec("ViT-L/14-336", "openai/clip-vit-large-patch14-336", "main", 1024, 24, 14, 336),
    ]
}


def list_backbones() -> list[str]:
    return sorted(BACKBONES)
