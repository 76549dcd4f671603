"""Safe image decoding: every failure becomes an `ImageLoadError` with a one-line reason.

Limits protect the machine from decompression bombs and huge uploads: the pixel
count is checked from the header, before any pixel is decoded.
"""

from __future__ import annotations

import contextlib
import functools
import io
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image, UnidentifiedImageError

if TYPE_CHECKING:
    import numpy as np

# Pillow's own bomb threshold is ~89 M pixels (warning) / ~179 M (error); we stop at 64 M
# by default: a 8000x8000 photo still passes, a bomb does not.
DEFAULT_MAX_PIXELS = 64_000_000
DEFAULT_MAX_BYTES = 64 * 1024 * 1024

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".jfif", ".ppm", ".pgm", ".avif"}
)

# The Pillow decoders an input may reach, whatever its name: the formats of
# IMAGE_EXTENSIONS (MPO is how Pillow opens many camera JPEGs). Content is sniffed, so
# without this list a file named x.jpg could reach any of Pillow's ~40 readers, EPS
# among them, which runs Ghostscript on the file.
DECODE_FORMATS = ("JPEG", "MPO", "PNG", "WEBP", "BMP", "TIFF", "GIF", "PPM", "AVIF")
SUPPORTED_FORMATS_TEXT = "JPEG, PNG, WebP, AVIF, BMP, TIFF, GIF, PPM/PGM"

# Formats users meet that rine does not decode, by extension: why, for the summary of a
# folder scan, and (from their content, `_unsupported_format`) in a file's error.
UNSUPPORTED_EXTENSIONS = {
    ".svg": "vector image, not supported",
    ".svgz": "vector image, not supported",
    ".heic": "HEIC, an unsupported format",
    ".heif": "HEIF, an unsupported format",
    ".jp2": "JPEG 2000, an unsupported format",
    ".j2k": "JPEG 2000, an unsupported format",
    ".jpx": "JPEG 2000, an unsupported format",
    ".jxl": "JPEG XL, an unsupported format",
    ".psd": "Photoshop document, an unsupported format",
    ".pdf": "PDF document, not an image",
}


class ImageLoadError(ValueError):
    """An input that cannot be turned into an RGB image; `str()` is a one-line reason and
    `kind` a stable machine-readable category, one of `KINDS`."""

    KINDS = ("missing", "unreadable", "too_large", "too_many_pixels", "empty", "not_image", "corrupt", "bad_mode")

    def __init__(self, message: str, kind: str):
        if kind not in self.KINDS:
            raise ValueError(f"unknown ImageLoadError kind {kind!r}")
        super().__init__(message)
        self.kind = kind

    def __reduce__(self):
        # Crosses process boundaries (decoding workers) with its kind intact.
        return (type(self), (str(self), self.kind))


@functools.cache
def _decode_formats() -> tuple[str, ...]:
    Image.init()  # registers every plugin; a Pillow built without one (AVIF) just lacks it
    return tuple(f for f in DECODE_FORMATS if f in Image.OPEN)


def is_image_path(path: str | Path) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def load_image(
    source: str | Path | bytes | Image.Image | np.ndarray,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    max_bytes: int | None = DEFAULT_MAX_BYTES,
    reserve_pixels: Callable[[int], None] | None = None,
) -> Image.Image:
    """Decode `source` (path, bytes, PIL image or uint8 array [H, W(, 3|4)]) to an RGB PIL image, as the reference
    does (`convert("RGB")`: alpha is dropped, greyscale replicated; no EXIF rotation).

    `reserve_pixels(width * height)`, if given, is called once the header is read and
    before decoding; it may raise ImageLoadError to refuse the image (a budget shared
    by several images, e.g. one HTTP request's).

    Raises ImageLoadError for missing, empty, truncated, corrupt, non-image,
    oversized or unconvertible inputs.
    """
    # numpy is not imported here (`rine --help` stays fast): an array exists only if it is.
    numpy = sys.modules.get("numpy")
    if numpy is not None and isinstance(source, numpy.ndarray):
        source = _from_array(source)
    if isinstance(source, Image.Image):
        image = source
        _check_pixels(image, max_pixels)
        return _to_rgb(image)
    data = read_source(source, max_bytes)
    with decode_errors(data):
        image = open_header(data, max_pixels, reserve_pixels)
        image.load()
    return _to_rgb(image)


def read_source(source: str | Path | bytes | bytearray | memoryview, max_bytes: int | None) -> bytes:
    """The bytes of a path or buffer, with `load_image`'s checks and errors (missing,
    unreadable, too_large, empty)."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    else:
        path = Path(source)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise ImageLoadError("no such file", "missing") from None
        except OSError as e:
            raise ImageLoadError(f"cannot read file: {e.strerror or e}", "unreadable") from None
        if not path.is_file():
            raise ImageLoadError("not a regular file", "unreadable")
        if max_bytes is not None and size > max_bytes:
            raise ImageLoadError(f"file too large: {size} bytes > limit {max_bytes}", "too_large")
        try:
            data = path.read_bytes()
        except OSError as e:
            raise ImageLoadError(f"cannot read file: {e.strerror or e}", "unreadable") from None
    if not data:
        raise ImageLoadError("empty file", "empty")
    if max_bytes is not None and len(data) > max_bytes:
        raise ImageLoadError(f"file too large: {len(data)} bytes > limit {max_bytes}", "too_large")
    return data


def open_header(
    data: bytes, max_pixels: int | None, reserve_pixels: Callable[[int], None] | None = None
) -> Image.Image:
    """Pillow's image for `data`, header read and limits checked, no pixel decoded yet
    (`.load()` decodes). Call inside `decode_errors()`."""
    image = Image.open(io.BytesIO(data), formats=_decode_formats())
    _check_pixels(image, max_pixels)
    if reserve_pixels is not None:
        reserve_pixels(image.size[0] * image.size[1])
    return image


@contextlib.contextmanager
def decode_errors(data: bytes = b"") -> Iterator[None]:
    """Turns Pillow's failures while opening or decoding `data` into `ImageLoadError` kinds
    (the bytes name a known unsupported format: SVG, HEIC, ...)."""
    try:
        with warnings.catch_warnings():
            # Pillow warns from ~89 M pixels; `max_pixels` is the limit here (checked next),
            # so that a caller may raise it. Pillow's own hard limit (~179 M) still holds.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    except ImageLoadError:
        raise
    except UnidentifiedImageError:
        known = _unsupported_format(data)
        if known:
            raise ImageLoadError(f"{known}; convert it to PNG or JPEG first (supported: {SUPPORTED_FORMATS_TEXT})",
                                 "not_image") from None
        raise ImageLoadError(f"not an image in a supported format ({SUPPORTED_FORMATS_TEXT})", "not_image") from None
    except Image.DecompressionBombError as e:
        raise ImageLoadError(f"too many pixels, over Pillow's own limit: {e}", "too_many_pixels") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageLoadError(f"corrupt or truncated image: {_one_line(e)}", "corrupt") from None
    except RuntimeError as e:
        # Pillow's AVIF decoder reports a broken file as RuntimeError ("Failed to decode
        # image: Missing or empty image item"): a corrupt file, not a fault of the caller.
        raise ImageLoadError(f"corrupt or truncated image: {_one_line(e)}", "corrupt") from None


def _from_array(array) -> Image.Image:
    """uint8 numpy array [H, W] (grey), [H, W, 3] (RGB) or [H, W, 4] (RGBA) -> PIL image."""
    import numpy as np

    if array.dtype != np.uint8 or array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise ImageLoadError(
            f"expected a uint8 array [H, W], [H, W, 3] (RGB) or [H, W, 4], got {array.dtype} {tuple(array.shape)}",
            "bad_mode",
        )
    if array.ndim == 3 and array.shape[2] == 4:
        return Image.fromarray(np.ascontiguousarray(array), "RGBA")
    return Image.fromarray(np.ascontiguousarray(array), "L" if array.ndim == 2 else "RGB")


def _check_pixels(image: Image.Image, max_pixels: int | None) -> None:
    w, h = image.size
    if w <= 0 or h <= 0:
        raise ImageLoadError(f"invalid image size {w}x{h}", "corrupt")
    if max_pixels is not None and w * h > max_pixels:
        raise ImageLoadError(f"too many pixels: {w}x{h} = {w * h} > limit {max_pixels}", "too_many_pixels")


def _unsupported_format(data: bytes) -> str | None:
    """What a file that no allowed decoder opened is, when it is a known unsupported format."""
    head = data[:512].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if head.startswith(b"<svg") or (head.startswith(b"<?xml") and b"<svg" in data[:4096].lower()):
        return "an SVG file: vector images are not supported, only raster ones"
    if data[4:8] == b"ftyp" and data[8:12] in (b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx"):
        return "a HEIC/HEIF file, an unsupported format"
    if data.startswith(b"\x00\x00\x00\x0cjP  \r\n\x87\n") or data.startswith(b"\xff\x4f\xff\x51"):
        return "a JPEG 2000 file, an unsupported format"
    if data.startswith(b"\xff\x0a") or data.startswith(b"\x00\x00\x00\x0cJXL \r\n\x87\n"):
        return "a JPEG XL file, an unsupported format"
    return None


# 16-bit integer modes: scaled to 8 bits as Pillow decodes 16-bit RGB (48-bit PNG/TIFF) to
# "RGB", by keeping each value's high byte (v >> 8), so that a 16-bit grey image and the
# same values as 16-bit RGB score alike. `convert()` would clip them at 255 instead.
_16BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N"})
# 32-bit integer and float pixels have no fixed range (a float image may hold 0..1, 0..255
# or physical units): no conversion would be right for all, so they are refused.
_UNSUPPORTED_MODES = {
    "I": "32-bit integer pixels, whose range is not fixed",
    "F": "floating-point pixels, whose range is not fixed",
}


def _16bit_to_l(image: Image.Image) -> Image.Image:
    """A 16-bit greyscale image [H, W] -> mode "L", each value's high byte (as Pillow does for 16-bit RGB)."""
    import numpy as np

    values = np.asarray(image).astype(np.uint16, copy=False)  # any byte order -> native
    return Image.fromarray((values >> 8).astype(np.uint8), "L")


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode in _16BIT_MODES:
        return _16bit_to_l(image).convert("RGB")
    if image.mode in _UNSUPPORTED_MODES:
        raise ImageLoadError(
            f"unsupported image mode {image.mode!r} ({_UNSUPPORTED_MODES[image.mode]}); "
            "convert it to 8-bit RGB first",
            "bad_mode",
        )
    try:
        return image.convert("RGB")
    except (ValueError, OSError) as e:
        raise ImageLoadError(f"unsupported image mode {image.mode!r}: {_one_line(e)}", "bad_mode") from None


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
