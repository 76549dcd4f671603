"""The output of `rine batch` checked against its input list: every input exactly once.

Scores: the committed `part-NNNNNN.parquet` files of a job folder; taps: the commits of a
feature store. Either way an input (by its `item`, the row of the input list) must have
exactly one record -- a score, or an error -- and that record must carry the input's path.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .manifest import InputList

PART_RE = re.compile(r"^part-(\d{6})\.parquet$")


def part_name(shard: int) -> str:
    return f"part-{shard:06d}.parquet"


def committed_parts(out: Path) -> dict[int, Path]:
    """Shard number -> its committed file (a file is committed once it has its final name)."""
    parts = {}
    for p in out.iterdir() if out.is_dir() else ():
        m = PART_RE.match(p.name)
        if m:
            parts[int(m.group(1))] = p
    return parts


@dataclass
class Reconciliation:
    n_inputs: int
    rows: int = 0  # records found
    errors: int = 0  # of which error records
    missing: list[int] = field(default_factory=list)  # items without a record
    duplicates: list[int] = field(default_factory=list)  # items with more than one
    mismatched: list[int] = field(default_factory=list)  # records whose path is not their input's

    @property
    def scored(self) -> int:
        return self.rows - self.errors

    @property
    def complete(self) -> bool:
        return not (self.missing or self.duplicates or self.mismatched) and self.rows == self.n_inputs

    @property
    def exit_code(self) -> int:
        """0 every input has a score, 1 some are error records, 2 the output is not whole."""
        return 2 if not self.complete else (1 if self.errors else 0)

    def problems(self) -> str:
        out = []
        for name, items in (("missing", self.missing), ("duplicated", self.duplicates), ("with the wrong path", self.mismatched)):
            if items:
                out.append(f"{len(items)} inputs {name} (items {', '.join(map(str, items[:5]))}{', ...' if len(items) > 5 else ''})")
        return "; ".join(out)

    def to_dict(self) -> dict:
        return {"inputs": self.n_inputs, "records": self.rows, "scored": self.scored, "errors": self.errors,
                "missing": len(self.missing), "duplicates": len(self.duplicates), "mismatched": len(self.mismatched),
                "complete": self.complete}


def _check(inputs: InputList, seen: Counter, paths: dict[int, str], errors: int) -> Reconciliation:
    expected = inputs.table.column("path").to_pylist()
    rec = Reconciliation(len(expected), rows=sum(seen.values()), errors=errors)
    rec.missing = [i for i in range(len(expected)) if i not in seen]
    rec.duplicates = sorted(i for i, c in seen.items() if c > 1 or not 0 <= i < len(expected))
    rec.mismatched = sorted(i for i, p in paths.items() if 0 <= i < len(expected) and p != expected[i])
    return rec


def reconcile_parts(out: Path, inputs: InputList) -> Reconciliation:
    """Check the part files of a scoring job folder against `inputs`."""
    import pyarrow.parquet as pq

    seen: Counter = Counter()
    paths: dict[int, str] = {}
    errors = 0
    for _, path in sorted(committed_parts(out).items()):
        table = pq.read_table(path, columns=["item", "path", "error"])
        for item, p, err in zip(*(table.column(c).to_pylist() for c in ("item", "path", "error")), strict=True):
            seen[item] += 1
            paths[item] = p
            errors += err is not None
    return _check(inputs, seen, paths, errors)


def reconcile_store(root: Path, inputs: InputList) -> Reconciliation:
    """Check a feature store written by `rine batch --taps` against `inputs`: each input is
    either all its views' rows or one entry in the store's errors."""
    from ..data.tap_store import FeatureStore

    store = FeatureStore.open(root)
    seen: Counter = Counter()
    paths: dict[int, str] = {}
    views = store.n_views
    for item, count in Counter(store.items.tolist()).items():
        seen[item] += 1 if count == views else count  # a short or long set of views is not one record
        paths[item] = store.item_list[item].path
    errors = 0
    for c in store.commits:
        for item, _ in c["errors"]:
            seen[item] += 1
            paths[item] = store.item_list[item].path
            errors += 1
    return _check(inputs, seen, paths, errors)
