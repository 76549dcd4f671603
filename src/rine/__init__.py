"""rine: synthetic-image detection with RINE (ECCV 2024), faithful to the reference code.

Entry points:
    Detector.from_pretrained(name_or_folder) / Detector.from_files(backbone, head)
    load_backbone(source) -> TappedCLIPVision   (per-block CLS taps [batch, blocks, width])
    RINEHead(HeadConfig)                         (official checkpoint key names)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._moved import install_moved_module_aliases

install_moved_module_aliases()

# Public names -> the module that defines them. Imported on first use, so that `import
# rine.decoding` (every decoding worker process) and `rine --help` do not pay for torch.
_EXPORTS = {
    "BACKBONES": "model.backbones", "TappedCLIPVision": "model.backbones",
    "list_backbones": "model.backbones", "load_backbone": "model.backbones",
    "load_head": "model.checkpoints", "load_official_head": "model.checkpoints",
    "load_pretrained": "model.checkpoints", "save_pretrained": "model.checkpoints",
    "HeadConfig": "config", "PreprocessConfig": "config", "RINEConfig": "config",
    "RINEHead": "model.head",
    "Detector": "inference.detector", "Prediction": "inference.detector",
    "RINEModel": "model.rine_model",
    "PRETRAINED": "model.pretrained", "WeightsUnavailableError": "model.pretrained",
    "list_pretrained": "model.pretrained",
}  # fmt: skip

if TYPE_CHECKING:
    from .config import HeadConfig, PreprocessConfig, RINEConfig
    from .inference.detector import Detector, Prediction
    from .model.backbones import BACKBONES, TappedCLIPVision, list_backbones, load_backbone
    from .model.checkpoints import load_head, load_official_head, load_pretrained, save_pretrained
    from .model.head import RINEHead
    from .model.pretrained import PRETRAINED, WeightsUnavailableError, list_pretrained
    from .model.rine_model import RINEModel


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
