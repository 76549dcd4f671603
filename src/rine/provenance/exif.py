"""EXIF -> signals: `Software`, camera `Make`/`Model`, and A1111's generation parameters, which
it writes into `UserComment` for JPEG and WebP (modules/images.py, via piexif).

EXIF is parsed by Pillow (`Image.Exif.load`) from the raw TIFF-structured bytes the container
walk found; a corrupt block becomes a signal with an error.
"""

from __future__ import annotations

import threading
import warnings

from .catalogue import software_generator
from .pngtext import a1111_parameters
from .types import ProvenanceLimits, Signal, cap

SOFTWARE, MAKE, MODEL, EXIF_IFD, USER_COMMENT = 0x0131, 0x010F, 0x0110, 0x8769, 0x9286
A1111_SOURCE = "AUTOMATIC1111 Stable Diffusion WebUI"
# warnings.catch_warnings swaps process-wide state (the filters and showwarning): two threads
# inside it at once can restore each other's state out of order and leave a recorder
# installed for good, which then swallows and keeps every later warning of the process.
# Provenance is read from several threads (detect's read-ahead, the server's pool).
_WARNINGS_LOCK = threading.Lock()


def _user_comment(raw: object) -> str | None:
    """EXIF UserComment: an 8-byte character code, then the text (UNICODE is UTF-16; piexif
    writes it big-endian, others little-endian)."""
    if isinstance(raw, str):
        return raw
    if not isinstance(raw, bytes) or len(raw) < 8:
        return None
    code, body = raw[:8], raw[8:]
    if code.startswith(b"UNICODE"):
        be, le = body.decode("utf-16-be", "replace"), body.decode("utf-16-le", "replace")
        return be if be.isascii() or sum(c.isascii() for c in be) >= sum(c.isascii() for c in le) else le
    return body.decode("utf-8", "replace")


def read(blocks: list[tuple[str, bytes]], limits: ProvenanceLimits) -> list[Signal]:
    from PIL import Image

    signals: list[Signal] = []
    for where, raw in blocks:
        if len(raw) > limits.max_exif_bytes:
            signals.append(Signal("exif", where, error=f"EXIF of {len(raw)} bytes is over the {limits.max_exif_bytes}-byte cap; not read"))
            continue
        exif = Image.Exif()
        try:
            with _WARNINGS_LOCK, warnings.catch_warnings(record=True) as caught:  # Pillow only warns on some damage
                warnings.simplefilter("always")
                exif.load(raw)
                sub = exif.get_ifd(EXIF_IFD)
        except Exception as e:  # Pillow raises many kinds on corrupt TIFF structures
            signals.append(Signal("exif", where, error=f"corrupt EXIF ({type(e).__name__}: {cap(e, 80)})"))
            continue
        damage = [str(w.message) for w in caught if "EXIF" in str(w.message) or "TIFF" in str(w.message)]
        if damage:
            signals.append(Signal("exif", where, error=f"corrupt EXIF ({cap(damage[0], 100)}); read what was intact"))
        software = exif.get(SOFTWARE)
        if isinstance(software, str) and software.strip():
            gen = software_generator(software)
            signals.append(Signal("exif", "exif:Software", value=cap(software, limits.max_value_chars),
                                  generator=gen, source_type="trainedAlgorithmicMedia" if gen else None))
        camera = " ".join(str(exif.get(t, "")).strip() for t in (MAKE, MODEL)).strip()
        if camera:
            # a camera name is not a capture claim: any editor keeps or writes it
            signals.append(Signal("exif", "exif:Make/Model", value=cap(camera, limits.max_value_chars)))
        comment = _user_comment(sub.get(USER_COMMENT))
        if comment and "Steps:" in comment and "Sampler:" in comment:
            signals.append(Signal("exif", "exif:UserComment", value=cap(comment, limits.max_value_chars),
                                  generator=A1111_SOURCE, source_type="trainedAlgorithmicMedia",
                                  parameters=a1111_parameters(comment[: limits.max_text_bytes], limits.max_value_chars)))
    return signals
