"""What `rine eval` writes: metrics.json, predictions.jsonl, the paper's table (markdown, CSV), plots.

One run: its files directly in the output folder. Several runs (heads x conditions): a
folder per run plus summary.md / summary.csv / summary.json.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..fileio import atomic_file, atomic_write
from ..metrics import DEPLOYMENT_KEYS, mean_text, sets_counted
from .results import EvalResult, RunResult

TABLE_METRICS = ("acc", "ap", "auc", "acc_real", "acc_fake", "f1", "ece", "acc_best")


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}"


def _partial_note(means: Sequence[dict[str, Any]], keys: Sequence[str]) -> str:
    """A line saying which means are over fewer sets than there are ("" if none)."""
    parts = sorted({f"{k} over {sets_counted(m, k)} of {m['n_sets']}" for m in means for k in keys
                    if m.get(k) is not None and sets_counted(m, k) != m.get("n_sets")})
    if not parts:
        return ""
    return ("Partial means: " + ", ".join(parts) + " sets (the metric is undefined on the others, "
            "e.g. AP on a set with one class; see the notes).\n")


def paper_table_markdown(runs: Sequence[RunResult], sets: Sequence[str]) -> str:
    """The paper's layout: one row per model, one column per test set, cells "ACC / AP" in %."""
    head = ["model", *sets, "mean"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for run in runs:
        cells = [run.name]
        for s in sets:
            m = run.metrics["sets"].get(s, {})
            cells.append(f"{_pct(m.get('acc'))} / {_pct(m.get('ap'))}")
        mean = run.metrics["mean"]
        cells.append(f"{mean_text(mean, 'acc')} / {mean_text(mean, 'ap')}")
        lines.append("| " + " | ".join(cells) + " |")
    note = _partial_note([run.metrics["mean"] for run in runs], ("acc", "ap"))
    return ("\n".join(lines) + "\n\nCells: ACC / AP in % (accuracy at 0.5, average precision); n/a: undefined.\n"
            + note)


def detail_table_markdown(run: RunResult) -> str:
    """One row per set (and the mean): counts and every metric in %."""
    cols = ["set", "n_real", "n_fake", "n_errors", *TABLE_METRICS]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    rows = [*run.metrics["sets"].items(), ("mean", run.metrics["mean"])]
    for name, m in rows:
        vals = [
            name,
            str(m.get("n_real", "")),
            str(m.get("n_fake", "")),
            str(m.get("n_errors", "")),
        ]
        vals += [mean_text(m, k) if name == "mean" else _pct(m.get(k)) for k in TABLE_METRICS]
        lines.append("| " + " | ".join(vals) + " |")
    notes = [
        f"- {name}: {'; '.join(m['notes'])}"
        for name, m in run.metrics["sets"].items()
        if m.get("notes")
    ]
    note = _partial_note([run.metrics["mean"]], TABLE_METRICS)
    return ("\n".join(lines) + "\n" + ("\n" + note if note else "")
            + ("\nNotes:\n" + "\n".join(notes) + "\n" if notes else ""))


def write_paper_csv(path: Path, runs: Sequence[RunResult], sets: Sequence[str]) -> None:
    """CSV of the paper's layout: model, then `<set> ACC`, `<set> AP` per set and the mean (in %)."""
    with atomic_file(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["model", *[f"{s} {k}" for s in [*sets, "mean"] for k in ("ACC", "AP")]])
        for run in runs:
            row = [run.name]
            for s in [*sets, None]:
                m = run.metrics["mean"] if s is None else run.metrics["sets"].get(s, {})
                row += [_round(m.get("acc")), _round(m.get("ap"))]
            w.writerow(row)


def _round(v: float | None) -> str:
    return "" if v is None else f"{100 * v:.2f}"


def write_run(run: RunResult, folder: Path, meta: dict[str, Any], plots: bool = True) -> list[Path]:
    """metrics.json, predictions.jsonl, table.md/csv, metrics.csv and plots of one run."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    metrics = {**run.metrics, "model": run.head, "condition": run.condition.id, "meta": meta}
    atomic_write(folder / "metrics.json", json.dumps(metrics, indent=2, ensure_ascii=False) + "\n")
    with atomic_file(folder / "predictions.jsonl") as tmp, open(tmp, "w", encoding="utf-8") as f:
        for recs in run.records.values():
            for r in recs:
                # `key` (the path relative to the data root) too: rine calibrate --predictions
                # fingerprints the images by it, as when it scores the folder itself.
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    sets = list(run.records)
    atomic_write(folder / "table.md", paper_table_markdown([run], sets) + "\n" + detail_table_markdown(run))
    write_paper_csv(folder / "table.csv", [run], sets)
    with atomic_file(folder / "metrics.csv") as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        cols = ["set", "n_real", "n_fake", "n_errors", *TABLE_METRICS, *DEPLOYMENT_KEYS]
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for name, m in [*run.metrics["sets"].items(), ("mean", run.metrics["mean"])]:
            w.writerow(
                {"set": name, **{k: ("" if m.get(k) is None else m.get(k)) for k in cols[1:]}}
            )
    written += [
        folder / n
        for n in ("metrics.json", "predictions.jsonl", "table.md", "table.csv", "metrics.csv")
    ]
    if plots:
        from .plots import plot_run

        written += plot_run(run, folder)
    return written


def write_outputs(result: EvalResult, out_dir: str | Path, plots: bool = True) -> list[Path]:
    """One run: its files directly in `out_dir`. Several runs (heads x conditions): one
    folder per run (`<head>/<condition>`) plus `summary.md`/`summary.csv`/`summary.json`."""
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "eval_config.json", json.dumps(result.meta, indent=2, ensure_ascii=False) + "\n")
    if len(result.runs) == 1:
        return write_run(result.runs[0], out, result.meta, plots)
    written = _write_stability(result, out)
    for run in result.runs:
        written += write_run(run, out / _safe(run.head) / run.condition.id, result.meta, plots)
    atomic_write(out / "summary.md", paper_table_markdown(result.runs, result.sets))
    write_paper_csv(out / "summary.csv", result.runs, result.sets)
    summary = {
        run.name: {"mean": run.metrics["mean"], "sets": run.metrics["sets"]} for run in result.runs
    }
    atomic_write(out / "summary.json", json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    if plots:
        from .plots import plot_summary

        written += plot_summary(result, out)
    return written + [out / "summary.md", out / "summary.csv", out / "summary.json"]


def _write_stability(result: EvalResult, out: Path) -> list[Path]:
    """stability.md / stability.json of a `--stability` run (nothing otherwise)."""
    if not result.stability:
        return []
    from .stability import stability_markdown

    atomic_write(out / "stability.md", stability_markdown(result.stability))
    atomic_write(out / "stability.json", json.dumps(result.stability, indent=2, ensure_ascii=False) + "\n")
    return [out / "stability.md", out / "stability.json"]


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_.") or "model"
