"""`rine eval --stability`: how often an everyday re-encoding flips a call, and what abstaining buys.

Per set and head, from the clean run's records and one run per re-encoding
(`Condition(reencode=name)`, `rine.data.reencode`), at two thresholds:

  paper   the paper's: sigmoid(head logit) > 0.5 (float32, as the reference)
  model   the head's own rule (`engine.head_rule`): the calibrated cut of a calibrated model,
          its config's threshold otherwise, `--threshold` replacing either

an image's call *flips* under a condition when the re-encoded image's call differs from the
file's. Reported: the fraction of images each condition flips (`flip_rate`), the fraction
flipped by any (`any_flip`), and the selective-prediction table: `coverage` (the share of
stable images, those no condition flips, which a detector abstaining on the others keeps),
`acc_stable` (accuracy of the file's call on them), `acc_all` (on every image) and
`acc_unstable` (on the images abstained on). Images with an error in any of the runs are
left out of all of it. Set means are unweighted means over the sets where a value exists.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..model.calibration import DecisionRule
from .results import EvalResult, RunResult

RULES = ("paper", "model")
FIELDS = ("coverage", "acc_stable", "acc_all", "acc_unstable", "any_flip")


def _acc(calls: np.ndarray, labels: np.ndarray) -> float | None:
    return float(np.mean(calls == labels)) if calls.size else None


def set_stability(
    clean: Sequence[Mapping[str, Any]], under: Mapping[str, Sequence[Mapping[str, Any]]], rule: DecisionRule
) -> dict[str, Any]:
    """One set's records as they are and under each condition (same images, same order) ->
    {"n", "n_stable", "flip_rate": {condition: fraction}, "any_flip", "coverage",
    "acc_stable", "acc_all", "acc_unstable"}, calls made by `rule` on the head logits."""
    for name, recs in under.items():
        if len(recs) != len(clean) or any(a["path"] != b["path"] for a, b in zip(clean, recs, strict=True)):
            raise ValueError(f"the records under {name} are not those of the clean run (other images or order)")
    ok = [i for i, r in enumerate(clean) if r["error"] is None and all(u[i]["error"] is None for u in under.values())]
    labels = np.asarray([clean[i]["label"] for i in ok], dtype=bool)
    calls = rule.flags(np.asarray([clean[i]["logit"] for i in ok], dtype=np.float64)) if ok else np.zeros(0, bool)
    flipped = {name: rule.flags(np.asarray([u[i]["logit"] for i in ok], dtype=np.float64)) != calls if ok
               else np.zeros(0, bool) for name, u in under.items()}
    unstable = np.logical_or.reduce(list(flipped.values())) if flipped else np.zeros(len(ok), bool)
    n = len(ok)
    return {
        "n": n,
        "n_stable": int(n - unstable.sum()),
        "flip_rate": {name: float(f.mean()) if n else None for name, f in flipped.items()},
        "any_flip": float(unstable.mean()) if n else None,
        "coverage": float(1 - unstable.mean()) if n else None,
        "acc_stable": _acc(calls[~unstable], labels[~unstable]),
        "acc_all": _acc(calls, labels),
        "acc_unstable": _acc(calls[unstable], labels[unstable]),
    }


def _mean(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


def stability_report(
    clean: RunResult, under: Mapping[str, RunResult], rules: Mapping[str, DecisionRule]
) -> dict[str, Any]:
    """One head: its clean run and its run under each re-encoding -> per rule {"threshold",
    "calibrated", "sets": {name: set_stability}, "mean": {...}}."""
    out: dict[str, Any] = {"conditions": list(under), "rules": {}}
    for rname, rule in rules.items():
        sets = {s: set_stability(recs, {c: r.records[s] for c, r in under.items()}, rule)
                for s, recs in clean.records.items()}
        mean: dict[str, Any] = {f: _mean([m[f] for m in sets.values()]) for f in FIELDS}
        mean["flip_rate"] = {c: _mean([m["flip_rate"][c] for m in sets.values()]) for c in under}
        mean["n"] = sum(m["n"] for m in sets.values())
        mean["n_stable"] = sum(m["n_stable"] for m in sets.values())
        out["rules"][rname] = {"threshold": rule.threshold, "calibrated": rule.calibration is not None,
                               "sets": sets, "mean": mean}
    return out


def paper_rule() -> DecisionRule:
    """The paper's call: float32 sigmoid(logit) > 0.5, no calibration."""
    return DecisionRule(threshold=0.5)


def result_stability(result: EvalResult, rules_of: Mapping[str, DecisionRule]) -> dict[str, Any]:
    """Every head of an evaluation with re-encoding runs -> {head: stability_report}.

    `rules_of`: head name -> its own rule (the "model" threshold)."""
    out = {}
    for head, own in rules_of.items():
        runs = [r for r in result.runs if r.head == head]
        clean = next((r for r in runs if r.condition.is_clean), None)
        under = {r.condition.reencode: r for r in runs if r.condition.reencode is not None}
        if clean is None or not under:
            continue
        out[head] = stability_report(clean, under, {"paper": paper_rule(), "model": own})
    return out


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}"


def stability_markdown(report: Mapping[str, Any]) -> str:
    """{head: stability_report} -> markdown: per head and rule, a row per set and the mean."""
    blocks = []
    for head, rep in report.items():
        conds = rep["conditions"]
        cols = ["set", "n", *[f"flips {c}" for c in conds], "any flip", "coverage", "acc stable", "acc all",
                "acc abstained"]
        for rname, r in rep["rules"].items():
            label = "paper, p > 0.5" if rname == "paper" else (
                f"model's own, p > {r['threshold']:.4g}" + (" (calibrated)" if r["calibrated"] else ""))
            lines = [f"### {head}: stability at the {label}", "",
                     "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
            for name, m in [*r["sets"].items(), ("mean", r["mean"])]:
                cells = [name, str(m["n"]), *[_pct(m["flip_rate"][c]) for c in conds],
                         *[_pct(m[f]) for f in ("any_flip", "coverage", "acc_stable", "acc_all", "acc_unstable")]]
                lines.append("| " + " | ".join(cells) + " |")
            blocks.append("\n".join(lines))
    note = ("\nflips: % of images whose call the re-encoding changes; coverage: % of images no re-encoding "
            "flips (kept when abstaining on the others); acc stable / all / abstained: accuracy of the file's "
            "own call on the kept images, on all, on the abstained ones (%). Conditions: docs/stability.md.\n")
    return "\n\n".join(blocks) + "\n" + note if blocks else ""
