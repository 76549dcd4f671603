"""Everyday re-encodings an image meets on its way to a reader: the conditions of `--stability`.

Each condition is data (`Reencoding`) and one function, `reencode(image, condition)`: the
decoded RGB image (as `images.load_image` gives it) is saved by Pillow as the condition says,
and the bytes are decoded back exactly as rine decodes any file (`load_image`). The set is
fixed and documented (docs/stability.md), so that a record's `stability` means the same thing
on every machine:

  jpeg90   JPEG, quality 90, Pillow's defaults otherwise (4:2:0 chroma subsampling, the
           standard tables scaled to the quality, baseline, not optimised, no EXIF / ICC)
  jpeg70   the same at quality 70
  fit1080  a platform-style downscale: when the longer side exceeds 1080 px, resize so that it
           is 1080 px and the shorter side round(shorter * 1080 / longer) px (at least 1),
           with Pillow's Lanczos filter (`Image.Resampling.LANCZOS`, no reducing gap); then
           saved as JPEG quality 85, Pillow's defaults. Images not larger: the JPEG re-save only
  webp80   the same downscale as fit1080, then lossy WebP, quality 80, method 4 (Pillow's,
           cwebp's and libvips' defaults). WebP reaches readers from web delivery, which
           serves it at display size; at full size its encoder alone (about 1.2 s for a 3 MP
           photo on one core) would outweigh the encoder passes it is checked with. Against
           fit1080 it changes only the codec.

A condition a format cannot hold (JPEG is limited to 65500 px a side) is skipped for that
image, with the reason (`ReencodeError`); the others still apply.

No torch here: decoding workers (threads or processes) import this module; nor numpy at
import time (the CLI reads DEFAULT_CONDITIONS from here, and `rine --help` stays light).
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from PIL import Image

from .images import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS, load_image

if TYPE_CHECKING:
    import numpy as np

    from ..config import PreprocessConfig

__all__ = [
    "DEFAULT_CONDITIONS",
    "REENCODINGS",
    "ReencodeError",
    "Reencoding",
    "StabilityViews",
    "encode",
    "reencode",
    "resolve_conditions",
    "stability_views",
]

FORMATS = ("JPEG", "WEBP")
WEBP_MAX_SIDE = 16383  # libwebp's limit on either side


class ReencodeError(ValueError):
    """A condition that cannot be applied to this image (e.g. too large for WebP)."""


@dataclass(frozen=True)
class Reencoding:
    """One re-encoding condition.

    format:    "JPEG" or "WEBP", saved by Pillow with `quality` (and WebP's `method`, 0-6)
               and nothing else: every other setting is Pillow's default
    max_side:  when the longer side exceeds it, the image is first resized so that the longer
               side is `max_side` (the shorter: round(shorter * max_side / longer), >= 1)
               with `resample` (a Pillow filter name); None: full size
    words:     the condition in words, for a reason ("a JPEG re-save at quality 70")
    """

    name: str
    format: str
    quality: int
    words: str
    method: int | None = None
    max_side: int | None = None
    resample: str = "LANCZOS"

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, got {self.format!r}")
        if not 0 <= self.quality <= 100:
            raise ValueError(f"quality must be within [0, 100], got {self.quality}")
        if self.method is not None and (self.format != "WEBP" or not 0 <= self.method <= 6):
            raise ValueError("method is WebP's effort, 0-6, and only for WEBP")
        if self.max_side is not None and self.max_side < 1:
            raise ValueError(f"max_side must be at least 1, got {self.max_side}")
        if not hasattr(Image.Resampling, self.resample):
            raise ValueError(f"unknown Pillow filter {self.resample!r}")

    def save_options(self) -> dict[str, int]:
        """The keyword arguments of Pillow's `Image.save` besides the format."""
        return {"quality": self.quality} if self.method is None else {"quality": self.quality, "method": self.method}

    def target_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) after the downscale step (unchanged when not larger than `max_side`)."""
        longer = max(width, height)
        if self.max_side is None or longer <= self.max_side:
            return width, height
        # integer products first: the longer side comes out at exactly max_side
        return max(1, round(width * self.max_side / longer)), max(1, round(height * self.max_side / longer))


REENCODINGS: dict[str, Reencoding] = {
    r.name: r
    for r in (
        Reencoding("jpeg90", "JPEG", 90, "a JPEG re-save at quality 90"),
        Reencoding("jpeg70", "JPEG", 70, "a JPEG re-save at quality 70"),
        Reencoding("fit1080", "JPEG", 85, "a platform-style downscale to 1080 px (JPEG quality 85)", max_side=1080),
        Reencoding("webp80", "WEBP", 80, "a WebP re-encode at quality 80 (at most 1080 px)", method=4, max_side=1080),
    )
}
# The set `--stability` scores, in this order.
DEFAULT_CONDITIONS: tuple[str, ...] = tuple(REENCODINGS)


def resolve_conditions(names: Sequence[str] | None = None) -> tuple[Reencoding, ...]:
    """Condition names -> conditions (None: `DEFAULT_CONDITIONS`); ValueError names the known ones."""
    out = []
    for n in DEFAULT_CONDITIONS if names is None else names:
        if n not in REENCODINGS:
            raise ValueError(f"unknown re-encoding {n!r}; choose from {', '.join(REENCODINGS)}")
        out.append(REENCODINGS[n])
    if len({r.name for r in out}) != len(out):
        raise ValueError("a re-encoding is named twice")
    return tuple(out)


def encode(image: Image.Image, condition: Reencoding) -> bytes:
    """RGB image -> the bytes of the file `condition` saves (downscaled first where it says so).

    Raises ReencodeError where the format cannot hold the image."""
    if image.mode != "RGB":
        raise ValueError(f"expected an RGB image, got mode {image.mode!r}")
    size = condition.target_size(*image.size)
    if size != image.size:
        image = image.resize(size, getattr(Image.Resampling, condition.resample))
    if condition.format == "WEBP" and max(image.size) > WEBP_MAX_SIDE:
        raise ReencodeError(f"{condition.name}: WebP holds at most {WEBP_MAX_SIDE} px a side, "
                            f"the image is {image.size[0]}x{image.size[1]}")
    buf = io.BytesIO()
    try:
        image.save(buf, condition.format, **condition.save_options())
    except (OSError, ValueError) as e:  # the encoder's own limits (e.g. JPEG's 65500 px)
        raise ReencodeError(f"{condition.name}: Pillow could not save the image: {e}") from None
    return buf.getvalue()


def reencode(image: Image.Image, condition: Reencoding) -> Image.Image:
    """RGB image -> the RGB image rine decodes from `encode(image, condition)`.

    Limits are not applied again: the file is ours and holds no more pixels than `image`."""
    return load_image(encode(image, condition), max_pixels=None, max_bytes=None)


@dataclass(frozen=True)
class StabilityViews:
    """One image's views for a stability run: the file's own, then each applied condition's.

    views:    uint8 [(1 + len(applied)) * V, S, S, 3], V = 10 for ten-crop, else 1
    applied:  names of the conditions whose views follow the file's, in order
    skipped:  {name: reason} for the conditions this image could not be put through
    """

    views: np.ndarray
    applied: tuple[str, ...]
    skipped: dict[str, str]

    @property
    def per_image(self) -> int:
        """V: views of each of the (1 + conditions) images."""
        return len(self.views) // (1 + len(self.applied))


def stability_views(
    source,
    preprocess: PreprocessConfig,
    conditions: Sequence[Reencoding],
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    max_bytes: int | None = DEFAULT_MAX_BYTES,
    reserve_pixels: Callable[[int], None] | None = None,
) -> StabilityViews:
    """Decode one image once and cut its views as it is and under every condition; runs in the
    decoding workers. The file's own views equal `jpeg_crop.decode_views` (what is scored
    without `--stability`), byte for byte; limits and `reserve_pixels` as `load_image`'s."""
    import numpy as np

    from .preprocess import crop_views

    image = load_image(source, max_pixels=max_pixels, max_bytes=max_bytes, reserve_pixels=reserve_pixels)
    parts, applied, skipped = [crop_views(image, preprocess)], [], {}
    for c in conditions:
        try:
            parts.append(crop_views(reencode(image, c), preprocess))
        except ReencodeError as e:
            skipped[c.name] = str(e)
            continue
        applied.append(c.name)
    return StabilityViews(np.ascontiguousarray(np.concatenate(parts)), tuple(applied), skipped)
