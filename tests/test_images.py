"""Decoding claims of README's "Faithful to the reference": no EXIF rotation, float and 32-bit
integer images refused, the 64 M-pixel and 64 MiB defaults, AVIF and PGM opening."""

from __future__ import annotations

import io
import json
import zlib

import numpy as np
import pytest
from PIL import Image, ImageOps

from rine.cli import main
from rine.data.images import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS, ImageLoadError, load_image

from conftest import score_pixels, write_image


def _noise(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_exif_orientation_is_not_applied(tmp_path, sensitive_detector):
    """A camera JPEG with Orientation=6 (display rotated 90 degrees) is scored as its stored
    pixels, as the reference's `Image.open(p).convert("RGB")` does: not rotated."""
    stored = Image.fromarray(_noise(260, 340, seed=1))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW to display
    path = tmp_path / "camera.jpg"
    stored.save(path, format="JPEG", quality=95, exif=exif.tobytes())
    with Image.open(path) as f:
        assert f.getexif()[0x0112] == 6
        raw = np.asarray(f.convert("RGB"))
        rotated = np.asarray(ImageOps.exif_transpose(f).convert("RGB"))
    assert rotated.shape[:2] == (340, 260)  # the rotation is real: a wrong decode is detectable
    loaded = load_image(path)
    assert loaded.size == (340, 260)
    np.testing.assert_array_equal(np.asarray(loaded), raw)
    prob = sensitive_detector.predict([str(path)])[0].prob_fake
    assert prob == pytest.approx(score_pixels(sensitive_detector, raw), abs=1e-6)
    assert abs(prob - score_pixels(sensitive_detector, np.ascontiguousarray(rotated))) > 1e-3  # negative control


@pytest.mark.parametrize(
    "mode, array",
    [
        ("F", np.linspace(0, 1, 64 * 48, dtype=np.float32).reshape(48, 64)),
        ("I", (np.arange(64 * 48, dtype=np.int32) * 1000).reshape(48, 64)),
    ],
)
def test_float_and_32_bit_images_are_refused(tmp_path, mode, array):
    """Values beyond 0..255 that `convert("RGB")` would clip: refused, from a file and as an image."""
    img = Image.fromarray(array)
    assert img.mode == mode
    path = tmp_path / f"{mode}.tif"
    img.save(path, format="TIFF")
    for source in (path, path.read_bytes(), img):
        with pytest.raises(ImageLoadError, match=f"unsupported image mode '{mode}'") as e:
            load_image(source)
        assert e.value.kind == "bad_mode"


def _png_header_claiming(width: int, height: int) -> bytes:
    """A PNG whose (valid) header claims width x height; no real pixel data follows."""
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    data[16:24] = width.to_bytes(4, "big") + height.to_bytes(4, "big")
    data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")
    return bytes(data)


def test_default_limits_are_64_megapixels_and_64_mib(capsys, tmp_path, tiny_checkpoint_dir):
    """`rine detect` without --max-pixels / --max-bytes refuses 64,000,001+ pixels (from the
    header) and files over 64 MiB (from their size), and lets exactly the limits through to
    decoding (where these fakes then fail for other reasons)."""
    assert (DEFAULT_MAX_PIXELS, DEFAULT_MAX_BYTES) == (64_000_000, 64 * 2**20)
    files = {
        "over-pixels.png": _png_header_claiming(8001, 8000),
        "at-pixels.png": _png_header_claiming(8000, 8000),
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    for name, size in (("over-bytes.png", DEFAULT_MAX_BYTES + 1), ("at-bytes.png", DEFAULT_MAX_BYTES)):
        with open(tmp_path / name, "wb") as f:
            f.truncate(size)  # sparse: no disk used
    code = main(["detect", str(tmp_path), "--model", str(tiny_checkpoint_dir), "--format", "jsonl", "--no-progress"])
    out, _ = capsys.readouterr()
    assert code == 1
    errors = {r["path"].rsplit("/", 1)[-1]: r["error"] for r in map(json.loads, out.splitlines())}
    assert "too many pixels" in errors["over-pixels.png"] and "64000000" in errors["over-pixels.png"]
    assert "too many pixels" not in errors["at-pixels.png"]
    assert "file too large" in errors["over-bytes.png"] and str(DEFAULT_MAX_BYTES) in errors["over-bytes.png"]
    assert "file too large" not in errors["at-bytes.png"]


@pytest.mark.parametrize("fmt, suffix, mode", [("AVIF", ".avif", "RGB"), ("PPM", ".pgm", "L"), ("PPM", ".ppm", "RGB")])
def test_avif_and_netpbm_files_open(tmp_path, fmt, suffix, mode):
    from PIL import features

    if fmt == "AVIF" and not features.check("avif"):
        pytest.skip("this Pillow is built without AVIF")
    path = write_image(tmp_path / f"x{suffix}", size=(48, 40), mode=mode, seed=2, fmt=fmt)
    with Image.open(path) as f:
        assert f.format == fmt and f.mode == mode
        expected = np.asarray(f.convert("RGB"))
    loaded = load_image(path)
    assert loaded.size == (48, 40)
    np.testing.assert_array_equal(np.asarray(loaded), expected)  # lossy AVIF: as Pillow decodes it
