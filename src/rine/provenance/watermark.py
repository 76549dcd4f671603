"""The invisible watermarks of Stable Diffusion: imwatermark's `dwtDct` method, as diffusers'
SDXL pipeline (a fixed 48-bit message) and the SD 1.x/2.x reference scripts (the bytes
`StableDiffusionV1`, `SDV2`) embed it.

The decoder is imwatermark's `EmbedMaxDct.decode` written on numpy alone, vectorised over
blocks (tests/test_provenance_watermark.py proves it bit-identical to imwatermark's own decoder,
which uses OpenCV and PyWavelets, on its own encoder's output): the image's U channel (OpenCV's
BGR->YUV in its integer arithmetic), one Haar DWT level (PyWavelets' approximation band, in its
order of float operations), 4x4 blocks of that band in raster order;
block k votes for bit k mod L with whether its largest non-DC coefficient's magnitude, modulo
the scale 36, lies in the upper half. Bits are majority votes; a message counts as found when
at least `min_match` of its bits agree (decoding is not exact: FACTS.md).

The watermark does not survive lossy re-encoding, so only lossless files (PNG, lossless WebP,
TIFF, BMP, GIF) are read. Blocks are numbered across the full width, so the top
`watermark_rows` rows alone give a correct subset of the votes (hundreds per bit): larger
images cost no more than that band.
"""

from __future__ import annotations

import io

import numpy as np

from .catalogue import WATERMARKS
from .types import ProvenanceLimits, Signal

SCALE = 36.0  # imwatermark's default scales=[0, 36, 36]: only channel 1 (U) is used
BLOCK = 4
MIN_PIXELS = 256 * 256  # imwatermark refuses smaller images
_HAAR = 0.7071067811865476  # PyWavelets' Haar filter taps (1/sqrt 2)


def yuv_u(bgr: np.ndarray) -> np.ndarray:
    """OpenCV's `cvtColor(uint8 BGR, COLOR_BGR2YUV)[..., 1]`, bit for bit: its fixed-point
    formula (14 fractional bits, round half up): Y = 0.114 B + 0.587 G + 0.299 R,
    U = 0.492 (B - Y) + 128, saturated to uint8. [H, W, 3] uint8 -> [H, W] uint8"""
    u = bgr[..., 0].astype(np.int32)  # in place from here: this runs on every lossless file
    y = u * 1868
    y += bgr[..., 1].astype(np.int32) * 9617
    y += bgr[..., 2].astype(np.int32) * 4899
    y += 1 << 13
    y >>= 14
    u -= y
    u *= 8061
    u += (128 << 14) + (1 << 13)
    u >>= 14
    return np.clip(u, 0, 255, out=u).astype(np.uint8)


def haar_approx(x: np.ndarray) -> np.ndarray:
    """`pywt.dwt2(x, "haar")[0]` for even sizes, bit for bit (rows first, then columns, each
    pair as a*c + b*c). [H, W] -> [H/2, W/2] float64"""
    x = x.astype(np.float64)
    r = x[0::2] * _HAAR + x[1::2] * _HAAR
    return r[:, 0::2] * _HAAR + r[:, 1::2] * _HAAR


def block_votes(bgr: np.ndarray) -> np.ndarray:
    """One vote per 4x4 block of the U channel's Haar approximation band, in raster order.
    [H, W, 3] uint8 -> [blocks] bool"""
    h, w = bgr.shape[:2]
    ca = haar_approx(yuv_u(bgr[: h // 4 * 4, : w // 4 * 4]))
    rows, cols = ca.shape[0] // BLOCK, ca.shape[1] // BLOCK
    blocks = ca[: rows * BLOCK, : cols * BLOCK].reshape(rows, BLOCK, cols, BLOCK).transpose(0, 2, 1, 3)
    mags = np.abs(blocks.reshape(rows * cols, BLOCK * BLOCK)[:, 1:])  # the DC term is not used
    top = mags[np.arange(len(mags)), mags.argmax(axis=1)]
    return (top % SCALE) > 0.5 * SCALE


def decode_bits(votes: np.ndarray, length: int) -> np.ndarray:
    """Majority of the votes for each of `length` bits: [blocks] bool -> [length] bool (as
    imwatermark: mean vote * 255 > 127)."""
    index = np.arange(len(votes)) % length
    ones = np.bincount(index, weights=votes.astype(np.float64), minlength=length)
    counts = np.bincount(index, minlength=length)
    return (ones / np.maximum(counts, 1)) * 255 > 127


def plausible(width: int, height: int) -> bool:
    """Whether an image of this size can carry a watermark that still decodes: SD and SDXL
    generate at widths that are multiples of 8 (latents are 1/8 of the image), and the block
    numbering depends on the width, so an image resized or cropped to another width no longer
    decodes (its height may be cut: blocks are numbered row by row). imwatermark refuses images
    under 256x256 pixels. Files that fail this are not decoded at all (the watermark read is
    the one costly reader: a full second decode of the file)."""
    return width % 8 == 0 and width * height >= MIN_PIXELS


def read(data: bytes, limits: ProvenanceLimits, pixels: np.ndarray | None = None) -> Signal | None:
    """The best-matching known watermark as a signal; None when none reaches its threshold.
    `pixels`: the file's RGB pixels when the caller has decoded them already ([H, W, 3] uint8).
    Both channel orders are tried: diffusers hands imwatermark RGB where it expects BGR, the
    CompVis scripts convert to BGR first."""
    from PIL import Image

    if pixels is not None:
        return _find(pixels, limits) if plausible(pixels.shape[1], pixels.shape[0]) else None
    try:
        with Image.open(io.BytesIO(data)) as im:  # reads the header only: the size is known before decoding
            if im.width * im.height > limits.watermark_max_pixels:
                return Signal("watermark", "watermark:dwtDct",
                              error=f"not read: {im.width}x{im.height} is over the {limits.watermark_max_pixels}-pixel cap")
            if not plausible(im.width, im.height):
                return None
            rgb = np.asarray(im.convert("RGB"))
    except Exception:  # pixels Pillow refuses: the detector's decoder reports that file's error
        return None
    return _find(rgb, limits)


def _find(rgb: np.ndarray, limits: ProvenanceLimits) -> Signal | None:
    rgb = rgb[: max(limits.watermark_rows, BLOCK * 2 * 16)]
    best: tuple[float, object, str] | None = None
    for order, array in (("rgb", rgb), ("bgr", rgb[:, :, ::-1])):
        votes = block_votes(array)
        for sig in WATERMARKS:
            if len(votes) < len(sig.bits):
                continue
            match = float(np.mean(decode_bits(votes, len(sig.bits)) == np.array(sig.bits, dtype=bool)))
            if best is None or match > best[0]:
                best = (match, sig, order)
    if best is None or best[0] < best[1].min_match:  # type: ignore[union-attr]
        return None
    match, sig, _ = best
    n = len(sig.bits)  # type: ignore[union-attr]
    return Signal("watermark", f"watermark:dwtDct:{sig.name}", generator=sig.generator,  # type: ignore[union-attr]
                  value=f"{round(match * n)}/{n} bits match", source_type="trainedAlgorithmicMedia")
