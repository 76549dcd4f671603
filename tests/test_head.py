"""The RINE head: shapes, the official checkpoint, our format, ablations, invariants."""

from __future__ import annotations

import json

import pytest
import torch

from rine.config import HeadConfig, RINEConfig
from rine.model.backbones import load_backbone
from rine.model.checkpoints import (
    CheckpointError,
    git_blob_sha1,
    head_from_state_dict,
    infer_head_config,
    load_head,
    load_official_head,
    load_pretrained,
    save_pretrained,
)
from rine.model.head import RINEHead
from rine.model.rine_model import RINEModel

from conftest import OFFICIAL, TINY

OFFICIAL_2CLASS_BLOB = "b8418b5884fd1fc1dba79bea91f41ab2341673d8"


def test_head_shapes_and_official_key_names():
    cfg = HeadConfig(in_dim=48, n_blocks=5, nproj=3, proj_dim=16)
    head = RINEHead(cfg).eval()
    assert sorted(head.state_dict()) == sorted(
        ["alpha"]
        + [f"proj1.{i}.{p}" for i in (1, 4, 7) for p in ("weight", "bias")]
        + [f"proj2.{i}.{p}" for i in (1, 4, 7) for p in ("weight", "bias")]
        + [f"head.{i}.{p}" for i in (0, 3, 6) for p in ("weight", "bias")]
    )
    out = head(torch.randn(7, 5, 48))
    assert out.logits.shape == (7,)
    assert out.embedding.shape == (7, 16)
    assert out.contributions.shape == (7, 5, 16)
    assert head.block_importance().shape == (5,)
    torch.testing.assert_close(head.block_importance().sum(), torch.tensor(1.0))


def test_tie_is_softmax_over_blocks_per_channel():
    head = RINEHead(HeadConfig(in_dim=8, n_blocks=3, nproj=1, proj_dim=4)).eval()
    with torch.no_grad():
        head.alpha.copy_(torch.tensor([[[0.0, 1, 2, 3], [0, 0, 0, 0], [1, 1, 1, 1]]]))
        taps = torch.randn(2, 3, 8)
        g = head.proj1(taps)
        manual = sum(torch.softmax(head.alpha, dim=1)[0, b] * g[:, b] for b in range(3))
        torch.testing.assert_close(head(taps).contributions.sum(1), manual)
    w = head.block_weights()[0]
    torch.testing.assert_close(w.sum(0), torch.ones(4))  # each channel's weights sum to 1 over blocks


def test_ablations_no_tie_and_last_block():
    no_tie = RINEHead(HeadConfig(in_dim=8, n_blocks=3, nproj=1, proj_dim=4, use_tie=False)).eval()
    assert "alpha" not in no_tie.state_dict()
    taps = torch.randn(2, 3, 8)
    with torch.no_grad():
        expected = no_tie.proj1(taps).mean(dim=1)
        torch.testing.assert_close(no_tie(taps).contributions.sum(1), expected)
    last = RINEHead(HeadConfig(in_dim=8, n_blocks=1, nproj=1, proj_dim=4, blocks="last")).eval()
    with torch.no_grad():
        a = last(taps).logits
        b = last(taps[:, -1:]).logits
    torch.testing.assert_close(a, b)


def test_only_head_gets_gradients_and_no_nans(tiny_openai_file):
    backbone = load_backbone(str(tiny_openai_file))
    model = RINEModel.build(backbone, nproj=2, proj_dim=16)
    model.train()
    assert not backbone.clip.training  # frozen encoder stays in eval mode
    out = model(torch.randn(4, 3, 224, 224))
    loss = torch.nn.functional.binary_cross_entropy_with_logits(out.logits, torch.tensor([0.0, 1, 0, 1]))
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is None for p in backbone.parameters())
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.head.parameters())


def test_official_checkpoint_loads_strict_and_round_trips(tmp_path):
    pth = OFFICIAL / "model_2class_trainable.pth"
    assert git_blob_sha1(pth) == OFFICIAL_2CLASS_BLOB
    head = load_official_head(pth, expected_blob_sha1=OFFICIAL_2CLASS_BLOB)
    assert head.config == HeadConfig(in_dim=1024, n_blocks=24, nproj=4, proj_dim=128)
    assert tuple(head.alpha.shape) == (1, 24, 128)
    assert tuple(head.proj1[1].weight.shape) == (128, 1024)
    n_params = sum(p.numel() for p in head.parameters())
    assert n_params == 283_009  # the paper's count for the 2-class model

    raw = torch.load(str(pth), map_location="cpu", weights_only=True)
    config = RINEConfig(backbone="ViT-L/14", head=head.config, name="rine-vitl14-2class")
    save_pretrained(head, config, tmp_path / "ckpt")
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["head"]["proj_dim"] == 128
    head2, config2 = load_pretrained(tmp_path / "ckpt")
    assert config2 == config
    for k, v in raw.items():
        torch.testing.assert_close(head2.state_dict()[k], v.float().cpu(), rtol=0, atol=0)


def test_wrong_blob_id_is_refused():
    with pytest.raises(CheckpointError, match="git blob id"):
        load_official_head(OFFICIAL / "model_2class_trainable.pth", expected_blob_sha1="0" * 40)


def test_bad_checkpoints_give_clear_errors(tmp_path):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pth"):
        load_head(junk)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_head(tmp_path / "missing.pth")
    (tmp_path / "empty-dir").mkdir()
    with pytest.raises(CheckpointError, match="config.json is missing"):
        load_head(tmp_path / "empty-dir")
    state = RINEHead(HeadConfig(in_dim=8, n_blocks=2, nproj=1, proj_dim=4)).state_dict()
    state["head.6.weight"] = torch.zeros(1, 5)
    with pytest.raises(CheckpointError, match="do not match"):
        head_from_state_dict(state)


def test_pickled_code_is_not_executed(tmp_path):
    """A malicious pickle is refused by weights_only loading, not run."""
    import pickle

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    bad = tmp_path / "evil.pth"
    bad.write_bytes(pickle.dumps({"alpha": Evil()}))
    with pytest.raises(CheckpointError):
        load_head(bad)
    assert not marker.exists()


def test_infer_head_config_from_shapes():
    state = RINEHead(HeadConfig(in_dim=TINY["width"], n_blocks=3, nproj=2, proj_dim=24)).state_dict()
    assert infer_head_config(state) == HeadConfig(in_dim=TINY["width"], n_blocks=3, nproj=2, proj_dim=24)
