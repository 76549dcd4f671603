"""One image's stability (rine.inference.stability) through the Detector and `rine detect
--stability`: each condition scores as `Detector.predict` on the file Pillow writes, flips and
`uncertain` follow from the numbers, and without the flag nothing changes."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from rine.config import CalibrationConfig
from rine.data.decoding import DecodeOptions
from rine.data.reencode import (
    DEFAULT_CONDITIONS,
    REENCODINGS,
)
from rine.inference.stability import assess, split_logits
from rine.model.calibration import DecisionRule

from support.stability import pillow_file, rule_cutting_between, stability_of


@pytest.mark.parametrize("crop", ["center", "ten", "resize"])
def test_each_condition_scores_as_detect_on_the_reencoded_file(photo_checkpoint, stability_inputs, crop, tmp_path):
    """The issue's check: a condition's probability is `Detector.predict` on the file that
    Pillow writes as documented, to 1e-5 (fp32), for every input kind, all scored in one
    stream with `stability=True` (copies batched with other images'); the file's own numbers
    are those of predict without stability."""
    from rine.inference.detector import Detector

    det = Detector.from_pretrained(str(photo_checkpoint), device="cpu", precision="fp32", crop=crop)
    paths = [str(p) for p in stability_inputs.values()]
    with_st = det.predict(paths, stability=True, batch_size=3)
    plain = det.predict(paths)
    files = [pillow_file(stability_inputs[n], c, tmp_path) for n in stability_inputs for c in DEFAULT_CONDITIONS]
    expected = iter(det.predict(files))
    for name, rec, direct in zip(stability_inputs, with_st, plain, strict=True):
        assert rec.error is None and rec.path == direct.path
        assert abs(rec.prob_fake - direct.prob_fake) < 1e-5 and abs(rec.logit - direct.logit) < 1e-5
        assert rec.is_fake == direct.is_fake
        assert np.allclose(rec.block_contribution, direct.block_contribution, atol=1e-5)
        st = rec.stability
        assert list(st["conditions"]) == list(DEFAULT_CONDITIONS) and "skipped" not in st
        want = {c: next(expected) for c in DEFAULT_CONDITIONS}
        for c, p in want.items():
            assert abs(st["conditions"][c] - p.prob_fake) < 1e-5, (name, crop, c, st["conditions"][c], p.prob_fake)
        probs = [direct.prob_fake, *(p.prob_fake for p in want.values())]
        assert st["spread"] == pytest.approx(max(probs) - min(probs), abs=2e-5)
        assert st["flipped"] == [c for c, p in want.items() if p.is_fake != direct.is_fake]
        assert rec.verdict == ("uncertain" if st["flipped"] else "synthetic" if direct.is_fake else "real")
        assert rec.threshold == 0.5 and direct.threshold is None and direct.verdict is None
        # the conditions are told apart: a mix-up of their order would not pass unseen
        assert len({round(p.logit, 3) for p in want.values()}) >= 3, (name, want)
    assert any(0.01 < r.prob_fake < 0.99 for r in plain)  # not saturated: 1e-5 means something


def test_stability_stream_keeps_order_errors_and_matches_processes(photo_checkpoint, stability_inputs, tmp_path):
    """A bad file in the stream is its own error record (no stability), the others keep their
    order; worker processes give the records threads give."""
    from rine.inference.detector import Detector

    det = Detector.from_pretrained(str(photo_checkpoint), device="cpu", precision="fp32")
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    paths = [str(stability_inputs["jpeg"]), str(bad), str(stability_inputs["small"]), str(tmp_path / "missing.png"), str(stability_inputs["grey"])]
    threads = det.predict(paths, stability=["jpeg70", "webp80"], batch_size=2)
    procs = det.predict(paths, stability=["jpeg70", "webp80"], batch_size=2,
                        decode=DecodeOptions(decoder="processes", workers=2))
    assert [r.path for r in threads] == paths
    assert [r.error is None for r in threads] == [True, False, True, False, True]
    assert threads[1].stability is None and "stability" not in threads[1].to_dict()
    for a, b in zip(threads, procs, strict=True):
        assert a.to_dict() == b.to_dict() or abs(a.prob_fake - b.prob_fake) < 1e-6
    assert list(threads[0].stability["conditions"]) == ["jpeg70", "webp80"]


def test_without_stability_records_are_unchanged(photo_checkpoint, stability_inputs):
    """No flag, no change: the records keep exactly the keys they had (no verdict, threshold or
    stability for an uncalibrated model) and the numbers of the file's own views."""
    from rine.inference.detector import Detector

    det = Detector.from_pretrained(str(photo_checkpoint), device="cpu", precision="fp32")
    paths = [str(p) for p in stability_inputs.values()]
    plain = [p.to_dict() for p in det.predict(paths)]
    assert all(set(d) == {"path", "prob_fake", "logit", "is_fake", "error"} for d in plain)
    stable = [p.to_dict() for p in det.predict(paths, stability=True)]
    for a, b in zip(plain, stable, strict=True):
        assert set(b) - set(a) == {"threshold", "verdict", "stability"}
        assert abs(a["logit"] - b["logit"]) < 1e-5 and a["is_fake"] == b["is_fake"]


def test_flips_and_uncertain_follow_from_the_numbers_near_the_threshold(photo_checkpoint, stability_inputs):
    """A head whose cut sits among the file's and its conditions' logits: exactly the
    conditions on the other side of the cut flip, the record becomes uncertain and the
    reason names them in words; with the cut away from all of them nothing flips."""
    import torch

    from rine.inference.detector import Detector

    det = Detector.from_pretrained(str(photo_checkpoint), device="cpu", precision="fp32")
    own, _, sv = stability_of(det, stability_inputs["jpeg"])
    _, per = split_logits(det.score_views(sv.views)[0], sv.applied, sv.per_image)
    cut = rule_cutting_between(list(per.values()), own)
    with torch.no_grad():
        det.head.head[-1].bias -= cut  # the head's logits now sit around 0, the 0.5 cut
    rec = det.predict(str(stability_inputs["jpeg"]), stability=True)[0]
    own2, _, _ = stability_of(det, stability_inputs["jpeg"])
    _, per2 = split_logits(det.score_views(sv.views)[0], sv.applied, sv.per_image)
    assert abs(own2 - rec.logit) < 1e-5
    expected = [c for c in DEFAULT_CONDITIONS if (per2[c] > 0) != (own2 > 0)]
    assert 0 < len(expected) < len(DEFAULT_CONDITIONS), (own2, per2)
    st = rec.stability
    assert st["flipped"] == expected and st["flips"] == len(expected)
    assert rec.verdict == "uncertain" and rec.is_fake == (own2 > 0)
    assert st["reason"].endswith("would change this answer")
    for c in DEFAULT_CONDITIONS:
        assert (REENCODINGS[c].words in st["reason"]) == (c in expected)
    probs = [rec.prob_fake, *st["conditions"].values()]
    assert st["spread"] == pytest.approx(max(probs) - min(probs))
    # the same numbers cut far below all of them: stable, the decision's own verdict
    det.set_decision(threshold=1e-6)
    rec3 = det.predict(str(stability_inputs["jpeg"]), stability=True)[0]
    assert rec3.stability["flips"] == 0 and rec3.verdict == "synthetic" and rec3.threshold == 1e-6


def test_a_calibrated_rule_flips_at_its_own_cut_not_at_one_half():
    """Calibrated: c = 2 z + 1, cut at c > 3 (p > 0.953): a condition moving z from 1.2 to
    0.9 flips (c 3.4 -> 2.8) although both are far above p = 0.5; one at 1.1 (c 3.2) does not."""
    cal = CalibrationConfig(method="platt", threshold_logit=3.0, scale=2.0, offset=1.0)
    rule = DecisionRule(threshold=1 / (1 + math.exp(-3.0)), calibration=cal, cut_logit=3.0)
    st = assess(rule, 1.2, {"jpeg90": 1.1, "jpeg70": 0.9})
    assert st.flipped == ("jpeg70",)
    assert st.conditions["jpeg70"] == pytest.approx(1 / (1 + math.exp(-2.8)))
    assert st.spread == pytest.approx(1 / (1 + math.exp(-3.4)) - 1 / (1 + math.exp(-2.8)))
    assert st.verdict(rule.decide(1.2)) == "uncertain"
    assert st.reason == "a JPEG re-save at quality 70 would change this answer"
    plain = assess(DecisionRule(), 1.2, {"jpeg90": 1.1, "jpeg70": 0.9})
    assert plain.flips == 0 and plain.verdict(DecisionRule().decide(1.2)) == "synthetic"


def test_reasons_list_several_conditions_in_words():
    st = assess(DecisionRule(), -0.1, {"jpeg90": -0.2, "jpeg70": 0.3, "fit1080": -0.5, "webp80": 0.01})
    assert st.flipped == ("jpeg70", "webp80")
    assert st.reason == ("a JPEG re-save at quality 70 or a WebP re-encode at quality 80 (at most 1080 px) "
                         "would change this answer")
    stable = assess(DecisionRule(), -0.1, {"jpeg90": -0.2})
    assert stable.reason == "none of 1 everyday re-encodings changes this answer"


def test_a_band_verdict_stays_uncertain_without_flips():
    cal = CalibrationConfig(method="platt", threshold_logit=0.0, uncertain_low=0.4, uncertain_high=0.6)
    rule = DecisionRule(threshold=0.5, calibration=cal, cut_logit=0.0, band=(0.4, 0.6))
    st = assess(rule, 0.1, {"jpeg90": 0.2})
    assert st.flips == 0 and st.verdict(rule.decide(0.1)) == "uncertain"


def test_a_calibrated_model_flips_at_its_own_cut(photo_checkpoint, stability_inputs, tmp_path):
    """A calibrated checkpoint (c = 2 z + 0.3, cut among this image's re-encodings, far from
    p = 0.5): the conditions are the calibrated probabilities `predict` gives the Pillow files,
    the flips those of the calibrated calls, and the record's threshold the calibrated one."""
    from rine.inference.detector import Detector
    from rine.model.checkpoints import load_pretrained, save_pretrained

    det = Detector.from_pretrained(str(photo_checkpoint), device="cpu", precision="fp32")
    own, _, sv = stability_of(det, stability_inputs["jpeg"])
    _, per = split_logits(det.score_views(sv.views)[0], sv.applied, sv.per_image)
    cut = rule_cutting_between(list(per.values()), own)
    head, config = load_pretrained(photo_checkpoint)
    cal = CalibrationConfig(method="platt", scale=2.0, offset=0.3, threshold_logit=2.0 * cut + 0.3)
    save_pretrained(head, dataclasses.replace(config, calibration=cal), tmp_path / "cal")
    det = Detector.from_pretrained(str(tmp_path / "cal"), device="cpu", precision="fp32")
    assert abs(det.threshold - 0.5) > 0.01 or abs(cut) > 0.01
    rec = det.predict(str(stability_inputs["jpeg"]), stability=True)[0]
    files = det.predict([pillow_file(stability_inputs["jpeg"], c, tmp_path) for c in DEFAULT_CONDITIONS])
    assert rec.threshold == pytest.approx(det.threshold)
    for c, p in zip(DEFAULT_CONDITIONS, files, strict=True):
        assert rec.stability["conditions"][c] == pytest.approx(p.prob_fake, abs=1e-5)
    flipped = [c for c, p in zip(DEFAULT_CONDITIONS, files, strict=True) if p.is_fake != rec.is_fake]
    assert 0 < len(flipped) < len(DEFAULT_CONDITIONS)
    assert rec.stability["flipped"] == flipped and rec.verdict == "uncertain"
    # the same image at the paper's 0.5 on the raw logits would flip differently (or not at all)
    at_half = [c for c in DEFAULT_CONDITIONS if (per[c] > 0) != (own > 0)]
    assert at_half != flipped


def _run_detect(args, capsys):
    from rine.cli import main

    # --no-provenance: these tests hold the detector's and stability's fields; the provenance
    # records that rine detect adds by default are tested in test_detect_provenance.py
    rc = main(["detect", "--no-progress", "--no-provenance", "--precision", "fp32", "--device", "cpu", *args])
    return rc, capsys.readouterr()


def test_rine_detect_stability_records_csv_table_and_resume(flippy_checkpoint, stability_inputs, tmp_path, capsys):
    """`rine detect --stability`: the jsonl records are `Detector.predict(stability=True)`'s;
    the csv has the stability columns and resumes; the table says the reason; a csv written
    without --stability is not resumed with it (rows of two widths)."""
    import csv
    import json

    from rine.cli.resume import csv_fields
    from rine.inference.detector import Detector

    paths = [str(stability_inputs[n]) for n in ("jpeg", "small", "grey")]
    model = ["--model", str(flippy_checkpoint)]
    rc, out = _run_detect([*model, "--stability", "--format", "jsonl", *paths], capsys)
    assert rc == 0
    records = [json.loads(line) for line in out.out.splitlines()]
    det = Detector.from_pretrained(str(flippy_checkpoint), device="cpu", precision="fp32")
    expected = [p.to_dict() for p in det.predict(paths, stability=True)]
    assert [r["path"] for r in records] == paths
    for r, e in zip(records, expected, strict=True):
        assert set(r) == set(e) == {"path", "prob_fake", "logit", "is_fake", "error", "threshold", "verdict", "stability"}
        assert r["stability"]["flipped"] == e["stability"]["flipped"] and r["verdict"] == e["verdict"]
        assert r["stability"]["conditions"] == pytest.approx(e["stability"]["conditions"], abs=1e-6)
    assert records[0]["verdict"] == "uncertain"  # the head is cut among this image's re-encodings

    rc, out = _run_detect([*model, "--stability", "--format", "table", paths[0]], capsys)
    assert rc == 0 and f"uncertain: {records[0]['stability']['reason']}" in out.out

    out_csv = tmp_path / "scores.csv"
    assert _run_detect([*model, "--stability", "-o", str(out_csv), *paths[:2]], capsys)[0] == 0
    assert _run_detect([*model, "--stability", "-o", str(out_csv), "--resume", *paths], capsys)[0] == 0
    rows = list(csv.DictReader(out_csv.open(newline="")))
    assert tuple(rows[0]) == csv_fields(decided=True, stability=True, provenance=False) and [r["path"] for r in rows] == paths
    for row, rec in zip(rows, records, strict=True):
        assert int(row["stability_flips"]) == rec["stability"]["flips"] and row["stability_reason"] == rec["stability"]["reason"]
        assert float(row["stability_jpeg70"]) == pytest.approx(rec["stability"]["conditions"]["jpeg70"], abs=1e-6)
    plain_csv = tmp_path / "plain.csv"
    assert _run_detect([*model, "-o", str(plain_csv), paths[0]], capsys)[0] == 0
    assert tuple(next(csv.reader(plain_csv.open(newline="")))) == csv_fields(decided=False, stability=False, provenance=False)
    rc, out = _run_detect([*model, "--stability", "-o", str(plain_csv), "--resume", *paths], capsys)
    assert rc == 2 and "stability" in out.err


def test_rine_detect_without_the_flag_writes_the_records_it_always_wrote(photo_checkpoint, stability_inputs, capsys):
    """No --stability: the same keys and numbers as `Detector.predict` without it, for every
    crop (and ten-crop), and nothing of the stability run leaks in."""
    import json

    from rine.inference.detector import Detector

    paths = [str(p) for p in stability_inputs.values()]
    for crop in ("center", "ten"):
        rc, out = _run_detect(["--model", str(photo_checkpoint), "--crop", crop, "--format", "jsonl", *paths], capsys)
        assert rc == 0
        got = [json.loads(line) for line in out.out.splitlines()]
        det = Detector.from_pretrained(str(photo_checkpoint), device="cpu", precision="fp32", crop=crop)
        assert got == [p.to_dict() for p in det.predict(paths)]
        assert all(set(r) == {"path", "prob_fake", "logit", "is_fake", "error"} for r in got)
