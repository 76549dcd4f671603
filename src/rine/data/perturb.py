"""Robustness perturbations of the paper (blur, crop, JPEG, noise, all four), seeded per image.

As the paper states them (default, `quirks="none"`):
  blur   Gaussian blur, kernel size drawn from {3, 5, 7, 9}; sigma derived from the kernel
         size by OpenCV (sigma=0: 0.3 * ((k - 1) / 2 - 1) + 0.8)
  crop   remove a fraction f ~ U[0.05, 0.20) of each side length (f/2 per border), resize
         back to the original width x height with bicubic interpolation
  jpeg   re-encode with quality q ~ U{10, ..., 74} (OpenCV's encoder, RGB handled as RGB)
  noise  additive Gaussian noise, std ~ U[5, 20] on 0-255 values, rounded and clipped
  combined  blur -> crop -> jpeg -> noise, each with its own draw

`quirks="reference"` reproduces the reference code instead: blur sigma always 4 (it passes
`cv2.BORDER_DEFAULT` as sigma), JPEG always at OpenCV's default quality 95 (its params
list never sets the quality) and with the RGB array fed as BGR, crop resized to the
transposed size (height x width), noise truncated instead of rounded.

The protocol (`robustness_image`): each image is perturbed with probability p = 0.5, then
resized to 256 x 256 (bilinear) and handed to the test crop (centre 224). The unperturbed
half goes through the same resize, so that the only difference between the halves is the
perturbation; the reference resizes only the perturbed half (kept with quirks="reference").
Every draw comes from a generator seeded by (seed, image key): the same images are
perturbed, with the same parameters, in every run and whatever the batch order. The
perturb-or-not coin depends on (seed, key) only, so every kind perturbs the same half.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import cv2
import numpy as np
from PIL import Image

PERTURBATIONS = ("blur", "crop", "jpeg", "noise", "combined")
QUIRKS = ("none", "reference")
BLUR_KERNELS = (3, 5, 7, 9)
CROP_RANGE = (0.05, 0.20)
JPEG_QUALITY_RANGE = (10, 75)  # high end exclusive, as np.random.randint(10, 75)
NOISE_STD_RANGE = (5.0, 20.0)
RESIZE_TO = 256
REFERENCE_BLUR_SIGMA = 4.0  # the value of cv2.BORDER_DEFAULT
REFERENCE_JPEG_QUALITY = 95  # OpenCV's default


def _check(image: np.ndarray) -> None:
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected a uint8 RGB array [H, W, 3], got {image.dtype} {image.shape}")


def blur(image: np.ndarray, rng: np.random.Generator, quirks: str = "none") -> np.ndarray:
    """[H, W, 3] uint8 -> same shape, Gaussian-blurred with a kernel from {3, 5, 7, 9}."""
    _check(image)
    k = int(rng.choice(BLUR_KERNELS))
    sigma = REFERENCE_BLUR_SIGMA if quirks == "reference" else 0.0
    return cv2.GaussianBlur(image, (k, k), sigmaX=sigma)


def crop(image: np.ndarray, rng: np.random.Generator, quirks: str = "none") -> np.ndarray:
    """Remove f ~ U[0.05, 0.2) of each side (f/2 per border), resize back (bicubic).
    -> [H, W, 3] ([W, H, 3] with quirks="reference")."""
    _check(image)
    f = rng.uniform(*CROP_RANGE)
    h, w = image.shape[:2]
    dh, dw = int(h * f * 0.5), int(w * f * 0.5)
    cropped = image[dh : h - dh, dw : w - dw]
    dsize = (h, w) if quirks == "reference" else (w, h)  # OpenCV's dsize is (width, height)
    return cv2.resize(np.ascontiguousarray(cropped), dsize=dsize, interpolation=cv2.INTER_CUBIC)


def jpeg_quality(rng: np.random.Generator, quirks: str = "none") -> int:
    """The quality the encoder receives; the draw is made in both modes to keep streams aligned."""
    q = int(rng.integers(*JPEG_QUALITY_RANGE))
    return REFERENCE_JPEG_QUALITY if quirks == "reference" else q


def jpeg(image: np.ndarray, rng: np.random.Generator, quirks: str = "none") -> np.ndarray:
    """JPEG re-encode at quality U{10..74} -> [H, W, 3] uint8."""
    _check(image)
    q = jpeg_quality(rng, quirks)
    # the reference hands OpenCV the RGB array as if it were BGR; both ways decode back in order
    bgr = image if quirks == "reference" else image[:, :, ::-1]
    ok, data = cv2.imencode(".jpg", np.ascontiguousarray(bgr), [cv2.IMWRITE_JPEG_QUALITY, q])
    if not ok:
        raise ValueError("JPEG encoding failed")
    out = cv2.imdecode(data, cv2.IMREAD_COLOR)
    return out if quirks == "reference" else np.ascontiguousarray(out[:, :, ::-1])


def noise(image: np.ndarray, rng: np.random.Generator, quirks: str = "none") -> np.ndarray:
    """Add N(0, std^2) noise with std ~ U[5, 20] per pixel and channel -> [H, W, 3] uint8."""
    _check(image)
    std = rng.uniform(*NOISE_STD_RANGE)
    x = image.astype(np.float64) + std * rng.standard_normal(image.shape)
    x = np.clip(x, 0.0, 255.0)
    return (x if quirks == "reference" else np.rint(x)).astype(np.uint8)


def combined(image: np.ndarray, rng: np.random.Generator, quirks: str = "none") -> np.ndarray:
    """blur, crop, jpeg, noise in sequence."""
    for fn in (blur, crop, jpeg, noise):
        image = fn(image, rng, quirks)
    return image


FUNCTIONS: dict[str, Callable[[np.ndarray, np.random.Generator, str], np.ndarray]] = {
    "blur": blur,
    "crop": crop,
    "jpeg": jpeg,
    "noise": noise,
    "combined": combined,
}


def image_rng(seed: int, key: str, stream: str) -> np.random.Generator:
    """A generator determined by (seed, image key, stream name), independent of run order."""
    digest = hashlib.blake2b(
        f"{stream}\0{key}".encode("utf-8", "surrogatepass"), digest_size=8
    ).digest()
    return np.random.default_rng([int(seed), int.from_bytes(digest, "little")])


def perturb(
    image: np.ndarray, kind: str, rng: np.random.Generator, quirks: str = "none"
) -> np.ndarray:
    """Apply perturbation `kind` to an RGB uint8 array [H, W, 3]."""
    if kind not in FUNCTIONS:
        raise ValueError(f"unknown perturbation {kind!r}; choose from {', '.join(PERTURBATIONS)}")
    if quirks not in QUIRKS:
        raise ValueError(f"quirks must be one of {QUIRKS}, got {quirks!r}")
    return FUNCTIONS[kind](image, rng, quirks)


def is_perturbed(seed: int, key: str, p: float = 0.5) -> bool:
    """The protocol's coin for one image (shared by every kind)."""
    return bool(image_rng(seed, key, "coin").random() < p)


def robustness_image(
    image: Image.Image, kind: str, seed: int, key: str, quirks: str = "none", p: float = 0.5
) -> tuple[Image.Image, bool]:
    """The paper's protocol for one RGB image before the test crop: perturb with probability
    `p`, then resize to 256 x 256. Returns (image, whether it was perturbed)."""
    hit = is_perturbed(seed, key, p)
    if hit:
        arr = perturb(np.asarray(image, dtype=np.uint8), kind, image_rng(seed, key, kind), quirks)
        image = Image.fromarray(arr)
    elif quirks == "reference":
        return image, False  # the reference centre-crops unperturbed images without resizing
    # torchvision's Resize((256, 256)) on a PIL image is PIL's bilinear resize
    return image.resize((RESIZE_TO, RESIZE_TO), Image.BILINEAR), hit


def transform_id(kind: str | None, seed: int, quirks: str = "none", p: float = 0.5) -> str:
    """A stable name of an evaluation transform, used for output folders and feature caches."""
    if kind in (None, "none"):
        return "clean"
    tail = "" if quirks == "none" else f"-{quirks}"
    ptail = "" if p == 0.5 else f"-p{p:g}"
    return f"{kind}-s{seed}{ptail}{tail}"
