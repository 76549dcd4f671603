"""Provenance in scoring records: the `provenance` object, the combined `decision` and the flat
CSV columns, added beside a detector record without touching its own fields."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path

from .decision import combine
from .reader import read_provenance
from .types import FLAT_FIELDS, Provenance, ProvenanceLimits, TrustConfig


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
            "decision": combine(provenance, detector_verdict(record))}


def flat_columns(record: dict, provenance: Provenance | None) -> dict:
    """The CSV columns for `record`: the flat provenance fields, `decision`, `decision_basis`."""
    d = combine(provenance, detector_verdict(record))
    return {**(provenance.flat() if provenance else dict.fromkeys(FLAT_FIELDS, "")),
            "decision": d["decision"] or "", "decision_basis": d["basis"]}


def read_files(paths: Iterable[str], trust: TrustConfig | None = None, limits: ProvenanceLimits = ProvenanceLimits(),
               max_bytes: int | None = None, ahead: int = 8) -> Iterator[Provenance | None]:
    """The provenance of each path, in order, read by one background thread up to `ahead`
    files before the consumer (so it overlaps the detector's scoring); None for a file that
    cannot be read or is over `max_bytes` (the detector's record says why)."""
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    def one(path: str) -> Provenance | None:
        try:
            p = Path(path)
            if max_bytes is not None and p.stat().st_size > max_bytes:
                return None
            data = p.read_bytes()
        except OSError:
            return None
        return read_provenance(data, filename=path, trust=trust, limits=limits) if data else None

    it = iter(paths)
    with ThreadPoolExecutor(1, thread_name_prefix="provenance") as pool:
        pending: deque = deque(pool.submit(one, p) for p in islice(it, ahead))
        try:
            while pending:
                result = pending.popleft().result()
                nxt = next(it, None)
                if nxt is not None:
                    pending.append(pool.submit(one, nxt))
                yield result
        finally:
            for fut in pending:
                fut.cancel()
