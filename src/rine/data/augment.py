"""Train-time augmentation of the reference ("Blur+JPEG(0.5)" of CNNDetection), seeded per image.

    RGB image -> [p=0.5] Gaussian blur, sigma ~ U[0, 3], each channel
              -> [p=0.5] JPEG re-encode, encoder ~ {OpenCV, PIL}, quality ~ {30, 100}
              -> zero-pad to >= 224 (the reference cannot take smaller images)
              -> random 224 crop -> [p=0.5] horizontal flip -> uint8 [224, 224, 3]

Every random draw comes from a generator seeded by (seed, view, image index), so a view
depends only on those three numbers: an interrupted extraction, a rerun and the
end-to-end training loop all see the same pixels. `view` is the epoch when training
straight from images, and the view slot (0..K-1) in a feature store.

The blur is the reference's own: scipy's `gaussian_filter` on each channel, its result
written back into a uint8 array.
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .preprocess import center_crop_array, padded_shape, padded_window, ten_crop_arrays


@dataclass(frozen=True)
class AugmentConfig:
    """Probabilities and ranges of the train transform (defaults: the reference's)."""

    blur_prob: float = 0.5
    blur_sigma: tuple[float, float] = (0.0, 3.0)
    jpeg_prob: float = 0.5
    jpeg_quality: tuple[int, ...] = (30, 100)
    jpeg_methods: tuple[str, ...] = ("cv2", "pil")
    crop_size: int = 224
    flip_prob: float = 0.5

    def transform_id(self) -> str:
        """A string naming this transform exactly; stores refuse to mix different ones."""
        fields = ",".join(f"{k}={v}" for k, v in asdict(self).items())
        return f"train-augment/v2({fields})"  # v2: scipy blur (v1 used OpenCV)


def view_rng(seed: int, index: int, view: int) -> np.random.Generator:
    """The generator of one image's view: depends on nothing but these three numbers."""
    return np.random.default_rng([int(seed), int(view), int(index)])


def gaussian_blur(array: np.ndarray, sigma: float) -> np.ndarray:
    """Per-channel Gaussian blur of uint8 [H, W, 3], as the reference: scipy's
    `gaussian_filter` (radius 4 sigma, mirror border) with a uint8 output per channel."""
    from scipy.ndimage import gaussian_filter

    if sigma <= 0:
        return array  # scipy's filter with sigma 0 is the identity
    out = np.empty_like(array)
    for c in range(array.shape[2]):
        gaussian_filter(array[:, :, c], sigma=sigma, output=out[:, :, c])
    return out


def jpeg(array: np.ndarray, quality: int, method: str) -> np.ndarray:
    """Encode then decode uint8 RGB [H, W, 3] as JPEG with OpenCV or PIL."""
    if method == "cv2":
        import cv2

        ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(array[:, :, ::-1]), [int(cv2.IMWRITE_JPEG_QUALITY), int(quality)])
        if not ok:
            raise ValueError("OpenCV could not encode the image as JPEG")
        return np.ascontiguousarray(cv2.imdecode(buf, cv2.IMREAD_COLOR)[:, :, ::-1])
    if method == "pil":
        out = io.BytesIO()
        Image.fromarray(array).save(out, format="jpeg", quality=int(quality))
        out.seek(0)
        return np.asarray(Image.open(out, formats=("JPEG",)).convert("RGB"), dtype=np.uint8)
    raise ValueError(f"unknown JPEG method {method!r} (cv2 or pil)")


def augment(image: Image.Image | np.ndarray, rng: np.random.Generator, config: AugmentConfig = AugmentConfig()) -> np.ndarray:
    """RGB image -> one augmented training view, uint8 [crop, crop, 3].

    The draws happen in a fixed order whatever the outcome of the coin flips, so that
    changing one probability does not reshuffle the other draws.
    """
    array = np.array(image, dtype=np.uint8)  # a copy: the blur must not touch the caller's image
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"expected an RGB image, got array of shape {array.shape}")
    blur_coin, sigma = rng.random(), rng.uniform(*config.blur_sigma)
    jpeg_coin = rng.random()
    method = config.jpeg_methods[rng.integers(len(config.jpeg_methods))]
    quality = config.jpeg_quality[rng.integers(len(config.jpeg_quality))]
    if blur_coin < config.blur_prob:
        array = gaussian_blur(array, sigma)
    if jpeg_coin < config.jpeg_prob:
        array = jpeg(array, quality, method)
    size = config.crop_size
    h, w = padded_shape(array, size)
    top = int(rng.integers(0, h - size + 1))
    left = int(rng.integers(0, w - size + 1))
    array = padded_window(array, size, top, left)  # the zero padding is never built whole
    if rng.random() < config.flip_prob:
        array = array[:, ::-1]
    return np.ascontiguousarray(array)


class TrainAugment:
    """`make_views` for `extract_features`: (image, item index, view index) -> uint8 [S, S, 3]."""

    def __init__(self, seed: int = 0, config: AugmentConfig = AugmentConfig()):
        self.seed = int(seed)
        self.config = config

    @property
    def transform_id(self) -> str:
        return self.config.transform_id()

    def __call__(self, image: Image.Image, index: int, view: int) -> np.ndarray:
        return augment(image, view_rng(self.seed, index, view), self.config)


class CenterView:
    """The reference's validation/test transform as a `make_views`: CenterCrop(size), zero pad."""

    crop = "center"  # = crop_views(image, PreprocessConfig(size, crop="center")): jpeg_crop may decode it

    def __init__(self, size: int = 224):
        self.size = int(size)

    @property
    def transform_id(self) -> str:
        return f"center-crop/v1(size={self.size})"

    def __call__(self, image: Image.Image, index: int, view: int) -> np.ndarray:
        return np.ascontiguousarray(center_crop_array(np.asarray(image, dtype=np.uint8), self.size))


class TenCropViews:
    """The reference's Synthbuster / latent-diffusion test transform as a `make_views`:
    TenCrop(size) without resize; view v (0-9) is crop v, and an item's score is the mean
    of its ten view logits (how stores with several views are scored)."""

    VIEWS = 10
    crop = "ten"  # = crop_views(image, PreprocessConfig(size, crop="ten")): jpeg_crop may decode it

    def __init__(self, size: int = 224):
        self.size = int(size)
        self._last: tuple[int, list[np.ndarray]] | None = None  # the ten crops of the last image

    @property
    def transform_id(self) -> str:
        return f"ten-crop/v1(size={self.size})"

    def __call__(self, image: Image.Image, index: int, view: int) -> np.ndarray:
        last = self._last  # one read: decoding threads share this object (a race only recomputes)
        if last is None or last[0] != index:
            last = self._last = (index, ten_crop_arrays(np.asarray(image, dtype=np.uint8), self.size))
        return np.ascontiguousarray(last[1][view])


def cut_views(source, make_views, index: int, views: int, max_pixels: int | None, max_bytes: int | None) -> np.ndarray:
    """One image (a path or encoded bytes) -> uint8 [views, S, S, 3] as `make_views` cuts them
    for item `index` (`all_views` once if it has it, else view by view). The centre and ten
    crops of a baseline JPEG decode only their windows' pixels (`jpeg_crop`: the same bytes and
    errors as a full decode). Raises ImageLoadError for an unusable image; limits as given
    (None: no limit)."""
    from ..config import PreprocessConfig
    from .images import load_image
    from .jpeg_crop import CROPS, decode_views

    crop = getattr(make_views, "crop", None)
    if crop in CROPS and isinstance(source, (str, Path, bytes)):
        out = decode_views(source, PreprocessConfig(image_size=make_views.size, crop=crop), max_pixels, max_bytes)
    else:
        image = load_image(source, max_pixels=max_pixels, max_bytes=max_bytes)
        all_views = getattr(make_views, "all_views", None)  # every slot from one derivation
        out = np.asarray(all_views(image, index)) if all_views is not None else \
            np.stack([make_views(image, index, v) for v in range(views)])
    if len(out) != views:
        raise RuntimeError(f"{type(make_views).__name__} gave {len(out)} views, expected {views}")
    return out


TRANSFORMS = ("train", "center", "ten")


def views_for(transform: str, seed: int, size: int, views: int = 1) -> tuple[TrainAugment | CenterView | TenCropViews, int]:
    """`rine extract`'s --transform (train / center / ten) -> (its make_views, views per
    image): train cuts `views` random views, center one crop, ten its ten crops."""
    if transform == "train":
        return TrainAugment(seed), views
    if transform == "ten":
        return TenCropViews(size), TenCropViews.VIEWS
    if transform == "center":
        return CenterView(size), 1
    raise ValueError(f"transform must be one of {TRANSFORMS}, got {transform!r}")

