"""Small random CLIP encoders for the int8 tests."""

from __future__ import annotations

from conftest import make_openai_visual_state


def outlier_backbone(layers: int = 6, width: int = 128, channels=(5, 40), factor: float = 20.0):
    """A small random CLIP whose two LayerNorms per block have two channels 20x larger (their
    GEMM input columns divided by sqrt(20)): a per-tensor input range is then set by those
    channels, as in real CLIP and LLMs, and the rest of the channels get a coarse step."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from rine.model.backbones import TappedCLIPVision, openai_to_hf_vision

    sd = make_openai_visual_state(width=width, layers=layers, patch=32)
    for i in range(layers):
        p = f"visual.transformer.resblocks.{i}."
        for ln, w in (("ln_1", "attn.in_proj_weight"), ("ln_2", "mlp.c_fc.weight")):
            sd[p + ln + ".weight"][list(channels)] = factor
            sd[p + w][:, list(channels)] /= factor**0.5
    kwargs, hf_state = openai_to_hf_vision(sd)
    cfg = CLIPVisionConfig(**kwargs)
    cfg._attn_implementation = "sdpa"
    clip = CLIPVisionModel(cfg)
    clip.load_state_dict(hf_state, strict=False)
    return TappedCLIPVision(clip).eval()
