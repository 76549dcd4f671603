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
  (c) ours, --precision auto (the default),
  with --compile also (d) fp32 and (e) auto with torch.compile (compile time shown apart),
and (c) again on half the images, to show that peak memory does not grow with the
number of images. It prints images/s, the ratio to (a), peak RSS, the largest
probability difference to fp32, and the fraction of the machine's attainable matmul
FLOP/s that (c) reaches (measured here with a large torch.matmul).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

# name: (width, layers, patch, image_size, embed_dim)
SHAPES = {"ViT-B/32": (768, 12, 32, 224, 512), "ViT-L/14": (1024, 24, 14, 224, 768)}


# ----------------------------------------------------------------------------- inputs
def random_openai_state(name: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """OpenAI-format visual weights of the real shape, random (std 0.02, unit LayerNorms;
    patch embedding scaled to unit-variance tokens so that the CLS taps depend on the image)."""
    width, layers, patch, size, embed = SHAPES[name]
    g = torch.Generator().manual_seed(seed)

    def r(*shape, std=0.02):
        return torch.randn(*shape, generator=g) * std

    tokens = (size // patch) ** 2 + 1
    sd = {
        "visual.conv1.weight": r(width, 3, patch, patch, std=(3 * patch * patch) ** -0.5),
        "visual.class_embedding": r(width, std=0.1),
        "visual.positional_embedding": r(tokens, width, std=0.1),
        "visual.ln_pre.weight": torch.ones(width), "visual.ln_pre.bias": torch.zeros(width),
        "visual.ln_post.weight": torch.ones(width), "visual.ln_post.bias": torch.zeros(width),
        "visual.proj": r(width, embed),
    }  # fmt: skip
    for i in range(layers):
        p = f"visual.transformer.resblocks.{i}."
        sd.update({
            p + "ln_1.weight": torch.ones(width), p + "ln_1.bias": torch.zeros(width),
            p + "attn.in_proj_weight": r(3 * width, width), p + "attn.in_proj_bias": r(3 * width),
            p + "attn.out_proj.weight": r(width, width), p + "attn.out_proj.bias": r(width),
            p + "ln_2.weight": torch.ones(width), p + "ln_2.bias": torch.zeros(width),
            p + "mlp.c_fc.weight": r(4 * width, width), p + "mlp.c_fc.bias": r(4 * width),
            p + "mlp.c_proj.weight": r(width, 4 * width), p + "mlp.c_proj.bias": r(width),
        })  # fmt: skip
    return sd


def random_head(name: str, calib: tuple[float, float] | None = None):
    """A random RINE head (nproj=4, proj_dim=128). `calib` = (mean, std) of its raw logits on
    sample images: the last layer is rescaled so that logits there have mean 0 and std 2,
    else a random head gives every image ~0.5 and a precision check would test nothing."""
    from rine.config import HeadConfig
    from rine.model.head import RINEHead

    width, layers = SHAPES[name][:2]
    torch.manual_seed(1)
    head = RINEHead(HeadConfig(in_dim=width, n_blocks=layers, nproj=4, proj_dim=128)).eval()
    with torch.no_grad():
        # He init: PyTorch's default Linear init shrinks the signal through the 4+4+2
        # ReLU layers until the logit no longer depends on the image.
        for m in head.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.normal_(0.0, (2.0 / m.in_features) ** 0.5)
                m.bias.zero_()
    if calib is None:
        return head
    mu, sigma = calib
    last = head.head[-1]
    with torch.no_grad():
        last.weight.mul_(2.0 / sigma)
        last.bias.sub_(mu).mul_(2.0 / sigma)
    return head


def build_hf_backbone(state: dict[str, torch.Tensor]):
    """The same weights as a float32 `TappedCLIPVision` (HF CLIPVisionModel, SDPA)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from rine.model.backbones import TappedCLIPVision, openai_to_hf_vision

    cfg_kwargs, hf_state = openai_to_hf_vision(state)
    cfg = CLIPVisionConfig(**cfg_kwargs)
    cfg._attn_implementation = "sdpa"
    clip = CLIPVisionModel(cfg)
    clip.load_state_dict(hf_state, strict=False)
    return TappedCLIPVision(clip)


@torch.no_grad()
def calibrate(name: str, paths: list[str]) -> tuple[float, float]:
    """(mean, std) of the uncalibrated head's fp32 logits on the centre crops of `paths`."""
    from rine.config import PreprocessConfig
    from rine.data.images import load_image
    from rine.data.preprocess import preprocess

    backbone = build_hf_backbone(random_openai_state(name))
    pixels = torch.cat([preprocess(load_image(p), PreprocessConfig()) for p in paths])
    logits = random_head(name)(backbone(pixels)).logits
    return float(logits.mean()), float(logits.std().clamp_min(1e-8))


def default_trained_head(arch: str) -> str | None:
    """The official 2-class RINE head (trained, ViT-L/14-shaped) from the shared fixtures, if present."""
    shared = Path(os.environ.get("RINE_SHARED", HERE.parent.parent / "shared"))
    path = shared / "fixtures" / "rine-official" / "model_2class_trainable.pth"
    return str(path) if arch == "ViT-L/14" and path.is_file() else None


def trained_head(path: str):
    from rine.model.checkpoints import load_head

    return load_head(path)[0].eval()


@torch.no_grad()
def precision_probe(arch: str, paths: list[str], head_file: str | None, calib: tuple[float, float], device: str) -> None:
    """max |p_auto - p_fp32| on the same images for the trained head and for the random stress
    head, with `auto`'s precision on `device`. A random He-initialised head rescaled to logit
    std 2 amplifies the tap error several times more than a trained head does; both are printed."""
    from rine.config import PreprocessConfig
    from rine.data.images import load_image
    from rine.data.preprocess import preprocess
    from rine.model.accel import FastTapEncoder, resolve_precision

    dev = torch.device(device)
    fast = resolve_precision("auto", dev)
    backbone = build_hf_backbone(random_openai_state(arch)).to(dev)
    pixels = torch.cat([preprocess(load_image(p), PreprocessConfig()) for p in paths]).to(dev)
    exact = torch.cat([FastTapEncoder(backbone, "fp32", dev)(x) for x in pixels.split(16)]).float().cpu()
    low = torch.cat([FastTapEncoder(backbone, fast, dev)(x) for x in pixels.split(16)]).float().cpu()
    heads = {"random He head, logit std 2 (stress)": random_head(arch, calib)}
    if head_file:
        heads = {f"trained head {Path(head_file).name}": trained_head(head_file), **heads}
    for name, head in heads.items():
        a, b = head(exact).logits, head(low).logits
        dp = (torch.sigmoid(a) - torch.sigmoid(b)).abs()
        print(f"{fast} vs fp32 on {len(paths)} images, {name}: max |dp| {dp.max().item():.4f} (mean {dp.mean().item():.4f}), "
              f"max |dlogit| {(a - b).abs().max().item():.3f}, fp32 logit std {a.std().item():.2f}")


IMAGE_SIZES = [(256, 256), (512, 384), (640, 480), (1024, 768), (1280, 1280), (2048, 1536), (300, 2048), (800, 600)]


def _image_path(folder: Path, i: int) -> Path:
    w, h = IMAGE_SIZES[i % len(IMAGE_SIZES)]
    return folder / f"img_{i:04d}_{w}x{h}.{'png' if i % 3 == 2 else 'jpg'}"


def _write_image(folder: Path, i: int, seed: int) -> None:
    from PIL import Image

    path = _image_path(folder, i)
    if path.exists():
        return
    rng = np.random.default_rng([seed, i])  # image i is the same whatever n and the process
    w, h = IMAGE_SIZES[i % len(IMAGE_SIZES)]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    f = rng.uniform(0.002, 0.02, size=(3, 2))
    ph = rng.uniform(0, 6.3, size=3)
    base = np.stack([np.sin(xx * f[c, 0] + yy * f[c, 1] + ph[c]) for c in range(3)], axis=-1)
    img = 127 + 90 * base + rng.normal(0, 12, size=(h, w, 3))
    tmp = path.with_name(path.stem + ".tmp" + path.suffix)  # a killed run leaves no half-written image
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(tmp, quality=90)
    tmp.replace(path)


def make_images(folder: Path, n: int, seed: int = 0, jobs: int | None = None) -> list[str]:
    """n photo-like images (smooth colour fields + texture + noise), JPEG and PNG, 256-2048 px,
    written by `jobs` processes (default: every core) where they do not exist yet."""
    from concurrent.futures import ProcessPoolExecutor

    folder.mkdir(parents=True, exist_ok=True)
    todo = [i for i in range(n) if not _image_path(folder, i).exists()]
    jobs = max(1, min(jobs or os.cpu_count() or 1, len(todo)))
    if jobs == 1:
        for i in todo:
            _write_image(folder, i, seed)
    elif todo:
        with ProcessPoolExecutor(jobs) as pool:
            list(pool.map(_write_image, [folder] * len(todo), todo, [seed] * len(todo), chunksize=4))
    return [str(_image_path(folder, i)) for i in range(n)]


# ----------------------------------------------------------------------------- machine
def gflop_per_image(name: str, ours: bool) -> float:
    """Multiply-adds x 2 of the encoder's matmuls; ours skips the last block's MLP, ln_post, proj."""
    width, layers, patch, size, embed = SHAPES[name]
    t, d = (size // patch) ** 2 + 1, width
    block = 2 * (t * d * 3 * d + 2 * t * t * d + t * d * d)  # qkv, QK^T and AV, out proj
    mlp = 2 * (2 * t * d * 4 * d)
    patch_embed = 2 * (t - 1) * 3 * patch * patch * d
    total = patch_embed + layers * (block + mlp)
    if ours:
        total -= mlp
    else:
        total += 2 * d * embed
    return total / 1e9


def cuda_matmul_gflops(dtype: torch.dtype, reps: int = 20) -> float:
    """Attainable GPU matmul GFLOP/s for `dtype`: best of `reps` 8192^3 products."""
    a = torch.randn(8192, 8192, device="cuda", dtype=dtype)
    b = torch.randn(8192, 8192, device="cuda", dtype=dtype)
    best = 0.0
    for _ in range(3):
        a @ b
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        best = max(best, 2 * 8192**3 / (start.elapsed_time(end) / 1e3) / 1e9)
    return best


def matmul_gflops(dtype: torch.dtype, reps: int = 10) -> float:
    """Attainable matmul GFLOP/s for `dtype`: the best of `reps` runs of the faster of a
    2048^3 `torch.matmul` and a oneDNN pre-packed linear at ViT-L/14's MLP shape
    ([16 x 257, 1024] x [1024, 4096]). Best, not median: the attainable rate is what the
    machine does when no one else is using it."""
    a, b = torch.randn(2048, 2048).to(dtype), torch.randn(2048, 2048).to(dtype)
    m, k, n = 16 * 257, 1024, 4096
    x, w = torch.randn(m, k).to(dtype), torch.randn(n, k).to(dtype)
    cases = [(lambda: a @ b, 2 * 2048**3)]
    if torch.backends.mkldnn.is_available():
        packed = torch.ops.mkldnn._reorder_linear_weight(w, None)
        cases.append((lambda: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], ""), 2 * m * k * n))
    best = 0.0
    for fn, flops in cases:
        fn()
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            best = max(best, flops / (time.perf_counter() - t0) / 1e9)
    return best


def release_free_memory() -> None:
    """Return freed heap pages to the OS (glibc), so RSS shows what is in use, not what
    building the random weights once needed."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def current_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak_rss() -> bool:
    """Reset this process's peak-RSS counter (Linux: VmHWM, via clear_refs), so that the
    peak measured afterwards is the scoring's, not the model construction's."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """Peak resident memory of this process (since the last reset where possible), MB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def reset_peaks(device: str) -> None:
    reset_peak_rss()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def children_peak_rss_mb() -> float:
    """Largest peak RSS of any finished child process (the baseline's loader workers), MB."""
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


# ----------------------------------------------------------------------------- one mode
def run_mode(args: argparse.Namespace) -> dict:
    """Child process: load one mode, score the image list, report figures as JSON."""
    if args.mode.startswith("ort-"):  # ONNX Runtime modes: benchmarks/onnx_rows.py
        import onnx_rows

        return onnx_rows.run_mode(args, json.loads(Path(args.paths_file).read_text())[: args.n])
    torch.set_num_threads(args.threads)
    on_gpu = args.device.startswith("cuda")
    paths = json.loads(Path(args.paths_file).read_text())[: args.n]
    state = random_openai_state(args.arch)
    head = trained_head(args.head_file) if args.head_file else random_head(args.arch, tuple(args.calib) if args.calib else None)
    if args.mode == "baseline":
        from reference_baseline import build_openai_model, score_like_reference

        model = build_openai_model(state)
        del state
        # The reference evaluates with batch 128; on a benchmark of <= 128 images that would be
        # a single batch, decoded by ONE DataLoader worker with no overlap. Smaller batches give
        # every worker a share and let decoding overlap compute, as on a real-size dataset.
        bs = baseline_batch_size(len(paths), args.threads)
        run = dict(batch_size=bs, workers=args.threads, device=args.device)
        score_like_reference(model, head, paths[:2], **run)  # warm-up
        release_free_memory()
        model_mb = current_rss_mb()
        reset_peaks(args.device)
        t0 = time.perf_counter()
        probs = score_like_reference(model, head, paths, **run)
        elapsed = time.perf_counter() - t0
        precision = "fp16" if on_gpu else "fp32"
        batch, workers, decoder = bs, args.threads, "processes"
        warmup_s = None
    else:
        from rine.config import PreprocessConfig, RINEConfig
        from rine.inference.detector import Detector
        from rine.model.rine_model import RINEModel

        backbone = build_hf_backbone(state)
        del state
        config = RINEConfig(backbone=args.arch, head=head.config, preprocess=PreprocessConfig(crop="center"))
        precision_name, _, extra = args.mode.partition("+")  # "fp32", "auto", "fp32+compile", ...
        det = Detector(RINEModel(backbone, head), config, device=args.device, precision=precision_name,
                       keep_reference=False, compile=extra == "compile")  # as rine detect loads it
        from rine.inference.detector import default_batch_size, default_decoder, default_workers

        precision = det.precision
        batch = args.batch_size or default_batch_size(det.device)
        workers = args.workers or default_workers(det.device)
        decoder = default_decoder(det.device) if args.decoder == "auto" else args.decoder
        t_warm = time.perf_counter()
        det.predict(paths[: min(len(paths), batch)], batch_size=batch)  # warm-up at the real batch shape (compiles)
        warmup_s = time.perf_counter() - t_warm
        release_free_memory()
        model_mb = current_rss_mb()
        reset_peaks(args.device)
        t0 = time.perf_counter()
        preds = list(det.predict_iter(paths, batch_size=batch, num_workers=workers, decoder=args.decoder))
        elapsed = time.perf_counter() - t0
        probs = np.array([p.prob_fake for p in preds], dtype=np.float64)
    return {
        "mode": args.mode,
        "precision": precision,
        "n": len(paths),
        "seconds": elapsed,
        "images_per_s": len(paths) / elapsed,
        "peak_rss_mb": peak_rss_mb(),
        "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if on_gpu else None,
        "batch_size": batch,
        "workers": workers,
        "decoder": decoder,
        "model_rss_mb": model_mb,
        "workers_peak_rss_mb": children_peak_rss_mb(),
        "probs": [float(p) for p in probs],
        "warmup_s": warmup_s,
    }


def baseline_batch_size(n: int, workers: int) -> int:
    """128 as the reference, capped so that each DataLoader worker gets at least two batches."""
    return max(1, min(128, n // (2 * max(1, workers))))


def spawn(args: argparse.Namespace, arch: str, mode: str, n: int, paths_file: Path, calib: tuple[float, float]) -> dict:
    cmd = [
        sys.executable, __file__, "--child", "--arch", arch, "--mode", mode, "--n", str(n),
        "--paths-file", str(paths_file), "--threads", str(args.threads), "--device", args.device,
        "--calib", repr(calib[0]), repr(calib[1]), "--decoder", args.decoder,
    ] + (["--workers", str(args.workers)] if args.workers else []) + (
        ["--batch-size", str(args.batch_size)] if args.batch_size else [])  # fmt: skip
    head_file = args.head or default_trained_head(arch)
    if head_file:
        cmd += ["--head-file", head_file]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"{arch} {mode} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


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
    p.add_argument("--compile", action="store_true", help="also measure (d) fp32 and (e) auto with --compile "
                   "(torch.compile; its compile time is reported, not counted in images/s)")  # fmt: skip
    p.add_argument("--onnx", action="store_true", help="also (f) ONNX Runtime fp32 and (g) fp16 rows (benchmarks/onnx_rows.py)")
    p.add_argument("--onnx-opsets", default="20", help="with --onnx: opsets, e.g. 20,23 (fp32 rows for the others)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--image-dir", default=None, help="where to generate the images (default: a temp folder)")
    p.add_argument("--head", default=None, help="a trained head (.pth or folder) of the arch's shape; default for "
                   "ViT-L/14: the official 2-class head from ../shared/fixtures, else a random calibrated head")  # fmt: skip
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
          f"{args.threads} threads, device {args.device}, cpu cores {os.cpu_count()}, load avg {os.getloadavg()[0]:.2f}")  # fmt: skip

    peaks = {}

    on_gpu = args.device.startswith("cuda")

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
        rates = ", ".join(f"{k} {v:.0f}" for k, v in peaks.items())
        print(f"# attainable matmul ({when}, {how}): {rates} GFLOP/s", flush=True)

    measure_peaks("start")

    for arch in archs:
        n = counts[arch]
        calib = calibrate(arch, paths[:8])
        modes = ["baseline", "fp32", "auto"] + (["fp32+compile", "auto+compile"] if args.compile else [])
        results: dict[str, list[dict]] = {mode: [] for mode in modes}
        for _ in range(args.repeat):
            for mode in results:  # interleaved, so that load from other users hits all modes alike
                results[mode].append(spawn(args, arch, mode, n, paths_file, calib))
        half = spawn(args, arch, "auto", max(1, n // 2), paths_file, calib)
        med = {m: statistics.median(r["images_per_s"] for r in rs) for m, rs in results.items()}
        ref_probs = np.array(results["fp32"][0]["probs"])
        spread = float(np.std(ref_probs))
        head_file = args.head or default_trained_head(arch)
        print(f"\n## {arch}: head = {Path(head_file).name if head_file else 'random, calibrated to logit std 2'}")
        precision_probe(arch, paths[:16], head_file, calib, args.device)
        print(f"## {arch}: {n} images, end to end from files, median of {args.repeat} run(s); "
              f"fp32 probabilities: std {spread:.3f}, range {ref_probs.min():.3f}-{ref_probs.max():.3f}")
        print(f"(a) runs batches of {baseline_batch_size(n, args.threads)} with {args.threads} DataLoader workers; "
              f"(b), (c) batches of {results['auto'][0]['batch_size']} with {results['auto'][0]['workers']} decoding {results['auto'][0]['decoder']}")
        gpu_col = f"{'peak GPU MB':>13}" if on_gpu else ""
        print(f"{'mode':<24}{'images/s':>10}{'x baseline':>12}{'RSS loaded MB':>15}{'peak scoring MB':>17}{gpu_col}"
              f"{'max |dp| vs fp32':>18}{'mean |dp|':>11}  each run's images/s")
        for mode, rs in results.items():
            r = rs[0]
            label = {"baseline": f"(a) reference-like {r['precision']}", "fp32": "(b) ours fp32", "auto": f"(c) ours auto={r['precision']}",
                     "fp32+compile": "(d) ours fp32 compiled", "auto+compile": f"(e) ours {r['precision']} compiled"}[mode]  # fmt: skip
            dps = np.abs(np.array(r["probs"]) - ref_probs)
            gpu = f"{r['peak_gpu_mb']:>13.0f}" if on_gpu else ""
            print(f"{label:<24}{med[mode]:>10.2f}{med[mode] / med['baseline']:>12.2f}{r['model_rss_mb']:>15.0f}"
                  f"{r['peak_rss_mb']:>17.0f}{gpu}{dps.max():>18.2e}{dps.mean():>11.1e}  "
                  + ", ".join(f"{x['images_per_s']:.2f}" for x in rs))
        if args.onnx:  # ONNX Runtime rows: benchmarks/onnx_rows.py
            import onnx_rows

            onnx_rows.print_rows(args, arch, n, paths_file, calib, med["baseline"], ref_probs, spawn)
        for mode in ("fp32+compile", "auto+compile"):
            if mode in results:
                warm = ", ".join(f"{r['warmup_s']:.0f}" for r in results[mode])
                print(f"{mode}: compile + first batch took {warm} s per run (not in images/s)")
        print(f"(a)'s DataLoader worker processes peaked at {results['baseline'][0]['workers_peak_rss_mb']:.0f} MB each (not included above)")
        print(f"peak RSS of (c) while scoring {half['n']} images: {half['peak_rss_mb']:.0f} MB; "
              f"{n} images: {results['auto'][0]['peak_rss_mb']:.0f} MB")
        if peaks:
            measure_peaks(f"after {arch}")
            prec = results["auto"][0]["precision"]
            gf = gflop_per_image(arch, ours=True)
            achieved = med["auto"] * gf
            peak = peaks[prec]
            print(f"(c) runs {achieved:.0f} GFLOP/s of encoder matmuls ({gf:.1f} GFLOP/image) = "
                  f"{achieved / peak:.0%} of the attainable {prec} matmul rate ({peak:.0f} GFLOP/s)")
        print(f"# load avg after {arch}: {os.getloadavg()[0]:.2f}")
        if not math.isfinite(med["baseline"]):
            raise SystemExit("baseline failed")


if __name__ == "__main__":
    main()
