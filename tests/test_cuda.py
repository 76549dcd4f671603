"""The CUDA path of `Detector`: pinned uint8 transfer, on-device normalisation, exact fp32
(no TF32) and the fp16/bf16 tolerance against CPU fp32. Skipped on machines without a GPU
(CI has none); run on a GPU machine with `python -m pytest tests/test_cuda.py`."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rine.data.decoding import DecodeOptions, default_workers
from rine.inference.detector import Detector, default_batch_size

from conftest import PARITY, write_image

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

TOLERANCE = 0.01  # the same bound as tests/test_precision.py


@pytest.fixture(scope="module")
def parity_files():
    tiny = PARITY / "tiny"
    return str(tiny / "clip_visual.safetensors"), str(tiny / "rine_head.safetensors")


def _probs(det: Detector, images, **kw) -> np.ndarray:
    return np.array([p.prob_fake for p in det.predict(images, **kw)])


def test_cuda_batch_and_worker_defaults():
    cuda = torch.device("cuda")
    assert default_batch_size(cuda) == 64
    assert default_workers(cuda) >= default_workers(torch.device("cpu"))


def test_fp32_on_gpu_reproduces_the_reference_logits(parity_files):
    """The exact mode on the GPU: same logits as the reference's (CPU) to 1e-4, TF32 off."""
    torch.backends.cudnn.allow_tf32 = True  # PyTorch's default; the encoder must override it
    det = Detector.from_files(*parity_files, device="cuda", precision="fp32")
    assert det.device.type == "cuda"
    images = sorted((PARITY / "images").iterdir())
    preds = det.predict(images, batch_size=3)
    reference = np.load(PARITY / "tiny" / "logits.npy").ravel()
    np.testing.assert_allclose([p.logit for p in preds], reference, atol=1e-4)
    assert torch.backends.cudnn.allow_tf32  # the caller's setting is restored


@pytest.mark.parametrize("precision", ["auto", "fp16", "bf16"])
def test_half_modes_on_gpu_within_tolerance_of_cpu_fp32(parity_files, precision):
    images = sorted((PARITY / "images").iterdir())
    ref = _probs(Detector.from_files(*parity_files, device="cpu", precision="fp32"), images)
    det = Detector.from_files(*parity_files, device="cuda", precision=precision)
    assert det.precision == ("fp16" if precision == "auto" else precision)
    fast = _probs(det, images)
    assert np.abs(fast - ref).max() < TOLERANCE
    assert not np.array_equal(fast, ref)


@pytest.mark.parametrize("crop", ["center", "ten"])
def test_gpu_pipeline_keeps_order_and_errors(tiny_checkpoint_dir, tmp_path, crop):
    sizes = [(256, 256), (640, 480), (200, 180), (1024, 300)]
    good = [str(write_image(tmp_path / f"{i}.png", size=s, seed=i)) for i, s in enumerate(sizes)]
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    inputs = [good[0], str(bad), *good[1:]]
    cpu = Detector.from_pretrained(str(tiny_checkpoint_dir), crop=crop, device="cpu", precision="fp32")
    gpu = Detector.from_pretrained(str(tiny_checkpoint_dir), crop=crop, device="cuda", precision="fp32")
    preds = gpu.predict(inputs, batch_size=2, decode=DecodeOptions(workers=3))
    assert [p.path for p in preds] == inputs
    assert preds[1].error is not None and preds[1].prob_fake is None
    expected = _probs(cpu, good)
    np.testing.assert_allclose([p.prob_fake for p in preds if p.error is None], expected, atol=1e-5)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_compiled_encoder_on_gpu(tiny_checkpoint_dir, tmp_path, precision):
    """--compile on CUDA (Triton kernels): the same scores as the uncompiled encoder, the
    first batch through the graph and the run's short last one (2 of 3) uncompiled."""
    images = [str(write_image(tmp_path / f"{i}.png", size=(240, 250), seed=i)) for i in range(5)]
    eager = Detector.from_pretrained(str(tiny_checkpoint_dir), device="cuda", precision=precision)
    compiled = Detector.from_pretrained(str(tiny_checkpoint_dir), device="cuda", precision=precision, compile=True)
    expected = _probs(eager, images, batch_size=3)
    got = _probs(compiled, images, batch_size=3)
    assert compiled.encoder.compiled  # did not fall back
    np.testing.assert_allclose(got, expected, atol=1e-5 if precision == "fp32" else 2e-3)
