"""Scoring in the browser (`rine serve --client-side`): the page downloads the ONNX export and
onnxruntime-web from this server and scores images where they are; nothing is uploaded.

Served here: `GET /v1/client-side` (what the page needs: sizes, preprocessing, threshold), the
export's `model.onnx`, and onnxruntime-web's wasm backend (three files from npm, fetched by
scripts/vendor_onnxruntime_web.sh into server/vendor/, never from a CDN). Every path is a
fixed name from an allow-list: nothing in a URL reaches the file system. The page decodes and
crops exactly as rine does (static/client_side.js) and decides from the mean logit of an
image's views with the detector's decision rule (`DecisionRule.public()`: the export's calibration,
threshold and uncertain band, or --threshold / --uncertain-band), as `/v1/detect` does.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

ORT_WEB_VERSION = "1.30.0"  # keep in step with scripts/vendor_onnxruntime_web.sh
VENDOR_DIR = Path(__file__).parent / "vendor" / "onnxruntime-web"
VENDOR_URL = "/vendor/onnxruntime-web/"
VENDOR_FILES = {  # name -> media type (a module script must be JavaScript, wasm streams as wasm)
    "ort.wasm.min.mjs": "text/javascript",
    "ort-wasm-simd-threaded.mjs": "text/javascript",
    "ort-wasm-simd-threaded.wasm": "application/wasm",
}
MODEL_URL = "/v1/client-side/model.onnx"
# A page download: ViT-B/32 is 317 MB in fp32 and 159 MB in fp16; ViT-L/14 (1.2 GB, 0.6 GB) is not.
MAX_CLIENT_MODEL_BYTES = 400 * 2**20
# The page's Content-Security-Policy must let it compile WebAssembly ('wasm-unsafe-eval' allows
# that and nothing else: no eval of JavaScript).
WASM_CSP_SOURCE = "'wasm-unsafe-eval'"


class ClientSideError(ValueError):
    """Why an export cannot be scored in the browser, and what to do instead."""


def missing_vendor_files() -> list[str]:
    return [name for name in VENDOR_FILES if not (VENDOR_DIR / name).is_file()]


def vendor_missing_message() -> str:
    return (f"onnxruntime-web {ORT_WEB_VERSION} is not installed in {VENDOR_DIR} (missing: "
            f"{', '.join(missing_vendor_files())}); fetch it from the npm registry with "
            "`bash scripts/vendor_onnxruntime_web.sh` (needs npm), then start rine serve again")


@dataclass(frozen=True)
class ClientSide:
    """The export the page scores with."""

    folder: Path
    onnx_path: Path
    onnx_bytes: int


def check_client_side(folder: str | Path, crop: str) -> ClientSide:
    """ClientSide for an export folder, or ClientSideError: not an export, too large to download,
    a crop the browser cannot reproduce exactly, or onnxruntime-web not installed."""
    from ..inference.onnx_backend import OnnxManifest, is_onnx_export

    folder = Path(folder).expanduser().resolve()
    if not is_onnx_export(folder):
        raise ClientSideError("--client-side scores with an ONNX export: make one with `rine export --format onnx "
                              "--model NAME --out DIR` and start rine serve with --model DIR")
    manifest = OnnxManifest.load(folder)
    path = folder / manifest.onnx_file
    size = path.stat().st_size
    if size > MAX_CLIENT_MODEL_BYTES:
        raise ClientSideError(
            f"{path} is {size / 2**20:.0f} MB: too large for a page to download (the limit is "
            f"{MAX_CLIENT_MODEL_BYTES / 2**20:.0f} MB, which ViT-B/32 fits; ViT-L/14 does not even in fp16); "
            "serve it without --client-side, or export a smaller backbone"
        )
    if crop == "resize":
        raise ClientSideError("--client-side cannot use the resize crop: a browser cannot resize exactly as Pillow's "
                              "bicubic filter does; use --crop center or ten")
    if missing_vendor_files():
        raise ClientSideError(vendor_missing_message())
    return ClientSide(folder, path, size)


def client_info(client: ClientSide, detector: Any, max_pixels: int | None = None) -> dict[str, Any]:
    """What the page needs to score exactly as the server does (GET /v1/client-side)."""
    from .service import decision_rule

    cfg = detector.config
    rule = decision_rule(detector)
    return {
        "max_pixels": max_pixels,
        "model_url": MODEL_URL,
        "model_bytes": client.onnx_bytes,
        "precision": detector.precision,
        "input": detector.backend.manifest.input,
        "image_size": cfg.preprocess.image_size,
        "crop": cfg.preprocess.crop,
        # the rule /v1/detect applies: app.js's decideFromLogit repeats it from these two
        "threshold": rule.threshold,
        "calibration": rule.public(),
        "n_blocks": detector.backend.n_blocks,
        "runtime": f"onnxruntime-web {ORT_WEB_VERSION} (wasm)",
        "runtime_url": VENDOR_URL,
    }
