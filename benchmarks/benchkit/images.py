"""The benchmark's image mix: photo-like JPEG and PNG files of mixed sizes (256-2048 px),
generated once, deterministically (image i is the same whatever n and the process)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

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
