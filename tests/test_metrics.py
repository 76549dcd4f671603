"""rine.evaluation.metrics against scikit-learn, and hand-computed edge cases (ties, one class)."""

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
