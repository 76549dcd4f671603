"""rine: synthetic-image detection with RINE (ECCV 2024), faithful to the reference code.

Entry points:
    Detector.from_pretrained(name_or_folder) / Detector.from_files(backbone, head)
    load_backbone(source) -> TappedCLIPVision   (per-block CLS taps [batch, blocks, width])
    RINEHead(HeadConfig)                         (official checkpoint key names)
"""

from .backbones import BACKBONES, TappedCLIPVision, list_backbones, load_backbone
from .checkpoints import load_head, load_official_head, load_pretrained, save_pretrained
from .config import HeadConfig, PreprocessConfig, RINEConfig
from .head import RINEHead
from .inference import Detector, Prediction
from .model import RINEModel
from .pretrained import PRETRAINED, WeightsUnavailableError, list_pretrained

__version__ = "0.1.0"

__all__ = [
    "BACKBONES",
    "PRETRAINED",
    "Detector",
    "HeadConfig",
    "Prediction",
    "PreprocessConfig",
    "RINEConfig",
    "RINEHead",
    "RINEModel",
    "TappedCLIPVision",
    "WeightsUnavailableError",
    "list_backbones",
    "list_pretrained",
    "load_backbone",
    "load_head",
    "load_official_head",
    "load_pretrained",
    "save_pretrained",
]
