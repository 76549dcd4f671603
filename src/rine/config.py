"""Configuration dataclasses, serialised as `config.json` next to the weights.

A RINE checkpoint folder holds:
  config.json        -> RINEConfig (backbone source, head hyper-parameters, preprocessing)
  model.safetensors  -> the trainable head only (the backbone is frozen and fetched separately)
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

CROP_MODES = ("center", "resize", "ten")
# Numeric modes of the encoder (rine.accel): "fp32" is exact, "auto" the fastest within tolerance.
PRECISIONS = ("auto", "fp32", "bf16", "fp16", "int8")
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
BLOCK_SELECTIONS = ("all", "last")


@dataclass
class HeadConfig:
    """Hyper-parameters of the trainable part (proj1 -> TIE -> proj2 -> classifier).

    in_dim:   width of the backbone's tapped tokens (1024 for ViT-L/14).
    n_blocks: number of tapped blocks the head consumes (24 for ViT-L/14, 1 if `blocks="last"`).
    """

    in_dim: int
    n_blocks: int
    nproj: int = 4
    proj_dim: int = 128
    dropout: float = 0.5
    # Ablations of the paper: `use_tie=False` averages blocks uniformly (no `alpha`);
    # `blocks="last"` feeds only the last block's token (no intermediate blocks).
    use_tie: bool = True
    blocks: str = "all"

    def __post_init__(self) -> None:
        if self.blocks not in BLOCK_SELECTIONS:
            raise ValueError(f"blocks must be one of {BLOCK_SELECTIONS}, got {self.blocks!r}")
        if self.nproj < 1 or self.proj_dim < 1 or self.n_blocks < 1 or self.in_dim < 1:
            raise ValueError(f"invalid head shape: {self}")


@dataclass
class PreprocessConfig:
    """How an image becomes the encoder's input.

    crop="center": the reference's test transform (no resize; zero-pad when smaller).
    crop="resize": shorter side resized to `image_size` (bicubic), then centre crop.
    crop="ten":    ten crops (corners + centre, and their mirror images); the
                   probability is sigmoid(mean of the ten logits), as the reference does.
    """

    image_size: int = 224
    crop: str = "center"
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD

    def __post_init__(self) -> None:
        if self.crop not in CROP_MODES:
            raise ValueError(f"crop must be one of {CROP_MODES}, got {self.crop!r}")
        self.mean = tuple(float(v) for v in self.mean)  # type: ignore[assignment]
        self.std = tuple(float(v) for v in self.std)  # type: ignore[assignment]


@dataclass
class RINEConfig:
    """Everything needed to rebuild a detector, minus the weights.

    backbone: a registry name (`ViT-L/14`), a Hugging Face hub id, or a local path.
    """

    backbone: str
    head: HeadConfig
    backbone_revision: str | None = None
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    threshold: float = 0.5
    name: str | None = None
    # Free-form provenance (training data, source URL, blob id...).
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RINEConfig:
        data = dict(data)
        head = HeadConfig(**data.pop("head"))
        pre = data.pop("preprocess", None)
        preprocess = PreprocessConfig(**pre) if pre is not None else PreprocessConfig()
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown keys in RINE config: {sorted(unknown)}")
        return cls(head=head, preprocess=preprocess, **data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> RINEConfig:
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))
