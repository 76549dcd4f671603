"""The re-encoding conditions of --stability (rine.data.reencode): each one's pixels are those
of the file Pillow writes as docs/stability.md defines it, decoded as rine decodes any file."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from PIL import Image

from rine.config import PreprocessConfig
from rine.data.images import load_image
from rine.data.reencode import (
    DEFAULT_CONDITIONS,
    REENCODINGS,
    encode,
    reencode,
    resolve_conditions,
    stability_views,
)
from rine.inference.stability import assess
from rine.model.calibration import DecisionRule

from support.stability import INPUTS, photo, pillow_file


def test_the_set_is_fixed_and_documented():
    assert DEFAULT_CONDITIONS == ("jpeg90", "jpeg70", "fit1080", "webp80")
    spec = {n: (r.format, r.quality, r.method, r.max_side, r.resample) for n, r in REENCODINGS.items()}
    assert spec == {"jpeg90": ("JPEG", 90, None, None, "LANCZOS"), "jpeg70": ("JPEG", 70, None, None, "LANCZOS"),
                    "fit1080": ("JPEG", 85, None, 1080, "LANCZOS"), "webp80": ("WEBP", 80, 4, 1080, "LANCZOS")}
    with pytest.raises(ValueError, match="unknown re-encoding 'jpeg50'"):
        resolve_conditions(["jpeg50"])


@pytest.mark.parametrize("name", list(INPUTS))
def test_reencoded_pixels_are_those_of_the_pillow_file(stability_inputs, name, tmp_path):
    """Catches any drift from the documented definition (quality, filter, size rounding,
    a missing downscale, RGB handling of grey stability_inputs): decoded pixels equal exactly."""
    image = load_image(stability_inputs[name])
    for cond in DEFAULT_CONDITIONS:
        ours = np.asarray(reencode(image, REENCODINGS[cond]))
        theirs = np.asarray(load_image(pillow_file(stability_inputs[name], cond, tmp_path)))
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


def test_the_files_own_views_are_those_detect_scores(stability_inputs):
    """The stability path decodes with Pillow (it needs the whole image); its first views
    must equal the crop-aware decoder's, which `rine detect` uses without the flag."""
    from rine.data.jpeg_crop import decode_views

    for crop in ("center", "ten", "resize"):
        pre = dataclasses.replace(PreprocessConfig(), crop=crop)
        for name in ("jpeg", "large", "small"):
            sv = stability_views(str(stability_inputs[name]), pre, resolve_conditions(["jpeg70"]))
            own = decode_views(str(stability_inputs[name]), pre)
            assert np.array_equal(sv.views[: len(own)], own)
            assert not np.array_equal(sv.views[len(own):], own)
