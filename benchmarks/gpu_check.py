"""One prepared GPU check (issue 19, item 4): ViT-L/14 end to end from files on a GPU host.

    python benchmarks/gpu_check.py                 # 1024 images of the benchmark's mix
    python benchmarks/gpu_check.py --n 2048 --repeat 2

Runs `benchmarks/throughput.py --device cuda --archs ViT-L/14` (the reference-like loop (a),
rine fp32 (b) and rine auto = fp16 (c), in one run, with the crop-aware JPEG decoder when it
is built) while sampling the GPU's busy fraction with `nvidia-smi` every 0.2 s, and prints
both: the images/s ratio (c)/(a) (target: 3x) and how busy the GPU was, which says whether
the encoder still waits for the decoder. Needs an NVIDIA GPU, nvidia-smi and the package
installed with its extension built (`pip install -e .` with libjpeg62-turbo-dev present).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def sample_utilization(stop: threading.Event, out: list[tuple[float, int]], period_s: float = 0.2) -> None:
    """Append (time, GPU utilization %) from nvidia-smi until `stop` is set."""
    cmd = ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-i", "0"]
    while not stop.is_set():
        try:
            value = subprocess.run(cmd, capture_output=True, text=True, timeout=5, check=True).stdout.strip()
            out.append((time.monotonic(), int(value.splitlines()[0])))
        except (subprocess.SubprocessError, ValueError, IndexError):
            pass
        stop.wait(period_s)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1024, help="images (default 1024)")
    p.add_argument("--repeat", type=int, default=1, help="runs of each mode (median reported)")
    p.add_argument("--image-dir", default="/tmp/rine-gpu-check-imgs", help="where the images are generated")
    args = p.parse_args()
    if shutil.which("nvidia-smi") is None:
        print("gpu_check: nvidia-smi not found: this check is for a host with an NVIDIA GPU", file=sys.stderr)
        return 2
    from rine.data.jpeg_crop import available

    print(f"# crop-aware JPEG decoder: {'built' if available() else 'NOT built (Pillow decodes whole images)'}")
    samples: list[tuple[float, int]] = []
    stop = threading.Event()
    sampler = threading.Thread(target=sample_utilization, args=(stop, samples), daemon=True)
    sampler.start()
    cmd = [sys.executable, str(HERE / "throughput.py"), "--device", "cuda", "--archs", "ViT-L/14",
           "--n-l14", str(args.n), "--repeat", str(args.repeat), "--image-dir", args.image_dir]
    t0 = time.monotonic()
    code = subprocess.call(cmd)
    stop.set()
    sampler.join()
    busy = [u for t, u in samples if t > t0]
    if busy:
        print(f"# GPU busy over the whole run (includes (a) and (b), image generation and model loads): "
              f"median {statistics.median(busy)} %, mean {statistics.fmean(busy):.0f} %, {len(busy)} samples")
    return code


if __name__ == "__main__":
    raise SystemExit(main())
