"""The report of `rine calibrate`: calibration.md, reliability.png and histograms.png.

    text = write_report(out_dir, fit, logits, labels, model="rine-vitl14-4class", spread=cuts)

The markdown says what was fitted, on what, the guarantee (target FPR), the rates achieved
on the calibration images with their intervals, and how far the cut moves under the
bootstrap; the PNGs (matplotlib, Agg) show the per-class score histograms with the cut,
and, with labels, the reliability diagram before and after calibration.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..fileio import atomic_write
from ..metrics import brier_score, expected_calibration_error, log_loss
from ..model.calibration import expit
from .calibration import CalibrationFit


def _pct(rate: dict[str, Any] | None) -> str:
    if not rate:
        return "-"
    lo, hi = rate["ci"]
    return f"{100 * rate['value']:.2f} % | {100 * lo:.2f}-{100 * hi:.2f} % | {rate.get('n', '')}"


def report_markdown(
    fit: CalibrationFit,
    logits: np.ndarray,
    labels: np.ndarray | None,
    model: str,
    spread: np.ndarray | None = None,
    files: tuple[str, ...] = (),
) -> str:
    cal = fit.config
    z = np.asarray(logits, dtype=np.float64)
    on = cal.fitted_on
    lines = [f"# Calibration of {model}", ""]
    what = {"threshold": "a new cut (probabilities unchanged)", "temperature": "temperature scaling",
            "platt": "Platt scaling", "prior-shift": "an unsupervised logit offset (prior shift)"}[cal.method]
    lines.append(f"- method: **{cal.method}**, {what}: calibrated logit = {cal.scale:.6g} * logit + {cal.offset:.6g}")
    lines.append(
        f"- decision: synthetic when the calibrated probability is above **{cal.threshold:.6g}** "
        f"(calibrated logit > {cal.threshold_logit:.6g}; head logit > {fit.boundary:.6g})"
    )
    if cal.target:
        lines.append("- target: " + ", ".join(f"{k} {v:.6g}" if isinstance(v, float) else f"{k} {v}"
                                              for k, v in cal.target.items()))
    if cal.uncertain_low is not None:
        lines.append(f"- uncertain: probabilities in [{cal.uncertain_low:.6g}, {cal.uncertain_high:.6g}] get the verdict "
                     "`uncertain`")
    counts = f"{on.get('n', z.size)} images"
    if on.get("n_real") is not None:
        counts += f" ({on['n_real']} real, {on.get('n_fake', 0)} fake)"
    sets = on.get("sets")
    lines.append(f"- fitted on: {counts}" + (f" from {', '.join(sets)}" if sets else "")
                 + (f", file list {on['fingerprint']}" if on.get("fingerprint") else ""))
    if cal.guarantee:
        lines += ["", f"**Guarantee.** {cal.guarantee} This holds for images drawn like the calibration "
                  "images (same source, same processing); it says nothing about other sources.", ""]
    rates = cal.rates
    rows = [(name, rates.get(key)) for name, key in (("false-positive rate (reals flagged)", "fpr"),
            ("true-positive rate (fakes flagged)", "tpr"), ("accuracy", "accuracy"), ("flagged", "flagged_rate"))]
    rows = [r for r in rows if r[1]]
    if rows:
        conf = rates.get("confidence", 0.95)
        lines += ["", f"On the calibration images (in-sample; {conf:.0%} exact binomial intervals):", "",
                  "| rate | value | interval | images |", "|---|---|---|---|"]
        lines += [f"| {name} | {_pct(r)} |" for name, r in rows]
    if labels is not None and np.any(labels == 0) and np.any(labels == 1):
        before, after = expit(z), expit(cal.scale * z + cal.offset)
        lines += ["", "| probability quality (in-sample) | before | after |", "|---|---|---|"]
        for name, fn in (("ECE", expected_calibration_error), ("NLL", log_loss), ("Brier", brier_score)):
            lines.append(f"| {name} | {fn(labels, before):.4f} | {fn(labels, after):.4f} |")
    if spread is not None and spread.size:
        lo, hi = np.quantile(spread, [0.025, 0.975])
        p = expit(cal.scale * np.array([lo, hi]) + cal.offset)
        lines += ["", f"Stability: refitted on {spread.size} bootstrap resamples of these images, the cut "
                  f"(head logit) falls in [{lo:.4g}, {hi:.4g}] (95 %), probabilities [{p[0]:.4g}, {p[1]:.4g}]; "
                  "more calibration images narrow it (docs/calibration.md)."]
    if files:
        lines += ["", "Plots: " + ", ".join(files)]
    return "\n".join(lines) + "\n"


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_histograms(path: Path, fit: CalibrationFit, logits: np.ndarray, labels: np.ndarray | None) -> Path:
    """Head logits per class (or all, unlabelled) with the cut and the uncertain band."""
    plt = _plt()
    z = np.asarray(logits, dtype=np.float64)
    fig, ax = plt.subplots(figsize=(7, 4))
    bins = np.linspace(z.min(), z.max(), 41) if z.max() > z.min() else 10
    groups = [("all images", z, "tab:gray")] if labels is None else [
        (name, z[labels == c], color) for name, c, color in (("real", 0, "tab:blue"), ("fake", 1, "tab:red"))
        if np.any(labels == c)]
    for name, vals, color in groups:
        ax.hist(vals, bins=bins, alpha=0.55, color=color, label=f"{name} ({vals.size})")
    ax.axvline(fit.boundary, color="black", linestyle="--", label="cut")
    cal = fit.config
    if cal.uncertain_low is not None:
        lo, hi = (np.log(np.clip([cal.uncertain_low, cal.uncertain_high], 1e-15, 1 - 1e-15))
                  - np.log1p(-np.clip([cal.uncertain_low, cal.uncertain_high], 1e-15, 1 - 1e-15)))
        ax.axvspan((lo - cal.offset) / cal.scale, (hi - cal.offset) / cal.scale, color="gold", alpha=0.3, label="uncertain")
    ax.set_xlabel("head logit")
    ax.set_ylabel("images")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_reliability(path: Path, fit: CalibrationFit, logits: np.ndarray, labels: np.ndarray, n_bins: int = 10) -> Path:
    """Fraction of fakes against the mean predicted probability per bin, before and after."""
    plt = _plt()
    z = np.asarray(logits, dtype=np.float64)
    cal = fit.config
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], color="gray", linewidth=1, label="perfect")
    edges = np.linspace(0, 1, n_bins + 1)
    for name, p in (("before", expit(z)), ("after", expit(cal.scale * z + cal.offset))):
        idx = np.clip(np.searchsorted(edges, p, side="right") - 1, 0, n_bins - 1)
        xs, ys = [], []
        for b in range(n_bins):
            m = idx == b
            if m.any():
                xs.append(p[m].mean())
                ys.append(labels[m].mean())
        ax.plot(xs, ys, marker="o", label=name)
    ax.set_xlabel("predicted probability of fake")
    ax.set_ylabel("fraction of fakes")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(
    out_dir: str | Path,
    fit: CalibrationFit,
    logits: np.ndarray,
    labels: np.ndarray | None,
    model: str,
    spread: np.ndarray | None = None,
    plots: bool = True,
) -> str:
    """Write calibration.md (+ the PNGs) into `out_dir`; returns the markdown."""
    out = Path(out_dir)
    files: list[str] = []
    if plots:
        plot_histograms(out / "histograms.png", fit, logits, labels)
        files.append("histograms.png")
        if labels is not None and np.any(labels == 0) and np.any(labels == 1):
            plot_reliability(out / "reliability.png", fit, logits, labels)
            files.append("reliability.png")
    text = report_markdown(fit, logits, labels, model, spread, tuple(files))
    atomic_write(out / "calibration.md", text)
    return text
