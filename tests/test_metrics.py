"""rine.metrics against scikit-learn, and hand-computed edge cases (ties, one class)."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    f1_score,
    roc_auc_score,
    roc_curve,
)

from rine import metrics as M


def _cases():
    rng = np.random.default_rng(0)
    for n in (2, 7, 50, 301):
        y = rng.integers(0, 2, n)
        y[0], y[-1] = 0, 1
        yield y, rng.random(n)
        yield y, np.round(rng.random(n), 1)  # many ties
        yield y, rng.integers(0, 3, n) / 2.0  # scores exactly at 0.5


@pytest.mark.parametrize("case", list(_cases()))
def test_same_as_sklearn(case):
    y, s = case
    assert M.accuracy(y, s) == pytest.approx(accuracy_score(y, s > 0.5))
    assert M.average_precision(y, s) == pytest.approx(average_precision_score(y, s), abs=1e-12)
    assert M.roc_auc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert M.f1(y, s) == pytest.approx(f1_score(y, s > 0.5, zero_division=0.0))
    fpr, tpr, _ = M.roc_curve(y, s)
    sk_fpr, sk_tpr, _ = roc_curve(y, s, drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr)
    np.testing.assert_allclose(tpr, sk_tpr)
    m = M.compute_metrics(y, s)
    assert m["acc_real"] == pytest.approx(accuracy_score(y[y == 0], s[y == 0] > 0.5))
    assert m["acc_fake"] == pytest.approx(accuracy_score(y[y == 1], s[y == 1] > 0.5))
    assert (m["n_real"], m["n_fake"]) == (int((y == 0).sum()), int((y == 1).sum()))


def test_hand_computed_ties():
    # scores: two tied at 0.8 (one fake, one real), then a fake at 0.4, a real at 0.1
    y = [1, 0, 1, 0]
    s = [0.8, 0.8, 0.4, 0.1]
    # AP: threshold 0.8 -> P=1/2, R=1/2; threshold 0.4 -> P=2/3, R=1 => 0.5*0.5 + 0.5*2/3
    assert M.average_precision(y, s) == pytest.approx(0.25 + 1 / 3)
    # AUC: pairs (fake, real): (0.8,0.8) tie=.5, (0.8,0.1)=1, (0.4,0.8)=0, (0.4,0.1)=1 -> 2.5/4
    assert M.roc_auc(y, s) == pytest.approx(0.625)
    # exactly 0.5 is "real" (the reference uses score > 0.5)
    assert M.accuracy([0, 1], [0.5, 0.5]) == 0.5
    assert M.accuracy([0], [0.5]) == 1.0


def test_single_class_is_said_not_crashed():
    m = M.compute_metrics([0, 0, 0], [0.1, 0.7, 0.2])
    assert m["ap"] is None and m["auc"] is None and m["acc_fake"] is None
    assert m["acc"] == pytest.approx(2 / 3) and m["acc_real"] == pytest.approx(2 / 3)
    assert any("only real" in n for n in m["notes"])
    m = M.compute_metrics([1, 1], [0.9, 0.2])
    assert m["ap"] is None and m["auc"] is None and m["acc_real"] is None
    assert any("only fake" in n for n in m["notes"])
    m = M.compute_metrics([0, 0], [0.1, 0.2])
    assert m["f1"] is None
    empty = M.compute_metrics([], [])
    assert empty["acc"] is None and empty["n"] == 0


def test_ece_hand_computed():
    # predicted fake with confidence 0.9 (right) and 0.9 (wrong); predicted real with conf 0.7 (right)
    y = [1, 0, 0]
    s = [0.9, 0.9, 0.3]
    # bin of 0.9: acc 0.5, conf 0.9 -> |0.4| * 2/3; bin of 0.7: acc 1, conf 0.7 -> 0.3 * 1/3
    assert M.expected_calibration_error(y, s) == pytest.approx(0.4 * 2 / 3 + 0.3 / 3)
    assert M.expected_calibration_error([1, 0], [1.0, 0.0]) == 0.0


def test_best_threshold_and_mean():
    y = [0, 0, 1, 1]
    s = [0.6, 0.7, 0.8, 0.9]  # all called fake at 0.5, perfectly separable at 0.75
    assert M.accuracy(y, s) == 0.5
    assert M.best_threshold_accuracy(y, s) == 1.0
    per = {"a": M.compute_metrics(y, s), "b": M.compute_metrics([0, 0], [0.1, 0.9])}
    per["a"]["n_errors"], per["b"]["n_errors"] = 1, 0
    mean = M.mean_metrics(per)
    assert mean["acc"] == pytest.approx((0.5 + 0.5) / 2)
    assert mean["ap"] == pytest.approx(1.0) and mean["n_sets_ap"] == 1
    assert (mean["n_real"], mean["n_fake"], mean["n_errors"], mean["n_sets"]) == (4, 2, 1, 2)


def test_bad_input():
    with pytest.raises(ValueError):
        M.accuracy([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError):
        M.accuracy([0, 1], [0.1])


# ---------------------------------------------------------------------------- deployment metrics
@pytest.mark.parametrize("case", list(_cases()))
def test_deployment_metrics_same_as_sklearn(case):
    from sklearn.metrics import balanced_accuracy_score, brier_score_loss, log_loss

    y, s = case
    assert M.brier_score(y, s) == pytest.approx(brier_score_loss(y, s), abs=1e-12)
    assert M.log_loss(y, s) == pytest.approx(log_loss(y, s, labels=[0, 1]), abs=1e-9)
    assert M.balanced_accuracy(y, s) == pytest.approx(balanced_accuracy_score(y, s > 0.5))
    assert M.balanced_accuracy(y, s, 0.3) == pytest.approx(balanced_accuracy_score(y, s > 0.3))
    sk_fpr, sk_tpr, _ = roc_curve(y, s, drop_intermediate=False)
    for limit in (0.0, 0.01, 0.05, 0.2):
        assert M.tpr_at_fpr(y, s, limit) == pytest.approx(sk_tpr[sk_fpr <= limit].max())
    # EER: where FPR = FNR on sklearn's ROC polyline, found by sampling every segment densely
    # (independent of the closed form in rine.metrics)
    t = np.linspace(0, 1, 2001)[:, None]
    f = (sk_fpr[:-1] + t * np.diff(sk_fpr)).ravel()
    fn = 1 - (sk_tpr[:-1] + t * np.diff(sk_tpr)).ravel()
    i = np.argmin(np.abs(f - fn))
    assert M.equal_error_rate(y, s) == pytest.approx((f[i] + fn[i]) / 2, abs=2e-3)


def test_eer_hand_cases():
    assert M.equal_error_rate([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == 0.0  # separable
    assert M.equal_error_rate([0, 0, 1, 1], [0.9, 0.8, 0.2, 0.1]) == 1.0  # inverted
    assert M.equal_error_rate([0, 1], [0.5, 0.5]) == pytest.approx(0.5)  # one tie: chance
    assert M.equal_error_rate([0, 0], [0.1, 0.2]) is None and M.tpr_at_fpr([1, 1], [0.1, 0.2], 0.05) is None


def test_bootstrap_ci_seeded_stratified_and_shrinking():
    rng = np.random.default_rng(0)

    def data(n):
        y = np.r_[np.zeros(n, int), np.ones(n, int)]
        return y, np.r_[rng.normal(0.4, 0.15, n), rng.normal(0.6, 0.15, n)]

    y, s = data(100)
    a = M.bootstrap_ci(y, s, 300, seed=1)
    assert a == M.bootstrap_ci(y, s, 300, seed=1)  # seeded
    assert a != M.bootstrap_ci(y, s, 300, seed=2)
    for key, point in (("acc", M.accuracy(y, s)), ("ap", M.average_precision(y, s)), ("auc", M.roc_auc(y, s))):
        lo, hi = a[f"{key}_ci"]
        assert lo < point < hi
    # ten times the images: intervals about sqrt(10) ~ 3.2 times narrower
    yb, sb = data(1000)
    b = M.bootstrap_ci(yb, sb, 300, seed=1)
    for key in ("acc_ci", "ap_ci", "auc_ci"):
        ratio = (a[key][1] - a[key][0]) / (b[key][1] - b[key][0])
        assert 2.0 < ratio < 5.0, (key, ratio)
    one = M.bootstrap_ci(np.zeros(20, int), np.linspace(0, 1, 20), 50)
    assert one["ap_ci"] is None and one["auc_ci"] is None and one["acc_ci"] is not None


def test_metrics_of_adds_the_new_keys_without_touching_the_old(tmp_path):
    from rine.evaluation.results import metrics_of

    rng = np.random.default_rng(3)
    recs = [{"label": int(i % 2), "prob_fake": float(p), "logit": float(np.log(p / (1 - p))), "error": None}
            for i, p in enumerate(rng.uniform(0.05, 0.95, 40))]
    m = metrics_of({"s": recs}, 0.5, bootstrap=20, seed=0, calibrated=True)
    one = m["sets"]["s"]
    y, s = [r["label"] for r in recs], [r["prob_fake"] for r in recs]
    base = M.compute_metrics(y, s)
    assert {k: one[k] for k in base} == base  # the paper's metrics as before
    for k in (*M.DEPLOYMENT_KEYS, "acc_ci", "ap_ci", "auc_ci", "ece_uncalibrated"):
        assert k in one
    assert one["ece_uncalibrated"] == pytest.approx(one["ece"])  # prob_fake == sigmoid(logit) here
    assert m["mean"]["eer"] == one["eer"] and m["mean"]["nll"] == one["nll"]


# ---------------------------------------------------------------------------- decisions and losses on logits
def _records(labels, logits):
    import torch

    probs = torch.sigmoid(torch.tensor(logits, dtype=torch.float32)).tolist()  # what scoring stores
    return [{"label": y, "logit": float(z), "prob_fake": p, "error": None} for y, z, p in zip(labels, logits, probs, strict=True)]


def test_nll_and_brier_come_from_the_logits_in_float64():
    """A real image at logit 17, 25 or 60 costs 17, 25 or 60 nats (log(1 + e^z)); through the
    float32 probability (exactly 1.0) each costs -log(eps) = 36.04."""
    from sklearn.metrics import brier_score_loss, log_loss

    from rine.evaluation.results import metrics_of

    labels, logits = [0, 0, 0, 1], [17.0, 25.0, 60.0, 3.0]
    want_nll = float(np.mean([np.logaddexp(0, 17), np.logaddexp(0, 25), np.logaddexp(0, 60), np.logaddexp(0, -3)]))
    assert M.log_loss_from_logits(labels, logits) == pytest.approx(want_nll, rel=1e-15)
    assert want_nll == pytest.approx((17 + 25 + 60 + 0.0486) / 4, abs=1e-3)
    m = metrics_of({"s": _records(labels, logits)})["sets"]["s"]
    assert m["nll"] == pytest.approx(want_nll, rel=1e-12)
    # scikit-learn on float64 probabilities, where they are not yet rounded to 0 or 1
    rng = np.random.default_rng(5)
    z, y = rng.normal(0, 6, 200), rng.integers(0, 2, 200)
    p = 1 / (1 + np.exp(-z))
    assert M.log_loss_from_logits(y, z) == pytest.approx(log_loss(y, p, labels=[0, 1]), rel=1e-9)
    assert M.brier_from_logits(y, z) == pytest.approx(brier_score_loss(y, p), abs=1e-15)
    # a fake at logit -20: float32 sigmoid is 2.06e-9, float64 2.0612e-9; the Brier term is ~1 either
    # way, but the float64 value is the one computed here
    assert M.brier_from_logits([1], [-20.0]) == (1 - 1 / (1 + np.exp(20.0))) ** 2


def test_metrics_follow_the_rules_decisions_not_a_rounded_probability_cut():
    """A calibrated cut at calibrated logit 37.5 is probability 1.0 in float64: `prob > 1.0`
    flags nothing, while the rule (and so every record's verdict) flags logits 38 and 40."""
    from rine.config import CalibrationConfig
    from rine.evaluation.calibration import apply_rule
    from rine.evaluation.results import metrics_of
    from rine.model.calibration import DecisionRule

    cal = CalibrationConfig(method="platt", threshold_logit=37.5)
    rule = DecisionRule(threshold=cal.threshold, calibration=cal, cut_logit=cal.threshold_logit)
    assert rule.threshold == 1.0
    records = {"s": _records([1, 1, 0, 0], [38.0, 40.0, 37.0, -1.0])}
    apply_rule(records, rule)
    assert [r["verdict"] for r in records["s"]] == ["synthetic", "synthetic", "real", "real"]
    m = metrics_of(records, rule.threshold, bootstrap=20, calibrated=True, rule=rule)["sets"]["s"]
    assert (m["acc"], m["acc_real"], m["acc_fake"], m["f1"], m["balanced_acc"]) == (1.0, 1.0, 1.0, 1.0, 1.0)
    assert m["acc_ci"] == [1.0, 1.0]
    # an uncalibrated rule with an overridden cut decides as the records do too (float32 sigmoid)
    plain = DecisionRule(threshold=0.7, overridden=True)
    recs = _records([0, 1, 1], [0.5, 0.9, 2.0])  # sigmoid: 0.62, 0.71, 0.88
    assert metrics_of({"s": recs}, rule=plain)["sets"]["s"]["acc"] == 1.0
