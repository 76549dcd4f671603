"""Scoring through ONNX Runtime: an export folder (`rine export --format onnx`) as a Detector backend.

An export folder holds
  model.onnx         one graph: uint8 crops [batch, S, S, 3] -> logit [batch],
                     block_contribution [batch, blocks] (and taps [batch, blocks, width]);
                     /255 and CLIP's mean/std are inside the graph
  onnx.json          `OnnxManifest`: opset, precision, shapes, outputs, the check run at export
  config.json        the RINEConfig (preprocessing, threshold, calibration) as in checkpoint folders
  model.safetensors  the head's weights (block importance; heads scored on taps by `rine eval`)

`OnnxRuntimeBackend` has the methods the Detector and the server's batcher call on the torch
backend (`score_views`, `encode_views`, `plan_batch`), so that decoding, batching, records,
errors and the probability (sigmoid of the mean logit, threshold, calibration) stay in the
shared Python code: only the encoder + head call differs.
onnxruntime is imported lazily (the `onnx` extra).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import CONFIG_NAME, WEIGHTS_NAME

logger = logging.getLogger(__name__)

ONNX_NAME = "model.onnx"
MANIFEST_NAME = "onnx.json"
INPUT_NAME = "crops"
OUTPUTS = ("logit", "block_contribution", "taps")
FORMAT_VERSION = 1
# Short names accepted by --providers, and the ONNX Runtime execution providers they mean.
PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}


class OnnxBackendError(ValueError):
    """An export folder that cannot be used, or a provider that is not there; says the fix."""


@dataclass
class OnnxManifest:
    """What `rine export` wrote (`onnx.json`): enough to use model.onnx without reading it.

    precision: "fp32", or "fp16" (weights and arithmetic; inputs and outputs stay uint8/float32).
    check: ONNX Runtime against torch fp32 on a few crops at export time (max abs differences).
    """

    opset: int
    precision: str
    image_size: int
    n_blocks: int
    width: int
    outputs: list[str]
    onnx_bytes: int
    format_version: int = FORMAT_VERSION
    input: str = INPUT_NAME
    onnx_file: str = ONNX_NAME
    versions: dict[str, str] = field(default_factory=dict)
    check: dict[str, Any] = field(default_factory=dict)

    def save(self, folder: str | Path) -> None:
        path = Path(folder) / MANIFEST_NAME
        path.write_text(json.dumps(dataclasses.asdict(self), indent=2) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, folder: str | Path) -> OnnxManifest:
        path = Path(folder) / MANIFEST_NAME
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            known = {f.name for f in dataclasses.fields(cls)}
            if data.get("format_version", 0) > FORMAT_VERSION:
                raise OnnxBackendError(f"{path}: written by a newer rine (format {data['format_version']}); upgrade rine")
            return cls(**{k: v for k, v in data.items() if k in known})
        except FileNotFoundError:
            raise OnnxBackendError(f"{folder}: no {MANIFEST_NAME}: not an ONNX export; make one with "
                                   "`rine export --format onnx --model ... --out DIR`") from None
        except (ValueError, TypeError) as e:
            if isinstance(e, OnnxBackendError):
                raise
            raise OnnxBackendError(f"{path}: not a valid export manifest ({e}); export again") from None


def is_onnx_export(folder: str | Path) -> bool:
    """Whether `folder` is an export folder (has onnx.json and model.onnx)."""
    path = Path(folder).expanduser()
    return (path / MANIFEST_NAME).is_file() and (path / ONNX_NAME).is_file()


def resolve_providers(names: str | list[str] | None, device: str | None = None) -> list[str]:
    """ONNX Runtime provider names, in priority order, from short names (cpu, cuda, tensorrt) or
    full ones; default CPU, or CUDA for `device` cuda. CPU is always last, as a fallback for
    the nodes other providers do not take. OnnxBackendError for one that is not installed."""
    import onnxruntime as ort

    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    if not names:
        names = ["cuda"] if device and str(device).startswith("cuda") else ["cpu"]
    available = ort.get_available_providers()
    out: list[str] = []
    for name in names:
        full = PROVIDERS.get(name.lower(), name)
        if full not in available:
            raise OnnxBackendError(
                f"ONNX Runtime provider {name!r} ({full}) is not available in this onnxruntime "
                f"{ort.__version__} (available: {', '.join(available)}); for CUDA/TensorRT install "
                "onnxruntime-gpu instead of onnxruntime"
            )
        if full not in out:
            out.append(full)
    if "CPUExecutionProvider" not in out:
        out.append("CPUExecutionProvider")
    return out


class OnnxRuntimeBackend:
    """model.onnx in an ONNX Runtime session: uint8 views in, logits / contributions / taps out.

    threads: intra-op threads of the CPU provider (default: ONNX Runtime's, one per core).
    """

    name = "onnxruntime"

    def __init__(self, folder: str | Path, providers: list[str] | None = None, threads: int | None = None):
        import onnxruntime as ort

        self.folder = Path(folder).expanduser()
        self.manifest = OnnxManifest.load(self.folder)
        path = self.folder / self.manifest.onnx_file
        if Path(self.manifest.onnx_file).name != self.manifest.onnx_file or not path.is_file():
            raise OnnxBackendError(f"{self.folder}: {self.manifest.onnx_file!r} is missing; export again")
        size = path.stat().st_size
        if size != self.manifest.onnx_bytes:
            raise OnnxBackendError(f"{path}: {size} bytes, but the export wrote {self.manifest.onnx_bytes} "
                                   "(a truncated or replaced copy?); copy or export it again")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.providers = providers or ["CPUExecutionProvider"]
        try:
            self.session = ort.InferenceSession(str(path), sess_options=options, providers=self.providers)
        except Exception as e:  # noqa: BLE001 - ORT raises its own Fail/InvalidGraph/... types
            raise OnnxBackendError(f"{path}: ONNX Runtime cannot load it ({type(e).__name__}: {e})") from None
        self.outputs = [o.name for o in self.session.get_outputs()]
        missing = [o for o in OUTPUTS[:2] if o not in self.outputs]
        if missing:
            raise OnnxBackendError(f"{path}: the graph lacks the outputs {missing}; export it with rine export")
        self.precision = self.manifest.precision
        self.n_blocks, self.width = self.manifest.n_blocks, self.manifest.width
        self.image_size = self.manifest.image_size
        logger.info("ONNX Runtime %s: %s (%s, opset %d) on %s", ort.__version__, path, self.precision,
                    self.manifest.opset, ", ".join(self.session.get_providers()))

    @property
    def has_taps(self) -> bool:
        return "taps" in self.outputs

    def plan_batch(self, views: int) -> None:
        """Nothing to plan: the graph takes any batch size."""

    def _run(self, views_uint8: np.ndarray | torch.Tensor, names: list[str]) -> list[np.ndarray]:
        x = np.ascontiguousarray(torch.as_tensor(views_uint8).numpy() if isinstance(views_uint8, torch.Tensor)
                                 else views_uint8, dtype=np.uint8)
        s = self.image_size
        if x.ndim != 4 or x.shape[1:] != (s, s, 3):
            raise ValueError(f"expected uint8 views [N, {s}, {s}, 3], got {tuple(x.shape)}")
        return self.session.run(names, {self.manifest.input: x})

    def score_views(self, views_uint8: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 views [N, S, S, 3] -> (logits [N], block contribution [N, blocks]) float32 on CPU."""
        if len(views_uint8) == 0:
            return torch.empty(0), torch.empty(0, self.n_blocks)
        logits, contrib = self._run(views_uint8, ["logit", "block_contribution"])
        return torch.from_numpy(logits.astype(np.float32)), torch.from_numpy(contrib.astype(np.float32))

    def encode_views(self, views_uint8: np.ndarray | torch.Tensor, batch_size: int = 32) -> torch.Tensor:
        """uint8 views [N, S, S, 3] -> taps [N, blocks, width] float32 on CPU (needs an export with taps)."""
        if not self.has_taps:
            raise OnnxBackendError(f"{self.folder} was exported without the taps output, which `rine eval` "
                                   "needs; export it again without --no-taps")
        out = [torch.from_numpy(self._run(views_uint8[i : i + batch_size], ["taps"])[0].astype(np.float32))
               for i in range(0, len(views_uint8), batch_size)]
        return torch.cat(out) if out else torch.empty(0, self.n_blocks, self.width)


def load_onnx_detector(
    folder: str | Path,
    *,
    providers: str | list[str] | None = None,
    device: str | None = None,
    crop: str | None = None,
    threads: int | None = None,
    **kwargs: Any,
):
    """A Detector whose encoder + head run in ONNX Runtime from an export folder.

    `crop` overrides the preprocessing (crops are cut before the graph); `kwargs` go to the
    Detector (max_pixels, max_bytes)."""
    from dataclasses import replace

    from ..config import RINEConfig
    from ..model.checkpoints import load_pretrained
    from .detector import Detector

    path = Path(folder).expanduser()
    if not path.is_dir():
        raise OnnxBackendError(f"{folder}: not a folder; give an export folder made by `rine export --format onnx`")
    manifest = OnnxManifest.load(path)  # the clearest error first
    if not (path / CONFIG_NAME).is_file():
        raise OnnxBackendError(f"{path}: no {CONFIG_NAME} (the rine config); export again")
    if (path / WEIGHTS_NAME).is_file():
        head, config = load_pretrained(path)
    else:
        head, config = None, RINEConfig.load(path / CONFIG_NAME)
    if config.preprocess.image_size != manifest.image_size:
        raise OnnxBackendError(f"{path}: config.json says {config.preprocess.image_size}-pixel crops but the "
                               f"graph takes {manifest.image_size}; export again")
    if crop:
        config = replace(config, preprocess=replace(config.preprocess, crop=crop))
    backend = OnnxRuntimeBackend(path, resolve_providers(providers, device), threads=threads)
    return Detector.with_backend(backend, config, head=head, **kwargs)
