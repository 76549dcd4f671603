"""Crop-aware JPEG decoding (`rine.data.jpeg_crop`) against today's path, byte for byte.

Today's path is `crop_views(load_image(...))` (Pillow decodes the whole image). Every
input here goes through both; the views must be equal and the errors of the same kind.
Where the fast path is expected to be taken, the tests check that it was (else a broken
extension that always falls back would pass them).
"""

from __future__ import annotations

import io
import logging
import struct
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rine.config import PreprocessConfig
from rine.data import jpeg_crop
from rine.data.images import ImageLoadError, load_image, open_header
from rine.data.preprocess import crop_views, ten_crop_arrays

from conftest import OFFICIAL, PARITY

CROPS = ("center", "ten")
native = jpeg_crop._native()
needs_native = pytest.mark.skipif(
    native is None,
    reason="rine.data._jpeg_crop is not built (python setup.py build_ext --inplace; needs libjpeg62-turbo-dev)",
)


# ----------------------------------------------------------------------------- inputs
def picture(w: int, h: int, seed: int) -> np.ndarray:
    """uint8 [h, w, 3]: gradients, saturated rectangles with sharp edges (chroma
    upsampling errors show there) and noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), (x + 2 * y) % 256], -1).astype(np.int32)
    for _ in range(12):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        img[y0 : y0 + int(rng.integers(3, 200)), x0 : x0 + int(rng.integers(3, 200))] = rng.integers(0, 256, 3)
    img += rng.integers(-25, 26, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def pil_jpeg(pixels: np.ndarray, mode: str = "RGB", **save) -> bytes:
    buf = io.BytesIO()
    image = Image.fromarray(pixels)
    if mode != "RGB":
        image = image.convert(mode)
    image.save(buf, "JPEG", **save)
    return buf.getvalue()


def cv2_jpeg(pixels: np.ndarray, **params) -> bytes:
    cv2 = pytest.importorskip("cv2")
    flags = []
    for name, value in params.items():
        flags += [getattr(cv2, name), value]
    ok, enc = cv2.imencode(".jpg", np.ascontiguousarray(pixels[:, :, ::-1]), flags)
    assert ok
    return enc.tobytes()


# ----------------------------------------------------------------------------- oracles
def outcome(fn, data, crop, **limits):
    """("ok", views) or ("error", kind) of one decoding path."""
    try:
        return "ok", fn(data, PreprocessConfig(crop=crop), **limits)
    except ImageLoadError as e:
        return "error", e.kind


def today(data, pre, **limits):
    return crop_views(load_image(data, **limits), pre)


def assert_same(data, crop, **limits) -> str:
    """Both paths agree on `data`; returns "ok" or "error"."""
    want = outcome(today, data, crop, **limits)
    got = outcome(jpeg_crop.decode_views, data, crop, **limits)
    assert got[0] == want[0], (got[0], want[0], got[1] if got[0] == "error" else want[1])
    if want[0] == "ok":
        assert got[1].dtype == np.uint8 and got[1].shape == want[1].shape
        assert got[1].flags.c_contiguous
        if not np.array_equal(got[1], want[1]):
            diff = np.abs(got[1].astype(int) - want[1].astype(int))
            bad = np.argwhere(diff.max(-1) > 0)
            raise AssertionError(f"views differ: max {diff.max()} at {len(bad)} pixels, first (view, y, x) {bad[:3].tolist()}")
    else:
        assert got[1] == want[1]
    return want[0]


def fast_path_taken(data, crop, size=224) -> bool:
    image = open_header(data, None)
    return jpeg_crop._crop_aware(native, image, data, size, crop) is not None


# ----------------------------------------------------------------------------- windows
@pytest.mark.parametrize("hw", [(224, 224), (225, 301), (301, 225), (480, 640), (227, 231)])
def test_crop_windows_are_ten_crop_arrays(hw):
    """The windows the fast path cuts are TenCrop's, mirrored ones included (a grid
    whose pixels encode their coordinates catches an off-by-one mirror offset)."""
    h, w = hw
    y, x = np.mgrid[0:h, 0:w]
    grid = np.stack([y % 256, x % 256, (y * w + x) % 251], -1).astype(np.uint8)
    windows = jpeg_crop.crop_windows(w, h, 224, "ten")
    cut = [grid[t : t + 224, le : le + 224][:, ::-1] if m else grid[t : t + 224, le : le + 224] for t, le, m in windows]
    assert all(np.array_equal(a, b) for a, b in zip(cut, ten_crop_arrays(grid, 224), strict=True))
    (t, le, m), = jpeg_crop.crop_windows(w, h, 224, "center")
    assert not m and (t, le) == (int(round((h - 224) / 2)), int(round((w - 224) / 2)))


def test_bands_merge_overlapping_windows():
    assert jpeg_crop._bands([(0, 0, False), (100, 5, False), (500, 0, True)], 224) == [(0, 324), (500, 724)]
    assert jpeg_crop._bands([(0, 0, False), (224, 0, False)], 224) == [(0, 448)]


# ----------------------------------------------------------------------------- corpus
# Odd sizes put the windows at every offset modulo the 16-pixel MCU; 224 and 225 put
# them at the image's edges, where the widened column window is clamped.
SIZES = [(224, 224), (225, 224), (224, 239), (241, 257), (333, 299), (512, 384), (517, 403), (640, 480), (1001, 743)]


@needs_native
@pytest.mark.parametrize("subsampling", ["4:4:4", "4:2:2", "4:2:0"])
def test_baseline_pillow_encoded(subsampling):
    rng = np.random.default_rng(["4:4:4", "4:2:2", "4:2:0"].index(subsampling))
    for i, (w, h) in enumerate(SIZES):
        data = pil_jpeg(picture(w, h, i), quality=int(rng.integers(40, 99)), subsampling=subsampling)
        for crop in CROPS:
            assert fast_path_taken(data, crop), (w, h, crop)
            assert assert_same(data, crop) == "ok"


@needs_native
@pytest.mark.parametrize("sampling", ["444", "422", "420", "440", "411"])
def test_baseline_opencv_encoded_with_restart_markers(sampling):
    """OpenCV's encoder (another libjpeg configuration), with and without restart markers;
    4:4:0 (vertical-only subsampling) is decoded crop-aware, 4:1:1 goes to Pillow."""
    cv2 = pytest.importorskip("cv2")
    for i, (w, h) in enumerate([(333, 299), (640, 480), (517, 403)]):
        for rst in (0, 1, 3):
            data = cv2_jpeg(picture(w, h, 10 + i), IMWRITE_JPEG_QUALITY=85, IMWRITE_JPEG_RST_INTERVAL=rst,
                            IMWRITE_JPEG_SAMPLING_FACTOR=getattr(cv2, f"IMWRITE_JPEG_SAMPLING_FACTOR_{sampling}"))
            for crop in CROPS:
                assert fast_path_taken(data, crop) == (sampling != "411")
                assert assert_same(data, crop) == "ok"


@needs_native
def test_pillow_restart_markers():
    for i, params in enumerate([{"restart_marker_blocks": 1}, {"restart_marker_blocks": 7}, {"restart_marker_rows": 2}]):
        data = pil_jpeg(picture(517, 403, 20 + i), quality=90, **params)
        assert b"\xff\xdd" in data  # DRI: the file has restart markers
        for crop in CROPS:
            assert fast_path_taken(data, crop)
            assert assert_same(data, crop) == "ok"


@needs_native
def test_greyscale_is_replicated_like_convert_rgb():
    for i, (w, h) in enumerate([(224, 224), (333, 299), (640, 480)]):
        data = pil_jpeg(picture(w, h, 30 + i), mode="L", quality=90)
        for crop in CROPS:
            assert fast_path_taken(data, crop)
            assert assert_same(data, crop) == "ok"


@needs_native
@pytest.mark.parametrize("kind", ["progressive", "cmyk", "small", "thin", "png"])
def test_what_the_extension_does_not_decode_goes_to_pillow(kind):
    px = picture(400, 300, 40)
    data = {
        "progressive": lambda: pil_jpeg(px, quality=90, progressive=True),
        "cmyk": lambda: pil_jpeg(px, mode="CMYK", quality=90),
        "small": lambda: pil_jpeg(picture(200, 180, 41), quality=90),  # zero-padded crops
        "thin": lambda: pil_jpeg(picture(500, 223, 42), quality=90),
        "png": lambda: (lambda b: (Image.fromarray(px).save(b, "PNG"), b.getvalue())[1])(io.BytesIO()),
    }[kind]()
    for crop in CROPS:
        assert not fast_path_taken(data, crop)
        assert assert_same(data, crop) == "ok"


@needs_native
def test_exif_orientation_and_icc_are_ignored_as_today():
    px = picture(517, 403, 50)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to view": load_image does not rotate, so neither may this
    from PIL import ImageCms

    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    for extra in ({"exif": exif.tobytes()}, {"icc_profile": icc}, {"exif": exif.tobytes(), "icc_profile": icc}):
        data = pil_jpeg(px, quality=90, **extra)
        for crop in CROPS:
            assert fast_path_taken(data, crop)
            assert assert_same(data, crop) == "ok"


@needs_native
def test_mpo_first_frame():
    frames = [Image.fromarray(picture(517, 403, 60)), Image.fromarray(picture(517, 403, 61))]
    buf = io.BytesIO()
    frames[0].save(buf, "MPO", save_all=True, append_images=frames[1:], quality=90)
    data = buf.getvalue()
    assert open_header(data, None).format == "MPO"
    for crop in CROPS:
        assert fast_path_taken(data, crop)
        assert assert_same(data, crop) == "ok"


# ----------------------------------------------------------------------------- bad files
def _scan_start(data: bytes) -> int:
    """Offset of the first byte of entropy-coded data (after the SOS segment)."""
    sos = data.index(b"\xff\xda")
    return sos + 2 + struct.unpack(">H", data[sos + 2 : sos + 4])[0]


@needs_native
def test_truncated_files_give_todays_result():
    """Cut above, inside and below the windows, just before EOI, and only EOI: Pillow
    raises on most (truncated), libjpeg-turbo would only warn; the outcomes must agree."""
    data = pil_jpeg(picture(517, 643, 70), quality=90, subsampling="4:2:0")
    start, n = _scan_start(data), len(data)
    cuts = sorted({int(start + f * (n - start)) for f in np.linspace(0.02, 0.995, 25)} | {n - 2, n - 1, start, 20, 2})
    kinds = {}
    for cut in cuts:
        for crop in CROPS:
            kinds[assert_same(data[:cut], crop)] = cut
    assert "error" in kinds  # truncation is an error today; a fast path that missed it fails above


@needs_native
def test_corrupt_files_give_todays_result():
    """Bit flips all over the entropy-coded data, markers inserted below the windows (a
    second SOF, a second SOS: fatal in Pillow's full decode), garbage instead of EOI,
    garbage after EOI."""
    rng = np.random.default_rng(80)
    data = pil_jpeg(picture(517, 643, 80), quality=90, subsampling="4:2:0")
    start, n = _scan_start(data), len(data)
    variants = []
    for pos in rng.integers(start, n - 2, 40):
        b = bytearray(data)
        b[pos] ^= 1 << int(rng.integers(0, 8))
        variants.append(bytes(b))
    late = start + int(0.9 * (n - start))  # below every window
    late = data.index(b"\xff", late) if data.find(b"\xff", late) > 0 else late  # not inside a stuffed FF 00
    sof = data[data.index(b"\xff\xc0") : data.index(b"\xff\xc0") + 2 + struct.unpack(">H", data[data.index(b"\xff\xc0") + 2 : data.index(b"\xff\xc0") + 4])[0]]
    sos = data[data.index(b"\xff\xda") : start]
    variants += [
        data[:late] + sof + data[late:],
        data[:late] + sos + data[late:],
        data[:late] + b"\xff\xfe\x00\x04ok" + data[late:],  # a COM marker inside the scan
        data[:-2] + b"\x00" * 64,  # EOI replaced by zeros
        data + b"garbage after EOI",
        data[: start + 100] + b"\xff\xd9",  # EOI early: Pillow fills the rest and succeeds
    ]
    outcomes = {assert_same(v, crop) for v in variants for crop in CROPS}
    assert outcomes == {"ok", "error"}  # both kinds occur, so both were compared


def test_header_errors_and_limits_are_todays():
    data = pil_jpeg(picture(517, 403, 90), quality=90)
    for crop in CROPS:
        assert assert_same(b"", crop) == "error"
        assert assert_same(b"not an image at all", crop) == "error"
        assert assert_same(data[:200], crop) == "error"
        assert outcome(jpeg_crop.decode_views, data, crop, max_pixels=517 * 403 - 1) == ("error", "too_many_pixels")
        assert outcome(jpeg_crop.decode_views, data, crop, max_bytes=len(data) - 1) == ("error", "too_large")
        assert assert_same(data, crop, max_pixels=517 * 403, max_bytes=len(data)) == "ok"


def test_paths_and_pixel_reservations(tmp_path):
    data = pil_jpeg(picture(517, 403, 91), quality=90)
    path = tmp_path / "a.jpg"
    path.write_bytes(data)
    pre = PreprocessConfig(crop="center")
    assert np.array_equal(jpeg_crop.decode_views(path, pre), today(path, pre))
    assert np.array_equal(jpeg_crop.decode_views(str(path), pre), today(data, pre))
    with pytest.raises(ImageLoadError) as e:
        jpeg_crop.decode_views(tmp_path / "missing.jpg", pre)
    assert e.value.kind == "missing"
    seen = []

    def refuse(pixels):
        seen.append(pixels)
        raise ImageLoadError("over budget", "too_many_pixels")

    with pytest.raises(ImageLoadError) as e:
        jpeg_crop.decode_views(data, pre, reserve_pixels=refuse)
    assert e.value.kind == "too_many_pixels" and seen == [517 * 403]
    # PIL images and arrays are not files: today's path, same views
    image = load_image(data)
    assert np.array_equal(jpeg_crop.decode_views(image, pre), crop_views(image, pre))
    assert np.array_equal(jpeg_crop.decode_views(np.asarray(image), pre), crop_views(image, pre))


def test_resize_crop_uses_todays_path(monkeypatch):
    calls = []
    monkeypatch.setattr(jpeg_crop, "_crop_aware", lambda *a: calls.append(a))
    data = pil_jpeg(picture(517, 403, 92), quality=90)
    assert assert_same(data, "center") == "ok" and len(calls) == (native is not None)
    got = jpeg_crop.decode_views(data, PreprocessConfig(crop="resize"))
    assert np.array_equal(got, today(data, PreprocessConfig(crop="resize")))
    assert len(calls) == (native is not None)  # resize never asks the extension


# ----------------------------------------------------------------------------- real photos
@needs_native
def test_real_photos_in_the_fixtures():
    files = sorted((PARITY / "images").glob("*")) + sorted(OFFICIAL.glob("*.jpg"))
    taken = 0
    for f in files:
        data = f.read_bytes()
        for crop in CROPS:
            assert assert_same(data, crop) == "ok", f
            taken += f.suffix == ".jpg" and fast_path_taken(data, crop)
    assert taken >= 2 * 4  # the four JPEGs of at least 224 x 224


# ----------------------------------------------------------------------------- the module
@needs_native
def test_threads_decode_concurrently_to_the_same_views():
    """The extension releases the GIL: decoding workers are threads on CPU."""
    blobs = [pil_jpeg(picture(640, 480, 100 + i), quality=90) for i in range(6)]
    pre = PreprocessConfig(crop="ten")
    want = [today(b, pre) for b in blobs]
    got: dict[int, np.ndarray] = {}
    threads = [threading.Thread(target=lambda i=i: got.__setitem__(i, jpeg_crop.decode_views(blobs[i], pre))) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(np.array_equal(got[i], want[i]) for i in range(6))


@needs_native
def test_self_check_refuses_a_decoder_that_differs():
    class OffByOne:
        LIBJPEG_TURBO_VERSION = "fake"

        @staticmethod
        def decode_bands(data, out, *args):
            reason = native.decode_bands(data, out, *args)
            out.reshape(-1)[7] ^= 1  # one level in one pixel
            return reason

    assert jpeg_crop._self_check(native) is None
    assert "differ" in jpeg_crop._self_check(OffByOne)


def test_disabled_by_environment_and_says_why(monkeypatch, caplog):
    monkeypatch.setenv("RINE_JPEG_CROP", "0")
    jpeg_crop._native.cache_clear()
    try:
        with caplog.at_level(logging.DEBUG, logger="rine.data.jpeg_crop"):
            assert not jpeg_crop.available()
        assert "disabled by RINE_JPEG_CROP" in caplog.text
        data = pil_jpeg(picture(517, 403, 110), quality=90)
        assert assert_same(data, "ten") == "ok"
    finally:
        monkeypatch.delenv("RINE_JPEG_CROP")
        jpeg_crop._native.cache_clear()


def test_extension_missing_is_a_debug_message(monkeypatch, caplog):
    import builtins

    real_import = builtins.__import__

    def no_extension(name, globals=None, locals=None, fromlist=(), level=0):
        if fromlist and "_jpeg_crop" in fromlist:
            raise ImportError("No module named 'rine.data._jpeg_crop'")
        return real_import(name, globals, locals, fromlist, level)

    monkeypatch.setattr(builtins, "__import__", no_extension)
    jpeg_crop._native.cache_clear()
    try:
        with caplog.at_level(logging.DEBUG, logger="rine.data.jpeg_crop"):
            assert not jpeg_crop.available()
        assert "libjpeg62-turbo-dev" in caplog.text
    finally:
        monkeypatch.setattr(builtins, "__import__", real_import)
        jpeg_crop._native.cache_clear()


# ----------------------------------------------------------------------------- wiring
def test_detector_and_eval_prepare_views_through_it(tmp_path, monkeypatch):
    import sys

    from rine.evaluation.results import Condition
    from rine.evaluation.scoring import prepare_conditions
    from rine.inference.detector import prepare_views

    # the module that defines prepare_conditions (engine.py, or scoring.py after the split)
    eval_module = sys.modules[prepare_conditions.__module__]

    path = tmp_path / "a.jpg"
    path.write_bytes(pil_jpeg(picture(517, 403, 120), quality=90))
    calls = []
    real = jpeg_crop.decode_views
    monkeypatch.setattr("rine.inference.detector.decode_views", lambda *a, **k: calls.append("detect") or real(*a, **k))
    monkeypatch.setattr(eval_module, "decode_views", lambda *a, **k: calls.append("eval") or real(*a, **k))
    for crop in CROPS:
        pre = PreprocessConfig(crop=crop)
        want = today(path, pre)
        assert np.array_equal(prepare_views(str(path), pre, None), want)
        clean = prepare_conditions(str(path), "a.jpg", [Condition(), Condition()], pre, None)
        assert [hit for _, hit in clean] == [False, False]
        assert all(np.array_equal(v, want) for v, _ in clean)
    assert calls == ["detect", "eval"] * 2
    # a perturbed condition needs the whole image: today's path
    prepare_conditions(str(path), "a.jpg", [Condition(), Condition(kind="jpeg", seed=1)], PreprocessConfig(), None)
    assert calls == ["detect", "eval"] * 2


@needs_native
def test_seeded_random_corpus():
    """Random sizes, qualities, subsamplings, encoders and restart intervals: every window
    offset modulo the MCU and both encoders' table choices."""
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(2024)
    for i in range(24):
        w, h = (int(v) for v in rng.integers(224, 900, 2))
        px = picture(w, h, 200 + i)
        q = int(rng.integers(30, 100))
        if i % 2:
            data = pil_jpeg(px, quality=q, subsampling=["4:4:4", "4:2:2", "4:2:0"][i % 3],
                            **({"restart_marker_blocks": int(rng.integers(1, 9))} if i % 4 == 1 else {}))
        else:
            sampling = ["444", "422", "420", "440"][(i // 2) % 4]
            data = cv2_jpeg(px, IMWRITE_JPEG_QUALITY=q, IMWRITE_JPEG_RST_INTERVAL=int(rng.integers(0, 3)),
                            IMWRITE_JPEG_SAMPLING_FACTOR=getattr(cv2, f"IMWRITE_JPEG_SAMPLING_FACTOR_{sampling}"))
        for crop in CROPS:
            assert fast_path_taken(data, crop), (i, w, h)
            assert assert_same(data, crop) == "ok", (i, w, h, crop)


@needs_native
def test_corrupt_restart_marker_files():
    """With restart markers libjpeg resynchronises after damage (warnings only): flips and
    a dropped restart marker, above and below the windows."""
    rng = np.random.default_rng(81)
    data = pil_jpeg(picture(517, 643, 81), quality=90, restart_marker_rows=1)
    start, n = _scan_start(data), len(data)
    rst = [i for i in range(start, n - 1) if data[i] == 0xFF and 0xD0 <= data[i + 1] <= 0xD7]
    variants = [data[: rst[k]] + data[rst[k] + 2 :] for k in (1, len(rst) // 2, len(rst) - 2)]
    for pos in rng.integers(start, n - 2, 20):
        b = bytearray(data)
        b[pos] ^= 1 << int(rng.integers(0, 8))
        variants.append(bytes(b))
    for v in variants:
        for crop in CROPS:
            assert_same(v, crop)


def test_detect_cli_scores_from_crop_aware_views(capsys, tmp_path, tiny_checkpoint_dir, tiny_detector):
    """End to end: `rine detect` on large baseline, greyscale, progressive and truncated
    JPEGs gives a manual forward of today's views (and today's error for the truncated)."""
    import json

    import torch

    from rine.cli import main
    from rine.data.preprocess import preprocess

    files = {
        "base.jpg": pil_jpeg(picture(1001, 743, 300), quality=90),
        "grey.jpg": pil_jpeg(picture(640, 480, 301), mode="L", quality=90),
        "prog.jpg": pil_jpeg(picture(640, 480, 302), quality=90, progressive=True),
    }
    files["cut.jpg"] = files["base.jpg"][: len(files["base.jpg"]) * 3 // 4]
    paths = []
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        paths.append(str(tmp_path / name))
    for crop in CROPS:
        code = main(["detect", *paths, "--model", str(tiny_checkpoint_dir), "--format", "json", "--precision", "fp32",
                     "--crop", crop, "--decoder", "threads"])
        out, err = capsys.readouterr()
        assert code in (0, 1), err
        records = {Path(r["path"]).name: r for r in json.loads(out)}
        assert records["cut.jpg"]["error"] and "corrupt or truncated" in records["cut.jpg"]["error"]
        for name in ("base.jpg", "grey.jpg", "prog.jpg"):
            views = preprocess(load_image(tmp_path / name), PreprocessConfig(crop=crop))
            with torch.no_grad():
                logit = tiny_detector.model(views).logits.mean()
            assert records[name]["prob_fake"] == pytest.approx(torch.sigmoid(logit).item(), abs=1e-6), (name, crop)


# ----------------------------------------------------------------------------- tap extraction
@needs_native
def test_tap_extraction_decodes_only_the_windows_to_the_same_views(tmp_path, monkeypatch):
    """`rine extract` and `rine batch --taps` (center and ten transforms) go through the
    crop-aware decoder with the views of the full decode, errors included. Broken variants:
    the extraction path not asking the extension (the call count), a window or mirror
    different from the transform's (the views)."""
    from rine.cluster.tasks import tap_views_of
    from rine.data.augment import CenterView, TenCropViews
    from rine.data.datasets import Item
    from rine.data.tap_extract import load_views

    calls = []

    class Spy:
        def __getattr__(self, name):
            return getattr(native, name)

        def decode_bands(self, *args):
            calls.append(args[0][:4])
            return native.decode_bands(*args)

    monkeypatch.setattr(jpeg_crop, "_native", lambda: Spy())
    files = [tmp_path / "a.jpg", tmp_path / "b.jpg", tmp_path / "small.jpg", tmp_path / "c.png", tmp_path / "bad.jpg"]
    files[0].write_bytes(pil_jpeg(picture(517, 403, 1), quality=90))
    files[1].write_bytes(pil_jpeg(picture(300, 640, 2), quality=85, subsampling="4:2:2"))
    files[2].write_bytes(pil_jpeg(picture(200, 150, 3), quality=90))  # padded: Pillow's path
    Image.fromarray(picture(260, 240, 4)).save(files[3])
    files[4].write_bytes(pil_jpeg(picture(300, 300, 5), quality=90)[:600])  # truncated
    for make_views, views in ((CenterView(224), 1), (TenCropViews(224), 10)):
        for i, f in enumerate(files):
            try:
                image = load_image(str(f))
                all_views = getattr(make_views, "all_views", None)
                want = all_views(image, i) if all_views else np.stack([make_views(image, i, v) for v in range(views)])
            except ImageLoadError as e:
                want, kind = str(e), e.kind
            for path in ("rine extract", "rine batch --taps"):
                before = len(calls)
                if path == "rine extract":
                    g = load_views(Item(str(f), 0, ""), i, make_views, views, None)
                else:
                    g = tap_views_of(str(f), i, make_views.crop, 0, 224, views, None, None)
                if isinstance(want, str):  # the reason and the error's kind, as the store keeps them
                    assert isinstance(g, tuple) and g[1] == kind, (path, f.name, g)
                    g = g[0]
                if f.name in ("a.jpg", "b.jpg"):  # baseline JPEGs of at least 224 x 224
                    assert len(calls) == before + 1, (path, f.name, "the extension was not asked")
                if isinstance(want, str):
                    assert g == want, (path, f.name, g)
                else:
                    assert isinstance(g, np.ndarray) and np.array_equal(g, np.asarray(want)), (path, f.name)


# ----------------------------------------------------------------------------- edges found by fuzzing (issue 26)
@needs_native
def test_sizes_over_65535_are_refused_not_truncated():
    """The "I" argument format read a width of 2**32 + 517 as 517 and decoded on; a JPEG's
    sides are 16-bit, so anything over 65535 is the caller's error."""
    data = pil_jpeg(picture(517, 300, 120), quality=90)
    out = np.empty((224, 224, 3), np.uint8)
    assert native.decode_bands(data, out, 517, 300, 3, [(0, 224)], 0, 224) is None
    for args in (
        (2**32 + 517, 300, 3, [(0, 224)], 0, 224),  # width
        (517, 2**32 + 300, 3, [(0, 224)], 0, 224),  # height
        (517, 300, 3, [(2**32, 2**32 + 224)], 0, 224),  # a band
        (517, 300, 3, [(0, 224)], 2**32, 2**32 + 224),  # the columns
        (70000, 300, 3, [(0, 224)], 0, 224),
        (517, 300, 3, [(0, 224)], -1, 223),
    ):
        with pytest.raises(ValueError, match="65535"):
            native.decode_bands(data, out, *args)
    with pytest.raises(OverflowError):
        native.decode_bands(data, out, 2**70, 300, 3, [(0, 224)], 0, 224)


def _wide(data: bytes) -> bool:
    with Image.open(io.BytesIO(data)) as im:
        return max(max(t) for t in im.quantization.values()) > 255


def test_wide_quantisation_tables_are_written_as_16_bit():
    data = jpeg_crop.with_wide_tables(pil_jpeg(picture(517, 403, 121), quality=90))
    dqt = data.index(b"\xff\xdb")
    assert data[dqt + 4] >> 4 == 1  # precision 1: 16-bit entries
    assert b"\xff\xc1" in data and b"\xff\xc0" not in data  # extended sequential frame
    with Image.open(io.BytesIO(data)) as im:
        assert 33068 in im.quantization[0]
        im.load()


@needs_native
@pytest.mark.parametrize("crop", CROPS)
def test_wide_quantisation_tables_decode_as_pillow(crop):
    data = jpeg_crop.with_wide_tables(pil_jpeg(picture(517, 403, 122), quality=90))
    assert assert_same(data, crop) == "ok"


@needs_native
def test_a_decoder_that_differs_only_on_16_bit_tables_keeps_the_rest(monkeypatch):
    """A system libjpeg that decodes 16-bit quantisation tables unlike Pillow's (as a
    non-SIMD build did): the start-up check finds it, those files go to Pillow, the others
    stay crop-aware."""

    class WideSkew:
        LIBJPEG_TURBO_VERSION = "fake"

        @staticmethod
        def decode_bands(data, out, *args):
            reason = native.decode_bands(data, out, *args)
            if _wide(data):
                out.reshape(-1)[7] ^= 1
            return reason

    skew = WideSkew()
    assert jpeg_crop._self_check(skew) is None  # the plain check cannot see it
    monkeypatch.setattr(jpeg_crop, "_native", lambda: skew)
    plain = pil_jpeg(picture(517, 403, 123), quality=90)
    wide = jpeg_crop.with_wide_tables(plain)
    for crop in CROPS:
        assert assert_same(wide, crop) == "ok"
    assert jpeg_crop._crop_aware(skew, open_header(wide, None), wide, 224, "ten") is None
    assert jpeg_crop._crop_aware(skew, open_header(plain, None), plain, 224, "ten") is not None
