"""Scoring images: the `Detector` API.

    detector = Detector.from_pretrained("rine-vitl14-4class")
    for p in detector.predict(["a.jpg", "b.png"]):
        print(p.path, p.prob_fake, p.error)

Pipeline: paths stream in; a pool of threads (processes with a GPU: `rine.data.decoding`)
decodes and crops them with a bounded number of images in flight, overlapped with
the encoder running on the main thread; uint8 crops are batched, copied to the
device (pinned memory, non-blocking, on CUDA), normalised there and scored.
The encoder runs through `accel.FastTapEncoder` in the chosen precision
(`rine.config.PRECISIONS`, "auto" by default). A file that cannot be read gives a Prediction
with `error` set; the others are scored.

The encoder + head call is the Detector's `backend`: `TorchBackend` (the encoder above), or an ONNX
export run by ONNX Runtime (`onnx_backend.load_onnx_detector`); decoding, batching and the
probability (sigmoid of the mean logit, threshold) are this module's whatever the backend.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..config import PreprocessConfig, RINEConfig
from ..data.decoding import DecodeOptions, decode_batches, error_kind, error_text
from ..data.images import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS
from ..data.jpeg_crop import decode_views
from ..data.preprocess import normalize
from ..data.reencode import StabilityViews, resolve_conditions, stability_views
from ..errors import UnknownNameError
from ..model.accel import FastTapEncoder, resolve_precision
from ..model.backbones import load_backbone
from ..model.calibration import DecisionRule
from ..model.checkpoints import load_head, load_pretrained
from ..model.head import RINEHead
from ..model.pretrained import rine_home
from ..model.rine_model import RINEModel
from .stability import predict_with_stability

logger = logging.getLogger(__name__)

__all__ = [
    "Detector",
    "Prediction",
    "default_batch_size",
    "prepare_views",
    "resolve_device",
]

ImageSource = str | Path | bytes | Image.Image | np.ndarray  # arrays: uint8 [H, W(, 3|4)], RGB order


@dataclass
class Prediction:
    """One image's result. `prob_fake` = sigmoid(logit) (of the calibrated logit when the model
    is calibrated: `logit` stays the head's own); None when `error` is set.

    threshold, verdict: the probability cut that made `is_fake` and "real" / "synthetic" /
    "uncertain" (rine.model.calibration); set only for a calibrated model or when a threshold
    or uncertain band is given, so an uncalibrated model's records are unchanged.

    block_contribution [blocks]: share of each encoder block in this image's pooled
    feature (L1 norm of its importance-weighted projection, normalised to sum 1).

    error_kind: with `error`, its stable token (`rine.data.decoding.error_kind`: missing,
    too_large, too_many_pixels, corrupt, timeout, ...), for telling errors apart.
    """

    path: str
    prob_fake: float | None = None
    logit: float | None = None
    is_fake: bool | None = None
    error: str | None = None
    block_contribution: list[float] | None = None
    threshold: float | None = None
    verdict: str | None = None
    error_kind: str | None = None
    stability: dict[str, Any] | None = None

    def to_dict(self, with_blocks: bool = False) -> dict[str, Any]:
        d = asdict(self)
        if not with_blocks:
            d.pop("block_contribution")
        for key in ("threshold", "verdict", "error_kind", "stability"):
            if d[key] is None:
                del d[key]
        return d


def _name_of(source: ImageSource, index: int) -> str:
    if isinstance(source, (str, Path)):
        return str(source)
    if isinstance(source, Image.Image) and getattr(source, "filename", ""):
        return str(source.filename)
    return f"<image {index}>"


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but no CUDA device is available")
    return dev


def official_head_config(head: RINEHead, source: str | Path, backbone: str, revision: str | None, image_size: int,
                         crop: str | None = None) -> RINEConfig:
    """The config of an official `*_trainable.pth` head (which records none): the backbone's
    image size and, unless `crop` says otherwise, the paper's centre crop."""
    return RINEConfig(backbone=backbone, backbone_revision=revision, head=head.config,
                      preprocess=PreprocessConfig(image_size=image_size, crop=crop or "center"),
                      name=Path(source).stem, meta={"head_source": str(source)})


def default_batch_size(device: torch.device) -> int:
    """Images per encoder batch: 16 keeps a CPU's caches warm, a GPU wants more in flight."""
    return 64 if device.type == "cuda" else 16


def prepare_views(
    source: ImageSource,
    preprocess: PreprocessConfig,
    max_pixels: int | None,
    max_bytes: int | None = DEFAULT_MAX_BYTES,
) -> np.ndarray:
    """Decode one image and cut its uint8 views [V, S, S, 3]; runs in decoding workers.
    Baseline JPEGs under the center and ten crops decode only the windows' pixels
    (`data.jpeg_crop`), with the same views and errors as a full decode."""
    return decode_views(source, preprocess, max_pixels=max_pixels, max_bytes=max_bytes)


def _normalize_on(batch_uint8: torch.Tensor, mean, std) -> torch.Tensor:
    """`preprocess.normalize` on the tensor's own device: [N, S, S, 3] uint8 -> [N, 3, S, S] float32."""
    x = batch_uint8.permute(0, 3, 1, 2).float().div(255)
    m = torch.tensor(mean, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s


class TorchBackend:
    """The torch encoder (`accel.FastTapEncoder` or the reference path) + head of a Detector:
    uint8 views in, logits, contributions or taps out; pixels are normalised on the device."""

    name = "torch"

    def __init__(self, model: RINEModel, encoder: torch.nn.Module, preprocess: PreprocessConfig, device: torch.device):
        self.model, self.encoder, self.preprocess, self.device = model, encoder, preprocess, device
        self.n_blocks, self.width = model.backbone.n_blocks, model.backbone.width

    @torch.no_grad()
    def score_views(self, views_uint8: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 views [N, S, S, 3] -> (logits [N], block contribution [N, blocks]) on CPU."""
        taps = self._encode(torch.as_tensor(views_uint8))  # [N, blocks, width] float32
        out = self.model.head(taps.float())
        contrib = out.contributions.abs().sum(dim=-1)  # [N, blocks]
        contrib = contrib / contrib.sum(dim=-1, keepdim=True).clamp_min(1e-12)
        return out.logits.float().cpu(), contrib.float().cpu()

    @torch.no_grad()
    def encode_views(self, views_uint8: np.ndarray | torch.Tensor, batch_size: int = 32) -> torch.Tensor:
        """uint8 views [N, S, S, 3] -> taps [N, blocks, width] float32 on CPU."""
        x = torch.as_tensor(views_uint8)
        self.plan_batch(batch_size)
        out = [self._encode(x[i : i + batch_size]).float().cpu() for i in range(0, len(x), batch_size)]
        if not out:
            return torch.empty(0, self.model.backbone.n_blocks, self.model.backbone.width)
        return torch.cat(out)

    def plan_batch(self, views: int) -> None:
        """Tell a compiled encoder the batch size to build its one graph for."""
        if isinstance(self.encoder, FastTapEncoder):
            self.encoder.plan_batch(views)

    def _encode(self, x_uint8: torch.Tensor) -> torch.Tensor:
        """uint8 [N, S, S, 3] (CPU) -> taps [N, blocks, width] on the device."""
        mean, std = self.preprocess.mean, self.preprocess.std
        if self.device.type == "cuda":
            # uint8 crosses the bus (4x less than float32) from page-locked memory,
            # asynchronously; normalisation runs on the GPU.
            x = x_uint8.pin_memory().to(self.device, non_blocking=True)
            pixels = _normalize_on(x, mean, std)
        else:
            pixels = normalize(x_uint8, mean, std).to(self.device)
        return self.encoder(pixels)


class Detector:
    """A loaded RINE model plus its preprocessing: images in, probabilities out.

    compile=True compiles the encoder with torch.compile on first use (30-60 s for ViT-L, and
    a second copy of the weights; worth it for thousands of images in fp32 on CPU:
    docs/performance.md). Its one graph is built for the batch size of the run in progress when
    a full batch first arrives; larger batches are split, slightly smaller ones padded, and
    short ones (a run's last, a lone image) run uncompiled.

    keep_reference=False frees the backbone's own block weights once the fast encoder has
    re-laid-out copies (about half the resident memory of a ViT-L detector); scoring is
    unchanged, but `detector.model(...)` (the reference forward) then refuses to run.
    `rine detect` and `rine serve` load that way.
    """

    def __init__(
        self,
        model: RINEModel,
        config: RINEConfig,
        device: str | torch.device | None = "cpu",
        precision: str = "auto",
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        max_bytes: int | None = DEFAULT_MAX_BYTES,
        keep_reference: bool = True,
        compile: bool = False,
    ):
        self.device = resolve_device(str(device) if device is not None else None)
        self.requested_precision = precision
        # The concrete mode ("fp32", "bf16", "fp16"): "auto" is resolved here, once.
        self.precision = resolve_precision(precision, self.device)
        if compile and self.precision.startswith("int8"):
            raise ValueError(f"--compile does not apply to --precision {self.precision} (its oneDNN kernels run uncompiled); drop one of them")
        self.model = model.to(self.device).eval()
        self.config = config
        # logit -> probability, cut, verdict: the one post-processing step of every record path
        self.decision = DecisionRule.of(config)
        self.max_pixels = max_pixels  # per image, from the header, before decoding
        self.max_bytes = max_bytes  # per file, before reading it
        self.encoder = self._build_encoder(compile)
        if not keep_reference and isinstance(self.encoder, FastTapEncoder):
            # The fast encoder holds its own copies of the block weights: the reference
            # (HF) ones would only double the memory (+1.2 GB for ViT-L in float32).
            freed = self.model.backbone.release_block_weights()
            logger.info("released %.0f MB of reference block weights", freed / 2**20)
        self.head = self.model.head
        # What runs the encoder + head; everything else (decoding, batching, probabilities)
        # is this class's, whatever the backend (`rine.inference.onnx_backend` for ONNX Runtime).
        self.backend: Any = TorchBackend(self.model, self.encoder, config.preprocess, self.device)
        logger.info("encoder precision %s (asked: %s) on %s", self.precision, precision, self.device)

    def _build_encoder(self, compile: bool) -> torch.nn.Module:
        """The fast encoder for this precision (compiled by torch.compile if asked); the HF
        path if the backbone is not CLIP-like."""
        try:
            # int8-smooth's calibration is kept across runs (3.5 s of a ViT-L/14 load).
            return FastTapEncoder(self.model.backbone, self.precision, self.device, compile=compile,
                                  calibration_cache=rine_home() / "int8-calibration")
        except (ValueError, AttributeError, RuntimeError) as e:
            if self.precision != "fp32":
                raise ValueError(f"precision {self.precision} is not available for this backbone: {e}") from e
            logger.info("fast encoder unavailable (%s); using the reference fp32 path, uncompiled", e)
            return self.model.backbone

    # ------------------------------------------------------------------ construction
    @classmethod
    def with_backend(
        cls,
        backend: Any,
        config: RINEConfig,
        *,
        head: RINEHead | None = None,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        max_bytes: int | None = DEFAULT_MAX_BYTES,
    ) -> Detector:
        """A detector whose encoder + head run elsewhere (`backend.score_views`, `encode_views`,
        `plan_batch`, `precision`: e.g. `onnx_backend.OnnxRuntimeBackend`); `head`, when
        given, gives the block importance and is what `rine eval` scores taps with. There is
        no torch model: `detector.model` is None."""
        self = cls.__new__(cls)
        self.device = torch.device("cpu")  # where results come back; the backend runs where it was told
        self.requested_precision = self.precision = backend.precision
        self.model, self.encoder, self.head = None, None, head
        self.config, self.max_pixels, self.max_bytes = config, max_pixels, max_bytes
        self.backend = backend
        self.decision = DecisionRule.of(config)  # the calibration, threshold and band, as __init__ sets them
        return self

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str = "rine-vitl14-4class",
        *,
        backbone: str | None = None,
        crop: str | None = None,
        revision: str | None = None,
        **kwargs: Any,
    ) -> Detector:
        """A named pretrained model (downloaded on first use), a checkpoint folder or a Hub
        model repo (`user/repo` at `revision`, as `rine push` uploads it; its backbone
        still comes from its own pinned source).

        `backbone` overrides the backbone source of the config (e.g. a local folder or an
        OpenAI-format file holding the same weights); `crop` overrides the preprocessing.
        """
        from ..model.pretrained import (
            PRETRAINED,
            WeightsUnavailableError,
            backbone_missing_message,
            is_hub_model_id,
            resolve_model,
        )

        if not Path(name_or_path).expanduser().is_dir() and name_or_path not in PRETRAINED \
                and not is_hub_model_id(name_or_path):
            raise UnknownNameError("model", name_or_path, sorted(PRETRAINED), message=(
                f"{name_or_path!r} is neither a checkpoint folder, a known model "
                f"({', '.join(sorted(PRETRAINED))}) nor a Hub model id (user/repo)"))
        folder = resolve_model(name_or_path, revision, backbone_given=str(backbone) if backbone else None)
        head, config = load_pretrained(folder)
        source = backbone or config.backbone
        try:
            bb = load_backbone(source, None if backbone else config.backbone_revision)
        except WeightsUnavailableError:
            raise  # the model layer's own: its message and its `missing` pieces, as they are
        except Exception as e:  # noqa: BLE001 - hub/network errors have many types
            if backbone is None and not Path(source).exists():
                raise WeightsUnavailableError(backbone_missing_message(name_or_path, source, e)) from None
            raise
        if crop:
            config = replace(config, preprocess=replace(config.preprocess, crop=crop))
        return cls(RINEModel(bb, head), config, **kwargs)

    @classmethod
    def from_files(
        cls,
        backbone: str,
        head: str,
        *,
        revision: str | None = None,
        crop: str | None = None,
        **kwargs: Any,
    ) -> Detector:
        """A backbone source (name, hub id, folder, OpenAI file) + a head (.pth or folder).

        `crop` overrides the preprocessing; by default a checkpoint folder keeps its own and
        an official `.pth` (which records none) gets the paper's centre crop."""
        head_module, head_config = load_head(head)
        bb = load_backbone(backbone, revision)
        if head_config is not None:
            config = replace(head_config, backbone=backbone, backbone_revision=revision)
            if crop:
                config = replace(config, preprocess=replace(config.preprocess, crop=crop))
        else:
            config = official_head_config(head_module, head, backbone, revision, bb.image_size, crop)
        return cls(RINEModel(bb, head_module), config, **kwargs)

    # ------------------------------------------------------------------ info
    @property
    def threshold(self) -> float:
        """The probability cut of `is_fake` (the calibrated one for a calibrated model)."""
        return self.decision.threshold

    def set_decision(self, threshold: float | None = None, uncertain_band: float | None = None) -> None:
        """Override the cut (a probability) and/or the uncertain band half-width (0: none)."""
        self.decision = DecisionRule.of(self.config, threshold, uncertain_band)

    def decide(self, logit: float, name: str, block_contribution: list[float] | None = None) -> Prediction:
        """One image's head logit -> its Prediction (probability, cut and verdict from
        `self.decision`); every scoring backend builds its records here."""
        d = self.decision.decide(logit)
        extra = self.decision.reports_threshold
        return Prediction(path=name, prob_fake=d.prob_fake, logit=float(logit), is_fake=d.is_fake,
                          block_contribution=block_contribution,
                          threshold=d.threshold if extra else None, verdict=d.verdict if extra else None)

    def block_importance(self) -> list[float]:
        """The TIE's learned importance of each block (mean over channels) -> [blocks]."""
        if self.head is None:
            return []
        with torch.no_grad():
            return self.head.block_importance().cpu().tolist()

    # ------------------------------------------------------------------ scoring
    def score_views(self, views_uint8: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 views [N, S, S, 3] -> (logits [N], block contribution [N, blocks]) on CPU."""
        return self.backend.score_views(views_uint8)

    def encode_views(self, views_uint8: np.ndarray | torch.Tensor, batch_size: int = 32) -> torch.Tensor:
        """uint8 views [N, S, S, 3] -> taps [N, blocks, width] float32 on CPU, through the
        same backend, encoder and precision as `score_views` (used by evaluation)."""
        return self.backend.encode_views(views_uint8, batch_size=batch_size)

    def _plan_batch(self, views: int) -> None:
        self.backend.plan_batch(views)

    def _finish(self, names: list[str], arrays: list[np.ndarray]) -> list[Prediction]:
        counts = [len(a) for a in arrays]
        logits, contrib = self.score_views(np.concatenate(arrays))
        preds, start = [], 0
        for name, n in zip(names, counts, strict=True):
            # Ten-crop: the probability is sigmoid of the MEAN logit, as the reference does.
            logit = logits[start : start + n].mean().item()
            preds.append(self.decide(logit, name, contrib[start : start + n].mean(dim=0).tolist()))
            start += n
        return preds

    def predict_views(self, names: Sequence[str], views: Sequence[np.ndarray | StabilityViews]) -> list[Prediction]:
        """Score images already decoded and cut by `prepare_views` (uint8 [V, S, S, 3] each), e.g.
        in another process or on another machine (`rine batch`): the records `predict` gives.
        `data.reencode.stability_views` results give the records of `stability=True`."""
        if not len(views):
            return []
        if isinstance(views[0], StabilityViews):
            return predict_with_stability(self, list(names), list(views))
        return self._finish(list(names), list(views))

    def predict_iter(
        self,
        sources: Iterable[ImageSource],
        batch_size: int | None = None,
        progress: bool = False,
        total: int | None = None,
        *,
        decode: DecodeOptions | None = None,
        stability: bool | Sequence[str] = False,
    ) -> Iterator[Prediction]:
        """Score a stream of images in input order; failures come back with `error` set.

        `stability` (True: `data.reencode.DEFAULT_CONDITIONS`, or condition names): each image
        is also scored re-encoded under each condition, decoded once and batched with its
        copies (records gain `stability`, a threshold and a verdict; docs/stability.md).

        `decode` says how images are decoded (`DecodeOptions`: image limits, workers, decoder
        "threads" or "processes", and with processes the per-image timeout after which an image
        is skipped and its worker stopped); limits it leaves None are the detector's `max_pixels`
        / `max_bytes`, workers and decoder the device's (`rine.data.decoding.default_workers` /
        `default_decoder`). Batch size: `default_batch_size`."""
        from tqdm.auto import tqdm

        decode = decode or DecodeOptions()
        # limits the options leave open are the detector's own
        decode = replace(decode, max_pixels=self.max_pixels if decode.max_pixels is None else decode.max_pixels,
                         max_bytes=self.max_bytes if decode.max_bytes is None else decode.max_bytes)
        batch_size = batch_size or default_batch_size(self.device)
        conditions = resolve_conditions(None if stability is True else [stability] if isinstance(stability, str)
                                        else stability) if stability else ()
        self._plan_batch(batch_size * self.config.preprocess.n_views * (1 + len(conditions)))
        bar = tqdm(total=total, unit="img", disable=not progress, dynamic_ncols=True)
        pre, limits = self.config.preprocess, (decode.max_pixels, decode.max_bytes)
        fn, jobs = prepare_views, ((_name_of(s, i), (s, pre, *limits)) for i, s in enumerate(sources))
        if conditions:  # the whole image decoded once, then re-encoded: stability_views
            fn, jobs = stability_views, ((_name_of(s, i), (s, pre, conditions, *limits)) for i, s in enumerate(sources))
        batches = decode_batches(fn, jobs, decode, batch_size=batch_size, device=self.device,
                                 preload=("rine.inference.detector",))
        try:
            for batch in batches:
                ok = [(name, views) for name, views, error in batch if error is None]
                scored = iter(self.predict_views([n for n, _ in ok], [v for _, v in ok]))
                for name, _, error in batch:
                    bar.update(1)
                    yield next(scored) if error is None else Prediction(path=name, error=error_text(error, name), error_kind=error_kind(error))
        finally:
            batches.close()
            bar.close()

    def predict(self, sources: ImageSource | Sequence[ImageSource], batch_size: int | None = None, **kwargs: Any) -> list[Prediction]:
        """Score one image or a list of images (paths, bytes, PIL images or uint8 RGB arrays)."""
        if isinstance(sources, np.ndarray) and sources.ndim == 4:
            sources = list(sources)  # a batch of arrays [N, H, W, C]
        elif isinstance(sources, (str, Path, bytes, Image.Image, np.ndarray)):
            sources = [sources]
        return list(self.predict_iter(sources, batch_size=batch_size, total=len(sources), **kwargs))
