"""Grid search on stored taps, ranked as the paper ranked its runs: mean ACC + mean AP.

    train  = StoreTaps(FeatureStore.open("feats/train"), preload=None)   # in RAM if it fits
    tests  = [FeatureStore.open("feats/test")]        # a store may hold several test sets
    runs   = run_grid(train, tests, grid_configs(PAPER_GRID, TrainConfig()))
    runs[0].config, runs[0].score                       # the best run

The backbone never runs here: one extraction serves all 48 runs of the paper's grid.
"""

from __future__ import annotations

import csv
import itertools
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from ..data.tap_store import FeatureStore
from .trainer import (
    StoreTaps,
    TrainConfig,
    TrainResult,
    average_precision,
    probabilities,
    score_taps,
    train_head,
)

logger = logging.getLogger(__name__)

# The paper's grid for one backbone and one class set: 4 x 3 x 4 = 48 runs.
PAPER_GRID: dict[str, tuple] = {"factor": (0.1, 0.2, 0.4, 0.8), "nproj": (1, 2, 4), "proj_dim": (128, 256, 512, 1024)}


def grid_configs(grid: dict[str, Sequence], base: TrainConfig | None = None) -> list[TrainConfig]:
    """Every combination of `grid`'s values (keys: TrainConfig fields), in a fixed order."""
    base = base or TrainConfig()
    keys = list(grid)
    return [replace(base, **dict(zip(keys, values, strict=True))) for values in itertools.product(*(grid[k] for k in keys))]


@dataclass
class EvalSet:
    """One test set inside a store: its rows, grouped per item (ten-crop style stores)."""

    name: str
    source: StoreTaps
    positions: np.ndarray  # item positions of this set in `source`


def test_sets(stores: Sequence[FeatureStore | StoreTaps]) -> list[EvalSet]:
    """Split stores into their test sets (a store's `sets` column); names made unique."""
    out: list[EvalSet] = []
    for st in stores:
        src = st if isinstance(st, StoreTaps) else StoreTaps(st, preload=None)
        first_rows = src.rows[:, 0]
        names = np.array([src.store.sets[r] for r in first_rows])
        for name in sorted(set(names.tolist())):
            label = name or src.store.root.name
            if any(e.name == label for e in out):
                label = f"{src.store.root.name}/{label}"
            out.append(EvalSet(label, src, np.nonzero(names == name)[0]))
    return out


def evaluate_sets(head, sets: Sequence[EvalSet]) -> dict[str, dict[str, float]]:
    """{set: {acc, ap, n}}; one pass of the head per store."""
    logits_of: dict[int, np.ndarray] = {}
    out = {}
    for s in sets:
        key = id(s.source)
        if key not in logits_of:
            taps = s.source.cache if s.source.cache is not None else s.source.store.taps
            logits_of[key] = score_taps(head, taps)[s.source.rows].mean(axis=1)  # [items]
        prob = probabilities(logits_of[key][s.positions])  # as the reference: AP on float32 probabilities
        y = s.source.labels[s.positions]
        out[s.name] = {"acc": float(np.mean((prob > 0.5) == (y == 1))), "ap": average_precision(y, prob), "n": int(len(y))}
    return out


@dataclass
class GridRun:
    config: TrainConfig
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    mean_acc: float = 0.0
    mean_ap: float = 0.0
    seconds: float = 0.0
    best_epoch: int = 1

    @property
    def score(self) -> float:
        return self.mean_acc + self.mean_ap

    @property
    def rank_key(self) -> float:
        """The score, with an undefined one (no AP anywhere: NaN) ranked last."""
        return self.score if np.isfinite(self.score) else -np.inf

    def row(self) -> dict:
        c = self.config
        return {"factor": c.factor, "nproj": c.nproj, "proj_dim": c.proj_dim, "epochs": c.epochs, "seed": c.seed,
                "mean_acc": self.mean_acc, "mean_ap": self.mean_ap, "score": self.score,
                "best_epoch": self.best_epoch, "seconds": round(self.seconds, 3)}


def run_grid(
    train: StoreTaps,
    tests: Sequence[FeatureStore | StoreTaps],
    configs: Sequence[TrainConfig],
    val: FeatureStore | StoreTaps | None = None,
    log_path: str | Path | None = None,
) -> tuple[list[GridRun], TrainResult]:
    """Train every config on `train`, evaluate on every test set; return the runs ranked by
    mean ACC + mean AP (best first) and the best run's TrainResult."""
    if not tests:
        raise ValueError("run_grid needs at least one test store to rank the runs")
    sets = test_sets(tests)
    val_src = StoreTaps(val, preload=None) if isinstance(val, FeatureStore) else val
    runs: list[GridRun] = []
    best: tuple[GridRun, TrainResult] | None = None
    log = open(log_path, "w", encoding="utf-8") if log_path else None
    try:
        for i, cfg in enumerate(configs):
            t0 = time.perf_counter()
            res = train_head(train, cfg, val=val_src)
            metrics = evaluate_sets(res.head, sets)
            run = GridRun(cfg, metrics, float(np.mean([m["acc"] for m in metrics.values()])),
                          float(np.nanmean([m["ap"] for m in metrics.values()])),
                          time.perf_counter() - t0, res.best_epoch)
            runs.append(run)
            if best is None or run.rank_key > best[0].rank_key:
                best = (run, res)
            logger.info("run %d/%d %s: acc %.4f ap %.4f", i + 1, len(configs), run.row(), run.mean_acc, run.mean_ap)
            if log:
                log.write(json.dumps({**run.row(), "metrics": metrics}) + "\n")
                log.flush()
    finally:
        if log:
            log.close()
    # A stable sort keeps the grid order between equal scores, so the first ranked run is the
    # one whose head `best` holds (the first to reach the top score).
    ranked = sorted(runs, key=lambda r: -r.rank_key)
    assert ranked[0] is best[0]
    return ranked, best[1]


def write_table(runs: Sequence[GridRun], out_dir: str | Path) -> Path:
    """grid.csv (ranked, one row per run, per-set ACC/AP columns) and grid.json."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    set_names = list(runs[0].metrics) if runs else []
    rows = []
    for rank, r in enumerate(runs, 1):
        row = {"rank": rank, **r.row()}
        for s in set_names:
            row[f"{s}:acc"], row[f"{s}:ap"] = r.metrics[s]["acc"], r.metrics[s]["ap"]
        rows.append(row)
    with open(out / "grid.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["rank"])
        w.writeheader()
        w.writerows(rows)
    payload = [{"rank": i, "config": asdict(r.config), **r.row(), "metrics": r.metrics} for i, r in enumerate(runs, 1)]
    (out / "grid.json").write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    return out / "grid.csv"
