"""rine's errors: one base class, lookups that are LookupErrors, option errors that name the
library's parameters and are rendered as flags by the CLI, and per-file records that carry a
stable `error_kind` besides the text."""

from __future__ import annotations

import json

import pytest

from conftest import write_image


def test_option_errors_name_parameters_and_the_cli_renders_flags():
    from rine.cli.common import cli_error
    from rine.errors import OptionError, RineError

    e = OptionError("{device}: no GPU here; use {device=cpu} or lower {num_gpus}", device="cuda:3")
    assert isinstance(e, RineError) and isinstance(e, ValueError)
    assert str(e) == "device=cuda:3: no GPU here; use device=cpu or lower num_gpus="
    assert str(cli_error(e)) == "--device cuda:3: no GPU here; use --device cpu or lower --num-gpus"


def test_an_unknown_model_is_a_lookup_error_with_a_clean_message(monkeypatch, tmp_path):
    from rine.errors import RineError, UnknownNameError
    from rine.inference.loading import ModelOptions, load_detector

    monkeypatch.setenv("RINE_HOME", str(tmp_path))
    with pytest.raises(LookupError) as caught:
        load_detector(ModelOptions(model="no-such-model"))
    assert isinstance(caught.value, UnknownNameError) and isinstance(caught.value, RineError)
    assert str(caught.value).startswith("'no-such-model' is neither a checkpoint folder, a known model (rine-")


def test_model_options_that_do_not_fit_are_refused_before_loading(tmp_path):
    from rine.errors import OptionError
    from rine.inference.loading import ModelOptions, load_detector, model_config

    head = tmp_path / "head.pth"
    for options, text in ((ModelOptions(head=str(head)), "head= needs backbone="),
                          (ModelOptions(model="m", backbone="b", head=str(head)), "give either model= or backbone=/head="),
                          (ModelOptions(model=str(tmp_path), backend="onnxruntime"),
                           f"backend=onnxruntime: model={tmp_path} is not an export folder")):
        for load in (load_detector, model_config):
            with pytest.raises(OptionError) as caught:
                load(options)
            assert str(caught.value).startswith(text)


def test_rine_batch_says_its_option_errors_as_flags(tmp_path, capsys):
    pytest.importorskip("ray")
    from rine.cli import main

    write_image(tmp_path / "a.png")
    base = ["batch", str(tmp_path / "a.png"), "--out", str(tmp_path / "o"), "--no-progress"]
    assert main([*base, "--head", str(tmp_path / "h.pth")]) == 2
    assert "rine: error: --head needs --backbone (the CLIP encoder the head was trained on)" in capsys.readouterr().err
    assert main([*base, "--taps"]) == 2
    assert "rine: error: --taps needs --backbone" in capsys.readouterr().err


def test_records_carry_a_stable_error_kind(tiny_detector, tiny_checkpoint_dir, tmp_path, capsys):
    """Each failure's kind, from the error itself (not its text); a scored image has none."""
    from rine.cli import main
    from rine.data.decoding import DecodeOptions

    ok = write_image(tmp_path / "ok.png", seed=1)
    big = write_image(tmp_path / "big.png", size=(300, 300), seed=2)
    (tmp_path / "empty.png").write_bytes(b"")
    whole = write_image(tmp_path / "whole.png", seed=3).read_bytes()
    (tmp_path / "broken.png").write_bytes(whole[: len(whole) // 2])  # truncated: a PNG, cut
    (tmp_path / "notes.png").write_text("hello")
    limit, tiny_detector.max_pixels = tiny_detector.max_pixels, 300 * 300 - 1
    try:
        preds = tiny_detector.predict([str(ok), str(big), str(tmp_path / "empty.png"), str(tmp_path / "broken.png"),
                                       str(tmp_path / "notes.png"), str(tmp_path / "missing.png")], decode=DecodeOptions(decoder="threads"))
    finally:
        tiny_detector.max_pixels = limit
    assert [p.error_kind for p in preds] == [None, "too_many_pixels", "empty", "corrupt", "not_image", "missing"]
    assert all((p.error is None) == (p.error_kind is None) for p in preds)
    assert "error_kind" not in preds[0].to_dict() and preds[5].to_dict()["error_kind"] == "missing"

    capsys.readouterr()
    code = main(["detect", str(ok), str(tmp_path / "missing.png"), "--model", str(tiny_checkpoint_dir),
                 "--format", "jsonl", "--no-progress"])
    out = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert code == 1 and [r.get("error_kind") for r in out] == [None, "missing"]

