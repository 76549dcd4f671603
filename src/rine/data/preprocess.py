"""Test-time preprocessing without torchvision, bit-exact with the reference's transforms.

center: torchvision `CenterCrop(224)` on the un-resized image (zero-pad if smaller;
        top-left corner at `int(round((H-224)/2))`, `int(round((W-224)/2))`).
resize: shorter side -> 224 (bicubic, as CLIP's own preprocessing), then center.
ten:    torchvision `TenCrop(224)`: 4 corners + centre, then the same on the mirrored image.
Then `/255` and `(x - mean) / std` in float32, in that order (ToTensor + Normalize).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from ..config import PreprocessConfig
from .images import ImageLoadError

if TYPE_CHECKING:
    import torch


def pad_to_min_size(array: np.ndarray, size: int) -> np.ndarray:
    """Zero-pad an HWC uint8 array to at least size x size, as torchvision's CenterCrop
    does: the left/top pad is (size - dim) // 2, the rest goes right/bottom.

    Materialises the whole padded image: use `padded_window` to cut a crop out of it,
    which costs size x size whatever the image (a 1 x 30,000,000 image padded to width
    224 would be 20 GB)."""
    h, w = array.shape[:2]
    if h >= size and w >= size:
        return array
    pad_h, pad_w = max(size - h, 0), max(size - w, 0)
    return np.pad(
        array,
        ((pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2), (0, 0)),
        mode="constant",
    )


def padded_shape(array: np.ndarray, size: int) -> tuple[int, int]:
    """(H, W) of `pad_to_min_size(array, size)`, without padding."""
    h, w = array.shape[:2]
    return max(h, size), max(w, size)


def padded_window(array: np.ndarray, size: int, top: int, left: int) -> np.ndarray:
    """`pad_to_min_size(array, size)[top:top+size, left:left+size]`, built from the
    window's overlap with the image: [size, size, C] uint8, a new array."""
    h, w = array.shape[:2]
    H, W = padded_shape(array, size)
    if not (0 <= top <= H - size and 0 <= left <= W - size):
        raise ValueError(f"window at ({top}, {left}) of size {size} is outside the padded {H}x{W} image")
    # The image's top-left corner sits at (pad_top, pad_left) in the padded frame.
    pad_top, pad_left = (H - h) // 2, (W - w) // 2
    r0, c0 = top - pad_top, left - pad_left  # the window's corner in image coordinates
    out = np.zeros((size, size) + array.shape[2:], dtype=array.dtype)
    rs, re = max(r0, 0), min(r0 + size, h)
    cs, ce = max(c0, 0), min(c0 + size, w)
    if rs < re and cs < ce:
        out[rs - r0 : re - r0, cs - c0 : ce - c0] = array[rs:re, cs:ce]
    return out


def center_crop_array(array: np.ndarray, size: int) -> np.ndarray:
    """[H, W, C] -> [size, size, C]; torchvision's rounding of the corner (Python round)."""
    h, w = padded_shape(array, size)
    return padded_window(array, size, int(round((h - size) / 2.0)), int(round((w - size) / 2.0)))


def ten_crop_arrays(array: np.ndarray, size: int) -> list[np.ndarray]:
    """torchvision TenCrop order: tl, tr, bl, br, center, then the same for the hflip."""
    h, w = padded_shape(array, size)
    corners = [(0, 0), (0, w - size), (h - size, 0), (h - size, w - size),
               (int(round((h - size) / 2.0)), int(round((w - size) / 2.0)))]
    views = [padded_window(array, size, top, left) for top, left in corners]
    # The window at `left` of the mirrored image is the mirror of the window at w - size - left.
    views += [padded_window(array, size, top, w - size - left)[:, ::-1] for top, left in corners]
    return views


# `resize` of a very thin image is huge: 1 x 100,000 px becomes 224 x 22,400,000.
MAX_RESIZE_ASPECT = 64


def resize_shorter_side(image: Image.Image, size: int) -> Image.Image:
    """Shorter side -> `size` with bicubic resampling (CLIP's Resize(size, BICUBIC)).

    Raises ImageLoadError ("too_many_pixels") for images more than MAX_RESIZE_ASPECT times
    longer than wide (or the reverse), whose resized copy would dwarf the image."""
    w, h = image.size
    if max(w, h) > MAX_RESIZE_ASPECT * min(w, h):
        raise ImageLoadError(
            f"a {w}x{h} image is too elongated for the resize crop (sides more than {MAX_RESIZE_ASPECT}:1 "
            "apart); score it with the center crop",
            "too_many_pixels",
        )
    if min(w, h) == size:
        return image
    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_w, new_h = int(size * w / h), size
    return image.resize((new_w, new_h), Image.BICUBIC)


def normalize(batch_uint8: torch.Tensor, mean, std) -> torch.Tensor:
    """[N, H, W, 3] uint8 -> [N, 3, H, W] float32, `(x / 255 - mean) / std`."""
    import torch  # here: decoding processes import this module and need no torch

    x = batch_uint8.permute(0, 3, 1, 2).float().div(255)
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (x - m) / s


def crop_views(image: Image.Image, config: PreprocessConfig) -> np.ndarray:
    """RGB image -> uint8 views [V, S, S, 3] (V = 10 for ten-crop, else 1)."""
    size = config.image_size
    if config.crop == "resize":
        image = resize_shorter_side(image, size)
    if image.mode != "RGB":
        raise ValueError(f"expected an RGB image, got mode {image.mode!r}")
    w, h = image.size
    if config.crop != "ten" and w >= size and h >= size:
        # Same window as center_crop_array, cut by Pillow: only size x size pixels are
        # copied out of a (possibly 12-megapixel) decoded image.
        top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
        return np.asarray(image.crop((left, top, left + size, top + size)), dtype=np.uint8)[None].copy()
    array = np.asarray(image, dtype=np.uint8)
    if config.crop == "ten":
        views = ten_crop_arrays(array, size)
    else:
        views = [center_crop_array(array, size)]
    return np.ascontiguousarray(np.stack(views))


def preprocess(image: Image.Image, config: PreprocessConfig) -> torch.Tensor:
    """RGB PIL image -> normalised views [V, 3, S, S] float32."""
    import torch

    return normalize(torch.from_numpy(crop_views(image, config)), config.mean, config.std)
