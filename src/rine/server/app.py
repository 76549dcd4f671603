"""The HTTP service: `create_app(detector or detector_factory, settings)` -> FastAPI app.

Endpoints: `POST /v1/detect` (multipart field `files`, one or several images),
`GET /v1/model`, `GET /healthz`, `GET /readyz`, the web page at `/` and the OpenAPI
document at `/openapi.json` (FastAPI's browsable `/docs` is off: it loads its viewer
from a CDN, and the service is meant to work on an offline network).

Uploads are parsed from the request stream by our own bounded multipart reader: parts
stay in memory (never on disk, never under the client's file name), every byte counts
against the file, request and server-wide memory limits, and a body that is too large
is refused before or while it is read, not after.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fastapi import Depends, FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse
from fastapi.security import APIKeyHeader
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel
from python_multipart.multipart import MultipartParser, parse_options_header

from ..data.images import ImageLoadError, load_image
from ..data.preprocess import crop_views
from .batching import Batcher, Overloaded, ScoringFailed, ViewScores
from .guards import AllowedHosts, SecurityHeaders, same_site

logger = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"
MB = 1024 * 1024
FILES_FIELD = "files"
API_KEY_HEADER = "X-API-Key"


@dataclass
class ServerSettings:
    """Limits of the service. The defaults protect a small machine (2 cores, a few GB)."""

    max_file_bytes: int = 20 * MB  # one uploaded image
    max_request_bytes: int = 64 * MB  # a whole request body (all its files)
    max_files: int = 16  # images per request
    max_pixels: int = 40_000_000  # per image, checked from the header before decoding
    # All the images of one request, from their headers: a few KB of blank WebP can be a
    # 40 M-pixel image that takes a second to decode, so bytes alone do not bound the work.
    max_request_pixels: int = 200_000_000
    memory_budget_bytes: int = 512 * MB  # uploads held in memory by all requests together
    max_concurrent_requests: int = 256  # /v1/detect requests being read, decoded or scored
    decode_workers: int = field(default_factory=lambda: max(1, min(2, os.cpu_count() or 1)))
    max_batch: int = 32  # views per encoder batch (an image is 1 view, 10 with ten-crop)
    max_wait_ms: float = 10.0  # how long an idle encoder waits to fill a batch
    max_queue: int = 256  # images waiting for the encoder before 503
    read_timeout_s: float = 30.0  # to receive a whole request body
    score_timeout_s: float = 60.0  # from the end of the upload to the last score
    retry_after_s: int = 2  # advertised with every 503
    api_key: str | None = field(default=None, repr=False)
    # Names the `Host` header may carry (None: any). A loopback server without a key gets
    # the loopback names from `rine serve`: a page whose own name was re-pointed at
    # 127.0.0.1 (DNS rebinding) then cannot use it.
    allowed_hosts: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.max_request_bytes < self.max_file_bytes:
            raise ValueError("max_request_bytes must be at least max_file_bytes")
        for name in ("max_file_bytes", "max_files", "max_pixels", "max_request_pixels", "max_concurrent_requests",
                     "decode_workers",
                     "max_batch", "max_queue"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.api_key == "":
            raise ValueError("api_key must not be empty (use None for no key)")
        if self.memory_budget_bytes < self.max_file_bytes:
            raise ValueError("memory_budget_bytes must be at least max_file_bytes, or such a file could never be held")
        if self.max_wait_ms < 0 or self.retry_after_s < 0:
            raise ValueError("max_wait_ms and retry_after_s must not be negative")
        if self.read_timeout_s <= 0 or self.score_timeout_s <= 0:
            raise ValueError("read_timeout_s and score_timeout_s must be positive")


# ---------------------------------------------------------------------- response models (OpenAPI)
class ImageResult(BaseModel):
    name: str
    status: int
    prob_fake: float | None = None
    logit: float | None = None
    is_fake: bool | None = None
    verdict: str | None = None
    block_importance: list[float] | None = None
    error: str | None = None


class DetectResponse(BaseModel):
    model: str
    threshold: float
    model_block_importance: list[float]
    results: list[ImageResult]


class ModelInfo(BaseModel):
    name: str
    backbone: str
    revision: str | None
    threshold: float
    crop: str
    image_size: int
    n_blocks: int
    block_importance: list[float]
    max_file_bytes: int
    max_files: int


class ErrorResponse(BaseModel):
    detail: str
    reason: str | None = None  # 503 only: loading, busy, timeout or failed


# ---------------------------------------------------------------------- errors
class HTTPError(Exception):
    """An error answered as JSON `{"detail": ...}` with its status (and headers)."""

    def __init__(self, status: int, detail: str, headers: dict[str, str] | None = None, extra: dict | None = None):
        super().__init__(detail)
        self.status, self.detail, self.headers, self.extra = status, detail, headers or {}, extra or {}

    def response(self) -> JSONResponse:
        return JSONResponse({"detail": self.detail, **self.extra}, status_code=self.status, headers=self.headers)


def load_error_status(kind: str) -> int:
    """HTTP status of an `ImageLoadError.kind`: 413 too big, 415 not an image, 422 broken."""
    if kind in ("too_large", "too_many_pixels"):
        return 413
    if kind in ("not_image", "bad_mode"):
        return 415
    return 422


def display_name(filename: str | None, index: int) -> str:
    """The client's file name, for display only: last path component, printable, bounded."""
    if not filename:
        return f"file {index + 1}"
    base = filename.replace("\\", "/").rsplit("/", 1)[-1]
    base = "".join(ch for ch in base if ch.isprintable())[:200]
    return base or f"file {index + 1}"


# ---------------------------------------------------------------------- upload reading
@dataclass
class _Upload:
    filename: str | None
    data: bytearray = field(default_factory=bytearray)
    size: int = 0
    too_large: bool = False


class _MemoryBudget:
    """Bytes of upload held in memory by all requests; touched only from the event loop."""

    def __init__(self, limit: int):
        self.limit, self.used = limit, 0

    def take(self, n: int) -> bool:
        if self.used + n > self.limit:
            return False
        self.used += n
        return True

    def give(self, n: int) -> None:
        self.used = max(0, self.used - n)


class _PixelBudget:
    """Pixels decoded for one request, reserved from each image's header (decode threads)."""

    def __init__(self, limit: int):
        self.limit, self.used = limit, 0
        self._lock = threading.Lock()

    def take(self, n: int) -> None:
        with self._lock:
            if self.used + n > self.limit:
                raise ImageLoadError(
                    f"too many pixels in this request: this image's {n} would bring it over the limit of "
                    f"{self.limit} for all its images together; send it in another request", "too_many_pixels")
            self.used += n


class _UploadReader:
    """Streams a multipart body into in-memory `_Upload`s under the settings' limits."""

    MAX_OTHER_FIELD_BYTES = 64 * 1024  # non-file fields are ignored, but still bounded

    def __init__(self, settings: ServerSettings, budget: _MemoryBudget):
        self.settings, self.budget = settings, budget
        self.uploads: list[_Upload] = []
        self.held = 0  # bytes taken from the budget, given back by release()
        self.received = 0
        self._other_bytes = 0
        self._part: _Upload | None = None
        self._in_file = False
        self._header_name = b""
        self._header_value = b""
        self._disposition = b""
        self._error: HTTPError | None = None

    # python-multipart callbacks: they run synchronously inside parser.write()
    def on_part_begin(self) -> None:
        self._part, self._in_file, self._disposition = None, False, b""

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def on_header_end(self) -> None:
        if self._header_name.lower() == b"content-disposition":
            self._disposition = self._header_value
        self._header_name, self._header_value = b"", b""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        name = options.get(b"name", b"")
        if name == FILES_FIELD.encode():
            if len(self.uploads) >= self.settings.max_files:
                raise HTTPError(413, f"too many files: at most {self.settings.max_files} per request")
            raw = options.get(b"filename")
            filename = raw.decode("utf-8", "replace") if raw is not None else None
            self._part = _Upload(display_name(filename, len(self.uploads)))
            self.uploads.append(self._part)
            self._in_file = True

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        n = end - start
        if not self._in_file:
            self._other_bytes += n
            if self._other_bytes > self.MAX_OTHER_FIELD_BYTES:
                raise HTTPError(413, "form fields other than 'files' are too large")
            return
        part = self._part
        assert part is not None
        part.size += n
        if part.too_large:
            return
        if part.size > self.settings.max_file_bytes:
            # Keep reading (the request cap still bounds it) so that the other files get results.
            part.too_large = True
            self.budget.give(len(part.data))
            self.held -= len(part.data)
            part.data = bytearray()
            return
        if not self.budget.take(n):
            raise HTTPError(503, "server busy: upload memory budget exhausted, retry later",
                            {"Retry-After": str(self.settings.retry_after_s)}, {"reason": "busy"})
        self.held += n
        part.data += data[start:end]

    def on_part_end(self) -> None:
        self._in_file = False

    async def read(self, request: Request, boundary: bytes) -> list[_Upload]:
        callbacks = {name: getattr(self, name) for name in (
            "on_part_begin", "on_header_field", "on_header_value", "on_header_end",
            "on_headers_finished", "on_part_data", "on_part_end")}
        parser = MultipartParser(boundary, callbacks)
        limit = self.settings.max_request_bytes
        try:
            async for chunk in request.stream():
                self.received += len(chunk)
                if self.received > limit:
                    raise HTTPError(413, f"request body too large: over the limit of {_mb(limit)}")
                parser.write(chunk)
            parser.finalize()
        except HTTPError:
            raise
        except Exception as e:  # python-multipart's parse errors, client disconnects
            logger.debug("bad multipart body", exc_info=True)
            raise HTTPError(400, f"malformed multipart body: {type(e).__name__}") from None
        return self.uploads

    def release(self) -> None:
        self.budget.give(self.held)
        self.held = 0
        for up in self.uploads:
            up.data = bytearray()


# ---------------------------------------------------------------------- the service
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

    @property
    def ready(self) -> bool:
        return self.batcher is not None

    def start(self) -> None:
        self.decode_pool = ThreadPoolExecutor(self.settings.decode_workers, thread_name_prefix="rine-decode")
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
            self.batcher = Batcher(detector.score_views, s.max_batch, s.max_wait_ms / 1000, s.max_queue).start()

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
    def prepare(self, data: bytes, request_pixels: _PixelBudget | None = None) -> np.ndarray:
        """Encoded image bytes -> uint8 views [V, S, S, 3]; runs in the decode pool."""
        image = load_image(data, max_pixels=self.settings.max_pixels, max_bytes=self.settings.max_file_bytes,
                           reserve_pixels=request_pixels.take if request_pixels is not None else None)
        return crop_views(image, self.detector.config.preprocess)

    def model_info(self) -> dict[str, Any]:
        cfg = self.detector.config
        return {
            "name": cfg.name,
            "backbone": _public_source(cfg.backbone),
            "revision": cfg.backbone_revision,
            "threshold": cfg.threshold,
            "crop": cfg.preprocess.crop,
            "image_size": cfg.preprocess.image_size,
            "n_blocks": len(self._model_block_importance),
            "block_importance": self._model_block_importance,
            # the page refuses a file over the limit before uploading it
            "max_file_bytes": self.settings.max_file_bytes,
            "max_files": self.settings.max_files,
        }

    async def score_uploads(self, uploads: list[_Upload]) -> list[dict[str, Any]]:
        loop = asyncio.get_running_loop()
        s = self.settings
        records: list[dict[str, Any] | None] = [None] * len(uploads)
        decodes: dict[int, asyncio.Future] = {}
        request_pixels = _PixelBudget(s.max_request_pixels)
        for i, up in enumerate(uploads):
            if up.too_large:
                records[i] = _error_record(up.filename, 413, f"file too large: over the limit of {_mb(s.max_file_bytes)}")
            elif up.size == 0:
                records[i] = _error_record(up.filename, 422, "empty file")
            else:
                decodes[i] = loop.run_in_executor(self.decode_pool, self.prepare, bytes(up.data), request_pixels)
                # The pool holds its own copy; the request's buffer can go now.
                up.data = bytearray()
        scores: dict[int, asyncio.Future] = {}
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
                    records[i] = _error_record(uploads[i].filename, load_error_status(e.kind), str(e))
                    continue
                except Exception as e:  # noqa: BLE001 - one bad file must not fail the others
                    logger.warning("unexpected decode error: %s", e, exc_info=True)
                    records[i] = _error_record(uploads[i].filename, 422, f"cannot decode image: {type(e).__name__}")
                    continue
                batcher = self.batcher
                if batcher is None:
                    raise self.busy("model not loaded", "loading")
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
                        records[i] = _error_record(uploads[i].filename, 500, f"scoring failed ({vs}); see the server log")
                    elif isinstance(vs, BaseException):
                        raise vs
                    else:
                        records[i] = self._record(uploads[i].filename, vs)
        finally:
            for fut in list(decodes.values()) + list(scores.values()):
                fut.cancel()
        return [r for r in records if r is not None]

    def _record(self, name: str, vs: ViewScores) -> dict[str, Any]:
        # Ten-crop: the probability is the sigmoid of the MEAN logit, as in the reference.
        # Computed as Detector.predict does (float32 mean, then sigmoid) so that the API and
        # `rine detect` give the same number for the same file.
        mean_logit = torch.from_numpy(np.ascontiguousarray(vs.logits)).mean()
        logit, prob = mean_logit.item(), torch.sigmoid(mean_logit).item()
        is_fake = prob > self.detector.threshold  # as the reference and rine.metrics: p > threshold
        return {
            "name": name,
            "status": 200,
            "prob_fake": prob,
            "logit": logit,
            "is_fake": is_fake,
            "verdict": "synthetic" if is_fake else "real",
            "block_importance": [round(float(x), 6) for x in vs.contributions.mean(axis=0)],
            "error": None,
        }


def _public_source(source: str) -> str:
    """A backbone source as shown to clients: registry names and hub ids as they are, a local
    path reduced to its last component (the server's directory layout is nobody's business)."""
    if Path(source).is_absolute() or source.startswith((".", "~")) or Path(source).exists():
        return Path(source).name or source
    return source


def _mb(n: int) -> str:
    """Bytes as people read them in a limit: "20 MB (20971520 bytes)", "1.5 GB (...)"."""
    for unit, size in (("GB", 1024 * MB), ("MB", MB), ("KB", 1024)):
        if n >= size:
            return f"{f'{n / size:.1f}'.removesuffix('.0')} {unit} ({n} bytes)"
    return f"{n} bytes"


def _error_record(name: str, status: int, reason: str) -> dict[str, Any]:
    return {"name": name, "status": status, "prob_fake": None, "logit": None, "is_fake": None,
            "verdict": None, "block_importance": None, "error": reason}


# ---------------------------------------------------------------------- the app
def create_app(
    detector: Any = None,
    settings: ServerSettings | None = None,
    *,
    detector_factory: Callable[[], Any] | None = None,
    on_load_error: Callable[[BaseException], None] | None = None,
) -> FastAPI:
    """The FastAPI app around a loaded `Detector`, or a factory run in a background thread
    at startup (then `/readyz` answers 503 until it returns). Resources start with the
    app's lifespan: use `with TestClient(app)` in tests."""
    settings = settings or ServerSettings()
    service = Service(settings, detector, detector_factory, on_load_error)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        service.start()
        try:
            yield
        finally:
            service.close()

    app = FastAPI(
        title="rine",
        summary="Detect synthetic (AI-generated) images with RINE (ECCV 2024).",
        version=_version(),
        lifespan=lifespan,
        docs_url=None,  # Swagger UI and ReDoc load their viewers from a CDN
        redoc_url=None,
    )
    app.state.service = service
    key_header = APIKeyHeader(name=API_KEY_HEADER, auto_error=False,
                              description="required when the server was started with an API key")
    expected_key = settings.api_key.encode() if settings.api_key else None

    async def check_key(key: str | None = Depends(key_header)) -> None:
        if expected_key is None:
            return
        # Starlette decodes header bytes as latin-1: re-encoding gives the raw bytes back.
        given = (key or "").encode("latin-1", "replace")
        if not hmac.compare_digest(given, expected_key):
            raise HTTPError(401, f"missing or wrong {API_KEY_HEADER} header")

    def require_ready() -> Service:
        if not service.ready:
            if service.load_error is None:
                raise service.busy("model is loading", "loading")
            raise service.busy("model failed to load", "failed")
        return service

    @app.exception_handler(HTTPError)
    async def _http_error(request: Request, exc: HTTPError) -> JSONResponse:
        return exc.response()

    errors = {401: {"model": ErrorResponse}, 503: {"model": ErrorResponse}}

    @app.get("/healthz", tags=["health"], summary="the process is up")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok"}

    app.head("/healthz", include_in_schema=False)(healthz)  # uptime monitors use HEAD

    @app.get("/readyz", tags=["health"], summary="the model is loaded and the encoder is running",
             responses={503: {"model": ErrorResponse}})
    async def readyz() -> JSONResponse:
        if not service.ready:
            detail = ("model is loading" if service.load_error is None
                      else f"model failed to load ({service.load_error}); see the server log")
            reason = "loading" if service.load_error is None else "failed"
            return JSONResponse({"ready": False, "detail": detail, "reason": reason}, status_code=503,
                                headers={"Retry-After": str(settings.retry_after_s)})
        return JSONResponse({"ready": True, "in_flight": service.in_flight,
                             "upload_bytes_held": service.budget.used, **service.batcher.stats()})

    @app.get("/v1/model", tags=["detect"], response_model=ModelInfo, responses=errors,
             dependencies=[Depends(check_key)], summary="the loaded model")
    async def model_info() -> dict[str, Any]:
        return require_ready().model_info()

    @app.post(
        "/v1/detect",
        tags=["detect"],
        response_model=DetectResponse,
        dependencies=[Depends(check_key)],
        summary="probability that each uploaded image is synthetic",
        description=(
            f"multipart/form-data with one or more images in the repeatable field `{FILES_FIELD}`. "
            "One record per image, in upload order. With several files, a file that cannot be "
            "scored gets `error` and its own `status` in a 200 answer; with one file, its error "
            "status is the answer's status (413 too large, 415 not an image, 422 undecodable)."
        ),
        responses={**errors, 400: {"model": ErrorResponse}, 408: {"model": ErrorResponse},
                   413: {"model": ErrorResponse}, 415: {"model": ErrorResponse}, 422: {"model": ErrorResponse}},
        openapi_extra={"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
            "type": "object", "required": [FILES_FIELD],
            "properties": {FILES_FIELD: {"type": "array", "items": {"type": "string", "format": "binary"}}},
        }}}}},
    )
    async def detect(request: Request):
        t_start = time.perf_counter()
        if not same_site(request.headers):
            raise HTTPError(403, "cross-origin request refused: this API takes uploads from its own page, "
                                 "or from clients outside a browser")
        svc = require_ready()
        boundary = _multipart_boundary(request.headers.get("content-type", ""))
        length = request.headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                raise HTTPError(400, "invalid Content-Length")
            if int(length) > settings.max_request_bytes:
                raise HTTPError(413, f"request body too large: {_mb(int(length))}, over the limit of "
                                     f"{_mb(settings.max_request_bytes)}")
        if svc.in_flight >= settings.max_concurrent_requests:
            raise svc.busy("server busy: too many requests in progress")
        svc.in_flight += 1
        reader = _UploadReader(settings, svc.budget)
        try:
            try:
                uploads = await asyncio.wait_for(reader.read(request, boundary), settings.read_timeout_s)
            except asyncio.TimeoutError:
                raise HTTPError(408, f"request body not received within {settings.read_timeout_s:g} s") from None
            if not uploads:
                raise HTTPError(422, f"no images: send them in the multipart field '{FILES_FIELD}'")
            records = await svc.score_uploads(uploads)
        finally:
            reader.release()
            svc.in_flight -= 1
        body = {
            "model": svc.detector.config.name,
            "threshold": svc.detector.threshold,
            "model_block_importance": svc._model_block_importance,
            "results": records,
        }
        # Server-Timing lets a client tell time spent here from time spent on the network.
        timing = {"Server-Timing": f"total;dur={1000 * (time.perf_counter() - t_start):.1f}"}
        if len(records) == 1 and records[0]["error"]:
            return JSONResponse({"detail": records[0]["error"], **body}, status_code=records[0]["status"],
                                headers=timing)
        return JSONResponse(body, headers=timing)

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    if settings.allowed_hosts is not None:  # added first: runs inside the security headers
        app.add_middleware(AllowedHosts, hosts=settings.allowed_hosts)
    app.add_middleware(SecurityHeaders)
    return app


def _multipart_boundary(content_type: str) -> bytes:
    ctype, options = parse_options_header(content_type)
    if ctype != b"multipart/form-data":
        raise HTTPError(415, f"send images as multipart/form-data in the field '{FILES_FIELD}'")
    boundary = options.get(b"boundary")
    if not boundary or len(boundary) > 200:
        raise HTTPError(400, "multipart/form-data without a valid boundary")
    return boundary


def _version() -> str:
    try:
        from .. import __version__

        return __version__
    except ImportError:
        return "0"
