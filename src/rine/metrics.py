"""Binary detection metrics as plain functions (label 1 = fake, score = P(fake)).

Same definitions as scikit-learn (tested against it), in NumPy so that the core
needs no scikit-learn. Accuracy uses `score > threshold`, as the reference does
(`accuracy_score(y, y_score > 0.5)`), so a score of exactly 0.5 counts as real, unless
`flags` (the decisions a rule made on the logits, what the records say) are given: a cut
far out in the tail is exact as a logit but 1.0 as a probability, so `rine eval` passes
the rule's flags and the logits (`brier_from_logits`, `log_loss_from_logits`).
A metric that is undefined on the given labels (AP with no fake image, AUC with one
class) or trivial on them (AP and the oracle-threshold `acc_best`, 100 % whatever the
scores on a one-class set) is returned as None by `compute_metrics`, with the reason in
`notes`, and left out of the means.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

ArrayLike = Sequence[float] | np.ndarray


def _arrays(y_true: ArrayLike, y_score: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true, dtype=np.int64).ravel()
    s = np.asarray(y_score, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"{y.size} labels but {s.size} scores")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be 0 (real) or 1 (fake)")
    return y, s


def _predicted(s: np.ndarray, threshold: float, flags: ArrayLike | None) -> np.ndarray:
    """Predicted fake [N] (bool): the given decisions, else `score > threshold`."""
    if flags is None:
        return s > threshold
    pred = np.asarray(flags, dtype=bool).ravel()
    if pred.shape != s.shape:
        raise ValueError(f"{s.size} scores but {pred.size} decisions")
    return pred


def accuracy(y_true: ArrayLike, y_score: ArrayLike, threshold: float = 0.5, flags: ArrayLike | None = None) -> float:
    """Fraction correct with `score > threshold` (or `flags`) predicted fake."""
    y, s = _arrays(y_true, y_score)
    pred = _predicted(s, threshold, flags)
    return float(np.mean(pred.astype(np.int64) == y)) if y.size else float("nan")


def class_accuracy(
    y_true: ArrayLike, y_score: ArrayLike, label: int, threshold: float = 0.5, flags: ArrayLike | None = None
) -> float | None:
    """Accuracy restricted to images of `label` (recall of that class); None if there are none."""
    y, s = _arrays(y_true, y_score)
    pred = _predicted(s, threshold, flags)
    m = y == label
    return float(np.mean(pred[m].astype(np.int64) == label)) if m.any() else None


def f1(y_true: ArrayLike, y_score: ArrayLike, threshold: float = 0.5, flags: ArrayLike | None = None) -> float | None:
    """F1 of the fake class; None when there is no fake image and no fake prediction."""
    y, s = _arrays(y_true, y_score)
    pred = _predicted(s, threshold, flags)
    tp = int(np.sum(pred & (y == 1)))
    fp = int(np.sum(pred & (y == 0)))
    fn = int(np.sum(~pred & (y == 1)))
    return 2 * tp / (2 * tp + fp + fn) if (tp + fp + fn) else None


def _binary_clf_curve(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cumulative (fp, tp) at each distinct score, highest first; tied scores form one step."""
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last_of_run = np.r_[np.flatnonzero(np.diff(s)), y.size - 1]
    tps = np.cumsum(y)[last_of_run]
    fps = (last_of_run + 1) - tps
    return fps, tps, s[last_of_run]


def average_precision(y_true: ArrayLike, y_score: ArrayLike) -> float | None:
    """scikit-learn's `average_precision_score`: sum over thresholds of
    (R_n - R_{n-1}) * P_n, without interpolation. None if there is no fake image."""
    y, s = _arrays(y_true, y_score)
    if not y.any():
        return None
    fps, tps, _ = _binary_clf_curve(y, s)
    precision = tps / (tps + fps)
    recall = tps / tps[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def roc_curve(y_true: ArrayLike, y_score: ArrayLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) starting at (0, 0), one point per distinct score."""
    y, s = _arrays(y_true, y_score)
    fps, tps, thr = _binary_clf_curve(y, s)
    fps, tps = np.r_[0, fps], np.r_[0, tps]
    n_neg, n_pos = max(int(fps[-1]), 1), max(int(tps[-1]), 1)
    return fps / n_neg, tps / n_pos, np.r_[np.inf, thr]


def roc_auc(y_true: ArrayLike, y_score: ArrayLike) -> float | None:
    """Area under the ROC curve (ties count one half); None unless both classes are present."""
    y, s = _arrays(y_true, y_score)
    if y.all() or not y.any():
        return None
    fpr, tpr, _ = roc_curve(y, s)
    return float(np.trapezoid(tpr, fpr))


def expected_calibration_error(y_true: ArrayLike, y_score: ArrayLike, n_bins: int = 15) -> float:
    """Top-label ECE (Guo et al. 2017): the confidence max(p, 1-p) of the predicted class is
    binned in `n_bins` equal-width bins of [0, 1]; sum of |accuracy - confidence| weighted
    by the bin's share of images."""
    y, s = _arrays(y_true, y_score)
    if not y.size:
        return float("nan")
    pred = (s > 0.5).astype(np.int64)
    conf = np.where(pred == 1, s, 1.0 - s)
    correct = (pred == y).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, n_bins - 1)
    ece = 0.0
    for b in np.unique(idx):
        m = idx == b
        ece += m.mean() * abs(correct[m].mean() - conf[m].mean())
    return float(ece)


def best_threshold_accuracy(y_true: ArrayLike, y_score: ArrayLike) -> float:
    """Accuracy at the best threshold chosen on the same scores (an oracle, as sidbench reports)."""
    y, s = _arrays(y_true, y_score)
    fps, tps, _ = _binary_clf_curve(y, s)
    n_neg = int(y.size - y.sum())
    # predicting fake for the top-k scores: correct = tp + (negatives not flagged)
    correct = np.r_[n_neg, tps + (n_neg - fps)]
    return float(correct.max() / y.size) if y.size else float("nan")


METRIC_KEYS = ("acc", "ap", "auc", "acc_real", "acc_fake", "f1", "ece", "acc_best")


def compute_metrics(
    y_true: ArrayLike, y_score: ArrayLike, threshold: float = 0.5, flags: ArrayLike | None = None
) -> dict[str, Any]:
    """All metrics of one test set; undefined ones are None and explained in `notes`.
    `flags` [N] (bool): the decisions, when they were made on logits (see the module doc)."""
    y, s = _arrays(y_true, y_score)
    n_real, n_fake = int(np.sum(y == 0)), int(np.sum(y == 1))
    out: dict[str, Any] = {"n_real": n_real, "n_fake": n_fake, "n": int(y.size)}
    notes: list[str] = []
    if y.size == 0:
        out.update({k: None for k in METRIC_KEYS})
        out["notes"] = ["no scored image"]
        return out
    out["acc"] = accuracy(y, s, threshold, flags)
    # With one class AP is 1 or undefined whatever the scores, so it is reported as None.
    out["ap"] = average_precision(y, s) if n_real and n_fake else None
    out["auc"] = roc_auc(y, s)
    out["acc_real"] = class_accuracy(y, s, 0, threshold, flags)
    out["acc_fake"] = class_accuracy(y, s, 1, threshold, flags)
    out["f1"] = f1(y, s, threshold, flags)
    out["ece"] = expected_calibration_error(y, s)
    # One class: a threshold beyond every score is right on every image, so the oracle
    # accuracy is 100 % whatever the scores -- it would only inflate the mean.
    out["acc_best"] = best_threshold_accuracy(y, s) if n_real and n_fake else None
    if n_fake == 0:
        notes.append("only real images: ap, auc, acc_fake, acc_best undefined")
    elif n_real == 0:
        notes.append("only fake images: ap, auc, acc_real, acc_best undefined")
    if out["f1"] is None:
        notes.append("f1 undefined: no fake image and no fake prediction")
    if notes:
        out["notes"] = notes
    return out


def mean_metrics(per_set: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Mean of each metric over the test sets where it is defined (the paper's "mean"),
    plus summed counts; `n_sets_<metric>` says over how many sets a partial mean ran."""
    out: dict[str, Any] = {"n_sets": len(per_set)}
    for key in ("n_real", "n_fake", "n", "n_errors"):
        out[key] = sum(int(m.get(key) or 0) for m in per_set.values())
    for key in METRIC_KEYS:
        vals = [m[key] for m in per_set.values() if m.get(key) is not None]
        out[key] = float(np.mean(vals)) if vals else None
        if len(vals) != len(per_set):
            out[f"n_sets_{key}"] = len(vals)
    return out


def sets_counted(mean: dict[str, Any], key: str) -> int:
    """Over how many test sets the mean of `key` (from `mean_metrics`) was taken: all of
    `n_sets` unless the metric was undefined on some (then `n_sets_<key>`)."""
    return int(mean.get(f"n_sets_{key}", mean.get("n_sets", 0)))


def mean_text(mean: dict[str, Any], key: str) -> str:
    """A mean in % with its support, for reports: "70.5", "60.0 (6 of 9 sets)" or "n/a"."""
    value, n = mean.get(key), sets_counted(mean, key)
    if value is None:
        return "n/a"
    partial = f" ({n} of {mean['n_sets']} sets)" if n != mean.get("n_sets", n) else ""
    return f"{100 * value:.1f}{partial}"


# ---------------------------------------------------------------------------- deployment metrics
# What a deployment needs besides the paper's ACC/AP: detection at a fixed false-positive rate,
# the equal error rate, the quality of the probabilities (Brier, NLL) and balanced accuracy.
DEPLOYMENT_KEYS = ("tpr_at_fpr_1", "tpr_at_fpr_5", "eer", "brier", "nll", "balanced_acc")
BOOTSTRAP_KEYS = ("acc", "ap", "auc")


def tpr_at_fpr(y_true: ArrayLike, y_score: ArrayLike, max_fpr: float) -> float | None:
    """The highest TPR of any cut whose FPR is at most `max_fpr` (a point of the ROC curve,
    not interpolated: a cut that exists); None unless both classes are present."""
    y, s = _arrays(y_true, y_score)
    if y.all() or not y.any():
        return None
    fpr, tpr, _ = roc_curve(y, s)
    return float(tpr[fpr <= max_fpr + 1e-12].max())


def equal_error_rate(y_true: ArrayLike, y_score: ArrayLike) -> float | None:
    """The rate where the false-positive rate equals the false-negative rate, linearly
    interpolated between the two ROC points around the crossing; None with one class."""
    y, s = _arrays(y_true, y_score)
    if y.all() or not y.any():
        return None
    fpr, tpr, _ = roc_curve(y, s)
    fnr = 1.0 - tpr
    d = fpr - fnr  # rises from -1 (flag nothing) to +1 (flag everything)
    i = int(np.flatnonzero(d >= 0)[0])
    if d[i] == 0 or i == 0:
        return float(fpr[i])
    # the segment from point i-1 (d < 0) to point i (d > 0): where fpr = fnr on it
    w = -d[i - 1] / (d[i] - d[i - 1])
    return float(fpr[i - 1] + w * (fpr[i] - fpr[i - 1]))


def brier_score(y_true: ArrayLike, y_prob: ArrayLike) -> float | None:
    """Mean squared error of the probabilities (scikit-learn's `brier_score_loss`)."""
    y, p = _arrays(y_true, y_prob)
    return float(np.mean((p - y) ** 2)) if y.size else None


def log_loss(y_true: ArrayLike, y_prob: ArrayLike) -> float | None:
    """Mean negative log-likelihood of the labels (scikit-learn's `log_loss`): probabilities
    are clipped to [eps, 1 - eps], eps = float64's, so a confident mistake costs ~36, not inf."""
    y, p = _arrays(y_true, y_prob)
    if not y.size:
        return None
    eps = np.finfo(np.float64).eps
    p = np.clip(p, eps, 1 - eps)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def log_loss_from_logits(y_true: ArrayLike, logits: ArrayLike) -> float | None:
    """Mean negative log-likelihood of the labels under sigmoid(logit), in float64 from the
    logits: -log sigmoid(z) = log(1 + e^-z) exactly, so a real image at logit 60 costs 60
    (through a rounded probability it would cost ~36, or inf)."""
    y, z = _arrays(y_true, logits)
    if not y.size:
        return None
    return float(np.mean(np.logaddexp(0.0, np.where(y == 1, -z, z))))


def brier_from_logits(y_true: ArrayLike, logits: ArrayLike) -> float | None:
    """`brier_score` of sigmoid(logit), the sigmoid taken in float64."""
    y, z = _arrays(y_true, logits)
    if not y.size:
        return None
    e = np.exp(-np.abs(z))
    p = np.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
    return float(np.mean((p - y) ** 2))


def balanced_accuracy(
    y_true: ArrayLike, y_score: ArrayLike, threshold: float = 0.5, flags: ArrayLike | None = None
) -> float | None:
    """Mean of the real and fake accuracies (scikit-learn's `balanced_accuracy_score` on
    `score > threshold`); None with one class, where it is only that class's accuracy."""
    real = class_accuracy(y_true, y_score, 0, threshold, flags)
    fake = class_accuracy(y_true, y_score, 1, threshold, flags)
    return None if real is None or fake is None else (real + fake) / 2


def deployment_metrics(
    y_true: ArrayLike,
    y_score: ArrayLike,
    threshold: float = 0.5,
    flags: ArrayLike | None = None,
    logits: ArrayLike | None = None,
) -> dict[str, Any]:
    """The DEPLOYMENT_KEYS of one set (y_score: probabilities); undefined ones are None.
    `logits` [N]: the logits whose sigmoid is y_score; Brier and NLL are then taken from them."""
    y, s = _arrays(y_true, y_score)
    return {
        "tpr_at_fpr_1": tpr_at_fpr(y, s, 0.01),
        "tpr_at_fpr_5": tpr_at_fpr(y, s, 0.05),
        "eer": equal_error_rate(y, s),
        "brier": brier_score(y, s) if logits is None else brier_from_logits(y, logits),
        "nll": log_loss(y, s) if logits is None else log_loss_from_logits(y, logits),
        "balanced_acc": balanced_accuracy(y, s, threshold, flags),
    }


def bootstrap_ci(
    y_true: ArrayLike,
    y_score: ArrayLike,
    n_boot: int,
    seed: int = 0,
    threshold: float = 0.5,
    confidence: float = 0.95,
    flags: ArrayLike | None = None,
) -> dict[str, list[float] | None]:
    """Percentile bootstrap intervals of ACC, AP and AUC: {"acc_ci": [lo, hi], ...}.

    Images are resampled with replacement within each class (a stratified bootstrap keeps
    both classes, so AP and AUC stay defined, and the class balance of the set as it is).
    Seeded: the same call gives the same intervals. None where the metric is undefined."""
    y, s = _arrays(y_true, y_score)
    pred = _predicted(s, threshold, flags)
    if n_boot < 1:
        raise ValueError(f"the number of bootstrap resamples must be at least 1, got {n_boot}")
    rng = np.random.default_rng(seed)
    groups = [np.flatnonzero(y == c) for c in (0, 1)]
    fns = {"acc": lambda yy, ss, pp: accuracy(yy, ss, flags=pp), "ap": lambda yy, ss, pp: average_precision(yy, ss),
           "auc": lambda yy, ss, pp: roc_auc(yy, ss)}
    both = all(g.size for g in groups)
    vals: dict[str, list[float]] = {k: [] for k in BOOTSTRAP_KEYS}
    if y.size:
        for _ in range(n_boot):
            idx = np.concatenate([rng.choice(g, size=g.size, replace=True) for g in groups if g.size])
            yy, ss, pp = y[idx], s[idx], pred[idx]
            for k in BOOTSTRAP_KEYS:
                if k == "acc" or both:
                    vals[k].append(fns[k](yy, ss, pp))
    a = (1 - confidence) / 2
    return {
        f"{k}_ci": [float(q) for q in np.quantile(v, [a, 1 - a])] if v else None for k, v in vals.items()
    }


def mean_deployment_metrics(per_set: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Mean of each DEPLOYMENT_KEYS metric (and `ece_uncalibrated`) over the sets where it is defined."""
    out: dict[str, Any] = {}
    for key in (*DEPLOYMENT_KEYS, "ece_uncalibrated"):
        vals = [m[key] for m in per_set.values() if m.get(key) is not None]
        if key == "ece_uncalibrated" and not vals:
            continue
        out[key] = float(np.mean(vals)) if vals else None
    return out
