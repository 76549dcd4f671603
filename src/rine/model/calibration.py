"""Applying a calibration: the head's logit -> (probability, is_fake, verdict, threshold).

    rule = DecisionRule.of(config)                  # config.calibration, or the plain 0.5 cut
    d = rule.decide(logit)                          # Decision(prob_fake, is_fake, verdict, threshold)

Every path that turns a logit into a record (the `Detector`, the server, the evaluation) goes
through `DecisionRule`, so a file gets the same numbers wherever it is scored, and an encoder
backend that only produces logits gets calibration for free. The fitting lives in
`rine.evaluation.calibration`; the rule itself is `config.CalibrationConfig`:

    c = scale * logit + offset;  prob_fake = sigmoid(c);  is_fake = c > threshold_logit

Without a calibration the rule is today's exactly: prob_fake = float32 sigmoid(logit) and
is_fake = prob_fake > config.threshold (the reference counts p > 0.5 as fake). The web page
repeats `decide` in JavaScript (server/static/app.js, `decideFromLogit`) from `public()`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..config import CalibrationConfig, RINEConfig, sigmoid

VERDICTS = ("real", "synthetic", "uncertain")


def logit_of(p: float) -> float:
    """log(p / (1 - p)); -inf at 0 and +inf at 1 (a cut there flags all or nothing)."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"a probability threshold must be within [0, 1], got {p}")
    if p == 0.0:
        return -math.inf
    if p == 1.0:
        return math.inf
    return math.log(p) - math.log1p(-p)


def expit(x: np.ndarray) -> np.ndarray:
    """Vectorised float64 sigmoid without overflow warnings: [N] -> [N]."""
    x = np.asarray(x, dtype=np.float64)
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


@dataclass(frozen=True)
class Decision:
    """One image's outcome. `threshold` is the probability cut that made `is_fake`."""

    prob_fake: float
    is_fake: bool
    verdict: str
    threshold: float


@dataclass(frozen=True)
class DecisionRule:
    """How logits become decisions: an optional calibration, a cut, an optional uncertain band.

    threshold:      the probability cut (config.threshold, the calibrated one, or an override)
    calibration:    the fitted map, or None (plain sigmoid)
    cut_logit:      with a calibration, the cut on the calibrated logit (exact where
                    probabilities saturate); None: the cut is `prob > threshold`
    band:           (low, high): probabilities in [low, high] get the verdict "uncertain"
    overridden:     a user option changed the threshold or the band
    """

    threshold: float = 0.5
    calibration: CalibrationConfig | None = None
    cut_logit: float | None = None
    band: tuple[float, float] | None = None
    overridden: bool = False

    @classmethod
    def of(
        cls, config: RINEConfig, threshold: float | None = None, uncertain_band: float | None = None
    ) -> DecisionRule:
        """The rule of a config; `threshold` (a probability) replaces its cut and
        `uncertain_band` W (0 <= W < 0.5) replaces its band by [t - W, t + W] (0: none)."""
        cal = config.calibration
        if threshold is not None and not 0.0 <= threshold <= 1.0:
            raise ValueError(f"--threshold must be within [0, 1], got {threshold}")
        if uncertain_band is not None and not 0.0 <= uncertain_band < 0.5:
            raise ValueError(f"--uncertain-band must be within [0, 0.5), got {uncertain_band}")
        if cal is None:
            t = config.threshold if threshold is None else threshold
            cut = None
            band = None
        else:
            cut = cal.threshold_logit if threshold is None else logit_of(threshold)
            t = threshold if threshold is not None else sigmoid(cut)
            band = None if cal.uncertain_low is None else (cal.uncertain_low, cal.uncertain_high)
        if uncertain_band is not None:
            band = (max(0.0, t - uncertain_band), min(1.0, t + uncertain_band)) if uncertain_band > 0 else None
        return cls(float(t), cal, cut, band, threshold is not None or uncertain_band is not None)

    @property
    def reports_threshold(self) -> bool:
        """Whether records carry `threshold` and `verdict`: not for a plain uncalibrated
        model at its own cut, whose records stay exactly as they were before calibration."""
        return self.calibration is not None or self.overridden

    def calibrated_logits(self, logits: np.ndarray) -> np.ndarray:
        """Head logits [N] -> calibrated logits [N] (float64; unchanged without a calibration)."""
        z = np.asarray(logits, dtype=np.float64)
        cal = self.calibration
        return z if cal is None else cal.scale * z + cal.offset

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """Head logits [N] -> prob_fake [N] as `decide` computes it (float32 sigmoid without a
        calibration, as the reference; float64 of the calibrated logit with one)."""
        if self.calibration is None:
            return torch.sigmoid(torch.as_tensor(np.asarray(logits, dtype=np.float32))).double().numpy()
        return expit(self.calibrated_logits(logits))

    def flags(self, logits: np.ndarray) -> np.ndarray:
        """Head logits [N] -> is_fake [N] (bool), the same cut as `decide`."""
        if self.cut_logit is None:
            return self.probabilities(logits) > self.threshold
        return self.calibrated_logits(logits) > self.cut_logit

    def decide(self, logit: float) -> Decision:
        """One image's head logit (for ten-crop: the mean of its views' float32 logits)."""
        if self.calibration is None:
            # float32, as Detector.predict always did: an uncalibrated model keeps its numbers.
            prob = torch.sigmoid(torch.tensor(float(logit), dtype=torch.float32)).item()
            is_fake = prob > self.threshold
        else:
            c = self.calibration.scale * float(logit) + self.calibration.offset
            prob = sigmoid(c)
            is_fake = c > self.cut_logit
        if self.band is not None and self.band[0] <= prob <= self.band[1]:
            verdict = "uncertain"
        else:
            verdict = "synthetic" if is_fake else "real"
        return Decision(prob, bool(is_fake), verdict, self.threshold)

    def public(self) -> dict | None:
        """What a client needs to repeat `decide` (the web page's JavaScript); None without a
        calibration and without overrides (then: prob = sigmoid(logit) > threshold)."""
        if not self.reports_threshold:
            return None
        cal = self.calibration
        return {
            "method": cal.method if cal else None,
            "scale": cal.scale if cal else 1.0,
            "offset": cal.offset if cal else 0.0,
            "threshold": self.threshold,
            # JSON has no infinity: a cut at +-inf (threshold 0 or 1) is sent as None with
            # `threshold` saying which one it is.
            "threshold_logit": self.cut_logit if self.cut_logit is not None and math.isfinite(self.cut_logit) else None,
            "uncertain_low": self.band[0] if self.band else None,
            "uncertain_high": self.band[1] if self.band else None,
            "guarantee": cal.guarantee if cal else None,
        }
