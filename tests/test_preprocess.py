"""Preprocessing against hand-computed crops (torchvision semantics, no torchvision)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from rine.config import CLIP_MEAN, CLIP_STD, PreprocessConfig
from rine.data.preprocess import (
    center_crop_array,
    crop_views,
    normalize,
    pad_to_min_size,
    ten_crop_arrays,
)


def grid(h, w):
    """uint8 [h, w, 3] whose pixel (y, x) encodes its own coordinates."""
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([y % 256, x % 256, (y * w + x) % 251], axis=-1).astype(np.uint8)


def test_center_crop_corner_uses_python_round():
    a = grid(301, 225)
    crop = center_crop_array(a, 224)
    # top = round(77 / 2) = round(38.5) = 38 (banker's rounding), left = round(0.5) = 0
    assert crop.shape == (224, 224, 3)
    assert crop[0, 0, 0] == 38 and crop[0, 0, 1] == 0
    b = grid(227, 231)
    # top = round(1.5) = 2, left = round(3.5) = 4
    c = center_crop_array(b, 224)
    assert (c[0, 0, 0], c[0, 0, 1]) == (2, 4)


def test_small_images_are_zero_padded_like_torchvision():
    a = grid(180, 200)  # H=180, W=200
    padded = pad_to_min_size(a, 224)
    assert padded.shape == (224, 224, 3)
    # torchvision pads (224-200)//2 = 12 left, 12 right; (224-180)//2 = 22 top, 22 bottom
    assert padded[:22].max() == 0 and padded[-22:].max() == 0
    assert padded[:, :12].max() == 0 and padded[:, -12:].max() == 0
    np.testing.assert_array_equal(padded[22:202, 12:212], a)
    odd = pad_to_min_size(grid(223, 221), 224)  # 1 and 3 missing: 0/1 and 1/2 split
    np.testing.assert_array_equal(odd[0:223, 1:222], grid(223, 221))
    np.testing.assert_array_equal(center_crop_array(a, 224), padded)


def test_ten_crop_order_and_flip():
    a = grid(300, 260)
    crops = ten_crop_arrays(a, 224)
    assert len(crops) == 10
    np.testing.assert_array_equal(crops[0], a[:224, :224])
    np.testing.assert_array_equal(crops[1], a[:224, 36:])
    np.testing.assert_array_equal(crops[2], a[76:, :224])
    np.testing.assert_array_equal(crops[3], a[76:, 36:])
    np.testing.assert_array_equal(crops[4], center_crop_array(a, 224))
    flipped = a[:, ::-1]
    np.testing.assert_array_equal(crops[5], flipped[:224, :224])
    np.testing.assert_array_equal(crops[9], center_crop_array(flipped, 224))


def test_normalize_is_totensor_then_normalize():
    x = torch.tensor([[[[0, 128, 255]]]], dtype=torch.uint8)  # [1, 1, 1, 3]
    out = normalize(x, CLIP_MEAN, CLIP_STD)
    assert out.shape == (1, 3, 1, 1)
    for c, v in enumerate([0, 128, 255]):
        expected = (np.float32(v) / np.float32(255) - np.float32(CLIP_MEAN[c])) / np.float32(CLIP_STD[c])
        assert out[0, c, 0, 0].item() == np.float32(expected)


def test_resize_mode_resizes_shorter_side_then_crops():
    img = Image.fromarray(grid(400, 600))
    views = crop_views(img, PreprocessConfig(crop="resize"))
    assert views.shape == (1, 224, 224, 3)
    resized = np.asarray(img.resize((336, 224), Image.BICUBIC))
    np.testing.assert_array_equal(views[0], center_crop_array(resized, 224))
    assert crop_views(img, PreprocessConfig(crop="ten")).shape == (10, 224, 224, 3)


def test_center_views_cut_by_pillow_equal_the_array_crop():
    """crop_views cuts the centre window with Pillow (no full-image copy); it must be the
    same pixels as center_crop_array, odd margins (banker's rounding) and padding included."""
    for h, w in [(224, 224), (225, 224), (301, 225), (480, 640), (1537, 2049), (200, 300), (100, 90)]:
        a = grid(h, w)
        views = crop_views(Image.fromarray(a), PreprocessConfig(crop="center"))
        assert views.shape == (1, 224, 224, 3) and views.flags.c_contiguous and views.flags.writeable
        np.testing.assert_array_equal(views[0], center_crop_array(a, 224))


def _padded_then_cut_ten(a, size):
    """TenCrop the slow way: materialise the zero padding, then slice (the definition)."""
    p = pad_to_min_size(a, size)
    h, w = p.shape[:2]

    def five(x):
        return [x[:size, :size], x[:size, w - size :], x[h - size :, :size], x[h - size :, w - size :],
                center_crop_array(x, size)]

    return five(p) + five(p[:, ::-1])


def test_crops_of_small_and_thin_images_equal_padding_then_cutting():
    rng = np.random.default_rng(0)
    for _ in range(300):
        h, w = (int(v) for v in rng.integers(1, 70, 2))
        size = int(rng.integers(1, 50))
        a = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        p = pad_to_min_size(a, size)
        top, left = int(round((p.shape[0] - size) / 2.0)), int(round((p.shape[1] - size) / 2.0))
        np.testing.assert_array_equal(center_crop_array(a, size), p[top : top + size, left : left + size])
        for got, want in zip(ten_crop_arrays(a, size), _padded_then_cut_ten(a, size), strict=True):
            np.testing.assert_array_equal(got, want)


def test_a_thin_image_is_cropped_without_building_its_padding():
    # 1 x 3,000,000 px: padding it whole to width 224 would take 2 GB; the crops take 224 x 224.
    thin = Image.new("RGB", (1, 3_000_000), (200, 100, 50))
    for crop in ("center", "ten"):
        views = crop_views(thin, PreprocessConfig(crop=crop))
        assert views.shape == ((10 if crop == "ten" else 1), 224, 224, 3) and views.nbytes <= 10 * 224 * 224 * 3
        column = 223 - 111 if crop == "ten" else 111  # the image's one column: pad (224 - 1) // 2 = 111 on the left
        assert (views[0, :, 111] == (200, 100, 50)).all() and views[0, :, :111].max() == 0
        assert views[-1, :, column].tolist() == views[0, :, 111].tolist()


def test_resize_refuses_images_too_elongated_to_resize():
    import pytest

    from rine.data.images import ImageLoadError
    from rine.data.preprocess import MAX_RESIZE_ASPECT

    ok = Image.new("RGB", (10, 10 * MAX_RESIZE_ASPECT))
    assert crop_views(ok, PreprocessConfig(crop="resize")).shape == (1, 224, 224, 3)
    with pytest.raises(ImageLoadError, match="too elongated") as e:
        crop_views(Image.new("RGB", (1, 100_000)), PreprocessConfig(crop="resize"))
    assert e.value.kind == "too_many_pixels"
