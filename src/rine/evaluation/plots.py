"""PNG plots of evaluation runs (matplotlib, Agg backend, imported only when plotting).

Per run: `acc_ap.png` (ACC and AP per test set, with the mean), `roc.png` (ROC curve
of every set with both classes), `block_importance.png` (the head's TIE weight per
encoder block). For several runs: `summary_acc_ap.png` (mean ACC / AP per run).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .metrics import roc_curve

if TYPE_CHECKING:
    from .results import EvalResult, RunResult


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)  # files only: never open a window or need a display
    import matplotlib.pyplot as plt

    return plt


def _acc_ap_bars(ax, labels: list[str], metrics: list[dict], legend: tuple[str, str], rotation: int) -> None:
    """Paired ACC/AP bars in % per label; an undefined AP is left as a gap."""
    acc = [100 * (m.get("acc") or 0.0) for m in metrics]
    ap = [100 * m["ap"] if m.get("ap") is not None else np.nan for m in metrics]
    x = np.arange(len(labels))
    ax.bar(x - 0.2, acc, 0.4, label=legend[0])
    ax.bar(x + 0.2, ap, 0.4, label=legend[1])
    ax.set_xticks(x, labels, rotation=rotation, ha="right", fontsize=8)
    ax.set_ylim(0, 100)
    ax.set_ylabel("%")


def plot_acc_ap(run: RunResult, path: Path) -> Path:
    plt = _plt()
    sets = [*run.metrics["sets"], "mean"]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.55 * len(sets) + 2), 4))
    _acc_ap_bars(ax, sets, [*run.metrics["sets"].values(), run.metrics["mean"]], ("ACC", "AP"), rotation=60)
    ax.set_title(f"{run.name}: accuracy (0.5) and average precision per test set")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_roc(run: RunResult, path: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 5))
    for name, recs in run.records.items():
        ok = [r for r in recs if r["error"] is None]
        y = np.array([r["label"] for r in ok])
        if y.size == 0 or y.all() or not y.any():
            continue  # ROC undefined with one class
        fpr, tpr, _ = roc_curve(y, [r["prob_fake"] for r in ok])
        auc = run.metrics["sets"][name].get("auc")
        ax.plot(fpr, tpr, lw=1, label=f"{name} ({100 * auc:.1f})" if auc is not None else name)
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set_xlabel("false positive rate (real called fake)")
    ax.set_ylabel("true positive rate (fake caught)")
    ax.set_title(f"{run.name}: ROC (AUC %)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=6, loc="lower right", ncol=1 + len(run.records) // 12)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_block_importance(importance: list[float], path: Path, title: str = "") -> Path:
    """importance [blocks] (sums to 1) -> line plot over block index (1-based)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    blocks = np.arange(1, len(importance) + 1)
    ax.plot(blocks, importance, marker="o")
    ax.axhline(1.0 / max(len(importance), 1), color="grey", ls=":", lw=0.8, label="uniform")
    ax.set_xlabel("encoder block")
    ax.set_ylabel("importance (mean softmax weight)")
    ax.set_title(title or "Trainable Importance Estimator")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_run(run: RunResult, folder: Path) -> list[Path]:
    out = [plot_acc_ap(run, folder / "acc_ap.png"), plot_roc(run, folder / "roc.png")]
    if run.block_importance:
        out.append(
            plot_block_importance(
                run.block_importance,
                folder / "block_importance.png",
                f"{run.head}: block importance",
            )
        )
    return out


def plot_summary(result: EvalResult, folder: Path) -> list[Path]:
    plt = _plt()
    names = [r.name for r in result.runs]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.8 * len(names) + 2), 4))
    _acc_ap_bars(ax, names, [r.metrics["mean"] for r in result.runs], ("mean ACC", "mean AP"), rotation=45)
    ax.legend(loc="lower right")
    fig.tight_layout()
    path = folder / "summary_acc_ap.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return [path]
