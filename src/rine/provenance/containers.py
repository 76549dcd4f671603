"""Where metadata sits in an image file: a bounded walk over PNG chunks, JPEG segments and
RIFF (WebP) chunks, collecting the raw pieces the readers interpret.

Pillow reads the same pieces, but it stops at the first bad one and drops the rest of the file's
metadata; walking the containers here gives one error per bad piece, and caps (segments, bytes)
that hold on hostile files. No pixel data is decoded.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass, field

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
XMP_JPEG_HEADER = b"http://ns.adobe.com/xap/1.0/\x00"
XMP_EXTENDED_HEADER = b"http://ns.adobe.com/xmp/extension/\x00"
EXIF_HEADER = b"Exif\x00\x00"


@dataclass
class Pieces:
    """The raw metadata of one file. `mime` is None for formats not walked here."""

    mime: str | None = None
    lossless: bool = False
    text_chunks: list[tuple[bytes, bytes]] = field(default_factory=list)  # (chunk type, payload)
    xmp: list[tuple[str, bytes]] = field(default_factory=list)  # (where, packet)
    exif: list[tuple[str, bytes]] = field(default_factory=list)  # (where, TIFF-structured bytes)
    has_jumbf: bool = False  # a C2PA manifest store may be present
    jumbf_box: bool = False  # ... and its container box was seen (not just guessed from bytes)
    errors: list[tuple[str, str]] = field(default_factory=list)  # (where, message)


def sniff(data: bytes) -> str | None:
    """The MIME type by content (c2pa-python wants one), or None."""
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data.startswith(PNG_SIGNATURE):
        return "image/png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "image/tiff"
    if data[4:8] == b"ftyp" and data[8:12] in (b"avif", b"avis"):
        return "image/avif"
    if data[4:8] == b"ftyp" and data[8:12] in (b"heic", b"heix", b"mif1"):
        return "image/heic"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    return None


def walk(data: bytes, max_segments: int) -> Pieces:
    mime = sniff(data)
    pieces = Pieces(mime=mime)
    if mime == "image/png":
        _walk_png(data, pieces, max_segments)
    elif mime == "image/jpeg":
        _walk_jpeg(data, pieces, max_segments)
    elif mime == "image/webp":
        _walk_webp(data, pieces, max_segments)
    else:
        # TIFF, AVIF, HEIC, GIF: XMP by packet scanning (XMP spec part 3, 1.1: the packet wrapper
        # exists so that it can be found without knowing the container), C2PA by c2pa-python.
        pieces.lossless = mime in ("image/tiff", "image/gif")
        start = data.find(b"<x:xmpmeta")
        if start >= 0:
            end = data.find(b"</x:xmpmeta>", start)
            pieces.xmp.append(("xmp-packet", data[start : end + 12] if end > 0 else data[start:]))
        pieces.has_jumbf = b"jumb" in data or b"c2pa" in data
    return pieces


def _chunks(data: bytes, pos: int, container: str, little_endian: bool, pieces: Pieces,
            max_segments: int) -> Iterator[tuple[bytes, bytes]]:
    """(kind, body) of each chunk of a PNG (big-endian length, then kind, then a 4-byte CRC) or
    a WebP RIFF (kind, then little-endian size, bodies padded to even): the same bounded walk,
    a truncated chunk or too many of them an error in `pieces`."""
    n = 0
    while pos + 8 <= len(data):
        n += 1
        if n > max_segments:
            pieces.errors.append((container, f"more than {max_segments} chunks; the rest was not read"))
            return
        if little_endian:
            kind, size = struct.unpack("<4sI", data[pos : pos + 8])
        else:
            size, kind = struct.unpack(">I4s", data[pos : pos + 8])
        body = data[pos + 8 : pos + 8 + size]
        if len(body) < size:
            pieces.errors.append((f"{container}:{_name(kind)}", f"chunk truncated ({len(body)} of {size} bytes)"))
            return
        yield kind, body
        pos += 8 + size + ((size & 1) if little_endian else 4)


def _walk_png(data: bytes, pieces: Pieces, max_segments: int) -> None:
    pieces.lossless = True
    for kind, body in _chunks(data, len(PNG_SIGNATURE), "png", False, pieces, max_segments):
        if kind in (b"tEXt", b"zTXt", b"iTXt"):
            pieces.text_chunks.append((kind, body))
        elif kind == b"eXIf":
            pieces.exif.append(("png:eXIf", body))
        elif kind == b"caBX":  # C2PA's PNG chunk (C2PA 2.x spec, "Embedding manifests into PNG")
            pieces.has_jumbf = pieces.jumbf_box = True
        elif kind == b"IEND":
            return


def _walk_jpeg(data: bytes, pieces: Pieces, max_segments: int) -> None:
    pos, n = 2, 0
    while pos + 4 <= len(data):
        n += 1
        if n > max_segments:
            pieces.errors.append(("jpeg", f"more than {max_segments} segments; the rest was not read"))
            return
        if data[pos] != 0xFF:
            pieces.errors.append(("jpeg", f"no segment marker at byte {pos}; the rest was not read"))
            return
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            pos += 2
            continue
        if marker in (0xDA, 0xD9):  # start of scan: metadata sits before it
            return
        (length,) = struct.unpack(">H", data[pos + 2 : pos + 4])
        body = data[pos + 4 : pos + 2 + length]
        if length < 2 or len(body) < length - 2:
            pieces.errors.append((f"jpeg:APP{marker - 0xE0}" if 0xE0 <= marker <= 0xEF else "jpeg",
                                  f"segment truncated ({len(body)} of {max(length - 2, 0)} bytes)"))
            return
        if marker == 0xE1 and body.startswith(XMP_JPEG_HEADER):
            pieces.xmp.append(("jpeg:APP1", body[len(XMP_JPEG_HEADER) :]))
        elif marker == 0xE1 and body.startswith(XMP_EXTENDED_HEADER):
            pieces.errors.append(("jpeg:APP1", "extended XMP is not read (only the main packet)"))
        elif marker == 0xE1 and body.startswith(EXIF_HEADER):
            pieces.exif.append(("jpeg:APP1", body[len(EXIF_HEADER) :]))
        elif marker == 0xEB and body[:2] == b"JP":  # APP11 JUMBF (ISO 19566-5), where C2PA lives
            pieces.has_jumbf = pieces.jumbf_box = True
        pos += 2 + length


def _walk_webp(data: bytes, pieces: Pieces, max_segments: int) -> None:
    for kind, body in _chunks(data, 12, "webp", True, pieces, max_segments):
        if kind == b"VP8L":
            pieces.lossless = True
        elif kind == b"XMP ":
            pieces.xmp.append(("webp:XMP", body))
        elif kind == b"EXIF":
            pieces.exif.append(("webp:EXIF", body[6:] if body.startswith(EXIF_HEADER) else body))
        elif kind == b"C2PA":
            pieces.has_jumbf = pieces.jumbf_box = True


def _name(kind: bytes) -> str:
    return kind.decode("latin-1") if kind.isalnum() else kind.hex()
