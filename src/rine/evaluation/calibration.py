"""Fitting a decision rule on logits (label 1 = fake, 0 = real): NumPy / SciPy only.

    fit = fit_calibration(logits, labels, method="threshold", target_fpr=0.05)
    fit.config          # config.CalibrationConfig, applied by rine.model.calibration

Methods (docs/calibration.md says when to use which):
  target FPR    reals only. The cut is an order statistic of the real logits, chosen so that
                with probability `confidence` (over the draw of the calibration images) the
                false-positive rate on new real images from the same source is at most the
                target: for continuous scores the true exceedance of the k-th largest of n
                reals follows Beta(k, n + 1 - k), so the cut is the k-th largest value for the
                largest k whose Beta upper quantile is <= the target. Needs
                n >= log(1 - confidence) / log(1 - target) reals (59 for 5 %, 299 for 1 %).
  objective     labelled; the cut maximising balanced accuracy, F1 or accuracy over every cut
                point (between two adjacent distinct logits, or beyond the ends).
  temperature   labelled; sigmoid(z / T), T minimising the negative log-likelihood.
  platt         labelled; sigmoid(a z + b) (Platt 1999, with his smoothed targets).
  prior-shift   unlabelled images of the target domain: one logit offset, the cut placed at
                the tau-expectile of the logits with tau = the expected share of real images
                (0.5 by default: the mean logit), the unsupervised estimator of AIGI-Det-Calib
                (Yang et al., AAAI 2026) computed on the empirical distribution.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..config import CALIBRATION_METHODS, CALIBRATION_OBJECTIVES, CalibrationConfig
from ..model.calibration import expit

OBJECTIVES = CALIBRATION_OBJECTIVES
DEFAULT_CONFIDENCE = 0.95


class CalibrationError(ValueError):
    """The data cannot support the asked fit; the message says what is missing."""


def _arrays(logits, labels=None) -> tuple[np.ndarray, np.ndarray | None]:
    z = np.asarray(logits, dtype=np.float64).ravel()
    if not np.isfinite(z).all():
        raise CalibrationError("some logits are not finite numbers")
    if labels is None:
        return z, None
    y = np.asarray(labels, dtype=np.int64).ravel()
    if y.shape != z.shape:
        raise CalibrationError(f"{z.size} logits but {y.size} labels")
    if not np.isin(y, (0, 1)).all():
        raise CalibrationError("labels must be 0 (real) or 1 (fake)")
    return z, y


def _need_both(y: np.ndarray | None, what: str) -> None:
    if y is None:
        raise CalibrationError(f"{what} needs labelled real and fake images")
    n_real, n_fake = int(np.sum(y == 0)), int(np.sum(y == 1))
    if n_real == 0 or n_fake == 0:
        have = f"{n_real} real and {n_fake} fake"
        raise CalibrationError(f"{what} needs images of both classes, real and fake; the calibration data has {have}")


# ---------------------------------------------------------------------------- target FPR
def check_fpr(target_fpr: float, confidence: float = DEFAULT_CONFIDENCE) -> None:
    if not 0.0 < target_fpr < 1.0:
        raise CalibrationError(f"the target false-positive rate must be between 0 and 1 (exclusive), got {target_fpr}")
    if not 0.0 < confidence < 1.0:
        raise CalibrationError(f"the confidence must be between 0 and 1 (exclusive), got {confidence}")


def min_reals_for(target_fpr: float, confidence: float = DEFAULT_CONFIDENCE) -> int:
    """The fewest real images for which a cut with the guarantee exists: with the largest
    real logit as the cut, P(FPR > F) = (1 - F)^n must be at most 1 - confidence."""
    check_fpr(target_fpr, confidence)
    n = math.ceil(math.log(1.0 - confidence) / math.log1p(-target_fpr))
    # guard the float boundary: n must satisfy the inequality itself
    while (1.0 - target_fpr) ** n > 1.0 - confidence:
        n += 1
    return n


def fpr_upper_bound(n: int, k: np.ndarray | int, confidence: float = DEFAULT_CONFIDENCE) -> np.ndarray:
    """Upper `confidence` bound on the FPR of the cut at the k-th largest of n real logits
    (flag strictly above it): the `confidence` quantile of Beta(k, n + 1 - k)."""
    from scipy.stats import beta

    k = np.asarray(k)
    return beta.ppf(confidence, k, n + 1 - k)


@dataclass
class FPRCut:
    threshold_logit: float
    k: int  # the cut is the k-th largest real logit
    bound: float  # with `confidence`, the FPR on new reals is at most this
    n: int
    flagged: int  # calibration reals above the cut (<= k - 1; fewer with ties)


def fit_target_fpr(real_logits, target_fpr: float, confidence: float = DEFAULT_CONFIDENCE) -> FPRCut:
    """The lowest cut on the real logits [n] whose FPR is at most `target_fpr` with probability
    `confidence` (order-statistic bound; exact for continuous scores, conservative with ties).
    CalibrationError, with the number needed, when n is too small for any cut."""
    z, _ = _arrays(real_logits)
    check_fpr(target_fpr, confidence)
    n = z.size
    need = min_reals_for(target_fpr, confidence)
    if n < need:
        raise CalibrationError(
            f"a false-positive rate of at most {target_fpr:g} with {confidence:.0%} confidence needs at least "
            f"{need} real images; got {n}. Add {need - n} more real images, or ask for a larger rate"
        )
    # The bound grows with k (Beta(k, n + 1 - k) moves right): the largest admissible k, the
    # cut that flags the most fakes, by bisection (k = 1 is admissible since n >= need).
    lo, hi = 1, n
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fpr_upper_bound(n, mid, confidence) <= target_fpr:
            lo = mid
        else:
            hi = mid - 1
    k = lo
    desc = np.sort(z)[::-1]
    cut = float(desc[k - 1])
    return FPRCut(cut, k, float(fpr_upper_bound(n, k, confidence)), n, int(np.sum(z > cut)))


# ---------------------------------------------------------------------------- objectives
def objective_values(z: np.ndarray, y: np.ndarray, objective: str) -> tuple[np.ndarray, np.ndarray]:
    """(cuts [m + 1], value of `objective` at each) for every distinct way to cut the sorted
    logits: below all, between each pair of adjacent distinct values (the midpoint), above all.
    A cut t flags z > t as fake."""
    if objective not in OBJECTIVES:
        raise CalibrationError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    u = np.unique(z)
    cuts = np.r_[u[0] - 1.0, (u[:-1] + u[1:]) / 2, u[-1]]
    # images at or below each cut: counts of each class up to each distinct value
    idx = np.searchsorted(u, z)
    real_le = np.r_[0, np.cumsum(np.bincount(idx[y == 0], minlength=u.size))]
    fake_le = np.r_[0, np.cumsum(np.bincount(idx[y == 1], minlength=u.size))]
    n_real, n_fake = real_le[-1], fake_le[-1]
    tn, fn = real_le.astype(np.float64), fake_le.astype(np.float64)
    fp, tp = n_real - tn, n_fake - fn
    if objective == "accuracy":
        val = (tp + tn) / z.size
    elif objective == "balanced":
        val = 0.5 * (tp / max(n_fake, 1) + tn / max(n_real, 1))
    else:
        denom = 2 * tp + fp + fn
        val = np.divide(2 * tp, denom, out=np.zeros_like(denom), where=denom > 0)
    return cuts, val


def fit_objective(logits, labels, objective: str) -> tuple[float, float]:
    """(cut, objective value): the best cut over all cut points; among equally good cuts the
    middle one (the widest margin on both sides is the least sensitive to new data)."""
    z, y = _arrays(logits, labels)
    _need_both(y, f"--objective {objective}")
    cuts, val = objective_values(z, y, objective)
    best = np.flatnonzero(val >= val.max() - 1e-12)
    i = int(best[len(best) // 2])
    return float(cuts[i]), float(val[i])


# ---------------------------------------------------------------------------- probability fits
def nll(logits, labels, scale: float = 1.0, offset: float = 0.0) -> float:
    """Mean negative log-likelihood of the labels under sigmoid(scale * z + offset)."""
    z, y = _arrays(logits, labels)
    c = scale * z + offset
    # log(1 + exp(-c)) for fakes, log(1 + exp(c)) for reals, without overflow
    return float(np.mean(np.logaddexp(0.0, np.where(y == 1, -c, c))))


def fit_temperature(logits, labels) -> float:
    """The scale 1/T > 0 minimising the NLL of sigmoid(z / T) (a convex 1-D problem)."""
    from scipy.optimize import minimize_scalar

    z, y = _arrays(logits, labels)
    _need_both(y, "--method temperature")
    res = minimize_scalar(lambda s: nll(z, y, math.exp(s)), bounds=(-9.0, 9.0), method="bounded",
                          options={"xatol": 1e-10})
    return math.exp(float(res.x))


def fit_platt(logits, labels) -> tuple[float, float]:
    """(a, b) of sigmoid(a z + b) by maximum likelihood on Platt's smoothed targets
    (N+ + 1) / (N+ + 2) and 1 / (N- + 2), which keep a separable set from driving a to
    infinity. CalibrationError if the fit inverts the scores (a <= 0)."""
    z, y = _arrays(logits, labels)
    _need_both(y, "--method platt")
    n_pos, n_neg = int(y.sum()), int(y.size - y.sum())
    t = np.where(y == 1, (n_pos + 1.0) / (n_pos + 2.0), 1.0 / (n_neg + 2.0))

    def loss(w: np.ndarray) -> float:
        c = w[0] * z + w[1]
        # cross-entropy with soft targets: t*log(1+e^-c) + (1-t)*log(1+e^c)
        return float(np.mean(t * np.logaddexp(0.0, -c) + (1 - t) * np.logaddexp(0.0, c)))

    # Newton's method with backtracking (Platt's own; Lin et al. 2007): a convex 2-D problem
    # that converges in a few steps, which matters for the bootstrap's hundreds of refits.
    w = np.array([1.0, 0.0])
    f = loss(w)
    for _ in range(100):
        c = w[0] * z + w[1]
        p = expit(c)
        g = np.array([np.mean((p - t) * z), np.mean(p - t)])
        h = p * (1 - p)
        hess = np.array([[np.mean(h * z * z), np.mean(h * z)], [np.mean(h * z), np.mean(h)]]) + 1e-12 * np.eye(2)
        step = np.linalg.solve(hess, g)
        lr = 1.0
        while lr > 1e-10:
            w_new = w - lr * step
            f_new = loss(w_new)
            if f_new <= f + 1e-4 * lr * float(g @ -step):
                break
            lr /= 2
        converged = abs(f - f_new) < 1e-14 or np.abs(g).max() < 1e-12
        w, f = w_new, f_new
        if converged:
            break
    a, b = float(w[0]), float(w[1])
    if not a > 0:
        raise CalibrationError(
            f"Platt scaling found a slope of {a:.3g}: on this data the model scores real images above fakes, "
            "so no increasing calibration fits; check the labels"
        )
    return a, b


def expectile(z: np.ndarray, tau: float) -> float:
    """The tau-expectile of the values z: the t with tau * mean((z - t)+) = (1 - tau) * mean((t - z)+)
    (tau = 0.5: the mean). Exact, by bisection on the decreasing balance function."""
    from scipy.optimize import brentq

    z = np.asarray(z, dtype=np.float64)
    if z.min() == z.max():
        return float(z[0])

    def balance(t: float) -> float:
        return tau * np.maximum(z - t, 0).mean() - (1 - tau) * np.maximum(t - z, 0).mean()

    return float(brentq(balance, z.min(), z.max(), xtol=1e-12, rtol=1e-14))


def fit_prior_shift(logits, fake_share: float | None = None) -> float:
    """The logit offset -t, t the (1 - fake_share)-expectile of the unlabelled logits [N].

    AIGI-Det-Calib's unsupervised calibration: a detector trained on balanced data sees the
    fakes of an unseen generator shifted towards "real"; moving the cut to the point where the
    logit mass above and below balances in the expected class proportions re-centres it. The
    paper smooths the logits with a Gaussian KDE first; the KDE keeps the mean, and with it the
    default (balanced) cut, so this uses the empirical values directly."""
    z, _ = _arrays(logits)
    share = 0.5 if fake_share is None else fake_share
    if not 0.0 < share < 1.0:
        raise CalibrationError(f"the expected share of fakes must be between 0 and 1 (exclusive), got {share}")
    if z.size < 2 or z.min() == z.max():
        raise CalibrationError(f"--method prior-shift needs at least 2 images with different scores; got {z.size}")
    return -expectile(z, 1.0 - share)


# ---------------------------------------------------------------------------- rates and the whole fit
def binomial_ci(k: int, n: int, confidence: float = DEFAULT_CONFIDENCE) -> list[float] | None:
    """Clopper-Pearson (exact) interval of a rate k / n; None when n = 0."""
    from scipy.stats import beta

    if n == 0:
        return None
    a = (1 - confidence) / 2
    lo = 0.0 if k == 0 else float(beta.ppf(a, k, n - k + 1))
    hi = 1.0 if k == n else float(beta.ppf(1 - a, k + 1, n - k))
    return [lo, hi]


def achieved_rates(z: np.ndarray, y: np.ndarray | None, boundary: float, confidence: float = DEFAULT_CONFIDENCE) -> dict[str, Any]:
    """Rates of the rule `z > boundary` (head logits) on the data it was fitted on, each
    with its exact binomial interval. In-sample: for a cut chosen on these very images they
    are optimistic; the target-FPR guarantee is the statement for new images."""
    flagged = z > boundary
    out: dict[str, Any] = {"confidence": confidence, "flagged": int(flagged.sum()), "n": int(z.size)}
    if y is None:
        out["flagged_rate"] = {"value": float(flagged.mean()), "ci": binomial_ci(int(flagged.sum()), z.size, confidence),
                               "n": int(z.size)}
        return out
    for name, mask in (("fpr", y == 0), ("tpr", y == 1), ("accuracy", None)):
        if mask is None:
            k, n = int(np.sum(flagged == (y == 1))), int(y.size)
        else:
            k, n = int(np.sum(flagged[mask])), int(mask.sum())
        if n:
            out[name] = {"value": k / n, "ci": binomial_ci(k, n, confidence), "n": n}
    return out


def head_boundary(z: np.ndarray, c: np.ndarray, cut_logit: float, scale: float, offset: float) -> float:
    """The cut in head-logit units: `z > boundary` flags exactly the images the rule flags
    (`scale * z + offset > cut_logit`, what DecisionRule computes) on these logits [N].

    (cut - offset) / scale alone can land an ulp below a real logit whose calibrated value is
    the cut itself (a target-FPR cut is a calibrated real logit), so the in-sample rates
    would count one real more than the rule flags. Rounding is monotone, so the flagged
    images are the top of z and the boundary is moved into the gap between the two groups."""
    boundary = (cut_logit - offset) / scale
    flagged = c > cut_logit
    if (~flagged).any():
        boundary = max(boundary, float(z[~flagged].max()))
    if flagged.any() and float(z[flagged].min()) <= boundary:
        boundary = float(np.nextafter(z[flagged].min(), -np.inf))
    return boundary


@dataclass
class CalibrationFit:
    """A fitted rule plus what the report shows."""

    config: CalibrationConfig
    boundary: float  # the cut in head-logit units: z > boundary is fake
    details: dict[str, Any] = field(default_factory=dict)


def fit_calibration(
    logits,
    labels=None,
    *,
    method: str = "threshold",
    target_fpr: float | None = None,
    objective: str | None = None,
    fake_share: float | None = None,
    confidence: float = DEFAULT_CONFIDENCE,
    fitted_on: dict[str, Any] | None = None,
    with_rates: bool = True,
) -> CalibrationFit:
    """Fit `method` (the probability map: threshold = none, temperature, platt, prior-shift),
    then the cut: at `target_fpr` (on the real images), at the best `objective`, or at 0.5.

    logits [N] are the head's raw logits (for ten-crop: the mean of the views'); labels [N]
    (0 real, 1 fake) or None for unlabelled images (prior-shift, or a target FPR on images
    that are all real). `with_rates=False` skips the achieved rates (the bootstrap's refits)."""
    if method not in CALIBRATION_METHODS:
        raise CalibrationError(f"method must be one of {CALIBRATION_METHODS}, got {method!r}")
    if target_fpr is not None and objective is not None:
        raise CalibrationError("give either a target false-positive rate or an objective, not both")
    z, y = _arrays(logits, labels)
    if z.size == 0:
        raise CalibrationError("no scored image to calibrate on")
    if method == "threshold" and target_fpr is None and objective is None:
        raise CalibrationError("a threshold fit needs a target false-positive rate or an objective")
    if target_fpr is not None:
        check_fpr(target_fpr, confidence)
    if method == "prior-shift" and (target_fpr is not None or objective is not None):
        raise CalibrationError("prior-shift fits its own cut from unlabelled images; a target FPR or an objective "
                               "needs labelled images")
    scale, offset = 1.0, 0.0
    if method == "temperature":
        scale = fit_temperature(z, y)
    elif method == "platt":
        scale, offset = fit_platt(z, y)
    elif method == "prior-shift":
        offset = fit_prior_shift(z, fake_share)
    c = scale * z + offset  # calibrated logits
    target: dict[str, Any] = {}
    details: dict[str, Any] = {}
    guarantee = None
    if target_fpr is not None:
        reals = c if y is None else c[y == 0]
        if reals.size == 0:
            raise CalibrationError("a target false-positive rate needs real images; the calibration data has none")
        cut = fit_target_fpr(reals, target_fpr, confidence)
        cut_logit = cut.threshold_logit
        target = {"fpr": target_fpr, "confidence": confidence}
        details.update(k=cut.k, bound=cut.bound, n_real=cut.n, flagged_real=cut.flagged)
        guarantee = (
            f"With {confidence:.0%} confidence, the false-positive rate on new real images from the same "
            f"source as these {cut.n} is at most {cut.bound:.4f} (target {target_fpr:g}); "
            f"{cut.flagged} of the {cut.n} calibration reals are above the cut."
        )
    elif objective is not None:
        cut_logit, value = fit_objective(c, y, objective)
        target = {"objective": objective, "value": value}
    else:
        cut_logit = 0.0  # probability 0.5 on the calibrated scale
        if method == "prior-shift":
            target = {"fake_share": 0.5 if fake_share is None else fake_share}
    if method == "prior-shift" and fake_share is not None:
        target.setdefault("fake_share", fake_share)
    boundary = head_boundary(z, c, cut_logit, scale, offset)
    rates = achieved_rates(z, y, boundary, confidence) if with_rates else {}
    config = CalibrationConfig(
        method=method, threshold_logit=float(cut_logit), scale=float(scale), offset=float(offset),
        target=target, fitted_on=dict(fitted_on or {}), rates=rates, guarantee=guarantee,
    )
    return CalibrationFit(config, float(boundary), details)


def bootstrap_boundaries(
    logits, labels=None, *, n_boot: int = 200, seed: int = 0, **fit_options: Any
) -> np.ndarray:
    """The cut (head-logit units) refitted on `n_boot` resamples of the data [n_boot]
    (stratified by class when labelled, so both classes stay present); how much the fitted
    cut would move with another draw of as many calibration images. A resample the fit
    refuses (e.g. Platt inverting a near-chance set) is left out, so fewer may come back."""
    z, y = _arrays(logits, labels)
    rng = np.random.default_rng(seed)
    out = np.full(n_boot, np.nan)
    groups = [np.arange(z.size)] if y is None else [np.flatnonzero(y == 0), np.flatnonzero(y == 1)]
    for b in range(n_boot):
        idx = np.concatenate([rng.choice(g, size=g.size, replace=True) for g in groups if g.size])
        try:
            out[b] = fit_calibration(z[idx], None if y is None else y[idx], with_rates=False, **fit_options).boundary
        except CalibrationError:
            continue
    return out[np.isfinite(out)]


def band_from_boundaries(config: CalibrationConfig, boundaries: np.ndarray, coverage: float = 0.95) -> tuple[float, float]:
    """The uncertain band (calibrated probabilities) spanned by the central `coverage` of the
    bootstrap cuts: a score inside it would flip verdict with another calibration draw."""
    lo, hi = np.quantile(boundaries, [(1 - coverage) / 2, (1 + coverage) / 2])
    p = expit(config.scale * np.array([lo, hi]) + config.offset)
    return float(min(p[0], config.threshold)), float(max(p[1], config.threshold))


# ---------------------------------------------------------------------------- evaluation records
def apply_rule(records: dict[str, list[dict[str, Any]]], rule) -> bool:
    """Rewrite evaluation records {set: [record]} in place for a calibrated `rule`
    (rine.model.calibration.DecisionRule): prob_fake becomes the calibrated probability and
    each scored record gains `threshold` and `verdict`; `logit` stays the head's own.
    Returns whether anything changed (False: an uncalibrated rule leaves records as they are)."""
    if rule.calibration is None:
        return False
    for recs in records.values():
        for r in recs:
            if r.get("error") is None and r.get("logit") is not None:
                d = rule.decide(r["logit"])
                r.update(prob_fake=d.prob_fake, threshold=d.threshold, verdict=d.verdict)
    return True


def records_arrays(recs: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    """(head logits [N], labels [N]) of the scored records of one set (errors left out)."""
    ok = [r for r in recs if r.get("error") is None and r.get("logit") is not None]
    return (np.array([r["logit"] for r in ok], dtype=np.float64), np.array([r["label"] for r in ok], dtype=np.int64))


def fingerprint(keys: list[str]) -> str:
    """A short fingerprint of a list of image keys (order-free): which files a fit saw."""
    import hashlib

    h = hashlib.sha256("\n".join(sorted(keys)).encode("utf-8", "surrogateescape"))
    return "sha256:" + h.hexdigest()[:16]
