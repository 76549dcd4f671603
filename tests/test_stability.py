"""`--stability`: the re-encoding conditions, the per-image stability and the evaluation's table.

The conditions are checked against files the test writes itself with Pillow, exactly as
docs/stability.md defines them, and scored by `Detector.predict` like any file.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rine.config import CalibrationConfig, PreprocessConfig
from rine.data.images import load_image
from rine.data.reencode import (
    DEFAULT_CONDITIONS,
    REENCODINGS,
    encode,
    reencode,
    resolve_conditions,
    stability_views,
)
from rine.inference.stability import assess, split_logits
from rine.model.calibration import DecisionRule


def photo(size, seed=0, mode="RGB") -> Image.Image:
    """A photo-like image (smooth shapes, texture and noise): re-encodings change it, but
    not beyond recognition, as they change photos."""
    w, h = size
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([120 + 100 * np.sin(x / (7 + 13 * c) + c) * np.cos(y / (11 + 5 * c)) for c in range(3)], -1)
    base += 25 * (((x // 37) + (y // 29)) % 2)[..., None]  # edges, where JPEG rings
    base += rng.normal(0, 12, base.shape)
    arr = np.clip(base, 0, 255).astype(np.uint8)
    img = Image.fromarray(arr, "RGB")
    return img.convert(mode) if mode != "RGB" else img


# name -> (size, mode, format, save options): the inputs the issue lists
INPUTS = {
    "jpeg": ((400, 300), "RGB", "JPEG", {"quality": 95}),
    "png": ((320, 256), "RGB", "PNG", {}),
    "webp": ((300, 330), "RGB", "WEBP", {"quality": 90}),
    "grey": ((288, 240), "L", "PNG", {}),
    "greyjpeg": ((260, 300), "L", "JPEG", {"quality": 92}),
    "small": ((150, 100), "RGB", "PNG", {}),
    "large": ((2400, 1600), "RGB", "JPEG", {"quality": 93}),
}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("stability-inputs")
    out = {}
    for i, (name, (size, mode, fmt, opts)) in enumerate(INPUTS.items()):
        path = folder / f"{name}.{fmt.lower()}"
        photo(size, seed=i, mode=mode).save(path, fmt, **opts)
        out[name] = path
    return out


@pytest.fixture(scope="module")
def photo_checkpoint(sensitive_checkpoint_dir, inputs, tmp_path_factory):
    """The sensitive head with its last layer rescaled so that these photos' logits have
    mean 0 and std 2: probabilities away from 0 and 1, where 1e-5 tells conditions apart."""
    import torch

    from rine.inference.detector import Detector
    from rine.model.checkpoints import save_pretrained

    det = Detector.from_pretrained(str(sensitive_checkpoint_dir), device="cpu", precision="fp32")
    logits = torch.tensor([p.logit for p in det.predict([str(p) for p in inputs.values()])])
    with torch.no_grad():
        last = det.head.head[-1]
        scale = 2.0 / logits.std()
        last.weight.mul_(scale)
        last.bias.copy_((last.bias - logits.mean()) * scale)
    folder = tmp_path_factory.mktemp("photo-ckpt") / "ckpt"
    save_pretrained(det.head, det.config, folder)
    return folder


@pytest.fixture(scope="module")
def flippy_checkpoint(photo_checkpoint, inputs, tmp_path_factory):
    """The photo head with its bias moved so that the 0.5 cut lies among the jpeg input's
    re-encodings: some flip it, some do not."""
    import torch

    from rine.inference.detector import Detector
    from rine.model.checkpoints import save_pretrained

    det = Detector.from_pretrained(str(photo_checkpoint), device="cpu", precision="fp32")
    own, _, sv = stability_of(det, inputs["jpeg"])
    _, per = split_logits(det.score_views(sv.views)[0], sv.applied, sv.per_image)
    with torch.no_grad():
        det.head.head[-1].bias -= _rule_cutting_between(list(per.values()), own)
    folder = tmp_path_factory.mktemp("flippy") / "ckpt"
    save_pretrained(det.head, det.config, folder)
    return folder


def pillow_file(src, name: str, folder) -> str:
    """The file docs/stability.md describes, written here with Pillow directly (not through
    rine.data.reencode): the decoded RGB image, downscaled where the condition says, saved."""
    im = Image.open(src)
    im.load()
    im = im.convert("RGB")  # as rine decodes (no EXIF rotation, alpha dropped, grey replicated)
    path = folder / f"{src.stem}-{name}"
    if name == "jpeg90":
        im.save(path, "JPEG", quality=90)
    elif name == "jpeg70":
        im.save(path, "JPEG", quality=70)
    elif name in ("fit1080", "webp80"):
        w, h = im.size
        if max(w, h) > 1080:
            im = im.resize((round(w * 1080 / max(w, h)), round(h * 1080 / max(w, h))), Image.Resampling.LANCZOS)
        if name == "fit1080":
            im.save(path, "JPEG", quality=85)
        else:
            im.save(path, "WEBP", quality=80, method=4)
    else:
        raise AssertionError(name)
    return str(path)


def stability_of(detector, source, conditions=None):
    """(file's Prediction-equivalent probability, Stability) through the stability views."""
    sv = stability_views(source, detector.config.preprocess, resolve_conditions(conditions))
    logits, _ = detector.score_views(sv.views)
    own, per = split_logits(logits, sv.applied, sv.per_image)
    return own, assess(detector.decision, own, per, sv.skipped), sv


def test_the_set_is_fixed_and_documented():
    assert DEFAULT_CONDITIONS == ("jpeg90", "jpeg70", "fit1080", "webp80")
    spec = {n: (r.format, r.quality, r.method, r.max_side, r.resample) for n, r in REENCODINGS.items()}
    assert spec == {"jpeg90": ("JPEG", 90, None, None, "LANCZOS"), "jpeg70": ("JPEG", 70, None, None, "LANCZOS"),
                    "fit1080": ("JPEG", 85, None, 1080, "LANCZOS"), "webp80": ("WEBP", 80, 4, 1080, "LANCZOS")}
    with pytest.raises(ValueError, match="unknown re-encoding 'jpeg50'"):
        resolve_conditions(["jpeg50"])


@pytest.mark.parametrize("name", list(INPUTS))
def test_reencoded_pixels_are_those_of_the_pillow_file(inputs, name, tmp_path):
    """Catches any drift from the documented definition (quality, filter, size rounding,
    a missing downscale, RGB handling of grey inputs): decoded pixels equal exactly."""
    image = load_image(inputs[name])
    for cond in DEFAULT_CONDITIONS:
        ours = np.asarray(reencode(image, REENCODINGS[cond]))
        theirs = np.asarray(load_image(pillow_file(inputs[name], cond, tmp_path)))
        assert ours.shape == theirs.shape and np.array_equal(ours, theirs), (name, cond)
        assert not np.array_equal(ours, np.asarray(image)), f"{cond} left {name} unchanged: the test is blind"


def test_fit1080_downscales_only_larger_images_to_exactly_1080():
    r = REENCODINGS["fit1080"]
    assert r.target_size(2400, 1600) == (1080, 720)
    assert r.target_size(1000, 4000) == (270, 1080)
    assert r.target_size(1081, 7) == (1080, 7)
    assert r.target_size(1080, 500) == (1080, 500) and r.target_size(200, 100) == (200, 100)
    assert r.target_size(30000, 1) == (1080, 1)  # never 0 px
    big = Image.open(__import__("io").BytesIO(encode(photo((2400, 1600)), r)))
    assert big.size == (1080, 720) and big.format == "JPEG"


@pytest.mark.parametrize("crop", ["center", "ten", "resize"])
def test_each_condition_scores_as_detect_on_the_reencoded_file(photo_checkpoint, inputs, crop, tmp_path):
    """The issue's check: a condition's probability is `Detector.predict` on the file that
    Pillow writes as documented, to 1e-5 (fp32), for every input kind, all scored in one
    stream with `stability=True` (copies batched with other images'); the file's own numbers
    are those of predict without stability."""
    from rine.inference.detector import Detector

    det = Detector.from_pretrained(str(photo_checkpoint), device="cpu", precision="fp32", crop=crop)
    paths = [str(p) for p in inputs.values()]
    with_st = det.predict(paths, stability=True, batch_size=3)
    plain = det.predict(paths)
    files = [pillow_file(inputs[n], c, tmp_path) for n in inputs for c in DEFAULT_CONDITIONS]
    expected = iter(det.predict(files))
    for name, rec, direct in zip(inputs, with_st, plain, strict=True):
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


def test_stability_stream_keeps_order_errors_and_matches_processes(photo_checkpoint, inputs, tmp_path):
    """A bad file in the stream is its own error record (no stability), the others keep their
    order; worker processes give the records threads give."""
    from rine.inference.detector import Detector

    det = Detector.from_pretrained(str(photo_checkpoint), device="cpu", precision="fp32")
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    paths = [str(inputs["jpeg"]), str(bad), str(inputs["small"]), str(tmp_path / "missing.png"), str(inputs["grey"])]
    threads = det.predict(paths, stability=["jpeg70", "webp80"], batch_size=2)
    procs = det.predict(paths, stability=["jpeg70", "webp80"], batch_size=2, decoder="processes", num_workers=2)
    assert [r.path for r in threads] == paths
    assert [r.error is None for r in threads] == [True, False, True, False, True]
    assert threads[1].stability is None and "stability" not in threads[1].to_dict()
    for a, b in zip(threads, procs, strict=True):
        assert a.to_dict() == b.to_dict() or abs(a.prob_fake - b.prob_fake) < 1e-6
    assert list(threads[0].stability["conditions"]) == ["jpeg70", "webp80"]


def test_without_stability_records_are_unchanged(photo_checkpoint, inputs):
    """No flag, no change: the records keep exactly the keys they had (no verdict, threshold or
    stability for an uncalibrated model) and the numbers of the file's own views."""
    from rine.inference.detector import Detector

    det = Detector.from_pretrained(str(photo_checkpoint), device="cpu", precision="fp32")
    paths = [str(p) for p in inputs.values()]
    plain = [p.to_dict() for p in det.predict(paths)]
    assert all(set(d) == {"path", "prob_fake", "logit", "is_fake", "error"} for d in plain)
    stable = [p.to_dict() for p in det.predict(paths, stability=True)]
    for a, b in zip(plain, stable, strict=True):
        assert set(b) - set(a) == {"threshold", "verdict", "stability"}
        assert abs(a["logit"] - b["logit"]) < 1e-5 and a["is_fake"] == b["is_fake"]


def _rule_cutting_between(values: list[float], own: float) -> float:
    """A logit cut between two adjacent values such that both sides hold a condition."""
    ranked = sorted([own, *values])
    r = ranked.index(own)
    lo, hi = (ranked[-2], ranked[-1]) if r <= len(ranked) // 2 else (ranked[0], ranked[1])
    assert hi - lo > 1e-4, ranked
    return (lo + hi) / 2


def test_flips_and_uncertain_follow_from_the_numbers_near_the_threshold(photo_checkpoint, inputs):
    """A head whose cut sits among the file's and its conditions' logits: exactly the
    conditions on the other side of the cut flip, the record becomes uncertain and the
    reason names them in words; with the cut away from all of them nothing flips."""
    import torch

    from rine.inference.detector import Detector

    det = Detector.from_pretrained(str(photo_checkpoint), device="cpu", precision="fp32")
    own, _, sv = stability_of(det, inputs["jpeg"])
    _, per = split_logits(det.score_views(sv.views)[0], sv.applied, sv.per_image)
    cut = _rule_cutting_between(list(per.values()), own)
    with torch.no_grad():
        det.head.head[-1].bias -= cut  # the head's logits now sit around 0, the 0.5 cut
    rec = det.predict(str(inputs["jpeg"]), stability=True)[0]
    own2, _, _ = stability_of(det, inputs["jpeg"])
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
    rec3 = det.predict(str(inputs["jpeg"]), stability=True)[0]
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


def test_a_condition_the_format_cannot_hold_is_skipped_with_its_reason(tmp_path):
    """JPEG holds at most 65500 px a side: a 65501 x 2 strip skips both JPEG re-saves at full
    size; the downscaled ones (1080 x 1 px) still apply."""
    path = tmp_path / "strip.png"
    Image.fromarray(np.full((2, 65501, 3), 90, np.uint8)).save(path)
    sv = stability_views(str(path), PreprocessConfig(), resolve_conditions())
    assert sv.applied == ("fit1080", "webp80") and list(sv.skipped) == ["jpeg90", "jpeg70"]
    assert "Pillow could not save" in sv.skipped["jpeg70"]
    assert sv.views.shape == (3, 224, 224, 3)
    st = assess(DecisionRule(), 0.3, {"fit1080": 0.2, "webp80": -0.1}, sv.skipped)
    assert st.to_dict()["skipped"] == sv.skipped and st.flipped == ("webp80",)


def test_the_files_own_views_are_those_detect_scores(inputs):
    """The stability path decodes with Pillow (it needs the whole image); its first views
    must equal the crop-aware decoder's, which `rine detect` uses without the flag."""
    from rine.data.jpeg_crop import decode_views

    for crop in ("center", "ten", "resize"):
        pre = dataclasses.replace(PreprocessConfig(), crop=crop)
        for name in ("jpeg", "large", "small"):
            sv = stability_views(str(inputs[name]), pre, resolve_conditions(["jpeg70"]))
            own = decode_views(str(inputs[name]), pre)
            assert np.array_equal(sv.views[: len(own)], own)
            assert not np.array_equal(sv.views[len(own):], own)


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


@pytest.mark.parametrize("crop", ["center", "ten"])
def test_rine_serve_form_field_stability(photo_checkpoint, inputs, crop, tmp_path):
    """POST /v1/detect with stability=true: each record gains the conditions `rine detect` gives
    the Pillow-written files, a verdict and a threshold; without the field the answer is what
    it was (no key added); a bad value is a 400. Ten-crop: 50 views per image, more than a
    batch, still scored."""
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from rine.inference.detector import Detector
    from rine.server.app import create_app

    det = Detector.from_pretrained(str(photo_checkpoint), device="cpu", precision="fp32", crop=crop)
    names = ("jpeg", "grey", "small")
    files = [("files", (f"{n}.img", inputs[n].read_bytes(), "application/octet-stream")) for n in names]
    with TestClient(create_app(det)) as client:
        plain = client.post("/v1/detect", files=files)
        off = client.post("/v1/detect", files=files, data={"stability": "false"})
        on = client.post("/v1/detect", files=files, data={"stability": "true"})
        bad = [client.post("/v1/detect", files=files, data={"stability": v}) for v in ("maybe", "1", "")]
    assert plain.status_code == off.status_code == on.status_code == 200
    assert all(b.status_code == 400 and "stability" in b.json()["detail"] for b in bad)
    assert off.json()["results"] == plain.json()["results"]
    assert all("stability" not in r and "threshold" not in r for r in plain.json()["results"])
    for n, rec, old in zip(names, on.json()["results"], plain.json()["results"], strict=True):
        assert rec["logit"] == pytest.approx(old["logit"], abs=1e-5)
        assert rec["block_importance"] == pytest.approx(old["block_importance"], abs=1e-5)
        st = rec["stability"]
        expected = det.predict([pillow_file(inputs[n], c, tmp_path) for c in DEFAULT_CONDITIONS])
        for c, p in zip(DEFAULT_CONDITIONS, expected, strict=True):
            assert st["conditions"][c] == pytest.approx(p.prob_fake, abs=1e-5), (n, c)
        flipped = [c for c, p in zip(DEFAULT_CONDITIONS, expected, strict=True) if p.is_fake != old["is_fake"]]
        assert st["flipped"] == flipped and st["flips"] == len(flipped)
        assert rec["threshold"] == 0.5
        assert rec["verdict"] == ("uncertain" if flipped else old["verdict"])


@pytest.mark.slow
@pytest.mark.browser
def test_page_checkbox_says_the_reason_in_words(flippy_checkpoint, inputs, tmp_path):
    """`rine serve` with a head cut among one image's re-encodings: with the box ticked the page
    shows "Uncertain: an ordinary re-save would change this answer" and the API's reason as a
    sentence; unticked, the card is as before (no stability line)."""
    if not Path("/usr/bin/chromium").exists():
        pytest.skip("/usr/bin/chromium not found: install Debian's chromium (scripts/setup.sh --dev does)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright for Python is not installed")
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("uvicorn")
    from support.serve_proc import running_server

    image = inputs["jpeg"]
    with running_server(["--model", str(flippy_checkpoint), "--device", "cpu", "--no-access-log"],
                        tmp_path / "server.log") as base:
        api = httpx.post(f"{base}/v1/detect", files=[("files", (image.name, image.read_bytes()))],
                         data={"stability": "true"}, timeout=60).json()["results"][0]
        assert api["stability"]["flips"] > 0 and api["verdict"] == "uncertain"
        with sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path="/usr/bin/chromium", headless=True,
                                         args=["--no-sandbox", "--disable-gpu", "--no-first-run"])
            try:
                page = browser.new_page(bypass_csp=True)
                page.goto(base + "/")
                page.wait_for_function("document.querySelector('#model').textContent.startsWith('Model ')")
                page.set_input_files("#file-input", [str(image)])
                page.wait_for_function("document.querySelectorAll('.card[data-state=done]').length === 1", timeout=60_000)
                assert page.query_selector(".card .stability").is_hidden()
                page.check("#stability")
                page.set_input_files("#file-input", [str(image)])
                page.wait_for_function("document.querySelectorAll('.card[data-state=done]').length === 2", timeout=60_000)
                card = page.query_selector_all(".card")[1]
                assert card.query_selector(".verdict").inner_text() == "Uncertain: an ordinary re-save would change this answer"
                line = card.query_selector(".stability").inner_text()
                reason = api["stability"]["reason"]
                assert line.startswith(reason[0].upper() + reason[1:] + ".")
                assert "treat this answer as uncertain" in line
            finally:
                browser.close()


def test_a_calibrated_model_flips_at_its_own_cut(photo_checkpoint, inputs, tmp_path):
    """A calibrated checkpoint (c = 2 z + 0.3, cut among this image's re-encodings, far from
    p = 0.5): the conditions are the calibrated probabilities `predict` gives the Pillow files,
    the flips those of the calibrated calls, and the record's threshold the calibrated one."""
    from rine.inference.detector import Detector
    from rine.model.checkpoints import load_pretrained, save_pretrained

    det = Detector.from_pretrained(str(photo_checkpoint), device="cpu", precision="fp32")
    own, _, sv = stability_of(det, inputs["jpeg"])
    _, per = split_logits(det.score_views(sv.views)[0], sv.applied, sv.per_image)
    cut = _rule_cutting_between(list(per.values()), own)
    head, config = load_pretrained(photo_checkpoint)
    cal = CalibrationConfig(method="platt", scale=2.0, offset=0.3, threshold_logit=2.0 * cut + 0.3)
    save_pretrained(head, dataclasses.replace(config, calibration=cal), tmp_path / "cal")
    det = Detector.from_pretrained(str(tmp_path / "cal"), device="cpu", precision="fp32")
    assert abs(det.threshold - 0.5) > 0.01 or abs(cut) > 0.01
    rec = det.predict(str(inputs["jpeg"]), stability=True)[0]
    files = det.predict([pillow_file(inputs["jpeg"], c, tmp_path) for c in DEFAULT_CONDITIONS])
    assert rec.threshold == pytest.approx(det.threshold)
    for c, p in zip(DEFAULT_CONDITIONS, files, strict=True):
        assert rec.stability["conditions"][c] == pytest.approx(p.prob_fake, abs=1e-5)
    flipped = [c for c, p in zip(DEFAULT_CONDITIONS, files, strict=True) if p.is_fake != rec.is_fake]
    assert 0 < len(flipped) < len(DEFAULT_CONDITIONS)
    assert rec.stability["flipped"] == flipped and rec.verdict == "uncertain"
    # the same image at the paper's 0.5 on the raw logits would flip differently (or not at all)
    at_half = [c for c in DEFAULT_CONDITIONS if (per[c] > 0) != (own > 0)]
    assert at_half != flipped


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


def _run_detect(args, capsys):
    from rine.cli import main

    rc = main(["detect", "--no-progress", "--precision", "fp32", "--device", "cpu", *args])
    return rc, capsys.readouterr()


def test_rine_detect_stability_records_csv_table_and_resume(flippy_checkpoint, inputs, tmp_path, capsys):
    """`rine detect --stability`: the jsonl records are `Detector.predict(stability=True)`'s;
    the csv has the stability columns and resumes; the table says the reason; a csv written
    without --stability is not resumed with it (rows of two widths)."""
    import csv
    import json

    from rine.cli.resume import CSV_FIELDS, CSV_FIELDS_STABILITY
    from rine.inference.detector import Detector

    paths = [str(inputs[n]) for n in ("jpeg", "small", "grey")]
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
    assert tuple(rows[0]) == CSV_FIELDS_STABILITY and [r["path"] for r in rows] == paths
    for row, rec in zip(rows, records, strict=True):
        assert int(row["stability_flips"]) == rec["stability"]["flips"] and row["stability_reason"] == rec["stability"]["reason"]
        assert float(row["stability_jpeg70"]) == pytest.approx(rec["stability"]["conditions"]["jpeg70"], abs=1e-6)
    plain_csv = tmp_path / "plain.csv"
    assert _run_detect([*model, "-o", str(plain_csv), paths[0]], capsys)[0] == 0
    assert tuple(next(csv.reader(plain_csv.open(newline="")))) == CSV_FIELDS
    rc, out = _run_detect([*model, "--stability", "-o", str(plain_csv), "--resume", *paths], capsys)
    assert rc == 2 and "stability" in out.err


def test_rine_detect_without_the_flag_writes_the_records_it_always_wrote(photo_checkpoint, inputs, capsys):
    """No --stability: the same keys and numbers as `Detector.predict` without it, for every
    crop (and ten-crop), and nothing of the stability run leaks in."""
    import json

    from rine.inference.detector import Detector

    paths = [str(p) for p in inputs.values()]
    for crop in ("center", "ten"):
        rc, out = _run_detect(["--model", str(photo_checkpoint), "--crop", crop, "--format", "jsonl", *paths], capsys)
        assert rc == 0
        got = [json.loads(line) for line in out.out.splitlines()]
        det = Detector.from_pretrained(str(photo_checkpoint), device="cpu", precision="fp32", crop=crop)
        assert got == [p.to_dict() for p in det.predict(paths)]
        assert all(set(r) == {"path", "prob_fake", "logit", "is_fake", "error"} for r in got)


@pytest.mark.slow
def test_rine_batch_stability_records_equal_detect(flippy_checkpoint, inputs, tmp_path, monkeypatch):
    """`rine batch --stability` (Ray Data; re-encoding in the decoding tasks): each record's
    threshold, verdict, flips, reason and per-condition probabilities are those of
    `rine detect --stability`; an error file stays one error record; a job keeps its choice."""
    pytest.importorskip("ray")
    import shutil
    import tempfile

    import pyarrow.parquet as pq

    from rine.cluster.batch import run_batch
    from rine.cluster.job import BatchConfig, BatchError
    from rine.inference.detector import Detector

    here = Path(__file__).resolve().parent  # the local Ray's workers import this checkout's rine
    monkeypatch.setenv("PYTHONPATH", f"{here.parent / 'src'}:{here}")

    folder = tmp_path / "imgs"
    folder.mkdir()
    for name in ("jpeg", "small", "grey", "webp"):
        shutil.copy(inputs[name], folder / inputs[name].name)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    out = tmp_path / "out"
    cfg = BatchConfig(inputs=[str(folder)], out=str(out), model=str(flippy_checkpoint), precision="fp32",
                      stability=True, shard_size=4, batch_size=3, decode_batch=2, address="local",
                      progress=False, temp_dir=tempfile.mkdtemp(prefix="rs-", dir="/tmp"))
    try:
        result = run_batch(cfg)
        with pytest.raises(BatchError, match="stability"):  # a job keeps the choice it started with
            run_batch(BatchConfig(**{**cfg.__dict__, "stability": False}))
    finally:
        shutil.rmtree(cfg.temp_dir, ignore_errors=True)
    assert result.error is None and result.exit_code == 1  # the broken file's error record
    rows = {r["path"]: r for part in sorted(out.glob("part-*.parquet")) for r in pq.read_table(part).to_pylist()}
    det = Detector.from_pretrained(str(flippy_checkpoint), device="cpu", precision="fp32")
    expected = det.predict(sorted(rows), stability=True, decoder="threads")
    assert sum(p.error is None for p in expected) == 4
    for p in expected:
        r = rows[p.path]
        assert r["error"] == p.error
        if p.error is not None:
            assert r["verdict"] is None and r["stability_flips"] is None
            continue
        assert abs(r["logit"] - p.logit) < 1e-5 and r["verdict"] == p.verdict and r["threshold"] == p.threshold
        assert r["stability_flips"] == p.stability["flips"] and r["stability_reason"] == p.stability["reason"]
        assert r["stability_spread"] == pytest.approx(p.stability["spread"], abs=1e-5)
        for c, prob in p.stability["conditions"].items():
            assert r[f"stability_{c}"] == pytest.approx(prob, abs=1e-5)
    assert any(rows[p.path]["verdict"] == "uncertain" for p in expected if p.error is None)
