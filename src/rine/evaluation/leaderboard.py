"""Benchmark tables in the layout their leaderboards publish, from prediction records.

OpenSDID (`opensdi_table_markdown`): one row per model, image-level F1 (fake positive,
`prob_fake > 0.5`, as IMDLBenCo's ImageF1) and accuracy per split, then their unweighted
averages over the splits, four decimals, the columns of the OpenSDI leaderboard:

    | Method | SD1.5 F1 | SD1.5 Acc | SD2.1 F1 | ... | Flux.1 Acc | AVG F1 | AVG Acc |

Chameleon-like imbalanced sets (`balanced_table_markdown`): balanced accuracy (the mean
of real and fake accuracy) beside plain accuracy and the counts, so that a detector that
calls everything real does not look good.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..fileio import atomic_write
from ..metrics import accuracy, class_accuracy, f1
from .results import RunResult

LEADERBOARD_THRESHOLD = 0.5  # the leaderboard's, whatever --threshold the rest of the run used


def split_scores(records: Sequence[dict[str, Any]], threshold: float = LEADERBOARD_THRESHOLD) -> dict[str, Any]:
    """F1 / accuracy / balanced accuracy of one set's records (errors left out)."""
    ok = [r for r in records if r["error"] is None]
    y = [r["label"] for r in ok]
    s = [r["prob_fake"] for r in ok]
    out: dict[str, Any] = {"n": len(ok), "n_errors": len(records) - len(ok)}
    out["f1"] = f1(y, s, threshold) if ok else None
    out["acc"] = accuracy(y, s, threshold) if ok else None
    real, fake = class_accuracy(y, s, 0, threshold), class_accuracy(y, s, 1, threshold)
    out["acc_real"], out["acc_fake"] = real, fake
    out["balanced_acc"] = None if real is None or fake is None else (real + fake) / 2
    return out


def _mean(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals and len(vals) == len(values) else None


def _f(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"


def opensdi_rows(runs: Sequence[RunResult], splits: Sequence[str]) -> list[dict[str, Any]]:
    """Per run: {"method", split: {"f1", "acc", ...}, "avg_f1", "avg_acc"} over the splits present."""
    rows = []
    for run in runs:
        row: dict[str, Any] = {"method": run.name}
        present = [s for s in splits if s in run.records]
        for s in present:
            row[s] = split_scores(run.records[s])
        # the leaderboard's AVG: unweighted over the splits (each split counts once)
        row["avg_f1"] = _mean([row[s]["f1"] for s in present])
        row["avg_acc"] = _mean([row[s]["acc"] for s in present])
        rows.append(row)
    return rows


def opensdi_table_markdown(runs: Sequence[RunResult], splits: Sequence[str], labels: dict[str, str]) -> str:
    present = [s for s in splits if any(s in r.records for r in runs)]
    head = ["Method"] + [f"{labels.get(s, s)} {m}" for s in present for m in ("F1", "Acc")] + ["AVG F1", "AVG Acc"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for row in opensdi_rows(runs, present):
        cells = [row["method"]]
        for s in present:
            cells += [_f(row.get(s, {}).get("f1")), _f(row.get(s, {}).get("acc"))]
        cells += [_f(row["avg_f1"]), _f(row["avg_acc"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def balanced_table_markdown(runs: Sequence[RunResult], sets: Sequence[str], threshold: float = 0.5) -> str:
    lines = ["| Method | Set | Real | Fake | Balanced Acc | Acc | Real Acc | Fake Acc |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for run in runs:
        for s in sets:
            if s not in run.records:
                continue
            recs = run.records[s]
            sc = split_scores(recs, threshold)
            n_real = sum(1 for r in recs if r["label"] == 0)
            lines.append(f"| {run.name} | {s} | {n_real} | {len(recs) - n_real} | {_f(sc['balanced_acc'])} | "
                         f"{_f(sc['acc'])} | {_f(sc['acc_real'])} | {_f(sc['acc_fake'])} |")
    return "\n".join(lines) + "\n"


def write_suite_table(runs: Sequence[RunResult], sets: Sequence[str], table: str, out_dir: str | Path,
                      labels: dict[str, str] | None = None, threshold: float = 0.5) -> Path | None:
    """Write `leaderboard.md` (table "opensdi") or `balanced.md` (table "balanced") into
    `out_dir`; other tables ("paper") are the engine's own table.md. Returns the file."""
    if table == "opensdi":
        path, text = Path(out_dir) / "leaderboard.md", opensdi_table_markdown(runs, sets, labels or {})
    elif table == "balanced":
        path, text = Path(out_dir) / "balanced.md", balanced_table_markdown(runs, sets, threshold)
    else:
        return None
    atomic_write(path, text)
    return path
