"""Crop-aware JPEG decoding: the `center` and `ten` crops cut 224-pixel windows out of the
un-resized image, so only the rows and columns of those windows need decoding.

`decode_views(source, preprocess)` returns exactly `crop_views(load_image(source),
preprocess)` (uint8 views [V, S, S, 3], byte for byte, with the same `ImageLoadError`
kinds), decoding baseline JPEGs through the optional C extension `_jpeg_crop`
(libjpeg-turbo's `jpeg_skip_scanlines` + `jpeg_crop_scanline`) and everything else with
Pillow. The extension is used only where its result is known to equal Pillow's:

- 8-bit baseline (single-scan, Huffman) JPEG or MPO, YCbCr or greyscale, chroma at most
  2x2-subsampled, at least `image_size` on both sides; progressive, CMYK/YCCK, RGB-coded,
  12-bit, arithmetic-coded and small (padded) images go to Pillow;
- the header is read by Pillow first (`images.open_header`), so `--max-pixels`,
  `--max-bytes`, the format allow-list and header errors are today's;
- any libjpeg warning or error (truncated, corrupt data, anywhere in the file) sends the
  file to Pillow, which gives today's result or today's error;
- once per process the extension's crops are compared with Pillow's on a generated
  4:2:0 image; if they differ (a libjpeg-turbo that decodes differently from Pillow's
  own), it is not used. The same image with 16-bit quantisation tables (an entry of
  33068, where the integer IDCT's intermediates leave 16 bits: a non-SIMD libjpeg build
  decoded such a file differently from Pillow's) is compared too; if only that differs,
  files with a quantisation entry above 255 go to Pillow and the rest stay crop-aware.
EXIF orientation and ICC profiles are ignored on both paths, as `load_image` does.
Set RINE_JPEG_CROP=0 to decode everything with Pillow.
"""

from __future__ import annotations

import functools
import io
import logging
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from ..config import PreprocessConfig
from .images import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_PIXELS,
    _to_rgb,
    decode_errors,
    load_image,
    open_header,
    read_source,
)
from .preprocess import crop_views

log = logging.getLogger(__name__)

CROPS = ("center", "ten")  # the crops whose windows lie in the un-resized image
_PIXEL = np.dtype((np.void, 3))  # one RGB pixel as a single item
_FORMATS = ("JPEG", "MPO")  # MPO: how Pillow opens many camera JPEGs (frame 0 is the JPEG at offset 0)


@functools.cache
def _native():
    """The extension module, or None (not built, disabled, or failing its self-check)."""
    if os.environ.get("RINE_JPEG_CROP", "1").strip().lower() in ("0", "false", "no", "off"):
        log.debug("crop-aware JPEG decoding disabled by RINE_JPEG_CROP")
        return None
    try:
        from . import _jpeg_crop
    except ImportError as e:
        log.debug(
            "crop-aware JPEG decoding unavailable (%s): JPEGs are decoded whole by Pillow. "
            "Build it with a C compiler and libjpeg-turbo's headers (Debian: libjpeg62-turbo-dev), "
            "then reinstall rine", e,
        )
        return None
    problem = _self_check(_jpeg_crop)
    if problem:
        log.warning("crop-aware JPEG decoding disabled: %s", problem)
        return None
    _wide_tables_agree(_jpeg_crop)  # at start-up too, so that its verdict is logged once, early
    log.debug("crop-aware JPEG decoding on (libjpeg-turbo %s)", _jpeg_crop.LIBJPEG_TURBO_VERSION)
    return _jpeg_crop


def available() -> bool:
    """Whether baseline JPEGs are decoded crop-aware in this process."""
    return _native() is not None


@functools.cache
def _check_jpeg() -> bytes:
    """The self-check's image: a generated 4:2:0 baseline JPEG of an odd size (333 x 299)."""
    rng = np.random.default_rng(0)
    # Smooth gradients plus noise: chroma upsampling matters, so a wrong edge shows.
    y, x = np.mgrid[0:299, 0:333]
    base = np.stack([x * 255 // 333, y * 255 // 299, (x + y) % 256], axis=-1)
    pixels = np.clip(base + rng.integers(-40, 40, base.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=90, subsampling="4:2:0")
    return buf.getvalue()


WIDE_ENTRY = 33068  # above int16: the integer IDCT's arithmetic differs between builds here


def with_wide_tables(data: bytes, value: int = WIDE_ENTRY) -> bytes:
    """The same JPEG with every quantisation table written with 16-bit entries (DQT precision
    1, frame marker SOF1 as the standard asks) and the first AC entry of the first table set
    to `value`. Written by hand: libjpeg's encoder caps entries at 32767 and warns on stderr."""
    out, i = bytearray(data[:2]), 2
    first = True
    while i + 4 <= len(data) and data[i] == 0xFF:
        marker, length = data[i + 1], int.from_bytes(data[i + 2 : i + 4], "big")
        body = data[i + 4 : i + 2 + length]
        if marker == 0xDA:  # start of scan: the rest is entropy-coded data
            out += data[i:]
            return bytes(out)
        if marker == 0xDB:
            tables, j = bytearray(), 0
            while j < len(body):
                precision, n = body[j] >> 4, 64 * (1 + (body[j] >> 4))
                entries = body[j + 1 : j + 1 + n]
                values = list(entries) if precision == 0 else [int.from_bytes(entries[k : k + 2], "big") for k in range(0, n, 2)]
                if first:
                    values[1], first = value, False
                tables += bytes([0x10 | (body[j] & 0x0F)]) + b"".join(v.to_bytes(2, "big") for v in values)
                j += 1 + n
            body = bytes(tables)
        elif marker == 0xC0:
            marker = 0xC1  # extended sequential: baseline allows 8-bit tables only
        out += bytes([0xFF, marker]) + (len(body) + 2).to_bytes(2, "big") + body
        i += 2 + length
    raise ValueError("no start of scan in the JPEG")


def _compare(module, data: bytes) -> str | None:
    """Compares the extension's windows of `data` (a 333 x 299 JPEG) with Pillow's full
    decode; returns what differs, or None."""
    with Image.open(io.BytesIO(data)) as im:
        full = np.asarray(im.convert("RGB"))
    # Column windows on MCU edges (64, 288), where a decoder that does not widen them gets
    # the edge columns' chroma wrong; bands at the top, inside and at the bottom.
    for bands, c0, c1 in ([(37, 261)], 64, 288), ([(0, 80), (150, 299)], 0, 333), ([(16, 40)], 96, 301):
        rows = sum(b - a for a, b in bands)
        out = np.empty((rows, c1 - c0, 3), np.uint8)
        reason = module.decode_bands(data, out, 333, 299, 3, bands, c0, c1)
        if reason is not None:
            return f"it refused a baseline JPEG ({reason})"
        want = np.concatenate([full[a:b, c0:c1] for a, b in bands])
        if not np.array_equal(out, want):
            from PIL import features

            return (
                f"its pixels differ from Pillow's (libjpeg-turbo {module.LIBJPEG_TURBO_VERSION} "
                f"against Pillow's {features.version('libjpeg_turbo') or features.version('jpg')})"
            )
    return None


def _self_check(module) -> str | None:
    """Compares the extension with Pillow on one generated 4:2:0 JPEG with an odd size;
    returns what differs, or None."""
    return _compare(module, _check_jpeg())


@functools.cache
def _wide_tables_agree(module) -> bool:
    """Whether the extension decodes a JPEG with 16-bit quantisation tables as Pillow does
    (checked once per extension module)."""
    problem = _compare(module, with_wide_tables(_check_jpeg()))
    if problem:
        log.info("JPEGs with quantisation entries above 255 are decoded by Pillow: %s", problem)
    return problem is None


def _wide_tables(image: Image.Image) -> bool:
    """Whether an opened JPEG header has a quantisation entry above 255 (a 16-bit table)."""
    return any(v > 255 for table in getattr(image, "quantization", {}).values() for v in table)


def crop_windows(width: int, height: int, size: int, crop: str) -> list[tuple[int, int, bool]]:
    """The (top, left, mirrored) windows of `crop` ("center" or "ten") on an image of at
    least size x size, in `crop_views`' order (torchvision's CenterCrop / TenCrop)."""
    if width < size or height < size:
        raise ValueError("crop_windows needs an image at least size x size (smaller ones are padded)")
    ct, cl = int(round((height - size) / 2.0)), int(round((width - size) / 2.0))
    if crop == "center":
        return [(ct, cl, False)]
    if crop != "ten":
        raise ValueError(f"crop must be one of {CROPS}, got {crop!r}")
    corners = [(0, 0), (0, width - size), (height - size, 0), (height - size, width - size), (ct, cl)]
    # The window at `left` of the mirrored image is the mirror of the window at width - size - left.
    return [(t, le, False) for t, le in corners] + [(t, width - size - le, True) for t, le in corners]


def _bands(windows: list[tuple[int, int, bool]], size: int) -> list[tuple[int, int]]:
    """Sorted, merged row ranges that cover every window."""
    bands: list[tuple[int, int]] = []
    for top in sorted({t for t, _, _ in windows}):
        if bands and top <= bands[-1][1]:
            bands[-1] = (bands[-1][0], max(bands[-1][1], top + size))
        else:
            bands.append((top, top + size))
    return bands


def takes(image: Image.Image, size: int) -> bool:
    """Whether the extension may decode this opened header's windows of `size` (else Pillow)."""
    width, height = image.size
    if image.format not in _FORMATS or image.mode not in ("RGB", "L") or width < size or height < size:
        return False
    # progressive files: the extension refuses them too; this saves it the header parse
    return not (image.info.get("progressive") or image.info.get("progression"))


def _crop_aware(module, image: Image.Image, data: bytes, size: int, crop: str) -> np.ndarray | None:
    """The views [V, S, S, 3] decoded by the extension, or None where Pillow must decode."""
    if not takes(image, size):
        return None
    if _wide_tables(image) and not _wide_tables_agree(module):
        return None
    width, height = image.size
    windows = crop_windows(width, height, size, crop)
    bands = _bands(windows, size)
    col0 = min(le for _, le, _ in windows)
    col1 = max(le for _, le, _ in windows) + size
    channels = 3 if image.mode == "RGB" else 1
    rows = sum(b - a for a, b in bands)
    strip = np.empty((rows, col1 - col0, channels), np.uint8)
    reason = module.decode_bands(data, strip, width, height, channels, bands, col0, col1)
    if reason is not None:
        log.debug("decoding with Pillow: %s", reason)
        return None
    # Row `top` of the image is row `offset[band] + top - band start` of the strip.
    starts, offsets, acc = [], [], 0
    for a, b in bands:
        starts.append(a)
        offsets.append(acc)
        acc += b - a
    views = np.empty((len(windows), size, size, 3), np.uint8)
    # A mirrored copy moves whole pixels: as one 3-byte item each it is 2.5x faster than
    # numpy's byte-wise copy of window[:, ::-1] (0.17 against 0.42 ms a window).
    pixels = strip.view(_PIXEL)[..., 0] if channels == 3 else None
    for i, (top, left, mirrored) in enumerate(windows):
        band = max(j for j, a in enumerate(starts) if a <= top)
        r = offsets[band] + top - starts[band]
        c = left - col0
        if not mirrored:
            views[i] = strip[r : r + size, c : c + size]  # greyscale: replicated, as convert("RGB") does
        elif pixels is not None:
            views[i].view(_PIXEL)[..., 0] = pixels[r : r + size, c : c + size][:, ::-1]
        else:
            views[i] = strip[r : r + size, c : c + size][:, ::-1]
    return views


def decode_views(
    source: str | Path | bytes | bytearray | memoryview | Image.Image | np.ndarray,
    preprocess: PreprocessConfig,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    max_bytes: int | None = DEFAULT_MAX_BYTES,
    reserve_pixels: Callable[[int], None] | None = None,
) -> np.ndarray:
    """`crop_views(load_image(source, max_pixels, max_bytes, reserve_pixels), preprocess)`:
    uint8 views [V, S, S, 3] (V = 10 for ten-crop, else 1), byte for byte, with the same
    `ImageLoadError`s; baseline JPEGs under the center and ten crops decode only the
    windows' rows and columns."""
    module = _native() if preprocess.crop in CROPS else None
    if module is None or not isinstance(source, (str, Path, bytes, bytearray, memoryview)):
        return crop_views(load_image(source, max_pixels, max_bytes, reserve_pixels), preprocess)
    data = read_source(source, max_bytes)
    with decode_errors(data):
        image = open_header(data, max_pixels, reserve_pixels)
    # Outside decode_errors: a ValueError here is a bug, not a corrupt file.
    views = _crop_aware(module, image, data, preprocess.image_size, preprocess.crop)
    if views is not None:
        return views
    with decode_errors(data):
        image.load()
    return crop_views(_to_rgb(image), preprocess)


__all__ = ["CROPS", "available", "crop_windows", "decode_views"]
