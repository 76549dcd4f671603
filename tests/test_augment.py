"""Train augmentation: seeded per (seed, view, image), the reference's steps."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from rine.data.augment import (
    AugmentConfig,
    CenterView,
    TrainAugment,
    augment,
    gaussian_blur,
    jpeg,
    view_rng,
)


def noise(h: int, w: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_views_are_reproducible_and_distinct():
    img = noise(256, 300)
    aug = TrainAugment(seed=0)
    a = aug(img, index=4, view=0)
    assert a.shape == (224, 224, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, TrainAugment(seed=0)(img, 4, 0))
    assert not np.array_equal(a, aug(img, 4, 1))  # another view (epoch)
    assert not np.array_equal(a, TrainAugment(seed=1)(img, 4, 0))  # another seed


def test_crop_and_flip_without_blur_or_jpeg():
    img = noise(240, 260, seed=2)
    arr = np.asarray(img)
    plain = AugmentConfig(blur_prob=0, jpeg_prob=0, flip_prob=0)
    out = augment(img, view_rng(0, 0, 0), plain)
    # the output is one 224 window of the input
    hits = [(t, x) for t in range(17) for x in range(37) if np.array_equal(arr[t : t + 224, x : x + 224], out)]
    assert len(hits) == 1
    flipped = augment(img, view_rng(0, 0, 0), AugmentConfig(blur_prob=0, jpeg_prob=0, flip_prob=1))
    np.testing.assert_array_equal(flipped, out[:, ::-1])


def test_small_images_are_zero_padded():
    out = augment(noise(100, 150), view_rng(0, 0, 0), AugmentConfig(blur_prob=0, jpeg_prob=0, flip_prob=0))
    assert out.shape == (224, 224, 3)
    assert (out.reshape(-1, 3) == 0).all(axis=1).sum() >= 224 * 224 - 100 * 150


def test_blur_and_jpeg_change_pixels_and_keep_shape():
    arr = np.asarray(noise(64, 80))
    assert gaussian_blur(arr, 0.0) is arr
    blurred = gaussian_blur(arr, 2.0)
    assert blurred.shape == arr.shape and blurred.std() < arr.std() / 2
    for method in ("cv2", "pil"):
        out = jpeg(arr, 30, method)
        assert out.shape == arr.shape and out.dtype == np.uint8 and not np.array_equal(out, arr)
    # colours survive both encoders (OpenCV works in BGR: channels must come back in RGB order)
    red = np.zeros((32, 32, 3), np.uint8)
    red[..., 0] = 200
    for method in ("cv2", "pil"):
        assert np.abs(jpeg(red, 100, method).astype(int) - red).max() <= 3
    with pytest.raises(ValueError):
        jpeg(arr, 50, "gif")


def test_about_half_the_views_are_blurred():
    img = noise(224, 224)
    cfg = AugmentConfig(jpeg_prob=0, flip_prob=0)
    blurred = sum(not np.array_equal(augment(img, view_rng(0, i, 0), cfg), np.asarray(img)) for i in range(200))
    assert 70 < blurred < 130  # p = 0.5 (sigma near 0 can leave an image unchanged)


def test_center_view_is_the_test_transform():
    img = noise(300, 260)
    out = CenterView()(img, 0, 0)
    np.testing.assert_array_equal(out, np.asarray(img)[38:262, 18:242])
    assert "center" in CenterView().transform_id and "train-augment" in TrainAugment().transform_id


def test_blur_is_the_references_in_place_scipy_filter():
    from scipy.ndimage import gaussian_filter

    arr = np.random.default_rng(3).integers(0, 256, (40, 70, 3), dtype=np.uint8)
    expected = arr.copy()
    for c in range(3):  # the reference's call: each channel filtered into itself
        gaussian_filter(expected[:, :, c], output=expected[:, :, c], sigma=1.3)
    np.testing.assert_array_equal(gaussian_blur(arr, 1.3), expected)
