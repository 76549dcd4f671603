"""Decoding only: images/s decoded and cropped on one core, today's path against crop-aware.

    python benchmarks/decode_speed.py                 # all sets, both crops (~1 min, quiet machine)
    python benchmarks/decode_speed.py --quick         # smoke run
    python benchmarks/decode_speed.py --images DIR    # also a folder of your own photos

today:      crop_views(load_image(bytes))   (Pillow decodes the whole image)
crop-aware: decode_views(bytes)             (rine.data.jpeg_crop; Pillow where it cannot)
from bytes in memory (no file reads), one thread, the two paths interleaved round by
round, the best round reported (the least disturbed by other load); every image's views are also compared byte for byte.
"ceiling x" is the most any crop-aware decoder could reach (today's time over the floor's): a
baseline JPEG's Huffman data is one sequential stream, so every row down to the last one the
windows need must be entropy-decoded; the floor times exactly that plus one row. Ten-crop's
bottom corners need the last rows, so its ceiling is today's time over a whole-image entropy
decode.

Sets: a 2048x2048 baseline 4:2:0 q90 JPEG and 4000x3000 4:2:0 q90 "photos" (generated:
multi-scale colour texture with a little noise, ~1.5 bits per pixel, as camera JPEGs at
q90 are 1.5-3), and the image mix of benchmarks/throughput.py (JPEG and PNG, 256-2048 px,
heavy noise: ~3 bits per pixel, a hard case, since entropy decoding of the rows above a
window cannot be skipped). `decoding_rows(paths)` gives the same rows for any file list,
for benchmarks/throughput.py.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def photo_like(width: int, height: int, seed: int) -> np.ndarray:
    """uint8 [height, width, 3]: colour texture at four scales (bicubic-upsampled random
    fields) plus noise of std 2, a stand-in for a camera photo's detail."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    img = np.full((height, width, 3), 128.0, np.float32)
    for scale, amp in ((256, 60), (64, 30), (16, 15), (4, 8)):
        small = rng.normal(0, 1, (height // scale + 2, width // scale + 2, 3))
        field = Image.fromarray(np.clip(small * 40 + 128, 0, 255).astype(np.uint8))
        big = np.asarray(field.resize((width + 2 * scale, height + 2 * scale), Image.BICUBIC), np.float32)
        img += (big[:height, :width] - 128) / 40 * amp
    img += rng.normal(0, 2, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def encode_jpeg(pixels: np.ndarray, quality: int = 90, subsampling: str = "4:2:0") -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=quality, subsampling=subsampling)
    return buf.getvalue()


def measure(blobs: list[bytes], crop: str, rounds: int = 5) -> dict:
    """Images/s of today's path and of the crop-aware one on `blobs` (one thread), best of
    `rounds` interleaved rounds; raises if any image's views differ between the two."""
    from rine.config import PreprocessConfig
    from rine.data.images import load_image
    from rine.data.jpeg_crop import available, decode_views
    from rine.data.preprocess import crop_views

    pre = PreprocessConfig(crop=crop)

    def today(data: bytes) -> np.ndarray:
        return crop_views(load_image(data, max_pixels=None, max_bytes=None), pre)

    def crop_aware(data: bytes) -> np.ndarray:
        return decode_views(data, pre, max_pixels=None, max_bytes=None)

    floor = _floor_fn(crop_aware, pre.image_size, crop)
    for data in blobs:  # warm-up, and the views must be today's
        if not np.array_equal(today(data), crop_aware(data)):
            raise AssertionError(f"crop-aware views differ from today's ({crop} crop)")
        floor(data)
    times: dict[str, list[float]] = {"today": [], "crop-aware": [], "floor": []}
    cpu: dict[str, list[float]] = {"today": [], "crop-aware": [], "floor": []}
    for _ in range(rounds):
        for name, fn in (("today", today), ("crop-aware", crop_aware), ("floor", floor)):
            t, c = time.perf_counter(), time.process_time()
            for data in blobs:
                fn(data)
            times[name].append(time.perf_counter() - t)
            cpu[name].append(time.process_time() - c)
    rate = {k: len(blobs) / min(v) for k, v in times.items()}
    cpu_rate = {k: len(blobs) / min(v) for k, v in cpu.items()}
    return {"crop": crop, "n": len(blobs), "today": rate["today"], "crop_aware": rate["crop-aware"],
            "speedup": rate["crop-aware"] / rate["today"], "cpu_speedup": cpu_rate["crop-aware"] / cpu_rate["today"],
            "ceiling": rate["floor"] / rate["today"], "native": available()}


def _floor_fn(crop_aware, size: int, crop: str):
    """The least any crop-aware decoder of a sequential JPEG does: Huffman-decode every row
    down to the last one the windows need (a baseline JPEG without restart markers cannot be
    entered in the middle) and reconstruct only that row, timed through the extension
    (`decode_bands` of the one row, 16 columns). Images the extension does not take (PNG,
    progressive, small) count at the crop-aware path's cost."""
    from PIL import Image

    from rine.data import jpeg_crop

    module = jpeg_crop._native()

    def floor(data: bytes):
        if module is None:
            return crop_aware(data)
        with Image.open(io.BytesIO(data)) as im:
            w, h, mode, taken = im.width, im.height, im.mode, jpeg_crop.takes(im, size)
        if not taken:
            return crop_aware(data)
        last = max(t for t, _, _ in jpeg_crop.crop_windows(w, h, size, crop)) + size
        channels = 3 if mode == "RGB" else 1
        out = np.empty((1, min(w, 16), channels), np.uint8)
        if module.decode_bands(data, out, w, h, channels, [(last - 1, last)], 0, min(w, 16)) is not None:
            return crop_aware(data)
        return out

    return floor


HEADER = (f"{'decoding only, 1 core':<42}{'crop':>7}{'today img/s':>13}{'crop-aware':>12}{'x today':>9}{'x (CPU time)':>14}"
          f"{'ceiling x':>11}")


def format_row(label: str, r: dict) -> str:
    return (f"{label:<42}{r['crop']:>7}{r['today']:>13.1f}{r['crop_aware']:>12.1f}{r['speedup']:>9.2f}{r['cpu_speedup']:>14.2f}"
            f"{r['ceiling']:>11.2f}" + ("" if r["native"] else "  (extension not built: both are Pillow)"))


def decoding_rows(paths: list[str], label: str = "benchmark images", crops=("center",), rounds: int = 3) -> list[str]:
    """Formatted rows (HEADER first) for the files `paths`, read into memory first: the
    call for benchmarks/throughput.py (`print(*decoding_rows(paths), sep="\\n")`)."""
    blobs = [Path(p).read_bytes() for p in paths]
    return [HEADER] + [format_row(f"{label} ({len(blobs)})", measure(blobs, c, rounds)) for c in crops]


def large_photo_sets(quick: bool = False) -> list[tuple[str, list[bytes]]]:
    """(label, JPEG bytes) of the generated 2048x2048 and 4000x3000 4:2:0 q90 photos."""
    sets = []
    big = [(512, 512), (800, 600)] if quick else [(2048, 2048), (4000, 3000)]
    for (w, h), count in zip(big, (1, 1) if quick else (4, 3), strict=True):
        blobs = [encode_jpeg(photo_like(w, h, seed)) for seed in range(count)]
        bpp = 8 * sum(map(len, blobs)) / (len(blobs) * w * h)
        sets.append((f"{w}x{h} baseline 4:2:0 q90 ({bpp:.1f} b/px)", blobs))
    return sets


def throughput_rows(paths: list[str], rounds: int = 3, quick: bool = False) -> list[str]:
    """The decoding-only rows of benchmarks/throughput.py: its images and the large photos
    (small ones with `quick`), centre crop (its default), HEADER first."""
    rounds = 1 if quick else rounds
    rows = decoding_rows(paths, "benchmark images", ("center",), rounds)
    for label, blobs in large_photo_sets(quick):
        rows.append(format_row(label, measure(blobs, "center", rounds)))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: small images, one round")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds per set, the best is reported (default 5)")
    p.add_argument("--n-mix", type=int, default=48, help="images of throughput.py's mix (default 48)")
    p.add_argument("--images", default=None, help="also measure the JPEGs in this folder (your own photos)")
    p.add_argument("--image-dir", default=None, help="where to generate throughput.py's mix (default: a temp folder)")
    args = p.parse_args()

    from PIL import features

    from rine.data import jpeg_crop

    rounds = 1 if args.quick else args.rounds
    native = jpeg_crop._native()
    print(f"# {cpu_name()}, {os.cpu_count()} cores, load avg {os.getloadavg()[0]:.2f}; "
          f"Pillow's libjpeg-turbo {features.version('libjpeg_turbo')}, extension: "
          + (f"libjpeg-turbo {native.LIBJPEG_TURBO_VERSION}" if native else "NOT BUILT (both columns are Pillow)"))
    sets = large_photo_sets(args.quick)
    from throughput import make_images

    folder = Path(args.image_dir or tempfile.mkdtemp(prefix="rine-decode-"))
    mix_paths = make_images(folder, 6 if args.quick else args.n_mix)
    mix = [Path(x).read_bytes() for x in mix_paths]
    sets.append((f"throughput.py mix ({len(mix)}, 256-2048 px)", mix))
    jpegs = [b for b, x in zip(mix, mix_paths, strict=True) if x.endswith(".jpg")]
    sets.append((f"  its JPEGs only ({len(jpegs)})", jpegs))  # PNGs decode the same way on both paths
    if args.images:
        own = [f.read_bytes() for f in sorted(Path(args.images).iterdir()) if f.suffix.lower() in (".jpg", ".jpeg")]
        if own:
            sets.append((f"{args.images} ({len(own)} JPEGs)", own))
    print(HEADER)
    for label, blobs in sets:
        for crop in ("center", "ten"):
            print(format_row(label, measure(blobs, crop, rounds)), flush=True)


if __name__ == "__main__":
    main()
