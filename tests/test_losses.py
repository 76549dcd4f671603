"""SupCon (Khosla et al., one view, contrast mode all) and BCE(sum) against plain loops."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from rine.training.losses import rine_loss, supcon_loss


def supcon_by_hand(z: torch.Tensor, y: torch.Tensor, t: float = 0.07) -> float:
    """Eq. 2 of Khosla et al. written as loops; anchors without positives contribute 0."""
    n = len(y)
    total = 0.0
    for i in range(n):
        pos = [p for p in range(n) if p != i and y[p] == y[i]]
        denom = sum(math.exp(float(z[i] @ z[a]) / t) for a in range(n) if a != i)
        if pos:
            total += -sum(float(z[i] @ z[p]) / t - math.log(denom) for p in pos) / len(pos)
    return total / n


def test_supcon_matches_the_formula():
    g = torch.Generator().manual_seed(0)
    z = F.normalize(torch.randn(9, 16, generator=g, dtype=torch.float64), dim=1)
    y = torch.tensor([0, 1, 1, 0, 0, 1, 0, 1, 2])  # label 2 has no positive
    assert abs(float(supcon_loss(z, y)) - supcon_by_hand(z, y)) < 1e-9


def test_supcon_prefers_clustered_classes():
    y = torch.tensor([0, 0, 1, 1])
    tight = F.normalize(torch.tensor([[1.0, 0.01], [1.0, -0.01], [-1.0, 0.01], [-1.0, -0.01]]), dim=1)
    mixed = F.normalize(torch.tensor([[1.0, 0.01], [-1.0, 0.01], [1.0, -0.01], [-1.0, -0.01]]), dim=1)
    assert supcon_loss(tight, y) < supcon_loss(mixed, y)


def test_rine_loss_is_bce_sum_plus_factor_supcon():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(6, generator=g, requires_grad=True)
    emb = torch.randn(6, 8, generator=g, requires_grad=True)
    y = torch.tensor([0, 1, 0, 1, 1, 0])
    total, bce, sc = rine_loss(logits, emb, y, factor=0.4)
    bce_ref = sum(F.binary_cross_entropy_with_logits(logits[i], y[i].float()) for i in range(6))
    assert torch.allclose(bce, bce_ref.detach(), atol=1e-6)
    assert torch.allclose(total, bce_ref + 0.4 * supcon_loss(F.normalize(emb, dim=1), y), atol=1e-6)
    total.backward()
    assert torch.isfinite(emb.grad).all() and emb.grad.abs().sum() > 0
    only_bce, _, zero = rine_loss(logits, emb, y, factor=0.4, contrastive=False)
    assert float(zero) == 0 and torch.allclose(only_bce, bce_ref)


def test_supcon_of_a_single_sample_is_zero_not_nan():
    feats = F.normalize(torch.randn(1, 8, requires_grad=True), dim=1)
    loss = supcon_loss(feats, torch.tensor([1]))
    assert loss.item() == 0.0
    loss.backward()  # still part of the graph
