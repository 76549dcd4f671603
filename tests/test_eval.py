"""`rine eval` end to end on the tiny checkpoint: counts, metrics vs scikit-learn, ten-crop,
several heads and perturbations with one backbone pass, the feature cache."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, average_precision_score, roc_auc_score

from rine.cli import main
from rine.model.backbones import TappedCLIPVision

from conftest import TINY, write_image
from support.image_trees import build_ufd20, make_files


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture()
def count_views(monkeypatch):
    """Counts the images the backbone encodes (rows of its input)."""
    seen = {"views": 0}
    forward = TappedCLIPVision.forward

    def counting(self, pixel_values, *a, **k):
        seen["views"] += int(pixel_values.shape[0])
        return forward(self, pixel_values, *a, **k)

    monkeypatch.setattr(TappedCLIPVision, "forward", counting)
    try:  # the Detector's fast encoder, where there is one
        from rine.model.accel import FastTapEncoder
    except ImportError:
        return seen
    fast = FastTapEncoder.forward

    def counting_fast(self, pixel_values, *a, **k):
        seen["views"] += int(pixel_values.shape[0])
        return fast(self, pixel_values, *a, **k)

    monkeypatch.setattr(FastTapEncoder, "forward", counting_fast)
    return seen


@pytest.fixture(scope="module")
def second_checkpoint(tmp_path_factory, tiny_checkpoint_dir) -> Path:
    """Another random head on the same tiny backbone."""
    from rine.model.checkpoints import load_pretrained, save_pretrained
    from rine.model.head import RINEHead

    _, config = load_pretrained(tiny_checkpoint_dir)
    torch.manual_seed(1)
    folder = tmp_path_factory.mktemp("ckpt2") / "tiny-rine-b"
    save_pretrained(RINEHead(config.head), config, folder)
    return folder


def test_eval_ufd20_counts_and_metrics(tmp_path, tiny_checkpoint_dir, count_views):
    data = tmp_path / "test"
    expected = build_ufd20(data, size=(40, 30))
    bad = data / "biggan" / "1_fake" / "corrupt.PNG"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    out = tmp_path / "out"
    rc = main(["eval", "--suite", "ufd20", "--root", str(data), "--out", str(out),
               "--model", str(tiny_checkpoint_dir), "--no-progress", "--batch-size", "4"])
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    preds = read_jsonl(out / "predictions.jsonl")
    on_disk = {k: (r, f + (k == "biggan")) for k, (r, f) in expected.items()}  # + the corrupt file
    assert {
        k: (m["n_real_listed"], m["n_fake_listed"]) for k, m in metrics["sets"].items()
    } == on_disk
    assert {k: (m["n_real"], m["n_fake"]) for k, m in metrics["sets"].items()} == expected
    assert metrics["sets"]["biggan"]["n_errors"] == 1 and metrics["mean"]["n_errors"] == 1
    assert len(preds) == sum(r + f for r, f in on_disk.values())
    err = [p for p in preds if p["error"]]
    assert [p["path"] for p in err] == [str(bad)] and err[0]["prob_fake"] is None
    assert [p["error_kind"] for p in preds if p["error_kind"]] == [err[0]["error_kind"]] != ["error"]
    # the backbone saw each readable image once
    assert count_views["views"] == sum(r + f for r, f in expected.values())
    # metrics equal scikit-learn's on the written predictions
    accs, aps = [], []
    for name, m in metrics["sets"].items():
        ok = [p for p in preds if p["set"] == name and p["error"] is None]
        y = np.array([p["label"] for p in ok])
        s = np.array([p["prob_fake"] for p in ok])
        assert m["acc"] == pytest.approx(accuracy_score(y, s > 0.5))
        assert m["ap"] == pytest.approx(average_precision_score(y, s))
        assert m["auc"] == pytest.approx(roc_auc_score(y, s))
        accs.append(m["acc"])
        aps.append(m["ap"])
    assert metrics["mean"]["acc"] == pytest.approx(np.mean(accs))
    assert metrics["mean"]["ap"] == pytest.approx(np.mean(aps))
    assert set(metrics["missing_sets"]) == {
        "stylegan", "stylegan2", "cyclegan", "stargan", "gaugan", "deepfake", "seeingdark", "san",
        "crn", "imle", "ldm_200_cfg", "ldm_100", "glide_100_27", "glide_50_27", "glide_100_10",
    }
    # tables in the paper's layout and plots
    table = (out / "table.md").read_text(encoding="utf-8")
    assert "| model | progan | biggan | guided | ldm_200 | dalle | mean |" in table
    rows = list(csv.reader((out / "table.csv").open(encoding="utf-8")))
    assert rows[0][:3] == ["model", "progan ACC", "progan AP"]
    assert float(rows[1][-2]) == pytest.approx(100 * metrics["mean"]["acc"], abs=0.01)
    for png in ("acc_ap.png", "roc.png", "block_importance.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    config = json.loads((out / "eval_config.json").read_text(encoding="utf-8"))
    assert config["suite"] == "ufd20" and config["conditions"] == ["clean"]


def test_ten_crop_is_sigmoid_of_mean_single_crop_logits(tmp_path, sensitive_checkpoint_dir, sensitive_detector):
    from PIL import Image

    from rine.data.preprocess import ten_crop_arrays

    make_files(tmp_path / "RAISEpng", 2, size=(260, 240))
    make_files(tmp_path / "synthbuster" / "glide", 1, size=(300, 230))
    out = tmp_path / "out"
    rc = main(["eval", "--suite", "synthbuster", "--root", str(tmp_path), "--out", str(out), "--precision", "fp32",
               "--model", str(sensitive_checkpoint_dir), "--no-progress", "--no-plots"])
    assert rc == 0
    preds = read_jsonl(out / "predictions.jsonl")
    assert json.loads((out / "eval_config.json").read_text())["preprocess"]["crop"] == "ten"
    assert len(preds) == 3
    wrong_protocol = []
    for p in preds:
        crops = ten_crop_arrays(np.asarray(Image.open(p["path"]).convert("RGB")), TINY["image_size"])
        # each crop scored on its own, through the single-view path
        logits = np.array([sensitive_detector.score_views(np.ascontiguousarray(c[None]))[0].item() for c in crops])
        assert p["prob_fake"] == pytest.approx(1 / (1 + np.exp(-logits.mean())), abs=1e-5)
        wrong_protocol.append(abs(p["prob_fake"] - np.mean(1 / (1 + np.exp(-logits)))))
    # Negative control: the mean of the ten probabilities would be caught on these images.
    assert max(wrong_protocol) > 0.01, wrong_protocol


def test_heads_and_perturbations_share_backbone_passes(
    tmp_path, tiny_checkpoint_dir, second_checkpoint, count_views
):
    root = tmp_path / "bench"
    make_files(root / "setA" / "0_real", 3, size=(64, 48))
    make_files(root / "setA" / "1_fake", 3, size=(64, 48))
    out = tmp_path / "out"
    args = ["eval", "--suite", "folder", "--root", str(root), "--out", str(out), "--no-progress", "--no-plots",
            "--model", str(tiny_checkpoint_dir), "--model", str(second_checkpoint), "--perturb", "none,jpeg",
            "--perturb", "blur", "--seed", "3"]
    assert main(args) == 0
    # 6 images x 3 transforms, whatever the number of heads
    assert count_views["views"] == 6 * 3
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert set(summary) == {
        f"{h}{c}" for h in ("tiny-rine", "tiny-rine-b") for c in ("", "/jpeg-s3", "/blur-s3")
    }
    md = (out / "summary.md").read_text(encoding="utf-8")
    assert "tiny-rine-b/jpeg-s3" in md
    # a head scored alongside another gives what it gives alone, and decoding (with the seeded
    # perturbations) in worker processes gives what it gives in threads
    alone = tmp_path / "alone"
    assert main(["eval", "--suite", "folder", "--root", str(root), "--out", str(alone), "--no-progress",
                 "--no-plots", "--model", str(second_checkpoint), "--perturb", "jpeg", "--seed", "3",
                 "--decoder", "processes", "--workers", "2"]) == 0
    a = read_jsonl(out / "tiny-rine-b" / "jpeg-s3" / "predictions.jsonl")
    b = read_jsonl(alone / "predictions.jsonl")
    assert [p["path"] for p in a] == [p["path"] for p in b]
    np.testing.assert_allclose([p["prob_fake"] for p in a], [p["prob_fake"] for p in b], atol=1e-6)
    assert [p["perturbed"] for p in a] == [p["perturbed"] for p in b]
    assert any(p["perturbed"] for p in a) and not all(p["perturbed"] for p in a)
    clean = read_jsonl(out / "tiny-rine-b" / "clean" / "predictions.jsonl")
    assert "perturbed" not in clean[0]
    # perturbed images score differently from clean ones, untouched ones (also resized) may too
    diff = [abs(x["prob_fake"] - y["prob_fake"]) for x, y in zip(a, clean, strict=True)]
    assert max(diff) > 0


def test_features_cache_skips_the_backbone(tmp_path, tiny_checkpoint_dir, count_views):
    pytest.importorskip("rine.training.features")
    root = tmp_path / "bench"
    make_files(root / "s" / "real", 2, size=(50, 50))
    make_files(root / "s" / "fake", 3, size=(50, 50))
    (root / "s" / "fake" / "broken.jpg").write_bytes(b"nope")
    cache = tmp_path / "cache"
    base = ["eval", "--suite", "folder", "--root", str(root), "--no-progress", "--no-plots",
            "--model", str(tiny_checkpoint_dir)]
    assert main([*base, "--out", str(tmp_path / "live")]) == 0
    live_views = count_views["views"]
    assert main([*base, "--out", str(tmp_path / "c1"), "--features-cache", str(cache)]) == 0
    assert count_views["views"] == 2 * live_views  # first cached run computes and stores
    assert main([*base, "--out", str(tmp_path / "c2"), "--features-cache", str(cache)]) == 0
    assert count_views["views"] == 2 * live_views  # second run: no backbone pass at all
    live = read_jsonl(tmp_path / "live" / "predictions.jsonl")
    cached = read_jsonl(tmp_path / "c2" / "predictions.jsonl")
    assert [p["path"] for p in live] == [p["path"] for p in cached]
    assert [bool(p["error"]) for p in cached] == [bool(p["error"]) for p in live] and sum(
        bool(p["error"]) for p in live
    ) == 1
    # the kind survives the tap store (its commit lines keep it): the same as the live run's
    assert [p["error_kind"] for p in cached] == [p["error_kind"] for p in live]
    assert [p["error_kind"] for p in live if p["error"]] == ["not_image"]
    np.testing.assert_allclose(
        [p["prob_fake"] for p in live if not p["error"]],
        [p["prob_fake"] for p in cached if not p["error"]],
        atol=1e-5,
    )
    m = json.loads((tmp_path / "c2" / "metrics.json").read_text())
    assert m["sets"]["s"]["n_errors"] == 1 and (
        m["sets"]["s"]["n_real"],
        m["sets"]["s"]["n_fake"],
    ) == (2, 3)


def test_single_class_set_and_errors(tmp_path, tiny_checkpoint_dir, capsys):
    root = tmp_path / "bench"
    make_files(root / "onlyreal" / "0_real", 3, size=(30, 30))
    out = tmp_path / "out"
    assert main(["eval", "--suite", "folder", "--root", str(root), "--out", str(out), "--no-progress",
                 "--model", str(tiny_checkpoint_dir)]) == 0
    m = json.loads((out / "metrics.json").read_text())["sets"]["onlyreal"]
    assert m["ap"] is None and m["auc"] is None and "only real" in m["notes"][0]
    assert (out / "roc.png").exists()
    assert main(["eval", "--suite", "ufd20", "--root", str(tmp_path / "nothing"), "--out", str(out),
                 "--model", str(tiny_checkpoint_dir)]) == 2
    assert "no test set" in capsys.readouterr().err
    assert main(["eval", "--suite", "folder", "--root", str(root), "--out", str(out), "--perturb", "rotate",
                 "--model", str(tiny_checkpoint_dir)]) == 2


def test_eval_says_what_the_folder_scans_skipped_per_set(tmp_path, tiny_checkpoint_dir, capsys, caplog):
    """The rule of rine detect (hidden files and other formats left out), and its summary:
    one line per set on stderr, the files at -v, the counts in metrics.json."""
    import logging

    root = tmp_path / "bench"
    make_files(root / "a" / "0_real", 2, size=(30, 30))
    make_files(root / "a" / "1_fake", 2, size=(30, 30), seed=5)
    make_files(root / "b" / "0_real", 2, size=(30, 30), seed=9)
    make_files(root / "b" / "1_fake", 2, size=(30, 30), seed=12)
    write_image(root / "a" / "0_real" / "._00.png", (30, 30), seed=20)  # macOS metadata: an image name, hidden
    (root / "a" / "1_fake" / "phone.heic").write_bytes(b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic")
    out = tmp_path / "out"
    caplog.set_level(logging.INFO, logger="rine.cli.eval")
    assert main(["eval", "--suite", "folder", "--root", str(root), "--out", str(out), "--no-progress", "--no-plots",
                 "--model", str(tiny_checkpoint_dir)]) == 0
    err = capsys.readouterr().err
    assert "rine: a: 2 files skipped: 1 .heic (HEIC, an unsupported format), 1 hidden (-v lists them)" in err, err
    assert "rine: b:" not in err
    for name in ("0_real/._00.png", "1_fake/phone.heic"):
        assert f"skipped {root / 'a' / name}" in caplog.text
    m = json.loads((out / "metrics.json").read_text())["sets"]
    assert (m["a"]["n_skipped"], m["a"]["skipped"]) == (2, {".heic": 1, "hidden": 1})
    assert (m["b"]["n_skipped"], m["b"]["skipped"]) == (0, {})
    assert (m["a"]["n_real"], m["a"]["n_fake"], m["a"]["n_errors"]) == (2, 2, 0)  # neither was scored
    assert "._00.png" not in (out / "predictions.jsonl").read_text()


def test_a_folder_that_cannot_be_read_stops_the_evaluation(tmp_path, tiny_checkpoint_dir, capsys, monkeypatch):
    """Skipping it would silently change a set's counts and metrics. Tests run as root in
    CI, where permissions do not stop reading: the refusal is simulated."""
    import os

    import rine.data.scan as scan  # the folder walk of every layout

    root = tmp_path / "bench"
    make_files(root / "s" / "0_real", 2, size=(30, 30))
    make_files(root / "s" / "1_fake" / "part", 2, size=(30, 30))
    real_walk = os.walk

    def walk(top, **kw):
        for here, dirs, files in real_walk(top, **kw):
            if here.endswith("part"):
                kw["onerror"](PermissionError(13, "Permission denied", here))
            yield here, dirs, files

    monkeypatch.setattr(scan.os, "walk", walk)
    assert main(["eval", "--suite", "folder", "--root", str(root), "--out", str(tmp_path / "out"), "--no-progress",
                 "--model", str(tiny_checkpoint_dir)]) == 2
    err = capsys.readouterr().err
    assert f"cannot read {root / 's' / '1_fake' / 'part'}: Permission denied" in err, err


def test_cached_scores_tie_at_one_like_the_live_path(tmp_path, tiny_checkpoint_dir):
    """Probabilities are float32 in both paths, as the reference's: above a logit of ~16.6
    they are exactly 1.0, and AP counts those images as tied."""
    from rine.data.layouts import read_layout
    from rine.evaluation.engine import evaluate
    from rine.inference.detector import Detector

    root = tmp_path / "bench"
    make_files(root / "s" / "real", 3, size=(50, 50))
    make_files(root / "s" / "fake", 3, size=(50, 50))
    detector = Detector.from_pretrained(str(tiny_checkpoint_dir), precision="fp32")
    sets = read_layout("folder", root).sets
    logits = [r["logit"] for r in evaluate(detector, sets, root=root).runs[0].records["s"]]
    with torch.no_grad():  # logits from 20 up: 1.0 in float32, not yet in float64 (below ~36.7)
        detector.model.head.head[-1].bias += 20.0 - min(logits)
    live = evaluate(detector, sets, root=root)
    cached = evaluate(detector, sets, root=root, cache_dir=tmp_path / "cache")
    for result in (live, cached):
        records = result.runs[0].records["s"]
        assert all(r["prob_fake"] == 1.0 and 19.9 < r["logit"] < 36 for r in records), records
        assert result.runs[0].metrics["sets"]["s"]["ap"] == pytest.approx(0.5)  # one threshold, half fakes
    assert [r["logit"] for r in live.runs[0].records["s"]] == [r["logit"] for r in cached.runs[0].records["s"]]


def test_write_image_helper_used(tmp_path):
    # guards the helper's contract the trees above rely on (odd names stay readable)
    p = write_image(tmp_path / "ü.v1.JPG", size=(9, 7), fmt="JPEG")
    from rine.data.images import load_image

    assert load_image(p).size == (9, 7)


def test_several_heads_on_a_backbone_file(
    tmp_path, tiny_openai_file, tiny_checkpoint_dir, second_checkpoint
):
    root = tmp_path / "bench"
    make_files(root / "s" / "0_real", 2, size=(40, 40))
    make_files(root / "s" / "1_fake", 2, size=(40, 40))
    out = tmp_path / "out"
    args = ["eval", "--suite", "folder", "--root", str(root), "--out", str(out), "--no-progress", "--no-plots",
            "--backbone", str(tiny_openai_file), "--head", str(tiny_checkpoint_dir), "--head", str(second_checkpoint),
            "--perturb", "crop", "--perturb-quirks", "reference"]
    assert main(args) == 0
    for name in ("tiny-rine", "tiny-rine-b"):
        m = json.loads((out / name / "crop-s0-reference" / "metrics.json").read_text())
        assert (m["sets"]["s"]["n_real"], m["sets"]["s"]["n_fake"]) == (2, 2)
    assert (
        main([*args[:-4], "--model", str(tiny_checkpoint_dir)]) == 2
    )  # --model with --head: usage error


def test_features_cache_with_ten_crop_derives_each_image_once(tmp_path, tiny_checkpoint_dir, monkeypatch):
    """The store's ten view slots come from one perturbation + ten-crop per image, and give
    what the live path gives."""
    import rine.evaluation.scoring

    calls = []
    make_views = rine.evaluation.scoring.make_views

    def counting(image, condition, key, preprocess):
        calls.append(key)
        return make_views(image, condition, key, preprocess)

    monkeypatch.setattr(rine.evaluation.scoring, "make_views", counting)
    root = tmp_path / "bench"
    make_files(root / "s" / "real", 2, size=(260, 250))
    make_files(root / "s" / "fake", 2, size=(260, 250))
    base = ["eval", "--suite", "folder", "--root", str(root), "--no-progress", "--no-plots", "--crop", "ten",
            "--perturb", "blur", "--model", str(tiny_checkpoint_dir)]
    assert main([*base, "--out", str(tmp_path / "cached"), "--features-cache", str(tmp_path / "cache")]) == 0
    assert sorted(calls) == sorted(set(calls)) and len(calls) == 4  # once per image, not per view slot
    assert main([*base, "--out", str(tmp_path / "live")]) == 0
    live = read_jsonl(tmp_path / "live" / "predictions.jsonl")
    cached = read_jsonl(tmp_path / "cached" / "predictions.jsonl")
    np.testing.assert_allclose([p["prob_fake"] for p in cached], [p["prob_fake"] for p in live], atol=1e-5)


def _no_loading(monkeypatch):
    """Make loading a model or scoring an image fail the test, for checks that must come first."""
    import rine.cli.eval
    import rine.evaluation.engine

    def forbidden(*a, **k):
        raise AssertionError("a model was loaded or images were scored before the usage check")

    monkeypatch.setattr(rine.cli.eval, "_load_models", forbidden)
    monkeypatch.setattr(rine.cli.eval, "load_detector", forbidden)
    monkeypatch.setattr(rine.evaluation.engine, "evaluate", forbidden)


def test_an_out_that_cannot_be_a_folder_fails_before_any_scoring(tmp_path, tiny_checkpoint_dir, monkeypatch, capsys):
    root = tmp_path / "bench"
    make_files(root / "s" / "0_real", 2, size=(40, 40))
    make_files(root / "s" / "1_fake", 2, size=(40, 40))
    _no_loading(monkeypatch)
    existing = tmp_path / "m.csv"
    existing.write_text("keep me")
    base = ["eval", "--suite", "folder", "--root", str(root), "--model", str(tiny_checkpoint_dir), "--no-progress"]
    cases = [
        (["--out", str(existing)], f"--out {existing}: is a file, not a folder"),
        (["--out", str(existing / "sub")], "is a file, so the folder cannot be created under it"),
        (["--out", str(tmp_path / "ok"), "--features-cache", str(existing)], f"--features-cache {existing}: is a file"),
    ]
    if Path("/proc/self").is_dir():  # cannot be created, even by root, whose permission checks all pass
        cases.append((["--out", "/proc/rine-no-such-folder"], "--out /proc/rine-no-such-folder: "))
    for extra, message in cases:
        assert main([*base, *extra]) == 2, extra
        err = capsys.readouterr().err
        assert err.startswith("rine: error: ") and message in err, err
        assert "Traceback" not in err and err.count("\n") == 1
    assert existing.read_text() == "keep me" and not (tmp_path / "ok").exists()


def test_an_error_about_a_second_model_keeps_its_quotes(tmp_path, tiny_checkpoint_dir, monkeypatch, capsys):
    import rine.model.pretrained

    root = tmp_path / "bench"
    make_files(root / "s" / "0_real", 1, size=(40, 40))
    make_files(root / "s" / "1_fake", 1, size=(40, 40))
    base = ["eval", "--suite", "folder", "--root", str(root), "--out", str(tmp_path / "out"), "--no-progress",
            "--model", str(tiny_checkpoint_dir)]
    # a KeyError loses only the quotes str() adds around it
    assert main([*base, "--model", "nosuch"]) == 2
    err = capsys.readouterr().err
    assert "rine: error: unknown pretrained model 'nosuch'; known: " in err and '"' not in err

    def refuse(name):
        raise FileNotFoundError(f"{name!r} is neither a checkpoint folder nor a known model")

    # a message that starts with a quote keeps it
    monkeypatch.setattr(rine.model.pretrained, "resolve_pretrained", refuse)
    assert main([*base, "--model", "nosuch"]) == 2
    assert "rine: error: 'nosuch' is neither a checkpoint folder nor a known model\n" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["eval", "train", "extract", "grid"])
def test_help_states_each_default(command, capsys):
    """Every option with a default says it in --help (`rine eval --max-depth` used not to)."""
    import argparse

    from rine.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    parser = sub.choices[command]
    for action in parser._actions:
        if action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            continue
        assert "default" in (action.help or "").lower(), f"rine {command} {action.option_strings[0]}"
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    if command == "eval":
        out = " ".join(capsys.readouterr().out.split())
        default = parser.get_default("max_depth")
        assert default == 6 and "how deep to look for real/fake folders (default 6)" in out


def test_exit_1_when_no_image_could_be_scored(tmp_path, tiny_checkpoint_dir, capsys):
    """A run whose every image is unreadable has empty metrics: exit 1, saying so; one readable
    image is enough for 0 (the unreadable ones are counted apart)."""
    root = tmp_path / "bench"
    for label in ("0_real", "1_fake"):
        (root / "s" / label).mkdir(parents=True)
        (root / "s" / label / "broken.png").write_bytes(b"not an image")
    base = ["eval", "--suite", "folder", "--root", str(root), "--no-progress", "--no-plots", "--model", str(tiny_checkpoint_dir)]
    assert main([*base, "--out", str(tmp_path / "none")]) == 1
    err = capsys.readouterr().err
    assert "no image could be scored" in err and "2 images could not be read" in err
    write_image(root / "s" / "1_fake" / "good.png", (64, 64))
    assert main([*base, "--out", str(tmp_path / "one")]) == 0
    assert "no image could be scored" not in capsys.readouterr().err


def test_eval_decides_on_logits_where_the_probability_cut_rounds_to_one(tmp_path, tiny_checkpoint_dir):
    """A calibrated cut at calibrated logit 39 is probability 1.0 in float64. The records'
    verdicts come from the logit (c = z + 40 > 39: every image synthetic), so ACC, acc_fake
    and F1 must count them so; `prob_fake > threshold` would call every image real."""
    import dataclasses

    from rine.config import CalibrationConfig
    from rine.data.layouts import read_layout
    from rine.evaluation.engine import evaluate
    from rine.evaluation.results import EvalHead
    from rine.inference.detector import Detector

    root = tmp_path / "bench"
    make_files(root / "s" / "real", 3, size=(50, 50))
    make_files(root / "s" / "fake", 2, size=(50, 50))
    detector = Detector.from_pretrained(str(tiny_checkpoint_dir), precision="fp32")
    cal = CalibrationConfig(method="platt", threshold_logit=39.0, scale=1.0, offset=40.0)
    head = EvalHead("cal", detector.head, dataclasses.replace(detector.config, calibration=cal))
    run = evaluate(detector, read_layout("folder", root).sets, root=root, heads=[head]).runs[0]
    records = run.records["s"]
    assert all(abs(r["logit"]) < 1 and r["verdict"] == "synthetic" for r in records), records
    m = run.metrics["sets"]["s"]
    assert (m["acc"], m["acc_real"], m["acc_fake"]) == (pytest.approx(2 / 5), 0.0, 1.0)
    assert m["f1"] == pytest.approx(2 * 2 / (2 * 2 + 3))
