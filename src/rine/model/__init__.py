"""The network: tapped CLIP backbones (the taps), the RINE head, and where their weights come from.

backbones.py    backbone registry and the tapped CLIP encoder ([batch, blocks, width] CLS taps)
head.py         proj1 -> TIE -> proj2 -> classifier (official checkpoint key names)
rine_model.py   backbone + head as one module
checkpoints.py  config.json + model.safetensors folders; official .pth conversion
pretrained.py   named models and their download sources, apart from the architecture
accel.py        the fast encoder paths (reduced precision, compiled)
"""
