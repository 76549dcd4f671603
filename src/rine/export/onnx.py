"""`rine export --format onnx`: the detector as one ONNX graph, checked against torch.

    uint8 crops [batch, S, S, 3]  (the views `rine detect` cuts: centre crop or ten-crop)
      -> /255, (x - mean) / std         inside the graph, as `preprocess.normalize`
      -> CLIP taps [batch, blocks, width]  (second LayerNorm, CLS token: the reference forward)
      -> head -> logit [batch], block_contribution [batch, blocks] (and taps, unless taps=False)

The batch axis is dynamic. The file is a single protobuf (no external-data side file), so
it must stay below 2 GB. The probability (sigmoid of the mean logit over an image's views,
the threshold, calibration) is NOT in the graph: it stays in rine's shared Python code, so
every backend gives it the same way. fp16 goes through ONNX Runtime's float16 converter with
uint8/float32 inputs and outputs kept (a `.half()` module exports but ONNX Runtime does not
load it); bf16 is refused, since ONNX Runtime's CPU provider has no bfloat16 Conv.

Written into the output folder: model.onnx, onnx.json (`OnnxManifest`, with the check),
config.json and model.safetensors (the same RINEConfig and head as a checkpoint folder).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..config import RINEConfig
from ..fileio import atomic_file, fsync_dir
from ..inference.onnx_backend import (
    INPUT_NAME,
    MANIFEST_NAME,
    ONNX_NAME,
    OUTPUTS,
    OnnxManifest,
    OnnxRuntimeBackend,
)
from ..model.backbones import TappedCLIPVision
from ..model.checkpoints import save_pretrained
from ..model.head import RINEHead
from ..model.rine_model import RINEModel
from . import DEFAULT_OPSET, MAX_OPSET, MIN_OPSET

logger = logging.getLogger(__name__)

# protobuf cannot serialise a message of 2 GiB or more; the graph's own bytes need room too.
MAX_SINGLE_FILE_BYTES = 2**31 - 64 * 2**20
# Largest |logit| difference of an fp32 export from torch accepted before refusing it: the
# tests find < 1e-5; anything near 1e-3 means an op was translated wrongly.
FP32_LOGIT_TOLERANCE = 1e-4
# An fp16 export whose probabilities move more than this (fp16 overflow gives inf/NaN) is refused.
FP16_PROB_TOLERANCE = 0.05
CHECK_BATCH_SIZES = (1, 3)


class ExportError(ValueError):
    """What cannot be exported faithfully, with the reason and what to do instead."""


class ExportGraph(nn.Module):
    """uint8 crops [batch, S, S, 3] -> (logit [batch], block_contribution [batch, blocks][, taps
    [batch, blocks, width]]): normalisation, the reference tap forward and the head."""

    def __init__(self, backbone: TappedCLIPVision, head: RINEHead, mean, std, taps: bool = True):
        super().__init__()
        self.backbone, self.head, self.with_taps = backbone, head, taps
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, crops: torch.Tensor):
        # The same operations, in the same order, as preprocess.normalize: bit-identical pixels.
        x = crops.permute(0, 3, 1, 2).float().div(255)
        x = (x - self.mean) / self.std
        taps = self.backbone(x)  # [batch, blocks, width]
        out = self.head(taps)
        contrib = out.contributions.abs().sum(dim=-1)  # [batch, blocks], as Detector.score_views
        contrib = contrib / contrib.sum(dim=-1, keepdim=True).clamp_min(1e-12)
        if self.with_taps:
            return out.logits, contrib, taps
        return out.logits, contrib


def onnx_versions() -> dict[str, str]:
    import onnx
    import onnxruntime

    return {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}


def graph_bytes(model: RINEModel) -> int:
    """Bytes of float32 weights the graph holds (the file is a little larger)."""
    return sum(p.numel() * 4 for p in model.parameters())


def check_precision(precision: str, opset: int) -> None:
    """ExportError for a precision or opset that cannot be exported (no model needed)."""
    if precision == "bf16":
        raise ExportError("bf16 cannot be exported: ONNX Runtime's CPU provider has no bfloat16 kernel for "
                          "Conv (the patch embedding), so the file would not load; export fp32 (the default) "
                          "or --fp16")
    if precision not in ("fp32", "fp16"):
        raise ExportError(f"precision {precision!r}: export fp32 or fp16")
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ExportError(f"--opset {opset}: torch's exporter writes opsets {MIN_OPSET} to {MAX_OPSET} for this "
                          f"graph; the default, {DEFAULT_OPSET}, runs on every ONNX Runtime since 1.17")


def check_exportable(model: RINEModel, *, opset: int, precision: str) -> None:
    """ExportError for what cannot be exported faithfully, before any work."""
    check_precision(precision, opset)
    backbone = model.backbone
    if not isinstance(backbone, TappedCLIPVision):
        raise ExportError(f"only CLIP vision backbones (rine.model.backbones) export, not {type(backbone).__name__}")
    if backbone.released:
        raise ExportError("this detector freed its reference block weights (keep_reference=False); load it with "
                          "keep_reference=True to export it")
    size = graph_bytes(model)
    if size > MAX_SINGLE_FILE_BYTES:
        raise ExportError(f"the float32 graph would hold {size / 2**30:.2f} GB of weights: a single ONNX file must "
                          "stay below 2 GB (protobuf's limit), and rine does not write external-data side files "
                          "(onnxruntime-web and most serving setups need one file)")


def check_crops(config: RINEConfig, n: int = 4, seed: int = 0) -> np.ndarray:
    """Deterministic test crops [n, S, S, 3] uint8: noise, a gradient, flat grey, a checkerboard."""
    s = config.preprocess.image_size
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:s, 0:s]
    patterns = [
        rng.integers(0, 256, (s, s, 3)),
        np.stack([xx * 255 // (s - 1), yy * 255 // (s - 1), (xx + yy) * 255 // (2 * s - 2)], -1),
        np.full((s, s, 3), 128),
        ((xx // 16 + yy // 16) % 2 * 255)[..., None].repeat(3, -1),
    ]
    return np.stack([patterns[i % len(patterns)] for i in range(n)]).astype(np.uint8)


@torch.no_grad()
def compare(backend: OnnxRuntimeBackend, graph: ExportGraph, crops: np.ndarray) -> dict:
    """ONNX Runtime against torch on `crops` [N, S, S, 3], at several batch sizes -> max abs diffs."""
    ref = graph(torch.from_numpy(crops))
    ref_logit, ref_contrib = ref[0].numpy(), ref[1].numpy()
    ref_prob = 1 / (1 + np.exp(-ref_logit.astype(np.float64)))
    worst = {"logit": 0.0, "prob_fake": 0.0, "block_contribution": 0.0}
    if backend.has_taps:
        worst["taps"] = 0.0
    names = [o for o in OUTPUTS if o in backend.outputs]
    sizes = sorted({b for b in (*CHECK_BATCH_SIZES, len(crops)) if b <= len(crops)})
    for b in sizes:
        for i in range(0, len(crops), b):
            got = dict(zip(names, backend._run(crops[i : i + b], names), strict=True))
            sl = slice(i, i + b)
            worst["logit"] = max(worst["logit"], float(np.abs(got["logit"] - ref_logit[sl]).max()))
            prob = 1 / (1 + np.exp(-got["logit"].astype(np.float64)))
            worst["prob_fake"] = max(worst["prob_fake"], float(np.abs(prob - ref_prob[sl]).max()))
            worst["block_contribution"] = max(worst["block_contribution"],
                                              float(np.abs(got["block_contribution"] - ref_contrib[sl]).max()))
            if "taps" in got:
                worst["taps"] = max(worst["taps"], float(np.abs(got["taps"] - ref[2][sl].numpy()).max()))
    return {"n_crops": len(crops), "batch_sizes": sizes, "max_abs_diff": worst,
            "logit_range": [float(ref_logit.min()), float(ref_logit.max())]}


@dataclass
class ExportResult:
    folder: Path
    manifest: OnnxManifest

    def summary(self) -> str:
        m, c = self.manifest, self.manifest.check
        d = c["max_abs_diff"]
        diffs = ", ".join(f"{k} {v:.2g}" for k, v in d.items())
        return (f"{self.folder / ONNX_NAME}: {m.onnx_bytes / 2**20:.1f} MB, {m.precision}, opset {m.opset}, "
                f"outputs {', '.join(m.outputs)}\n"
                f"check: ONNX Runtime ({m.precision}, CPU) against torch fp32 on {c['n_crops']} crops "
                f"({c.get('source', 'test patterns')}), batch sizes {', '.join(map(str, c['batch_sizes']))}: "
                f"largest differences {diffs}")


def export_onnx(
    model: RINEModel,
    config: RINEConfig,
    out: str | Path,
    *,
    opset: int = DEFAULT_OPSET,
    precision: str = "fp32",
    taps: bool = True,
    check_views: np.ndarray | None = None,
    check_source: str | None = None,
    overwrite: bool = False,
) -> ExportResult:
    """Export `model` (fp32 weights, on CPU) into the folder `out`; see the module docstring.

    check_views: uint8 crops [N, S, S, 3] to check ONNX Runtime against torch on (default:
    `check_crops`). Nothing is left in `out` when the export fails or is refused."""
    check_exportable(model, opset=opset, precision=precision)
    out = Path(out).expanduser()
    if (out / ONNX_NAME).exists() and not overwrite:
        raise ExportError(f"{out} already holds an export ({ONNX_NAME}); choose another --out or pass --overwrite")
    out.mkdir(parents=True, exist_ok=True)
    model = model.float().cpu().eval()
    graph = ExportGraph(model.backbone, model.head, config.preprocess.mean, config.preprocess.std, taps).eval()
    s = config.preprocess.image_size
    # Built and checked in a folder of its own: a failed export (or a refused one) leaves `out`
    # as it was, an earlier export there included.
    work = out / ".rine-export.tmp"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    try:
        _export(graph, work / ONNX_NAME, s, opset, taps)
        if precision == "fp16":
            _to_fp16(work / ONNX_NAME)
        manifest = OnnxManifest(opset=opset, precision=precision, image_size=s, n_blocks=model.head.config.n_blocks,
                                width=model.backbone.width, outputs=list(OUTPUTS if taps else OUTPUTS[:2]),
                                onnx_bytes=(work / ONNX_NAME).stat().st_size, versions=onnx_versions())
        manifest.save(work)  # what the backend reads
        backend = OnnxRuntimeBackend(work)
        crops = check_views if check_views is not None else check_crops(config)
        manifest.check = {**compare(backend, graph, crops), "source": check_source or "test patterns"}
        del backend
        worst = manifest.check["max_abs_diff"]["logit"]
        if precision == "fp32" and not worst <= FP32_LOGIT_TOLERANCE:
            raise ExportError(f"ONNX Runtime's logits differ from torch's by {worst:.3g} (more than "
                              f"{FP32_LOGIT_TOLERANCE:g}): this export would not be faithful; try another --opset")
        worst_p = manifest.check["max_abs_diff"]["prob_fake"]
        if precision == "fp16" and not worst_p <= FP16_PROB_TOLERANCE:
            raise ExportError(f"in fp16 the probabilities move by up to {worst_p:.3g} (more than "
                              f"{FP16_PROB_TOLERANCE:g}; values beyond fp16's range?): export fp32")
        (out / MANIFEST_NAME).unlink(missing_ok=True)  # never a manifest beside another graph
        with open(work / ONNX_NAME, "rb+") as f:  # on disk before it takes the final name
            os.fsync(f.fileno())
        os.replace(work / ONNX_NAME, out / ONNX_NAME)
        fsync_dir(out)
        save_pretrained(model.head, config, out)
        manifest.save(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    logger.info("exported %s", out / ONNX_NAME)
    return ExportResult(out, manifest)


def _export(graph: ExportGraph, path: Path, size: int, opset: int, taps: bool) -> None:
    example = torch.zeros(2, size, size, 3, dtype=torch.uint8)
    batch = torch.export.Dim("batch", min=1, max=4096)
    # The dynamo exporter prints its progress to stdout and logs notes on its own internals
    # (torchvision ops it skips); `rine export` prints its own summary.
    exporter_log = logging.getLogger("torch.onnx")
    level = exporter_log.level
    exporter_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            torch.onnx.export(
                graph, (example,), str(path), input_names=[INPUT_NAME],
                output_names=list(OUTPUTS if taps else OUTPUTS[:2]), dynamic_shapes={"crops": {0: batch}},
                opset_version=opset, external_data=False, dynamo=True, verbose=False,
            )
    finally:
        exporter_log.setLevel(level)
    if not path.is_file():
        raise ExportError(f"torch's exporter wrote no {path.name}")
    extra = [p.name for p in path.parent.iterdir() if p.name.startswith(path.name) and p != path]
    if extra:  # an external-data side file: not a single-file export
        raise ExportError(f"torch's exporter wrote side files {extra}: the graph is too large for a single file")


def _to_fp16(path: Path) -> None:
    """Weights and arithmetic to float16, inputs and outputs kept (ONNX Runtime's converter)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # it warns about values it clamps into fp16's range
        model = convert_float_to_float16(model, keep_io_types=True)
    with atomic_file(path, suffix=".fp16") as tmp:
        onnx.save_model(model, str(tmp))
