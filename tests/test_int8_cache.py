"""The disk cache of int8-smooth's calibration (rine.model.int8_cache): a cached build gives
bit-identical taps without calibrating, another backbone or plan gets its own entry, and a
damaged or unwritable cache costs only the calibration time."""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import pytest
import torch

from rine.model import int8_cache, quant, smooth
from rine.model.accel import FastTapEncoder

from support.int8_models import outlier_backbone

needs_int8 = pytest.mark.skipif(
    quant.int8_unavailable(torch.device("cpu")) is not None,
    reason=f"this CPU does not run int8: {quant.int8_unavailable(torch.device('cpu'))}",
)


@pytest.fixture(scope="module")
def model():
    """(backbone with outlier channels, so that some GEMMs are smoothed; images; uncached taps)."""
    backbone = outlier_backbone()
    pixels = smooth.calibration_pixels(6, seed=11)
    encoder = FastTapEncoder(backbone, "int8-smooth")
    assert encoder.smoothed, "the cache must be tested on a plan where smoothing was chosen"
    return backbone, pixels, encoder(pixels)


@pytest.fixture
def counted(monkeypatch):
    """How many times the float32 calibration pass runs."""
    calls = []
    real = smooth.ln_inputs

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(smooth, "ln_inputs", counting)
    return calls


@needs_int8
def test_a_cached_calibration_gives_the_same_taps_without_calibrating(model, counted, tmp_path):
    backbone, pixels, fresh = model
    first = FastTapEncoder(backbone, "int8-smooth", calibration_cache=tmp_path)
    assert len(counted) == 1 and len(list(tmp_path.glob("*.safetensors"))) == 1
    second = FastTapEncoder(backbone, "int8-smooth", calibration_cache=tmp_path)
    assert len(counted) == 1  # read, not calibrated again
    assert second.smoothed == first.smoothed
    assert torch.equal(first(pixels), fresh) and torch.equal(second(pixels), fresh)


@needs_int8
def test_another_backbone_or_plan_is_calibrated_again(model, counted, tmp_path, monkeypatch):
    """A stale entry (keyed on the name only, say) would give the tuned copy the original's
    ranges: one changed weight must change the key."""
    backbone, pixels, _ = model
    FastTapEncoder(backbone, "int8-smooth", calibration_cache=tmp_path)
    tuned = copy.deepcopy(backbone)
    with torch.no_grad():
        tuned.clip.encoder.layers[2].mlp.fc1.weight[3, 7] += 0.5
    assert int8_cache.cache_key(tuned.clip, smooth.PLANS["int8-smooth"]) != int8_cache.cache_key(
        backbone.clip, smooth.PLANS["int8-smooth"])
    cached = FastTapEncoder(tuned, "int8-smooth", calibration_cache=tmp_path)(pixels)
    assert len(counted) == 2
    assert torch.equal(cached, FastTapEncoder(tuned, "int8-smooth")(pixels))
    monkeypatch.setitem(smooth.PLANS, "int8-smooth", smooth.Int8Plan(kept_share=1 / 2, smooth=0.5, static=1.5))
    FastTapEncoder(backbone, "int8-smooth", calibration_cache=tmp_path)
    assert len(counted) == 4 and len(list(tmp_path.glob("*.safetensors"))) == 3


@needs_int8
def test_a_damaged_entry_is_replaced(model, counted, tmp_path, caplog):
    backbone, pixels, fresh = model
    FastTapEncoder(backbone, "int8-smooth", calibration_cache=tmp_path)
    (entry,) = tmp_path.glob("*.safetensors")
    entry.write_bytes(entry.read_bytes()[:100])  # torn
    with caplog.at_level(logging.WARNING, logger="rine.model.int8_cache"):
        encoder = FastTapEncoder(backbone, "int8-smooth", calibration_cache=tmp_path)
    assert "unusable" in caplog.text and str(entry) in caplog.text
    assert len(counted) == 2 and torch.equal(encoder(pixels), fresh)
    FastTapEncoder(backbone, "int8-smooth", calibration_cache=tmp_path)
    assert len(counted) == 2  # rewritten whole


def test_an_entry_that_does_not_fit_the_plan_is_refused(tmp_path):
    good = {"4.qkv": smooth.GemmCalibration(torch.full((8,), 2.0), -1.0, 3.0),
            "4.fc2": smooth.GemmCalibration(None, -0.2, 5.0)}
    expected = {"4.qkv": 8, "4.fc2": 32}
    int8_cache.save(tmp_path, "k", good)
    back = int8_cache.load(tmp_path, "k", expected)
    assert back["4.qkv"].lo == -1.0 and back["4.fc2"].hi == 5.0 and back["4.fc2"].s is None
    torch.testing.assert_close(back["4.qkv"].s, good["4.qkv"].s, rtol=0, atol=0)
    assert int8_cache.load(tmp_path, "k", {**expected, "5.qkv": 8}) is None  # a GEMM missing
    assert int8_cache.load(tmp_path, "k", {"4.qkv": 16, "4.fc2": 32}) is None  # s of the wrong width
    for bad in (smooth.GemmCalibration(torch.full((8,), -2.0), -1.0, 3.0),  # s must be > 0
                smooth.GemmCalibration(None, 3.0, -1.0),  # lo > hi
                smooth.GemmCalibration(None, float("nan"), 1.0)):
        int8_cache.save(tmp_path, "k", {**good, "4.qkv": bad})
        assert int8_cache.load(tmp_path, "k", expected) is None


@needs_int8
def test_an_unwritable_cache_only_costs_time(model, counted, tmp_path):
    backbone, pixels, fresh = model
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    encoder = FastTapEncoder(backbone, "int8-smooth", calibration_cache=blocker / "cache")
    assert torch.equal(encoder(pixels), fresh) and len(counted) == 1


@needs_int8
def test_the_detector_keeps_its_calibration_in_rine_home(model, tmp_path):
    """RINE_HOME is this test's own folder (conftest's _isolated_cache)."""
    import os

    from rine.config import HeadConfig, PreprocessConfig, RINEConfig
    from rine.inference.detector import Detector
    from rine.model.head import RINEHead
    from rine.model.rine_model import RINEModel

    backbone, pixels, _ = model
    head = RINEHead(HeadConfig(in_dim=backbone.width, n_blocks=backbone.n_blocks, nproj=1, proj_dim=16)).eval()
    config = RINEConfig(backbone="tiny", head=head.config, preprocess=PreprocessConfig())
    Detector(RINEModel(copy.deepcopy(backbone), head), config, precision="int8-smooth")
    home = Path(os.environ["RINE_HOME"])
    assert len(list((home / "int8-calibration").glob("*.safetensors"))) == 1
