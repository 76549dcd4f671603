"""Parity with the reference implementation.

1. On the shared fixtures (the reference code run on random tiny weights): our
   preprocessing, per-block taps, proj2 output and logits equal the reference's,
   through the OpenAI-format loader, the HF `save_pretrained` path and a TorchScript
   archive.
2. On other random weights and shapes: our HF-based taps equal an independent
   OpenAI-style encoder with hooks on `ln_2` (tests/support/openai_style_vit.py).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rine.config import PreprocessConfig
from rine.data.images import load_image
from rine.data.preprocess import preprocess
from rine.model.backbones import load_backbone, load_openai_clip_vision, read_state_dict
from rine.model.checkpoints import head_from_state_dict, load_official_head
from rine.model.rine_model import RINEModel

from conftest import PARITY, make_openai_visual_state
from support.openai_style_vit import reference_taps

# Measured against the reference's float32 outputs (this machine, 1 and 2 threads alike):
# largest |difference| 1.2e-6 on taps (values up to 3.1), 1.7e-6 on proj2's output,
# 9.8e-7 on logits: rounding of a different operation order (fused attention, HF vs
# OpenAI modules), not bit-exact. The tolerance is 10x the largest; README states the figures.
ATOL = 1e-5


@pytest.fixture(scope="module")
def fixture_arrays():
    tiny = PARITY / "tiny"
    return {name: np.load(tiny / f"{name}.npy") for name in ("input", "ln2_cls", "logits", "z", "ln2_all_tokens")}


@pytest.fixture(scope="module")
def parity_hf_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("parity-hf")
    load_openai_clip_vision(PARITY / "tiny" / "clip_visual.safetensors").save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def parity_torchscript(tmp_path_factory):
    """The fixture's weights as a TorchScript archive, the container OpenAI ships CLIP in."""
    state = read_state_dict(PARITY / "tiny" / "clip_visual.safetensors")

    class Holder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.visual = torch.nn.Module()
            for key, value in state.items():
                owner = self
                *parents, leaf = key.split(".")
                for part in parents:
                    if not hasattr(owner, part):
                        owner.add_module(part, torch.nn.Module())
                    owner = getattr(owner, part)
                owner.register_parameter(leaf, torch.nn.Parameter(value, requires_grad=False))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    path = tmp_path_factory.mktemp("parity-ts") / "ViT-tiny.pt"
    torch.jit.save(torch.jit.script(Holder()), str(path))
    return path


def test_preprocessing_equals_reference_input(fixture_arrays):
    images = sorted((PARITY / "images").iterdir())
    ours = torch.cat([preprocess(load_image(p), PreprocessConfig()) for p in images])
    np.testing.assert_array_equal(ours.numpy(), fixture_arrays["input"])


@pytest.mark.parametrize("source", ["openai-safetensors", "hf-folder", "torchscript"])
def test_taps_and_logits_match_reference(source, fixture_arrays, parity_hf_dir, parity_torchscript):
    path = {
        "openai-safetensors": PARITY / "tiny" / "clip_visual.safetensors",
        "hf-folder": parity_hf_dir,
        "torchscript": parity_torchscript,
    }[source]
    backbone = load_backbone(str(path))
    assert (backbone.width, backbone.n_blocks) == (128, 4)
    head = load_official_head(PARITY / "tiny" / "rine_head.pt")
    model = RINEModel(backbone, head).eval()
    with torch.no_grad():
        out = model(torch.from_numpy(fixture_arrays["input"]))
    assert out.taps.shape == (8, 4, 128)
    np.testing.assert_allclose(out.taps.numpy(), fixture_arrays["ln2_cls"], atol=ATOL, rtol=0)
    np.testing.assert_allclose(out.logits.numpy(), fixture_arrays["logits"][:, 0], atol=ATOL, rtol=0)
    np.testing.assert_allclose(out.embedding.numpy(), fixture_arrays["z"], atol=ATOL, rtol=0)


def test_tap_is_ln2_not_block_output(fixture_arrays):
    """The block's residual output differs from the ln_2 tap: guard against tapping the wrong point."""
    backbone = load_backbone(str(PARITY / "tiny" / "clip_visual.safetensors"))
    pixels = torch.from_numpy(fixture_arrays["input"][:2])
    with torch.no_grad():
        hidden = backbone.clip(pixel_values=pixels, output_hidden_states=True).hidden_states
    block_outputs = torch.stack([h[:, 0] for h in hidden[1:]], dim=1)
    assert not np.allclose(block_outputs.numpy(), fixture_arrays["ln2_cls"][:2], atol=1e-2)


def test_safetensors_head_equals_pickle_head():
    from safetensors.torch import load_file

    a = load_official_head(PARITY / "tiny" / "rine_head.pt").state_dict()
    b = head_from_state_dict(load_file(str(PARITY / "tiny" / "rine_head.safetensors"))).state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


@pytest.mark.parametrize(
    "width,layers,patch,image_size,seed",
    [(64, 2, 32, 96, 1), (128, 3, 16, 64, 2), (192, 5, 14, 56, 3)],
)
def test_taps_match_independent_openai_style_encoder(tmp_path, width, layers, patch, image_size, seed):
    from safetensors.torch import save_file

    state = make_openai_visual_state(width, layers, patch, image_size, embed_dim=16, seed=seed)
    path = tmp_path / "clip.safetensors"
    save_file(state, str(path))
    pixels = torch.randn(3, 3, image_size, image_size, generator=torch.Generator().manual_seed(seed))
    expected, _ = reference_taps(state, pixels, heads=width // 64)

    # Same machine, same float32 operations: bit-exact (measured max |difference| 0.0).
    ours_openai = load_backbone(str(path))(pixels)
    torch.testing.assert_close(ours_openai, expected, atol=0, rtol=0)

    folder = tmp_path / "hf"
    load_openai_clip_vision(path).save_pretrained(folder)
    torch.testing.assert_close(load_backbone(str(folder))(pixels), expected, atol=0, rtol=0)


def test_fewer_blocks_are_a_prefix_of_all_taps(tiny_openai_file):
    backbone = load_backbone(str(tiny_openai_file))
    pixels = torch.randn(2, 3, 224, 224)
    full = backbone(pixels)
    torch.testing.assert_close(backbone(pixels, n_blocks=2), full[:, :2], rtol=0, atol=1e-6)
