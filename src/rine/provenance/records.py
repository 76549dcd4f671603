"""Provenance in scoring records: the `provenance` object, the combined `decision` and the flat
CSV columns, added beside a detector record without touching its own fields."""

from __future__ import annotations

from .decision import combine
from .types import FLAT_FIELDS, Provenance

CSV_FIELDS = (*FLAT_FIELDS, "decision", "decision_basis")


def detector_verdict(record: dict) -> str | None:
    """The detector's verdict in a record: `verdict` when calibrated, else from `is_fake`;
    None for an error record."""
    if record.get("error"):
        return None
    if record.get("verdict"):
        return record["verdict"]
    return None if record.get("is_fake") is None else ("synthetic" if record["is_fake"] else "real")


def with_provenance(record: dict, provenance: Provenance | None) -> dict:
    """`record` plus `provenance` (its dict, or None when it was not read) and `decision`
    ({"decision", "basis", "declared"}). The detector's fields are copied unchanged."""
    return {**record, "provenance": provenance.to_dict() if provenance else None,
            "decision": combine(provenance, detector_verdict(record))}  # fmt: skip


def flat_columns(record: dict, provenance: Provenance | None) -> dict:
    """The CSV columns for `record`: the flat provenance fields, `decision`, `decision_basis`."""
    d = combine(provenance, detector_verdict(record))
    return {**(provenance.flat() if provenance else dict.fromkeys(FLAT_FIELDS, "")),
            "decision": d["decision"] or "", "decision_basis": d["basis"]}  # fmt: skip
