"""Each perturbation against its stated parameters, measured on the output where possible."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from PIL import Image

from rine.data import perturb as P


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def line_image(h: int = 32, w: int = 41) -> np.ndarray:
    """A one-pixel vertical white line on black: its blurred row profile is the 1-D kernel."""
    img = np.zeros((h, w, 3), np.uint8)
    img[:, w // 2] = 255
    return img


def test_blur_kernel_sizes_and_sigma():
    seen = set()
    for seed in range(40):
        out = P.blur(line_image(), rng(seed))
        row = out[16, :, 0].astype(int)
        width = int(np.count_nonzero(row))
        k = int(rng(seed).choice(P.BLUR_KERNELS))  # the same draw
        assert width == k
        # OpenCV's sigma for that kernel size (sigma=0 means derived from k)
        expected = cv2.getGaussianKernel(k, 0).ravel() * 255
        c = row.size // 2
        np.testing.assert_allclose(row[c - k // 2 : c + k // 2 + 1], expected, atol=1)
        seen.add(k)
    assert seen == {3, 5, 7, 9}


def test_blur_reference_quirk_uses_sigma_4():
    out = P.blur(line_image(), rng(3), quirks="reference")
    k = int(rng(3).choice(P.BLUR_KERNELS))
    expected = cv2.getGaussianKernel(k, 4.0).ravel() * 255
    c = 41 // 2
    np.testing.assert_allclose(out[16, c - k // 2 : c + k // 2 + 1, 0], expected, atol=1)


def test_crop_fraction_measured():
    h, w = 120, 200
    cols = np.tile(np.arange(w, dtype=np.uint8)[None, :, None], (h, 1, 3))
    fracs = []
    for seed in range(30):
        out = P.crop(cols, rng(seed))
        assert out.shape == cols.shape  # resized back to width x height
        f = rng(seed).uniform(*P.CROP_RANGE)
        dw = int(w * f * 0.5)
        # the first column now shows what was column dw (bicubic keeps a ramp's values)
        assert abs(int(out[h // 2, 0, 0]) - dw) <= 1
        measured = 2 * int(out[h // 2, 0, 0]) / w
        fracs.append(measured)
    assert 0.04 <= min(fracs) and max(fracs) <= 0.21
    assert max(fracs) - min(fracs) > 0.08  # the draw spans the range


def test_crop_reference_quirk_transposes_size():
    img = np.zeros((30, 50, 3), np.uint8)
    assert P.crop(img, rng(0), quirks="reference").shape == (50, 30, 3)
    assert P.crop(img, rng(0)).shape == (30, 50, 3)


def test_jpeg_quality_reaches_the_encoder(monkeypatch):
    calls = []
    real = cv2.imencode

    def spy(ext, img, params=()):
        calls.append(list(params))
        return real(ext, img, params)

    monkeypatch.setattr(P.cv2, "imencode", spy)
    img = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    qualities = []
    for seed in range(60):
        out = P.jpeg(img, rng(seed))
        q = int(rng(seed).integers(*P.JPEG_QUALITY_RANGE))
        assert calls[-1] == [cv2.IMWRITE_JPEG_QUALITY, q]
        ok, data = real(
            ".jpg", np.ascontiguousarray(img[:, :, ::-1]), [cv2.IMWRITE_JPEG_QUALITY, q]
        )
        np.testing.assert_array_equal(out, cv2.imdecode(data, cv2.IMREAD_COLOR)[:, :, ::-1])
        qualities.append(q)
    assert min(qualities) >= 10 and max(qualities) <= 74 and len(set(qualities)) > 20
    P.jpeg(img, rng(0), quirks="reference")
    assert calls[-1] == [cv2.IMWRITE_JPEG_QUALITY, 95]


def test_jpeg_keeps_colours_in_rgb_order():
    img = np.zeros((32, 32, 3), np.uint8)
    img[..., 0] = 220  # pure-ish red
    out = P.jpeg(img, rng(1))
    assert out[..., 0].mean() > 150 and out[..., 2].mean() < 60


def test_noise_std_measured():
    img = np.full((256, 256, 3), 128, np.uint8)
    stds = []
    for seed in range(12):
        out = P.noise(img, rng(seed)).astype(np.float64) - 128
        expected = rng(seed).uniform(*P.NOISE_STD_RANGE)
        assert abs(out.std() - expected) < 0.03 * expected + 0.05
        assert abs(out.mean()) < 0.2
        stds.append(out.std())
    assert 5 - 0.3 <= min(stds) and max(stds) <= 20 + 0.6


def test_combined_and_determinism():
    img = np.random.default_rng(0).integers(0, 256, (60, 80, 3), dtype=np.uint8)
    a = P.perturb(img, "combined", P.image_rng(7, "dir/x.png", "combined"))
    b = P.perturb(img, "combined", P.image_rng(7, "dir/x.png", "combined"))
    c = P.perturb(img, "combined", P.image_rng(7, "dir/y.png", "combined"))
    assert a.shape == img.shape and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    with pytest.raises(ValueError):
        P.perturb(img, "rotate", rng())


def test_robustness_protocol():
    image = Image.fromarray(
        np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8)
    )
    keys = [f"set/{i}.png" for i in range(400)]
    hits = [P.is_perturbed(0, k) for k in keys]
    assert 0.42 < np.mean(hits) < 0.58  # p = 0.5
    # the coin is shared by every kind, and fixed by (seed, key)
    for k, hit in zip(keys[:6], hits[:6], strict=True):
        out, was = P.robustness_image(image, "noise", 0, k)
        assert was == hit and out.size == (256, 256)  # both halves are resized to 256 x 256
        out2, _ = P.robustness_image(image, "noise", 0, k)
        assert np.array_equal(np.asarray(out), np.asarray(out2))
    clean_key = keys[hits.index(False)]
    out, was = P.robustness_image(image, "blur", 0, clean_key, quirks="reference")
    assert not was and out.size == image.size  # the reference leaves the clean half unresized
    out, _ = P.robustness_image(image, "blur", 0, clean_key)
    assert np.array_equal(np.asarray(out), np.asarray(image.resize((256, 256), Image.BILINEAR)))
    assert P.transform_id(None, 0) == "clean" and P.transform_id("jpeg", 3) == "jpeg-s3"


def test_noise_reference_quirk_truncates():
    img = np.full((64, 64, 3), 100, np.uint8)
    stated, quirk = (
        P.noise(img, rng(5)).astype(int),
        P.noise(img, rng(5), quirks="reference").astype(int),
    )
    diff = stated - quirk  # rounding vs truncation of the same noisy values
    assert set(np.unique(diff)) <= {0, 1} and diff.mean() == pytest.approx(0.5, abs=0.05)
