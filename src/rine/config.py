"""Configuration dataclasses, serialised as `config.json` next to the weights.

A RINE checkpoint folder holds:
  config.json        -> RINEConfig (backbone source, head hyper-parameters, preprocessing)
  model.safetensors  -> the trainable head only (the backbone is frozen and fetched separately)
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .fileio import atomic_write_json

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

CROP_MODES = ("center", "resize", "ten")
VIEWS_PER_CROP = {"center": 1, "resize": 1, "ten": 10}  # the views [V, S, S, 3] one image is cut into
# Numeric modes of the encoder (rine.model.accel): "fp32" is exact, "auto" the fastest within tolerance.
PRECISIONS = ("auto", "fp32", "bf16", "fp16", "int8", "int8-smooth")
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
BLOCK_SELECTIONS = ("all", "last")
# How a calibration turns the head's logit into a decision (rine.model.calibration):
# "threshold" keeps the probability and moves the cut; the others also change the probability.
CALIBRATION_METHODS = ("threshold", "temperature", "platt", "prior-shift")
CALIBRATION_OBJECTIVES = ("balanced", "f1", "accuracy")


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

    @classmethod
    def for_backbone(cls, width: int, n_blocks: int, blocks: str = "all", **kwargs) -> HeadConfig:
        """A head sized for a backbone of `width` and `n_blocks` tapped blocks: all of them,
        or one with `blocks="last"` (the one rule; `takes` is its check)."""
        return cls(in_dim=width, n_blocks=1 if blocks == "last" else n_blocks, blocks=blocks, **kwargs)

    def takes(self, n_blocks: int) -> bool:
        """Whether taps of a backbone with `n_blocks` blocks fit this head: "all" needs as
        many as it was trained on, "last" takes the last of any number."""
        return self.blocks == "last" or self.n_blocks == n_blocks


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

    @property
    def n_views(self) -> int:
        """The views each image is cut into: 10 for ten-crop, else 1."""
        return VIEWS_PER_CROP[self.crop]


@dataclass
class CalibrationConfig:
    """A fitted decision rule (written by `rine calibrate`, applied by `rine.model.calibration`).

    Every method is an affine map of the head's logit z, then a cut on the result:
        calibrated logit  c = scale * z + offset
        prob_fake         = sigmoid(c)
        is_fake           = c > threshold_logit        (threshold = sigmoid(threshold_logit))
        verdict           = "uncertain" when uncertain_low <= prob_fake <= uncertain_high
    The cut is kept as a logit because a strict false-positive target can put it where
    float probabilities are all 1.0. `fitted_on`, `target` and `rates` are provenance and
    the achieved rates with their confidence intervals (JSON objects, read by people).
    """

    method: str
    threshold_logit: float
    scale: float = 1.0
    offset: float = 0.0
    uncertain_low: float | None = None
    uncertain_high: float | None = None
    target: dict[str, Any] = field(default_factory=dict)
    fitted_on: dict[str, Any] = field(default_factory=dict)
    rates: dict[str, Any] = field(default_factory=dict)
    guarantee: str | None = None

    def __post_init__(self) -> None:
        if self.method not in CALIBRATION_METHODS:
            raise ValueError(f"calibration method must be one of {CALIBRATION_METHODS}, got {self.method!r}")
        for name in ("threshold_logit", "scale", "offset"):
            if not math.isfinite(float(getattr(self, name))):
                raise ValueError(f"calibration {name} must be a finite number, got {getattr(self, name)!r}")
        if self.scale <= 0:
            raise ValueError(f"calibration scale must be positive (a negative one would invert the scores), got {self.scale}")
        if (self.uncertain_low is None) != (self.uncertain_high is None):
            raise ValueError("calibration uncertain_low and uncertain_high go together")
        if self.uncertain_low is not None and not 0.0 <= self.uncertain_low <= self.uncertain_high <= 1.0:
            raise ValueError(f"calibration uncertain band [{self.uncertain_low}, {self.uncertain_high}] is not inside [0, 1]")

    @property
    def threshold(self) -> float:
        """The cut as a probability (for display; decisions use `threshold_logit`)."""
        return sigmoid(self.threshold_logit)


def sigmoid(x: float) -> float:
    """1 / (1 + exp(-x)) in float64 without overflow."""
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


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
    # Written by `rine calibrate`; absent (and not serialised) for an uncalibrated head, so
    # config.json files from before calibration existed load and save unchanged.
    calibration: CalibrationConfig | None = None

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if d["calibration"] is None:
            del d["calibration"]
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RINEConfig:
        data = dict(data)
        head = HeadConfig(**data.pop("head"))
        pre = data.pop("preprocess", None)
        preprocess = PreprocessConfig(**pre) if pre is not None else PreprocessConfig()
        cal = data.pop("calibration", None)
        calibration = None
        if cal is not None:
            extra = set(cal) - {f.name for f in dataclasses.fields(CalibrationConfig)}
            if extra:
                raise ValueError(f"unknown keys in the calibration block: {sorted(extra)}")
            calibration = CalibrationConfig(**cal)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown keys in RINE config: {sorted(unknown)}")
        return cls(head=head, preprocess=preprocess, calibration=calibration, **data)

    def save(self, path: str | Path) -> None:
        atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> RINEConfig:
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))
