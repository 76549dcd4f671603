"""The network: tapped CLIP backbones (the taps), the RINE head, and where their weights come from.

backbones.py    backbone registry and the tapped CLIP encoder ([batch, blocks, width] CLS taps)
head.py         proj1 -> TIE -> proj2 -> classifier (official checkpoint key names)
rine_model.py   backbone + head as one module
checkpoints.py  config.json + model.safetensors folders; official .pth conversion
pretrained.py   named models and their download sources, apart from the architecture
accel.py        the fast encoder paths (reduced precision, compiled)
"""

from __future__ import annotations

from typing import Any

# `from rine.model import RINEModel` worked when this was a module; it stays lazy so that
# importing a submodule does not load torch twice over.


def __getattr__(name: str) -> Any:
    if name == "RINEModel":
        from .rine_model import RINEModel

        return RINEModel
    raise AttributeError(f"module 'rine.model' has no attribute {name!r}")
