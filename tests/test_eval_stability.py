"""`rine eval --stability` (rine.evaluation.stability): flip rates per condition and the
selective-prediction table follow from the records, at 0.5 and at the model's own cut."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from rine.config import CalibrationConfig
from rine.data.reencode import (
    DEFAULT_CONDITIONS,
)
from rine.model.calibration import DecisionRule

from support.stability import photo, pillow_file


def _recs(logits, labels, errors=()):
    return [{"path": f"{i}.png", "label": y, "logit": z, "prob_fake": None, "error": "bad" if i in errors else None}
            for i, (z, y) in enumerate(zip(logits, labels, strict=True))]


def test_eval_flip_rates_and_selective_table_follow_from_the_records():
    """Six images (labels 0,0,0,1,1,1). At the paper's cut (logit 0): jpeg70 flips images 1
    and 4, webp80 flips image 4 -> 2 unstable of 6; image 5 has an error in webp80 and is
    left out everywhere (5 counted). The calibrated cut (c = z + 0 > 1) sees other flips."""
    from rine.evaluation.stability import paper_rule, set_stability

    labels = [0, 0, 0, 1, 1, 1]
    clean = _recs([-2.0, -0.1, 0.5, 2.0, 0.2, 3.0], labels)
    under = {"jpeg70": _recs([-1.9, 0.3, 0.6, 2.1, -0.2, 3.0], labels),
             "webp80": _recs([-2.0, -0.2, 1.5, 1.8, -0.1, 3.0], labels, errors=(5,))}
    m = set_stability(clean, under, paper_rule())
    assert m["n"] == 5 and m["n_stable"] == 3
    assert m["flip_rate"] == {"jpeg70": pytest.approx(2 / 5), "webp80": pytest.approx(1 / 5)}
    assert m["any_flip"] == pytest.approx(2 / 5) and m["coverage"] == pytest.approx(3 / 5)
    # clean calls at 0: [F, F, T, T, T] vs labels [0, 0, 0, 1, 1]: image 2 wrong
    assert m["acc_all"] == pytest.approx(4 / 5)
    assert m["acc_stable"] == pytest.approx(2 / 3)  # images 0, 2, 3: image 2 wrong
    assert m["acc_unstable"] == pytest.approx(1.0)  # images 1, 4 both right

    cal = CalibrationConfig(method="platt", threshold_logit=1.0)
    m2 = set_stability(clean, under, DecisionRule(threshold=1 / (1 + math.exp(-1)), calibration=cal, cut_logit=1.0))
    # calls at z > 1: clean [F, F, F, T, F]; webp80 flips image 2 (1.5), jpeg70 none
    assert m2["flip_rate"] == {"jpeg70": 0.0, "webp80": pytest.approx(1 / 5)}
    assert m2["coverage"] == pytest.approx(4 / 5) and m2["acc_all"] == pytest.approx(4 / 5)  # image 4 wrong
    assert m2["acc_stable"] == pytest.approx(3 / 4) and m2["acc_unstable"] == 1.0


def test_eval_stability_refuses_records_of_other_images():
    from rine.evaluation.stability import paper_rule, set_stability

    clean = _recs([0.1, 0.2], [0, 1])
    with pytest.raises(ValueError, match="not those of the clean run"):
        set_stability(clean, {"jpeg70": _recs([0.1], [0])}, paper_rule())
    swapped = _recs([0.2, 0.1], [1, 0])
    swapped.reverse()
    with pytest.raises(ValueError, match="not those of the clean run"):
        set_stability(clean, {"jpeg70": swapped}, paper_rule())


def test_eval_stability_report_means_and_markdown():
    from rine.evaluation.results import Condition, EvalResult, RunResult
    from rine.evaluation.stability import result_stability, stability_markdown

    a = _recs([-1.0, 1.0], [0, 1])
    b = _recs([-1.0, -1.0, 1.0, 1.0], [0, 1, 0, 1])
    clean = RunResult("m", Condition(), {"A": a, "B": b})
    j70 = RunResult("m", Condition(reencode="jpeg70"), {"A": _recs([1.0, 1.0], [0, 1]), "B": b})
    rep = result_stability(EvalResult([clean, j70], ["A", "B"]), {"m": DecisionRule()})
    paper = rep["m"]["rules"]["paper"]
    assert paper["sets"]["A"]["flip_rate"]["jpeg70"] == 0.5 and paper["sets"]["B"]["flip_rate"]["jpeg70"] == 0.0
    assert paper["mean"]["flip_rate"]["jpeg70"] == pytest.approx(0.25)  # mean over sets, unweighted
    assert paper["mean"]["coverage"] == pytest.approx(0.75) and paper["mean"]["n"] == 6
    assert paper["sets"]["A"]["acc_unstable"] == 1.0 and paper["sets"]["B"]["acc_unstable"] is None
    md = stability_markdown(rep)
    assert "| A | 2 | 50.0 | 50.0 | 50.0 | 100.0 | 100.0 | 100.0 |" in md
    assert "| B | 4 | 0.0 | 0.0 | 100.0 | 50.0 | 50.0 | n/a |" in md
    assert Condition(reencode="jpeg70").id == "reencode-jpeg70" and not Condition(reencode="jpeg70").is_clean
    with pytest.raises(ValueError):
        Condition(kind="jpeg", reencode="jpeg70")


def test_rine_eval_stability_end_to_end(photo_checkpoint, tmp_path, capsys):
    """`rine eval --stability`: one backbone pass per image and condition, records under each
    re-encoding equal to `rine detect`'s on the Pillow-written file, flip rates and coverage
    that follow from those records, at 0.5 and at --threshold; the clean run is unchanged."""
    import json

    from rine.cli import main
    from rine.inference.detector import Detector

    root = tmp_path / "bench"
    for label in ("0_real", "1_fake"):
        (root / "s" / label).mkdir(parents=True)
        for i in range(3):
            photo((240 + 30 * i, 230), seed=10 * i + len(label) + (label == "1_fake")).save(
                root / "s" / label / f"{i}.png")
    det = Detector.from_pretrained(str(photo_checkpoint), device="cpu", precision="fp32")
    files = sorted(str(p) for p in root.rglob("*.png"))
    clean_logits = sorted(p.logit for p in det.predict(files))
    cut = (clean_logits[2] + clean_logits[3]) / 2  # a model threshold amid the logits: flips there
    threshold = float(1 / (1 + math.exp(-cut)))
    base = ["eval", "--suite", "folder", "--root", str(root), "--no-progress", "--no-plots",
            "--model", str(photo_checkpoint), "--precision", "fp32"]
    assert main([*base, "--out", str(tmp_path / "plain")]) == 0
    assert main([*base, "--out", str(tmp_path / "st"), "--stability", "--threshold", str(threshold)]) == 0
    err = capsys.readouterr().err
    assert "stability at the paper, p > 0.5" in err and "flips jpeg70" in err
    out = tmp_path / "st"
    report = json.loads((out / "stability.json").read_text())
    (head,) = report
    preds = {c: {r["path"]: r for r in map(json.loads, (out / head / c / "predictions.jsonl").read_text().splitlines())}
             for c in ("clean", *[f"reencode-{n}" for n in DEFAULT_CONDITIONS])}
    # the clean run is what the plain evaluation gives
    plain = [json.loads(line) for line in (tmp_path / "plain" / "predictions.jsonl").read_text().splitlines()]
    assert [(r["path"], r["logit"]) for r in plain] == [(r["path"], r["logit"]) for r in preds["clean"].values()]
    # a condition's record is detect on the file Pillow writes
    one = files[0]
    direct = det.predict(pillow_file(Path(one), "jpeg70", tmp_path))[0]
    assert abs(preds["reencode-jpeg70"][one]["prob_fake"] - direct.prob_fake) < 1e-5
    for rname, cut_logit in (("paper", 0.0), ("model", cut)):
        r = report[head]["rules"][rname]["sets"]["s"]
        calls = {p: rec["logit"] > cut_logit for p, rec in preds["clean"].items()}
        flips = {n: {p for p, rec in preds[f"reencode-{n}"].items() if (rec["logit"] > cut_logit) != calls[p]}
                 for n in DEFAULT_CONDITIONS}
        unstable = set().union(*flips.values())
        assert r["flip_rate"] == {n: pytest.approx(len(f) / 6) for n, f in flips.items()}, rname
        assert r["coverage"] == pytest.approx(1 - len(unstable) / 6)
        right = {p: calls[p] == (preds["clean"][p]["label"] == 1) for p in calls}
        assert r["acc_all"] == pytest.approx(sum(right.values()) / 6)
        kept = [right[p] for p in calls if p not in unstable]
        assert r["acc_stable"] == (pytest.approx(sum(kept) / len(kept)) if kept else None)
    assert report[head]["rules"]["model"]["threshold"] == pytest.approx(threshold)
    assert any(report[head]["rules"]["model"]["sets"]["s"]["flip_rate"].values()), "no flip: the test is blind"
    metrics = json.loads((out / head / "clean" / "metrics.json").read_text())
    assert metrics["stability"] == report[head]
    assert "flips webp80" in (out / "stability.md").read_text()


def test_rine_eval_stability_through_the_features_cache(photo_checkpoint, tmp_path):
    """--features-cache stores taps per re-encoding like per perturbation: the second run
    reads them and its stability table equals the live one."""
    import json

    from rine.cli import main

    root = tmp_path / "bench"
    for label in ("0_real", "1_fake"):
        (root / "s" / label).mkdir(parents=True)
        for i in range(2):
            photo((230, 240 + 20 * i), seed=7 * i + len(label)).save(root / "s" / label / f"{i}.jpg", quality=90)
    base = ["eval", "--suite", "folder", "--root", str(root), "--no-progress", "--no-plots", "--stability",
            "--model", str(photo_checkpoint), "--precision", "fp32"]
    assert main([*base, "--out", str(tmp_path / "live")]) == 0
    for run in ("c1", "c2"):
        assert main([*base, "--out", str(tmp_path / run), "--features-cache", str(tmp_path / "cache")]) == 0
    assert len([p for p in (tmp_path / "cache").iterdir() if "reencode-" in p.name]) == len(DEFAULT_CONDITIONS)
    live, c2 = (json.loads((tmp_path / r / "stability.json").read_text()) for r in ("live", "c2"))
    for head in live:
        for rule in ("paper", "model"):
            a, b = live[head]["rules"][rule]["sets"]["s"], c2[head]["rules"][rule]["sets"]["s"]
            assert a == b, (rule, a, b)
