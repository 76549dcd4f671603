"""The streaming pipeline of `Detector.predict_iter`: order, errors, batching, laziness,
worker counts, ten-crop averaging, and device-side normalisation."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from rine.config import PreprocessConfig
from rine.data.decoding import DecodeOptions
from rine.data.images import load_image
from rine.data.preprocess import crop_views, normalize
from rine.inference.detector import Detector, _normalize_on

from conftest import write_image


@pytest.fixture(scope="module")
def fp32_detector(tiny_checkpoint_dir):
    return Detector.from_pretrained(str(tiny_checkpoint_dir), precision="fp32")


@pytest.fixture()
def mixed_inputs(tmp_path):
    """Eight inputs: six images of various sizes and modes, a corrupt file and a missing path."""
    good = [
        write_image(tmp_path / "a.png", size=(256, 256), seed=1),
        write_image(tmp_path / "b.jpg", size=(640, 480), seed=2),
        write_image(tmp_path / "c.png", size=(200, 180), mode="L", seed=3),
        write_image(tmp_path / "d.png", size=(320, 240), mode="RGBA", seed=4),
        write_image(tmp_path / "e.jpg", size=(300, 900), seed=5),
        write_image(tmp_path / "f.png", size=(224, 224), seed=6),
    ]
    bad = tmp_path / "corrupt.jpg"
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    items = [good[0], bad, good[1], good[2], tmp_path / "missing.png", good[3], good[4], good[5]]
    return [str(p) for p in items]


def _one_by_one(det: Detector, path: str) -> float:
    views = crop_views(load_image(path), det.config.preprocess)
    logits, _ = det.score_views(views)
    return torch.sigmoid(logits.mean()).item()


@pytest.mark.parametrize("batch_size, workers", [(1, 1), (3, 2), (16, 4)])
def test_order_errors_and_values_whatever_the_batching(fp32_detector, mixed_inputs, batch_size, workers):
    preds = list(fp32_detector.predict_iter(mixed_inputs, batch_size=batch_size, decode=DecodeOptions(workers=workers)))
    assert [p.path for p in preds] == mixed_inputs
    assert [p.error is not None for p in preds] == [False, True, False, False, True, False, False, False]
    for p in preds:
        if p.error is None:
            assert p.prob_fake == pytest.approx(_one_by_one(fp32_detector, p.path), abs=1e-6)
            assert p.is_fake == (p.prob_fake > fp32_detector.threshold)
            assert sum(p.block_contribution) == pytest.approx(1.0, abs=1e-5)


def test_stream_is_consumed_lazily(fp32_detector, tmp_path):
    """Memory is bounded: the pipeline pulls only a bounded number of inputs ahead."""
    path = str(write_image(tmp_path / "x.png", size=(256, 256)))
    pulled = 0

    def endless():
        nonlocal pulled
        while True:
            pulled += 1
            yield path

    it = fp32_detector.predict_iter(endless(), batch_size=4, decode=DecodeOptions(workers=2))
    first = [next(it) for _ in range(5)]
    assert all(p.error is None for p in first)
    assert pulled <= 5 + 2 * 4 + 4  # what was yielded + the in-flight bound + one batch
    it.close()


def test_ten_crop_is_sigmoid_of_mean_logit(sensitive_checkpoint_dir, tmp_path):
    det = Detector.from_pretrained(str(sensitive_checkpoint_dir), crop="ten", precision="fp32")
    path = str(write_image(tmp_path / "big.jpg", size=(700, 500), seed=9))
    pred = det.predict(path)[0]
    logits, _ = det.score_views(crop_views(load_image(path), det.config.preprocess))
    assert logits.shape == (10,)
    assert pred.logit == pytest.approx(logits.mean().item(), abs=1e-6)
    assert pred.prob_fake == pytest.approx(torch.sigmoid(logits.mean()).item(), abs=1e-6)
    # Negative control: the crops disagree enough that the other protocol (mean of the ten
    # probabilities) or the centre crop alone would give another score.
    assert abs(pred.prob_fake - torch.sigmoid(logits).mean().item()) > 0.01
    center = det.score_views(crop_views(load_image(path), replace(det.config.preprocess, crop="center")))[0]
    assert abs(pred.prob_fake - torch.sigmoid(center).item()) > 0.01


def test_device_normalisation_equals_cpu_normalisation():
    pre = PreprocessConfig()
    x = torch.from_numpy(np.random.default_rng(0).integers(0, 256, size=(2, 224, 224, 3), dtype=np.uint8))
    assert torch.equal(_normalize_on(x, pre.mean, pre.std), normalize(x, pre.mean, pre.std))


def test_empty_input_gives_nothing(fp32_detector):
    assert fp32_detector.predict([]) == []
    assert fp32_detector.encode_views(np.zeros((0, 224, 224, 3), dtype=np.uint8)).shape == (0, 3, 64)


def test_process_decoder_gives_the_same_records_as_threads(fp32_detector, mixed_inputs):
    """Decoding in worker processes (the GPU default): same values, same order, and the
    failures keep their one-line reasons (ImageLoadError crosses the process boundary)."""
    threads = list(fp32_detector.predict_iter(mixed_inputs, batch_size=3, decode=DecodeOptions(workers=2, decoder="threads")))
    procs = list(fp32_detector.predict_iter(mixed_inputs, batch_size=3, decode=DecodeOptions(workers=2, decoder="processes")))
    assert [p.path for p in procs] == mixed_inputs
    assert [p.error for p in procs] == [p.error for p in threads]
    assert procs[1].error is not None and procs[4].error == "no such file"
    assert [p.prob_fake for p in procs] == [p.prob_fake for p in threads]


def test_image_load_error_pickles_with_its_kind():
    import pickle

    from rine.data.images import ImageLoadError

    err = pickle.loads(pickle.dumps(ImageLoadError("empty file", "empty")))
    assert isinstance(err, ImageLoadError) and str(err) == "empty file" and err.kind == "empty"


def test_only_the_listed_formats_are_decoded_whatever_the_name(tmp_path, monkeypatch):
    """Pillow sniffs content, so a file named x.jpg could reach any of its readers; EPS
    runs Ghostscript. Only the formats of IMAGE_EXTENSIONS are opened."""
    import io

    from PIL import EpsImagePlugin, Image

    from rine.data.images import ImageLoadError, load_image

    def ghostscript(*a, **k):
        raise AssertionError("Ghostscript was reached")

    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", ghostscript)
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n%%EOF\n"
    disguised = tmp_path / "photo.jpg"
    disguised.write_bytes(eps)
    for source in (disguised, eps):
        with pytest.raises(ImageLoadError, match="not an image in a supported format") as e:
            load_image(source)
        assert e.value.kind == "not_image"
    for fmt in ("ICO", "TGA", "JPEG2000"):
        buf = io.BytesIO()
        Image.new("RGB", (16, 16)).save(buf, format=fmt)
        with pytest.raises(ImageLoadError, match="supported format"):
            load_image(buf.getvalue())
    # What cameras and the web produce still opens: JPEG, camera MPO (two frames), PNG, WebP, ...
    for fmt, extra in (("JPEG", {}), ("PNG", {}), ("WEBP", {"lossless": True}), ("BMP", {}), ("TIFF", {}),
                       ("GIF", {}), ("PPM", {}),
                       ("MPO", {"save_all": True, "append_images": [Image.new("RGB", (16, 16))]})):
        buf = io.BytesIO()
        Image.new("RGB", (16, 16), (0, 128, 255)).save(buf, format=fmt, **extra)
        assert load_image(buf.getvalue()).size == (16, 16), fmt


def test_numpy_arrays_score_as_their_images(fp32_detector, tmp_path):
    """uint8 RGB arrays [H, W, 3] (and batches [N, H, W, 3]) score as the same pixels saved
    losslessly; other arrays get an error record that says what is expected."""
    from PIL import Image

    rng = np.random.default_rng(3)
    arrays = rng.integers(0, 256, (2, 240, 260, 3), dtype=np.uint8)
    files = []
    for i, a in enumerate(arrays):
        Image.fromarray(a).save(tmp_path / f"{i}.png")
        files.append(str(tmp_path / f"{i}.png"))
    from_files = [p.logit for p in fp32_detector.predict(files)]
    assert [p.logit for p in fp32_detector.predict(arrays)] == from_files  # a batch
    assert fp32_detector.predict(arrays[0])[0].logit == from_files[0]  # one array
    grey = fp32_detector.predict([arrays[0][:, :, 0]])[0]
    assert grey.error is None and grey.logit is not None
    bad = fp32_detector.predict([arrays[0].astype(np.float32)])[0]
    assert bad.prob_fake is None and "expected a uint8 array" in bad.error


def test_unknown_decoder_is_refused(fp32_detector):
    with pytest.raises(ValueError, match="decoder must be one of"):
        list(fp32_detector.predict_iter([], decode=DecodeOptions(decoder="fibers")))


def test_releasing_the_reference_weights_keeps_every_score(tiny_checkpoint_dir, mixed_inputs):
    """keep_reference=False (rine detect, rine serve) frees the backbone's block weights once
    the fast encoder has its own copies: same predictions, and the reference forward says why
    it cannot run instead of failing on a shape."""
    kept = Detector.from_pretrained(str(tiny_checkpoint_dir), precision="fp32")
    lean = Detector.from_pretrained(str(tiny_checkpoint_dir), precision="fp32", keep_reference=False)
    assert lean.model.backbone.released and not kept.model.backbone.released
    def block_linears(det):  # name -> numel of the blocks' attention projections and MLP
        return {n: p.numel() for n, p in det.model.backbone.named_parameters()
                if ".layers." in n and ("_proj." in n or ".fc" in n)}

    assert set(block_linears(lean)) == set(block_linears(kept)) and min(block_linears(kept).values()) > 0
    assert set(block_linears(lean).values()) == {0}
    a, b = kept.predict(mixed_inputs), lean.predict(mixed_inputs)
    assert [(p.path, p.error) for p in a] == [(p.path, p.error) for p in b]
    assert [p.prob_fake for p in a] == [p.prob_fake for p in b]
    with pytest.raises(RuntimeError, match="released"):
        lean.model(torch.zeros(1, 3, 224, 224))
