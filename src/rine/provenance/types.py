"""The values the provenance readers produce: `Signal` (one piece of evidence) and `Provenance`
(all of them, and the strongest declaration), plus the caps and the trust configuration."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

IPTC_PREFIX = "http://cv.iptc.org/newscodes/digitalsourcetype/"
TRUST_ENV = "RINE_TRUST_ANCHORS"

# IPTC NewsCodes digital source types (https://cv.iptc.org/newscodes/digitalsourcetype/)
GENERATED = frozenset({"trainedAlgorithmicMedia", "compositeWithTrainedAlgorithmicMedia",
                       "algorithmicMedia", "compositeSynthetic"})
CAPTURED = frozenset({"digitalCapture", "computationalCapture", "negativeFilm", "positiveFilm", "print"})


def short_source_type(value: object) -> str | None:
    """`http://cv.iptc.org/newscodes/digitalsourcetype/digitalCapture` -> `digitalCapture`
    (also the older `.../digitalsourcetype/` spellings with a trailing slash); None for
    anything that is not a plain term (so hostile text never becomes a declaration)."""
    if not isinstance(value, str):
        return None
    term = value.strip().rstrip("/").rsplit("/", 1)[-1]
    return term if term.isascii() and term.isalnum() and 0 < len(term) <= 64 else None


def cap(text: object, limit: int) -> str | None:
    """`text` as one line of at most `limit` characters (an ellipsis marks the cut)."""
    if text is None:
        return None
    s = str(text).replace("\r", " ").replace("\n", " ").replace("\x00", " ")
    return s if len(s) <= limit else s[: limit - 1] + "…"


@dataclass(frozen=True)
class ProvenanceLimits:
    """Caps on what the readers look at, so that hostile metadata costs bounded time and memory.

    A file over `max_file_bytes` is not searched at all (the decoder refuses it too). Text
    chunks, XMP packets and JSON are read up to their caps and reported with an error beyond."""

    max_file_bytes: int = 64 * 1024 * 1024
    max_segments: int = 2048  # PNG chunks / JPEG segments / RIFF chunks walked
    max_text_bytes: int = 1024 * 1024  # one text chunk, after decompression
    max_total_text_bytes: int = 8 * 1024 * 1024  # all text chunks of a file, after decompression
    max_xmp_bytes: int = 1024 * 1024
    max_exif_bytes: int = 1024 * 1024  # a JPEG APP1 holds 64 KB; PNG eXIf and WebP EXIF are unbounded
    max_xml_depth: int = 48
    max_xml_elements: int = 20_000
    max_value_chars: int = 240  # a signal's shown value
    max_signals: int = 64
    watermark: bool = True
    watermark_max_pixels: int = 16_000_000  # files decoded for the watermark alone
    watermark_rows: int = 1024  # the top band read (see watermark.py: full-width rows keep block numbers)
    time_budget_s: float = 2.0  # readers not yet started when it is spent are skipped, and say so


@dataclass(frozen=True)
class TrustConfig:
    """Trust anchors for C2PA: PEM root certificates. A manifest is `verified` only when its
    signing certificate chains to one of them; with none configured nothing is verified."""

    anchors_pem: str | None = None
    source: str | None = None  # where the anchors came from, for messages

    @classmethod
    def from_file(cls, path: str | Path) -> TrustConfig:
        """Raises ValueError naming the file when it is unreadable or holds no certificate."""
        p = Path(path)
        try:
            text = p.read_text(encoding="ascii", errors="strict")
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"cannot read trust anchors {p}: {e}") from e
        if "-----BEGIN CERTIFICATE-----" not in text:
            raise ValueError(f"{p} holds no PEM certificate (expected -----BEGIN CERTIFICATE----- blocks)")
        return cls(anchors_pem=text, source=str(p))

    @classmethod
    def resolve(cls, path: str | Path | None) -> TrustConfig:
        """The anchors from `path`, else from $RINE_TRUST_ANCHORS, else none."""
        chosen = path or os.environ.get(TRUST_ENV) or None
        return cls.from_file(chosen) if chosen else cls()

    @property
    def configured(self) -> bool:
        return bool(self.anchors_pem)


@dataclass
class Signal:
    """One piece of evidence: what was found, where, and whether it is verified.

    `where` names the place in the file (`c2pa:active-manifest`, `png:parameters`,
    `xmp:Iptc4xmpExt:DigitalSourceType`, `exif:Software`, `watermark:dwtDct`); `value` is a
    short capped text; `source_type` is the IPTC term this signal declares, if any; `error`
    says why the signal could not be read (the other signals still count)."""

    kind: str  # c2pa | xmp | png-text | exif | watermark | container (damage in the file's structure)
    where: str
    value: str | None = None
    generator: str | None = None
    source_type: str | None = None
    verified: bool = False
    error: str | None = None
    parameters: dict | None = None  # generator parameters (prompt, seed, model, ...), capped
    # C2PA only
    signer: str | None = None
    claim_generator: str | None = None
    actions: list[dict] | None = None  # [{"action", "digitalSourceType", "softwareAgent"}]
    validation_state: str | None = None  # Trusted | Valid | Invalid (c2pa-python's words)
    failed_codes: list[str] | None = None

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None or k in ("value", "error")}


@dataclass
class Provenance:
    """Everything one file declares about its origin.

    `digital_source_type` is the strongest declaration by the precedence in `reader.py`;
    `verified` is true only for a valid C2PA manifest signed under a configured trust anchor;
    `reason` says in words why (or why not); `basis` names the signal that decided;
    `missing` lists readers not installed here, each with how to add it."""

    digital_source_type: str | None = None
    verified: bool = False
    reason: str = ""
    basis: str | None = None
    signer: str | None = None
    generator: str | None = None
    signals: list[Signal] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        """For JSON records (field names are part of the record format)."""
        return {
            "digital_source_type": self.digital_source_type,
            "verified": self.verified,
            "reason": self.reason,
            "basis": self.basis,
            "signer": self.signer,
            "generator": self.generator,
            "signals": [s.to_dict() for s in self.signals],
            "missing": list(self.missing),
        }

    @classmethod
    def from_dict(cls, d: dict) -> Provenance:
        """The inverse of `to_dict` (a `rine batch` row carries the JSON between its tasks)."""
        return cls(**{**d, "signals": [Signal(**s) for s in d.get("signals", [])], "missing": list(d.get("missing", []))})

    def flat(self) -> dict:
        """For CSV columns: scalars only; the signals as `kind:where` joined by `;`."""
        return {
            "provenance_source_type": self.digital_source_type or "",
            "provenance_verified": self.verified,
            "provenance_signer": self.signer or "",
            "provenance_generator": self.generator or "",
            "provenance_basis": self.basis or "",
            "provenance_reason": self.reason,
            "provenance_signals": ";".join(
                f"{s.kind}:{s.where}" + ("!" if s.error else "") for s in self.signals
            ),
        }


FLAT_FIELDS = tuple(Provenance().flat())
# the columns a CSV row gets: the flat provenance, then the combined decision and its basis
CSV_FIELDS = (*FLAT_FIELDS, "decision", "decision_basis")
