"""The model's lifecycle behind the endpoints: loading (in the background), the decode pool and
the cross-request batcher, and turning uploaded bytes into result records.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..data.decoding import error_kind
from ..data.images import ImageLoadError
from ..data.jpeg_crop import decode_views
from ..data.reencode import StabilityViews, resolve_conditions, stability_views
from ..inference.stability import decide_with_stability, stability_fields
from ..provenance.reader import read_provenance
from ..provenance.records import with_provenance
from ..provenance.types import Provenance
from .batching import Batcher, Overloaded, ScoringFailed, ViewScores
from .limits import (
    HTTPError,
    ServerSettings,
    _mb,
    _MemoryBudget,
    _PixelBudget,
    _Upload,
    load_error_status,
)

if TYPE_CHECKING:
    from ..inference.detector import Detector
    from ..inference.loading import ModelOptions
    from ..model.calibration import DecisionRule

logger = logging.getLogger(__name__)


class Service:
    """State shared by the endpoints: the detector (once loaded), pools, batcher, limits."""

    def __init__(self, settings: ServerSettings, detector: Any = None,
                 detector_factory: Callable[[], Any] | None = None,
                 on_load_error: Callable[[BaseException], None] | None = None):
        if (detector is None) == (detector_factory is None):
            raise ValueError("give exactly one of detector or detector_factory")
        self.settings = settings
        self.detector = detector
        self.detector_factory = detector_factory
        self.on_load_error = on_load_error
        self.load_error: str | None = None
        self.batcher: Batcher | None = None
        self.decode_pool: ThreadPoolExecutor | None = None
        self.budget = _MemoryBudget(settings.memory_budget_bytes)
        self.in_flight = 0
        self.started_at = time.time()
        self._lock = threading.Lock()
        self._closed = False
        self._model_block_importance: list[float] = []
        self.on_batch = None  # Batcher.on_batch of the encoder's batcher (the app's metrics)

    @property
    def ready(self) -> bool:
        return self.batcher is not None

    def start(self) -> None:
        self.decode_pool = ThreadPoolExecutor(self.settings.decode.workers, thread_name_prefix="rine-decode")
        if self.detector is not None:
            self._activate(self.detector)
        else:
            threading.Thread(target=self._load, name="rine-load-model", daemon=True).start()

    def _load(self) -> None:
        t0 = time.perf_counter()
        try:
            detector = self.detector_factory()
            self._activate(detector)
        except BaseException as e:  # noqa: BLE001 - reported through /readyz and the hook
            # /readyz is open without a key: it names the error's type only, since the message
            # may hold local paths; the full message goes to the server's log.
            self.load_error = type(e).__name__
            logger.error("model failed to load: %s: %s", type(e).__name__, e)
            if self.on_load_error is not None:
                self.on_load_error(e)
            return
        logger.info("model %s loaded in %.1f s", detector.config.name, time.perf_counter() - t0)

    def _activate(self, detector: Any) -> None:
        with self._lock:
            if self._closed:
                return
            self.detector = detector
            self._model_block_importance = [round(float(x), 6) for x in detector.block_importance()]
            s = self.settings
            self.batcher = Batcher(detector.score_views, s.max_batch, s.max_wait_ms / 1000, s.max_queue,
                                   on_batch=self.on_batch).start()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            batcher, self.batcher = self.batcher, None
        if batcher is not None:
            batcher.close()
        if self.decode_pool is not None:
            self.decode_pool.shutdown(wait=False, cancel_futures=True)

    def busy(self, detail: str, reason: str = "busy") -> HTTPError:
        """503 + Retry-After; `reason` (loading, busy, timeout) lets a client decide whether
        retrying can help: a timeout recurs for the same image, loading and busy pass."""
        return HTTPError(503, detail, {"Retry-After": str(self.settings.retry_after_s)}, {"reason": reason})

    # -------------------------------------------------------------- work
    def prepare(self, data: bytes, request_pixels: _PixelBudget | None = None,
                stability: bool = False) -> np.ndarray | StabilityViews:
        """Encoded image bytes -> uint8 views [V, S, S, 3]; runs in the decode pool. With
        `stability`, also the views of the re-encoded copies (`data.reencode.StabilityViews`).
        A file's failure is an ImageLoadError of its kind (data.images.decode_errors)."""
        reserve = request_pixels.take if request_pixels is not None else None
        decode = self.settings.decode
        if stability:
            return stability_views(data, self.detector.config.preprocess, resolve_conditions(),
                                   max_pixels=decode.max_pixels, max_bytes=decode.max_bytes,
                                   reserve_pixels=reserve)
        # crop-aware for baseline JPEGs, the same bytes as load_image + crop_views otherwise
        return decode_views(data, self.detector.config.preprocess, max_pixels=decode.max_pixels,
                            max_bytes=decode.max_bytes, reserve_pixels=reserve)

    def provenance(self, data: bytes) -> Provenance | None:
        """What the upload declares about its origin; runs in the decode pool. Never fails the
        request: a reader fault is logged and the result carries no provenance."""
        try:
            return read_provenance(data, trust=self.settings.trust)
        except Exception as e:  # noqa: BLE001 - evidence is optional, the score is not
            logger.warning("provenance reader failed: %s", type(e).__name__, exc_info=True)
            return None

    def model_info(self) -> dict[str, Any]:
        cfg = self.detector.config
        return {
            "name": cfg.name,
            "backbone": _public_source(cfg.backbone),
            "revision": cfg.backbone_revision,
            "threshold": self.detector.threshold,
            # method, scale, offset, cut and uncertain band: what the page needs to decide from a
            # logit as the server does (None: plain sigmoid(logit) > threshold)
            "calibration": decision_rule(self.detector).public(),
            "crop": cfg.preprocess.crop,
            "image_size": cfg.preprocess.image_size,
            "n_blocks": len(self._model_block_importance),
            "block_importance": self._model_block_importance,
            # the page refuses a file over the limit before uploading it
            "max_file_bytes": self.settings.max_file_bytes,
            "max_files": self.settings.max_files,
        }

    async def score_uploads(self, uploads: list[_Upload], stability: bool = False) -> list[dict[str, Any]]:
        """One record per upload; `stability`: each also scored under the re-encodings of
        docs/stability.md, in the same encoder batch (records gain `stability`)."""
        loop = asyncio.get_running_loop()
        s = self.settings
        records: list[dict[str, Any] | None] = [None] * len(uploads)
        decodes: dict[int, asyncio.Future] = {}
        provenances: dict[int, asyncio.Future] = {}
        request_pixels = _PixelBudget(s.max_request_pixels)
        for i, up in enumerate(uploads):
            if up.too_large:
                records[i] = _error_record(up.filename, 413, f"file too large: over the limit of {_mb(s.max_file_bytes)}",
                                           "too_large")
            elif up.size == 0:
                records[i] = _error_record(up.filename, 422, "empty file", "empty")
            else:
                # in a copy of the request's context: the decoder's log lines carry its request id
                data = bytes(up.data)
                decodes[i] = loop.run_in_executor(self.decode_pool, contextvars.copy_context().run, self.prepare,
                                                  data, request_pixels, stability)
                if s.trust is not None:  # metadata only, no pixels but lossless files' watermark check
                    provenances[i] = loop.run_in_executor(self.decode_pool, contextvars.copy_context().run, self.provenance, data)
                # The pool holds its own copy; the request's buffer can go now.
                up.data = bytearray()
        scores: dict[int, asyncio.Future] = {}
        prepared: dict[int, StabilityViews] = {}
        # One deadline from the end of the upload to the last score, decoding included.
        deadline = loop.time() + s.score_timeout_s

        def remaining() -> float:
            return max(0.0, deadline - loop.time())

        try:
            for i, fut in decodes.items():
                try:
                    views = await asyncio.wait_for(fut, remaining())
                except asyncio.TimeoutError:
                    raise self.busy(f"decoding took longer than {s.score_timeout_s:g} s", "timeout") from None
                except ImageLoadError as e:
                    records[i] = _error_record(uploads[i].filename, load_error_status(e.kind), str(e), e.kind)
                    continue
                except Exception as e:  # noqa: BLE001 - one bad file must not fail the others
                    logger.warning("unexpected decode error: %s", e, exc_info=True)
                    records[i] = _error_record(uploads[i].filename, 422, f"cannot decode image: {type(e).__name__}",
                                               error_kind(e))
                    continue
                batcher = self.batcher
                if batcher is None:
                    raise self.busy("model not loaded", "loading")
                if isinstance(views, StabilityViews):
                    prepared[i], views = views, views.views
                try:
                    scores[i] = asyncio.wrap_future(batcher.submit(views))
                except Overloaded as e:
                    raise self.busy(f"server busy: {e}") from None
            if scores:
                try:
                    done = await asyncio.wait_for(asyncio.gather(*scores.values(), return_exceptions=True), remaining())
                except asyncio.TimeoutError:
                    raise self.busy(f"scoring took longer than {s.score_timeout_s:g} s", "timeout") from None
                for i, vs in zip(scores, done, strict=True):
                    if isinstance(vs, Overloaded):
                        raise self.busy(str(vs))
                    if isinstance(vs, ScoringFailed):  # the batcher isolated this image's failure
                        records[i] = _error_record(uploads[i].filename, 500, f"scoring failed ({vs}); see the server log",
                                                   "scoring_failed")
                    elif isinstance(vs, BaseException):
                        raise vs
                    else:
                        records[i] = self._record(uploads[i].filename, vs, prepared.get(i))
                        if i in provenances:
                            records[i] = with_provenance(records[i], await asyncio.wait_for(provenances[i], remaining()))
        finally:
            for fut in list(decodes.values()) + list(scores.values()) + list(provenances.values()):
                fut.cancel()
        return [r for r in records if r is not None]

    def _record(self, name: str, vs: ViewScores, sv: StabilityViews | None = None) -> dict[str, Any]:
        # Ten-crop: the probability is the sigmoid of the MEAN logit, as in the reference.
        # Computed as Detector.predict does (float32 mean, then sigmoid) so that the API and
        # `rine detect` give the same number for the same file.
        # The detector's decision rule (rine.model.calibration) turns it into the probability,
        # the cut and the verdict, calibrated or not, as for `rine detect`.
        rule = decision_rule(self.detector)
        extra: dict[str, Any] = {}
        if sv is not None:  # the file's views first, then each re-encoded copy's
            logit, d, st = decide_with_stability(rule, vs.logits, sv.applied, sv.per_image, sv.skipped)
            extra = stability_fields(d, st)
            vs = ViewScores(vs.logits[: sv.per_image], vs.contributions[: sv.per_image])
        else:
            logit = torch.from_numpy(np.ascontiguousarray(vs.logits)).mean().item()
            d = rule.decide(logit)
        record = {
            "name": name,
            "status": 200,
            "prob_fake": d.prob_fake,
            "logit": logit,
            "is_fake": d.is_fake,
            "verdict": d.verdict,
            "block_importance": [round(float(x), 6) for x in vs.contributions.mean(axis=0)],
            "error": None,
            "error_kind": None,
        }
        if rule.reports_threshold:
            record["threshold"] = d.threshold
        return {**record, **extra}


def load_served(options: ModelOptions, threshold: float | None = None,
                uncertain_band: float | None = None) -> Detector:
    """The detector `rine serve` scores with: `options` through the library's one loader
    (`rine.inference.loading.load_detector`), the fast encoder only (no reference copy: half
    the memory), then the decision overrides (None: the model's own)."""
    from ..inference.loading import load_detector

    detector = load_detector(options, keep_reference=False, progress=False)
    if threshold is not None or uncertain_band is not None:
        detector.set_decision(threshold, uncertain_band)
    return detector


def decision_rule(detector: Any) -> DecisionRule:
    """The detector's decision rule; one built from its config for a detector-like object
    without one (a wrapper that only scores views)."""
    from ..model.calibration import DecisionRule

    rule = getattr(detector, "decision", None)
    return rule if isinstance(rule, DecisionRule) else DecisionRule.of(detector.config)


def _public_source(source: str) -> str:
    """A backbone source as shown to clients: registry names and hub ids as they are, a local
    path reduced to its last component (the server's directory layout is nobody's business)."""
    if Path(source).is_absolute() or source.startswith((".", "~")) or Path(source).exists():
        return Path(source).name or source
    return source


def _error_record(name: str, status: int, reason: str, kind: str) -> dict[str, Any]:
    """A file's refusal; `kind` is the stable token clients tell errors apart by (the
    `ImageLoadError` kinds, "error" for an unexpected decoder failure, "scoring_failed")."""
    return {"name": name, "status": status, "prob_fake": None, "logit": None, "is_fake": None,
            "verdict": None, "block_importance": None, "error": reason, "error_kind": kind}
