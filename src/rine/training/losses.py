"""RINE's training loss: BCEWithLogits (sum over the batch) + factor x SupCon.

SupCon is the supervised contrastive loss of Khosla et al. (2020) as the reference uses it:
one view per sample, contrast mode "all", temperature 0.07, base temperature 0.07,
on the L2-normalised proj2 output. An anchor with no positive in the batch contributes
0 (its positive count is clamped to 1) but still counts in the mean.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def supcon_loss(
    features: torch.Tensor, labels: torch.Tensor, temperature: float = 0.07, base_temperature: float = 0.07
) -> torch.Tensor:
    """features [batch, dim] (L2-normalised), labels [batch] -> scalar loss."""
    if features.ndim != 2:
        raise ValueError(f"features must be [batch, dim], got {tuple(features.shape)}")
    n = features.shape[0]
    if n < 2:
        # No other sample to contrast with: the formula gives 0 * log(0) = NaN (the reference's
        # too), which would poison every weight on a last batch of one. The loss is zero.
        return features.sum() * 0.0
    labels = labels.view(-1, 1)
    positives = torch.eq(labels, labels.T).float()  # [batch, batch]
    sim = features @ features.T / temperature  # [batch, batch]
    # Subtracting the row max (self-similarity included) keeps exp() finite; it cancels out.
    logits = sim - sim.max(dim=1, keepdim=True).values.detach()
    not_self = 1.0 - torch.eye(n, dtype=features.dtype, device=features.device)
    positives = positives * not_self
    log_prob = logits - torch.log((torch.exp(logits) * not_self).sum(dim=1, keepdim=True))
    n_pos = positives.sum(dim=1)
    n_pos = torch.where(n_pos < 1e-6, torch.ones_like(n_pos), n_pos)
    mean_log_prob_pos = (positives * log_prob).sum(dim=1) / n_pos  # [batch]
    return -(temperature / base_temperature) * mean_log_prob_pos.mean()


def rine_loss(
    logits: torch.Tensor, embedding: torch.Tensor, labels: torch.Tensor, factor: float = 0.2, contrastive: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits [batch], embedding [batch, p] (proj2 output), labels [batch] of 0/1
    -> (total, bce, supcon) scalars; supcon is 0 when `contrastive` is False."""
    bce = F.binary_cross_entropy_with_logits(logits.float(), labels.float(), reduction="sum")
    if not contrastive:
        return bce, bce.detach(), torch.zeros((), device=logits.device)
    sc = supcon_loss(F.normalize(embedding.float(), dim=1), labels)
    return bce + factor * sc, bce.detach(), sc.detach()
