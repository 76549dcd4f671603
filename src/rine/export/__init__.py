"""Interfaces that turn a detector into artefacts for other runtimes: `onnx` (ONNX Runtime,
TensorRT, Triton, onnxruntime-web). Imports the pipelines and the model, never the reverse."""
