"""`read_provenance(data)`: every reader over one file's bytes, and the strongest declaration.

Precedence (the first that declares a source type decides `digital_source_type`):

1. a C2PA manifest that is valid and chains to a configured trust anchor (`verified`);
2. a C2PA manifest with a valid signature and hard binding, signer not in the trust list;
3. XMP `Iptc4xmpExt:DigitalSourceType`;
4. a known invisible watermark (SD/SDXL dwtDct);
5. generator parameters and signatures (PNG text chunks, EXIF UserComment/Software, XMP
   CreatorTool);
6. a C2PA manifest that failed validation (altered after signing, bad signature).

Only 1 is a verified fact; 2-6 are declarations anyone could write (or strip), shown as such.
A signal with an error declares nothing. Each reader is bounded (`ProvenanceLimits`); one that
fails or is skipped leaves a signal with an error, and the others still run.
"""

from __future__ import annotations

import mimetypes
import time
from typing import TYPE_CHECKING

from . import containers, credentials, exif, pngtext, watermark, xmp
from .types import Provenance, ProvenanceLimits, Signal, TrustConfig

if TYPE_CHECKING:
    import numpy as np

NOTHING_FOUND = ("no provenance metadata found; absence proves nothing (most platforms and editors "
                 "strip metadata)")


def rank(signal: Signal) -> int:
    """The signal's place in the precedence above (0 strongest)."""
    if signal.kind == "c2pa":
        if signal.verified:
            return 0
        return 1 if signal.validation_state in ("Valid", "Trusted") and not _hard_failures(signal) else 5
    if signal.kind == "xmp" and "DigitalSourceType" in signal.where:
        return 2
    if signal.kind == "watermark":
        return 3
    return 4  # generator parameters and software signatures


def _hard_failures(signal: Signal) -> list[str]:
    return [c for c in signal.failed_codes or [] if c != "signingCredential.untrusted"]


def missing_readers() -> list[str]:
    out = []
    if not credentials.available():
        out.append(credentials.MISSING)
    return out


def read_provenance(data: bytes, *, filename: str | None = None, trust: TrustConfig | None = None,
                    limits: ProvenanceLimits = ProvenanceLimits(), pixels: np.ndarray | None = None) -> Provenance:
    """What `data` (one image file's bytes) declares about its origin, verified where possible.
    `filename` helps only where the content names no format; `pixels`: the file's decoded RGB
    pixels ([H, W, 3] uint8, as the detector's decoder gives them), so that the watermark check
    does not decode them again. Never raises on file content: unreadable pieces become signals
    with an error."""
    trust = trust or TrustConfig()
    missing = missing_readers()
    if len(data) > limits.max_file_bytes:
        return Provenance(reason=f"not read: the file is over the {limits.max_file_bytes}-byte cap", missing=missing)
    start = time.monotonic()
    pieces = containers.walk(data, limits.max_segments)
    mime = pieces.mime or (mimetypes.guess_type(filename)[0] if filename else None)
    # damage in the container itself (a truncated chunk, a segment loop): kind "container"
    signals: list[Signal] = [Signal("container", where, error=msg) for where, msg in pieces.errors]

    def spent(kind: str, where: str) -> bool:
        if time.monotonic() - start <= limits.time_budget_s:
            return False
        signals.append(Signal(kind, where, error=f"skipped: the {limits.time_budget_s:g} s time budget was spent"))
        return True

    c2pa_signal = None
    if pieces.has_jumbf and mime and credentials.available() and not spent("c2pa", "c2pa:manifest-store"):
        c2pa_signal = credentials.read(data, mime, trust, limits, expected=pieces.jumbf_box)
        if c2pa_signal:
            signals.append(c2pa_signal)
    text_signals, xmp_packets = pngtext.read(pieces.text_chunks, limits) if pieces.text_chunks else ([], [])
    signals += text_signals
    packets = [*pieces.xmp, *(("png:iTXt:XML:com.adobe.xmp", p) for p in xmp_packets)]
    if packets and not spent("xmp", "xmp"):
        signals += xmp.read(packets, limits)
    if pieces.exif and not spent("exif", "exif"):
        signals += exif.read(pieces.exif, limits)
    if pieces.lossless and limits.watermark and not spent("watermark", "watermark:dwtDct"):
        found = watermark.read(data, limits, pixels=pixels)
        if found:
            signals.append(found)
    if len(signals) > limits.max_signals:
        dropped = len(signals) - limits.max_signals + 1
        signals = [*signals[: limits.max_signals - 1],
                   Signal("container", "signals", error=f"{dropped} more signals not listed")]
    return _summarise(signals, c2pa_signal, trust, missing)


def _summarise(signals: list[Signal], c2pa_signal: Signal | None, trust: TrustConfig,
               missing: list[str]) -> Provenance:
    declaring = sorted((s for s in signals if s.source_type and not s.error), key=rank)
    top = declaring[0] if declaring else None
    generator = (top.generator if top else None) or next((s.generator for s in signals if s.generator), None)
    if c2pa_signal is not None:
        reason = credentials.why_not(c2pa_signal, trust)
        if top is not None and top is not c2pa_signal:
            reason += f"; the declaration shown is from {top.where}, unverified"
    elif top is not None and top.kind == "watermark":
        reason = f"found {top.where}, unverified: a watermark can be forged, and re-encoding removes it"
    elif top is not None:
        reason = f"declared by {top.where}, unverified: anyone can write (or remove) this metadata"
    else:
        reason = NOTHING_FOUND
    return Provenance(
        digital_source_type=top.source_type if top else None,
        verified=bool(top and top.verified),
        reason=reason,
        basis=top.where if top else None,
        signer=c2pa_signal.signer if c2pa_signal else None,
        generator=generator,
        signals=signals,
        missing=missing,
    )
