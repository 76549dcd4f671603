"""The trainable part of RINE: proj1 -> Trainable Importance Estimator -> proj2 -> classifier.

Module and parameter names match the official checkpoints exactly
(`alpha`, `proj1.{1,4,..}`, `proj2.{1,4,..}`, `head.{0,3,6}`), so an official
`*_trainable.pth` state dict loads with `strict=True`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import HeadConfig


def _projection(in_dim: int, out_dim: int, nproj: int, dropout: float) -> nn.Sequential:
    """Dropout, then `nproj` x [Linear, ReLU, Dropout]; Linear layers sit at indices 1, 4, 7, ..."""
    layers: list[nn.Module] = [nn.Dropout(dropout)]
    for i in range(nproj):
        layers += [nn.Linear(in_dim if i == 0 else out_dim, out_dim), nn.ReLU(), nn.Dropout(dropout)]
    return nn.Sequential(*layers)


@dataclass
class HeadOutput:
    """logits [batch]: log-odds of "synthetic"; embedding [batch, proj_dim]: proj2 output
    (the contrastive loss's input); contributions [batch, blocks, proj_dim]: each block's
    importance-weighted projected token, whose sum over blocks is proj2's input."""

    logits: torch.Tensor
    embedding: torch.Tensor
    contributions: torch.Tensor


class RINEHead(nn.Module):
    """taps [batch, blocks, in_dim] -> HeadOutput (logits [batch], embedding [batch, proj_dim])."""

    def __init__(self, config: HeadConfig):
        super().__init__()
        self.config = config
        p = config.proj_dim
        if config.use_tie:
            # One weight per block per channel, softmaxed over blocks (dim 1).
            self.alpha = nn.Parameter(torch.randn(1, config.n_blocks, p))
        self.proj1 = _projection(config.in_dim, p, config.nproj, config.dropout)
        self.proj2 = _projection(p, p, config.nproj, config.dropout)
        self.head = nn.Sequential(
            nn.Linear(p, p), nn.ReLU(), nn.Dropout(config.dropout),
            nn.Linear(p, p), nn.ReLU(), nn.Dropout(config.dropout),
            nn.Linear(p, 1),
        )

    def block_weights(self) -> torch.Tensor:
        """softmax(alpha) over blocks -> [1, blocks, proj_dim]; uniform without TIE."""
        if self.config.use_tie:
            return torch.softmax(self.alpha.float(), dim=1)
        p, n = self.config.proj_dim, self.config.n_blocks
        return torch.full((1, n, p), 1.0 / n, device=self.proj1[1].weight.device)

    def block_importance(self) -> torch.Tensor:
        """The model's importance of each block, averaged over channels -> [blocks], sums to 1."""
        return self.block_weights()[0].mean(dim=-1)

    def select_blocks(self, taps: torch.Tensor) -> torch.Tensor:
        """taps [batch, all_blocks, dim] -> [batch, n_blocks, dim] per `config.blocks`."""
        if self.config.blocks == "last":
            return taps[:, -1:]
        if taps.shape[1] != self.config.n_blocks:
            raise ValueError(
                f"head expects {self.config.n_blocks} blocks, got taps of shape {tuple(taps.shape)}"
            )
        return taps

    def forward(self, taps: torch.Tensor) -> HeadOutput:
        g = self.proj1(self.select_blocks(taps).float())  # [batch, blocks, p]
        contributions = self.block_weights().to(g.dtype) * g  # [batch, blocks, p]
        z = self.proj2(contributions.sum(dim=1))  # [batch, p]
        logits = self.head(z).squeeze(-1)  # [batch]
        return HeadOutput(logits=logits, embedding=z, contributions=contributions)
