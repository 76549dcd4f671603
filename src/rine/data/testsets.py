"""The types every layout reader returns: named test sets of (path, label), label 0 real / 1 fake.

Apart from `layouts.py` so that the Parquet reader (`parquet.py`) and the folder layouts
can use them without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .scan import Skipped

REAL, FAKE = 0, 1


class LayoutError(ValueError):
    """The data root does not follow the layout; the message names the offending path."""


@dataclass
class TestSet:
    """One test set: `items` are (path, label) pairs in a stable (sorted) order."""

    __test__ = False  # not a pytest class, despite the name

    name: str
    items: list[tuple[str, int]]
    # Where the images are when `items[i][0]` is not a file path: a `ParquetSource`
    # (`iter_images()` yields each item's bytes, path or RowError in item order).
    source: Any = None
    # What the folder scans of this set's folders passed over (hidden files, other formats).
    skipped: Skipped = field(default_factory=Skipped)

    @property
    def n_real(self) -> int:
        return sum(1 for _, y in self.items if y == REAL)

    @property
    def n_fake(self) -> int:
        return sum(1 for _, y in self.items if y == FAKE)


@dataclass
class LayoutResult:
    """The sets found under `root`; `missing` names the expected sets that were absent."""

    layout: str
    root: Path
    sets: list[TestSet]
    missing: list[str] = field(default_factory=list)
