"""Interfaces that turn a detector into artefacts for other runtimes: `onnx` (ONNX Runtime,
TensorRT, Triton, onnxruntime-web). Imports the pipelines and the model, never the reverse."""

# torch's exporter (the dynamo one) writes opset 18 and later; 20 is its default and what
# ONNX Runtime has run since 1.17. 23 adds the fused `Attention` op (docs/deployment.md).
# Here, not in export.onnx, so that `rine --help` does not import torch.
DEFAULT_OPSET = 20
MIN_OPSET = 18
MAX_OPSET = 23
