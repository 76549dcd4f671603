"""A disk cache of `int8-smooth`'s load-time calibration (`smooth.calibrate`).

Calibrating runs the encoder in float32 over a few synthetic images and measures each
candidate smoothing on a token sample: about 3.5 s of ViT-L/14's 4 s int8-smooth build on 2
cores, against 0.4 s for a bf16 build. What it yields is small (per int8 GEMM: SmoothQuant's
s, or none, and the input range) and depends only on the backbone's weights, the plan and
the calibration code, so it is kept, as safetensors (no pickle), under
`<dir>/<key>.safetensors`; the Detector's `<dir>` is `$RINE_HOME/int8-calibration`.

The key is a SHA-256 of every parameter and buffer of the backbone, byte for byte (hashed
in two threads: 0.4 s for ViT-L/14 here), the plan, `FORMAT` and the torch version: a
fine-tuned backbone, another plan, or changed calibration code get their own entry, and an
entry gives the same values a fresh calibration would on the same setup. A file that fails
to load or to validate is ignored (and replaced); a cache directory that cannot be written
only costs the next load its calibration time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from ..fileio import atomic_write
from .smooth import GemmCalibration, Int8Calibration, Int8Plan

logger = logging.getLogger(__name__)

# Bump when ln_inputs, calibration_pixels, choose_smoothing or what is stored changes.
FORMAT = 1


def weights_digest(module: nn.Module) -> str:
    """SHA-256 of every parameter and buffer of `module` (names, shapes, dtypes and bytes),
    in two halves hashed in parallel (hashlib releases the GIL on large buffers)."""
    tensors = sorted(module.state_dict().items())
    half = (len(tensors) + 1) // 2

    def digest(items) -> bytes:
        h = hashlib.sha256()
        for name, t in items:
            shape = t.shape
            t = t.detach().cpu().contiguous().reshape(-1)
            h.update(f"{name}|{tuple(shape)}|{t.dtype}|".encode())
            h.update(t.view(torch.uint8).numpy().data if t.numel() else b"")
        return h.digest()

    with ThreadPoolExecutor(2) as pool:
        parts = list(pool.map(digest, (tensors[:half], tensors[half:])))
    return hashlib.sha256(b"".join(parts)).hexdigest()


def cache_key(clip: nn.Module, plan: Int8Plan) -> str:
    """The file name (without suffix) of `clip`'s calibration under `plan`."""
    what = json.dumps({"format": FORMAT, "torch": torch.__version__, "plan": asdict(plan),
                       "weights": weights_digest(clip)}, sort_keys=True)
    return hashlib.sha256(what.encode()).hexdigest()[:40]


def load(directory: Path, key: str, expected: dict[str, int]) -> Int8Calibration | None:
    """The cached calibration `key`, or None where there is none or it does not validate.
    `expected`: "block.gemm" -> the GEMM's input width, for every int8 GEMM of the plan."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = directory / f"{key}.safetensors"
    if not path.is_file():
        return None
    try:
        tensors = load_file(str(path))
        calibration = _from_tensors(tensors, expected)
    except (OSError, SafetensorError, ValueError, KeyError, RuntimeError) as e:
        logger.warning("int8 calibration cache %s is unusable (%s); calibrating again", path, e)
        return None
    logger.info("int8 calibration from the cache %s", path)
    return calibration


def save(directory: Path, key: str, calibration: Int8Calibration) -> None:
    """Write `calibration` as `<directory>/<key>.safetensors` (atomically); a failure is
    logged, not raised: the cache only saves time."""
    from safetensors.torch import save

    tensors = {}
    for name, c in calibration.items():
        tensors[f"{name}.range"] = torch.tensor([c.lo, c.hi], dtype=torch.float64)
        if c.s is not None:
            tensors[f"{name}.s"] = c.s.detach().float().cpu().contiguous()
    path = directory / f"{key}.safetensors"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write(path, save(tensors, metadata={"format": str(FORMAT)}))
    except OSError as e:
        logger.info("int8 calibration not cached (%s: %s)", path, e)


def _from_tensors(tensors: dict[str, torch.Tensor], expected: dict[str, int]) -> Int8Calibration:
    names = {k.rsplit(".", 1)[0] for k in tensors}
    if names != set(expected):
        raise ValueError(f"it holds GEMMs {sorted(names)[:4]}..., not the plan's")
    out: Int8Calibration = {}
    for name, width in expected.items():
        rng = tensors[f"{name}.range"]
        if rng.shape != (2,) or rng.dtype != torch.float64:
            raise ValueError(f"{name}.range is {tuple(rng.shape)} {rng.dtype}, not (2,) float64")
        lo, hi = float(rng[0]), float(rng[1])
        if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi):
            raise ValueError(f"{name}.range is not a finite range: {lo}, {hi}")
        s = tensors.get(f"{name}.s")
        if s is not None and (s.shape != (width,) or s.dtype != torch.float32 or not bool((s > 0).all() & s.isfinite().all())):
            raise ValueError(f"{name}.s is not {width} positive finite float32 factors")
        out[name] = GemmCalibration(s, lo, hi)
    return out
