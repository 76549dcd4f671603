"""Would an ordinary re-save change this answer? One image's stability under `data.reencode`.

    s = assess(rule, logit, {"jpeg90": z1, "jpeg70": z2, ...})
    s.flips, s.spread, s.reason          # 1, 0.21, "a JPEG re-save at quality 70 would change this answer"
    verdict = s.verdict(rule.decide(logit))   # "uncertain" when any condition flips the call

The file and each re-encoded copy are scored by the same head and decision rule (for ten-crop:
the mean of each copy's view logits); a condition *flips* when its call (`is_fake` at the
record's threshold: the calibrated cut of a calibrated model, else `config.threshold`) differs
from the file's. A record with flips gets the verdict "uncertain" with the reason in words.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..data.reencode import REENCODINGS, StabilityViews
from ..model.calibration import Decision, DecisionRule


@dataclass(frozen=True)
class Stability:
    """One image's answer under the re-encodings.

    conditions:  name -> prob_fake of the re-encoded image (as the record's prob_fake: the
                 calibrated probability of a calibrated model)
    spread:      max - min of prob_fake over the file and its conditions
    flipped:     the conditions whose call differs from the file's, in condition order
    skipped:     name -> why the condition could not be applied to this image
    """

    conditions: dict[str, float]
    spread: float
    flipped: tuple[str, ...] = ()
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def flips(self) -> int:
        return len(self.flipped)

    @property
    def reason(self) -> str:
        """Why the verdict is (or is not) uncertain, in words."""
        if self.flipped:
            words = [REENCODINGS[n].words if n in REENCODINGS else n for n in self.flipped]
            listed = words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]
            return f"{listed} would change this answer"
        if not self.conditions:
            return "no re-encoding could be applied to this image"
        return f"none of {len(self.conditions)} everyday re-encodings changes this answer"

    def verdict(self, decision: Decision) -> str:
        """The record's verdict: "uncertain" with flips, else the decision's own (which is
        "uncertain" inside a calibration's band)."""
        return "uncertain" if self.flipped else decision.verdict

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"conditions": dict(self.conditions), "spread": self.spread, "flips": self.flips,
                             "flipped": list(self.flipped), "reason": self.reason}
        if self.skipped:
            d["skipped"] = dict(self.skipped)
        return d


def assess(
    rule: DecisionRule,
    logit: float,
    condition_logits: Mapping[str, float],
    skipped: Mapping[str, str] | None = None,
) -> Stability:
    """The file's head logit and each condition's (ten-crop: means over views) -> Stability.

    Probabilities and calls come from `rule.decide`, the one step every record goes through,
    so a condition's probability is what `rine detect` gives the re-encoded file."""
    own = rule.decide(logit)
    probs, flipped = {}, []
    for name, z in condition_logits.items():
        d = rule.decide(z)
        probs[name] = d.prob_fake
        if d.is_fake != own.is_fake:
            flipped.append(name)
    values = [own.prob_fake, *probs.values()]
    return Stability(probs, float(max(values) - min(values)), tuple(flipped), dict(skipped or {}))


def decide_with_stability(
    rule: DecisionRule, view_logits: Sequence[float], applied: Sequence[str], per_image: int,
    skipped: Mapping[str, str] | None = None,
) -> tuple[float, Decision, Stability]:
    """One image's view logits [(1 + conditions) * V] (`data.reencode.StabilityViews` order) ->
    (the file's mean logit, its Decision, its Stability): what the Detector and the server put
    in a record."""
    own, per = split_logits(view_logits, applied, per_image)
    return own, rule.decide(own), assess(rule, own, per, skipped)


def stability_fields(decision: Decision, stability: Stability) -> dict[str, Any]:
    """The record keys `--stability` sets: every record gets a threshold and a verdict."""
    return {"threshold": decision.threshold, "verdict": stability.verdict(decision), "stability": stability.to_dict()}


def predict_with_stability(detector: Any, names: Sequence[str], prepared: Sequence[StabilityViews]) -> list:
    """`Detector.predict_views` for `data.reencode.stability_views` results: every image's views
    and its re-encoded copies' through the encoder in ONE batch -> Predictions with `stability`,
    a threshold and a verdict. The file's probability, logit and block contribution are those
    of its own views, computed as without stability."""
    import numpy as np

    logits, contrib = detector.score_views(np.concatenate([sv.views for sv in prepared]))
    preds, start = [], 0
    for name, sv in zip(names, prepared, strict=True):
        n, v = len(sv.views), sv.per_image
        logit, d, st = decide_with_stability(detector.decision, logits[start : start + n], sv.applied, v, sv.skipped)
        pred = detector.decide(logit, name, contrib[start : start + v].mean(dim=0).tolist())
        preds.append(dataclasses.replace(pred, **stability_fields(d, st)))
        start += n
    return preds


def split_logits(logits: Sequence[float], applied: Sequence[str], per_image: int) -> tuple[float, dict[str, float]]:
    """One image's view logits [(1 + conditions) * V] (the file's V views first, then each
    applied condition's) -> (the file's mean logit, {condition: mean logit})."""
    import torch

    x = torch.as_tensor(logits, dtype=torch.float32).reshape(1 + len(applied), per_image)
    # the mean of the float32 logits, as the Detector averages ten-crop views
    means = [x[i].mean().item() for i in range(len(x))]
    return means[0], dict(zip(applied, means[1:], strict=True))
