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
from ..data.reencode import REENCODINGS
from ..metrics import (
    bootstrap_ci,
    compute_metrics,
    deployment_metrics,
    expected_calibration_error,
    mean_deployment_metrics,
    mean_metrics,
)
from ..model.calibration import DecisionRule, expit
from ..model.head import RINEHead


@dataclass
class EvalHead:
    """A named head to score with; `config` is its RINEConfig when known."""

    name: str
    head: RINEHead
    config: RINEConfig | None = None


@dataclass(frozen=True)
class Condition:
    """An evaluation transform: clean (`kind=None`), a seeded robustness perturbation, or
    (`reencode`, with `kind=None`) one of `--stability`'s re-encodings (`rine.data.reencode`),
    applied to every image."""

    kind: str | None = None
    seed: int = 0
    quirks: str = "none"
    p: float = 0.5
    reencode: str | None = None

    def __post_init__(self) -> None:
        if self.quirks not in QUIRKS:
            raise ValueError(f"quirks must be one of {QUIRKS}")
        if self.reencode is not None:
            if self.kind is not None:
                raise ValueError("a condition is either a perturbation or a re-encoding, not both")
            if self.reencode not in REENCODINGS:
                raise ValueError(f"unknown re-encoding {self.reencode!r}; choose from {', '.join(REENCODINGS)}")

    @property
    def is_clean(self) -> bool:
        return self.kind is None and self.reencode is None

    @property
    def id(self) -> str:
        if self.reencode is not None:
            return f"reencode-{self.reencode}"
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
        return self.head if self.condition.is_clean else f"{self.head}/{self.condition.id}"


@dataclass
class EvalResult:
    """Every run of an evaluation; `stability` ({head: report}, `evaluation.stability`) when
    it ran with the re-encodings of `--stability`."""

    runs: list[RunResult]
    sets: list[str]
    meta: dict[str, Any] = field(default_factory=dict)
    stability: dict[str, Any] = field(default_factory=dict)


def metrics_of(
    records: dict[str, list[dict[str, Any]]],
    threshold: float = 0.5,
    bootstrap: int = 0,
    seed: int = 0,
    calibrated: bool = False,
    rule: DecisionRule | None = None,
) -> dict[str, Any]:
    """{"sets": {name: metrics}, "mean": {...}} from prediction records (errors excluded).

    Decisions are the records' own: `rule` (rine.model.calibration.DecisionRule; None: the
    plain cut at `threshold`) applied to each record's head `logit`, and Brier and NLL come
    from the (calibrated) logits in float64. Records without a logit fall back to
    `prob_fake > threshold`. `bootstrap` N > 0 adds seeded 95 % intervals `acc_ci`, `ap_ci`,
    `auc_ci` per set; `calibrated` (prob_fake is a calibrated probability) adds
    `ece_uncalibrated`, the ECE of sigmoid(logit), the head's own probability."""
    import numpy as np

    rule = DecisionRule(threshold=threshold) if rule is None else rule
    threshold = rule.threshold
    per_set = {}
    for name, recs in records.items():
        ok = [r for r in recs if r["error"] is None]
        labels, probs = [r["label"] for r in ok], [r["prob_fake"] for r in ok]
        flags = logits = None
        if all(r.get("logit") is not None for r in ok):
            head_logits = np.asarray([r["logit"] for r in ok], dtype=np.float64)
            flags, logits = rule.flags(head_logits), rule.calibrated_logits(head_logits)
        m = compute_metrics(labels, probs, threshold, flags)
        m.update(deployment_metrics(labels, probs, threshold, flags, logits))
        if calibrated and ok:
            raw = expit(np.asarray([r["logit"] for r in ok], dtype=np.float64))
            m["ece_uncalibrated"] = expected_calibration_error(labels, raw)
        if bootstrap:
            m.update(bootstrap_ci(labels, probs, bootstrap, seed, threshold, flags=flags))
        m["n_errors"] = len(recs) - len(ok)
        # counts on disk, readable or not: what the layout found
        m["n_real_listed"] = sum(1 for r in recs if r["label"] == 0)
        m["n_fake_listed"] = sum(1 for r in recs if r["label"] == 1)
        per_set[name] = m
    mean = mean_metrics(per_set)
    mean.update(mean_deployment_metrics(per_set))
    return {"sets": per_set, "mean": mean, "threshold": threshold}
