"""rine: synthetic-image detection with RINE (ECCV 2024), faithful to the reference code.

Entry points:
    Detector.from_pretrained(name_or_folder) / Detector.from_files(backbone, head)
    load_backbone(source) -> TappedCLIPVision   (per-block CLS taps [batch, blocks, width])
    RINEHead(HeadConfig)                         (official checkpoint key names)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Public names -> the module that defines them. Imported on first use, so that `import
# rine.decoding` (every decoding worker process) and `rine --help` do not pay for torch.
_EXPORTS = {
    "BACKBONES": "backbones", "TappedCLIPVision": "backbones", "list_backbones": "backbones",
    "load_backbone": "backbones",
    "load_head": "checkpoints", "load_official_head": "checkpoints", "load_pretrained": "checkpoints",
    "save_pretrained": "checkpoints",
    "HeadConfig": "config", "PreprocessConfig": "config", "RINEConfig": "config",
    "RINEHead": "head",
    "Detector": "inference", "Prediction": "inference",
    "RINEModel": "model",
    "PRETRAINED": "pretrained", "WeightsUnavailableError": "pretrained", "list_pretrained": "pretrained",
}  # fmt: skip

if TYPE_CHECKING:
    from .backbones import BACKBONES, TappedCLIPVision, list_backbones, load_backbone
    from .checkpoints import load_head, load_official_head, load_pretrained, save_pretrained
    from .config import HeadConfig, PreprocessConfig, RINEConfig
    from .head import RINEHead
    from .inference import Detector, Prediction
    from .model import RINEModel
    from .pretrained import PRETRAINED, WeightsUnavailableError, list_pretrained


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'rine' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


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
