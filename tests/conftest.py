"""Shared fixtures: tiny CLIP backbones and RINE checkpoints built by the tests themselves.

Nothing here downloads anything. `tiny_*` fixtures are session-scoped and cheap
(a 3-block, 64-wide ViT with 32-pixel patches at 224 px input).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# In the repository (tests/fixtures/*/README.md and SOURCE.md say where each file comes from
# and under which licence): a clone runs the whole suite with nothing beside it.
FIXTURES = REPO / "tests" / "fixtures"
PARITY = FIXTURES / "parity"
OFFICIAL = FIXTURES / "rine-official"

TINY = dict(width=64, layers=3, patch=32, image_size=224, embed_dim=32)


def make_openai_visual_state(
    width: int = 64, layers: int = 3, patch: int = 32, image_size: int = 224, embed_dim: int = 32, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Random weights with OpenAI CLIP's visual key names (`visual.transformer.resblocks.N...`)."""
    g = torch.Generator().manual_seed(seed)
    tokens = (image_size // patch) ** 2 + 1

    def r(*shape, scale=0.05):
        return torch.randn(*shape, generator=g) * scale

    sd = {
        "visual.class_embedding": r(width, scale=0.5),
        "visual.positional_embedding": r(tokens, width, scale=0.1),
        "visual.proj": r(width, embed_dim),
        "visual.conv1.weight": r(width, 3, patch, patch, scale=0.02),
        "visual.ln_pre.weight": 1 + r(width, scale=0.1),
        "visual.ln_pre.bias": r(width, scale=0.1),
        "visual.ln_post.weight": 1 + r(width, scale=0.1),
        "visual.ln_post.bias": r(width, scale=0.1),
    }
    for i in range(layers):
        p = f"visual.transformer.resblocks.{i}."
        sd.update(
            {
                p + "attn.in_proj_weight": r(3 * width, width, scale=0.1),
                p + "attn.in_proj_bias": r(3 * width, scale=0.05),
                p + "attn.out_proj.weight": r(width, width, scale=0.1),
                p + "attn.out_proj.bias": r(width, scale=0.05),
                p + "ln_1.weight": 1 + r(width, scale=0.1),
                p + "ln_1.bias": r(width, scale=0.1),
                p + "ln_2.weight": 1 + r(width, scale=0.1),
                p + "ln_2.bias": r(width, scale=0.1),
                p + "mlp.c_fc.weight": r(4 * width, width, scale=0.1),
                p + "mlp.c_fc.bias": r(4 * width, scale=0.05),
                p + "mlp.c_proj.weight": r(width, 4 * width, scale=0.1),
                p + "mlp.c_proj.bias": r(width, scale=0.05),
            }
        )
    return sd


@pytest.fixture(scope="session")
def tiny_openai_file(tmp_path_factory) -> Path:
    """A tiny OpenAI-format CLIP visual state dict saved as safetensors."""
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("openai") / "tiny-clip.safetensors"
    save_file(make_openai_visual_state(**TINY), str(path))
    return path


@pytest.fixture(scope="session")
def tiny_backbone_dir(tmp_path_factory, tiny_openai_file) -> Path:
    """The same tiny backbone as a Hugging Face `save_pretrained` folder."""
    from rine.model.backbones import load_openai_clip_vision

    folder = tmp_path_factory.mktemp("hf") / "tiny-clip-vision"
    load_openai_clip_vision(tiny_openai_file).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_checkpoint_dir(tmp_path_factory, tiny_backbone_dir) -> Path:
    """A RINE checkpoint folder (config.json + model.safetensors) on the tiny backbone.

    The head is random (seed 0) with nproj=2, proj_dim=32; the config's backbone is the
    absolute path of `tiny_backbone_dir`, so `Detector.from_pretrained(folder)` works offline.
    """
    from rine.config import HeadConfig, RINEConfig
    from rine.model.checkpoints import save_pretrained
    from rine.model.head import RINEHead

    torch.manual_seed(0)
    head_cfg = HeadConfig(in_dim=TINY["width"], n_blocks=TINY["layers"], nproj=2, proj_dim=32)
    head = RINEHead(head_cfg)
    config = RINEConfig(backbone=str(tiny_backbone_dir), head=head_cfg, name="tiny-test")
    folder = tmp_path_factory.mktemp("ckpt") / "tiny-rine"
    save_pretrained(head, config, folder)
    return folder


SENSITIVE_SPREAD = 4.0  # logits of the probe images must span at least this many units


def probe_images(folder: Path) -> list[Path]:
    """Six noise images of the sizes the tests use (one smaller than the crop, one wide)."""
    sizes = [(256, 256), (640, 480), (224, 300), (1024, 200), (700, 500), (200, 180)]
    return [write_image(folder / f"probe-{i}.png", size=s, seed=100 + i) for i, s in enumerate(sizes)]


@pytest.fixture(scope="session")
def sensitive_checkpoint_dir(tmp_path_factory, tiny_backbone_dir) -> Path:
    """A checkpoint on the tiny backbone whose head tells images (and crops) apart.

    The default-initialised head of `tiny_checkpoint_dir` gives every noise image about the
    same logit (0.176-0.177): score checks on it cannot tell sigmoid-of-mean from
    mean-of-sigmoids, or a broken block from a working one. Here every Linear weight is
    scaled by 3 (a default-initialised ReLU stack shrinks its input), then the last layer is
    rescaled and shifted so that the calibration images' logits have mean 0 and std 3. The
    fixture asserts the sensitivity the score tests rely on, on images it was not fitted to:
    logits spanning `SENSITIVE_SPREAD` units across images and more than 1 across the ten
    crops of one image, with probabilities away from 0 and 1.
    """
    from rine.config import HeadConfig, PreprocessConfig, RINEConfig
    from rine.data.images import load_image
    from rine.data.preprocess import preprocess
    from rine.model.backbones import load_backbone
    from rine.model.checkpoints import save_pretrained
    from rine.model.head import RINEHead

    folder = tmp_path_factory.mktemp("sensitive")
    backbone = load_backbone(str(tiny_backbone_dir))
    pre = PreprocessConfig()

    def taps_of(paths, crop="center"):
        pixels = torch.cat([preprocess(load_image(p), PreprocessConfig(crop=crop)) for p in paths])
        with torch.no_grad():
            return backbone(pixels)

    calibration = [write_image(folder / "cal" / f"{i}.png", size=(256 + 16 * i, 256), seed=200 + i) for i in range(8)]
    torch.manual_seed(1)
    head_cfg = HeadConfig(in_dim=TINY["width"], n_blocks=TINY["layers"], nproj=2, proj_dim=32)
    head = RINEHead(head_cfg).eval()
    with torch.no_grad():
        for m in head.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.mul_(3.0)
        logits = head(taps_of(calibration)).logits
        last = head.head[-1]
        scale = 3.0 / logits.std()
        last.weight.mul_(scale)
        last.bias.copy_((last.bias - logits.mean()) * scale)

        probes = probe_images(folder / "probe")
        probe_logits = head(taps_of(probes)).logits
        ten = head(taps_of(probes[4:5], crop="ten")).logits
    spread = (probe_logits.max() - probe_logits.min()).item()
    assert spread >= SENSITIVE_SPREAD, f"probe logits span only {spread:.2f}: {probe_logits.tolist()}"
    assert (ten.max() - ten.min()).item() > 1.0, f"ten-crop logits too alike: {ten.tolist()}"
    probs = torch.sigmoid(probe_logits)
    assert ((probs > 0.02) & (probs < 0.98)).sum() >= 3, probs.tolist()  # not all saturated
    config = RINEConfig(backbone=str(tiny_backbone_dir), head=head_cfg, preprocess=pre, name="tiny-sensitive")
    save_pretrained(head, config, folder / "ckpt")
    return folder / "ckpt"


@pytest.fixture(scope="session")
def sensitive_detector(sensitive_checkpoint_dir):
    from rine.inference.detector import Detector

    return Detector.from_pretrained(str(sensitive_checkpoint_dir), device="cpu", precision="fp32")


@pytest.fixture(scope="session")
def tiny_detector(tiny_checkpoint_dir):
    from rine.inference.detector import Detector

    return Detector.from_pretrained(str(tiny_checkpoint_dir), device="cpu")


def write_image(path: Path, size=(256, 256), mode="RGB", seed=0, fmt=None) -> Path:
    """A random-noise image file of the given size and mode."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    w, h = size
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    arr = rng.integers(0, 256, size=(h, w, channels), dtype=np.uint8)
    img = Image.fromarray(arr[..., 0] if channels == 1 else arr, mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format=fmt)
    return path


def _open(source):
    import io

    from PIL import Image

    return Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)


def reference_decode(source) -> np.ndarray:
    """The reference's decode of a file or bytes: `Image.open(p).convert("RGB")` -> uint8 [H, W, 3]."""
    return np.asarray(_open(source).convert("RGB"))


def wrong_decode(source) -> np.ndarray:
    """A plausible wrong decode of the same file, per mode: RGBA composited over white (what
    a browser shows), greyscale put in the red channel only, colour read as BGR (OpenCV's
    order). A score check that cannot tell these from the reference's decode proves nothing."""
    image = _open(source)
    if image.mode == "RGBA":
        from PIL import Image

        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, image).convert("RGB"))
    if image.mode == "L":
        grey = np.asarray(image)
        return np.stack([grey, np.zeros_like(grey), np.zeros_like(grey)], axis=-1)
    return np.ascontiguousarray(np.asarray(image.convert("RGB"))[..., ::-1])


def score_pixels(detector, pixels: np.ndarray) -> float:
    """The detector's probability for uint8 RGB pixels [H, W, 3], past rine's decoding: the
    oracle must not share the code it checks (`Detector.predict` on an array decodes too)."""
    from PIL import Image

    from rine.data.preprocess import crop_views

    logits, _ = detector.score_views(crop_views(Image.fromarray(pixels, "RGB"), detector.config.preprocess))
    return torch.sigmoid(logits.mean()).item()


def assert_scores_as_reference_decode(detector, sources, probs, abs_tol: float = 1e-6) -> None:
    """`probs` (what a command or the API returned for `sources`) equal the detector's score
    of the reference's decode of each source, and differ from its score of a wrong decode."""
    expected = [score_pixels(detector, reference_decode(s)) for s in sources]
    wrong = [score_pixels(detector, wrong_decode(s)) for s in sources]
    np.testing.assert_allclose(probs, expected, atol=abs_tol, rtol=0)
    gaps = np.abs(np.array(wrong) - np.array(probs))
    # 100x the tolerance: the comparison above would fail on every wrongly decoded source
    assert gaps.min() > 100 * abs_tol, f"a wrong decode scores too close to the real one: {gaps.tolist()}"


# Every module a test's worker pool preloads: the forkserver keeps the preload list of the
# first pool opened in the process, so without this the workers' imports (and timings)
# would depend on which test ran first.
FORKSERVER_PRELOAD = ["support.worker_jobs", "rine.inference.detector", "rine.evaluation.engine"]


@pytest.fixture(scope="session", autouse=True)
def _one_forkserver_preload_list():
    import multiprocessing

    if "forkserver" in multiprocessing.get_all_start_methods():
        from multiprocessing import forkserver

        multiprocessing.get_context("forkserver").set_forkserver_preload(FORKSERVER_PRELOAD)
        forkserver.ensure_running()  # started now, with this list; later set_forkserver_preload calls are no-ops
    yield


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """No test reads or writes the user's caches, and none reaches the network."""
    monkeypatch.setenv("RINE_HOME", str(tmp_path / "rine-home"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("RINE_HEAD_BASE_URL", "http://127.0.0.1:9/unreachable")
    monkeypatch.setenv("RINE_SIDBENCH_BASE_URL", "http://127.0.0.1:9/unreachable")


# ---------------------------------------------------------------- --stability (tests/support/stability.py)
@pytest.fixture(scope="session")
def stability_inputs(tmp_path_factory):
    """Photo-like JPEG, PNG, WebP, greyscale, small (< 224) and large inputs: {name: path}."""
    from support.stability import write_inputs

    return write_inputs(tmp_path_factory.mktemp("stability-inputs"))


@pytest.fixture(scope="session")
def photo_checkpoint(sensitive_checkpoint_dir, stability_inputs, tmp_path_factory):
    """The sensitive head with its last layer rescaled so that these photos' logits have
    mean 0 and std 2: probabilities away from 0 and 1, where 1e-5 tells conditions apart."""
    from rine.inference.detector import Detector
    from rine.model.checkpoints import save_pretrained

    det = Detector.from_pretrained(str(sensitive_checkpoint_dir), device="cpu", precision="fp32")
    logits = torch.tensor([p.logit for p in det.predict([str(p) for p in stability_inputs.values()])])
    with torch.no_grad():
        last = det.head.head[-1]
        scale = 2.0 / logits.std()
        last.weight.mul_(scale)
        last.bias.copy_((last.bias - logits.mean()) * scale)
    folder = tmp_path_factory.mktemp("photo-ckpt") / "ckpt"
    save_pretrained(det.head, det.config, folder)
    return folder


@pytest.fixture(scope="session")
def flippy_checkpoint(photo_checkpoint, stability_inputs, tmp_path_factory):
    """The photo head with its bias moved so that the 0.5 cut lies among the jpeg input's
    re-encodings: some flip it, some do not."""
    from rine.inference.detector import Detector
    from rine.model.checkpoints import save_pretrained

    from support.stability import rule_cutting_between, split_logits, stability_of

    det = Detector.from_pretrained(str(photo_checkpoint), device="cpu", precision="fp32")
    own, _, sv = stability_of(det, stability_inputs["jpeg"])
    _, per = split_logits(det.score_views(sv.views)[0], sv.applied, sv.per_image)
    with torch.no_grad():
        det.head.head[-1].bias -= rule_cutting_between(list(per.values()), own)
    folder = tmp_path_factory.mktemp("flippy") / "ckpt"
    save_pretrained(det.head, det.config, folder)
    return folder
