"""RINE end to end: frozen tapped CLIP encoder + trainable head.

    pixels [batch, 3, S, S]
      -> backbone taps  g [batch, blocks, width]      (ln_2 output, CLS token, every block)
      -> head           logits [batch], embedding [batch, proj_dim]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import HeadConfig, RINEConfig
from .backbones import TappedCLIPVision
from .head import HeadOutput, RINEHead


@dataclass
class RINEOutput:
    """logits [batch]; embedding [batch, proj_dim]; taps [batch, blocks, width];
    contributions [batch, blocks, proj_dim] (see `HeadOutput`)."""

    logits: torch.Tensor
    embedding: torch.Tensor
    taps: torch.Tensor
    contributions: torch.Tensor


class RINEModel(nn.Module):
    def __init__(self, backbone: TappedCLIPVision, head: RINEHead):
        super().__init__()
        if head.config.in_dim != backbone.width:
            raise ValueError(
                f"head expects {head.config.in_dim}-wide taps but the backbone is {backbone.width} wide"
            )
        if not head.config.takes(backbone.n_blocks):
            raise ValueError(
                f"head expects {head.config.n_blocks} blocks but the backbone has {backbone.n_blocks}"
            )
        self.backbone = backbone
        self.head = head

    @classmethod
    def build(cls, backbone: TappedCLIPVision, head_config: HeadConfig | None = None, **head_kwargs) -> RINEModel:
        """A model with a freshly initialised head sized to `backbone`."""
        if head_config is None:
            head_config = HeadConfig.for_backbone(backbone.width, backbone.n_blocks, **head_kwargs)
        return cls(backbone, RINEHead(head_config))

    def forward(self, pixel_values: torch.Tensor) -> RINEOutput:
        taps = self.backbone(pixel_values)  # [batch, blocks, width], no grad
        out: HeadOutput = self.head(taps)
        return RINEOutput(out.logits, out.embedding, taps, out.contributions)


def describe(config: RINEConfig) -> str:
    h = config.head
    return (
        f"RINE[{config.name or 'custom'}] backbone={config.backbone}"
        f"@{config.backbone_revision or 'default'} nproj={h.nproj} proj_dim={h.proj_dim} "
        f"blocks={h.n_blocks} tie={h.use_tie}"
    )
