"""PNG plots of evaluation runs (matplotlib, Agg backend, imported only when plotting).

Per run: `acc_ap.png` (ACC and AP per test set, with the mean), `roc.png` (ROC curve
of every set with both classes, with its size; the one-class sets left out are named),
`block_importance.png` (the head's TIE weight per encoder block). For several runs:
`summary_acc_ap.png` (mean ACC / AP per run). An undefined value is written "n/a" where
its bar would be (never drawn as 0); a mean over fewer sets than the run has says so
under its label. Legends sit outside the axes, clear of the bars.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..metrics import roc_curve, sets_counted

if TYPE_CHECKING:
    from .results import EvalResult, RunResult


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)  # files only: never open a window or need a display
    import matplotlib.pyplot as plt

    return plt


def _acc_ap_bars(ax, labels: list[str], metrics: list[dict], legend: tuple[str, str], rotation: int) -> None:
    """Paired ACC/AP bars in % per label; an undefined value gets no bar and an "n/a" mark."""
    x = np.arange(len(labels))
    for offset, key, name in ((-0.2, "acc", legend[0]), (0.2, "ap", legend[1])):
        values = [100 * m[key] if m.get(key) is not None else np.nan for m in metrics]
        ax.bar(x + offset, values, 0.4, label=name)
        for xi, v in zip(x, values, strict=True):
            if np.isnan(v):
                ax.text(xi + offset, 1, "n/a", rotation=90, ha="center", va="bottom", fontsize=7, color="dimgrey")
    ax.set_xticks(x, labels, rotation=rotation, ha="right", fontsize=8)
    ax.set_ylim(0, 100)
    ax.set_ylabel("%")
    # Above the axes, not over the bars (the mean's bars are the last, at the right).
    ax.legend(loc="lower right", bbox_to_anchor=(1.0, 1.0), ncol=2, fontsize=8, frameon=False)


def _mean_label(mean: dict) -> str:
    """ "mean", or "mean\n(AP: 6 of 9 sets)" when a mean is over fewer sets than the run has."""
    partial = [f"{k.upper()}: {sets_counted(mean, k)} of {mean['n_sets']} sets" for k in ("acc", "ap")
               if mean.get(k) is not None and sets_counted(mean, k) != mean.get("n_sets")]
    return "mean" + (f"\n({', '.join(partial)})" if partial else "")


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=120, bbox_inches="tight")  # "tight": the legends outside the axes are kept
    _plt().close(fig)
    return path


def acc_ap_figure(run: RunResult):
    """The figure of `acc_ap.png` (matplotlib Figure)."""
    plt = _plt()
    mean = run.metrics["mean"]
    labels = [*run.metrics["sets"], _mean_label(mean)]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.55 * len(labels) + 2), 4))
    _acc_ap_bars(ax, labels, [*run.metrics["sets"].values(), mean], ("ACC", "AP"), rotation=60)
    ax.set_title(f"{run.name}: accuracy (0.5) and average precision per test set", loc="left", pad=18)
    fig.tight_layout()
    return fig


def plot_acc_ap(run: RunResult, path: Path) -> Path:
    return _save(acc_ap_figure(run), path)


def roc_figure(run: RunResult):
    """The figure of `roc.png`: one curve per set with both classes, "name (AUC %, n real/fake)"
    in the legend; the sets with one class only (no ROC) are named under the axes."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 5))
    left_out = []
    for name, recs in run.records.items():
        ok = [r for r in recs if r["error"] is None]
        y = np.array([r["label"] for r in ok])
        if y.size == 0 or y.all() or not y.any():
            left_out.append(name)  # ROC undefined with one class
            continue
        fpr, tpr, _ = roc_curve(y, [r["prob_fake"] for r in ok])
        auc = run.metrics["sets"][name].get("auc")
        size = f"{int((y == 0).sum())}/{int(y.sum())}"
        ax.plot(fpr, tpr, lw=1, label=f"{name} ({100 * auc:.1f}; {size})" if auc is not None else f"{name} ({size})")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set_xlabel("false positive rate (real called fake)")
    ax.set_ylabel("true positive rate (fake caught)")
    ax.set_title(f"{run.name}: ROC (legend: AUC %; real/fake images)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=6, loc="lower right", ncol=1 + len(run.records) // 12)
    if left_out:
        fig.text(0.01, 0.005, f"left out (one class only, no ROC): {', '.join(left_out)}", fontsize=7,
                 ha="left", va="bottom", wrap=True)
    fig.tight_layout(rect=(0, 0.04 if left_out else 0, 1, 1))
    return fig


def plot_roc(run: RunResult, path: Path) -> Path:
    return _save(roc_figure(run), path)


def block_importance_figure(importance: list[float], title: str = ""):
    """importance [blocks] (sums to 1) -> line plot over block number (1-based, whole numbers)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    blocks = np.arange(1, len(importance) + 1)
    ax.plot(blocks, importance, marker="o")
    ax.set_xticks(blocks if len(blocks) <= 32 else blocks[:: -(-len(blocks) // 24)])  # whole block numbers
    ax.axhline(1.0 / max(len(importance), 1), color="grey", ls=":", lw=0.8, label="uniform")
    ax.set_xlabel("encoder block")
    ax.set_ylabel("importance (mean softmax weight)")
    ax.set_title(title or "Trainable Importance Estimator")
    ax.legend()
    fig.tight_layout()
    return fig


def plot_block_importance(importance: list[float], path: Path, title: str = "") -> Path:
    return _save(block_importance_figure(importance, title), path)


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
    means = [r.metrics["mean"] for r in result.runs]
    labels = [name + _mean_label(m).removeprefix("mean") for name, m in zip(names, means, strict=True)]
    _acc_ap_bars(ax, labels, means, ("mean ACC", "mean AP"), rotation=45)
    fig.tight_layout()
    return [_save(fig, folder / "summary_acc_ap.png")]
