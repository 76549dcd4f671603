"""Checkpoints in the forms users bring them, built from the tests' own checkpoints."""

from __future__ import annotations

from pathlib import Path


def official_pth(tmp_path: Path, checkpoint: Path) -> Path:
    """The checkpoint's head saved as the official repository saves one: a bare state dict."""
    import torch

    from rine.model.checkpoints import load_pretrained

    head, _ = load_pretrained(checkpoint)
    pth = tmp_path / "head_trainable.pth"
    torch.save(head.state_dict(), pth)
    return pth
