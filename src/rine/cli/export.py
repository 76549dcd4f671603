"""`rine export`: the detector as a file for other runtimes (ONNX: ONNX Runtime, TensorRT, Triton,
onnxruntime-web).

Examples:
  rine export --format onnx --model ./my-vitb32-checkpoint --out exports/b32
  rine export --format onnx --model rine-vitl14-4class --out exports/l14-fp16 --fp16
  rine export --format onnx --backbone ViT-L/14 --head model_4class_trainable.pth --out exports/l14 --opset 23
  rine detect --model exports/b32 photo.jpg          # scored by ONNX Runtime

The folder gets model.onnx (uint8 crops [batch, S, S, 3] -> logit [batch], block_contribution
[batch, blocks], taps [batch, blocks, width]; normalisation inside, dynamic batch, one file),
onnx.json (opset, precision, the check below), and config.json + model.safetensors as in a
checkpoint folder (preprocessing, threshold, calibration; the head). The probability (sigmoid
of the mean logit over an image's views) is computed by rine, not by the graph.

After writing, the export is checked: ONNX Runtime against torch on a few crops (test patterns,
or --check-images), at several batch sizes; the largest differences are printed and kept in
onnx.json. An fp32 export whose logits differ by more than 1e-4 is refused and removed.
Needs the onnx extra: pip install 'rine[onnx]'.
"""

from __future__ import annotations

import argparse
import sys

from ..data.scan import expand_inputs
from .common import (
    CLIError,
    add_model_options,
    check_output_dir,
    fail,
    load_detector,
)

FORMATS = ("onnx",)
MAX_CHECK_IMAGES = 16


def register(sub: argparse._SubParsersAction) -> None:
    from ..export import DEFAULT_OPSET, MAX_OPSET, MIN_OPSET

    p = sub.add_parser(
        "export",
        help="export the detector to ONNX (for ONNX Runtime, TensorRT, Triton, the browser)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_options(p, batch_jobs=False, backends=False)
    o = p.add_argument_group("export")
    o.add_argument("--format", required=True, choices=FORMATS, help="onnx: one ONNX graph file")
    o.add_argument("--out", required=True, metavar="DIR", help="folder to write the export into (created)")
    o.add_argument("--opset", type=int, default=DEFAULT_OPSET,
                   help=f"ONNX opset, {MIN_OPSET} to {MAX_OPSET} (default {DEFAULT_OPSET}, which every ONNX Runtime "
                        "since 1.17 runs; 23 fuses attention into one Attention op, see docs/deployment.md)")
    o.add_argument("--fp16", action="store_true",
                   help="float16 weights and arithmetic through ONNX Runtime's converter (half the file; inputs "
                        "and outputs stay uint8/float32); the check prints how far probabilities move")
    o.add_argument("--no-taps", action="store_true",
                   help="leave out the taps output (rine eval needs it; detect and serve do not)")
    o.add_argument("--check-images", action="append", default=[], metavar="PATH",
                   help=f"images (files, folders or globs; repeatable) whose crops the check scores, up to "
                        f"{MAX_CHECK_IMAGES} (default: generated test patterns)")
    o.add_argument("--overwrite", action="store_true", help="replace an export already in --out")
    p.set_defaults(func=run)


def _check_views(paths: list[str], preprocess):
    import numpy as np

    from ..data.images import ImageLoadError, load_image
    from ..data.preprocess import crop_views

    unreadable: list[tuple[str, str]] = []
    files = list(expand_inputs(paths, unreadable))[:MAX_CHECK_IMAGES]
    if unreadable:
        raise CLIError(f"--check-images {unreadable[0][0]}: {unreadable[0][1]}")
    if not files:
        raise CLIError("--check-images: no images found there")
    views = []
    for f in files:
        try:
            views.append(crop_views(load_image(f), preprocess))
        except ImageLoadError as e:
            raise CLIError(f"--check-images {f}: {e}") from None
    return np.concatenate(views), f"{len(files)} images"


def run(args: argparse.Namespace) -> int:
    try:
        from ..export.onnx import ExportError, check_exportable, check_precision, export_onnx
    except ImportError as e:
        return fail(f"rine export needs the onnx extra ({e.name} is missing): pip install 'rine[onnx]'")
    precision = "fp16" if args.fp16 or args.precision == "fp16" else args.precision
    precision = "fp32" if precision == "auto" else precision
    try:
        out = check_output_dir(args.out)
        check_precision(precision, args.opset)  # refused before the model is loaded
        args.precision, args.device = "fp32", "cpu"  # traced from the exact fp32 model on CPU
        detector = load_detector(args, keep_reference=True)
        check_exportable(detector.model, opset=args.opset, precision=precision)
        views, source = _check_views(args.check_images, detector.config.preprocess) if args.check_images else (None, None)
        print(f"rine: exporting {detector.config.name or 'the model'} to {out} (opset {args.opset}, {precision}); "
              "tracing takes a while", file=sys.stderr)
        result = export_onnx(detector.model, detector.config, out, opset=args.opset, precision=precision,
                             taps=not args.no_taps, check_views=views, check_source=source,
                             overwrite=args.overwrite)
    except CLIError as e:
        return fail(str(e))
    except ExportError as e:
        return fail(f"cannot export: {e}")
    except ImportError as e:  # torch's exporter needs onnx and onnxscript, the check onnxruntime
        return fail(f"rine export needs the onnx extra ({e.name or e} is missing): pip install 'rine[onnx]'")
    print(result.summary())
    print(f"score with: rine detect --model {out} IMAGES   (ONNX Runtime; --backend torch for PyTorch)")
    return 0
