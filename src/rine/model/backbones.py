"""Frozen CLIP vision encoders that return the CLS token of every block.

The tap point is RINE's: in each Transformer block, the output of the SECOND
LayerNorm (OpenAI `ln_2`, Hugging Face `layer_norm2`), i.e.
`layer_norm2(x + attn(layer_norm1(x)))[:, 0]`, not the block's residual output.

Backbones come from three kinds of source, all ending in a `CLIPVisionModel`:
  * a registry name (`ViT-L/14`) or a Hugging Face hub id,
  * a local `save_pretrained` folder (of a `CLIPVisionModel` or a full `CLIPModel`),
  * an OpenAI-format CLIP file (TorchScript `.pt` as OpenAI ships it, or a plain state
    dict / safetensors with `visual.transformer.resblocks.N...` keys); the architecture
    is inferred from the tensor shapes.
"""

from __future__ import annotations

import logging
import math
import os
import re
import zipfile
from pathlib import Path

import torch
from torch import nn

from .registry import BACKBONES, list_backbones

logger = logging.getLogger(__name__)


class TappedCLIPVision(nn.Module):
    """A frozen `CLIPVisionModel` whose forward returns the per-block CLS taps.

    forward(pixel_values [batch, 3, H, W]) -> taps [batch, blocks, width]
    """

    def __init__(self, clip_vision: nn.Module, source: str = "", revision: str | None = None):
        super().__init__()
        self.clip = clip_vision
        self.clip.eval()
        self.clip.requires_grad_(False)
        self.source = source
        self.revision = revision
        cfg = clip_vision.config
        self.width: int = cfg.hidden_size
        self.n_blocks: int = cfg.num_hidden_layers
        self.image_size: int = cfg.image_size
        self.released = False  # see release_block_weights

    def train(self, mode: bool = True) -> TappedCLIPVision:
        # The encoder is frozen: it stays in eval mode whatever the caller asks.
        super().train(mode)
        self.clip.eval()
        return self

    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor, n_blocks: int | None = None) -> torch.Tensor:
        """pixel_values [batch, 3, H, W] -> taps [batch, n_blocks, width].

        `n_blocks` < all stops after that many blocks (the later ones are not needed).
        """
        if self.released:
            raise RuntimeError(
                "this backbone's block weights were released to save memory (Detector(keep_reference=False)); "
                "score through the Detector (predict, score_views, encode_views), or load it with keep_reference=True"
            )
        layers = self.clip.encoder.layers
        n = len(layers) if n_blocks is None else n_blocks
        dtype = self.clip.embeddings.patch_embedding.weight.dtype
        hidden = self.clip.embeddings(pixel_values.to(dtype))  # [batch, tokens, width]
        hidden = self.clip.pre_layrnorm(hidden)
        taps = []
        for i, layer in enumerate(layers[:n]):
            residual = hidden
            attn_out, _ = layer.self_attn(hidden_states=layer.layer_norm1(hidden))
            hidden = residual + attn_out
            normed = layer.layer_norm2(hidden)  # RINE's tap point (`ln_2`)
            taps.append(normed[:, 0])
            if i + 1 < n:  # the last needed block's MLP does not affect any tap
                hidden = hidden + layer.mlp(normed)
        return torch.stack(taps, dim=1)


    def release_block_weights(self) -> int:
        """Free the blocks' linear weights (attention projections and MLP: nearly all of the
        model) once a fast encoder holds its own re-laid-out copies; `forward` then refuses to
        run. Embeddings and LayerNorms, which the fast encoder shares, stay. -> bytes freed."""
        freed = 0
        for layer in self.clip.encoder.layers:
            attn, mlp = layer.self_attn, layer.mlp
            for linear in (attn.q_proj, attn.k_proj, attn.v_proj, attn.out_proj, mlp.fc1, mlp.fc2):
                for name in ("weight", "bias"):
                    param = getattr(linear, name)
                    if param is not None and param.numel():
                        freed += param.numel() * param.element_size()
                        empty = torch.empty(0, dtype=param.dtype, device=param.device)
                        setattr(linear, name, nn.Parameter(empty, requires_grad=False))
        self.released = True
        return freed


# --------------------------------------------------------------------------- loading


def load_backbone(
    source: str,
    revision: str | None = None,
    attn_implementation: str = "sdpa",
) -> TappedCLIPVision:
    """Build a frozen tapped encoder from a registry name, hub id, folder or OpenAI file."""
    from transformers import CLIPVisionModel

    path = Path(os.path.expanduser(source))
    if path.is_file():
        return TappedCLIPVision(load_openai_clip_vision(path, attn_implementation), str(path))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"{path} is a folder but has no config.json: expected a Hugging Face "
                "`save_pretrained` folder of a CLIP model"
            )
        model = CLIPVisionModel.from_pretrained(path, attn_implementation=attn_implementation)
        return TappedCLIPVision(model, str(path))
    from .pretrained import (
        BackboneUnavailableError,
        backbone_cached,
        backbone_problem,
        is_offline,
        looks_like_path,
        missing_message,
    )

    if looks_like_path(source):
        raise FileNotFoundError(
            f"backbone {source}: no such file or folder ({path.absolute()}); give a save_pretrained folder of a "
            "CLIP model or an OpenAI-format CLIP file (.pt, .safetensors)"
        )
    spec = BACKBONES.get(source)
    hub_id = spec.hub_id if spec else source
    rev = revision or (spec.revision if spec else None)
    if not spec and not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*", source):
        raise FileNotFoundError(
            f"backbone {source!r} is not a file, a folder, a known name ({', '.join(list_backbones())}) "
            "or a Hugging Face hub id (owner/name)"
        )
    # Cached, or offline / Hub unreachable: decided here in a file stat or one short request,
    # not by transformers' retries (30 s and a traceback).
    problem = backbone_problem(hub_id, rev)
    if problem is not None:
        raise BackboneUnavailableError(missing_message(f"backbone {source!r}", [problem]), [problem])
    local = is_offline() or backbone_cached(hub_id, rev)
    model = CLIPVisionModel.from_pretrained(
        hub_id, revision=rev, attn_implementation=attn_implementation, local_files_only=local
    )
    return TappedCLIPVision(model, hub_id, rev)


def _is_torchscript_archive(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(name.endswith("constants.pkl") or "/code/" in name for name in zf.namelist())


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read tensors from safetensors, a plain torch state dict, or a TorchScript archive.

    Pickles are read with `weights_only=True` (no arbitrary code). TorchScript archives,
    as OpenAI ships CLIP, can only be opened with `torch.jit.load`, which runs the archive's
    TorchScript code (not arbitrary Python, but not sandboxed either): use `.pt` backbones
    from a trusted source (OpenAI's), or convert them once to safetensors.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    if _is_torchscript_archive(path):
        module = torch.jit.load(str(path), map_location="cpu")
        return {k: v for k, v in module.state_dict().items()}
    obj = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path}: expected a state dict of tensors")
    return dict(obj)


def openai_to_hf_vision(state: dict[str, torch.Tensor]) -> tuple[dict, dict[str, torch.Tensor]]:
    """Convert OpenAI CLIP visual weights to `CLIPVisionModel` (config kwargs, state dict).

    Accepts keys with or without the `visual.` prefix; text-tower keys are ignored.
    """
    prefix = "visual." if any(k.startswith("visual.") for k in state) else ""
    vis = {k[len(prefix):]: v.float() for k, v in state.items() if k.startswith(prefix)}
    required = ["conv1.weight", "class_embedding", "positional_embedding", "ln_pre.weight"]
    missing = [k for k in required if k not in vis]
    if missing:
        raise ValueError(f"not an OpenAI-format CLIP vision state dict: missing {missing}")
    block_ids = sorted(
        {int(m.group(1)) for k in vis if (m := re.match(r"transformer\.resblocks\.(\d+)\.", k))}
    )
    if not block_ids or block_ids != list(range(len(block_ids))):
        raise ValueError("OpenAI CLIP state dict has no (or non-contiguous) transformer.resblocks")
    width, _, patch, _ = vis["conv1.weight"].shape
    n_tokens = vis["positional_embedding"].shape[0]
    grid = math.isqrt(n_tokens - 1)
    if grid * grid != n_tokens - 1:
        raise ValueError(f"positional_embedding has {n_tokens} tokens: not 1 + a square grid")
    if width % 64:
        raise ValueError(f"width {width} is not a multiple of 64: cannot infer the number of heads")
    config = dict(
        hidden_size=width,
        intermediate_size=vis["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        num_hidden_layers=len(block_ids),
        num_attention_heads=width // 64,
        image_size=grid * patch,
        patch_size=patch,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        projection_dim=vis["proj"].shape[1] if "proj" in vis else width,
    )
    out = {
        "embeddings.class_embedding": vis["class_embedding"],
        "embeddings.patch_embedding.weight": vis["conv1.weight"],
        "embeddings.position_embedding.weight": vis["positional_embedding"],
        "pre_layrnorm.weight": vis["ln_pre.weight"],
        "pre_layrnorm.bias": vis["ln_pre.bias"],
        "post_layernorm.weight": vis["ln_post.weight"],
        "post_layernorm.bias": vis["ln_post.bias"],
    }
    for i in block_ids:
        src, dst = f"transformer.resblocks.{i}.", f"encoder.layers.{i}."
        q, k, v = vis[src + "attn.in_proj_weight"].chunk(3, dim=0)
        qb, kb, vb = vis[src + "attn.in_proj_bias"].chunk(3, dim=0)
        out.update(
            {
                dst + "self_attn.q_proj.weight": q, dst + "self_attn.q_proj.bias": qb,
                dst + "self_attn.k_proj.weight": k, dst + "self_attn.k_proj.bias": kb,
                dst + "self_attn.v_proj.weight": v, dst + "self_attn.v_proj.bias": vb,
                dst + "self_attn.out_proj.weight": vis[src + "attn.out_proj.weight"],
                dst + "self_attn.out_proj.bias": vis[src + "attn.out_proj.bias"],
                dst + "layer_norm1.weight": vis[src + "ln_1.weight"],
                dst + "layer_norm1.bias": vis[src + "ln_1.bias"],
                dst + "layer_norm2.weight": vis[src + "ln_2.weight"],
                dst + "layer_norm2.bias": vis[src + "ln_2.bias"],
                dst + "mlp.fc1.weight": vis[src + "mlp.c_fc.weight"],
                dst + "mlp.fc1.bias": vis[src + "mlp.c_fc.bias"],
                dst + "mlp.fc2.weight": vis[src + "mlp.c_proj.weight"],
                dst + "mlp.fc2.bias": vis[src + "mlp.c_proj.bias"],
            }
        )
    return config, {k: v.contiguous() for k, v in out.items()}


def load_openai_clip_vision(path: str | Path, attn_implementation: str = "sdpa") -> nn.Module:
    """A `CLIPVisionModel` holding the visual tower of an OpenAI-format CLIP file."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    config_kwargs, state = openai_to_hf_vision(read_state_dict(path))
    config = CLIPVisionConfig(**config_kwargs)
    config._attn_implementation = attn_implementation
    model = CLIPVisionModel(config)
    result = model.load_state_dict(state, strict=False)
    unexpected = list(result.unexpected_keys)
    missing = [k for k in result.missing_keys if not k.endswith("position_ids")]
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not fit CLIPVisionModel (missing {missing}, unexpected {unexpected})")
    return model.eval()
