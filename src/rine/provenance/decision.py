"""The combined decision: provenance beside the detector's verdict.

A verified declaration decides: a verified generated or composite claim -> `synthetic`; a
verified capture with no generative action -> `real`. Otherwise the detector's verdict stands,
and unverified declarations are shown beside it (`declared`), never overriding it. The
detector's own fields are not touched; `rine eval` never calls this (a benchmark measures the
detector).
"""

from __future__ import annotations

from .types import CAPTURED, GENERATED, Provenance


def combine(provenance: Provenance | None, detector_verdict: str | None) -> dict:
    """{"decision": "synthetic" | "real" | the detector's verdict | None, "basis": words,
    "declared": the unverified declaration or None}. `detector_verdict` is the detector's
    `verdict` (or "synthetic"/"real" from `is_fake`); None when the file was not scored."""
    term = provenance.digital_source_type if provenance else None
    if provenance and provenance.verified and term in GENERATED:
        return {"decision": "synthetic", "basis": f"verified C2PA declaration: {term} ({provenance.signer})",
                "declared": term}
    if provenance and provenance.verified and term in CAPTURED and not _generative_action(provenance):
        return {"decision": "real", "basis": f"verified C2PA declaration: {term} ({provenance.signer})",
                "declared": term}
    basis = "detector" if detector_verdict is not None else "none: the file was not scored"
    if term:
        basis += f"; unverified declaration beside it: {term} ({provenance.basis})"
    return {"decision": detector_verdict, "basis": basis, "declared": term}


def _generative_action(provenance: Provenance) -> bool:
    return any(a.get("digitalSourceType") in GENERATED
               for s in provenance.signals if s.kind == "c2pa" for a in s.actions or [])
