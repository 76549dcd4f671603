"""Helpers of the --stability tests (tests/test_reencode.py, test_stability.py,
test_eval_stability.py, test_stability_interfaces.py): photo-like inputs, the files Pillow
writes as docs/stability.md defines the conditions, and a cut among an image's re-encodings."""

from __future__ import annotations

import numpy as np
from PIL import Image

from rine.data.reencode import resolve_conditions, stability_views
from rine.inference.stability import assess, split_logits


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


def rule_cutting_between(values: list[float], own: float) -> float:
    """A logit cut between two adjacent values such that both sides hold a condition."""
    ranked = sorted([own, *values])
    r = ranked.index(own)
    lo, hi = (ranked[-2], ranked[-1]) if r <= len(ranked) // 2 else (ranked[0], ranked[1])
    assert hi - lo > 1e-4, ranked
    return (lo + hi) / 2




def write_inputs(folder) -> dict:
    """INPUTS written into `folder` -> {name: path}."""
    out = {}
    for i, (name, (size, mode, fmt, opts)) in enumerate(INPUTS.items()):
        path = folder / f"{name}.{fmt.lower()}"
        photo(size, seed=i, mode=mode).save(path, fmt, **opts)
        out[name] = path
    return out
