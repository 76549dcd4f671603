"""What an evaluation produces: the heads and conditions it ran, prediction records and metrics.

A run is one (head, condition); its `records` are {set name: [record]} with the keys
path, set, label, prob_fake, logit, error, key (and `perturbed` under a perturbation), and
its `metrics` are {"sets": {name: metrics}, "mean": {...}, "threshold": t}. The scoring,
the files written and the plots all depend on these types, never on each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..config import RINEConfig
from ..data.perturb import QUIRKS, transform_id
from ..model.head import RINEHead
from .metrics import compute_metrics, mean_metrics


@dataclass
class EvalHead:
    """A named head to score with; `config` is its RINEConfig when known."""

    name: str
    head: RINEHead
    config: RINEConfig | None = None


@dataclass(frozen=True)
class Condition:
    """An evaluation transform: clean (`kind=None`) or a seeded robustness perturbation."""

    kind: str | None = None
    seed: int = 0
    quirks: str = "none"
    p: float = 0.5

    def __post_init__(self) -> None:
        if self.quirks not in QUIRKS:
            raise ValueError(f"quirks must be one of {QUIRKS}")

    @property
    def id(self) -> str:
        return transform_id(self.kind, self.seed, self.quirks, self.p)


@dataclass
class RunResult:
    """One (head, condition): prediction records per set, then `metrics` {"sets", "mean"}."""

    head: str
    condition: Condition
    records: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    block_importance: list[float] | None = None

    @property
    def name(self) -> str:
        return self.head if self.condition.kind is None else f"{self.head}/{self.condition.id}"


@dataclass
class EvalResult:
    runs: list[RunResult]
    sets: list[str]
    meta: dict[str, Any] = field(default_factory=dict)


def metrics_of(records: dict[str, list[dict[str, Any]]], threshold: float = 0.5) -> dict[str, Any]:
    """{"sets": {name: metrics}, "mean": {...}} from prediction records (errors excluded)."""
    per_set = {}
    for name, recs in records.items():
        ok = [r for r in recs if r["error"] is None]
        m = compute_metrics([r["label"] for r in ok], [r["prob_fake"] for r in ok], threshold)
        m["n_errors"] = len(recs) - len(ok)
        # counts on disk, readable or not: what the layout found
        m["n_real_listed"] = sum(1 for r in recs if r["label"] == 0)
        m["n_fake_listed"] = sum(1 for r in recs if r["label"] == 1)
        per_set[name] = m
    return {"sets": per_set, "mean": mean_metrics(per_set), "threshold": threshold}
