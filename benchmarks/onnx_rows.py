"""ONNX Runtime rows of benchmarks/throughput.py (`--onnx`): the same images, weights and head,
exported once per precision (not timed), then scored end to end by `rine detect`'s pipeline
with the onnxruntime backend in a subprocess of its own, as the torch modes are.

    python benchmarks/throughput.py --onnx                # + (g) ORT fp32, (h) ORT fp16 rows
    python benchmarks/throughput.py --onnx --onnx-opsets 20,23   # + (i) fp32 with the fused Attention op
    python benchmarks/throughput.py --quick --onnx        # smoke run

Rows: images/s, ratio to the reference-like baseline of the same run, RSS, and the largest
probability difference to torch fp32 ((b) of the same run).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

ENV_DIR = "RINE_BENCH_ONNX_DIR"  # where the parent left the exports, for the child processes


def modes(opsets: str) -> dict[str, str]:
    """"ort-<precision>-op<opset>" -> row label: fp32 and fp16 at the first opset, fp32 at the others
    (23 fuses attention into one `Attention` op: is it faster?)."""
    first, *others = [int(o) for o in opsets.split(",")]
    out = {f"ort-fp32-op{first}": f"(g) ORT fp32 opset {first}", f"ort-fp16-op{first}": f"(h) ORT fp16 opset {first}"}
    out.update({f"ort-fp32-op{o}": f"(i) ORT fp32 opset {o}" for o in others})
    return out


def parse_mode(mode: str) -> tuple[str, int]:
    _, precision, opset = mode.split("-")
    return precision, int(opset.removeprefix("op"))


def export_dir(arch: str, mode: str) -> Path:
    return Path(os.environ[ENV_DIR]) / f"{arch.replace('/', '-')}-{mode}"


def export_model(arch: str, mode: str, head, build_backbone, state) -> Path:
    """Export the benchmark's model (random weights of the real shape + its head) once."""
    from rine.config import PreprocessConfig, RINEConfig
    from rine.export.onnx import export_onnx
    from rine.model.rine_model import RINEModel

    out = export_dir(arch, mode)
    if (out / "model.onnx").is_file():
        return out
    precision, opset = parse_mode(mode)
    config = RINEConfig(backbone=arch, head=head.config, preprocess=PreprocessConfig(crop="center"))
    t0 = time.perf_counter()
    result = export_onnx(RINEModel(build_backbone(state), head), config, out, precision=precision, opset=opset)
    print(f"# exported {arch} {mode} in {time.perf_counter() - t0:.0f} s: "
          f"{result.summary().splitlines()[0]}", flush=True)
    return out


def run_mode(args, paths: list[str]) -> dict:
    """Child process: score `paths` through the export of `args.arch` in `args.mode`'s precision,
    timed as throughput.run_mode times the torch modes (warm-up at the batch shape first)."""
    import onnxruntime as ort
    import torch
    from benchkit.machine import (
        children_peak_rss_mb,
        current_rss_mb,
        peak_rss_mb,
        release_free_memory,
        reset_peaks,
    )

    from rine.data.decoding import DecodeOptions, default_workers
    from rine.inference.detector import default_batch_size
    from rine.inference.onnx_backend import load_onnx_detector

    torch.set_num_threads(args.threads)
    det = load_onnx_detector(export_dir(args.arch, args.mode), threads=args.threads)
    batch = args.batch_size or default_batch_size(det.device)
    workers = args.workers or default_workers(det.device)
    det.predict(paths[: min(len(paths), batch)], batch_size=batch)  # warm-up
    release_free_memory()
    model_mb = current_rss_mb()
    reset_peaks("cpu")
    t0 = time.perf_counter()
    preds = list(det.predict_iter(paths, batch_size=batch, decode=DecodeOptions(workers=workers, decoder=args.decoder)))
    elapsed = time.perf_counter() - t0
    return {
        "mode": args.mode, "precision": f"{det.precision} (onnxruntime {ort.__version__}, CPU)",
        "n": len(paths), "seconds": elapsed, "images_per_s": len(paths) / elapsed, "peak_rss_mb": peak_rss_mb(),
        "model_rss_mb": model_mb, "workers_peak_rss_mb": children_peak_rss_mb(), "batch_size": batch,
        "workers": workers, "probs": [float(p.prob_fake) for p in preds], "warmup_s": None,
    }


def print_rows(args, arch: str, n: int, paths_file: Path, calib, baseline_rate: float, ref_probs: np.ndarray,
               spawn) -> None:
    """Export (once), run each ONNX mode like the torch ones, print rows in the table's columns."""
    from benchkit.models import (
        build_hf_backbone,
        default_trained_head,
        random_head,
        random_openai_state,
        trained_head,
    )

    os.environ.setdefault(ENV_DIR, str(paths_file.parent / "onnx-exports"))
    head_file = args.head or default_trained_head(arch)
    head = trained_head(head_file) if head_file else random_head(arch, calib)
    state = random_openai_state(arch)
    for mode, label in modes(args.onnx_opsets).items():
        export_model(arch, mode, head, build_hf_backbone, state)
        rs = [spawn(args, arch, mode, n, paths_file, calib) for _ in range(args.repeat)]
        rate = float(np.median([r["images_per_s"] for r in rs]))
        dps = np.abs(np.array(rs[0]["probs"]) - ref_probs) if ref_probs is not None else np.full(1, np.nan)
        print(f"{label:<24}{rate:>10.2f}{rate / baseline_rate:>12.2f}{rs[0]['model_rss_mb']:>15.0f}"
              f"{rs[0]['peak_rss_mb']:>17.0f}{dps.max():>18.2e}{dps.mean():>11.1e}  "
              + ", ".join(f"{x['images_per_s']:.2f}" for x in rs), flush=True)
