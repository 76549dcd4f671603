"""End-to-end scoring throughput: reference-like baseline vs our pipeline, same images, same threads.

    python benchmarks/throughput.py              # ViT-B/32 and ViT-L/14, ~10 min on 2 cores
    python benchmarks/throughput.py --quick      # smoke run: ViT-B/32, few images
    python benchmarks/throughput.py --device cuda

Random-weight encoders of the real shapes (no download). A folder of JPEG and PNG
images of mixed sizes (256 to 2048 px) is generated once. For each backbone, in one
run, each in its own subprocess (so that peak RSS is that mode's own):
  (a) baseline: benchmarks/reference_baseline.py (DataLoader over PIL, OpenAI-style
      float32 model with ln_2 hooks (float16 on CUDA, as clip.load leaves it), batch 128,
      capped so that every loader worker gets at least two batches of the benchmark's images),
  (b) ours, --precision fp32,
  (c) ours, --precision auto (the default: int8-smooth on CPUs with VNNI or AMX-INT8),
  with --compile also (d) fp32 and (e) auto with torch.compile (compile time shown apart),
  (f) ours, --precision int8, on CPUs with VNNI or AMX-INT8 (a line says why where not;
      --no-int8 leaves it out),
  (i) ours, --precision bf16, where auto is not bf16 (int8-smooth) on a CPU with native bf16,
  with --stability also (s) ours auto with `--stability` (docs/stability.md): expected about
      1 / (1 + 4 conditions) of (c)'s images/s; a line gives the ratio and the re-encoding's
      own work (timed apart on one thread) as a share of (s)'s time per image,
  (p) (c) plus the provenance records `rine detect` adds (rine.provenance, read ahead in a
      thread): its cost is the gap to (c), at most 5 % on ViT-L/14 (--no-provenance leaves it out),
and (c) again on half the images, to show that peak memory does not grow with the
number of images. It prints images/s, the ratio to (a), peak RSS, the largest
probability difference to fp32, and the fraction of the machine's attainable matmul
FLOP/s that (c), (f) and (i) reach (measured here with a large torch.matmul, oneDNN's packed
linear, and oneDNN's int8 GEMM; int8-smooth, a mix, against its FLOPs' time at each format's
rate and against the int8 rate).

The parts live in benchmarks/benchkit/: images.py (the image mix), models.py (random
encoders, heads), machine.py (matmul rates, memory), rows.py (the table's rows, each
measured in its own subprocess: add a row there), report.py (what is printed).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

# Other scripts and tests use these as `import throughput as bench; bench.make_images(...)`.
from benchkit.images import IMAGE_SIZES, make_images  # noqa: E402, F401
from benchkit.machine import cuda_matmul_gflops, gflop_per_image, int8_matmul_gflops, matmul_gflops  # noqa: E402, F401
from benchkit.models import (  # noqa: E402, F401
    SHAPES,
    build_hf_backbone,
    calibrate,
    default_trained_head,
    random_head,
    random_openai_state,
    trained_head,
)
from benchkit.report import precision_probe, print_matmul_shares, print_memory, print_table  # noqa: E402
from benchkit.rows import ROWS, baseline_batch_size, int8_unavailable, rows_for, run_mode, spawn  # noqa: E402, F401


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: ViT-B/32 only, 24 images")
    p.add_argument("--archs", nargs="+", default=None, choices=sorted(SHAPES))
    p.add_argument("--n-b32", type=int, default=128, help="images for ViT-B/32 (default 128)")
    p.add_argument("--n-l14", type=int, default=48, help="images for ViT-L/14 (default 48)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads and loader workers of the baseline")
    p.add_argument("--workers", type=int, default=None, help="our decoding threads (default: Detector's choice)")
    p.add_argument("--batch-size", type=int, default=None, help="our batch size (default: Detector's, 16 on CPU, 64 on GPU; the baseline uses 128)")
    p.add_argument("--decoder", default="auto", choices=("auto", "threads", "processes"), help="our decoding workers (default: the Detector's choice)")
    p.add_argument("--repeat", type=int, default=1, help="repeat each mode, report the median images/s")
    p.add_argument("--no-int8", action="store_true", help="leave out (f), --precision int8")
    p.add_argument("--no-provenance", action="store_true", help="leave out (p), (c) with the provenance records rine detect adds")
    p.add_argument("--compile", action="store_true", help="also measure (d) fp32 and (e) auto with --compile "
                   "(torch.compile; its compile time is reported, not counted in images/s)")
    p.add_argument("--stability", action="store_true", help="also (s): --stability, each image and its 4 re-encoded "
                   "copies (docs/stability.md)")
    p.add_argument("--onnx", action="store_true", help="also (g) ONNX Runtime fp32 and (h) fp16 rows (benchmarks/onnx_rows.py)")
    p.add_argument("--onnx-opsets", default="20", help="with --onnx: opsets, e.g. 20,23 (fp32 rows for the others)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--image-dir", default=None, help="where to generate the images (default: a temp folder)")
    p.add_argument("--head", default=None, help="a trained head (.pth or folder) of the arch's shape; default for "
                   "ViT-L/14: the official 2-class head from tests/fixtures, else a random calibrated head")
    # child-process options
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--arch", help=argparse.SUPPRESS)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, help=argparse.SUPPRESS)
    p.add_argument("--paths-file", help=argparse.SUPPRESS)
    p.add_argument("--calib", type=float, nargs=2, default=None, help=argparse.SUPPRESS)
    p.add_argument("--head-file", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.child:
        print(json.dumps(run_mode(args)))
        return

    archs = args.archs or (["ViT-B/32"] if args.quick else ["ViT-B/32", "ViT-L/14"])
    counts = {"ViT-B/32": 24 if args.quick else args.n_b32, "ViT-L/14": 12 if args.quick else args.n_l14}
    torch.set_num_threads(args.threads)
    folder = Path(args.image_dir or tempfile.mkdtemp(prefix="rine-bench-"))
    t0 = time.perf_counter()
    paths = make_images(folder, max(counts[a] for a in archs))
    print(f"# images ready in {time.perf_counter() - t0:.0f} s", flush=True)
    paths_file = folder / "paths.json"
    paths_file.write_text(json.dumps(paths))
    kinds = sorted({Path(x).suffix for x in paths})
    print(f"# {len(paths)} images in {folder} ({', '.join(kinds)}, 256-2048 px); torch {torch.__version__}, "
          f"{args.threads} threads, device {args.device}, cpu cores {os.cpu_count()}, load avg {os.getloadavg()[0]:.2f}")

    peaks: dict[str, float] = {}

    on_gpu = args.device.startswith("cuda")
    rows, skipped = rows_for(args)

    def measure_peaks(when: str) -> None:
        if on_gpu:
            how = "best of 20 torch.matmul 8192^3 on the GPU"
            dtypes = (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16))
            from rine.model.accel import exact_fp32

            with exact_fp32(torch.device("cuda")):  # fp32 as IEEE, not TF32
                for name, dt in dtypes:
                    peaks[name] = max(peaks.get(name, 0.0), cuda_matmul_gflops(dt))
        else:
            how = f"best of torch.matmul 2048^3 and oneDNN packed linear, {args.threads} threads"
            for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
                peaks[name] = max(peaks.get(name, 0.0), matmul_gflops(dt))
            if any(row.mode in ("int8", "auto") for row in rows) and not int8_unavailable(args):
                how += "; int8: oneDNN int8 GEMM"
                peaks["int8"] = max(peaks.get("int8", 0.0), int8_matmul_gflops())
        rates = ", ".join(f"{k} {v:.0f}" for k, v in peaks.items())
        print(f"# attainable matmul ({when}, {how}): {rates} GFLOP/s", flush=True)

    measure_peaks("start")
    from decode_speed import throughput_rows  # decoding only: today's path vs crop-aware, one core

    print(*throughput_rows(paths, quick=args.quick), sep="\n", flush=True)

    for arch in archs:
        n = counts[arch]
        calib = calibrate(arch, paths[:8])
        head_file = args.head or default_trained_head(arch)
        results: dict[str, list[dict]] = {row.mode: [] for row in rows}
        for _ in range(args.repeat):
            for mode in results:  # interleaved, so that load from other users hits all modes alike
                results[mode].append(spawn(args, __file__, arch, mode, n, paths_file, calib, head_file))
        half = spawn(args, __file__, arch, "auto", max(1, n // 2), paths_file, calib, head_file)
        med = {m: statistics.median(r["images_per_s"] for r in rs) for m, rs in results.items()}
        print(f"\n## {arch}: head = {Path(head_file).name if head_file else 'random, calibrated to logit std 2'}")
        probed = ("auto", *(m for m in ("bf16", "int8") if m in results))
        precision_probe(arch, paths[:16], head_file, calib, args.device, probed)
        print_table(arch, n, results, med, args, skipped)
        print_memory(n, results, half)
        if "auto+stability" in results:
            print_stability(results, med)
        if args.onnx:  # ONNX Runtime rows (g) fp32, (h) fp16: benchmarks/onnx_rows.py
            import onnx_rows

            ref_probs = onnx_rows.np.array(results["fp32"][0]["probs"]) if "fp32" in results else None

            def spawn_onnx(a, ar, mode, k, pf, cal, head_file=head_file):
                return spawn(a, __file__, ar, mode, k, pf, cal, head_file)

            onnx_rows.print_rows(args, arch, n, paths_file, calib, med["baseline"], ref_probs, spawn_onnx)
        if peaks:
            measure_peaks(f"after {arch}")
            print_matmul_shares(arch, results, med, peaks)
        print(f"# load avg after {arch}: {os.getloadavg()[0]:.2f}")
        if not math.isfinite(med["baseline"]):
            raise SystemExit("baseline failed")


def print_stability(results: dict[str, list[dict]], med: dict[str, float]) -> None:
    """(s) against (c): the cost of --stability, and how much of it is re-encoding."""
    r = results["auto+stability"][0]
    k = r["conditions"]
    share = r["reencode_s_per_image"] * med["auto+stability"]  # re-encode seconds / seconds per image
    print(f"(s) --stability: {med['auto+stability'] / med['auto']:.2f} x (c)'s images/s (1 / (1 + {k}) = "
          f"{1 / (1 + k):.2f} if only the encoder's work grew); re-encoding alone {1000 * r['reencode_s_per_image']:.0f} "
          f"ms per image on one thread = {100 * share:.0f} % of (s)'s time per image")


if __name__ == "__main__":
    main()
