"""The SD/SDXL watermark decoder (rine.provenance.watermark, numpy + PyWavelets) against
imwatermark, the library diffusers and the SD scripts use: bit-identical decoding of
imwatermark's own encoder's output, the U channel equal to OpenCV's, and the reader's
thresholds (found on lossless files, not on plain ones, not read on lossy ones)."""

from __future__ import annotations

import numpy as np
import pytest

from rine.provenance import reader, watermark
from rine.provenance.catalogue import WATERMARKS
from rine.provenance.reader import read_provenance

from support import provenance_files as pf

pywt = pytest.importorskip("pywt")
imwatermark = pytest.importorskip("imwatermark", reason="pip install --no-deps invisible-watermark")
cv2 = pytest.importorskip("cv2")


def test_u_channel_equals_opencv():
    rng = np.random.default_rng(1)
    bgr = rng.integers(0, 256, (67, 131, 3), dtype=np.uint8)
    bgr[0, :6] = [[0, 0, 255], [255, 0, 0], [255, 255, 255], [0, 0, 0], [0, 255, 0], [255, 0, 255]]  # saturating corners
    np.testing.assert_array_equal(watermark.yuv_u(bgr), cv2.cvtColor(bgr, cv2.COLOR_BGR2YUV)[..., 1])


def test_haar_equals_pywavelets():
    u = np.random.default_rng(2).integers(0, 256, (96, 130), dtype=np.uint8)
    np.testing.assert_array_equal(watermark.haar_approx(u), pywt.dwt2(u, "haar")[0])  # exact, not close


@pytest.mark.parametrize("seed,size,message", [(0, (512, 512), "sdxl"), (1, (300, 401), "sdxl"),
                                               (2, (320, 320), "sd1"), (3, (257, 300), "random")])
def test_decoder_equals_imwatermark(seed, size, message):
    from imwatermark import WatermarkDecoder, WatermarkEncoder

    rng = np.random.default_rng(seed)
    image = pf.texture(max(size), seed)[: size[0], : size[1]].copy()
    bits = {"sdxl": pf.SDXL_BITS, "sd1": list(WATERMARKS[1].bits),
            "random": list(rng.integers(0, 2, 64))}[message]
    enc = WatermarkEncoder()
    enc.set_watermark("bits", bits)
    marked = np.clip(np.round(enc.encode(image, "dwtDct")), 0, 255).astype(np.uint8)
    for array in (marked, image):  # with and without the watermark: every bit, not just the found ones
        ref = np.asarray(WatermarkDecoder("bits", len(bits)).decode(array, "dwtDct"), dtype=bool)
        np.testing.assert_array_equal(watermark.decode_bits(watermark.block_votes(array), len(bits)), ref)


@pytest.fixture(scope="module")
def sdxl_png():
    return pf.encode(pf.sdxl_watermarked(pf.texture(1024, 5)), "PNG")


def test_sdxl_watermarked_png_is_generated_unverified(sdxl_png):
    p = read_provenance(sdxl_png)
    assert (p.digital_source_type, p.verified, p.basis) == ("trainedAlgorithmicMedia", False, "watermark:dwtDct:sdxl")
    (signal,) = p.signals
    assert signal.generator.startswith("Stable Diffusion XL")
    assert int(signal.value.split("/")[0]) >= 41


def test_sd1_watermark_found_in_bgr_order():
    p = read_provenance(pf.encode(pf.sd1_watermarked(pf.texture(512, 6)), "PNG"))
    assert p.basis == "watermark:dwtDct:sd1"


def test_no_watermark_on_plain_or_other_message():
    assert read_provenance(pf.encode(pf.texture(1024, 5), "PNG")).signals == []
    from imwatermark import WatermarkEncoder

    enc = WatermarkEncoder()
    enc.set_watermark("bytes", b"SomeOtherTool")  # a real watermark, but not one of the catalogue's
    other = np.clip(np.round(enc.encode(pf.texture(512, 7), "dwtDct")), 0, 255).astype(np.uint8)
    assert read_provenance(pf.encode(other, "PNG")).signals == []


def test_watermark_read_only_on_lossless(monkeypatch, sdxl_png):
    calls = []
    monkeypatch.setattr(reader.watermark, "read", lambda data, limits, pixels=None: calls.append(len(data)))
    marked = pf.sdxl_watermarked(pf.texture(512, 5))
    read_provenance(pf.encode(marked, "JPEG", quality=98))
    read_provenance(pf.encode(marked, "WEBP", quality=98))
    assert calls == []
    read_provenance(pf.encode(marked, "WEBP", lossless=True))
    read_provenance(sdxl_png)
    assert len(calls) == 2


def test_pixels_given_give_the_same_signal(sdxl_png):
    import io

    from PIL import Image

    pixels = np.asarray(Image.open(io.BytesIO(sdxl_png)).convert("RGB"))
    assert read_provenance(sdxl_png, pixels=pixels).to_dict() == read_provenance(sdxl_png).to_dict()
    assert read_provenance(sdxl_png, pixels=pf.texture(1024, 5)).signals == []  # the pixels given are what is read


def test_watermark_decoded_only_at_widths_a_generator_writes(monkeypatch):
    """The gate that spares the second decode: a width that is not a multiple of 8 (resized,
    cropped sideways: the block numbering is lost) is not decoded; a height cut at the bottom
    still is, and still finds the mark (a gate on the height, or on both sides, would lose it)."""
    decoded = []
    real = watermark.block_votes
    monkeypatch.setattr(watermark, "block_votes", lambda bgr: decoded.append(bgr.shape) or real(bgr))
    marked = pf.sdxl_watermarked(pf.texture(1024, 5))
    assert read_provenance(pf.encode(marked[:, :1020].copy(), "PNG")).signals == []
    assert decoded == []
    cut = read_provenance(pf.encode(marked[:1021].copy(), "PNG"))
    assert decoded and cut.basis == "watermark:dwtDct:sdxl"
    # and the gate loses nothing the full decode would find: cut sideways, the mark is gone
    from rine.provenance.types import ProvenanceLimits

    for sideways in (marked[:, :1020], marked[:, :1023], marked[:, 3:]):
        assert watermark._find(np.ascontiguousarray(sideways), ProvenanceLimits()) is None
